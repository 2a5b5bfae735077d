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
