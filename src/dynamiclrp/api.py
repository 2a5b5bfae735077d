"""The two entry points: :func:`propagate` on an existing graph, :func:`explain` on a model and inputs."""

from __future__ import annotations

import contextlib
import functools
import gc
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import get_gradient_edge

from .engine import Run
from .errors import DynamicLRPError, MissingRuleError, NoGraphError, NonFiniteError, TrainModeWarning
from .gradient_form import prepare_gradient_form, propagate_gradient_form
from .graph import Graph
from .ops import Missing, saved
from .plan import Plan
from .presets import Preset, families_of, get_preset
from .result import Attribution, Stats
from .scopes import ModuleScopes, record_scopes
from .targets import Target, make_seed

Tensors = torch.Tensor | Sequence[torch.Tensor]


def propagate(
    outputs: Tensors,
    target: Target | Sequence[Target] = None,
    wrt: Sequence[torch.Tensor] | torch.Tensor | None = None,
    preset: str | Preset = "epsilon",
    *,
    seed: str = "value",
    rules: Mapping[str, Any] | None = None,
    strict: bool = True,
    ledger: bool = True,
    check_finite: bool = True,
    dtype: torch.dtype | None = None,
    keep_run: bool = False,
    plan: Plan | None = None,
    subtract_addends: bool = False,
    gradient_form: bool | None = None,
) -> Attribution:
    """Propagate relevance from ``outputs`` to ``wrt`` over the outputs' existing autograd graph.

    Parameters
    ----------
    outputs : Tensor or sequence of Tensor
        Output(s) of a forward pass run with autograd on (e.g. logits, or QA start and end logits).
    target : int, sequence, Tensor, callable or None, or one of these per output
        What to explain (see :func:`dynamiclrp.targets.make_seed`); None explains the arg-max of each row.
    wrt : Tensor or sequence of Tensor
        Tensors of the graph to return relevance for: leaf inputs, intermediate activations, parameters.
    preset : str or Preset
        Rule policy (:mod:`dynamiclrp.presets`), e.g. ``"epsilon"``, ``"epsilon_gamma_box"``, ``"attnlrp"``.
    seed : {"value", "one"}
        Seed relevance at the target: the output value (default) or 1.
    rules : mapping, optional
        Family -> rule overrides on top of the preset.
    strict : bool
        If True (default), a node type without a rule raises :class:`MissingRuleError` before any work;
        if False, the documented fallback is used and counted in ``Attribution.approximations``.
    ledger : bool
        Keep the per-node conservation ledger.
    check_finite : bool
        Raise :class:`NonFiniteError` when a rule produces NaN or inf. With the ledger on, this is read off the
        sums the ledger takes anyway (non-finite exactly when an element is, or when the sum overflows the dtype,
        which also raises); without it, off each tensor's extremes.
    dtype : torch.dtype, optional
        Dtype of the relevance. Default: the outputs' dtype, float64 where a leaf of the graph is float64, and for
        half-precision outputs float32 -- except on a GPU where the gradient form explains them (``ledger=False``
        and a rule set that has it): that computes in the model's own dtype, as its backward pass and LXT do (on
        tiny bf16 transformers as close to float64 as float32 node by node; a CPU's bf16 products are slow).
    keep_run : bool
        Keep the engine's run (graph, recovered activations, relevance tables) in ``Attribution.extra["run"]``
        for inspection. Off by default: it keeps the autograd graph and its activations alive as long as the
        Attribution, which a loop over a data set must not do.
    plan : Plan, optional
        An execution plan shared by repeated explanations of one architecture (:class:`dynamiclrp.Plan`): it
        reuses the graph skeleton when the new graph's fingerprint matches one read before, and weights the
        rules transformed (:math:`w^+`, merged batch norms), checked against the weights' version counters.
        It holds the transformed weights between calls (``plan.cached_bytes``).
    subtract_addends : bool
        Off by default: every activation autograd dropped is replayed from saved operands. If True, an addend autograd
        dropped whose sum was saved (a residual branch's output before the next layer norm) is recovered as
        :math:`a' = \\mathrm{fl}(s - b)` instead of replaying the layer that made it: one element-wise pass instead
        of a matrix product per residual block. Not bitwise: :math:`|a' - a| \\le \\tfrac12\\mathrm{ulp}(s) +
        \\tfrac12\\mathrm{ulp}(a')`, float32/float64 sums only; each use is counted in
        ``Attribution.approximations``.
    gradient_form : bool or None
        Relevance as input times a modified gradient, in one pass of autograd's own engine with hooks on the few
        nodes whose rule is not their gradient (:mod:`dynamiclrp.gradient_form`). It exists for rule sets whose
        every rule on the way has that form: the ``attnlrp`` and ``cp_lrp`` presets (ε-rules at ε ≤ 1e-12, which
        it takes to their ε → 0 limit). None (default): used where it exists and nothing asks for per-node
        relevance (``ledger=False``, the relevance dtype that of the outputs: for a half-precision model the
        default, see ``dtype``), the results agreeing with the node-by-node propagation to rounding; True:
        required (an error says why it cannot be used); False: never. Hooks the model registered on activation
        gradients run in this pass: pass False for such a model. ``Attribution.stats.gradient_form`` tells which
        was used.

    Returns
    -------
    Attribution

    Examples
    --------
    >>> import torch, dynamiclrp
    >>> lin = torch.nn.Linear(3, 2)
    >>> x = torch.randn(1, 3, requires_grad=True)
    >>> att = dynamiclrp.propagate(lin(x), target=0, wrt=[x])
    >>> att.inputs[0].shape
    torch.Size([1, 3])
    """
    outs = _as_outputs(outputs)
    wrt_list = [wrt] if isinstance(wrt, torch.Tensor) else list(wrt or [])
    att = _propagate(outs, target, wrt_list, get_preset(preset), seed=seed, rules=rules, strict=strict,
                     ledger=ledger, check_finite=check_finite, dtype=dtype, plan=plan,
                     subtract_addends=subtract_addends, gradient_form=gradient_form)
    if not keep_run:
        del att.extra["run"]
    return att


