"""Vision and audio architectures: every node has an explicit rule, and relevance is conserved; the op entries of
``ops/resample.py``, ``ops/norm.py`` and ``ops/reduce.py``.

Part 1 runs :func:`conservation.check_architecture` (100 % explicit coverage; float64, biases zeroed, ε → 0: the
seed reaches the inputs, the embedding lookups and the parameters exactly) on each architecture of
:mod:`arch_vision` in each attention mode it offers. Where the engine has a known gap the conservation test is a
strict ``xfail`` pinned to the exception it raises, a test states exactly what is lost, and a *variant* (the same
graph with the one offending piece changed, or the paper's rule for it) passes the full check -- so the rest of the
graph, and the new op entries in it, are verified too.

The conservation bound is 1e-5 of the seed at ε = 1e-12. What ε absorbs is ε·Σ R_j / z_j, so it grows where the
ε-rule amplifies relevance (an addition whose terms nearly cancel; a centring norm -- group norm passes relevance
unchanged to an input that may be near zero where its output is not). For the two models where that amplification
is largest (Whisper, the group-norm U-Net) a test checks that the loss is proportional to ε -- nothing but the
stabiliser, so the rules are conservative as ε → 0.

Part 2 checks each new op entry against an explicit float64 formula, in the style of ``test_ops.py``: routing ops
against the op's own vector-Jacobian product, interpolation, overlap-add, dispersions and norms against the ε-rule
written out, norms against the identity rule; operands whose values autograd did not keep are produced by a
preceding dense layer, and outputs are consumed by a sum that needs them, so that replays are exercised.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import conservation
import dynamiclrp
from arch_vision import ARCHITECTURES
from conservation import EXACT_RULES, check_architecture, to_double, zero_biases
from dynamiclrp import ActivationUnavailableError, DynamicLRPError
from dynamiclrp.rules import Epsilon, Pass, Uniform

D = torch.float64
EPS = 1e-6  # the ε of the "epsilon" preset's sum rule
TIGHT = {"sum": Epsilon(1e-12), "linear": Epsilon(1e-12), "product": Uniform(1e-12)}


# ----------------------------------------------------------------------------------------------------------
# Part 1: architectures

KNOWN_GAPS = {
}

CASES = [pytest.param(name, attn, id=f"{name}-{attn}", marks=[KNOWN_GAPS[name]] if name in KNOWN_GAPS else [])
         for name, arch in ARCHITECTURES.items() for attn in arch.attn]
ALL_CASES = [pytest.param(name, attn, id=f"{name}-{attn}")
             for name, arch in ARCHITECTURES.items() for attn in arch.attn]


def _transformers_major() -> int:
    try:
        import transformers
    except ImportError:
        return 0
    return int(transformers.__version__.split(".")[0])


_TF5 = _transformers_major() >= 5

# node types each architecture must contain (the ones this work added rules for, where the architecture has them)
EXPECTED_KINDS = {
    # transformers 4.x resizes SigLIP-2's position grid with anti-aliased bilinear interpolation and pads it with
    # slice assignments; 5.x computes it differently
    "siglip2_vision": set() if _TF5 else {"UpsampleBilinear2DAaBackward0", "CopySlices"},
    "wav2vec2_xls_r": {"WeightNormInterfaceBackward0"},
    "swin_t": {"ConstantPadNdBackward0", "AsStridedBackward1"},
    "convnext_tiny": {"AsStridedBackward1"},
    "upernet_convnext": {"UpsampleBilinear2DBackward0", "AdaptiveAvgPool2DBackward0"},
    "unet_groupnorm": {"NativeGroupNormBackward0", "UpsampleNearest2DBackward0", "UpsampleBilinear2DBackward0",
                       "UpsampleBicubic2DBackward0", "ReplicationPad2DBackward0", "ReflectionPad2DBackward0",
                       "ConstantPadNdBackward0", "PixelShuffleBackward0", "PixelUnshuffleBackward0"},
}


@pytest.mark.parametrize("name,attn", ALL_CASES)
def test_every_node_has_an_explicit_rule(name, attn):
    """100 % explicit coverage, whatever the conservation result (also for the architectures with a known gap)."""
    model, inputs, out = ARCHITECTURES[name].small(attn)
    report = dynamiclrp.coverage(model.double(), to_double(inputs), output=out, run=False)
    assert report.nodes > 80
    assert not report.missing, report.table()
    kinds = {o.kind for o in report.ops}
    assert EXPECTED_KINDS.get(name, set()) <= kinds, EXPECTED_KINDS[name] - kinds


@pytest.mark.parametrize("name,attn", CASES)
def test_architecture_conserves(name, attn):
    model, inputs, out = ARCHITECTURES[name].small(attn)
    report, att = check_architecture(model, inputs, out)
    assert report.node_coverage == 1.0
    assert all(r.shape == x.shape for r, x in zip(att.inputs, _float_inputs(inputs)))


def _float_inputs(inputs):
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    return [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def explain_exact(model, inputs, out, rules=EXACT_RULES):
    """The attribution check_architecture computes, without its assertions (to inspect what is lost)."""
    model = model.double().eval()
    zero_biases(model)
    return dynamiclrp.explain(model, to_double(inputs), preset="epsilon", rules=rules, output=out)


def _absorbing(att, rtol=1e-5):
    scale = abs(att.total_seed())
    return [e for e in att.ledger if abs(float(e.absorbed)) > rtol * scale]


# --- SigLIP-2: the constant key-padding mask of the attention-pooling head


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_siglip2_with_the_sum_rule_for_biases_conserves(attn, monkeypatch):
    """Variant: biases split by the ``sum`` rule (the DynamicLRP paper's choice) instead of the denominator; the
    mask is then one more term of an addition. Everything else -- the resized 2-D position grid (anti-aliased
    bilinear interpolation), the slice assignments that pad it (``CopySlices``, replayed), the masked encoder --
    passes the full check."""
    monkeypatch.setitem(conservation.EXACT_RULES, "bias", Epsilon(1e-12))
    model, inputs, out = ARCHITECTURES["siglip2_vision"].small(attn)
    report, att = check_architecture(model, inputs, out)
    if not _TF5:
        assert {"CopySlices", "UpsampleBilinear2DAaBackward0"} <= set(att.stats.ops)
        assert att.stats.internal_nodes > 0  # the position grid was replayed through CopySlices


# --- Pix2Struct: gelu_new


def _pix2struct_fused_gelu():
    model, inputs, out = ARCHITECTURES["pix2struct_deplot"].small("eager")
    n = 0
    for module in model.modules():
        if type(getattr(module, "act", None)).__name__ == "NewGELUActivation":
            module.act = torch.nn.GELU(approximate="tanh")  # the same function, one fused node
            n += 1
    assert n > 0
    return model, inputs, out


def test_pix2struct_with_fused_gelu_conserves():
    """Variant: gelu_new replaced by ``nn.GELU(approximate="tanh")`` (the same function, one fused node)."""
    model, inputs, out = _pix2struct_fused_gelu()
    report, _ = check_architecture(model, inputs, out)
    assert "NewGELUActivation" not in {type(m).__name__ for m in model.modules()}


def test_pix2struct_hand_written_gelu_absorbs_nothing():
    """The hand-written tanh GELU is recognised as an activation (identity rule): nothing is absorbed."""
    att = explain_exact(*ARCHITECTURES["pix2struct_deplot"].small("eager"))
    assert not _absorbing(att)


# --- Swin: the finite shifted-window mask


def test_swin_conserves_without_the_mask_check(monkeypatch):
    """With the softmax's mask check switched off, Swin passes the full check: the -100 mask is the only gap (the
    Pass rule for softmax needs no logits, so nothing else depends on the check)."""
    import dynamiclrp.ops.attention as attention

    monkeypatch.setattr(attention, "_check_mask", lambda *args: None)
    model, inputs, out = ARCHITECTURES["swin_t"].small()
    report, att = check_architecture(model, inputs, out)
    assert {"ConstantPadNdBackward0", "RollBackward0", "AsStridedBackward1"} <= set(att.stats.ops)


def test_finite_additive_mask_is_a_mask():
    """An untracked additive mask of -100 (as Swin, and many models, write it) masks like -inf: the same
    relevance, masked positions get none."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 4, generator=g, dtype=D).requires_grad_() for _ in range(3))
    out = {}
    for fill in (-100.0, float("-inf")):
        mask = torch.zeros(5, 5, dtype=D)
        mask[:, 3:] = fill
        y = torch.softmax(q @ k.transpose(-1, -2) + mask, -1) @ v
        out[fill] = dynamiclrp.propagate(y, wrt=[q, k, v], preset="attnlrp").inputs
    for a, b in zip(out[-100.0], out[float("-inf")]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_constant_mask_of_baddbmm_with_a_parameter_query():
    """Attention pooling with a learned query and a key-padding mask added by baddbmm: the untracked mask is not
    taken for the layer's bias (it is split off, recovered as a mask under the softmax)."""
    g = torch.Generator().manual_seed(0)
    probe = torch.nn.Parameter(torch.randn(2, 1, 4, generator=g, dtype=D))
    k = torch.randn(2, 5, 4, generator=g, dtype=D, requires_grad=True)
    mask = torch.zeros(2, 1, 5, dtype=D)
    mask[1, :, -1] = float("-inf")
    y = torch.softmax(torch.baddbmm(mask, probe, k.transpose(1, 2)), -1) @ k
    att = dynamiclrp.propagate(y.sum(1), wrt=[k], preset="epsilon")
    assert torch.isfinite(att.inputs[0]).all() and float(att.inputs[0].abs().sum()) > 0
    assert float(att.inputs[0][1, -1].abs().sum()) == 0  # the masked key is attended by nothing: no relevance
    assert float(att.inputs[0][0, -1].abs().sum()) > 0  # the same key in the unmasked row gets some


# --- conditioning: the residual is the stabiliser's


def _absorbed(model, inputs, out, eps):
    rules = {"linear": Epsilon(eps), "sum": Epsilon(eps), "product": Uniform(eps), "softmax": Pass(), "norm": Pass()}
    return explain_exact(model, inputs, out, rules).conservation()["absorbed"]


@pytest.mark.parametrize("name,attn", [("whisper_small", "sdpa"), ("unet_groupnorm", None)])
def test_absorption_is_only_the_stabiliser(name, attn):
    """What is absorbed scales with ε (×1000 from ε = 1e-12 to 1e-9): the rules conserve exactly as ε → 0."""
    a = [_absorbed(*ARCHITECTURES[name].small(attn), eps) for eps in (1e-9, 1e-12)]
    assert a[0] != 0
    assert abs(a[0] / a[1] - 1000) < 10, a


# ----------------------------------------------------------------------------------------------------------
# Part 2: op entries against explicit formulas


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def leaf(*shape):
    return torch.randn(*shape, dtype=D).requires_grad_(True)


def dense(x):
    """x through a square dense layer on the last dimension: an operand the Promise System must recover."""
    n = x.shape[-1]
    w = torch.nn.Parameter(torch.eye(n, dtype=D) + 0.3 * torch.randn(n, n, dtype=D))
    return x @ w


def source(how, *shape):
    x = leaf(*shape)
    return x, (dense(x) if how == "dense" else x)


def stab(z, eps=EPS):
    return z + torch.where(z >= 0, eps, -eps).to(z.dtype)


def rel(y, R, wrt, **kw):
    kw.setdefault("preset", "epsilon")
    return dynamiclrp.propagate(y, target=R, wrt=list(wrt), **kw).inputs


def close(actual, expected):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-9, atol=1e-11)


