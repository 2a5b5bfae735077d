"""The propagation loop: one pass over the graph, from the outputs to the inputs.

Nodes are visited in a topological order in which every node comes after all of its consumers, so by the time a
node is reached the relevance of each of its output slots is complete (summed over its consumers). The loop
knows no op by name: it asks the node's op entry for the relevance of each operand, and the op entry asks the
preset for a rule and the Promise System for any activation autograd did not keep.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import NonFiniteError
from .graph import Graph, Node
from .ops.base import all_finite, extremes, recorded_shape
from .plan import lru_get, lru_put
from .presets import FALLBACK, Preset
from .promise import Promises

MAX_RECORD_SETS = 8  # recorded sets whose useful nodes a plan's skeleton keeps (LRU)


@dataclass
class LedgerEntry:
    """Where the relevance of one node went: in, to data operands, to parameters/constants, absorbed."""

    node: int
    kind: str
    r_in: torch.Tensor
    r_data: torch.Tensor
    r_params: torch.Tensor

    @property
    def absorbed(self) -> torch.Tensor:
        """Relevance neither passed on nor given to parameters: stabilisers and non-conservative rules."""
        return self.r_in - self.r_data - self.r_params


#: the size from which a CPU temporary is kept for the run (:meth:`Run.scratch`): glibc's malloc serves larger
#: blocks by a fresh memory mapping, always (its largest dynamic mmap threshold on 64-bit systems, 32 MiB)
SCRATCH_BYTES = 32 << 20


@dataclass
class Run:
    """State of one propagation: the graph, the rules, recovered activations, recorded relevance."""

    graph: Graph
    preset: Preset
    dtype: torch.dtype
    record: set[tuple[int, int]]
    node_rules: dict[int, dict[str, Any]] = field(default_factory=dict)
    ledger: list[LedgerEntry] | None = field(default_factory=list)
    check_finite: bool = True
    recorded: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    approximations: dict[str, int] = field(default_factory=dict)
    rules_run: int = 0
    subtract_addends: bool = False
    bypassed: dict[str, int] = field(default_factory=dict)  # node type -> nodes the gradient form bypassed
    seeds: frozenset = frozenset()  # the output slots (node id, nr) the gradient form's pass starts from
    #: the nodes the gradient form's pass reaches, as its steps were worked out (None: not worked out in this run)
    reached: frozenset[int] | None = None

    def __post_init__(self):
        self.promises = Promises(self.graph, self.approximations, self.subtract_addends)
        self.useful = _useful(self.graph, self.record)
        self._scratch: dict[tuple, torch.Tensor] = {}
        #: what an op entry works out once per run for all its nodes together (keyed by the entry's own label)
        self.derived: dict[Hashable, Any] = {}
        #: the flags of the gradient form's ratios (``ops.base.carried_flag``): whether each carried all its relevance
        #: (an infinity is relevance at a zero value, which no ratio carries)
        self.carried: list[torch.Tensor] = []
        #: the gradient form's softmax mask checks, read with ``carried`` after the pass: per softmax the extremes
        #: of the deviations and of the logits (four numbers on the device) and the tolerance
        #: (``ops.attention._check_mask``)
        self.mask_checks: list[tuple[torch.Tensor, float]] = []
        #: a recorded bias's value (slot) whose untracked mask a softmax's check found constant per row at every
        #: position, where every position was attended: the deviation measured (on the device), which every other
        #: layer adding the same bias reuses instead of checking again (``ops.attention._scores_identity_step``)
        self.verified_masks: dict[tuple[int, int], torch.Tensor] = {}

    def scratch(self, key: str, like: torch.Tensor) -> torch.Tensor | None:
        """A buffer with ``like``'s shape, dtype and device that an op entry may overwrite during its own turn and
        must neither return nor keep (but for a pre-hook's result handed to a node whose backward uses it up at
        once: :data:`dynamiclrp.ops.base.SCRATCH`), for an op's ``out=``: one per key, shape and dtype for the
        whole run where that pays, else None (the op allocates). Each layer's temporaries then reuse the
        previous layer's memory: on CPU a fresh tensor of :data:`SCRATCH_BYTES` or more costs several times the
        arithmetic that fills it (the C allocator maps such blocks anew each time, page faults included), where
        a smaller one, or any on a GPU (the caching allocator), reuses freed memory anyway and a kept buffer
        would only add to the peak."""
        if like.device.type != "cpu" or like.numel() * like.element_size() < SCRATCH_BYTES:
            return None
        k = (key, like.shape, like.dtype, like.device)
        buf = self._scratch.get(k)
        if buf is None:
            buf = self._scratch[k] = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        return buf

    def propagate(self, seeds: dict[tuple[int, int], torch.Tensor]) -> None:
        nodes = self.graph.nodes
        pending: dict[int, list] = {}
        sums: set[tuple[int, int]] = set()  # slots holding a sum the engine made (its own memory)
        finite: list[tuple[Node, list]] = []
        # the ledger: per slot, the total of the relevance delivered to it (each rule's outputs are summed once, as
        # they leave it; the sums also tell whether they are finite)
        totals: dict[tuple[int, int], torch.Tensor] | None = {} if self.ledger is not None else None
        for (nid, nr), seed in seeds.items():
            seed = seed.to(self.dtype)
            _deliver(pending, sums, nodes[nid], nr, seed)
            if totals is not None:
                _add_total(totals, (nid, nr), seed.sum())
        release = _Release(self.graph, self.promises)
        for nid in self.graph.order:
            release.done(nid)  # the previous node's turn is over: release what nothing will ask for again
            R = pending.pop(nid, None)
            if R is None:
                continue
            node = nodes[nid]
            for nr, r in enumerate(R):
                if (nid, nr) in self.record and r is not None:
                    self.recorded[(nid, nr)] = r
            if not any(e is not None and self.useful[e.child] for e in node.inputs):
                continue  # nothing below was asked for (a leaf, or e.g. an embedding table)
            ctx = Context(self, node, R)
            R_in = node.spec.relevance(ctx)
            self.rules_run += 1
            out = None if totals is None else [None if r is None else r.sum() for r in R_in]
            if self.check_finite:  # values per node, checked and read once at the end: no host sync per node
                if out is None:
                    flags = [None if r is None else extremes(r) for r in R_in]
                else:  # the ledger's sums: non-finite where an element is (or where the sum overflows)
                    flags = [None if t is None else t.reshape(1) for t in out]
                finite.append((node, flags))
            if totals is not None:
                self._book(node, [totals.pop((nid, nr), None) for nr in range(len(R))], out)
            for k, (e, r) in enumerate(zip(node.inputs, R_in)):
                if e is not None and r is not None and self.useful[e.child]:
                    _deliver(pending, sums, nodes[e.child], e.nr, r)
                    if totals is not None:
                        _add_total(totals, (e.child, e.nr), out[k])
            if not pending:
                break
        self._scratch.clear()
        if finite:
            _check_finite(finite)

    def note_approximation(self, node: Node, what: str) -> None:
        key = f"{node.kind}: {what}"
        self.approximations[key] = self.approximations.get(key, 0) + 1

    def _book(self, node: Node, totals_in: list, totals_out: list) -> None:
        """A ledger entry from the totals of the relevance the node received (per output slot) and of what its rule
        gave each operand."""
        zero = torch.zeros((), dtype=self.dtype)
        r_in = sum((t for t in totals_in if t is not None), zero)
        r_data, r_params = zero, zero
        for e, t in zip(node.inputs, totals_out):
            if t is None:
                continue
            if e is not None and self.graph.nodes[e.child].data:
                r_data = r_data + t
            else:
                r_params = r_params + t
        self.ledger.append(LedgerEntry(node.id, node.kind, r_in, r_data, r_params))


class Context:
    """What an op entry sees while computing one node's relevance."""

    __slots__ = ("run", "node", "R")

    def __init__(self, run: Run, node: Node, R: list):
        self.run, self.node, self.R = run, node, R

    @property
    def dtype(self) -> torch.dtype:
        return self.run.dtype

    @property
    def device(self) -> torch.device:
        return next(r for r in self.R if r is not None).device

    def wants(self, i: int) -> bool:
        """Whether operand ``i`` leads to anything that was asked for (else its relevance need not be computed)."""
        e = self.node.inputs[i]
        return e is not None and self.run.useful[e.child]

    def is_data(self, i: int) -> bool:
        """Whether operand ``i`` depends on the model's input (False for parameters and constants)."""
        e = self.node.inputs[i]
        return e is not None and self.run.graph.nodes[e.child].data

    def input(self, i: int) -> torch.Tensor | None:
        """Forward value of operand ``i``, in the relevance dtype: saved by the node, or kept by a promise."""
        x = self.node.spec.saved_input(self.node, i)
        if x is None:
            x = self.run.promises.request(self.node, i)
        if x is None:
            x = self.node.spec.infer_input(self, i)
        return None if x is None else x.to(self.dtype)

    def input_shape(self, i: int) -> torch.Size | None:
        """Shape of operand ``i`` (without recovering its value when the graph records it)."""
        e = self.node.inputs[i]
        if e is None:
            return None
        shape = recorded_shape(self.run.graph.nodes[e.child], e.nr)
        return shape if shape is not None else self.run.promises.value(e.child, e.nr).shape

    def output(self, nr: int = 0) -> torch.Tensor:
        """Forward value of the node's output slot ``nr``, in the relevance dtype."""
        return self.run.promises.value(self.node.id, nr).to(self.dtype)

    def producer(self, i: int) -> Node | None:
        e = self.node.inputs[i]
        return None if e is None else self.run.graph.nodes[e.child]

    def rule(self, family: str) -> Any:
        """The preset's rule for ``family`` at this node (node overrides, then kind overrides, then family)."""
        return self.rule_at(self.node, family)

    def has_rule(self, family: str) -> bool:
        """Whether ``family`` has a rule of its own at this node (a node override or the preset), no fallback."""
        return family in self.run.node_rules.get(self.node.id, {}) or self.run.preset.defines(family, self.node.kind)

    def rule_at(self, node: Node, family: str) -> Any:
        """The preset's rule for ``family`` at ``node``."""
        per_node = self.run.node_rules.get(node.id)
        fam = family
        while per_node and fam is not None:
            if fam in per_node:
                return per_node[fam]
            fam = FALLBACK.get(fam)
        return self.run.preset.rule(family, node.kind)