def _as_outputs(outputs: Tensors) -> list[torch.Tensor]:
    outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    if not outs:
        raise NoGraphError("no output tensor given")
    for i, o in enumerate(outs):
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"output {i} is a {type(o).__name__}, not a tensor")
        if o.grad_fn is None:
            raise NoGraphError(
                f"output {i} has no grad_fn: it was computed without an autograd graph. Run the forward "
                "with autograd enabled (not under torch.no_grad() or torch.inference_mode()) and with the "
                "input or some parameter requiring grad (e.g. x.requires_grad_())"
            )
        if not bool(torch.isfinite(o.detach()).all()):
            raise NonFiniteError(f"output {i} contains NaN or inf; cannot explain it")
    return outs


def _gc_paused(fn):
    """Run ``fn`` with Python's cyclic garbage collector paused. A run allocates thousands of small objects (nodes,
    edges, contexts) and none of them in cycles, yet their number triggers full collections of the whole heap --
    a large model's modules, a tokenizer -- at random moments: up to 0.27 s inside one 0.05 s explanation of a
    small BERT. Reference counting frees the run's objects anyway; collection resumes when it returns."""

    @functools.wraps(fn)
    def paused(*args, **kwargs):
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()

    return paused


@_gc_paused
def _propagate(outs, target, wrt_list, preset, *, seed="value", rules=None, strict=True, ledger=True,
               check_finite=True, dtype=None, extra_record=None, node_rules_for=None, scopes=None,
               train_mode=None, plan=None, subtract_addends=False, gradient_form=None):
    if rules:
        preset = preset.override(families=dict(rules))
    graph = Graph.build([o.grad_fn for o in outs], plan)
    kinds = Counter(n.kind for n in graph.nodes)
    missing = Counter(n.kind for n in graph.nodes if isinstance(n.spec, Missing))
    if missing and strict:
        listing = ", ".join(f"{k} (x{c}{_where(graph, k, scopes)})" for k, c in missing.most_common())
        hints = "".join(f". {_HINTS[k]}" for k in missing if k in _HINTS)
        raise MissingRuleError(
            f"no LRP rule for {sum(missing.values())} node(s) of type(s): {listing}. Register one with "
            f"dynamiclrp.register_op(kind, spec), or pass strict=False to use the documented fallback{hints}"
        )
    if train_mode is None:
        train_mode = _train_mode_nodes(graph)
    if train_mode:
        warnings.warn(_TRAIN_MODE.format(what=train_mode), TrainModeWarning, stacklevel=3)
    wrt_keys = [_key(graph, t, i) for i, t in enumerate(wrt_list)]
    record = set(wrt_keys) | set(extra_record(graph) if extra_record else ())
    targets = target if isinstance(target, (tuple, list)) and len(outs) > 1 else [target] * len(outs)
    if len(targets) != len(outs):
        raise DynamicLRPError(f"{len(outs)} outputs but {len(targets)} targets")
    run_dtype = dtype
    if dtype is None:
        dtype = _relevance_dtype(graph, outs)
        # a half-precision model explained by the gradient form: relevance in the model's dtype, the one its own
        # backward computes in (float32 node by node where the form cannot be used)
        tries_form = not ledger and gradient_form is not False and dtype != torch.float64
        run_dtype = (_half_precision(outs) if tries_form else None) or dtype
    raw_seeds = [make_seed(o, t, seed) for o, t in zip(outs, targets)]
    seeds, seed_list = _seeds(graph, outs, raw_seeds, run_dtype)
    run = Run(graph, preset, run_dtype, record, node_rules=node_rules_for(graph) if node_rules_for else {},
              ledger=[] if ledger else None, check_finite=check_finite, subtract_addends=subtract_addends)
    for o in outs:  # the explained outputs are activations we hold: promises may use them (and their bases)
        for t in (o, o._base):
            if t is not None and t.grad_fn is not None and t.grad_fn in graph.head:
                run.promises.values.setdefault((graph.head[t.grad_fn], t.output_nr), t.detach())
    with torch.no_grad(), plan.active() if plan is not None else contextlib.nullcontext():
        used_gradient_form = _gradient_form(run, outs, seeds, gradient_form)
        if not used_gradient_form:
            if run.dtype != dtype:  # the model's precision was for the gradient form only
                run.dtype = dtype
                seeds, seed_list = _seeds(graph, outs, raw_seeds, dtype)
            run.propagate(seeds)
    if run.approximations:
        warnings.warn(
            "dynamiclrp used documented approximations: "
            + "; ".join(f"{k} (x{c})" for k, c in run.approximations.items())
            + " (see Attribution.approximations)",
            stacklevel=3,
        )
    ps = run.promises.stats
    stats = Stats(nodes=len(graph.nodes), ops=dict(kinds), rules_run=run.rules_run, promises=ps.promises,
                  recovered=ps.recovered, internal_nodes=ps.internal_nodes, delta=ps.delta, origins=ps.origins,
                  gradient_form=used_gradient_form, bypassed_kinds=dict(run.bypassed))
    inputs = [_relevance_or_zeros(run, k, t, run.dtype) for k, t in zip(wrt_keys, wrt_list)]
    att = Attribution(inputs=inputs, outputs=seed_list, stats=stats, ledger=run.ledger,
                      approximations=dict(run.approximations))
    att.extra["run"] = run
    return att


