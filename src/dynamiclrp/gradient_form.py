r"""The gradient form: one pass of autograd's own engine, for rule sets that allow it.

Every LRP rule here gives an operand a relevance of the form :math:`R_x = x \odot (\dots)`. Carry the *ratio*
:math:`g = R / x` instead of :math:`R` and most rules become the op's own gradient:

* the ε-rule with :math:`\varepsilon \to 0`, :math:`R_x = x \odot J^\top (R_y / y)`, is :math:`g_x = J^\top g_y` --
  for matrix products, convolutions, sums, means and bias additions alike (a bias keeps its share, unseen);
* routing ops (views, slices, cat, max-pooling) move elements, and the ratio with them;
* AttnLRP's softmax rule :math:`R_x = x \odot (R - s \sum R)` is :math:`g_x = s \odot (g - \sum s g)`, softmax's
  gradient;
* AttnLRP's uniform rule halves the gradient of each factor of a product, CP-LRP drops one factor's;
* LXT's linearised norm is the norm's gradient with its statistics held constant.

Only the identity rule on a non-linear element-wise op (:math:`R_x = R_y`: :math:`g_x = g_y\,y / x`) and the
linearised norm need a hook on their node. The relevance of an input (or of any recorded activation) is then its
value times its gradient: that is how LXT computes AttnLRP, with the forward patched; here the hooks go on the
nodes of the graph the model already built, for the duration of one ``torch.autograd.grad`` call, and are removed
afterwards. Autograd runs only the nodes on a path to what was asked for, and computes no parameter gradient.

The form is exact for the rules that declare it (``rule.gradient_form``): ε-rules with ε at most
:data:`~dynamiclrp.rules.GRADIENT_EPS` (1e-12, a stabiliser of 0/0 only: the form computes their ε → 0 limit,
which differs from ε = 1e-12 by at most :math:`10^{-12} / |z|` relative), the AttnLRP and CP-LRP rules and the
identity rule -- the ``attnlrp`` and ``cp_lrp`` presets. An ε-rule with a real stabiliser (the ``epsilon`` preset's
1e-6, the uniform rule's on a matrix product) is the layer's gradient with the ratio arriving at its output
multiplied by :math:`|z| / (|z| + \varepsilon)` first (:class:`~dynamiclrp.rules.Stabilised`; a batch norm merged
into the layer is part of it, the factor taken at its output), exactly. A graph with any other rule (z⁺, γ, αβ, an
ε on an element-wise product or fused attention, a sum with an addend autograd did not record) is propagated as
relevance, node by node (:mod:`dynamiclrp.engine`), as is a run that wants the per-node ledger or a relevance dtype
other than the graph's.

Relevance at a value that is exactly 0 has no ratio (:math:`R / 0`): the identity rule on a sigmoid or a batch norm
after a ReLU can give it. The infinity need not reach the input (a ReLU's backward drops it where the value is 0),
so each such ratio is flagged (:func:`~dynamiclrp.ops.base.all_finite`) and a flagged pass is left to the node-by-node
propagation, which carries that relevance.

With a plan (:class:`dynamiclrp.Plan`) the working-out is done once per graph skeleton and rule set: the steps
(:class:`PreparedPass`) read their node through a context that is pointed at the next run's graph, and the bypasses
name nodes by id. A rebuilt skeleton (another graph), other rules, other recorded slots or seeds, or a step from
an op entry outside this package (which may hold its node) work it out again.

Two caveats. A hook the model itself registered on an activation's gradient (``tensor.register_hook``) runs during
this pass too: :func:`dynamiclrp.propagate` takes ``gradient_form=False`` for such a model. And the hooks sit on the
graph's nodes while the pass runs, so two explanations of the *same* graph must not run at the same time in two
threads (explanations of separate forwards may).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import GradientEdge

from .engine import Context, Run
from .errors import ActivationUnavailableError, GraphFreedError
from .gradient_bypass import Bypasses, UndeliveredError, plan_bypasses, seed_below_pick
from .ops import spec_for
from .ops.attention import mask_checks_pass
from .ops.base import (
    GRAPH_FREED,
    IdentityStep,
    PreHook,
    all_finite,
    carried_flag,
    extremes,
    freed,
    identity_gradient,
    ratio,
    rule_form,
    silenced,
    with_stabilising_factor,
)
from .ops.elementwise import AddTerms
from .plan import lru_get, lru_put
from .rules import PLAIN, Stabilised

BYPASSES = True  # narrow fused projections' backward where their gradient is partly zero (gradient_bypass)


MAX_PASSES = 4  # prepared passes a skeleton keeps (one per rule set, recorded slots and seeds; LRU)


@dataclass
class PreparedPass:
    """The gradient form worked out for one graph under one rule set: each hooked node's step with the context it
    reads its node through (``(node id, step, context)``), and the bypasses, planned on first use; or the reason
    the form cannot be used."""

    steps: list[tuple[int, Any, Context]]
    reason: str | None = None
    bypasses: Bypasses | None = None

    def bind(self, run: Run) -> None:
        """Point every step at ``run`` and its graph's nodes (the same skeleton as the run it was worked out on)."""
        nodes = run.graph.nodes
        for nid, _, ctx in self.steps:
            ctx.run, ctx.node = run, nodes[nid]

    def release(self) -> None:
        """Let go of the run (a kept pass must not hold its activations or its autograd graph)."""
        for _, _, ctx in self.steps:
            ctx.run = ctx.node = None
        if self.bypasses is not None:
            self.bypasses.bind(None)

    def hooks(self, run: Run) -> list[tuple[Any, Any]]:
        """``(autograd node, step)`` for this run's graph."""
        nodes = run.graph.nodes
        return [(nodes[nid].fn, step) for nid, step, _ in self.steps]


