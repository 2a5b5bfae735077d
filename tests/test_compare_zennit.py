"""The zennit-named presets against the real zennit 0.5.1 (float64, same model and input).

With and without biases the op-level rules must reproduce zennit's composites to the last digit: the bias
addition split off each layer hands its relevance to the layer (``BiasInDenominator``), whose rule modifies the
bias as zennit's parameter modifiers do. (Batch norm merged into convolutions by zennit's canonizers is the
equivalence issue's work.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynamiclrp

zennit = pytest.importorskip("zennit")
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat  # noqa: E402

pytestmark = pytest.mark.compare


def _cnn(bias):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2, bias=bias), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 2 * 2, 16, bias=bias), nn.ReLU(), nn.Linear(16, 5, bias=bias),
    ).double().eval()
    if bias:
        with torch.no_grad():
            for m in model:
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0, 0.3)  # biases of both signs, large enough to matter
    return model


COMPOSITES = {
    "epsilon_plus": lambda: EpsilonPlus(),
    "epsilon_gamma_box": lambda: EpsilonGammaBox(low=-3.0, high=3.0),
    "epsilon_alpha2_beta1": lambda: EpsilonAlpha2Beta1(),
    "epsilon_plus_flat": lambda: EpsilonPlusFlat(),
}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("preset", list(COMPOSITES))
def test_cnn_matches_zennit(preset, bias):
    model = _cnn(bias)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 3, 0])
    with Gradient(model=model, composite=COMPOSITES[preset]()) as attributor:
        _, expected = attributor(x.clone().requires_grad_(), torch.eye(5, dtype=torch.float64)[target])
    att = dynamiclrp.explain(model, x, target=target, preset=preset, seed="one")
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(att.inputs[0], expected, rtol=1e-10, atol=1e-13)


def _randomise_batch_norms(model, eps):
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1.0, 0.3)
                mod.bias.normal_(0.0, 0.1)
                mod.eps = eps
    return model


def _zennit_vs_ours(model, canonizer, preset, x, target):
    with Gradient(model=model, composite=COMPOSITES_CANON[preset]([canonizer()])) as attributor:
        _, expected = attributor(x.clone().requires_grad_(), torch.eye(1000, dtype=torch.float64)[target])
    ours = dynamiclrp.explain(model, x, target=target, preset=preset, seed="one").inputs[0]
    return ours, expected


COMPOSITES_CANON = {
    "epsilon_plus": lambda c: EpsilonPlus(canonizers=c),
    "epsilon_gamma_box": lambda c: EpsilonGammaBox(low=-3.0, high=3.0, canonizers=c),
    "epsilon_alpha2_beta1": lambda c: EpsilonAlpha2Beta1(canonizers=c),
}


@pytest.mark.parametrize("preset", list(COMPOSITES_CANON))
@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18"])
def test_batch_norm_networks_match_zennit_canonizers(name, preset):
    """Batch norm merged into the preceding convolution at the op level equals zennit's canonizers (with BN eps 0,
    see the next test for why)."""
    torchvision = pytest.importorskip("torchvision")
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    torch.manual_seed(0)
    model = _randomise_batch_norms(getattr(torchvision.models, name)(weights=None).double().eval(), 0.0)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    canonizer = VGGCanonizer if name.startswith("vgg") else ResNetCanonizer
    ours, expected = _zennit_vs_ours(model, canonizer, preset, x, torch.tensor([1, 3]))
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


def test_zennit_merge_leaves_batch_norm_eps_documented_difference():
    """zennit's MergeBatchNorm folds BN into the convolution and then resets the BN to 'identity' (mean 0, var 1,
    weight 1, bias 0) but keeps its eps, so the canonized model divides by sqrt(1 + eps) after every merged layer:
    it explains a slightly different function. The op-level merge explains the model as it is. The difference is
    small and disappears with eps = 0 (previous test)."""
    torchvision = pytest.importorskip("torchvision")
    from zennit.torchvision import VGGCanonizer

    torch.manual_seed(0)
    model = _randomise_batch_norms(torchvision.models.vgg11_bn(weights=None).double().eval(), 1e-5)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours, expected = _zennit_vs_ours(model, VGGCanonizer, "epsilon_plus", x, torch.tensor([1, 3]))
    rel = float((ours - expected).abs().max() / expected.abs().max())
    assert 1e-9 < rel < 1e-2, rel
    # zennit's own canonized forward differs from the model's by the leftover eps
    with torch.no_grad():
        y = model(x)
    canonizer = VGGCanonizer()
    handles = canonizer.apply(model)
    try:
        with torch.no_grad():
            y_canon = model(x)
    finally:
        for h in handles:
            h.remove()
    assert not torch.allclose(y, y_canon, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------- 224²

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_photos():
    """skimage's chelsea (a cat) and coffee (a cup) as an ImageNet batch: shorter side 256, 224 centre crop,
    ImageNet mean/std, float64; and the z-box bounds of [0, 1] pixels after that normalisation, (1, 3, 1, 1)."""
    np = pytest.importorskip("numpy")
    data = pytest.importorskip("skimage.data")
    tf = pytest.importorskip("torchvision.transforms.functional")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    imgs = []
    for img in (data.chelsea(), data.coffee()):
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).to(torch.float64) / 255
        imgs.append(tf.center_crop(tf.resize(t, 256, antialias=True), 224))
    return (torch.stack(imgs) - mean) / std, (0 - mean) / std, (1 - mean) / std


def zbox_vs_zennit(model, canonizers, x, low, high, target, **kw):
    """zennit EpsilonGammaBox (box bounds low/high) with ``canonizers`` against our epsilon_gamma_box with the same
    bounds; ``kw`` goes to dynamiclrp.explain (default: the bounds as the preset's input rule)."""
    from dynamiclrp.rules import ZBox

    composite = EpsilonGammaBox(low=low, high=high, canonizers=canonizers)
    n = model(x[:1]).shape[-1]
    with Gradient(model=model, composite=composite) as attributor:
        _, expected = attributor(x.clone().requires_grad_(), torch.eye(n, dtype=torch.float64)[target])
    kw = kw or {"rules": {"input": ZBox(low, high)}}
    ours = dynamiclrp.explain(model, x, target=target, preset="epsilon_gamma_box", seed="one", **kw).inputs[0]
    return ours, expected


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn", "resnet50"])
def test_full_size_224_epsilon_gamma_box_matches_zennit(name):
    """VGG16 with and without batch norm and ResNet-50 at 224² on two photos, EpsilonGammaBox with the box bounds of
    [0, 1] pixels after ImageNet normalisation (BN eps 0, see above)."""
    torchvision = pytest.importorskip("torchvision")
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    x, low, high = imagenet_photos()
    torch.manual_seed(0)
    model = _randomise_batch_norms(getattr(torchvision.models, name)(weights=None).double().eval(), 0.0)
    canonizer = VGGCanonizer if name.startswith("vgg") else ResNetCanonizer
    ours, expected = zbox_vs_zennit(model, [canonizer()], x, low, high, torch.tensor([281, 967]))
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