def _seeds(graph: Graph, outs: list[torch.Tensor], raw: list[torch.Tensor], dtype: torch.dtype):
    """The seeds per output slot (summed where two outputs share one) and per output, in ``dtype``."""
    seeds: dict[tuple[int, int], torch.Tensor] = {}
    seed_list = []
    for o, r in zip(outs, raw):
        s = r.to(dtype)
        seed_list.append(s)
        key = (graph.head[o.grad_fn], o.output_nr)
        seeds[key] = seeds[key] + s if key in seeds else s
    return seeds, seed_list


#: devices on which a half-precision model's gradient form runs in its own dtype by default (see ``dtype`` of
#: :func:`propagate`): where half precision has fast kernels. On a CPU without them bf16 products are slower than
#: float32 ones (a 4-layer bf16 LLaMA at 256 tokens: ``attnlrp`` 1.38 s in bf16, 0.49 s node by node in float32)
HALF_GRADIENT_FORM_DEVICES = ("cuda",)


def _half_precision(outs: list[torch.Tensor]) -> torch.dtype | None:
    """The outputs' dtype where all are float16, or all bfloat16, on a device of
    :data:`HALF_GRADIENT_FORM_DEVICES`."""
    dt = outs[0].dtype
    return dt if dt in (torch.float16, torch.bfloat16) and all(
        o.dtype == dt and o.device.type in HALF_GRADIENT_FORM_DEVICES for o in outs) else None


