r"""Bypasses in the gradient form: a node's backward computed by a cheaper formula, its result handed on by hand.

A gradient hook can change what a node's backward returns, not stop it from running. Where the rule's answer is
known to be much cheaper than the node's own backward, the gradient form can still avoid it: a *pre*-hook computes
the node's input gradients itself and hands the node nothing (a node given no gradient returns none without
computing). What it computed must then reach the nodes below by another way, for autograd does not let a hook turn
"no gradient" into a gradient: it is carried down through the nodes that only this node feeds (each called
directly, with its own step, as the engine would), to the first slot that also receives a gradient from elsewhere,
and added there by a pre-hook of that slot's node. The sums are the engine's, in another order.

The bypasses so far:

* an activation under the identity rule (GELU, SiLU, tanh; AttnLRP and CP-LRP): the step's gradient
  :math:`g\,f(x)/x` replaces what the node's own backward (``gelu_backward``, ...) computed, at about the same cost;
  the bypass computes the step alone (:func:`dynamiclrp.ops.base.identity_gradient`, a
  :class:`~dynamiclrp.ops.base.DirectStep`);
* an element-wise product of which one operand alone gets a gradient: a norm written out, ``x * f(x)`` with its
  statistics ``f(x)`` held constant (LLaMA's RMSNorm), an activation written out (GPT-2's GELU), CP-LRP's gate held
  constant. Its backward also computes the held operand's gradient (for a broadcast statistic, a product and a
  sum over the whole tensor); the bypass computes :math:`g \odot b` alone.

And one for every preset with a gradient form, where the explanation starts at a few tokens' outputs (a class
token's logits, the last token's): below the pick of those rows and above the first node that mixes tokens (the last
layer's attention), a projection's output gradient is zero but in those rows, and its backward multiplies every row.
The bypass multiplies the rows that hold a non-zero alone, :math:`g_x[r] = g[r]\,W`, read off the gradient at run
time (:func:`_narrowed_rows`; the region: :func:`_picked_rows`): the last layer's MLP projections, under CP-LRP its
attention's output projection too.

Above that region, where the explained output is itself a pick of some rows of a final projection's output (an LM
head applied to every token and read at one: T5's logits at a decoder position, GPT-2's at the last token without
``logits_to_keep``), no bypass could hand the head's gradient on (it is the pass's only source): the pass starts
below the head instead, the pick and the head's step and product taken by hand at those rows
(:func:`seed_below_pick`).

A step that gives an operand no gradient at all (:func:`~dynamiclrp.ops.base.silenced`) cuts that branch out of a
route: the statistics of a norm are no fork on the way to the residual stream, and a node only they feed needs no
route of its own.

The others are for CP-LRP, which gives the queries and keys of attention no gradient:

* the fused projection: one matrix product computing the queries, keys and values (``in_proj`` of
  ``torch.nn.MultiheadAttention``, GPT-2's ``c_attn``), then split. Its backward multiplies a gradient two thirds
  zero by the whole weight; the bypass multiplies the non-zero columns only, :math:`g_x = g_{[:, a:b]}\,W_{[a:b]}`:
  the same sum without the zero terms;
* fused attention (``scaled_dot_product_attention``): its backward computes the query, key and value gradients
  (five products over the attention weights); the step then drops the first two. The bypass computes the value
  gradient alone, :math:`g_V = P^\top g_O` (a node's :class:`~dynamiclrp.ops.base.DirectStep`);
* attention written out (``softmax(...) @ v``): the product's backward computes the weights' gradient
  :math:`g\,V^\top` too, which the step then drops; the bypass computes :math:`P^\top g` alone (likewise for any
  product of two activations one of which its rule holds constant).

And one for the ε-rule (the ``epsilon`` preset) on fused attention, whose step computes the query, key and value
gradients itself (the softmax's identity rule is not what the fused backward computes): the node's backward would
only be thrown away. The step's gradients are handed on by a pass of autograd's engine *nested* in the outer one,
from the node's inputs down through the nodes that get their gradient only from it (the projections, a norm, the
rotary embedding: the region), to the slots where gradients from elsewhere join (the residual stream: the
frontier), and added there when the outer pass arrives (:func:`_nested`, :meth:`_Planner.frontier`). The nodes of
the region run in the nested pass with their own steps; in the outer pass they get nothing.

A plan (:class:`dynamiclrp.Plan`) keeps the bypasses worked out for a graph skeleton and reuses them for the next
run of the same graph: they name nodes by their place in the graph, not by autograd object, and :meth:`Bypasses.bind`
points them at the run's nodes.

A route that passes a node bypassed itself goes on below it too: where that node's bypass declines at run time (its
gradient is not narrow after all), the node runs by hand with its own step and hands its gradients on.

Something unforeseen at run time -- a carried gradient still pending after the pass (its slot's node never ran), a
delivery hook raising :class:`UndeliveredError`, or a bypass declining on a route that found nothing below it -- makes
:func:`dynamiclrp.gradient_form.propagate_gradient_form` remove the hooks and run the pass again without bypasses.
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Any

import torch
from torch.autograd.graph import GradientEdge

from .engine import Run
from .ops.base import DirectStep, PreHook, WholeStep, carried_flag, saved, silenced
from .ops.reduce import reduced_dims

# how the gradient of a fused projection's output reaches the parts it is split into
_SPLITS = frozenset({"SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0", "UnsafeSplitBackward0",
                     "UnsafeSplitWithSizesBackward0"})
_PICKS = frozenset({"SelectBackward0", "SliceBackward0"})
# the projections a bypass can narrow: (input slot of the activation, saved name of the weight side)
_PROJECTIONS = {"AddmmBackward0": (1, "mat2"), "MmBackward0": (0, "mat2")}
_MAX_CHAIN = 16  # nodes carried through by hand below a bypassed node
_MAX_UNREACHED = 8  # consumers followed up to find that a node gets no gradient (a norm's statistics: 3)
_MAX_REGION = 64  # nodes a nested pass below a node run without its backward may go through (a decoder layer: ~30)


class UndeliveredError(RuntimeError):
    """A gradient carried past a bypassed node found no gradient to be added to."""


class _Shared:
    """A slot that several bypassed steps give a gradient (:attr:`dynamiclrp.ops.base.WholeStep.shared`): how many
    (``readers``), where the nested pass that hands their sum on ends (``frontier``, ``ends``: as
    :func:`_nested`'s), and in a pass the sum so far and how many are still to come."""

    def __init__(self, readers: int, frontier: list[tuple[int, int]], ends: frozenset):
        self.readers, self.frontier, self.ends = readers, frontier, ends
        self.total: torch.Tensor | None = None
        self.waiting = readers


class Bypasses:
    """The bypasses of a gradient pass: the pre-hooks to register (delivery hooks first), each at a graph node
    (its head part's id), and the gradients in transit between a bypassed node and the slots that take them.
    Nodes are named by id and looked up in the graph :meth:`bind` gave, so that a plan can reuse the bypasses for
    another run of the same graph."""

    def __init__(self) -> None:
        self.hooks: list[tuple[int, PreHook]] = []
        self.graph: Any = None
        self.pending: dict[tuple[int, int], torch.Tensor] = {}
        self.bypassed: Counter[str] = Counter()  # node type -> nodes whose own backward this pass bypassed
        self._delivery_slots: dict[int, set[int]] = {}
        #: the recorded slots, and what this pass delivered there: the pass reads a recorded slot's gradient as it
        #: arrives, before the delivery hook adds to it, so the delivered part is added to what it read
        self.recorded: frozenset = frozenset()
        self.delivered: dict[tuple[int, int], torch.Tensor] = {}
        #: slots that several bypassed steps give a gradient besides their own chain's (T5's position bias):
        #: summed as they come, handed on by one nested pass once every one of them has
        self.shared: dict[tuple[int, int], _Shared] = {}

    def bind(self, graph: Any) -> Bypasses:
        """Ready for a pass over ``graph`` (the planned graph, or one with the same skeleton): nothing in transit,
        nothing counted yet."""
        self.graph, self.pending, self.bypassed, self.delivered = graph, {}, Counter(), {}
        for shared in self.shared.values():
            shared.total, shared.waiting = None, shared.readers
        return self

    def fn(self, nid: int) -> Any:
        """The autograd node of graph node ``nid`` in the bound graph."""
        return self.graph.nodes[nid].fn

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def undelivered(self) -> bool:
        """Whether a carried gradient is still waiting after the pass (its slot's node never ran, or a shared
        slot's sum lacks a step's part: that step declined, and its node gave the slot a gradient itself)."""
        return bool(self.pending) or any(shared.total is not None for shared in self.shared.values())

    def share(self, slot: tuple[int, int], grad: torch.Tensor) -> None:
        """Add a bypassed step's gradient for a shared slot (:attr:`shared`); once every step reading it has given
        its own, hand the sum on (a nested pass from the slot down to its frontier, :func:`_hand_on`)."""
        shared = self.shared[slot]
        grad = _as_input(grad, self.fn(slot[0]), slot[1])
        shared.total = grad if shared.total is None else shared.total.add_(grad)
        shared.waiting -= 1
        if shared.waiting == 0:
            total, shared.total = shared.total, None
            _hand_on(self, [GradientEdge(self.fn(slot[0]), slot[1])], [total], shared.frontier, shared.ends)

    # ---------------------------------------------------------------------------------------------- planning
    def add_delivery(self, nid: int, slot: int) -> None:
        slots = self._delivery_slots.get(nid)
        if slots is None:
            slots = self._delivery_slots[nid] = set()
            self.hooks.insert(0, (nid, PreHook(self._deliver_hook(nid))))  # before the node's own steps
        slots.add(slot)

    def _deliver_hook(self, nid: int):
        def hook(grad_outputs):
            grads = list(grad_outputs)
            for slot in self._delivery_slots[nid]:
                carried = self.pending.pop((nid, slot), None)
                if carried is None:
                    continue
                g = grads[slot]
                if g is None:  # autograd lets no hook turn "no gradient" into one
                    raise UndeliveredError(
                        f"{self.fn(nid).name()} slot {slot} receives no gradient besides a bypassed node's")
                carried = carried.to(g.dtype)
                if (nid, slot) in self.recorded:  # kept as it is, for the pass's reading of the slot
                    _accumulate(self.delivered, (nid, slot), carried)
                    grads[slot] = g + carried
                    continue
                # the carried gradient is this pass's own (a bypass computed it; nothing else holds it): the sum goes
                # into it, as the engine's own accumulation goes into its buffer, not into fresh memory
                grads[slot] = carried.add_(g) if carried.shape == g.shape and carried.is_contiguous() else g + carried
            return tuple(grads)
        return hook

    # ---------------------------------------------------------------------------------------------- running
    def carry(self, route: Any, grad: torch.Tensor) -> None:
        """Send ``grad`` along a planned route: ``None`` (nothing needs it), ``("deliver", node, slot)`` or
        ``("through", node, slot, step, children, bypass)`` (``node`` a graph node id; ``bypass`` the node's own
        bypass hook, or None)."""
        if route is None:
            return
        if route[0] == "deliver":
            _accumulate(self.pending, (route[1], route[2]), grad)
            return
        _, nid, nr, step, children, bypass = route
        fn = self.fn(nid)
        grads: tuple = tuple(grad if o == nr else None for o in range(len(fn._input_metadata)))
        if bypass is not None:
            if all(g is None for g in bypass.hook(grads)):  # it carried its result on
                return
            if children is None:  # no route below the node but its bypass's: the pass runs again without any
                raise UndeliveredError(f"{fn.name()}'s bypass declined where it alone could hand the gradient on")
        post = step
        if isinstance(step, PreHook):
            grads, post = step.hook(grads), step.post
            if all(g is None for g in grads):  # a bypassed node: its hook carried its result on
                return
        direct = step.direct(grads) if isinstance(step, DirectStep) else None
        if direct is not None:  # the step's one gradient, without the node's own backward
            out: tuple = tuple(direct.get(j) for j in range(len(fn.next_functions)))
            self.bypassed[fn.name()] += 1
        else:
            out = fn(*grads) if callable(fn) else fn.apply(*grads)
            out = out if isinstance(out, tuple) else (out,)
            if post is not None:
                out = post(out, grads)
        for (child, nr), sub, g in zip(fn.next_functions, children, out):
            if sub is not None and g is not None:
                self.carry(sub, _as_input(g, child, nr))


def _as_input(grad: torch.Tensor, fn: Any, nr: int) -> torch.Tensor:
    """``grad`` as autograd's engine hands a gradient to input ``nr`` of node ``fn``: summed to its shape (a
    broadcast operand's) and in its dtype."""
    meta = fn._input_metadata[nr]
    return (grad if grad.shape == meta.shape else grad.sum_to_size(meta.shape)).to(meta.dtype)


def _accumulate(store: dict, key: Any, grad: torch.Tensor) -> None:
    """Add ``grad`` to what ``store`` holds at ``key`` (a fresh sum: a held gradient may be read elsewhere)."""
    prev = store.get(key)
    store[key] = grad if prev is None else prev + grad


class _NoBypassError(Exception):
    pass


def plan_bypasses(run: Run, steps: dict[Any, Any], seeds: frozenset = frozenset()) -> Bypasses:
    """The bypasses this run's graph allows, given the other nodes' gradient ``steps`` (autograd node → hook) and
    ``seeds``, the output slots the pass starts from."""
    graph, useful = run.graph, run.useful
    plan = _Planner(run, steps, seeds)
    plan.bypasses.bind(graph)
    plan.bypasses.recorded = frozenset(run.record)
    # projections whose gradient is held by a few tokens' rows: taken to give their input nothing in the outer pass
    # before any route is looked for (a route then goes on past a slot they alone feed besides it: were it to wait
    # there for them, nothing would come where they narrow), then given a voice again where they have no route (the
    # routes found meanwhile go on past slots where they could have stopped: a node run twice, by hand and by the
    # engine, not a wrong sum). Operands before consumers: the route of one goes through the hook of one below it
    picked, rows = _picked_rows(run), []
    for nid in reversed(graph.order):
        fn = graph.nodes[nid].fn
        if nid in picked and graph.head.get(fn) == nid:
            projection = _projection(run, fn, nid, steps)
            if projection is not None:
                rows.append((fn, nid, projection))
    plan.silence(fn for fn, _, _ in rows)
    voiced = True
    while voiced:  # those with no route give their input a gradient after all, and may open a route for another
        voiced = False  # (consumers first: one above another decides whether a gradient reaches the stream there)
        for fn, _, (_, x_slot, _) in reversed(rows):
            if fn in plan.silent_below and plan.route(fn, x_slot) is None:
                plan.speak(fn)
                voiced = True
    for fn, nid, (kind, x_slot, weight) in rows:
        route = None if fn not in plan.silent_below else plan.route(fn, x_slot)
        if route is not None:
            plan.hook(fn, _narrowed_rows(plan.bypasses, nid, kind, weight, route))
        else:
            plan.speak(fn)
    for fn, nid in graph.head.items():
        projection = _projection(run, fn, nid, steps)
        if projection is not None and fn not in plan.hooks and _feeds_a_split(run, nid, steps):
            kind, x_slot, weight = projection
            route = plan.route(fn, x_slot)
            if route is not None:
                plan.hook(fn, _narrowed_projection(plan.bypasses, nid, kind, weight, route))
    # a node no gradient reaches (RMSNorm's statistics, below the product that holds them constant) needs no route;
    # one the steps' own walk reached is reached (it followed the same silenced operands, without a depth limit)
    reached = run.reached or frozenset()
    direct = [(fn, step) for fn, step in steps.items() if isinstance(step, DirectStep) and (
        graph.head[fn] in reached or not plan.unreached(graph.head[fn]))]
    # their other operands get nothing, nor what only those feed (a guess that fails for a node left unbypassed
    # costs a node run twice -- by hand and by the engine -- not a wrong sum: backward is linear in the gradient)
    plan.silence(fn for fn, _ in direct)
    for fn, step in direct:
        route = plan.route(fn, step.slot)
        if route is not None:
            plan.hook(fn, _direct(plan.bypasses, fn.name(), step, route))
        else:
            plan.speak(fn)
    wholes = [(fn, step, frontier) for fn, step in steps.items() if isinstance(step, WholeStep) and
              useful[graph.head[fn]] for frontier in [plan.frontier(fn, step.through)] if frontier is not None]
    shared = plan.bypasses.shared = plan.shared(wholes)
    for at in shared.values():
        plan.deliveries(at.frontier, at.ends)
    for fn, step, frontier in wholes:
        if all(slot in shared for slot in step.shared):
            ends = plan.ends(frontier)
            plan.deliveries(frontier, ends)
            below = step.through[-1] if step.through else graph.head[fn]  # whose inputs get the gradients
            plan.hook(fn, _nested(plan.bypasses, fn.name(), below, step, frontier, ends))
    return plan.bypasses


# nodes whose input gradient at a row (a token) depends on their output gradient at that row alone, as far as where
# the gradient is zero goes; a node outside them (attention's products, a softmax, a permutation) ends the region
# where a gradient that starts at a few tokens (a class token, the last token) stays at those tokens
_TOKEN_LOCAL = frozenset({
    "AddmmBackward0", "MmBackward0", "ViewBackward0", "UnsafeViewBackward0", "AliasBackward0", "AddBackward0",
    "SubBackward0", "MulBackward0", "DivBackward0", "NativeLayerNormBackward0", "GeluBackward0", "SiluBackward0",
    "TanhBackward0", "ReluBackward0", "SigmoidBackward0", "NativeDropoutBackward0", "CloneBackward0", "ToCopyBackward0",
    "PowBackward0", "MeanBackward1", "RsqrtBackward0", *_PICKS})


def _projection(run: Run, fn: Any, nid: int, steps: dict) -> tuple[str, int, str] | None:
    """``(kind, input slot of the activation, saved name of the weight side)`` of a projection (graph node ``nid``)
    whose backward a bypass may replace: a matrix product without a step of its own, wanted, whose weight (or bias)
    side wants no gradient. None otherwise."""
    kind = type(fn).__name__  # fn.name() builds a new string each call
    if kind not in _PROJECTIONS or fn in steps or not run.useful[nid]:
        return None
    x_slot, weight = _PROJECTIONS[kind]
    if any(i != x_slot and _useful_child(run, fn, i)[2] for i in range(len(fn.next_functions))):
        return None  # the weight (or bias) side is wanted too: keep the node's own backward
    return kind, x_slot, weight


def _picked_rows(run: Run) -> set[int]:
    """The graph nodes below a pick of some rows (``h[:, 0]``: a class token; ``h[:, -1:]``: the last token) and
    above the first node outside :data:`_TOKEN_LOCAL` on any path, every path from the output passing a pick: there
    an explanation has gradients at the picked tokens' rows alone. Only where a bypass looks for such rows: what it
    narrows it reads off the gradient itself."""
    graph, nodes = run.graph, run.graph.nodes
    picked: set[int] = set()
    # a node can join only where a consumer picks rows or has joined: the nodes below those (every part of a fused
    # node, whose slots are its head's) are the only ones asked, not the thousand others
    candidates: set[int] = set()
    for nid in graph.order:  # consumers first
        node = nodes[nid]
        if nid in candidates and _stays_picked(run, node, nid, picked):
            picked.add(nid)
        elif node.kind not in _PICKS:
            continue
        for e in node.inputs:
            if e is not None:
                candidates.update(p.id for p in graph.parts(nodes[e.child].fn))
    return picked


def _stays_picked(run: Run, node: Any, nid: int, picked: set[int]) -> bool:
    """Whether graph node ``nid`` is in :func:`_picked_rows`' region, its consumers decided (``picked``): token-local,
    wanted, and every consumer of its slots in the region or a pick of rows."""
    graph = run.graph
    if node.kind not in _TOKEN_LOCAL or not run.useful[nid] or node.kind == "MeanBackward1" and _dims(
            node.fn) != [_last(node.fn)]:  # a mean: of a norm's statistics, over the last dimension alone
        return False
    head = graph.head.get(node.fn, nid)
    consumers = [c for nr in range(len(node.fn._input_metadata)) for c, _ in graph.consumers.get((head, nr), ())]
    return bool(consumers) and all(c in picked or _picks_rows(graph.nodes[c]) for c in consumers)


def _picks_rows(node: Any) -> bool:
    """Whether a graph node picks some rows of its operand: an index or a slice along a dimension but the last."""
    return node.kind in _PICKS and _last(node.fn) not in _dims(node.fn)


def _dims(fn: Any) -> list[int]:
    """The dimensions, counted from the front, that a select, slice or mean node works along."""
    return reduced_dims(saved(fn, "dim"), len(saved(fn, "self_sym_sizes")))


def _last(fn: Any) -> int:
    """The last dimension of the operand of a select, slice or mean node."""
    return len(saved(fn, "self_sym_sizes")) - 1


class _Planner:
    """Routes for the gradients bypasses carry, with what they found on the way."""

    def __init__(self, run: Run, steps: dict, seeds: frozenset) -> None:
        self.run, self.steps, self.seeds = run, steps, seeds
        self.bypasses = Bypasses()
        self.hooks: dict[Any, PreHook] = {}  # the bypassed nodes so far
        self.silent_below: set[Any] = set()  # bypassed nodes that give some operands nothing at all
        self._deliveries: list[tuple[Any, int]] = []
        self._silence: dict[int, bool] = {}  # _silent's answers while silent_below stands
        self._unreached: dict[int, bool] = {}
        self._position: dict[int, int] | None = None  # graph node id -> its place in graph.order

    def silence(self, fns: Any) -> None:
        """The nodes ``fns`` are bypassed by steps that give some operands nothing (answers found before are
        forgotten: a projection's route may have been looked for already)."""
        self.silent_below.update(fns)
        self._silence.clear()

    def speak(self, fn: Any) -> None:
        """``fn`` is not bypassed after all: its operands get gradients."""
        self.silent_below.discard(fn)
        self._silence.clear()

    def hook(self, fn: Any, hook: Any) -> None:
        for child, nr in self._deliveries:
            self.bypasses.add_delivery(self.run.graph.head[child], nr)
        self.hooks[fn] = PreHook(hook)
        self.bypasses.hooks.append((self.run.graph.head[fn], self.hooks[fn]))

    def route(self, fn: Any, i: int) -> Any:
        """The route of ``fn``'s input ``i``'s gradient, or None where it cannot (or need not) be carried."""
        self._deliveries = []
        try:
            return self._route(fn, i, 0)
        except _NoBypassError:
            return None

    def _route(self, fn: Any, i: int, depth: int) -> Any:
        """Where the gradient of ``fn``'s input ``i`` goes: nowhere (None), to a slot that also receives gradient
        from elsewhere (``deliver``), or through the node that only ``fn`` feeds -- or whose other consumers give
        it nothing -- (``through``, and on below it; a node bypassed itself carries on by its own hook)."""
        run = self.run
        child, nr, node = _useful_child(run, fn, i)
        if node is None:
            return None
        if (node.id, nr) in run.record:
            raise _NoBypassError  # a recorded slot: the pass reads its gradient where this one would not arrive
        others = [(c, k) for c, k in run.graph.consumers.get((node.id, nr), ()) if run.graph.nodes[c].fn is not fn]
        if others and not all(self._gives_nothing(c, k) for c, k in others):
            self._deliveries.append((child, nr))
            return ("deliver", node.id, nr)
        bypass = self.hooks.get(child)
        try:
            children = self._routes_below(child, node.id, nr, depth)
        except _NoBypassError:
            if bypass is None:
                raise
            children = None  # the node's own hook carries on; should it decline, the pass fails (carry)
        return ("through", node.id, nr, self.steps.get(child), children, bypass)

    def _routes_below(self, fn: Any, nid: int, nr: int, depth: int) -> list:
        """The routes of the gradients of ``fn``'s inputs (graph node ``nid``) when output ``nr`` alone gets one: where
        the node's own bypass declines at run time, the node runs with its own step and hands them on there."""
        if depth >= _MAX_CHAIN:
            raise _NoBypassError
        if not all(self._quiet(nid, o) for o in range(len(fn._input_metadata)) if o != nr):
            raise _NoBypassError  # another output of the node gets a gradient: the node runs anyway
        quiet = silenced(self.steps.get(fn))  # operands the node's step gives nothing (RMSNorm's statistics)
        children = [None if j in quiet else self._route(fn, j, depth + 1) for j in range(len(fn.next_functions))]
        if sum(r is not None for r in children) > 1:
            # a fork: its branches may meet again at a slot that then gets its gradients only from here, with
            # none from elsewhere to join (a product of two projections of one input)
            raise _NoBypassError
        return children

    def frontier(self, fn: Any, through: tuple = ()) -> list[tuple[int, int]] | None:
        """Where the gradients of ``fn``'s inputs, handed on by a nested pass (:func:`_nested`), meet gradients from
        elsewhere: the output slots ``(graph node id, nr)`` below ``fn`` that also receive a gradient from a node
        outside the region of nodes whose every gradient comes from ``fn`` (through the region); None where that
        region is larger than :data:`_MAX_REGION` nodes or holds a recorded or seeded slot, or the frontier is a
        seeded slot or one that only the region gives a gradient (another slot of its node getting one from outside:
        the outer pass would give that slot nothing to add to). A recorded frontier slot is delivered to as any
        other, and what it got is added to what the pass reads there (:attr:`Bypasses.delivered`). ``through`` (a
        :class:`~dynamiclrp.ops.base.WholeStep`'s): the nodes below ``fn`` whose backward its step does too; the
        region starts below the last of them."""
        run = self.run
        graph = run.graph
        if self._position is None:
            self._position = {nid: i for i, nid in enumerate(graph.order)}
        top = through[-1] if through else graph.head[fn]
        inside, frontier = {part.id for part in graph.parts(fn)}, []  # consumers name a fused node's parts
        inside.update(through)
        region = 0  # autograd nodes in the region
        # consumers come before their operands in graph.order: a node is decided once all of its consumers are
        queue = [(self._position[c], c) for c in self.below(top)]
        heapq.heapify(queue)
        seen = {c for _, c in queue}
        while queue:
            _, nid = heapq.heappop(queue)
            node_fn = graph.nodes[nid].fn  # a head: below() names autograd nodes
            slots = range(len(node_fn._input_metadata))
            if any((nid, nr) in self.seeds for nr in slots):
                return None
            consumers = [graph.consumers.get((nid, nr), ()) for nr in slots]
            outside = [any(c not in inside and not self._gives_nothing(c, k) for c, k in cons) for cons in consumers]
            if any(outside):
                for nr, cons, out in zip(slots, consumers, outside):
                    if any(c in inside for c, _ in cons):
                        # a slot that gets nothing from outside: the outer pass gives the node nothing there, and no
                        # hook may add to nothing (a packed projection's split: the values get a gradient from
                        # outside, the queries and keys from the region alone). Unless a recorded slot with nothing
                        # below, whose gradient the pass reads without running a node
                        if not out and not ((nid, nr) in run.record and not self.below(nid)):
                            return None
                        frontier.append((nid, nr))
                continue
            if any((nid, nr) in run.record for nr in slots):
                if self.below(nid):
                    return None
                # recorded, fed by the region alone, nothing wanted below: the pass reads the slot without running
                # its node, and what the region hands it is added to what the pass read (an end, :meth:`ends`)
                frontier.extend((nid, nr) for nr in slots if (nid, nr) in run.record)
                continue
            inside.update(part.id for part in graph.parts(node_fn))
            region += 1
            if region > _MAX_REGION:
                return None
            for c in self.below(nid):
                if c not in seen:
                    seen.add(c)
                    heapq.heappush(queue, (self._position[c], c))
        return None if not frontier or self._stacked(frontier) else frontier

    def _stacked(self, frontier: list[tuple[int, int]]) -> bool:
        """Whether the node of one slot of ``frontier`` lies above another's (a path of the graph leads down from it
        to the other): autograd's engine, asked by the nested pass for both, would run that node to reach the other,
        handing the gradient it got on below it there, and the outer pass again after the delivery: counted twice.
        A cross-attention's queries come from the decoder's stream, above the encoder's output (its keys), which
        the layers below read too. Producers come after their consumers in ``graph.order``: a walk down stops past
        the last of the slots."""
        graph, position = self.run.graph, self._position
        nids = {nid for nid, _ in frontier}
        for top in nids:
            others = nids - {top}
            if not others:
                return False
            last = max(position[nid] for nid in others)
            stack, seen = [top], {top}
            while stack:
                for e in graph.nodes[stack.pop()].inputs:
                    if e is None or e.child in seen or position[e.child] > last:
                        continue
                    if e.child in others:
                        return True
                    seen.add(e.child)
                    stack.append(e.child)
        return False

    def ends(self, frontier: list[tuple[int, int]]) -> frozenset:
        """The slots of a nested pass's ``frontier`` that are recorded with nothing wanted below: the pass reads
        their gradient and runs no node there, so no delivery hook would run either; what reaches them is added to
        what the pass read."""
        return frozenset(at for at in frontier if at in self.run.record and not self.below(at[0]))

    def deliveries(self, frontier: list[tuple[int, int]], ends: frozenset) -> None:
        """A delivery hook at each slot of a nested pass's ``frontier`` but its ``ends``."""
        for nid, slot in frontier:
            if (nid, slot) not in ends:
                self.bypasses.add_delivery(nid, slot)

    def shared(self, wholes: list) -> dict[tuple[int, int], _Shared]:
        """The slots the steps of ``wholes`` (``(fn, step, frontier)``, each bypassable) give a gradient besides
        their chain's (:attr:`~dynamiclrp.ops.base.WholeStep.shared`) that can be handed on: with a frontier of
        their own below (or recorded, with nothing wanted below). Another reader of the slot (a chain not
        bypassed, anything else) gives the slot's node a gradient in the outer pass too: the node then runs in both
        passes, each with its part of the gradient (a node's backward is linear in it), and the engine runs it
        only after every reader, so after the nested pass has left its deliveries below."""
        graph, run = self.run.graph, self.run
        readers: dict[tuple[int, int], list] = {}
        for _, step, _ in wholes:
            for slot in step.shared:  # a step with more than one (none so far) is not bypassed: none of its slots
                readers.setdefault(slot, []).append(step if len(step.shared) == 1 else None)
        shared = {}
        for slot, steps in readers.items():
            fn = graph.nodes[slot[0]].fn
            if None in steps or len(graph.parts(fn)) != 1 or slot in self.seeds:
                continue
            recorded = slot in run.record  # nothing to run: its sum is added to what the pass reads there
            frontier = (None if self.below(slot[0]) else [slot]) if recorded else self.frontier(fn)
            if frontier is not None:
                shared[slot] = _Shared(len(steps), frontier, self.ends(frontier))
        return shared

    def below(self, nid: int) -> list[int]:
        """The graph nodes that graph node ``nid``'s step gives a gradient to (the producers of its autograd node's
        inputs: a fused node's, whose parts are other graph nodes), where one is wanted."""
        run = self.run
        fn = run.graph.nodes[nid].fn
        step = self.steps.get(fn)
        quiet = frozenset() if isinstance(step, WholeStep) else silenced(step)
        below = []
        for i, (child, _) in enumerate(fn.next_functions):
            node = None if child is None or i in quiet else run.graph.node_of(child)
            if node is not None and run.useful[node.id]:
                below.append(node.id)
        return below

    def unreached(self, nid: int, depth: int = 0) -> bool:
        """Whether no gradient reaches graph node ``nid`` in this pass, bypassed or not: no seed at its outputs, and
        every consumer's step silences the operand it takes from there, or is unreached itself (taken to be reached
        past the depth limit)."""
        known = self._unreached.get(nid)
        if known is not None:
            return known
        graph, fn = self.run.graph, self.run.graph.nodes[nid].fn
        head = graph.head[fn]
        unreached = depth < _MAX_UNREACHED and all(
            (head, nr) not in self.seeds and all(self._gives_nothing_ever(c, k) or self.unreached(c, depth + 1)
                                                 for c, k in graph.consumers.get((head, nr), ()))
            for nr in range(len(fn._input_metadata)))
        self._unreached[nid] = unreached
        return unreached

    def _silent(self, nid: int, depth: int = 0) -> bool:
        """Whether graph node ``nid`` gives its operands no gradient in this pass: it is a part of a node in
        :attr:`silent_below` (the operands it gives something are on the route asking), wanted by nothing, or
        fed only by such nodes."""
        known = self._silence.get(nid)
        if known is not None:
            return known
        fn = self.run.graph.nodes[nid].fn
        if fn in self.silent_below or not self.run.useful[nid]:
            return True
        head = self.run.graph.head[fn]  # a node split into parts gets its gradients at its head's slots
        # past the depth limit: taken to get a gradient (a delivery there, checked at run time)
        silent = depth < 2 * _MAX_CHAIN and all(self._quiet(head, nr, depth) for nr in range(len(fn._input_metadata)))
        self._silence[nid] = silent
        return silent

    def _quiet(self, nid: int, nr: int, depth: int = 0) -> bool:
        """Whether output slot ``nr`` of graph node ``nid`` gets no gradient: no seed, not recorded, only silent
        consumers."""
        run = self.run
        return (nid, nr) not in run.record and (nid, nr) not in self.seeds and all(
            self._gives_nothing(c, k, depth + 1) for c, k in run.graph.consumers.get((nid, nr), ()))

    def _gives_nothing(self, nid: int, k: int, depth: int = 0) -> bool:
        """Whether graph node ``nid`` gives its operand ``k`` no gradient: its step silences that operand, or the
        node gives none at all."""
        return self._gives_nothing_ever(nid, k) or self._silent(nid, depth)

    def _gives_nothing_ever(self, nid: int, k: int) -> bool:
        """Whether graph node ``nid``'s step silences its operand ``k`` (an unfused node: its operands are its
        autograd node's inputs, in order), whatever the node is given."""
        fn = self.run.graph.nodes[nid].fn
        return k in silenced(self.steps.get(fn)) and len(self.run.graph.parts(fn)) == 1


def _direct(bypasses: Bypasses, kind: str, step: DirectStep, route: Any):
    """Pre-hook of a node (of type ``kind``) whose step computes its one wanted input gradient directly
    (:class:`DirectStep`): that gradient is carried on by hand and the node is given nothing."""
    def hook(grad_outputs):
        grads = step.direct(grad_outputs)
        if grads is None:
            return grad_outputs
        bypasses.carry(route, grads[step.slot])
        bypasses.bypassed[kind] += 1
        return (None,) * len(grad_outputs)
    return hook


def _nested(bypasses: Bypasses, kind: str, nid: int, step: WholeStep, frontier: list[tuple[int, int]],
            ends: frozenset):
    """Pre-hook of a node (of type ``kind``) whose step computes all of its input gradients, or those of graph node
    ``nid`` below it (:class:`~dynamiclrp.ops.base.WholeStep`; ``nid`` the node itself, or the last of the step's
    ``through``): the node is given nothing, and those gradients are handed on by a
    pass of autograd's engine nested in this one, from ``nid``'s inputs down to the ``frontier``
    (:meth:`_Planner.frontier`): the nodes on the way run there, with their own steps, as they would have in the
    outer pass, where they now get nothing; what reaches the frontier is added there when the outer pass arrives
    (a delivery), or, at the ``ends`` (recorded slots whose node the outer pass does not run), to what the pass
    reads there. The gradients cannot be handed on in the outer pass itself: autograd lets no hook give a gradient
    where the node returned none."""
    def hook(grad_outputs):
        grads = step.direct(grad_outputs)
        if grads is None:
            return grad_outputs
        fn = bypasses.fn(nid)
        edges, given = [], []
        for (child, nr), g in zip(fn.next_functions, grads):
            if child is not None and g is not None:
                edges.append(GradientEdge(child, nr))
                given.append(g)
        _hand_on(bypasses, edges, given, frontier, ends)
        for slot, g in zip(step.shared, grads[len(fn.next_functions):]):
            bypasses.share(slot, g)
        bypasses.bypassed[kind] += 1
        return (None,) * len(grad_outputs)
    return hook


def _hand_on(bypasses: Bypasses, edges: list, given: list, frontier: list[tuple[int, int]], ends: frozenset) -> None:
    """Hand the gradients ``given`` at ``edges`` on by a pass of autograd's engine nested in the outer one, down to
    the ``frontier``: delivered there when the outer pass arrives, or, at the ``ends``, added to what the pass
    reads (an edge may be its own frontier: a recorded slot, whose gradient the engine hands back as given)."""
    if not edges:
        return
    slots = [GradientEdge(bypasses.fn(f), slot) for f, slot in frontier]
    got = torch.autograd.grad(edges, slots, given, retain_graph=True, allow_unused=True)
    for at, g in zip(frontier, got):
        if g is None:
            continue
        if at in ends:
            _accumulate(bypasses.delivered, at, g)
        else:
            bypasses.carry(("deliver", *at), g)


def _narrowed_projection(bypasses: Bypasses, nid: int, kind: str, weight: str, route: Any):
    r"""Pre-hook of a bypassed projection ``y = x W (+ b)``: :math:`g_x = \alpha\,g_{[:, a:b]}\,W_{[:, a:b]}^\top`
    over the columns ``a:b`` that hold every non-zero of ``g``, the node itself given nothing. Where the first and
    the last column both hold one (AttnLRP: queries and values have gradients) nothing is narrowed and the node runs
    its own backward: two columns read. The node (graph node ``nid``, of type ``kind``) is read from the graph
    the bypasses are bound to. Once declined, the hook declines without reading again in later runs of a plan
    that keeps it: under AttnLRP the queries' gradients are not zero in any run, and the node's own backward is
    the exact answer whatever the columns hold (each read waits for a GPU)."""
    declined = [False]

    def hook(grad_outputs):
        g = grad_outputs[0]
        if g is None or not g.shape[0] or declined[0]:
            return grad_outputs
        if bool(torch.stack((g[:, 0].any(), g[:, -1].any())).all()):  # one sync
            declined[0] = True
            return grad_outputs
        # columns holding a non-zero (NaN included): 5x faster than g.any(0), which reduces across rows slowly;
        # the first and the last of them read by the host at once (nonzero and two reads would wait three times)
        held = (g.amax(0) != 0) | (g.amin(0) != 0)
        index = torch.arange(held.shape[0], device=held.device)
        a, last = torch.stack((torch.where(held, index, held.shape[0]).amin(),
                               torch.where(held, index, -1).amax())).tolist()
        if last >= 0:
            b = last + 1
            if b - a == g.shape[1]:
                return grad_outputs
            fn = bypasses.fn(nid)
            gx = g[:, a:b] @ saved(fn, weight)[:, a:b].mT
            alpha = saved(fn, "alpha", 1)
            bypasses.carry(route, gx if alpha == 1 else gx * alpha)
            bypasses.bypassed[kind] += 1
        return (None,)
    return hook


def _narrowed_rows(bypasses: Bypasses, nid: int, kind: str, weight: str, route: Any):
    r"""Pre-hook of a bypassed projection ``y = x W (+ b)`` whose output gradient ``g`` is zero but in a few rows
    (tokens): :math:`g_x[r] = \alpha\,g[r]\,W^\top` over the rows ``r`` that hold a non-zero, zero elsewhere, the
    node itself given nothing. An explanation of a class token's or the last token's output has such gradients from
    the output down to the last layer's attention (the region of :func:`_picked_rows`); the node's own backward
    multiplies every row. Where more than half the rows, or both the first and the last, hold a non-zero, the node
    runs its own backward (declined for good in the second case, as in :func:`_narrowed_projection`)."""
    declined = [False]

    def hook(grad_outputs):
        g = grad_outputs[0]
        if g is None or g.shape[0] < 2 or declined[0]:
            return grad_outputs
        if bool(torch.stack((g[0].any(), g[-1].any())).all()):  # one sync
            declined[0] = True
            return grad_outputs
        rows = held_rows(g)
        if rows is None:
            return grad_outputs
        bypasses.carry(route, _rows_product(bypasses.fn(nid), weight, g[rows], rows, g.shape[0]))
        bypasses.bypassed[kind] += 1
        return (None,)
    return hook


#: views a seed may be taken back through by hand (:func:`seed_below_pick`): one operand, every element kept
_SEED_VIEWS = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0"})


def seed_below_pick(run: Run, steps: dict, outputs: list, grads: list, bypasses: Bypasses) -> tuple[list, list]:
    r"""The pass's start moved below a pick of some rows of a final projection's output (an LM head's logits read
    at one position, ``logits[:, 0]``): ``(outputs, grads)`` for :func:`torch.autograd.grad`, the one seed taken back
    by hand through the pick and its views, the projection's step taken (the ε-rule's
    :math:`g\,|z| / (|z| + \varepsilon)`, its factor at those rows alone, or none), and its input's gradient
    :math:`g_x[r] = \alpha\,g[r]\,W^\top` worked out over the rows that hold a non-zero alone; the pass then
    starts at the projection's input, and its backward, which multiplies every row, never runs (counted as
    bypassed). Autograd's own pass (the floor's) multiplies them all: T5's LM head, read at one position, is a
    product of 32,128 x 512 per row.

    Only from one seed (the nodes of the chain, below it alone, get no gradient from anywhere else then), through
    nodes none of which is recorded, hooked by a bypass (a delivery would wait there) or has a step of its own but
    the projection's pre-step, the projection's weight side wanting no gradient, and at most half of its rows
    holding a non-zero (:func:`held_rows`); else the seed as it was."""
    if len(outputs) != 1:
        return outputs, grads
    graph, hooked = run.graph, {nid for nid, _ in bypasses.hooks}
    fn, g = outputs[0].node, grads[0]
    for _ in range(_MAX_CHAIN):
        nid = graph.head.get(fn)
        if nid is None or nid in hooked or len(fn._input_metadata) != 1 or (nid, 0) in run.record:
            return outputs, grads
        kind = type(fn).__name__
        if kind in _PROJECTIONS:
            break
        if kind not in _PICKS and kind not in _SEED_VIEWS or steps.get(fn) is not None or \
                _useful_child(run, fn, 0)[2] is None:
            return outputs, grads
        g = fn(g)
        g = g[0] if isinstance(g, tuple) else g
        child, nr = fn.next_functions[0]
        g, fn = _as_input(g, child, nr), child
    else:
        return outputs, grads
    step = steps.get(fn)
    x_slot, weight = _PROJECTIONS[kind]
    if step is not None and (type(step) is not PreHook or step.post is not None) or g.dim() != 2 or \
            g.shape[0] < 2 or _useful_child(run, fn, x_slot)[2] is None or \
            any(i != x_slot and _useful_child(run, fn, i)[2] for i in range(len(fn.next_functions))):
        return outputs, grads
    rows = held_rows(g)
    if rows is None:
        return outputs, grads
    picked = g[rows]
    if step is not None:  # the step at those rows alone where it can be so taken, else at every row
        at_rows = getattr(step.hook, "at_rows", None)
        picked = None if at_rows is None else at_rows(picked, rows)
        picked = step.hook((g,))[0][rows] if picked is None else picked
    gx = _rows_product(fn, weight, picked, rows, g.shape[0])
    run.carried.append(carried_flag(gx))  # the step's factor may have made a non-finite number
    bypasses.bypassed[kind] += 1
    child, nr = fn.next_functions[x_slot]
    return [GradientEdge(child, nr)], [_as_input(gx, child, nr)]


def _rows_product(fn: Any, weight: str, g_rows: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    r"""A projection's input gradient from its output gradient's rows ``rows`` alone (``g_rows``; the others zero):
    :math:`g_x[r] = \alpha\,g[r]\,W^\top`, ``n`` rows, zero but at ``rows``."""
    w = saved(fn, weight)
    gx = g_rows.new_zeros(n, w.shape[0])
    alpha = saved(fn, "alpha", 1)
    part = g_rows @ w.mT
    return gx.index_copy_(0, rows, part if alpha == 1 else part.mul_(alpha))


def held_rows(g: torch.Tensor) -> torch.Tensor | None:
    """The rows of the 2-d ``g`` that hold a non-zero (NaN included), where they are at most half of them; else
    None."""
    held = (g.amax(1) != 0) | (g.amin(1) != 0)
    rows = held.nonzero().squeeze(1)
    return None if 2 * rows.shape[0] > g.shape[0] else rows


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
