"""Fuzzing: random programs of supported ops (:mod:`fuzz_models`), explained by dynamiclrp and by an independent
reference propagator (:mod:`reference_lrp`), in float64.

Each case checks

1. no crash (``dynamiclrp.explain`` on the compiled module, one or two outputs, one target per row and output);
2. conservation: the ledger accounts for the whole seed (inputs + parameters + absorbed = seed) and what went to
   parameters and what was absorbed equal the reference's figures; on bias-free programs with ε → 0 and
   conservative rules, every row's input relevance sums to the row's seed;
3. batch-row independence: changing the last row's input and targets leaves the other rows' relevance unchanged;
4. equality with the reference: the input relevance (and, with ``explain``'s semantics, the relevance at every
   intermediate activation, through ``propagate(..., wrt=activations)``) agrees to 1e-10 relative (to the largest
   magnitude) in float64,
   plus 1e-12 of the largest relevance met anywhere in the propagation (rounding of relevance that cancels);
   cases with a denominator within 1e-5 of cancelling are ill-conditioned and not compared (``reference_lrp.watch``).

``benchmarks/fuzz.py`` runs the same checks on many more cases (``results/fuzz.md``); findings and their diagnoses
are in ``results/fuzz_findings.md``.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dynamiclrp
from dynamiclrp.errors import ActivationUnavailableError
from dynamiclrp.rules import Constant, Epsilon, LinearisedNorm, Pass, Uniform
from fuzz_models import OP_NAMES, FuzzModel, Node, Program, make_inputs, make_targets, materialize, programs
from reference_lrp import PRESETS, forward, is_model_input, live_consumers, reference_lrp, separate_bias

REF_RTOL = 1e-10  # reference vs dynamiclrp, relative to the largest relevance magnitude
FLOOR_RTOL = 1e-12  # absolute floor: of the largest relevance anywhere in the reference's propagation
ILL_CONDITIONED = 1e-5  # reference_lrp.watch: a denominator this close to cancelling makes the case incomparable
BATCH_RTOL = 1e-10  # other rows after changing one row
LEDGER_RTOL = 1e-9  # the ledger's totals
EXACT_RTOL = 1e-6  # row conservation with ε = 1e-12 (what the stabiliser may absorb near z = 0)
EXACT_RULES = {"linear": Epsilon(1e-12), "sum": Epsilon(1e-12), "product": Uniform(1e-12), "softmax": Pass(),
               "norm": Pass()}
# without biases: no learned addends, no batch norm (its running mean shifts like a bias)
NO_BIAS_OPS = tuple(op for op in OP_NAMES if op not in ("add_param", "batchnorm"))


# open findings of the library (results/fuzz_findings.md): predicate on (program, preset, mode); on a match the
# comparison with the reference is skipped (the other checks still run) until the fix lands -- or, for a crash
# (CRASHES), the whole case


def _dense_on_input(prog: Program, preset: str, mode: str = "explain") -> bool:
    """F1: a dense layer on the model input, in a preset without an ``input`` rule."""
    return preset in ("epsilon_plus", "epsilon_alpha2_beta1") and any(
        n.op == "linear" and is_model_input(prog, n.args[0]) for n in prog.nodes)


def _noncontiguous_linear_bias(prog: Program, preset: str, mode: str = "explain") -> bool:
    """F2: ``F.linear`` with bias on a non-contiguous 3-d activation (matmul + add instead of addmm), or a bias
    added on its own (``x @ W.T + b``)."""
    live = live_consumers(prog)
    if any(separate_bias(prog, i, live, tracked=True) is not None for i in range(len(prog.nodes))):
        return True
    return _biased_linear_on_noncontiguous_input(prog)


def _frozen_bias(prog: Program, preset: str, mode: str = "explain") -> bool:
    """F3: a linear or convolution with a frozen bias (propagate on a frozen model)."""
    live = live_consumers(prog)
    return mode == "frozen" and any(n.op in ("linear", "conv2d") and n.attrs["bias"] and (live[i] or i in prog.outputs)
                                    for i, n in enumerate(prog.nodes))


def _output_feeds_output(prog: Program, preset: str, mode: str = "explain") -> bool:
    """F4: an explained output is an operand of another (frozen model)."""
    live = live_consumers(prog)
    return mode == "frozen" and len(prog.outputs) > 1 and any(live[o] for o in prog.outputs)


def _frozen_affine_batch_norm(prog: Program, preset: str, mode: str = "explain") -> bool:
    """F5: a frozen affine batch norm that the preset would merge into the layer before it."""
    if mode != "frozen" or PRESETS[preset]["batchnorm"] != "merge":
        return False
    live = live_consumers(prog)
    return any(n.op in ("linear", "conv2d") and len(live[i]) == 1 and prog.nodes[live[i][0]].op == "batchnorm"
               and prog.nodes[live[i][0]].attrs["affine"] for i, n in enumerate(prog.nodes))


def _frozen_addend(prog: Program, preset: str, mode: str = "explain") -> bool:
    """F6: a frozen learned addend (its share of relevance is booked in the ledger)."""
    return mode == "frozen" and any(n.op == "add_param" for n in prog.nodes)


# every finding so far (results/fuzz_findings.md); those still open are in OPEN_FINDINGS
FINDINGS = {
    "F1": "a dense layer on the model input gets the conv rule (z⁺ / α2β1) in epsilon_plus / epsilon_alpha2_beta1",
    "F2": "F.linear with bias on a non-contiguous 3-d input: bias not in the layer's denominator",
    "F3": "frozen model: a frozen bias is split off by the sum rule instead of entering the denominator",
    "F4": "frozen model: KeyError in the Promise System when an explained output feeds another",
    "F5": "frozen model: an affine batch norm after a layer is silently not merged",
    "F6": "frozen model: the ledger books a frozen addend's share as absorbed, not as parameters/constants",
    "F7": "x @ W.T + b whose mm output is also used elsewhere: the bias's relevance is handed to the input "
          "(introduced by F2's fix)",
    "F8": "frozen model: a constant shift added before a softmax passes the mask check and is taken as 0 by the "
          "addition's rule (a frozen layer bias there: refused since 846206c; a frozen addend: open, documented)",
    "F9": "padded input layer (f86ee85): the padding is folded into the map only when no view separates it from the "
          "mm, so a linear layer on a padded 3-d input puts flat ones / z-box bounds on the padding",
    "F10": "frozen model: biases of F.linear on a non-contiguous input (no addmm) feeding a product: relevance "
           "booked to parameters where none is due (not minimised below 13 nodes)",
}
def _shared_separate_bias(prog: Program, preset: str, mode: str = "explain") -> bool:
    """F7: ``x @ W.T + b`` (a 1-d parameter added to a bias-free linear op's output) where the linear op's output
    is used elsewhere too."""
    live = live_consumers(prog)
    return mode == "explain" and any(n.op == "linear" and not n.attrs["bias"] and len(live[i]) > 1 and any(
        prog.nodes[k].op == "add_param" and prog.nodes[k].attrs["pshape"] == (n.attrs["out"],) for k in live[i])
        for i, n in enumerate(prog.nodes))


def _frozen_shift_before_softmax(prog: Program, preset: str, mode: str = "explain") -> bool:
    """F8: a frozen addend before a softmax (frozen model), seen through the ops a provisional replay passes (views,
    additions, scalar factors). A frozen layer bias right before it is refused with a clear error since 846206c."""
    if mode != "frozen":
        return False
    passes = ("reshape", "permute", "slice", "expand", "add", "scale")
    for n in prog.nodes:
        if n.op == "softmax":
            stack, seen = [n.args[0]], set()
            while stack:
                j = stack.pop()
                if j in seen:
                    continue
                seen.add(j)
                if prog.nodes[j].op == "add_param":
                    return True
                if prog.nodes[j].op in passes:
                    stack.extend(prog.nodes[j].args)
    return False


def _padded_sequence_input_layer(prog: Program, preset: str, mode: str = "explain") -> bool:
    """F9: a zero-padded model input right before a linear layer on a 3-d input (torch folds it with a view), in a
    preset whose input rule is flat or z-box."""
    if preset not in ("epsilon_plus_flat", "epsilon_gamma_box"):
        return False
    return any(n.op == "linear" and prog.nodes[n.args[0]].op == "pad" and len(prog.nodes[n.args[0]].shape) == 2
               and is_model_input(prog, n.args[0]) for n in prog.nodes)


def _biased_linear_on_noncontiguous_input(prog: Program) -> bool:
    """A ``linear`` with bias on a non-contiguous 3-d activation: ``F.linear`` runs matmul + add, not addmm."""
    lin = [n for n in prog.nodes if n.op == "linear" and n.attrs["bias"] and len(prog.nodes[n.args[0]].shape) == 2]
    if not lin:
        return False
    vals = forward(prog, materialize(prog), make_inputs(prog))
    return any(not vals[n.args[0]].is_contiguous() for n in lin)


def _frozen_unfused_linear_bias(prog: Program, preset: str, mode: str = "explain") -> bool:
    """F10: a frozen bias of ``F.linear`` on a non-contiguous 3-d input (matmul + add instead of addmm)."""
    if mode != "frozen":
        return False
    return _biased_linear_on_noncontiguous_input(prog)


# the check that caught each finding first (benchmarks/fuzz.py reports it)
FINDING_CATEGORY = {"F1": "reference", "F2": "reference, conservation (ledger)",
                    "F3": "reference, conservation (ledger)", "F4": "crash", "F5": "reference",
                    "F6": "conservation (ledger)", "F7": "reference, conservation (ledger)", "F8": "reference",
                    "F9": "reference, conservation (ledger)", "F10": "reference, conservation (ledger)"}
OPEN_FINDINGS = {"F8": _frozen_shift_before_softmax, "F10": _frozen_unfused_linear_bias}
CRASHES: set[str] = set()  # open findings that crash: the whole case is skipped (F4 was one)
LEDGER_ONLY: set[str] = set()  # open findings where only the ledger's split is not compared (F6 was one)


def open_findings(prog: Program, preset: str, mode: str = "explain") -> set[str]:
    """The open findings this case would hit."""
    return {name for name, pred in OPEN_FINDINGS.items() if pred(prog, preset, mode)}


REFUSED = [0]  # clear refusals so far (counted by benchmarks/fuzz.py)
ILL = [0]  # ill-conditioned cases so far (comparisons with the reference skipped)


def may_refuse(prog: Program, mode: str) -> bool:
    """Whether a clear ActivationUnavailableError is an acceptable answer: the graph holds an untracked constant on
    the data path (a padding's fill value; on a frozen model a frozen bias or addend, a frozen affine norm), which
    autograd may leave no way to recover."""
    if any(n.op == "pad" for n in prog.nodes):  # autograd never records the fill value, even in explain mode
        return True
    return mode == "frozen" and any(
        n.op == "add_param" or (n.op in ("linear", "conv2d") and n.attrs["bias"])
        or (n.op in ("batchnorm", "layer_norm") and n.attrs["affine"]) for n in prog.nodes)


def _explain(model, xs, targets, preset, mode="explain", **kw):
    """``explain`` on the module (parameters require grad during its forward), or, ``mode="frozen"``, the
    module's forward with every parameter frozen and ``propagate`` on its output (autograd then keeps fewer
    activations: the Promise System recovers them)."""
    target = tuple(targets) if len(targets) > 1 else targets[0]
    if mode == "explain":
        return dynamiclrp.explain(model, tuple(xs), target=target, preset=preset, output=lambda raw: raw, **kw)
    for p in model.parameters():
        p.requires_grad_(False)
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    return dynamiclrp.propagate(model(*xs), target=target, wrt=xs, preset=preset, **kw)


def _close(got, want, rtol: float, floor: float = 0.0) -> tuple[bool, float]:
    """Whether tensors (or lists of tensors) agree to ``rtol`` of the largest magnitude of ``want`` plus an absolute
    ``floor``; the error relative to that magnitude."""
    got, want = ([got], [want]) if isinstance(want, torch.Tensor) else (got, want)
    scale = max((float(w.abs().max()) for w in want if w.numel()), default=0.0)
    err = max((float((g - w).abs().max()) for g, w in zip(got, want) if w.numel()), default=0.0)
    return err <= rtol * scale + floor + 1e-300, err / scale if scale else err


def rounding_floor(ref) -> float:
    """An absolute tolerance for relevance that cancels on the way (copies of an element whose relevances sum to
    ~0, a normalised constant): float64 rounding is relative to the largest relevance met anywhere in the
    propagation, not to the (small) result. ``FLOOR_RTOL`` of that magnitude."""
    return FLOOR_RTOL * max((float(r.abs().max()) for r in ref.relevance if r is not None and r.numel()), default=0.0)


def check(prog: Program, preset: str = "epsilon", exact: bool = False, compare: bool = True,
          mode: str = "explain") -> list[tuple[str, str]]:
    """Run every check on one program; return the failures as (category, message)."""
    failures: list[tuple[str, str]] = []
    params = materialize(prog)
    model = FuzzModel(prog, params)
    xs = make_inputs(prog)
    targets = make_targets(prog, prog.input_seed + 1)
    findings = open_findings(prog, preset, mode)
    if findings & CRASHES:
        return []
    try:
        att = _explain(model, xs, targets, preset, mode)
    except ActivationUnavailableError as err:
        if may_refuse(prog, mode):
            REFUSED[0] += 1
            return []
        return [("crash", f"{type(err).__name__}: {err}")]
    except Exception as err:  # noqa: BLE001 -- a crash is a finding
        return [("crash", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-3)}")]
    rs = att.inputs
    if len(rs) != len(xs) or any(r.shape != x.shape or r.dtype != torch.float64 or not bool(torch.isfinite(r).all())
                                 for r, x in zip(rs, xs)):
        return [("crash", f"bad relevance: {[(tuple(r.shape), r.dtype, bool(torch.isfinite(r).all())) for r in rs]}")]

    # 4. the reference
    ref = reference_lrp(prog, xs, targets, preset, params, frozen=mode == "frozen")
    for k, (s, s_ref) in enumerate(zip(att.outputs, ref.seeds)):
        # the reference's forward runs without autograd: torch may pick another kernel (1 ulp apart)
        if not torch.allclose(s, s_ref, rtol=1e-13, atol=0.0):
            failures.append(("seed", f"output {k}: seed {s.tolist()} != {s_ref.tolist()}"))
    if ref.condition < ILL_CONDITIONED:
        ILL[0] += 1
        compare = False
    if compare and not findings - LEDGER_ONLY:
        ok, rel = _close(rs, ref.inputs, REF_RTOL, rounding_floor(ref))
        if not ok:
            failures.append(("reference", f"input relevance differs from the reference by {rel:.3g} (relative)"))

    # 2. conservation: the ledger accounts for the seed; parameters and absorption as in the reference
    c = att.conservation()
    scale = float(sum(s.abs().sum() for s in att.outputs)) or 1.0
    gap = c["seed"] - c["inputs"] - c["parameters"] - c["absorbed"]
    if abs(gap) > LEDGER_RTOL * scale:
        failures.append(("conservation", f"ledger does not account for the seed: {c}, gap {gap:.3g}"))
    if compare and not findings:
        if abs(c["parameters"] - ref.to_params) > LEDGER_RTOL * scale:
            failures.append(("conservation", f"to parameters {c['parameters']!r}, reference {ref.to_params!r}"))
        if abs(c["absorbed"] - ref.absorbed) > LEDGER_RTOL * scale:
            failures.append(("conservation", f"absorbed {c['absorbed']!r}, reference {ref.absorbed!r}"))
    if exact:
        ae = _explain(model, xs, targets, "epsilon", mode, rules=EXACT_RULES)
        got, want = sum(r.flatten(1).sum(1) for r in ae.inputs), sum(s.sum(1) for s in ae.outputs)
        if not torch.allclose(got, want, rtol=EXACT_RTOL, atol=1e-9 * scale):
            failures.append(("conservation", f"rows not conserved (ε → 0, no bias): {got.tolist()} vs "
                                             f"{want.tolist()}"))

    # 4b. the relevance of every intermediate activation (the same forward, propagate with wrt; in frozen mode the
    # model's parameters are still frozen from the run above)
    if compare and not findings:
        failures += _check_intermediates(prog, model, xs, targets, preset, ref)

    # 3. batch rows are independent: change the last row's inputs and targets
    xs2 = [x.clone() for x in xs]
    for x2, other in zip(xs2, make_inputs(prog, prog.input_seed + 2)):
        x2[-1] = other[-1]
    targets2 = [t[:-1] + [(t[-1] + 1) % prog.nodes[o].shape[-1]] for t, o in zip(targets, prog.outputs)]
    att2 = _explain(model, xs2, targets2, preset, mode)
    for row in range(prog.batch - 1):
        ok, rel = _close([r[row] for r in att2.inputs], [r[row] for r in rs], BATCH_RTOL, rounding_floor(ref))
        if not ok:
            failures.append(("batch", f"row {row} changed by {rel:.3g} (relative) when the last row changed"))
    return failures


def _check_intermediates(prog, model, xs, targets, preset, ref) -> list[tuple[str, str]]:
    """Relevance at every live activation (not only the inputs) equals the reference's: catches errors that a
    later op would hide. The parameters' ``requires_grad`` flags as they are (all set: explain; all clear:
    frozen)."""
    live = live_consumers(prog)
    nodes = [i for i in range(len(prog.inputs), len(prog.nodes)) if live[i] or i in prog.outputs]
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    with torch.enable_grad():
        vals = model.activations(*xs)
    outs = [vals[o] for o in prog.outputs]
    target = tuple(targets) if len(outs) > 1 else targets[0]
    try:
        att = dynamiclrp.propagate(outs if len(outs) > 1 else outs[0], target=target, wrt=[vals[i] for i in nodes],
                                   preset=preset)
    except ActivationUnavailableError as err:  # the main run was not refused: neither may this one be
        return [("crash", f"intermediates: {type(err).__name__}: {err}")]
    want = [ref.relevance[i] if ref.relevance[i] is not None else torch.zeros_like(vals[i]) for i in nodes]
    ok, rel = _close(att.inputs, want, REF_RTOL, rounding_floor(ref))
    if ok:
        return []
    worst = max(range(len(nodes)), key=lambda k: float((att.inputs[k] - want[k]).abs().max()))
    return [("reference", f"relevance at %{nodes[worst]} ({prog.nodes[nodes[worst]].op}) differs from the reference "
                          f"by {rel:.3g} (relative to the largest)")]


def assert_ok(prog: Program, preset: str = "epsilon", exact: bool = False, mode: str = "explain") -> None:
    failures = check(prog, preset, exact, mode=mode)
    assert not failures, f"{prog!r}\npreset={preset}\n" + "\n".join(f"[{c}] {m}" for c, m in failures)


# ----------------------------------------------------------------------------------------------------------
# the fuzz tests (fixed seed: derandomize)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(programs())
def test_fuzz_epsilon(prog):
    assert_ok(prog, "epsilon")


OTHER_PRESETS = [p for p in PRESETS if p != "epsilon"]


@settings(max_examples=120, deadline=None, derandomize=True, database=None)
@given(programs(), st.sampled_from(OTHER_PRESETS))
def test_fuzz_presets(prog, preset):
    assert_ok(prog, preset)


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(programs(ops=NO_BIAS_OPS, biases=False))
def test_fuzz_exact_conservation(prog):
    assert_ok(prog, "epsilon", exact=True)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(programs(), st.sampled_from(list(PRESETS)))
def test_fuzz_frozen(prog, preset):
    """Frozen parameters and ``propagate``: autograd keeps fewer activations, the Promise System recovers them."""
    assert_ok(prog, preset, mode="frozen")


GRADIENT_FORM_PRESETS = ["epsilon", "attnlrp", "cp_lrp"]  # presets whose rules have a gradient form
FORM_RTOL = 1e-9  # the gradient form against node by node: ratios carried instead of relevance, other rounding
# attnlrp with its ε of 1e-12 made 1e-30 on both sides: the gradient form computes the ε → 0 limit, 1e-12 / |z| from
# ε = 1e-12 (documented in dynamiclrp.gradient_form), which is not what this test compares
LIMIT_RULES = {"attnlrp": {"linear": Epsilon(1e-30), "sum": Epsilon(1e-30), "product": Uniform(1e-30),
                           "norm": LinearisedNorm(1e-30)},
               "cp_lrp": {"linear": Epsilon(1e-30), "sum": Epsilon(1e-30), "product": Constant(1e-30),
                          "attention": Constant(1e-30), "norm": LinearisedNorm(1e-30)}}
# the reference's conditioning (which denominators are mostly cancellation) for a preset it does not implement
CONDITIONING = {"cp_lrp": "attnlrp"}


@settings(max_examples=120, deadline=None, derandomize=True, database=None)
@given(programs(), st.sampled_from(GRADIENT_FORM_PRESETS), st.sampled_from(["explain", "frozen"]))
def test_fuzz_gradient_form(prog, preset, mode):
    """The gradient form (``ledger=False``: one autograd pass with hooks) gives the node-by-node relevance on
    random programs, where it is used; where it is not (a rule without a form, a ratio that cannot carry relevance
    at a zero value), the run falls back and gives it exactly."""
    if open_findings(prog, preset, mode) & CRASHES:
        return
    params = materialize(prog)
    model = FuzzModel(prog, params)
    xs, targets = make_inputs(prog), make_targets(prog, prog.input_seed + 1)
    kw = {"rules": LIMIT_RULES[preset]} if preset in LIMIT_RULES else {}
    try:
        ref = _explain(model, xs, targets, preset, mode, **kw)
    except ActivationUnavailableError:
        assert may_refuse(prog, mode), f"{prog!r}\npreset={preset}: node by node refused"
        return
    got = _explain(model, xs, targets, preset, mode, ledger=False, **kw)
    # where a denominator is mostly cancellation, the two orders of rounding part: the cases the reference
    # comparison leaves out too
    conditioning = CONDITIONING.get(preset, preset)
    if reference_lrp(prog, xs, targets, conditioning, params, frozen=mode == "frozen").condition < ILL_CONDITIONED:
        return
    scale = max((float(r.abs().max()) for r in ref.inputs if r.numel()), default=0.0)
    ok, rel = _close(got.inputs, ref.inputs, FORM_RTOL, FLOOR_RTOL * scale)
    assert ok, f"{prog!r}\npreset={preset} mode={mode} gradient_form={got.stats.gradient_form}: differs by {rel:.3g}"


# ----------------------------------------------------------------------------------------------------------
# the harness itself


def test_reference_is_not_trivially_equal():
    """The comparison can fail: a reference with another ε disagrees with dynamiclrp's epsilon preset."""
    prog = Program([Node("input", shape=(4,)), Node("linear", (0,), {"out": 3, "bias": True}, (3,)),
                    Node("relu", (1,), {}, (3,)), Node("linear", (2,), {"out": 2, "bias": True}, (2,))],
                   outputs=[3], batch=2, param_seed=1, input_seed=2)
    assert not check(prog, "epsilon")
    xs, targets = make_inputs(prog), make_targets(prog, prog.input_seed + 1)
    att = _explain(FuzzModel(prog), xs, targets, "epsilon")
    PRESETS["_other"] = {**PRESETS["epsilon"], "dense": ("eps", 1e-2), "input_dense": ("eps", 1e-2)}
    try:
        ref = reference_lrp(prog, xs, targets, "_other")
    finally:
        del PRESETS["_other"]
    assert not _close(att.inputs, ref.inputs, REF_RTOL)[0]