def _gradient_form(run: Run, outs: list[torch.Tensor], seeds: dict, wanted: bool | None) -> bool:
    """Propagate by the gradient form where ``wanted`` allows it and the run's rules have it; whether it did."""
    if wanted is False:
        return False
    reason = None
    if run.ledger is not None:
        reason = "the per-node ledger was asked for (ledger=True)"
    elif any(o.dtype != run.dtype for o in outs):
        reason = f"the relevance dtype ({run.dtype}) is not the outputs' ({outs[0].dtype})"
    prepared = None
    if reason is None:
        prepared = prepare_gradient_form(run, frozenset(seeds))
        reason = prepared.reason
    if reason is not None:
        if wanted:
            raise DynamicLRPError(f"gradient_form=True, but the gradient form cannot be used: {reason}")
        return False
    values = {(run.graph.head[o.grad_fn], o.output_nr): o.detach() for o in outs}
    return propagate_gradient_form(run, {k: (s, values[k]) for k, s in seeds.items()}, prepared)


#: what to do about node types that hide the graph of the ops they ran
_HINTS = {
    "CheckpointFunctionBackward": (
        "CheckpointFunctionBackward is torch.utils.checkpoint with use_reentrant=True, which runs the checkpointed "
        "forward without recording its ops: use checkpoint(..., use_reentrant=False) or turn checkpointing off "
        "(e.g. model.gradient_checkpointing_disable()) while explaining"
    ),
    "CompiledFunctionBackward": (
        "CompiledFunctionBackward comes from a torch.compile-d model, whose ops are fused into one compiled "
        "node: explain the original module (dynamiclrp.explain unwraps model._orig_mod itself, or call the "
        "uncompiled model)"
    ),
}

_TRAIN_MODE = (
    "the explained computation ran in train mode ({what}): relevance is exact for what was computed, but "
    "dropout makes it random and batch statistics mix the rows of the batch; call model.eval() before explaining"
)


def _train_mode_nodes(graph: Graph) -> str:
    """What in the graph shows train mode: batch norm on batch statistics, dropout nodes (CUDA kernels; on the
    CPU dropout is a plain product with its mask, which only the module check of :func:`explain` sees)."""
    found = []
    if any(n.kind in ("NativeDropoutBackward0", "FusedDropoutBackward0") for n in graph.nodes):
        found.append("dropout")
    if any("BatchNorm" in n.kind and saved(n.fn, "training", False) is True for n in graph.nodes):
        found.append("batch norm on batch statistics")
    return ", ".join(found)


def _train_mode_modules(modules: Iterable[torch.nn.Module]) -> str:
    """Modules in train mode whose output depends on it: dropout with p > 0, batch norm."""
    training = [m for m in modules if m.training]
    found = []
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in training):
        found.append("dropout")
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in training):
        found.append("batch norm on batch statistics")
    return ", ".join(found)