def prepare_gradient_form(run: Run, seeds: frozenset) -> PreparedPass:
    """The steps of the gradient form for ``run`` (``seeds``: the output slots the pass starts from): from the
    plan, where the run's graph reuses a skeleton that kept them for the same rules, recorded slots and seeds,
    else worked out (and kept, when every step's op entry is this package's own)."""
    skeleton = run.graph.skeleton
    key = None if skeleton is None else _pass_key(run, seeds)
    kept = None if key is None else lru_get(skeleton.passes, key)
    if kept is not None:
        return kept
    steps, reason = gradient_steps(run, seeds)
    prepared = PreparedPass(steps, reason)
    if key is not None and all(_rebindable(ctx.node) for _, _, ctx in steps):
        lru_put(skeleton.passes, key, prepared, MAX_PASSES)
    return prepared


def _pass_key(run: Run, seeds: frozenset) -> Hashable | None:
    """What the steps depend on besides the skeleton: the rules (the key holds them: equal by value where a rule is
    a frozen dataclass, else by identity, which no other rule can take while the key lives), the data sources'
    answers (parameter or input), the recorded slots and the seeds. None where a rule cannot be hashed (a mutable
    dataclass): nothing is kept then."""
    preset, sources = run.preset, run.graph.skeleton.sources
    key = (tuple(preset.families.items()), tuple((k, tuple(v.items())) for k, v in preset.kinds.items()),
           tuple((nid, tuple(d.items())) for nid, d in run.node_rules.items()),
           tuple(run.graph.nodes[i].data for i, _ in sources), frozenset(run.record), seeds, run.dtype,
           run.subtract_addends)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _rebindable(node: Any) -> bool:
    """Whether a step of this node may be kept by a plan: its op entries are this package's, whose steps read the
    node through their context (an entry registered from outside may have kept the autograd node itself)."""
    return all(type(spec).__module__.startswith("dynamiclrp.ops") for spec in (node.spec, spec_for(node.fn)))