def test_every_op_is_generated():
    """The strategy reaches every op of the IR (so the fuzz tests cover them)."""
    seen: set[str] = set()

    @settings(max_examples=150, deadline=None, derandomize=True, database=None)
    @given(programs())
    def collect(prog):
        seen.update(prog.ops())

    collect()
    assert set(OP_NAMES) <= seen, set(OP_NAMES) - seen


# ----------------------------------------------------------------------------------------------------------
# regression tests of the findings (results/fuzz_findings.md)


def _failures(prog, preset, mode="explain"):
    """``check`` with every comparison forced (open findings are not skipped here)."""
    saved = dict(OPEN_FINDINGS)
    OPEN_FINDINGS.clear()
    try:
        return check(prog, preset, mode=mode)
    finally:
        OPEN_FINDINGS.update(saved)


F1_PROGRAM = Program([Node("input", shape=(3,)), Node("linear", (0,), {"out": 2, "bias": False}, (2,))],
                     outputs=[1], batch=2, param_seed=1, input_seed=2)
F2_PROGRAM = Program([Node("input", shape=(3, 2)), Node("permute", (0,), {}, (2, 3)),
                      Node("linear", (1,), {"out": 2, "bias": True}, (2, 2)),
                      Node("reshape", (2,), {"to": (-1,)}, (4,)),
                      Node("linear", (3,), {"out": 2, "bias": False}, (2,))],
                     outputs=[4], batch=2, param_seed=1, input_seed=2)