def _relevance_dtype(graph: Graph, outs: list[torch.Tensor]) -> torch.dtype:
    """float64 if the outputs or any leaf of the graph are float64, else float32 (also for half precision)."""
    if any(o.dtype == torch.float64 for o in outs):
        return torch.float64
    for n in graph.nodes:
        if not n.inputs and getattr(n.fn, "variable", None) is not None and n.fn.variable.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _where(graph: Graph, kind: str, scopes) -> str:
    """', in module a.b, c' for the modules that created nodes of this kind, when known."""
    if scopes is None:
        return ""
    paths = list(dict.fromkeys(p for n in graph.nodes if n.kind == kind for p in [scopes.path_of(n.fn)] if p))
    return f", in module {', '.join(paths[:3])}" if paths else ""


def _relevance_or_zeros(run, key, t, dtype):
    r = run.recorded.get(key)
    return r if r is not None else torch.zeros(t.shape, dtype=dtype, device=t.device)


def _key(graph: Graph, t: torch.Tensor, i: int) -> tuple[int, int]:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"wrt[{i}] is a {type(t).__name__}, not a tensor")
    if not t.requires_grad:
        raise DynamicLRPError(f"wrt[{i}] does not require grad, so it is not part of any autograd graph; "
                              "call .requires_grad_() on it before the forward pass")
    edge = get_gradient_edge(t)
    nid = graph.head.get(edge.node)
    if nid is None:
        raise DynamicLRPError(f"wrt[{i}] (shape {tuple(t.shape)}) is not part of the outputs' graph")
    return nid, edge.output_nr


# ----------------------------------------------------------------------------------------------------------


