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
identity rule -- the ``attnlrp`` and ``cp_lrp`` presets. A graph with any other rule (z⁺, γ, a merged batch norm,
ε = 1e-6) is propagated as relevance, node by node (:mod:`dynamiclrp.engine`), as is a run that wants the
per-node ledger or a relevance dtype other than the graph's.

Two caveats. A hook the model itself registered on an activation's gradient (``tensor.register_hook``) runs during
this pass too: :func:`dynamiclrp.propagate` takes ``gradient_form=False`` for such a model. And the hooks sit on the
graph's nodes while the pass runs, so two explanations of the *same* graph must not run at the same time in two
threads (explanations of separate forwards may).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.graph import GradientEdge

from .engine import Context, Run, _all_finite
from .errors import GraphFreedError
from .gradient_bypass import UndeliveredError, plan_bypasses
from .ops import spec_for
from .ops.base import GRAPH_FREED, PreHook, freed, ratio
from .rules import PLAIN

BYPASSES = True  # narrow fused projections' backward where their gradient is partly zero (gradient_bypass)


def gradient_steps(run: Run) -> tuple[list[tuple[Any, Any]], str | None]:
    """The hooks the gradient form needs, as ``(autograd node, hook)``, or the reason it cannot be used (the
    first node on the way whose rule has no gradient form)."""
    graph, useful = run.graph, run.useful
    hooks, seen = [], set()
    for node in graph.nodes:
        if node.fn in seen or not useful[node.id] or not any(
                e is not None and useful[e.child] for e in node.inputs):
            continue
        seen.add(node.fn)
        head = graph.nodes[graph.head[node.fn]]
        parts = graph.parts(node.fn)
        ctx = Context(run, head, [])
        step = head.spec.gradient_step(ctx) if len(parts) == 1 else spec_for(head.fn).gradient_step_fused(ctx, parts)
        if step is None:
            return [], f"{node.kind} (node #{node.id}) has no gradient form under its rule"
        if step is not PLAIN:
            hooks.append((node.fn, step))
    return hooks, None


def propagate_gradient_form(run: Run, seeds: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]],
              hooks: list[tuple[Any, Any]], bypass: bool | None = None) -> bool:
    """Fill ``run.recorded`` by one gradient pass: ``seeds`` maps an output slot to (its relevance, its value).
    Returns False, recording nothing, when a relevance came out non-finite and ``run.check_finite`` is set (the
    caller then propagates relevance node by node, which names the node). A bypass
    (:mod:`dynamiclrp.gradient_bypass`; ``bypass``, default :data:`BYPASSES`) that could not hand its gradient on
    makes the pass run again without bypasses."""
    graph = run.graph
    keys = sorted(run.record)
    outputs = [GradientEdge(graph.nodes[nid].fn, nr) for nid, nr in seeds]
    ratios = [ratio(r.to(v.dtype), v) for r, v in seeds.values()]  # at an output: its relevance over its value
    bypasses = plan_bypasses(run, dict(hooks), frozenset(seeds)) if (BYPASSES if bypass is None else bypass) else None
    handles = [fn.register_prehook(hook.hook) for fn, hook in (bypasses.hooks if bypasses else ())]
    handles += [fn.register_prehook(hook.hook) if isinstance(hook, PreHook) else fn.register_hook(hook)
                for fn, hook in hooks]
    try:
        grads = torch.autograd.grad(outputs, [GradientEdge(graph.nodes[nid].fn, nr) for nid, nr in keys], ratios,
                                    retain_graph=True, allow_unused=True)
    except UndeliveredError:
        grads = None
    except RuntimeError as err:
        if freed(err):
            raise GraphFreedError(GRAPH_FREED) from None
        raise
    finally:
        for h in handles:
            h.remove()
    if grads is None or bypasses and bypasses.undelivered():  # hooks removed: again, without bypasses
        return propagate_gradient_form(run, seeds, hooks, bypass=False)
    recorded = {}
    for (nid, nr), g in zip(keys, grads):
        if g is not None:
            recorded[(nid, nr)] = _value(run, nid, nr).to(g.dtype) * g
    if run.check_finite and recorded and not bool(torch.stack([_all_finite(r) for r in recorded.values()]).all()):
        return False
    run.recorded.update(recorded)
    run.bypassed = dict(bypasses.bypassed) if bypasses else {}
    run.rules_run = sum(1 for n in graph.nodes if run.useful[n.id] and n.inputs)
    return True


def _value(run: Run, nid: int, nr: int) -> torch.Tensor:
    node = run.graph.nodes[nid]
    if not node.inputs and getattr(node.fn, "variable", None) is not None:
        return node.fn.variable.detach()
    return run.promises.value(nid, nr)