@pytest.mark.parametrize("preset", ["epsilon_plus", "epsilon_alpha2_beta1"])
def test_finding_dense_input_layer_takes_the_dense_rule(preset):
    """F1 (fixed in ff2964b): a dense layer on the model input keeps the dense rule where the preset has no input
    rule."""
    assert _dense_on_input(F1_PROGRAM, preset)
    assert not _failures(F1_PROGRAM, preset)


def test_finding_dense_input_layer_other_presets():
    """F1's program is right where the preset has an input rule or none differs."""
    for preset in ("epsilon", "epsilon_plus_flat", "epsilon_gamma_box", "attnlrp"):
        assert not _failures(F1_PROGRAM, preset), preset


@pytest.mark.parametrize("preset", ["epsilon", "epsilon_gamma_box", "attnlrp"])
def test_finding_noncontiguous_linear_bias_in_denominator(preset):
    """F2 (fixed in ff2964b): F.linear's bias on a non-contiguous input enters the layer's denominator."""
    assert _noncontiguous_linear_bias(F2_PROGRAM, preset)
    assert not _failures(F2_PROGRAM, preset)


def test_finding_contiguous_linear_bias_is_right():
    """F2's program without the permute (contiguous input: addmm) is right."""
    prog = Program([Node("input", shape=(2, 3)), Node("linear", (0,), {"out": 2, "bias": True}, (2, 2)),
                    Node("reshape", (1,), {"to": (-1,)}, (4,)),
                    Node("linear", (2,), {"out": 2, "bias": False}, (2,))],
                   outputs=[3], batch=2, param_seed=1, input_seed=2)
    assert not _noncontiguous_linear_bias(prog, "epsilon")
    for preset in ("epsilon", "epsilon_gamma_box", "attnlrp"):
        assert not _failures(prog, preset), preset


