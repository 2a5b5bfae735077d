"""Shared check for architecture tests: coverage is complete and relevance is conserved (float64, ε → 0).

``check_architecture(model, inputs, output)`` puts the model in float64 and eval mode, zeroes every bias, and
explains the arg-max with conservative rules (ε = 1e-12 for linear ops and sums, identity for softmax and norms,
the uniform rule for products). The seed must then equal what reached the inputs (or the token embeddings) plus
what went to parameters (position embeddings, class tokens, ...), with nothing absorbed.
"""

from __future__ import annotations

import torch

import dynamiclrp
from dynamiclrp.rules import Epsilon, Pass, Uniform

EXACT_RULES = {"linear": Epsilon(1e-12), "sum": Epsilon(1e-12), "product": Uniform(1e-12),
               "softmax": Pass(), "norm": Pass()}


def zero_biases(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()


def to_double(inputs):
    if isinstance(inputs, torch.Tensor):
        return inputs.double() if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: to_double(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(to_double(v) for v in inputs)
    return inputs


def check_architecture(model, inputs, output=None, rtol: float = 1e-5):
    """Assert 100 % explicit coverage and conservation; return (coverage report, attribution)."""
    model = model.double().eval()
    zero_biases(model)
    inputs = to_double(inputs)
    report = dynamiclrp.coverage(model, inputs, output=output, run=False)
    assert not report.missing, "ops without an explicit rule:\n" + report.table()
    att = dynamiclrp.explain(model, inputs, preset="epsilon", rules=EXACT_RULES, output=output)
    for r in att.inputs + ([att.tokens] if att.tokens is not None else []):
        assert torch.isfinite(r).all()
    c = att.conservation()
    assert abs(c["seed"]) > 0, "the explained output is zero: nothing to conserve"
    scale = abs(c["seed"])
    assert abs(c["absorbed"]) <= rtol * scale, c
    assert abs(c["inputs"] + c["parameters"] - c["seed"]) <= rtol * scale, c
    assert not att.approximations, att.approximations
    return report, att