def vjp(ys, xs, Rs):
    return torch.autograd.grad(ys, xs, Rs, retain_graph=True, allow_unused=True)


def contributions(f, x):
    """``C[j, i] = J[j, i] x_i``: the contribution of input element i to output element j of the linear map f."""
    x = x.detach()
    J = torch.autograd.functional.jacobian(f, x)
    return J.reshape(J.numel() // x.numel(), x.numel()) * x.reshape(1, -1)


def epsilon_ref(f, x, R, eps=EPS):
    """R_i = Σ_j C_ji R_j / stab(z_j) for the linear map f, z_j = Σ_i C_ji."""
    C = contributions(f, x)
    return (C * (R.detach().reshape(-1) / stab(C.sum(1), eps))[:, None]).sum(0).reshape(x.shape)


def kind(y):
    return type(y.grad_fn).__name__


def routed_sum_ref(h, a, R):
    """Expected relevance of ``a`` for ``y = h.sum(-1)`` with ``h = op(a)`` a routing op: the ε-rule of the sum over
    the values of ``h`` (which the engine had to recover), routed back by the op's own vector-Jacobian product."""
    hv = h.detach()
    (g,) = vjp(h, [a], hv * R[..., None] / stab(hv.sum(-1, keepdim=True)))
    return g


# --- interpolation: the ε-rule over the interpolation weights

INTERP = {
    "linear1d": ((2, 3, 5), dict(scale_factor=2, mode="linear"), "UpsampleLinear1DBackward0"),
    "linear1d_corners": ((2, 3, 5), dict(size=7, mode="linear", align_corners=True), "UpsampleLinear1DBackward0"),
    "bilinear_up": ((2, 2, 4, 5), dict(size=(7, 9), mode="bilinear"), "UpsampleBilinear2DBackward0"),
    "bilinear_down_corners": ((2, 2, 5, 6), dict(size=(3, 2), mode="bilinear", align_corners=True),
                              "UpsampleBilinear2DBackward0"),
    "bilinear_scale": ((1, 2, 4, 4), dict(scale_factor=1.5, mode="bilinear"), "UpsampleBilinear2DBackward0"),
    "bilinear_aa_down": ((2, 2, 6, 7), dict(size=(2, 3), mode="bilinear", antialias=True),
                         "UpsampleBilinear2DAaBackward0"),
    "bilinear_aa_up": ((1, 2, 3, 4), dict(size=(5, 6), mode="bilinear", antialias=True),
                       "UpsampleBilinear2DAaBackward0"),
    "bicubic": ((1, 2, 4, 5), dict(scale_factor=2, mode="bicubic"), "UpsampleBicubic2DBackward0"),
    "bicubic_corners": ((1, 2, 4, 5), dict(size=(6, 3), mode="bicubic", align_corners=True),
                        "UpsampleBicubic2DBackward0"),
    "bicubic_aa_down": ((1, 2, 7, 6), dict(size=(3, 3), mode="bicubic", antialias=True),
                        "UpsampleBicubic2DAaBackward0"),
    "trilinear": ((1, 2, 3, 2, 3), dict(scale_factor=2, mode="trilinear"), "UpsampleTrilinear3DBackward0"),
}


@pytest.mark.parametrize("how", ["leaf", "dense"])
@pytest.mark.parametrize("name", list(INTERP))
def test_interpolation_epsilon(name, how):
    shape, kw, node = INTERP[name]
    _, a = source(how, *shape)
    y = F.interpolate(a, **kw)
    assert kind(y) == node
    R = torch.randn(y.shape, dtype=D)
    (ra,) = rel(y, R, [a])
    close(ra, epsilon_ref(lambda t: F.interpolate(t, **kw), a, R))


@pytest.mark.parametrize("name", list(INTERP))
def test_interpolation_conserves(name):
    shape, kw, _ = INTERP[name]
    x = leaf(*shape)
    y = F.interpolate(dense(x), **kw)
    R = torch.randn(y.shape, dtype=D)
    (rx,) = rel(y, R, [x], rules=TIGHT)
    close(rx.sum(), R.sum())


@pytest.mark.parametrize("name", ["bilinear_up", "bilinear_aa_down", "trilinear", "linear1d"])
def test_interpolation_with_the_proportional_rule(name):
    """The paper's preset: |x|-proportional split over the (non-negative) interpolation weights, conservative."""
    shape, kw, _ = INTERP[name]
    x = leaf(*shape)
    y = F.interpolate(x, **kw)
    R = torch.randn(y.shape, dtype=D)
    (rx,) = rel(y, R, [x], preset="paper")
    C = contributions(lambda t: F.interpolate(t, **kw), x).abs()
    expected = (C * (R.reshape(-1) / (C.sum(1) + 1e-11))[:, None]).sum(0).reshape(x.shape)
    close(rx, expected)
    close(rx.sum(), R.sum())


# --- copies: routing (the op's own vector-Jacobian product)

ROUTING = {
    "nearest1d": ((2, 3, 5), lambda x: F.interpolate(x, scale_factor=3, mode="nearest"), "UpsampleNearest1DBackward0"),
    "nearest2d_down": ((1, 2, 6, 7), lambda x: F.interpolate(x, size=(4, 3), mode="nearest"),
                       "UpsampleNearest2DBackward0"),
    "nearest2d_up": ((1, 2, 3, 4), lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
                     "UpsampleNearest2DBackward0"),
    "nearest3d": ((1, 2, 2, 3, 2), lambda x: F.interpolate(x, size=(3, 4, 4), mode="nearest"),
                  "UpsampleNearest3DBackward0"),
    "nearest_exact1d": ((2, 2, 5), lambda x: F.interpolate(x, size=7, mode="nearest-exact"),
                        "UpsampleNearestExact1DBackward0"),
    "nearest_exact2d": ((1, 2, 5, 4), lambda x: F.interpolate(x, size=(3, 7), mode="nearest-exact"),
                        "UpsampleNearestExact2DBackward0"),
    "nearest_exact3d": ((1, 1, 3, 2, 3), lambda x: F.interpolate(x, scale_factor=2, mode="nearest-exact"),
                        "UpsampleNearestExact3DBackward0"),
    "reflect1d": ((2, 3, 5), lambda x: F.pad(x, (2, 1), mode="reflect"), "ReflectionPad1DBackward0"),
    "reflect2d": ((1, 2, 4, 5), lambda x: F.pad(x, (1, 2, 3, 0), mode="reflect"), "ReflectionPad2DBackward0"),
    "reflect3d": ((1, 1, 3, 3, 4), lambda x: F.pad(x, (1, 1, 2, 0, 1, 1), mode="reflect"), "ReflectionPad3DBackward0"),
    "replicate1d": ((2, 3, 4), lambda x: F.pad(x, (3, 1), mode="replicate"), "ReplicationPad1DBackward0"),
    "replicate2d": ((1, 2, 3, 4), lambda x: F.pad(x, (2, 2, 0, 1), mode="replicate"), "ReplicationPad2DBackward0"),
    "replicate3d": ((1, 1, 2, 3, 3), lambda x: F.pad(x, (1, 0, 1, 1, 0, 2), mode="replicate"),
                    "ReplicationPad3DBackward0"),
    "circular2d": ((1, 2, 3, 4), lambda x: F.pad(x, (2, 1, 1, 2), mode="circular"), "CopySlices"),
    "circular1d": ((2, 2, 5), lambda x: F.pad(x, (1, 3), mode="circular"), "CopySlices"),
    "pixel_shuffle": ((1, 8, 2, 3), lambda x: F.pixel_shuffle(x, 2), "PixelShuffleBackward0"),
    "pixel_unshuffle": ((1, 2, 4, 6), lambda x: F.pixel_unshuffle(x, 2), "PixelUnshuffleBackward0"),
    "im2col": ((1, 2, 4, 5), lambda x: F.unfold(x, (2, 3), padding=(0, 1), stride=(2, 1)), "Im2ColBackward0"),
    "im2col_dilated": ((2, 1, 5, 5), lambda x: F.unfold(x, 2, dilation=2), "Im2ColBackward0"),
    "adaptive_max1d": ((2, 3, 7), lambda x: F.adaptive_max_pool1d(x, 3), "SqueezeBackward1"),
    "adaptive_max2d": ((1, 2, 5, 6), lambda x: F.adaptive_max_pool2d(x, (2, 4)), "AdaptiveMaxPool2DBackward0"),
    "adaptive_max3d": ((1, 2, 3, 4, 5), lambda x: F.adaptive_max_pool3d(x, 2), "AdaptiveMaxPool3DBackward0"),
    "amax": ((2, 3, 4), lambda x: x.amax(-1), "AmaxBackward0"),
    "amin_dims_keep": ((2, 3, 4), lambda x: x.amin((0, 2), keepdim=True), "AminBackward0"),
    "min_dim": ((2, 3, 4), lambda x: x.min(1).values, "MinBackward0"),
    "min_all": ((2, 3, 4), lambda x: x.min(), "MinBackward1"),
    "maximum_self": ((2, 3, 4), lambda x: torch.maximum(x, x.flip(-1)), "MaximumBackward0"),
    "minimum_self": ((2, 3, 4), lambda x: torch.minimum(x, x.roll(1, -1)), "MinimumBackward0"),
    "fmax": ((2, 3, 4), lambda x: torch.fmax(x, x.flip(0)), "FmaxBackward0"),
    "fmin": ((2, 3, 4), lambda x: torch.fmin(x, x.roll(1, 1)), "FminBackward0"),
    "maximum_constant": ((2, 3, 4), lambda x: torch.maximum(x, torch.tensor(0.2, dtype=D)), "MaximumBackward0"),
}
# elements taken from a constant (the other operand, zero padding): their relevance goes to no operand
CONSTANT_SHARE = {"maximum_constant", "im2col"}


@pytest.mark.parametrize("name", list(ROUTING))
def test_routing(name):
    shape, op, node = ROUTING[name]
    x = leaf(*shape)
    y = op(x)
    assert kind(y) == node
    R = torch.randn(y.shape, dtype=D)
    (rx,) = rel(y, R, [x])
    (g,) = vjp(y, [x], R)
    close(rx, g)
    if name not in CONSTANT_SHARE:
        close(rx.sum(), R.sum())


@pytest.mark.parametrize("name", [n for n in ROUTING if n != "min_all"])
def test_routing_replayed_for_a_sum(name):
    """A sum after the op needs its output: recovered from what the op saved, or replayed from its operand (which
    a dense layer produced, so that is replayed too)."""
    shape, op, _ = ROUTING[name]
    x = leaf(*shape)
    a = dense(x)
    h = op(a)
    y = h.sum(-1)
    R = torch.randn(y.shape, dtype=D)
    (ra,) = rel(y, R, [a])
    close(ra, routed_sum_ref(h, a, R))


def test_selection_ties_share():
    """maximum / amax with ties: relevance is shared equally, as in the op's backward."""
    x = torch.tensor([[1.0, 3.0, 3.0, -1.0]], dtype=D, requires_grad=True)
    y = x.amax(-1)
    (rx,) = rel(y, torch.tensor([2.0], dtype=D), [x])
    close(rx, torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=D))
    a = torch.tensor([1.0, 2.0, -1.0], dtype=D, requires_grad=True)
    b = torch.tensor([1.0, 0.0, 4.0], dtype=D, requires_grad=True)
    y = torch.maximum(a, b)
    ra, rb = rel(y, torch.tensor([2.0, 3.0, 5.0], dtype=D), [a, b])
    close(ra, torch.tensor([1.0, 3.0, 0.0], dtype=D))
    close(rb, torch.tensor([1.0, 0.0, 5.0], dtype=D))