def _lin(a, out, bias=False):
    return Node("linear", (a,), {"out": out, "bias": bias}, (out,))


F3_PROGRAM = Program([Node("input", shape=(3,)), _lin(0, 2, bias=True)], outputs=[1], batch=2, param_seed=1,
                     input_seed=2)
F4_PROGRAM = Program([Node("input", shape=(3,)), _lin(0, 2), _lin(1, 2)], outputs=[1, 2], batch=2, param_seed=1,
                     input_seed=2)
F5_PROGRAM = Program([Node("input", shape=(3,)), _lin(0, 3), Node("batchnorm", (1,), {"affine": True}, (3,)),
                      Node("mul", (2, 2), {}, (3,)), _lin(3, 2)], outputs=[4], batch=2, param_seed=1, input_seed=2)
F6_PROGRAM = Program([Node("input", shape=(3,)), Node("add_param", (0,), {"pshape": (3,)}, (3,)),
                      Node("mul", (1, 1), {}, (3,)), _lin(2, 2)], outputs=[3], batch=2, param_seed=1, input_seed=2)


@pytest.mark.parametrize("preset", ["epsilon", "epsilon_gamma_box", "epsilon_plus_flat"])
def test_finding_frozen_bias_in_denominator(preset):
    """F3 (fixed in 7d0abe8): a frozen bias enters the layer's denominator, as a tracked one does."""
    assert _frozen_bias(F3_PROGRAM, preset, "frozen")
    assert not _failures(F3_PROGRAM, preset, "frozen")