def explain(
    model: torch.nn.Module,
    inputs: torch.Tensor | Sequence[Any] | Mapping[str, Any],
    target: Target | Sequence[Target] = None,
    preset: str | Preset = "epsilon",
    modules: Sequence[str] = (),
    *,
    params: Sequence[str] = (),
    module_rules: Mapping[str, Any] | None = None,
    output: Callable[[Any], Tensors] | None = None,
    **kwargs: Any,
) -> Attribution:
    """Run ``model`` on ``inputs`` and explain its output.

    Returns relevance for every floating-point input (``Attribution.inputs``), per token for token models
    (``Attribution.tokens``, at the embedding looked up with the integer input), for the outputs of the named
    ``modules`` (``Attribution.modules``) and for the named ``params`` (``Attribution.params``).

    A ``torch.compile``-d model is explained through its original module (``model._orig_mod``, same parameters):
    compiled code fuses ops into one node that no LRP rule can see into.

    Module outputs are found by recording which graph node produced them during this forward (forward hooks that
    only observe and are removed at once). Parameters are made to require grad for the forward so that autograd
    records biases and operands, and every flag is restored afterwards: the model is left as it was.

    Parameters
    ----------
    model : nn.Module
    inputs : Tensor, sequence, or mapping of keyword arguments (e.g. a tokenizer's output)
    target, preset
        As in :func:`propagate`.
    modules : sequence of str
        Names (``model.named_modules()``) whose output relevance to return.
    params : sequence of str
        Names (``model.named_parameters()``) whose relevance to return.
    module_rules : mapping, optional
        Module name -> rule (for every family) or dict family -> rule, applied to the ops inside that module.
    output : callable, optional
        Selects the tensor(s) to explain from the model's output; default: the output itself, ``.logits``, or
        the first tensor of a tuple.
    **kwargs
        Passed to :func:`propagate` (``seed``, ``strict``, ``ledger``, ``dtype``, ``keep_run``, ``plan`` for a
        loop over a data set, ``subtract_addends``, ``gradient_form``, ...).

    Examples
    --------
    >>> import torch, dynamiclrp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> att = dynamiclrp.explain(model, torch.randn(2, 4), target=[0, 2], modules=["1"])
    >>> att.inputs[0].shape, att.modules["1"].shape
    (torch.Size([2, 4]), torch.Size([2, 8]))
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile: explain the eager module (same parameters)
    named = dict(model.named_modules())  # walked once: a transformer has hundreds of modules
    for name in list(modules) + list(module_rules or {}):
        if name not in named:
            raise DynamicLRPError(f"model has no module named {name!r}")
    all_params = dict(model.named_parameters())
    for name in params:
        if name not in all_params:
            raise DynamicLRPError(f"model has no parameter named {name!r}")

    fwd = _forward(model, inputs, output, watch=set(modules) | set(module_rules or {}), named=named,
                   params=all_params.values())
    kwargs.setdefault("train_mode", _train_mode_modules(named.values()) or None)
    outs, float_inputs, int_inputs = fwd.outputs, fwd.float_inputs, fwd.int_inputs
    seen_out, seen_in = fwd.seen_out, fwd.seen_in
    param_tensors = [all_params[n] for n in params]

    def module_keys(graph):
        keys = {}
        for name in modules:
            ts = [t for t in seen_out.get(name, []) if t.grad_fn is not None]
            if not ts:
                raise DynamicLRPError(f"module {name!r} produced no tensor with a graph in this forward")
            e = get_gradient_edge(ts[0])
            keys[name] = (graph.head[e.node], e.output_nr) if e.node in graph.head else None
            state["module_outputs"][name] = ts[0]
        return keys

    param_names = {id(p): n for n, p in all_params.items()}

    def embedding_nodes(graph):
        """Every embedding lookup, by its table's parameter name (with ``#k`` for a table looked up again, as in
        encoder-decoder models); and whether it looked up the token ids."""
        found = {}
        for n in graph.nodes:
            if n.kind == "EmbeddingBackward0":
                table = graph.nodes[n.inputs[0].child] if n.inputs and n.inputs[0] is not None else None
                w = table.fn.variable if table is not None and not table.inputs else None
                idx = saved(n.fn, "indices")
                is_token = any(idx.shape == t.shape and torch.equal(idx, t) for t in int_inputs)
                name = param_names.get(id(w), f"embedding#{n.id}")
                k = 1
                while name in found:
                    k += 1
                    name = f"{param_names.get(id(w), 'embedding')}#{k}"
                found[name] = ((n.id, 0), is_token)
        return found

    state: dict[str, Any] = {"module_outputs": {}}

    def extra_record(graph):
        state["modules"] = module_keys(graph)
        state["embeddings"] = embedding_nodes(graph)
        return ([k for k in state["modules"].values() if k is not None]
                + [k for k, _ in state["embeddings"].values()])

    def node_rules_for(graph):
        rules_by_node: dict[int, dict[str, Any]] = {}
        for name, rule in (module_rules or {}).items():
            fams = families_of(rule)
            for nid in _region(graph, seen_out.get(name, []), seen_in.get(name, [])):
                rules_by_node.setdefault(nid, {}).update(fams)
        return rules_by_node

    keep_run = kwargs.pop("keep_run", False)
    att = _propagate(outs, target, float_inputs + param_tensors, get_preset(preset), scopes=fwd.scopes,
                     extra_record=extra_record, node_rules_for=node_rules_for, **kwargs)
    run = att.extra["run"] if keep_run else att.extra.pop("run")
    n_in = len(float_inputs)
    att.params = dict(zip(params, att.inputs[n_in:]))
    att.inputs = att.inputs[:n_in]
    # a module in the graph that no relevance reached (behind a rule that holds its output constant) gets zeros
    att.modules = {name: (_relevance_or_zeros(run, k, state["module_outputs"][name], run.dtype)
                          if k is not None else None)
                   for name, k in state["modules"].items()}
    att.embeddings = {}
    toks = []
    for name, (key, is_token) in state["embeddings"].items():
        r = run.recorded.get(key)
        if r is not None:
            att.embeddings[name] = r.sum(-1)
            if is_token:
                toks.append(att.embeddings[name])
    att.tokens = sum(toks) if toks else None
    return att


@dataclass
class Forward:
    """What one observed forward pass produced: outputs, inputs made to require grad, module records."""

    outputs: list[torch.Tensor]
    float_inputs: list[torch.Tensor]
    int_inputs: list[torch.Tensor]
    scopes: ModuleScopes
    seen_out: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    seen_in: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def _forward(model: torch.nn.Module, inputs: Any, output: Callable | None = None, watch=(),
             named: Mapping[str, torch.nn.Module] | None = None,
             params: Iterable[torch.nn.Parameter] | None = None) -> Forward:
    """Run the model once with autograd on, parameters requiring grad (flags restored after) and observing hooks
    (removed after): the outputs, the float inputs made leaves that require grad, and which module made what.
    ``named`` and ``params``: the model's ``named_modules()`` and parameters, where the caller has them."""
    named = dict(model.named_modules()) if named is None else named
    args, kw = _split_inputs(inputs)
    float_inputs: list[torch.Tensor] = []

    def prep(x, name=""):
        # float inputs are explained; a float mask (attention_mask, ...) is a constant, not an input
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not name.endswith("mask"):
            x = x.detach().clone().requires_grad_(True)
            float_inputs.append(x)
        return x

    args = [prep(a) for a in args]
    kw = {k: prep(v, k) for k, v in kw.items()}
    # token relevance is read at the embedding looked up with `input_ids` (or the first integer input)
    int_inputs = [kw["input_ids"]] if isinstance(kw.get("input_ids"), torch.Tensor) else [
        x for x in list(args) + list(kw.values()) if isinstance(x, torch.Tensor) and not x.is_floating_point()][:1]

    seen_out: dict[str, list[torch.Tensor]] = {}
    seen_in: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name in watch:
        def hook(mod, inp, out, name=name):
            seen_in[name] = _tensors(inp)
            seen_out[name] = _tensors(out)
        handles.append(named[name].register_forward_hook(hook))
    flags = {p: p.requires_grad for p in (model.parameters() if params is None else params)}
    try:
        for p in flags:
            if p.is_floating_point():
                p.requires_grad_(True)
        with torch.enable_grad(), record_scopes(model, named) as scopes:
            raw = model(*args, **kw)
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    outs = _as_outputs(output(raw) if output else _select_output(raw))
    return Forward(outs, float_inputs, int_inputs, scopes, seen_out, seen_in)


