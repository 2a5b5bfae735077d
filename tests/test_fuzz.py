"""Fuzzing: random programs of supported ops (:mod:`fuzz_models`), explained by dynamiclrp and by an independent
reference propagator (:mod:`reference_lrp`), in float64.

Each case checks

1. no crash (``dynamiclrp.explain`` on the compiled module, one or two outputs, one target per row and output);
2. conservation: the ledger accounts for the whole seed (inputs + parameters + absorbed = seed) and what went to
   parameters and what was absorbed equal the reference's figures; on bias-free programs with ε → 0 and
   conservative rules, every row's input relevance sums to the row's seed;
3. batch-row independence: changing the last row's input and targets leaves the other rows' relevance unchanged;
4. equality with the reference: the input relevance agrees to 1e-10 relative (to the largest magnitude) in float64.

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
from dynamiclrp.rules import Epsilon, Pass, Uniform
from fuzz_models import OP_NAMES, FuzzModel, Node, Program, make_input, make_targets, materialize, programs
from reference_lrp import PRESETS, forward, is_model_input, reference_lrp

REF_RTOL = 1e-10  # reference vs dynamiclrp, relative to the largest relevance magnitude
BATCH_RTOL = 1e-10  # other rows after changing one row
LEDGER_RTOL = 1e-9  # the ledger's totals
EXACT_RTOL = 1e-6  # row conservation with ε = 1e-12 (what the stabiliser may absorb near z = 0)
EXACT_RULES = {"linear": Epsilon(1e-12), "sum": Epsilon(1e-12), "product": Uniform(1e-12), "softmax": Pass(),
               "norm": Pass()}
NO_BIAS_OPS = tuple(op for op in OP_NAMES if op != "add_param")


# open findings of the library (results/fuzz_findings.md): predicate on (program, preset); on a match the
# comparison with the reference is skipped (the other checks still run) until the fix lands


def _dense_on_input(prog: Program, preset: str) -> bool:
    """F1: a dense layer on the model input, in a preset without an ``input`` rule."""
    return preset in ("epsilon_plus", "epsilon_alpha2_beta1") and any(
        n.op == "linear" and is_model_input(prog, n.args[0]) for n in prog.nodes)


def _noncontiguous_linear_bias(prog: Program, preset: str) -> bool:
    """F2: ``F.linear`` with bias on a non-contiguous 3-d activation (matmul + add instead of addmm)."""
    lin = [n for n in prog.nodes if n.op == "linear" and n.attrs["bias"] and len(prog.nodes[n.args[0]].shape) == 2]
    if not lin:
        return False
    vals = forward(prog, materialize(prog), make_input(prog))
    return any(not vals[n.args[0]].is_contiguous() for n in lin)


OPEN_FINDINGS = {"F1": _dense_on_input, "F2": _noncontiguous_linear_bias}


def open_finding(prog: Program, preset: str) -> str | None:
    for name, pred in OPEN_FINDINGS.items():
        if pred(prog, preset):
            return name
    return None


def _explain(model, x, targets, preset, **kw):
    target = tuple(targets) if len(targets) > 1 else targets[0]
    return dynamiclrp.explain(model, x, target=target, preset=preset, output=lambda raw: raw, **kw)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> tuple[bool, float]:
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    return err <= rtol * scale + 1e-300, err / scale if scale else err


def check(prog: Program, preset: str = "epsilon", exact: bool = False, compare: bool = True) -> list[tuple[str, str]]:
    """Run every check on one program; return the failures as (category, message)."""
    failures: list[tuple[str, str]] = []
    params = materialize(prog)
    model = FuzzModel(prog, params)
    x = make_input(prog)
    targets = make_targets(prog, prog.input_seed + 1)
    try:
        att = _explain(model, x, targets, preset)
    except Exception as err:  # noqa: BLE001 -- a crash is a finding
        return [("crash", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-3)}")]
    r = att.inputs[0]
    if r.shape != x.shape or r.dtype != torch.float64 or not bool(torch.isfinite(r).all()):
        return [("crash", f"bad relevance: shape {tuple(r.shape)}, dtype {r.dtype}, finite "
                          f"{bool(torch.isfinite(r).all())}")]

    # 4. the reference
    ref = reference_lrp(prog, x, targets, preset, params)
    for k, (s, s_ref) in enumerate(zip(att.outputs, ref.seeds)):
        if not torch.equal(s, s_ref):
            failures.append(("seed", f"output {k}: seed {s.tolist()} != {s_ref.tolist()}"))
    finding = open_finding(prog, preset)
    if compare and finding is None:
        ok, rel = _close(r, ref.input, REF_RTOL)
        if not ok:
            failures.append(("reference", f"input relevance differs from the reference by {rel:.3g} (relative)"))

    # 2. conservation: the ledger accounts for the seed; parameters and absorption as in the reference
    c = att.conservation()
    scale = float(sum(s.abs().sum() for s in att.outputs)) or 1.0
    gap = c["seed"] - c["inputs"] - c["parameters"] - c["absorbed"]
    if abs(gap) > LEDGER_RTOL * scale:
        failures.append(("conservation", f"ledger does not account for the seed: {c}, gap {gap:.3g}"))
    if compare and finding is None:
        if abs(c["parameters"] - ref.to_params) > LEDGER_RTOL * scale:
            failures.append(("conservation", f"to parameters {c['parameters']!r}, reference {ref.to_params!r}"))
        if abs(c["absorbed"] - ref.absorbed) > LEDGER_RTOL * scale:
            failures.append(("conservation", f"absorbed {c['absorbed']!r}, reference {ref.absorbed!r}"))
    if exact:
        ae = _explain(model, x, targets, "epsilon", rules=EXACT_RULES)
        got, want = ae.inputs[0].flatten(1).sum(1), sum(s.sum(1) for s in ae.outputs)
        if not torch.allclose(got, want, rtol=EXACT_RTOL, atol=1e-9 * scale):
            failures.append(("conservation", f"rows not conserved (ε → 0, no bias): {got.tolist()} vs "
                                             f"{want.tolist()}"))

    # 3. batch rows are independent: change the last row's input and targets
    x2 = x.clone()
    x2[-1] = make_input(prog, prog.input_seed + 2)[-1]
    targets2 = [t[:-1] + [(t[-1] + 1) % prog.nodes[o].shape[-1]] for t, o in zip(targets, prog.outputs)]
    att2 = _explain(model, x2, targets2, preset)
    for row in range(prog.batch - 1):
        ok, rel = _close(att2.inputs[0][row], r[row], BATCH_RTOL)
        if not ok:
            failures.append(("batch", f"row {row} changed by {rel:.3g} (relative) when the last row changed"))
    return failures


def assert_ok(prog: Program, preset: str = "epsilon", exact: bool = False) -> None:
    failures = check(prog, preset, exact)
    assert not failures, f"{prog!r}\npreset={preset}\n" + "\n".join(f"[{c}] {m}" for c, m in failures)


# ----------------------------------------------------------------------------------------------------------
# the fuzz tests (fixed seed: derandomize)


@settings(max_examples=110, deadline=None, derandomize=True, database=None)
@given(programs())
def test_fuzz_epsilon(prog):
    assert_ok(prog, "epsilon")


OTHER_PRESETS = [p for p in PRESETS if p != "epsilon"]


@settings(max_examples=70, deadline=None, derandomize=True, database=None)
@given(programs(), st.sampled_from(OTHER_PRESETS))
def test_fuzz_presets(prog, preset):
    assert_ok(prog, preset)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(programs(ops=NO_BIAS_OPS, biases=False))
def test_fuzz_exact_conservation(prog):
    assert_ok(prog, "epsilon", exact=True)


# ----------------------------------------------------------------------------------------------------------
# the harness itself


def test_reference_is_not_trivially_equal():
    """The comparison can fail: a reference with another ε disagrees with dynamiclrp's epsilon preset."""
    prog = Program([Node("input", shape=(4,)), Node("linear", (0,), {"out": 3, "bias": True}, (3,)),
                    Node("relu", (1,), {}, (3,)), Node("linear", (2,), {"out": 2, "bias": True}, (2,))],
                   outputs=[3], batch=2, param_seed=1, input_seed=2)
    assert not check(prog, "epsilon")
    x, targets = make_input(prog), make_targets(prog, prog.input_seed + 1)
    att = _explain(FuzzModel(prog), x, targets, "epsilon")
    PRESETS["_other"] = {**PRESETS["epsilon"], "dense": ("eps", 1e-2), "input_dense": ("eps", 1e-2)}
    try:
        ref = reference_lrp(prog, x, targets, "_other")
    finally:
        del PRESETS["_other"]
    assert not _close(att.inputs[0], ref.input, REF_RTOL)[0]


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