def test_finding_output_feeding_output_frozen():
    """F4 (fixed in 7d0abe8): an explained output that feeds another is an Arg Node (no KeyError)."""
    assert _output_feeds_output(F4_PROGRAM, "epsilon", "frozen")
    assert not _failures(F4_PROGRAM, "epsilon", "frozen")


def test_finding_frozen_affine_batch_norm_is_merged():
    """F5 (fixed in 7d0abe8): a frozen affine batch norm is merged (β from its saved output) or the run raises."""
    assert _frozen_affine_batch_norm(F5_PROGRAM, "epsilon", "frozen")
    assert not _failures(F5_PROGRAM, "epsilon", "frozen")


def test_finding_frozen_addend_share_in_ledger():
    """F6 (fixed in 7d0abe8): an untracked addend's share is booked as given to parameters/constants."""
    assert _frozen_addend(F6_PROGRAM, "epsilon", "frozen")
    assert not _failures(F6_PROGRAM, "epsilon", "frozen")


@pytest.mark.parametrize("prog", [F3_PROGRAM, F4_PROGRAM, F5_PROGRAM, F6_PROGRAM], ids=["F3", "F4", "F5", "F6"])
def test_findings_frozen_programs_are_right_with_explain(prog):
    """The programs of F3-F6 are right when the parameters require grad (explain): the findings are specific to
    frozen models."""
    for preset in ("epsilon", "epsilon_gamma_box", "epsilon_plus_flat", "attnlrp"):
        assert not _failures(prog, preset), preset


