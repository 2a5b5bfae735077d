r"""Bypasses in the gradient form: a node's backward computed by a cheaper formula, its result handed on by hand.

A gradient hook can change what a node's backward returns, not stop it from running. Where the rule's answer is
known to be much cheaper than the node's own backward, the gradient form can still avoid it: a *pre*-hook computes
the node's input gradients itself and hands the node nothing (a node given no gradient returns none without
computing). What it computed must then reach the nodes below by another way, for autograd does not let a hook turn
"no gradient" into a gradient: it is carried down through the nodes that only this node feeds (each called
directly, with its own step, as the engine would), to the first slot that also receives a gradient from elsewhere,
and added there by a pre-hook of that slot's node. The sums are the engine's, in another order.

The one bypass so far is the fused projection: one matrix product computing the queries, keys and values
(``in_proj`` of ``torch.nn.MultiheadAttention``, GPT-2's ``c_attn``), then split. Under CP-LRP the queries and keys
get no gradient: the product's backward multiplies a gradient two thirds zero by the whole weight. The bypass
multiplies the non-zero columns only, :math:`g_x = g_{[:, a:b]}\,W_{[a:b]}`: the same sum without the zero terms.

Anything unforeseen at run time (a slot that was to take the hand-carried gradient receives none from elsewhere)
raises :class:`UndeliveredError`; :func:`dynamiclrp.gradient_form.propagate_gradient_form` then removes the hooks
and runs the pass again without bypasses.
"""

from __future__ import annotations

from typing import Any

import torch

from .engine import Run
from .ops.base import PreHook, saved

# how the gradient of a fused projection's output reaches the parts it is split into
_SPLITS = frozenset({"SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0", "UnsafeSplitBackward0",
                     "UnsafeSplitWithSizesBackward0"})
_PICKS = frozenset({"SelectBackward0", "SliceBackward0"})
# the projections a bypass can narrow: (input slot of the activation, saved name of the weight side)
_PROJECTIONS = {"AddmmBackward0": (1, "mat2"), "MmBackward0": (0, "mat2")}
_MAX_CHAIN = 8  # nodes carried through by hand below a bypassed node


class UndeliveredError(RuntimeError):
    """A gradient carried past a bypassed node found no gradient to be added to."""


class Bypasses:
    """The bypasses of one gradient pass: the pre-hooks to register (delivery hooks first) and the gradients in
    transit between a bypassed node and the slots that take them."""

    def __init__(self) -> None:
        self.hooks: list[tuple[Any, PreHook]] = []
        self.pending: dict[tuple[Any, int], torch.Tensor] = {}
        self.bypassed = 0  # nodes whose own backward was bypassed in this pass
        self._delivery_slots: dict[Any, set[int]] = {}

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def undelivered(self) -> bool:
        """Whether a carried gradient is still waiting after the pass (its slot's node never ran)."""
        return bool(self.pending)

    # ---------------------------------------------------------------------------------------------- planning
    def add_delivery(self, fn: Any, slot: int) -> None:
        slots = self._delivery_slots.get(fn)
        if slots is None:
            slots = self._delivery_slots[fn] = set()
            self.hooks.insert(0, (fn, PreHook(self._deliver_hook(fn))))  # before the node's own steps
        slots.add(slot)

    def _deliver_hook(self, fn: Any):
        def hook(grad_outputs):
            grads = list(grad_outputs)
            for slot in self._delivery_slots[fn]:
                carried = self.pending.pop((fn, slot), None)
                if carried is None:
                    continue
                if grads[slot] is None:
                    raise UndeliveredError(f"{fn.name()} slot {slot} receives no gradient besides a bypassed node's")
                grads[slot] = grads[slot] + carried.to(grads[slot].dtype)
            return tuple(grads)
        return hook

    # ---------------------------------------------------------------------------------------------- running
    def carry(self, route: Any, grad: torch.Tensor) -> None:
        """Send ``grad`` along a planned route: ``None`` (nothing needs it), ``("deliver", fn, slot)`` or
        ``("through", fn, step, children)``."""
        if route is None:
            return
        if route[0] == "deliver":
            key = (route[1], route[2])
            prev = self.pending.get(key)
            self.pending[key] = grad if prev is None else prev + grad
            return
        _, fn, step, children = route
        grads: tuple = (grad,)
        if isinstance(step, PreHook):
            grads = step.hook(grads)
        out = fn(*grads) if callable(fn) else fn.apply(*grads)
        out = out if isinstance(out, tuple) else (out,)
        if step is not None and not isinstance(step, PreHook):
            out = step(out, grads)
        for (child, nr), sub, g in zip(fn.next_functions, children, out):
            if sub is not None and g is not None:
                meta = child._input_metadata[nr]  # as the engine does with a node's results
                if g.shape != meta.shape:
                    g = g.sum_to_size(meta.shape)
                self.carry(sub, g.to(meta.dtype))