def _failures(prog, preset):
    """``check`` with the reference comparison forced (open findings are not skipped here)."""
    saved = dict(OPEN_FINDINGS)
    OPEN_FINDINGS.clear()
    try:
        return check(prog, preset)
    finally:
        OPEN_FINDINGS.update(saved)


F1_PROGRAM = Program([Node("input", shape=(3,)), Node("linear", (0,), {"out": 2, "bias": False}, (2,))],
                     outputs=[1], batch=2, param_seed=1, input_seed=2)
F2_PROGRAM = Program([Node("input", shape=(3, 2)), Node("permute", (0,), {}, (2, 3)),
                      Node("linear", (1,), {"out": 2, "bias": True}, (2, 2)),
                      Node("reshape", (2,), {"to": (-1,)}, (4,)),
                      Node("linear", (3,), {"out": 2, "bias": False}, (2,))],
                     outputs=[4], batch=2, param_seed=1, input_seed=2)


@pytest.mark.xfail(strict=True, reason="F1: presets.FALLBACK sends the input family to conv, so a dense layer on "
                                       "the model input gets z⁺ / α2β1 in epsilon_plus / epsilon_alpha2_beta1")
@pytest.mark.parametrize("preset", ["epsilon_plus", "epsilon_alpha2_beta1"])
def test_finding_dense_input_layer_takes_the_dense_rule(preset):
    assert _dense_on_input(F1_PROGRAM, preset)
    assert not _failures(F1_PROGRAM, preset)


def test_finding_dense_input_layer_other_presets():
    """F1's program is right where the preset has an input rule or none differs."""
    for preset in ("epsilon", "epsilon_plus_flat", "epsilon_gamma_box", "attnlrp"):
        assert not _failures(F1_PROGRAM, preset), preset


@pytest.mark.xfail(strict=True, reason="F2: F.linear on a non-contiguous 3-d input is matmul + AddBackward0, not "
                                       "addmm; the bias is split off by the sum rule instead of BiasInDenominator")
@pytest.mark.parametrize("preset", ["epsilon", "epsilon_gamma_box", "attnlrp"])
def test_finding_noncontiguous_linear_bias_in_denominator(preset):
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