def _deliver(pending: dict[int, list], sums: set[tuple[int, int]], node: Node, nr: int, r: torch.Tensor) -> None:
    """Add ``r`` to the relevance pending for output ``nr`` of ``node``. A rule's output may be another's input or
    a recorded relevance, so the first sum is a new tensor; later ones (a value used three times or more, as a
    position bias shared by every layer) add into it."""
    slots = pending.get(node.id)
    if slots is None:
        slots = pending[node.id] = [None] * node.spec.n_outputs(node)
    held = slots[nr]
    if held is None:
        slots[nr] = r
    elif (node.id, nr) in sums and held.shape == r.shape and held.dtype == r.dtype:
        held.add_(r)
    else:
        slots[nr] = held + r
        sums.add((node.id, nr))


class _Release:
    """Drops recovered activations once nothing can ask for them any more, so that a run holds about one layer's
    worth of them rather than every activation it recovered (peak memory).

    A node's output is asked for by its consumers' rules, by its own, and by its producers' (a linear op reads the
    batch norm after it): once the node and all its producers have had their turn it is released. A value asked for
    again after that (from further away) is recovered again -- the same value, at some cost, never a wrong one.
    """

    def __init__(self, graph: Graph, promises: Promises):
        self.graph, self.promises, self.last = graph, promises, None
        self.waiting = [1 + len({e.child for e in n.inputs if e is not None}) for n in graph.nodes]
        self.consumers: list[set[int]] = [set() for _ in graph.nodes]
        for (child, _), uses in graph.consumers.items():
            self.consumers[child].update(c for c, _ in uses)

    def done(self, nid: int) -> None:
        """Called as node ``nid``'s turn begins: the previous node's turn is over."""
        prev, self.last = self.last, nid
        if prev is None:
            return
        for m in (prev, *self.consumers[prev]):
            self.waiting[m] -= 1
            if self.waiting[m] == 0:
                self.promises.forget(self.graph.nodes[m])