def test_finding_f6_relevance_itself_is_right():
    """F6 is about the ledger only: the input relevance of the frozen run equals the reference."""
    xs, targets = make_inputs(F6_PROGRAM), make_targets(F6_PROGRAM, F6_PROGRAM.input_seed + 1)
    att = _explain(FuzzModel(F6_PROGRAM), xs, targets, "epsilon", "frozen")
    ref = reference_lrp(F6_PROGRAM, xs, targets, "epsilon")
    assert _close(att.inputs, ref.inputs, REF_RTOL)[0]


F2B_PROGRAM = Program([Node("input", shape=(3,)), _lin(0, 2), Node("add_param", (1,), {"pshape": (2,)}, (2,)),
                       _lin(2, 2)], outputs=[3], batch=2, param_seed=1, input_seed=2)
F7_PROGRAM = Program([Node("input", shape=(3,)), _lin(0, 2), Node("add_param", (1,), {"pshape": (2,)}, (2,)),
                      Node("tanh", (1,), {}, (2,)), Node("add", (2, 3), {"sign": 1}, (2,)), _lin(4, 2)],
                     outputs=[5], batch=2, param_seed=1, input_seed=2)


@pytest.mark.parametrize("preset", ["epsilon", "epsilon_gamma_box", "attnlrp"])
def test_finding_separate_bias_in_denominator(preset):
    """F2's fix: ``x @ W.T + b`` written out is a linear layer with bias (bias in the denominator)."""
    assert _noncontiguous_linear_bias(F2B_PROGRAM, preset) and not _shared_separate_bias(F2B_PROGRAM, preset)
    assert not _failures(F2B_PROGRAM, preset)


@pytest.mark.parametrize("preset", ["epsilon", "attnlrp"])
def test_finding_shared_separate_bias(preset):
    """F7 (fixed in 7d0abe8): an mm output used elsewhere is not fused with an addend."""
    assert _shared_separate_bias(F7_PROGRAM, preset)
    assert not _failures(F7_PROGRAM, preset)


F8_PROGRAM = Program([Node("input", shape=(3,)), _lin(0, 3), Node("add_param", (1,), {"pshape": (1,)}, (3,)),
                      Node("softmax", (2,), {"dim": 1}, (3,)), _lin(3, 2)], outputs=[4], batch=2, param_seed=1,
                     input_seed=2)