def explain_forward(model, inputs, output=None):
    """The observed forward of :func:`explain`: (outputs, module scopes, Forward)."""
    fwd = _forward(model, inputs, output)
    return fwd.outputs, fwd.scopes, fwd


def _split_inputs(inputs):
    if isinstance(inputs, torch.Tensor):
        return [inputs], {}
    if isinstance(inputs, Mapping):
        return [], dict(inputs)
    return list(inputs), {}


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, Mapping):
        return [t for o in obj.values() for t in _tensors(o)]
    if hasattr(obj, "to_tuple"):
        return _tensors(obj.to_tuple())
    return []


def _select_output(raw) -> Tensors:
    if isinstance(raw, torch.Tensor):
        return raw
    logits = getattr(raw, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    start, end = getattr(raw, "start_logits", None), getattr(raw, "end_logits", None)
    if isinstance(start, torch.Tensor) and isinstance(end, torch.Tensor):
        return (start, end)
    ts = _tensors(raw)
    if not ts:
        raise DynamicLRPError("the model returned no tensor; pass output=... to select one")
    return ts[0]


def _region(graph: Graph, outs: list[torch.Tensor], ins: list[torch.Tensor]) -> set[int]:
    """Nodes computed inside a module: reachable from its outputs without passing its inputs' producers."""
    stop = set()
    for t in ins:
        if t.requires_grad:
            e = get_gradient_edge(t)
            if e.node in graph.head:
                stop.add(graph.head[e.node])
    stack = []
    for t in outs:
        if t.grad_fn is not None and t.grad_fn in graph.head:
            stack.append(graph.head[t.grad_fn])
    region: set[int] = set()
    while stack:
        nid = stack.pop()
        if nid in region or nid in stop:
            continue
        region.add(nid)
        stack.extend(e.child for e in graph.nodes[nid].inputs if e is not None)
    return region