def gradient_steps(run: Run, seeds: frozenset) -> tuple[list[tuple[int, Any, Context]], str | None]:
    """The steps the gradient form needs, as ``(graph node id, step, the context it was made with)``, or the
    reason it cannot be used (the first node on the way whose rule has no gradient form).

    Nodes are visited from the outputs (``graph.order``), and only those the pass reaches are asked: a node that
    every consumer gives no gradient (a step's :func:`~dynamiclrp.ops.base.silenced` operand: a norm's statistics,
    the ``1 + tanh(...)`` of a GELU written out) is not run by autograd, so its rule needs no form. ``seeds``: the
    output slots the pass starts from."""
    graph, useful, nodes = run.graph, run.useful, run.graph.nodes
    run.seeds = seeds  # a step may take over the steps of a chain of nodes below it, none of them seeded
    reached = {nid for nid, _ in seeds}
    hooks = []
    for hid in graph.order:  # loops, not generators: this runs for every node of every graph
        head = nodes[hid]
        if head.part or hid not in reached:
            continue  # a later part of a fused node (its head stands for it), or a node no gradient reaches
        fn = head.fn
        parts = graph.parts(fn, hid)
        for asked in parts:
            if useful[asked.id] and _passes_on(asked, useful):
                break
        else:
            continue
        ctx = Context(run, head, [])
        step = head.spec.gradient_step(ctx) if len(parts) == 1 else spec_for(fn).gradient_step_fused(ctx, parts)
        if step is None:
            return [], f"{asked.kind} (node #{asked.id}) has no gradient form under its rule"
        if step is not PLAIN:
            hooks.append((hid, step, ctx))
        quiet = silenced(step) if len(parts) == 1 else ()
        for p in parts:
            for i, e in enumerate(p.inputs):
                if e is not None and i not in quiet and nodes[e.child].fn is not fn:
                    reached.add(e.child)
    run.reached = frozenset(reached)
    return _sums_stabilised_by_their_consumers(run, hooks, seeds), None


def _sums_stabilised_by_their_consumers(run: Run, hooks: list, seeds: frozenset) -> list:
    r"""``hooks`` with the ε-step of a sum moved into its consumers where one of them passes relevance through the
    identity rule (a layer norm under the ``epsilon`` preset, after a residual sum).

    That consumer's ratio :math:`g\,y / x` is infinite where :math:`x = 0` and :math:`y \ne 0` (a half-precision
    residual stream holds exact zeros: two addends that cancel), and the sum's factor :math:`|x| / (|x| + \varepsilon)`
    cannot turn that back into the ε-rule's finite :math:`R_x / \mathrm{stab}(x)`: the whole pass went node by node.
    Applied by each consumer to what it sends back instead -- the identity step as :math:`g\,y / \mathrm{stab}(x)`,
    the others by the factor after their own step -- the sum's output gets the same total everywhere else, and
    there the ε-rule's. Not where the sum's output is recorded or seeded (the total arriving there is read), nor
    where a consumer is part of a fused node (its operands are not its autograd node's)."""
    graph = run.graph
    steps = {hid: (step, ctx) for hid, step, ctx in hooks}
    moved: dict[int, float] = {}  # sum -> its ε, applied by its consumers
    for hid, step, ctx in hooks:
        node = graph.nodes[hid]
        if not isinstance(step, PreHook) or node.spec.family != "sum" or not isinstance(node.spec, AddTerms) \
                or any(e is None for e in node.inputs) or (hid, 0) in run.record or (hid, 0) in seeds:
            continue
        form = rule_form(ctx.rule("sum"), "sum")
        consumers = graph.consumers.get((hid, 0), ())
        if isinstance(form, Stabilised) and len(graph.parts(node.fn)) == 1 and any(
                i == 0 and isinstance(steps.get(c, (None,))[0], IdentityStep) for c, i in consumers) and all(
                len(graph.parts(graph.nodes[c].fn)) == 1 for c, _ in consumers):
            moved[hid] = form.eps
    for hid, eps in moved.items():  # first the steps themselves: a moved sum's own is gone (PLAIN) ...
        del steps[hid]
        for c, i in graph.consumers[(hid, 0)]:
            own = steps.get(c, (None,))[0]
            if i == 0 and isinstance(own, IdentityStep):
                steps[c] = (identity_gradient(own.ctx, own.quotient, stabiliser=eps), own.ctx)
    for hid, eps in moved.items():  # ... then the factor on what each other consumer sends back
        for c, i in graph.consumers[(hid, 0)]:
            own, at = steps.get(c, (PLAIN, None))
            if i == 0 and isinstance(own, IdentityStep):
                continue  # remade above with the stabiliser
            at = at or Context(run, graph.nodes[c], [])
            steps[c] = (with_stabilising_factor(own, i, eps, at), at)
    return [(hid, step, ctx) for hid, (step, ctx) in steps.items()]