# --- constant padding: routing; its replay would need the fill value, which autograd does not save

@pytest.mark.parametrize("pad,value", [((1, 2), 0.0), ((1, 0, 2, 1), 3.0), ((-1, 2, 0, -1), 0.0)])
def test_constant_pad_routes(pad, value):
    x = leaf(1, 2, 4, 5)
    y = F.pad(x, pad, value=value)
    assert kind(y) == "ConstantPadNdBackward0"
    R = torch.randn(y.shape, dtype=D)
    (rx,) = rel(y, R, [x])
    (g,) = vjp(y, [x], R)
    close(rx, g)


def test_constant_pad_then_conv():
    """The usual use: zero padding, then a convolution, which saves its (padded) input; the padded zeros get
    nothing from the ε-rule, so relevance is conserved."""
    x = leaf(1, 2, 5, 5)
    w = torch.nn.Parameter(torch.randn(3, 2, 3, 3, dtype=D))
    y = F.conv2d(F.pad(dense(x), (1, 1, 1, 1)), w)
    R = torch.randn(y.shape, dtype=D)
    (rx,) = rel(y, R, [x], rules=TIGHT)
    close(rx.sum(), R.sum())


def test_constant_pad_replay_is_refused():
    """A sum after a constant pad needs the padded values; the fill value is not saved, so rather than assume 0 the
    replay is provisional and the sum refuses it."""
    x = leaf(2, 3, 4)
    y = F.pad(dense(x), (1, 1), value=5.0).sum(-1)
    with pytest.raises(ActivationUnavailableError):
        dynamiclrp.propagate(y, wrt=[x])


