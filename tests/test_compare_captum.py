"""The `epsilon` preset against the real Captum 0.9.0 `LRP` and `InputXGradient` (float64, same model and input).

Captum applies its ε-rule to max-pooling too (relevance x/(x+ε) of the winner), where dynamiclrp routes it exactly
(winner takes all): with Captum's max-pool ε → 0 the two agree to the last digits, and with Captum's default the
difference is of the order of ε (asserted as the documented difference).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynamiclrp
from dynamiclrp.rules import Epsilon

captum = pytest.importorskip("captum")
from captum.attr import LRP, InputXGradient  # noqa: E402
from captum.attr._utils.lrp_rules import EpsilonRule  # noqa: E402

pytestmark = pytest.mark.compare
D = torch.float64


class CNN(nn.Module):
    """Captum has no rule for nn.Flatten: flatten in forward, as its documentation advises."""

    def __init__(self, bias):
        super().__init__()
        self.c1, self.r1, self.p1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2)
        self.c2, self.r2, self.p2 = nn.Conv2d(8, 8, 3, padding=1, bias=bias), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        self.l1, self.r3, self.l2 = nn.Linear(32, 16, bias=bias), nn.ReLU(), nn.Linear(16, 5, bias=bias)

    def forward(self, x):
        x = self.p2(self.r2(self.c2(self.p1(self.r1(self.c1(x))))))
        return self.l2(self.r3(self.l1(x.flatten(1))))


def _vgg11():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.vgg11(weights=None)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # Captum's LRP needs out-of-place ReLUs
    return model


def _setup(name, bias=True):
    torch.manual_seed(0)
    model = (CNN(bias) if name == "cnn" else _vgg11()).double().eval()
    size = 8 if name == "cnn" else 64
    x = torch.randn(3, 3, size, size, dtype=D, generator=torch.Generator().manual_seed(1))
    return model, x, torch.tensor([1, 3, 0])


def _captum_lrp(model, x, target, maxpool_eps=None):
    for m in model.modules():
        if isinstance(m, nn.MaxPool2d) and maxpool_eps is not None:
            m.rule = EpsilonRule(epsilon=maxpool_eps)
    return LRP(model).attribute(x.clone().requires_grad_(), target=target)


def _ours(model, x, target, eps=1e-9):
    rules = {"linear": Epsilon(eps), "sum": Epsilon(eps)}
    return dynamiclrp.explain(model, x, target=target, preset="epsilon", rules=rules).inputs[0]


@pytest.mark.parametrize("name,bias", [("cnn", False), ("cnn", True), ("vgg11", True)])
def test_lrp_epsilon_matches_captum(name, bias):
    model, x, target = _setup(name, bias)
    expected = _captum_lrp(model, x, target, maxpool_eps=1e-30)
    torch.testing.assert_close(_ours(model, x, target), expected, rtol=1e-9, atol=1e-11 * float(expected.abs().max()))


def test_captum_default_max_pool_epsilon_documented_difference():
    model, x, target = _setup("cnn")
    expected = _captum_lrp(model, x, target)  # Captum's default: ε = 1e-9 on max-pooling as well
    rel = float((_ours(model, x, target) - expected).abs().max() / expected.abs().max())
    assert 1e-14 < rel < 1e-5, rel


@pytest.mark.parametrize("bias", [False, True])
def test_input_x_gradient_is_epsilon_to_zero(bias):
    """On a ReLU network, ε → 0 LRP (biases in the denominators) equals Captum's InputXGradient."""
    model, x, target = _setup("cnn", bias)
    expected = InputXGradient(model).attribute(x.clone().requires_grad_(), target=target)
    torch.testing.assert_close(_ours(model, x, target, eps=1e-15), expected, rtol=1e-7,
                               atol=1e-9 * float(expected.abs().max()))