def _passes_on(node: Any, useful: list[bool]) -> bool:
    """Whether one of the node's operands leads to something asked for."""
    for e in node.inputs:  # noqa: SIM110 - a loop: any() over a generator costs more than the test, node after node
        if e is not None and useful[e.child]:
            return True
    return False


def propagate_gradient_form(run: Run, seeds: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]],
                            prepared: PreparedPass, bypass: bool | None = None) -> bool:
    """Fill ``run.recorded`` by one gradient pass: ``seeds`` maps an output slot to (its relevance, its value).
    Returns False, recording nothing, when a relevance came out non-finite and ``run.check_finite`` is set (the
    caller then propagates relevance node by node, which names the node), and whenever a ratio could not carry
    some relevance (relevance at a zero value, :func:`~dynamiclrp.ops.base.all_finite`: node by node carries it,
    where the pass may have dropped it without a trace), and where a step needed an activation the Promise System
    cannot recover (node by node may not need it, or raises itself). A bypass
    (:mod:`dynamiclrp.gradient_bypass`; ``bypass``, default :data:`BYPASSES`) that could not hand its gradient on
    makes the pass run again without bypasses."""
    graph = run.graph
    keys = sorted(run.record)
    outputs = [GradientEdge(graph.nodes[nid].fn, nr) for nid, nr in seeds]
    ratios = [ratio(r.to(v.dtype), v) for r, v in seeds.values()]  # at an output: its relevance over its value
    run.carried, run.mask_checks, run.verified_masks = [carried_flag(q) for q in ratios], [], {}
    prepared.bind(run)  # released below, whatever happens: a plan keeps the pass, not the run
    hooks = prepared.hooks(run)
    bypasses, handles = None, []
    running: list = []  # the autograd node whose post-hooks autograd is calling: no hook may be added to it then
    run.promises.on_replay = lambda node: None if running and node.fn is running[-1] else \
        _release_when_run(run, node, handles)
    try:
        if BYPASSES if bypass is None else bypass:
            if prepared.bypasses is None:
                prepared.bypasses = plan_bypasses(run, dict(hooks), frozenset(seeds))
            bypasses = prepared.bypasses.bind(graph)
        for nid, hook in bypasses.hooks if bypasses else ():
            handles.append(graph.nodes[nid].fn.register_prehook(hook.hook))
        if bypasses is not None:  # the pass started below a pick of a final projection's rows, where it can
            outputs, ratios = seed_below_pick(run, dict(hooks), outputs, ratios, bypasses)
        for fn, hook in hooks:
            if isinstance(hook, PreHook):
                handles.append(fn.register_prehook(hook.hook))
                hook = hook.post
            if hook is not None:
                handles.append(fn.register_hook(_marked(hook, fn, running)))
        grads = torch.autograd.grad(outputs, [GradientEdge(graph.nodes[nid].fn, nr) for nid, nr in keys], ratios,
                                    retain_graph=True, allow_unused=True)
    except UndeliveredError:
        grads = None
    except ActivationUnavailableError:
        # a step needs an activation the Promise System cannot recover where the node-by-node rule may not (the
        # identity rule passes relevance on without its input; its ratio needs it): that propagation decides
        return False
    except RuntimeError as err:
        if freed(err):
            raise GraphFreedError(GRAPH_FREED) from None
        raise
    finally:
        run.promises.on_replay = None
        for h in handles:
            h.remove()
        undelivered = bypasses is not None and bypasses.undelivered()
        bypassed = dict(bypasses.bypassed) if bypasses is not None else {}
        # deliveries to recorded slots, which the pass read before they arrived (kept: release unbinds them)
        delivered = dict(bypasses.delivered) if bypasses is not None else {}
        prepared.release()
    if grads is None or undelivered:  # hooks removed: again, without bypasses
        return propagate_gradient_form(run, seeds, prepared, bypass=False)
    if not _flags_pass(run):  # relevance at a zero value (no ratio carries it), or a mask check failed
        return False
    recorded = {}
    for (nid, nr), g in zip(keys, grads):
        extra = delivered.get((nid, nr))
        if extra is not None:  # a delivery the pass could not see as it read the slot
            g = extra if g is None else g + extra
        if g is not None:
            recorded[(nid, nr)] = _value(run, nid, nr).to(g.dtype) * g
    if run.check_finite and recorded and not bool(all_finite(torch.cat([extremes(r) for r in recorded.values()]))):
        return False
    run.recorded.update(recorded)
    run.bypassed = bypassed
    run.rules_run = sum(1 for n in graph.nodes if run.useful[n.id] and n.inputs)
    return True


