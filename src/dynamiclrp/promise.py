"""The Promise System: recover an activation autograd did not keep.

A rule that needs an operand its node did not save (the operands of ``add``, the summands of ``sum``, the input
of ``softmax``, an input dropped because a parameter is frozen) makes a *promise* for it. The promise is kept by
the nearest node below that can reproduce the activation from what autograd saved -- an *Arg Node*: a node that
saved its own output (``relu``, ``softmax``, attention), a consumer that saved the same tensor as one of its
operands (``mm`` saves its input, ``mul`` its factors), or a leaf. The forward ops in between (*internal nodes*)
are replayed from there. No model re-run, no forward hook.

Unlike the paper's push-style traversal (promise branches travelling down with the relevance, stalled Arg Nodes,
pre-promises to escape deadlocks), a promise here is resolved on demand by a pull: the value of a node is a pure
function of the values below it, and the graph is a DAG, so resolution is a memoised depth-first evaluation that
cannot deadlock, whatever the traversal order of relevance. Each activation is recovered at most once per run.

Statistics follow the paper's definitions: *promises* counts operand activations a rule needed and its node did
not save (one *branch* each: the paper's table counts branches), *origins* the nodes that made them, *internal
nodes* the nodes whose output had to be replayed, and the depth of a promise is the distance from the requesting
node to the Arg Nodes that resolved it; δ is the sum of the depths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import ActivationUnavailableError
from .ops.base import Routing, out_shape, recorded_shape, saved

if TYPE_CHECKING:  # pragma: no cover
    from .graph import Graph, Node


@dataclass
class PromiseStats:
    """Counts of one run, as the paper defines them."""

    promises: int = 0
    origins: int = 0
    recovered: int = 0
    internal_nodes: int = 0
    delta: int = 0


class Promises:
    """Memoised recovery of node outputs for one run."""

    def __init__(self, graph: Graph, notes: dict[str, int] | None = None, subtract_addends: bool = False):
        self.graph = graph
        self.notes = notes if notes is not None else {}
        # recover an addend as the saved sum less the other addends (one subtraction, within an ulp of the sum)
        # instead of replaying the layer that made it; off by default, counted in ``notes`` when used
        self.subtract_addends = subtract_addends
        self._subtracting = False
        # while :meth:`subtracted` asks: None (no subtraction unless subtract_addends), "value" (the estimate) or
        # "sum" (the sum it was subtracted from, put through the same views)
        self._bounding: str | None = None
        self._estimated: set[tuple[int, int]] = set()  # (sum, operand) an estimate was taken from
        self._subtracted = 0
        # values replayed with an untracked constant taken as zero (an attention mask added to the scores):
        # only a consumer that can check them against what autograd saved may use them (softmax does)
        self.provisional: set[tuple[int, int]] = set()
        # provisional values a consumer verified on the positions where relevance flows (see ops.attention)
        self.certified: set[tuple[int, int]] = set()
        self.values: dict[tuple[int, int], torch.Tensor] = {}
        self.recovered_keys: set[tuple[int, int]] = set()  # every value recovered (values drops released ones)
        self.depth: dict[int, int] = {}
        self.replayed: set[int] = set()
        self.stats = PromiseStats()
        self._origins: set[int] = set()
        #: called with each node whose outputs a replay has just recovered (the gradient form releases them once
        #: the node's backward has run: no rule needs them after that)
        self.on_replay: Callable[[Node], None] | None = None

    def request(self, node: Node, i: int) -> torch.Tensor | None:
        """Operand ``i`` of ``node``, which the node did not save (one promise). None if outside the graph."""
        edge = node.inputs[i]
        if edge is None:
            return None
        value = self.value(edge.child, edge.nr)
        key = (edge.child, edge.nr)
        if key in self.provisional and not node.spec.checks_provisional:
            if (node.id, 0) in self.certified and node.spec.family == "sum":
                # an addition whose (provisional) output was verified downstream: its relevance is zero
                # wherever the untracked constants matter, so its provisional operands are exact where used
                self.certify(key)
                self._count(node, edge.child)
                return value
            producer = self.graph.nodes[edge.child]
            raise ActivationUnavailableError(
                f"{node.kind} (node #{node.id}) needs operand {i}, the output of {producer.kind} "
                f"(node #{producer.id}), which depends on a constant autograd did not record (a tensor that "
                "does not require grad, or a Python scalar). Make that operand a tensor that requires grad, "
                "or register a rule that does not need this activation"
            )
        self._count(node, edge.child)
        return value

    def _count(self, node: Node, child: int) -> None:
        self.stats.promises += 1
        self.stats.delta += 1 + self.depth[child]
        if node.id not in self._origins:
            self._origins.add(node.id)
            self.stats.origins += 1

    def certify(self, key: tuple[int, int]) -> None:
        """Mark a provisional value as verified, and the values it was copied from (views, casts, masked_fill and
        other single-operand routing: where relevance flows, their elements are the verified ones)."""
        nodes = self.graph.nodes
        while key in self.provisional and key not in self.certified:
            self.certified.add(key)
            node = nodes[key[0]]
            operands = [e for e in node.inputs if e is not None]
            if len(operands) != 1 or not (node.spec.transparent or isinstance(node.spec, Routing)):
                break
            key = (operands[0].child, operands[0].nr)

    def forget(self, node: Node) -> None:
        """Release the node's recovered outputs (asked for again, they are recovered again)."""
        for nr in range(node.spec.n_outputs(node)):
            self.values.pop((node.id, nr), None)
        self.replayed.discard(node.id)

    def saved_copy(self, node: Node, nr: int = 0) -> torch.Tensor | None:
        """Output slot ``nr`` if a consumer saved it (directly or behind views), never recomputed; else None."""
        v = self._saved_copy((node.id, nr))
        if v is not None:
            self.values.setdefault((node.id, nr), v)
        return v

    def available(self, node: Node, nr: int = 0) -> torch.Tensor | None:
        """Output slot ``nr`` if saved tensors hold it (no replay), else None."""
        return self._direct(node, nr)

    def value(self, nid: int, nr: int = 0) -> torch.Tensor:
        """The forward output slot ``nr`` of node ``nid``, from saved tensors or by replay."""
        nodes = self.graph.nodes
        if self._direct(nodes[nid], nr) is not None:
            return self.values[(nid, nr)]
        stack = [nid]
        while stack:  # iterative depth-first replay: no recursion limit on long chains
            n = stack[-1]
            if n in self.replayed:
                stack.pop()
                continue
            node = nodes[n]
            missing = [e.child for e in node.inputs
                       if e is not None and self._direct(nodes[e.child], e.nr) is None]
            if missing:
                stack.extend(missing)
                continue
            self._replay(node)
            stack.pop()
        return self.values[(nid, nr)]

    def dense_value(self, nid: int, nr: int = 0) -> torch.Tensor:
        """:meth:`value`, its last dimension adjacent in memory: a value laid out otherwise is copied once and the
        copy (equal) kept in its place for every later reader. For a value many passes read: T5 looks its position
        bias up as (queries, keys, heads) and permutes it, so its keys lie a head count apart, and each of the
        layers' elementwise passes over it (and the sum's replay, which keeps its operand's layout) reads with that
        stride: on the CPU about 4x the time of a dense pass."""
        v = self.value(nid, nr)
        if v.dim() and v.shape[-1] > 1 and v.stride(-1) != 1:
            v = self.values[(nid, nr)] = v.contiguous()
        return v

    def _replay(self, node: Node) -> None:
        inputs = [None if e is None else self.values[(e.child, e.nr)] for e in node.inputs]
        provisional = any(e is not None and (e.child, e.nr) in self.provisional for e in node.inputs)
        try:
            # an operand outside the graph: the op may have saved it (mul by a constant), else the replay is
            # provisional (a zero_constants op takes it as zero) or impossible (forward raises)
            provisional = (provisional or node.spec.always_provisional
                           or (any(x is None for x in inputs) and node.spec.zero_constants))
            out = node.spec.forward(node, inputs)
        except NotImplementedError:
            raise ActivationUnavailableError(
                f"cannot recover the output of {node.kind} (node #{node.id}): autograd saved nothing to rebuild "
                "it from, and it cannot be replayed (an operand is a constant autograd did not record, or the op "
                "has no replay); make its operands require grad, or register an op entry with a `forward`"
            ) from None
        for k, o in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
            self.values.setdefault((node.id, k), o)
            self.recovered_keys.add((node.id, k))
            if provisional:
                self.provisional.add((node.id, k))
        self.replayed.add(node.id)
        self.depth[node.id] = 1 + max((self.depth[e.child] for e in node.inputs if e is not None), default=0)
        self.stats.internal_nodes += 1
        self.stats.recovered += 1
        if self.on_replay is not None:
            self.on_replay(node)

    def _saved_copy(self, key: tuple[int, int], depth: int = 0) -> torch.Tensor | None:
        """The value at ``key`` as a consumer saved it, or as a consumer saved a view of it that keeps every
        element (``q.view(...).transpose(...)`` saved by the attention's matmul), the views undone. Where the graph
        has a plan's skeleton, the first run's search is kept (:meth:`_route_of`) and the next runs follow it."""
        skeleton = getattr(self.graph, "skeleton", None)
        if depth or skeleton is None or self._bounding or self.subtract_addends:
            return self._search_copy(key, depth)
        route = skeleton.copies.get(key, _UNKNOWN)
        if route is None:  # no copy found before
            return None
        if route is not _UNKNOWN and route is not _SEARCH:
            v = _follow(self.graph, key, route)
            if v is not None:
                return v
        v = self._search_copy(key, 0)
        if route is _UNKNOWN:
            skeleton.copies[key] = None if v is None else self._route_of(key, v)
        return v

    def _route_of(self, key: tuple[int, int], v: torch.Tensor) -> tuple | object:
        """Where a plan's later runs find the value ``v`` at ``key`` (a saved copy just found): the consumer, below
        views that keep every element, that saved a tensor sharing ``v``'s memory, which operand, that tensor's
        layout (size, strides, offset, memory size) and ``v``'s layout in the same memory. A later run of the same
        skeleton reads that saved tensor and, where its layout and the slot's shape are as recorded (the same views
        of the same layout give the same view), takes ``v`` as that view of it, one ``as_strided`` where the search
        undid each view (T5-small at 128 tokens, 2 threads: 98 of 141 look-ups an explanation, 6.2 -> 3.5 ms).
        Where no saved tensor shares ``v``'s memory (undoing a view copied), the search runs every time."""
        graph, ptr = self.graph, v.untyped_storage().data_ptr()
        level = [key]
        for _ in range(16):
            below = []
            for slot in level:
                for c, i in graph.consumers.get(slot, ()):
                    consumer = graph.nodes[c]
                    y = consumer.spec.saved_input(consumer, i)
                    if y is not None and y.untyped_storage().data_ptr() == ptr and y.dtype == v.dtype:
                        return c, i, _layout(y), y.untyped_storage().nbytes(), _layout(v)
                    if consumer.spec.invert is not None and len(consumer.inputs) == 1:
                        below.append((c, 0))
            level = below
        return _SEARCH

    def _search_copy(self, key: tuple[int, int], depth: int = 0) -> torch.Tensor | None:
        """:meth:`_saved_copy`, searched."""
        consumers = self.graph.consumers.get(key, ())
        for c, i in consumers:
            consumer = self.graph.nodes[c]
            v = consumer.spec.saved_input(consumer, i)
            if v is not None:
                return v
        node = self.graph.nodes[key[0]]
        if depth >= 16 or node.part != 0:
            return None
        for c, _ in consumers:
            consumer = self.graph.nodes[c]
            if consumer.spec.invert is None or len(consumer.inputs) != 1:
                continue
            y = self.values.get((c, 0))
            if y is None:
                y = self._search_copy((c, 0), depth + 1)
            if y is not None:
                shape = torch.Size(out_shape(node.fn, key[1]))
                x = consumer.spec.invert(consumer.fn, y, shape)
                if x.shape == shape:
                    return x
        shape = torch.Size(out_shape(node.fn, key[1]))
        for c, i in consumers:
            if self.graph.nodes[c].kind == "CatBackward0":
                x = self._part_of_cat(self.graph.nodes[c], i, depth)
                if x is not None and x.shape == shape:
                    return x
        x = self._from_parts(consumers, depth)
        if x is None and (self.subtract_addends or self._bounding):
            x = self._by_subtraction(key, shape, consumers, depth)
        return x if x is not None and x.shape == shape else None

    def _by_subtraction(self, key: tuple[int, int], shape: torch.Size, consumers, depth: int) -> torch.Tensor | None:
        """The value at ``key`` as an addition's saved output less its other operands (``s - b`` for ``s = a + b``),
        where the sum and every other operand are held without replay (saved, or a copy a consumer saved): one
        element-wise pass instead of replaying the layer that made ``a``. Within an ulp of ``s`` (see
        ``AddTerms.operand_from_output``); counted as an approximation. The sum and the other operands are looked up
        without subtraction; one recovered by an earlier subtraction (``x + a + b`` in one expression: the inner sum
        from the outer) can still serve, each step adding at most its own bound."""
        if self._subtracting:
            return None
        nodes = self.graph.nodes
        self._subtracting = True
        try:
            for c, i in consumers:
                add = nodes[c]
                edges = add.inputs
                if any(e is None for e in edges) or sum((e.child, e.nr) == key for e in edges) != 1:
                    continue  # a constant autograd did not record, or this value added to itself
                out = self.held(add, 0)
                operands = [None if k == i else self.held(nodes[e.child], e.nr) for k, e in enumerate(edges)]
                if out is None or any(v is None for k, v in enumerate(operands) if k != i):
                    continue
                if self._bounding and len(edges) != 2:  # the bound is a two-term sum's: one rounding
                    continue
                if self._bounding == "sum":  # the sum the estimate was taken from, no other
                    if (c, i) in self._estimated:
                        self._subtracted += 1
                        return out
                    continue
                x = add.spec.operand_from_output(add, i, out, operands)
                if x is not None and x.shape == shape:
                    if self._bounding:
                        self._subtracted += 1
                        self._estimated.add((c, i))
                        return x
                    what = f"{add.kind}: addend recovered as the saved sum less the other addends (subtract_addends)"
                    self.notes[what] = self.notes.get(what, 0) + 1
                    return x
            return None
        finally:
            self._subtracting = False

    def subtracted(self, node: Node, nr: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        r"""Output slot ``nr`` estimated without a replay, where the slot (or a view of it that keeps every
        element) is one addend of a two-term sum :math:`s = \mathrm{fl}(a + b)` that saved tensors hold, with the
        other addend: ``(d, s)``, :math:`d = \mathrm{fl}(s - b)` (a fresh tensor) and the sum, both laid out as the
        slot. Each rounding is at most half an ulp of its result (Higham, *Accuracy and Stability of Numerical
        Algorithms*, 2002, §2.2), so

        .. math:: |d - a| \le u\,(|s| + |d|) + 2\eta

        (:math:`u` the unit roundoff of the dtype, :math:`\eta` its smallest subnormal). None where the value is
        held exactly (a saved copy found is kept: :meth:`value` returns it without searching again), no such sum
        is held, or ``subtract_addends`` already recovers addends that way (uncertified, by the user's choice). The
        estimate is not kept: it is not the value."""
        key = (node.id, nr)
        if self.subtract_addends or key in self.values:
            return None
        copy = self._saved_copy(key)
        if copy is not None:  # held exactly: kept for the value asked for next (the search is not made twice)
            self._keep(key, copy)
            return None
        got, self._estimated = [], set()
        for mode in ("value", "sum"):  # the sum put through the same views as the estimate
            self._bounding, self._subtracted = mode, 0
            try:
                v = self._saved_copy(key)
            finally:
                self._bounding = None
            if v is None or not self._subtracted:
                return None
            got.append(v)
        return got[0], got[1]

    def held(self, node: Node, nr: int = 0) -> torch.Tensor | None:
        """Output slot ``nr`` held without a replay or a product (saved, a saved copy, or rebuilt element-wise from
        saved tensors: a norm's output, a leaf), and not provisional; else None."""
        key = (node.id, nr)
        if key in self.provisional:
            return None
        if node.spec.costly_output:  # its own output() would recompute a matrix product or a convolution
            v = self.values.get(key)
            return v if v is not None else self._saved_copy(key)
        return self._direct(node, nr)

    def _part_of_cat(self, cat: Node, i: int, depth: int) -> torch.Tensor | None:
        """Operand ``i`` of ``cat`` as the slice of a saved copy of its output (a key/value cache appended to);
        None unless every other operand's size along the dimension is known (or just one of them is not)."""
        out = self._copy((cat.id, 0), depth)
        if out is None:
            return None
        dim = saved(cat.fn, "dim") % out.dim()
        shapes = [None if e is None else recorded_shape(self.graph.nodes[e.child], e.nr) for e in cat.inputs]
        sizes = [None if s is None or dim >= len(s) else s[dim] for s in shapes]
        if sizes[i] is None or sum(s is None for s in sizes) > 1:
            return None
        sizes = [out.shape[dim] - sum(s for s in sizes if s is not None) if s is None else s for s in sizes]
        return out.narrow(dim, sum(sizes[:i]), sizes[i])

    def _from_parts(self, consumers, depth: int) -> torch.Tensor | None:
        """A value assembled from saved copies of all its parts: ``qkv[0], qkv[1], qkv[2]`` (selects along one
        dimension, one per index: torchvision's packed attention projection), or every output of an ``unbind`` or
        ``split``. None unless every part has a copy."""
        nodes = self.graph.nodes
        if not consumers:
            return None
        first = nodes[consumers[0][0]]
        if all(nodes[c].kind == "SelectBackward0" for c, _ in consumers):
            sizes = saved(first.fn, "self_sym_sizes")
            dims = {saved(nodes[c].fn, "dim") % len(sizes) for c, _ in consumers}
            if len(dims) != 1:
                return None
            (dim,) = dims
            by_index = {saved(nodes[c].fn, "index") % sizes[dim]: c for c, _ in consumers}
            if len(consumers) != sizes[dim] or len(by_index) != sizes[dim]:
                return None
            parts = [self._copy((by_index[k], 0), depth) for k in range(sizes[dim])]
            return None if any(p is None for p in parts) else torch.stack(parts, dim)
        if len(consumers) == 1 and first.kind in ("UnbindBackward0", "SplitBackward0", "SplitWithSizesBackward0"):
            parts = [self._copy((first.id, k), depth) for k in range(first.spec.n_outputs(first))]
            if any(p is None for p in parts):
                return None
            dim = saved(first.fn, "dim")
            return torch.stack(parts, dim) if first.kind == "UnbindBackward0" else torch.cat(parts, dim)
        return None

    def _copy(self, key: tuple[int, int], depth: int) -> torch.Tensor | None:
        v = self.values.get(key)
        return v if v is not None else self._search_copy(key, depth + 1)

    def _direct(self, node: Node, nr: int) -> torch.Tensor | None:
        """Output slot ``nr`` from the node's own saved tensors, or from a consumer that saved it as an operand."""
        key = (node.id, nr)
        v = self.values.get(key)
        if v is not None:
            self.depth.setdefault(node.id, 0)  # a value handed in (an explained output) is an Arg Node too
            return v
        v = self._saved_copy(key)  # a saved copy first: free, where `output` may compute
        if v is None:
            v = node.spec.output(node, nr)
        if v is not None:
            self._keep(key, v)
        return v

    def _keep(self, key: tuple[int, int], v: torch.Tensor) -> None:
        """Hold ``v`` as the value at ``key``: a saved copy, or the node's output from its own saved tensors (no
        replay of nodes below), counted once as recovered."""
        self.values[key] = v
        self.depth.setdefault(key[0], 0)
        if key not in self.recovered_keys:  # read again after its release: a saved tensor, no new work
            self.recovered_keys.add(key)
            self.stats.recovered += 1


#: :attr:`~dynamiclrp.plan.Skeleton.copies`: not asked yet, and found without a route to follow (search again)
_UNKNOWN, _SEARCH = object(), object()


def _layout(t: torch.Tensor) -> tuple:
    """A tensor's place in its memory: size, strides and offset."""
    return tuple(t.shape), t.stride(), t.storage_offset()


def _follow(graph: Graph, key: tuple[int, int], route: tuple) -> torch.Tensor | None:
    """The value at ``key`` by a route :meth:`Promises._route_of` recorded, or None where this run's saved tensor
    or the slot's shape differ from the recorded ones (the caller searches)."""
    c, i, layout, nbytes, (size, stride, offset) = route
    consumer = graph.nodes[c]
    y = consumer.spec.saved_input(consumer, i)
    if y is None or _layout(y) != layout or y.untyped_storage().nbytes() != nbytes or \
            tuple(out_shape(graph.nodes[key[0]].fn, key[1])) != size:
        return None
    return y.as_strided(size, stride, offset)