F8C_PROGRAM = Program([Node("input", shape=(2, 2)), Node("linear", (0,), {"out": 2, "bias": False}, (2, 2)),
                       Node("add_param", (1,), {"pshape": (1, 2)}, (2, 2)), Node("add", (0, 2), {"sign": 1}, (2, 2)),
                       Node("softmax", (3,), {"dim": 1}, (2, 2)), Node("reshape", (4,), {"to": (-1,)}, (4,)),
                       _lin(5, 2)], outputs=[6], batch=2, param_seed=0, input_seed=0)
F8B_PROGRAM = Program([Node("input", shape=(1, 3, 3)),
                       Node("conv2d", (0,), {"out": 1, "k": 1, "stride": 1, "pad": 0, "dilation": 1, "groups": 1,
                                                 "bias": True}, (1, 3, 3)),
                       Node("softmax", (1,), {"dim": 2}, (1, 3, 3)), Node("reshape", (2,), {"to": (-1,)}, (9,)),
                       _lin(3, 2)], outputs=[4], batch=2, param_seed=0, input_seed=0)


@pytest.mark.xfail(strict=True, reason="F8: softmax's mask check (log s - x constant per row) certifies a frozen "
                                       "constant shift as a mask; the addition then takes the replay with the "
                                       "constant as zero as its true output (documented blind spot, 846206c)")
@pytest.mark.parametrize("prog", [F8_PROGRAM, F8C_PROGRAM], ids=["addend", "through-add"])
def test_finding_frozen_shift_before_softmax(prog):
    assert _frozen_shift_before_softmax(prog, "epsilon", "frozen")
    assert not _failures(prog, "epsilon", "frozen")


def test_finding_frozen_bias_before_softmax_is_refused():
    """F8's conv-bias case (fixed in 846206c): a frozen layer bias right before a softmax raises a clear error
    instead of being read off the certified replay as zero; with the bias tracked (explain) it is right."""
    xs, targets = make_inputs(F8B_PROGRAM), make_targets(F8B_PROGRAM, F8B_PROGRAM.input_seed + 1)
    with pytest.raises(ActivationUnavailableError):
        _explain(FuzzModel(F8B_PROGRAM), xs, targets, "epsilon", "frozen")
    assert not _failures(F8B_PROGRAM, "epsilon")


def test_finding_f8_position_dependent_bias_is_refused():
    """F8's program with a bias that varies along the softmax: a clear error, as documented."""
    prog = Program([Node("input", shape=(3,)), _lin(0, 3), Node("add_param", (1,), {"pshape": (3,)}, (3,)),
                    Node("softmax", (2,), {"dim": 1}, (3,)), _lin(3, 2)], outputs=[4], batch=2, param_seed=1,
                   input_seed=2)
    with pytest.raises(ActivationUnavailableError, match="not a plain mask"):
        _explain(FuzzModel(prog), make_inputs(prog), make_targets(prog, 3), "epsilon", "frozen")


def test_ill_conditioned_cases_are_detected():
    """A sum of centred values is zero up to rounding: the reference flags it instead of comparing noise."""
    prog = Program([Node("input", shape=(5,)), Node("reduce", (0,), {"how": "mean", "dim": 1, "keepdim": True}, (1,)),
                    Node("add", (0, 1), {"sign": -1}, (5,)),
                    Node("reduce", (2,), {"how": "sum", "dim": 1, "keepdim": True}, (1,)), _lin(3, 2)],
                   outputs=[4], batch=2, param_seed=1, input_seed=2)
    xs, targets = make_inputs(prog), make_targets(prog, 3)
    assert reference_lrp(prog, xs, targets, "epsilon").condition < ILL_CONDITIONED
    assert reference_lrp(F1_PROGRAM, make_inputs(F1_PROGRAM), make_targets(F1_PROGRAM, 3)).condition > 1e-3


# ----------------------------------------------------------------------------------------------------------
# the reference's convolution against explicit loops (the im2col bookkeeping of conv_rule, independently)


def _conv_rule_loops(spec, x, W, b, R, stride, pad, dil, groups):
    """Textbook LRP for one convolution, one output element and one input element at a time."""
    kind, eps = spec[0], spec[-1]
    _, C, H, Wd = x.shape
    O, cg, k, _ = W.shape
    og = O // groups
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for o in range(O):
            g = o // og
            for oh in range(R.shape[2]):
                for ow in range(R.shape[3]):
                    terms = []  # (input position, x_i, w_ij)
                    for c in range(cg):
                        for kh in range(k):
                            for kw in range(k):
                                ih, iw = oh * stride - pad + kh * dil, ow * stride - pad + kw * dil
                                if 0 <= ih < H and 0 <= iw < Wd:
                                    ci = g * cg + c
                                    terms.append(((n, ci, ih, iw), float(x[n, ci, ih, iw]), float(W[o, c, kh, kw])))
                    bias = 0.0 if b is None else float(b[o])
                    r = float(R[n, o, oh, ow])
                    z = sum(xi * wi for _, xi, wi in terms) + bias

                    def st_(v):
                        return v + (eps if v >= 0 else -eps)

                    for pos, xi, wi in terms:
                        if kind == "eps":
                            share = xi * wi / st_(z)
                        elif kind == "zplus":
                            zp = sum(max(a * w_, 0.0) for _, a, w_ in terms) + max(bias, 0.0)
                            share = max(xi * wi, 0.0) / st_(zp)
                        elif kind == "alphabeta":
                            al, be = spec[1], spec[2]
                            zp = sum(max(a * w_, 0.0) for _, a, w_ in terms) + max(bias, 0.0)
                            zn = sum(min(a * w_, 0.0) for _, a, w_ in terms) + min(bias, 0.0)
                            share = al * max(xi * wi, 0.0) / st_(zp) - be * min(xi * wi, 0.0) / st_(zn)
                        elif kind == "gamma":
                            gm = spec[1]
                            if z > 0:
                                cterm = [a * w_ + gm * max(a * w_, 0.0) for _, a, w_ in terms]
                                den = sum(cterm) + bias + gm * max(bias, 0.0)
                                share = (xi * wi + gm * max(xi * wi, 0.0)) / st_(den)
                            elif z < 0:
                                cterm = [a * w_ + gm * min(a * w_, 0.0) for _, a, w_ in terms]
                                den = sum(cterm) + bias + gm * min(bias, 0.0)
                                share = (xi * wi + gm * min(xi * wi, 0.0)) / st_(den)
                            else:
                                share = 0.0
                        elif kind == "zbox":
                            lo, hi = spec[1], spec[2]
                            den = sum(a * w_ - lo * max(w_, 0.0) - hi * min(w_, 0.0) for _, a, w_ in terms)
                            share = (xi * wi - lo * max(wi, 0.0) - hi * min(wi, 0.0)) / st_(den)
                        elif kind == "flat":
                            share = 1.0 / st_(float(len(terms)))
                        else:
                            raise ValueError(kind)
                        out[pos] += share * r
    return out