def _useful(graph: Graph, record: set[tuple[int, int]]) -> list[bool]:
    """Nodes on a path to something recorded; relevance elsewhere need not be propagated. Kept by a plan's skeleton
    per recorded set (a list no one writes to)."""
    skeleton, key = graph.skeleton, frozenset(record)
    kept = None if skeleton is None else lru_get(skeleton.useful, key)
    if kept is not None:
        return kept
    nodes, useful = graph.nodes, [False] * len(graph.nodes)
    targets = {nid for nid, _ in record}
    for nid in reversed(graph.order):  # producers first
        if nid in targets:
            useful[nid] = True
            continue
        for e in nodes[nid].inputs:
            if e is not None and useful[e.child]:
                useful[nid] = True
                break
    if skeleton is not None:
        lru_put(skeleton.useful, key, useful, MAX_RECORD_SETS)
    return useful


def _add_total(totals: dict, slot: tuple[int, int], t: torch.Tensor) -> None:
    held = totals.get(slot)
    totals[slot] = t if held is None else held + t


def _check_finite(flags: list[tuple[Node, list]]) -> None:
    """Raise for the first node (from the output) whose rule produced NaN or inf. ``flags``: per node, per operand,
    values that are finite exactly where its relevance is (its extremes, or the ledger's sum)."""
    checked = [f for _, fs in flags for f in fs if f is not None]  # none: every rule passed nothing on
    if not checked or bool(all_finite(torch.cat(checked))):
        return
    for node, fs in flags:
        for i, f in enumerate(fs):
            if f is not None and not bool(all_finite(f)):
                raise NonFiniteError(
                    f"the {node.kind} rule (node #{node.id}) produced NaN or inf relevance for operand {i} (or, with "
                    "the ledger on, relevance whose sum overflows its dtype); pass check_finite=False to allow it"
                )