class _NoBypassError(Exception):
    pass


def plan_bypasses(run: Run, steps: dict[Any, Any]) -> Bypasses:
    """The bypasses this run's graph allows, given the other nodes' gradient ``steps`` (autograd node → hook)."""
    graph, useful = run.graph, run.useful
    bypasses = Bypasses()
    for fn, nid in graph.head.items():
        kind = fn.name()
        if kind not in _PROJECTIONS or fn in steps or not useful[nid] or not _feeds_a_split(run, nid, steps):
            continue
        x_slot, weight = _PROJECTIONS[kind]
        if any(i != x_slot and _useful_child(run, fn, i)[2] for i in range(len(fn.next_functions))):
            continue  # the weight (or bias) side is wanted too: keep the node's own backward
        deliveries: list[tuple[Any, int]] = []
        try:
            route = _route(run, steps, fn, x_slot, 0, deliveries)
        except _NoBypassError:
            continue
        if route is not None:
            for child, nr in deliveries:
                bypasses.add_delivery(child, nr)
            bypasses.hooks.append((fn, PreHook(_narrowed_projection(bypasses, fn, weight, route))))
    return bypasses


def _narrowed_projection(bypasses: Bypasses, fn: Any, weight: str, route: Any):
    r"""Pre-hook of a bypassed projection ``y = x W (+ b)``: :math:`g_x = \alpha\,g_{[:, a:b]}\,W_{[:, a:b]}^\top`
    over the columns ``a:b`` that hold every non-zero of ``g``, the node itself given nothing. Where the first and
    the last column both hold one (AttnLRP: queries and values have gradients) nothing is narrowed and the node runs
    its own backward: two columns read."""
    def hook(grad_outputs):
        g = grad_outputs[0]
        if g is None or bool(torch.stack((g[:, 0].any(), g[:, -1].any())).all()):  # one device sync, not two
            return grad_outputs
        cols = g.any(0).nonzero()
        if cols.numel():
            a, b = int(cols[0]), int(cols[-1]) + 1
            if b - a == g.shape[1]:
                return grad_outputs
            gx = g[:, a:b] @ saved(fn, weight)[:, a:b].mT
            alpha = saved(fn, "alpha", 1)
            bypasses.carry(route, gx if alpha == 1 else gx * alpha)
            bypasses.bypassed += 1
        return (None,)
    return hook


def _feeds_a_split(run: Run, nid: int, steps: dict) -> bool:
    """Whether the node's output reaches a split into parts (a fused projection) through nodes with one operand
    that needs a gradient (views, copies, a bias addition) whose gradient step is their own backward."""
    graph, useful = run.graph, run.useful
    slot = (nid, 0)
    for _ in range(2 * _MAX_CHAIN):
        cons = graph.consumers.get(slot, [])
        kinds = [graph.nodes[c].kind for c, _ in cons]
        if len(cons) == 1 and kinds[0] in _SPLITS or len(cons) >= 2 and all(k in _PICKS for k in kinds):
            return True
        if len(cons) != 1:
            return False
        node = graph.nodes[cons[0][0]]
        if node.fn in steps or graph.parts(node.fn) != [node] or \
                sum(1 for e in node.inputs if e is not None and useful[e.child]) != 1:
            return False
        slot = (node.id, 0)
    return False


def _useful_child(run: Run, fn: Any, i: int) -> tuple[Any, int, Any]:
    """``fn``'s input ``i``: (its autograd node, output slot, graph node), the graph node None where no gradient
    is wanted there."""
    child, nr = fn.next_functions[i]
    node = None if child is None else run.graph.node_of(child)
    return child, nr, node if node is not None and run.useful[node.id] else None


def _route(run: Run, steps: dict, fn: Any, i: int, depth: int, deliveries: list) -> Any:
    """Where the gradient of ``fn``'s input ``i`` goes: nowhere (None), to a slot that also receives gradient from
    elsewhere (``deliver``), or through the node that only ``fn`` feeds (``through``, and on below it)."""
    child, nr, node = _useful_child(run, fn, i)
    if node is None:
        return None
    if (node.id, nr) in run.record:
        raise _NoBypassError  # a recorded slot: the pass reads its gradient where this one would not have arrived
    if len(run.graph.consumers.get((node.id, nr), ())) >= 2:
        deliveries.append((child, nr))
        return ("deliver", child, nr)
    if depth >= _MAX_CHAIN or len(child._input_metadata) != 1:
        raise _NoBypassError  # too deep, or a node with several outputs (the others' gradients come from elsewhere)
    children = [_route(run, steps, child, j, depth + 1, deliveries) for j in range(len(child.next_functions))]
    if sum(r is not None for r in children) > 1:
        # a fork: its branches may meet again at a slot that then gets its gradients only from here, with none
        # from elsewhere to join (a product of two projections of one input)
        raise _NoBypassError
    return ("through", child, steps.get(child), children)