@pytest.mark.parametrize("spec", [("eps", 1e-6), ("zplus", 1e-6), ("alphabeta", 2.0, 1.0, 1e-6),
                                  ("gamma", 0.25, 1e-6), ("zbox", -3.0, 3.0, 1e-6), ("flat", 1e-6)],
                         ids=lambda s: s[0])
@pytest.mark.parametrize("geo", [(1, 0, 1, 1), (2, 1, 1, 1), (1, 1, 2, 1), (1, 1, 1, 2), (2, 1, 2, 2)],
                         ids=["plain", "stride-pad", "dilation", "groups", "all"])
def test_reference_conv_rule_matches_explicit_loops(spec, geo):
    from reference_lrp import conv_rule

    stride, pad, dil, groups = geo
    g = torch.Generator().manual_seed(hash(geo) % 1000)
    x = torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64)
    W = torch.randn(2, 2 // groups, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(2, generator=g, dtype=torch.float64)
    z = torch.nn.functional.conv2d(x, W, b, stride, pad, dil, groups)
    R = torch.randn(z.shape, generator=g, dtype=torch.float64)
    got = conv_rule(spec, x, W, b, R, stride, pad, dil, groups)
    if spec[0] == "flat":
        b = None  # the flat rule ignores the bias
    want = _conv_rule_loops(spec, x, W, b, R, stride, pad, dil, groups)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


F9_PROGRAM = Program([Node("input", shape=(2, 3)), Node("pad", (0,), {"left": 1, "right": 1}, (2, 5)),
                      Node("linear", (1,), {"out": 3, "bias": False}, (2, 3)),
                      Node("reshape", (2,), {"to": (-1,)}, (6,)), _lin(3, 2)], outputs=[4], batch=2, param_seed=1,
                     input_seed=2)


@pytest.mark.parametrize("preset", ["epsilon_plus_flat", "epsilon_gamma_box"])
def test_finding_padded_sequence_input_layer(preset):
    """F9 (fixed in 109cbbc): the padding is folded into the input layer also through the view of a 3-d linear."""
    assert _padded_sequence_input_layer(F9_PROGRAM, preset)
    assert not _failures(F9_PROGRAM, preset)



# the program as found had a second input that nothing used, which the harness now refuses (it is not in the
# graph): removed, so that the strict xfail below fails for the finding itself
F10_PROGRAM = Program([Node("input", shape=(3, 3)), Node("permute", (0,), {}, (3, 3)),
                       Node("relu", (1,), {}, (3, 3)), Node("linear", (2,), {"out": 1, "bias": True}, (3, 1)),
                       Node("linear", (2,), {"out": 1, "bias": True}, (3, 1)), Node("matmul", (3, 4), {}, (3, 3)),
                       Node("layer_norm", (0,), {"affine": True}, (3, 3)), Node("scale", (6,), {"c": 0.5}, (3, 3)),
                       Node("mul", (6, 7), {}, (3, 3)), Node("cat", (5, 8), {"dim": 1}, (6, 3)),
                       Node("reshape", (9,), {"to": (-1,)}, (18,)), _lin(10, 2, bias=True)],
                      outputs=[11], batch=2, param_seed=173219, input_seed=351531408)


@pytest.mark.xfail(strict=True, reason="F10 (partly diagnosed): frozen biases of F.linear on a non-contiguous input "
                                       "feeding a product: relevance booked to parameters where none is due")
def test_finding_frozen_unfused_linear_biases():
    assert _frozen_unfused_linear_bias(F10_PROGRAM, "epsilon", "frozen")
    assert not _failures(F10_PROGRAM, "epsilon", "frozen")


def test_finding_f10_still_shows_as_found():
    """The strict xfail above must fail for the finding, not for a crash of the harness: the failures are the
    ledger's split and the reference comparison, and the same program explained with tracked parameters has none."""
    kinds = {kind for kind, _ in _failures(F10_PROGRAM, "epsilon", "frozen")}
    assert kinds and kinds <= {"conservation", "reference"}, kinds
    assert not _failures(F10_PROGRAM, "epsilon", "explain")