# --- CopySlices: copies into a view


def test_slice_assignment_into_empty():
    """SigLIP-2's pattern: ``out = empty(); out[i, :n] = h; out[i, n:] = h[0]`` (the second copy broadcasts), then a
    sum that needs the assembled tensor: replayed through both CopySlices nodes."""
    x = leaf(2, 4, 3)
    h = dense(x)
    out = torch.empty(2, 6, 3, dtype=D)
    out[0, :4] = h[0]
    out[0, 4:] = h[0, 0]
    out[1, :3] = h[1, :3]
    out[1, 3:].copy_(h[1, 1])  # broadcast inside copy_
    assert kind(out) == "CopySlices"
    y = out.sum(-1)
    R = torch.randn(y.shape, dtype=D)
    (rh,) = rel(y, R, [h])
    (g,) = vjp(out, [h], out.detach() * (R / stab(out.detach().sum(-1)))[..., None])
    close(rh, g)


def test_slice_assignment_onto_data():
    """``b[:, 1:3] = s`` on a tensor that is data: overwritten elements of ``b`` get nothing, the rest is routed."""
    b, s = leaf(3, 5), leaf(3, 2)
    z = b * 1.0
    z[:, 1:3] = s
    R = torch.randn(z.shape, dtype=D)
    rb, rs = rel(z, R, [b, s])
    eb = R.clone()
    eb[:, 1:3] = 0
    close(rb, eb)
    close(rs, R[:, 1:3])


