"""Execution plans: what stays the same between explanations of one architecture, kept for a data-set loop.

A loop over a data set explains the same model again and again. Three things are the same each time:

* **the graph skeleton** -- the op entry and parts of every autograd node, the edges, the consumers, a topological
  order and which nodes carry data (what :meth:`Graph.build` works out), and what the runs found in it: which
  consumer saved a copy of an output, at which layout (:meth:`dynamiclrp.promise.Promises._route_of`: node ids and
  strides, no tensor), and which ReLU follows a layer;
* **the gradient form's working-out** (:mod:`dynamiclrp.gradient_form`) -- which node gets which gradient step, and
  which backward passes are bypassed, per rule set, recorded slots and seeds; kept with the skeleton, the steps
  pointed at each run's nodes in turn;
* **weights transformed by the rules** -- :math:`w^+`, :math:`w^-`, :math:`w + \\gamma w^+`, :math:`w^2`, and a
  batch norm merged into the layer before it.

A :class:`Plan` keeps them, and reuse is checked, never assumed. A skeleton is keyed by a *topology fingerprint*
of the new graph -- every node's type and decomposition into parts, and its edges, in discovery order -- so a
different graph (a branch taken or skipped; another sequence length is the same graph) builds and
stores its own. A transformed weight is keyed by the identity (address, offset, shape, strides, dtype, device) and
the version counter of every tensor it was computed from: an in-place update, an optimiser step or
``load_state_dict`` bumps the version, and the entry holds its source tensors so that their memory cannot be
given to another tensor while the entry lives. Weights not used by the latest explanation are dropped after it.

Only weights are cached (the constant operand of a linear op), never activations: the rules ask through
:func:`weight_derived`, which caches only while :func:`caching_weights` is active, around a linear rule's call.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import DynamicLRPError

_ACTIVE: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("dynamiclrp_weight_plan", default=None)


@dataclass
class PlanStats:
    """How often the plan was reused."""

    graphs_reused: int = 0
    graphs_built: int = 0
    weights_reused: int = 0
    weights_computed: int = 0


@dataclass
class Skeleton:
    """A graph without its autograd objects: per node ``(fn index, kind, spec, inputs, part, data, consumers)``,
    the data sources' answers ``(node, data)`` that the ``data`` flags follow from, and the gradient form's
    prepared passes for this graph."""

    nodes: list[tuple[int, str, Any, list, int, bool, int]]
    order: list[int]
    heads: list[int]
    consumers: dict[tuple[int, int], list[tuple[int, int]]]
    sources: list[tuple[int, bool]] = field(default_factory=list)
    #: the gradient form's working-out per rule set (:func:`dynamiclrp.gradient_form.prepare_gradient_form`)
    passes: dict[Hashable, Any] = field(default_factory=dict)
    #: per set of recorded slots, which nodes lead to one (:func:`dynamiclrp.engine._useful`)
    useful: dict[frozenset, list[bool]] = field(default_factory=dict)
    #: per output slot, where a consumer saved a copy of it (:meth:`dynamiclrp.promise.Promises._route_of`)
    copies: dict[tuple[int, int], Any] = field(default_factory=dict)
    #: per node, the ReLU that alone consumes its output through views (:func:`dynamiclrp.ops.base.relu_above`)
    relus: dict[int, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """A reusable execution plan for repeated explanations of one architecture (pass it as ``plan=``).

    Parameters
    ----------
    max_graphs : int
        Skeletons kept (one per distinct graph seen; the least recently used is dropped first).

    Examples
    --------
    >>> import torch, dynamiclrp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()
    >>> plan = dynamiclrp.Plan()
    >>> for _ in range(3):
    ...     att = dynamiclrp.explain(model, torch.randn(1, 4), preset="epsilon_plus", plan=plan)
    >>> plan.stats.graphs_built, plan.stats.graphs_reused
    (1, 2)
    """

    max_graphs: int = 8
    stats: PlanStats = field(default_factory=PlanStats)
    _skeletons: dict[Hashable, Skeleton] = field(default_factory=dict, repr=False)
    _weights: dict[tuple, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = field(default_factory=dict, repr=False)
    _used: set[tuple] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _owner: int | None = field(default=None, repr=False)

    # -- graph skeletons

    def skeleton(self, fingerprint: Hashable) -> Skeleton | None:
        sk = lru_get(self._skeletons, fingerprint)
        if sk is not None:
            self.stats.graphs_reused += 1
        return sk

    def store(self, fingerprint: Hashable, skeleton: Skeleton) -> None:
        self.stats.graphs_built += 1
        lru_put(self._skeletons, fingerprint, skeleton, self.max_graphs)

    # -- transformed weights

    def derived(self, label: Hashable, sources: Sequence[torch.Tensor], compute: Callable[[], torch.Tensor]):
        """``compute()``, or the value it gave for the same ``label`` and the same, unchanged ``sources``."""
        key = (label, *(_identity(t) for t in sources))
        self._used.add(key)
        hit = self._weights.get(key)
        if hit is not None:
            self.stats.weights_reused += 1
            return hit[1]
        value = compute()
        if value is not None:
            self._weights[key] = (tuple(sources), value)
            self.stats.weights_computed += 1
        return value

    def end_run(self) -> None:
        """Drop the weights the explanation just finished did not use (a replaced or retrained layer's)."""
        for key in [k for k in self._weights if k not in self._used]:
            del self._weights[key]
        self._used = set()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The plan serving one explanation's propagation. It keeps state a propagation points at its own graph
        (the gradient form's steps), so it serves one at a time: another thread's waits; one started inside it
        (from a hook, say) raises."""
        me = threading.get_ident()
        if self._owner == me:
            raise DynamicLRPError("this Plan is already serving an explanation in this thread: an explanation "
                                  "started inside another cannot share its plan; give it a Plan of its own")
        with self._lock:
            self._owner = me
            token = _ACTIVE.set(self)
            try:
                yield
            finally:
                _ACTIVE.reset(token)
                self._owner = None
                self.end_run()

    @property
    def cached_bytes(self) -> int:
        """Memory held by the transformed weights."""
        return sum(t.numel() * t.element_size() for _, v in self._weights.values()
                   for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor))


def lru_get(cache: dict, key: Hashable) -> Any:
    """``cache[key]`` (or None), made the most recently used: a dict keeps its keys in insertion order."""
    value = cache.pop(key, None)
    if value is not None:
        cache[key] = value
    return value


def lru_put(cache: dict, key: Hashable, value: Any, limit: int) -> None:
    """``cache[key] = value``, dropping the least recently used entries beyond ``limit``."""
    cache[key] = value
    while len(cache) > limit:
        del cache[next(iter(cache))]


def _identity(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t._version)


_CACHING: contextvars.ContextVar[bool] = contextvars.ContextVar("dynamiclrp_caching_weights", default=False)


@contextlib.contextmanager
def caching_weights(enabled: bool = True) -> Iterator[None]:
    """Within this block (a linear rule applied to its data operand), :func:`weight_derived` may use the active
    plan: the rule's weight argument is a weight."""
    token = _CACHING.set(enabled)
    try:
        yield
    finally:
        _CACHING.reset(token)


def weight_derived(label: Hashable, w: torch.Tensor | tuple[torch.Tensor, ...],
                   compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A tensor computed from the weight ``w`` alone (``w.clamp(min=0)``, ...), or from a tuple of weights: from
    the active plan where one is active and the caller is a linear rule's weight side, else computed."""
    if not keeps_weights():
        return compute()
    return _ACTIVE.get().derived(label, w if isinstance(w, tuple) else (w,), compute)


def keeps_weights() -> bool:
    """Whether :func:`weight_derived` would use a plan here (a plan is active, on a linear rule's weight side)."""
    return _ACTIVE.get() is not None and _CACHING.get()


def active_plan() -> Plan | None:
    return _ACTIVE.get()
