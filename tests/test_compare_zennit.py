"""Rule math against the real zennit 0.5.1 on bias-free networks (float64, same model and input).

Without biases the op-level rules must reproduce zennit's composites to the last digit. With biases zennit puts
the bias into each layer's denominator (and modifies it with the rule), which the op-level preset does not do
yet; the equivalence issue owns that.
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


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 2 * 2, 16, bias=False), nn.ReLU(), nn.Linear(16, 5, bias=False),
    ).double().eval()


COMPOSITES = {
    "epsilon_plus": lambda: EpsilonPlus(),
    "epsilon_gamma_box": lambda: EpsilonGammaBox(low=-3.0, high=3.0),
    "epsilon_alpha2_beta1": lambda: EpsilonAlpha2Beta1(),
    "epsilon_plus_flat": lambda: EpsilonPlusFlat(),
}


@pytest.mark.parametrize("preset", list(COMPOSITES))
def test_bias_free_cnn_matches_zennit(preset):
    model = _cnn()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 3, 0])
    with Gradient(model=model, composite=COMPOSITES[preset]()) as attributor:
        _, expected = attributor(x.clone().requires_grad_(), torch.eye(5, dtype=torch.float64)[target])
    att = dynamiclrp.explain(model, x, target=target, preset=preset, seed="one")
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(att.inputs[0], expected, rtol=1e-10, atol=1e-13)