def test_slices_of_other_in_place_ops_raise():
    b, s = leaf(3, 5), leaf(3, 2)
    z = b * 1.0
    z[:, 1:3].mul_(s)
    with pytest.raises(DynamicLRPError, match="in-place MulBackward0 on a view"):
        dynamiclrp.propagate(z, target=torch.ones(3, 5, dtype=D), wrt=[b, s])


class _OldCopySlices:
    """A CopySlices node as torch < 2.12 shows it: no ``_wrapped_node`` to read the wrapped op from."""

    def __init__(self, fn):
        self._fn, self._input_metadata, self.next_functions = fn, fn._input_metadata, fn.next_functions

    def __call__(self, *grads):
        return self._fn(*grads)


def _into(how):
    b, s = leaf(3, 5), leaf(3, 2)
    if how == "empty":
        z = torch.empty(3, 5, dtype=D)
        z[:, 1:3] = s
        return z
    z = b * 1.0
    {"copy": lambda v: v.copy_(s), "broadcast": lambda v: v.copy_(s[:1]), "add": lambda v: v.add_(s),
     "mul": lambda v: v.mul_(s), "mul_mask": lambda v: v.mul_((s > 0).to(D))}[how](z[:, 1:3])
    return z


@pytest.mark.parametrize("how,is_copy", [("copy", True), ("broadcast", True), ("empty", True), ("add", False),
                                         ("mul", False), ("mul_mask", False)])
def test_copy_detection_without_wrapped_node(how, is_copy):
    """On a torch that does not expose the wrapped op, a copy is recognised from the node's backward alone."""
    from dynamiclrp.ops.inplace import _wraps_copy

    fn = _into(how).grad_fn
    assert type(fn).__name__ == "CopySlices"
    assert _wraps_copy(fn) == is_copy
    assert _wraps_copy(_OldCopySlices(fn)) == is_copy


# --- fold (col2im): overlap-add, the ε-rule


@pytest.mark.parametrize("how", ["leaf", "dense"])
def test_col2im_epsilon(how):
    _, a = source(how, 2, 2 * 2 * 2, 9)
    kw = dict(output_size=(4, 5), kernel_size=2, padding=(0, 1), stride=(1, 2))
    y = F.fold(a, **kw)
    assert kind(y) == "Col2ImBackward0"
    R = torch.randn(y.shape, dtype=D)
    (ra,) = rel(y, R, [a])
    close(ra, epsilon_ref(lambda t: F.fold(t, **kw), a, R))


# --- dispersions and norms: the sum rule over the non-negative terms


def _dims(dim, x):
    return list(range(x.dim())) if dim is None else [d % x.dim() for d in ([dim] if isinstance(dim, int) else dim)]


def power_sum_ref(t, c, dims, keepdim, R, eps=EPS):
    """R_i = t_i c R / stab(c Σ t) for z = c Σ_{dims} t."""
    z = c * t.sum(dims, keepdim=True)
    Rk = R.reshape(z.shape) if not keepdim else R
    return t * c * Rk / stab(z, eps)


VAR_CASES = {
    "last": dict(dim=-1, keepdim=False, correction=1),
    "two_keep": dict(dim=(0, 2), keepdim=True, correction=0),
    "all": dict(dim=None, keepdim=False, correction=1),
}


@pytest.mark.parametrize("how", ["leaf", "dense"])
@pytest.mark.parametrize("case", list(VAR_CASES))
@pytest.mark.parametrize("op", ["var", "std"])
def test_variance_and_std(op, case, how):
    kw = VAR_CASES[case]
    _, a = source(how, 2, 3, 4)
    y = getattr(torch, op)(a, **kw)
    assert kind(y) == {"var": "VarBackward0", "std": "StdBackward0"}[op]
    R = torch.randn(y.shape, dtype=D)
    (ra,) = rel(y, R, [a])
    av = a.detach()
    dims = _dims(kw["dim"], av)
    t = (av - av.mean(dims, keepdim=True)) ** 2
    n = math.prod(av.shape[d] for d in dims)
    close(ra, power_sum_ref(t, 1.0 / (n - kw["correction"]), dims, kw["keepdim"], R))