def _flags_pass(run: Run) -> bool:
    """Whether every ratio of the pass carried its relevance (:func:`~dynamiclrp.ops.base.all_finite` of their
    flags, :func:`~dynamiclrp.ops.base.carried_flag`) and every softmax's deferred mask check holds
    (:func:`~dynamiclrp.ops.attention.mask_checks_pass`): one read by the host for all of them."""
    if not run.mask_checks:
        return bool(all_finite(torch.cat(run.carried)))
    finite = all_finite(torch.cat(run.carried))
    numbers = torch.cat([finite.reshape(1).to(run.mask_checks[0][0].dtype), *(t for t, _ in run.mask_checks)])
    numbers = numbers.tolist()
    return bool(numbers[0]) and mask_checks_pass(numbers[1:], [tol for _, tol in run.mask_checks])


def _marked(post: Any, fn: Any, running: list) -> Any:
    """``post`` (a post-hook of ``fn``) with ``fn`` on ``running`` while it runs: a step there may replay its own
    node's output, and autograd is then going through that node's post-hooks, to which nothing may be added."""
    def hook(grad_inputs, grad_outputs):
        running.append(fn)
        try:
            return post(grad_inputs, grad_outputs)
        finally:
            running.pop()
    return hook


def _release_when_run(run: Run, node: Any, handles: list) -> None:
    """Forget the outputs the Promise System just replayed for ``node`` once the node's backward has run in this
    pass: every step that reads them -- the node's own and its consumers', which autograd runs before it -- has
    then run, and values below never need values above. So a run holds the recovered activations of the layers
    the pass is at, not of every layer it has been through (an ε-step's recomputed attention scores: one tokens x
    tokens tensor per layer). A recorded slot's value is read after the pass: kept."""
    if any((node.id, nr) in run.record for nr in range(node.spec.n_outputs(node))):
        return
    promises = run.promises
    handles.append(node.fn.register_hook(lambda grad_inputs, grad_outputs: promises.forget(node)))


def _value(run: Run, nid: int, nr: int) -> torch.Tensor:
    node = run.graph.nodes[nid]
    if not node.inputs and getattr(node.fn, "variable", None) is not None:
        return node.fn.variable.detach()
    return run.promises.value(nid, nr)