@pytest.mark.parametrize("op", ["var_mean", "std_mean"])
def test_var_mean_two_outputs(op):
    x = leaf(3, 5)
    v, m = getattr(torch, op)(x, 1)
    assert kind(v) == {"var_mean": "VarMeanBackward0", "std_mean": "StdMeanBackward0"}[op]
    y = v + 2.0 * m  # both outputs reach the seed
    R = torch.randn(y.shape, dtype=D)
    (rx,) = rel(y, R, [x], rules={"sum": Epsilon(1e-12)})
    xv = x.detach()
    vv, mv = getattr(torch, op)(xv, 1)
    t = (xv - xv.mean(1, keepdim=True)) ** 2
    Rv = vv * R / stab(vv + 2.0 * mv, 1e-12)  # the addition's ε-rule
    Rm = 2.0 * mv * R / stab(vv + 2.0 * mv, 1e-12)
    expected = power_sum_ref(t, 1.0 / 4, [1], False, Rv, 1e-12) + xv / 5 * (Rm / stab(mv, 1e-12))[:, None]
    close(rx, expected)


@pytest.mark.parametrize("how", ["leaf", "dense"])
@pytest.mark.parametrize("p,dim,keepdim", [(2, -1, False), (2, None, False), (1, (0, 2), True), (3, 1, False),
                                           (0.5, -1, True), (-1, -1, False)])
def test_vector_norm(p, dim, keepdim, how):
    _, a = source(how, 2, 3, 4)
    y = torch.linalg.vector_norm(a, p, dim, keepdim)
    assert kind(y) == "LinalgVectorNormBackward0"
    R = torch.randn(y.shape, dtype=D)
    (ra,) = rel(y, R, [a])
    av = a.detach()
    close(ra, power_sum_ref(av.abs() ** p, 1.0, _dims(dim, av), keepdim, R))


def test_tensor_norm_is_gradient_times_input():
    """For p = 2 (``Tensor.norm``) the rule is x ⊙ ∇‖x‖ scaled to the seed (Euler: the norm is 1-homogeneous)."""
    x = leaf(4, 6)
    y = x.norm(dim=-1)
    (rx,) = rel(y, y.detach(), [x], rules={"sum": Epsilon(1e-300)})
    (g,) = vjp(y, [x], torch.ones_like(y))
    close(rx, x.detach() * g)


@pytest.mark.parametrize("p", [math.inf, -math.inf])
def test_max_norms_select(p):
    x = torch.tensor([[1.0, -4.0, 2.0], [3.0, -3.0, 0.5]], dtype=D, requires_grad=True)
    y = torch.linalg.vector_norm(x, p, -1)
    R = torch.tensor([2.0, -1.0], dtype=D)
    (rx,) = rel(y, R, [x])
    if p > 0:
        close(rx, torch.tensor([[0.0, 2.0, 0.0], [-0.5, -0.5, 0.0]], dtype=D))
    else:
        close(rx, torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, -1.0]], dtype=D))


def test_zero_norm_raises():
    x = leaf(2, 3)
    y = torch.linalg.vector_norm(dense(x), 0, -1)
    with pytest.raises(DynamicLRPError, match="0-'norm'"):
        dynamiclrp.propagate(y, wrt=[x])


@pytest.mark.parametrize("op", ["var", "std", "norm2", "norm1"])
def test_dispersions_conserve(op):
    x = leaf(3, 6)
    a = dense(x)
    y = {"var": lambda: a.var(-1), "std": lambda: a.std(-1), "norm2": lambda: a.norm(dim=-1),
         "norm1": lambda: a.norm(p=1, dim=-1)}[op]()
    R = torch.randn(y.shape, dtype=D)
    (rx,) = rel(y, R, [x], rules=TIGHT)
    close(rx.sum(), R.sum())


def test_normalising_by_a_norm_takes_the_norm_rule():
    """``x / x.norm(dim=-1, keepdim=True)`` (CLIP's embedding normalisation): the division recognises the norm as
    its operand's normaliser and passes the relevance to the numerator only (``sum`` family norm node)."""
    x = leaf(3, 5)
    a = dense(x)
    y = a / a.norm(dim=-1, keepdim=True)
    R = torch.randn(y.shape, dtype=D)
    (ra,) = rel(y, R, [a])
    close(ra, R)


# --- as_strided_ (adaptive average pooling of a channels-last tensor)


def test_adaptive_avg_pool_channels_last():
    x = torch.randn(2, 3, 4, 5, dtype=D).to(memory_format=torch.channels_last).requires_grad_(True)
    p = F.adaptive_avg_pool2d(x, 1)
    assert kind(p) == "AsStridedBackward1"
    y = p.flatten(1).sum(-1)  # the sum needs the pooled values: mean replayed, then the re-striding
    R = torch.randn(y.shape, dtype=D)
    (rx,) = rel(y, R, [x])
    m = x.detach().mean((-2, -1))
    r_pooled = m * (R / stab(m.sum(-1)))[:, None]  # the sum's ε-rule, then the mean's
    close(rx, (x.detach() / 20) * (r_pooled / stab(m))[..., None, None])


def test_as_strided_that_moves_elements_is_not_replayed():
    """``as_strided_`` on a transposed view reads the storage in another order: no replay is attempted."""
    x = leaf(2, 4, 4)
    v = dense(x).transpose(1, 2)
    v.as_strided_((2, 4, 4), (16, 4, 1))
    assert kind(v) == "AsStridedBackward1"
    y = v.sum(-1)
    with pytest.raises(ActivationUnavailableError):
        dynamiclrp.propagate(y, wrt=[x])


# --- group norm: identity to the input; an Arg Node


@pytest.mark.parametrize("shape,groups,affine", [((2, 4, 3, 3), 2, True), ((2, 6, 5), 3, False),
                                                 ((1, 4, 2, 2, 2), 4, True), ((2, 4, 3), 1, False)])
def test_group_norm(shape, groups, affine):
    """Relevance passes unchanged to the input (norm family, Pass); a sum after the norm needs its output, which
    the node rebuilds from what it saved (with the bias from the graph when the bias requires grad)."""
    x = leaf(*shape)
    c = shape[1]
    w = torch.nn.Parameter(torch.rand(c, dtype=D) + 0.5) if affine else None
    b = torch.nn.Parameter(torch.randn(c, dtype=D)) if affine else None
    a = dense(x)
    h = F.group_norm(a, groups, w, b)
    assert kind(h) == "NativeGroupNormBackward0"
    R = torch.randn(h.shape, dtype=D)
    (ra,) = rel(h, R, [a])
    close(ra, R)
    y = h.sum(-1)
    R = torch.randn(y.shape, dtype=D)
    ra, *rp = rel(y, R, [a] + [p for p in (w, b) if p is not None])
    hv = h.detach()
    close(ra, hv * (R / stab(hv.sum(-1)))[..., None])
    for r in rp:  # affine parameters receive nothing
        close(r, torch.zeros_like(r))


@pytest.mark.parametrize("bias", ["frozen", "none"])
def test_group_norm_with_untracked_bias_is_not_replayed(bias):
    """An affine group norm whose bias does not require grad (or is None): the graph cannot tell a frozen bias from
    no bias, so the output is not rebuilt (it could lack the bias) -- an error rather than a wrong value."""
    x = leaf(2, 4, 3)
    w = torch.nn.Parameter(torch.ones(4, dtype=D))
    b = torch.full((4,), 0.5, dtype=D) if bias == "frozen" else None
    y = F.group_norm(dense(x), 2, w, b).sum(-1)
    with pytest.raises(ActivationUnavailableError):
        dynamiclrp.propagate(y, wrt=[x])


def test_group_norm_module_output_is_exact():
    """nn.GroupNorm in a model: the output the rule rebuilds equals the module's output."""
    gn = torch.nn.GroupNorm(2, 4).double()
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    x = leaf(2, 4, 3, 3)
    h = gn(dense(x))
    y = h.flatten(1).sum(-1)
    R = torch.randn(y.shape, dtype=D)
    att = dynamiclrp.propagate(y, target=R, wrt=[x], keep_run=True)
    run = att.extra["run"]
    node = run.graph.node_of(h.grad_fn)
    close(run.promises.value(node.id).to(D), h.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused RMS norm node is made by the CUDA kernel")
def test_fused_rms_norm_cuda():
    x = torch.randn(2, 3, 8, dtype=D, device="cuda", requires_grad=True)
    w = torch.nn.Parameter(torch.rand(8, dtype=D, device="cuda") + 0.5)
    h = F.rms_norm(x * 1.0, (8,), w, 1e-6)
    assert kind(h) == "FusedRmsNormBackward0"
    y = h.sum(-1)
    R = torch.randn(y.shape, dtype=D, device="cuda")
    (rx,) = rel(y, R, [x])
    hv = h.detach()
    close(rx, hv * (R / stab(hv.sum(-1)))[..., None])


# --- weight normalisation: a parameter-only computation


@pytest.mark.parametrize("api", ["parametrizations", "old"])
def test_weight_norm_conv(api):
    """A weight-normalised convolution (Wav2Vec2's positional convolution): the conv rule uses the normalised
    weight; relevance asked for the direction ``v`` is the weight's relevance (norm rule), ``g`` gets none."""
    conv = torch.nn.Conv1d(4, 6, 3, padding=1, bias=False).double()
    if api == "old":
        conv = torch.nn.utils.weight_norm(conv, dim=2)
        v, g = conv.weight_v, conv.weight_g
    else:
        conv = torch.nn.utils.parametrizations.weight_norm(conv, dim=2)
        v, g = conv.parametrizations.weight.original1, conv.parametrizations.weight.original0
    x = leaf(2, 4, 5)
    y = conv(x)
    R = torch.randn(y.shape, dtype=D)
    rx, rv, rg = rel(y, R, [x, v, g])
    w = torch._weight_norm(v.detach(), g.detach(), 2)
    close(rx, epsilon_ref(lambda t: F.conv1d(t, w, padding=1), x, R))
    close(rv, epsilon_ref(lambda t: F.conv1d(x.detach(), t, padding=1), w, R))
    close(rg, torch.zeros_like(rg))
    assert "WeightNormInterfaceBackward0" in dynamiclrp.propagate(y, target=R, wrt=[x]).stats.ops


def test_weight_norm_output_is_rebuilt():
    """The normalised weight added to data: the addition needs it, and the node rebuilds it from ``v`` and ``g``."""
    v = torch.nn.Parameter(torch.randn(3, 4, dtype=D))
    g = torch.nn.Parameter(torch.rand(1, 4, dtype=D) + 0.5)
    x = leaf(3, 4)
    w = torch._weight_norm(v, g, 1)
    assert kind(w) == "WeightNormInterfaceBackward0"
    h = dense(x)
    y = (h + w).sum(-1)
    R = torch.randn(y.shape, dtype=D)
    (rv,) = rel(y, R, [v])
    z = (h + w).detach()
    r_add = z * (R / stab(z.sum(-1)))[:, None]  # the sum's ε-rule, then the addition's
    close(rv, w.detach() * r_add / stab(z))


# --- every saved attribute the new entries read exists on real nodes (rows for test_op_table.SAVED)


def _t(*shape):
    return torch.randn(*shape, dtype=D, requires_grad=True)


def _scales(nd):
    return ["scales"] if nd == 1 else ["scales_d", "scales_h", "scales_w"][3 - nd:]


def _interp_row(nd, mode, **kw):
    shape = (1, 2) + (4,) * nd
    names = ["output_size"] + _scales(nd) + ([] if mode.startswith("nearest") else ["align_corners"])
    return (lambda: F.interpolate(_t(*shape), scale_factor=2, mode=mode, **kw)), names


def _copy_slices():
    out = torch.empty(2, 3, dtype=D)
    out[:, 1:] = _t(2, 2)
    return out


# kind -> (builder of a tensor whose graph holds a node of that kind, the saved names the op entry reads)
SAVED_VISION = {
    "UpsampleNearest1DBackward0": _interp_row(1, "nearest"),
    "UpsampleNearest2DBackward0": _interp_row(2, "nearest"),
    "UpsampleNearest3DBackward0": _interp_row(3, "nearest"),
    "UpsampleNearestExact1DBackward0": _interp_row(1, "nearest-exact"),
    "UpsampleNearestExact2DBackward0": _interp_row(2, "nearest-exact"),
    "UpsampleNearestExact3DBackward0": _interp_row(3, "nearest-exact"),
    "UpsampleLinear1DBackward0": _interp_row(1, "linear"),
    "UpsampleBilinear2DBackward0": _interp_row(2, "bilinear"),
    "UpsampleBilinear2DAaBackward0": _interp_row(2, "bilinear", antialias=True),
    "UpsampleBicubic2DBackward0": _interp_row(2, "bicubic"),
    "UpsampleBicubic2DAaBackward0": _interp_row(2, "bicubic", antialias=True),
    "UpsampleTrilinear3DBackward0": _interp_row(3, "trilinear"),
    "ConstantPadNdBackward0": (lambda: F.pad(_t(1, 2, 3), (1, 2)), ["pad"]),
    **{f"{m}Pad{nd}DBackward0": (lambda mode=mode, nd=nd: F.pad(_t(*(1, 2) + (4,) * nd), (1, 1) * nd, mode=mode),
                                 ["padding", "self"])
       for m, mode in (("Reflection", "reflect"), ("Replication", "replicate")) for nd in (1, 2, 3)},
    "PixelShuffleBackward0": (lambda: F.pixel_shuffle(_t(1, 4, 2, 2), 2), ["upscale_factor"]),
    "PixelUnshuffleBackward0": (lambda: F.pixel_unshuffle(_t(1, 1, 4, 4), 2), ["downscale_factor"]),
    "Im2ColBackward0": (lambda: F.unfold(_t(1, 2, 4, 4), 2), ["kernel_size", "dilation", "padding", "stride"]),
    "Col2ImBackward0": (lambda: F.fold(_t(1, 8, 9), (4, 4), 2), ["kernel_size", "dilation", "padding", "stride"]),
    "CopySlices": (_copy_slices, []),
    "NativeGroupNormBackward0": (lambda: F.group_norm(_t(2, 4, 3), 2, torch.nn.Parameter(torch.ones(4, dtype=D))),
                                 ["input", "weight", "result1", "result2", "group"]),
    "WeightNormInterfaceBackward0": (lambda: torch._weight_norm(_t(3, 4), _t(1, 4), 1), ["v", "g", "dim"]),
    "VarBackward0": (lambda: _t(2, 3).var(-1), ["self", "dim", "keepdim", "correction"]),
    "StdBackward0": (lambda: _t(2, 3).std(-1), ["self", "result", "dim", "keepdim", "correction"]),
    "VarMeanBackward0": (lambda: torch.var_mean(_t(2, 3), -1)[0], ["self", "dim", "keepdim", "correction"]),
    "StdMeanBackward0": (lambda: torch.std_mean(_t(2, 3), -1)[0], ["self", "dim", "keepdim", "correction"]),
    "LinalgVectorNormBackward0": (lambda: _t(2, 3).norm(dim=-1), ["self", "result", "ord", "dim", "keepdim"]),
    "AdaptiveMaxPool2DBackward0": (lambda: F.adaptive_max_pool2d(_t(1, 2, 4, 4), 2), ["self"]),
    "AdaptiveMaxPool3DBackward0": (lambda: F.adaptive_max_pool3d(_t(1, 2, 4, 4, 4), 2), ["self"]),
    "AmaxBackward0": (lambda: _t(2, 3).amax(-1), ["self", "result", "dim", "keepdim"]),
    "AminBackward0": (lambda: _t(2, 3).amin(-1), ["self", "result", "dim", "keepdim"]),
    "MinBackward0": (lambda: _t(2, 3).min(-1).values, ["dim", "keepdim"]),
    "MinBackward1": (lambda: _t(2, 3).min(), ["self", "result"]),
    **{f"{op.capitalize()}Backward0": (lambda op=op: getattr(torch, op)(_t(2, 3), _t(2, 3)), ["self", "other"])
       for op in ("maximum", "minimum", "fmax", "fmin")},
    "AsStridedBackward1": (lambda: F.adaptive_avg_pool2d(
        torch.randn(2, 3, 4, 4, dtype=D).to(memory_format=torch.channels_last).requires_grad_(), 1),
        ["size", "stride", "storage_offset"]),
}
# made only by a CUDA kernel: the node class is checked instead
CUDA_ONLY = {"FusedRmsNormBackward0": ["input", "weight", "result1"],
             **{k: ["input", "weight", "running_mean", "running_var", "training", "result1", "result2", "epsilon"]
                for k in ("CudnnBatchNormBackward0", "MiopenBatchNormBackward0")}}


def _find(t, kind):
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == kind:
            return fn
        stack.extend(c for c, _ in fn.next_functions)
    raise AssertionError(f"no {kind} node")


def test_saved_table_covers_every_new_entry():
    from dynamiclrp.ops.norm import NORM_OPS
    from dynamiclrp.ops.reduce import REDUCE_OPS
    from dynamiclrp.ops.resample import RESAMPLE_OPS

    older = {"SumBackward0", "SumBackward1", "MeanBackward0", "MeanBackward1", "CumsumBackward0", "AvgPool2DBackward0",
             "AvgPool3DBackward0", "AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0",
             "NativeLayerNormBackward0", "NativeBatchNormBackward0"}  # rows in test_op_table.SAVED
    new = set(RESAMPLE_OPS) | set(NORM_OPS) | set(REDUCE_OPS)
    assert new - older <= set(SAVED_VISION) | set(CUDA_ONLY), sorted(new - older - set(SAVED_VISION) - set(CUDA_ONLY))


@pytest.mark.parametrize("kind", sorted(SAVED_VISION))
def test_saved_attributes_exist_on_real_nodes(kind):
    from dynamiclrp.ops import OPS, saved

    build, names = SAVED_VISION[kind]
    fn = _find(build(), kind)
    assert kind in OPS and not OPS[kind].fallback
    for name in names:
        saved(fn, name)  # raises TorchInternalsError if torch renamed it
        assert hasattr(type(fn), "_saved_" + name)
    assert fn._input_metadata[0].shape is not None
    if kind == "CopySlices" and hasattr(fn, "_wrapped_node"):  # torch >= 2.12; else tested on the backward
        assert type(fn._wrapped_node).__name__ == "CopyBackwards"


@pytest.mark.parametrize("kind", sorted(CUDA_ONLY))
def test_saved_attributes_exist_on_cuda_node_classes(kind):
    cls = getattr(torch._C._functions, kind)
    for name in CUDA_ONLY[kind]:
        assert hasattr(cls, "_saved_" + name), f"{kind} has no _saved_{name} in torch {torch.__version__}"
