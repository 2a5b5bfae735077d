"""Named policies: which rule applies where.

A preset maps a rule *family* to a rule object of :mod:`dynamiclrp.rules`. The op table says which family a node
belongs to; the families, from most to least specific, are

============== ===========================================================================================
``input``      a linear op (conv or dense) whose data operand is a model input (for z-box / flat); where a
               preset gives no ``input`` rule the op keeps its own family, ``conv`` or ``dense``
``conv``       a convolution with a weight
``dense``      a matrix product with a weight (``nn.Linear``, ``mm``/``bmm``/``addmm`` with a parameter)
``linear``     fallback for ``conv`` and ``dense``
``sum``        ops that add activations up: add, sub, sum, mean, cumsum, average pooling
``bias``       the bias addition split off a linear layer; ``BiasInDenominator`` hands it to the linear op's rule
               (textbook LRP, zennit, LXT), else it falls back to ``sum`` (the DynamicLRP paper)
``product``    a product of two activations: element-wise mul, matmul of two activations
``attention``  the product of attention weights (a softmax output) and values; falls back to ``product``
``softmax``    softmax along a dimension
``norm``       normalisation layers (layer norm, batch norm, RMS-norm pieces)
============== ===========================================================================================

Overrides: ``preset.override(kinds={"MmBackward0": Epsilon(0.1)})`` per op kind, and per module name through
:func:`dynamiclrp.explain`'s ``module_rules``. Presets are registered by name (:func:`register_preset`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from . import rules as r

FALLBACK = {"conv": "linear", "dense": "linear", "attention": "product", "bias": "sum"}


@dataclass(frozen=True)
class Preset:
    """A rule per family, with optional overrides per op kind and per node."""

    name: str
    families: dict[str, Any]
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""

    def rule(self, family: str, kind: str = "") -> Any:
        """The rule for ``family`` (falling back along ``FALLBACK``), a kind override first."""
        fam = family
        while True:
            by_kind = self.kinds.get(kind)
            if by_kind is not None and fam in by_kind:
                return by_kind[fam]
            if fam in self.families:
                return self.families[fam]
            if fam not in FALLBACK:
                raise KeyError(f"preset {self.name!r} has no rule for family {family!r}")
            fam = FALLBACK[fam]

    def defines(self, family: str, kind: str = "") -> bool:
        """Whether the preset gives ``family`` a rule of its own (for this op kind), without falling back."""
        return family in self.families or family in self.kinds.get(kind, {})

    def override(self, families: dict[str, Any] | None = None,
                 kinds: dict[str, Any] | None = None, name: str | None = None) -> Preset:
        """A copy with some families replaced, or rules set for op kinds.

        ``kinds`` maps an op kind (``"ConvolutionBackward0"``) to a rule, or to a dict family -> rule.
        """
        fam = {**self.families, **(families or {})}
        kin = {k: dict(v) for k, v in self.kinds.items()}
        for k, v in (kinds or {}).items():
            kin.setdefault(k, {}).update(families_of(v))
        return replace(self, families=fam, kinds=kin, name=name or self.name)


_ALL_FAMILIES = ("input", "conv", "dense", "linear", "sum", "product", "attention", "softmax", "norm")
_METHOD = {"input": "linear", "conv": "linear", "dense": "linear", "linear": "linear", "sum": "sum",
           "product": "product", "attention": "product", "softmax": "softmax", "norm": "norm"}
# families_of() spreads a single rule over the families it implements; "bias" only by name


def families_of(rule: Any) -> dict[str, Any]:
    """Family -> rule for every family ``rule`` implements (``Flat`` has ``linear`` only, ``Pass`` softmax and
    norm, ...): how a single rule given for a module or an op kind is spread over the families there."""
    if isinstance(rule, dict):
        return dict(rule)
    fams = {f: rule for f in _ALL_FAMILIES if hasattr(rule, _METHOD[f])}
    if not fams:
        raise TypeError(f"{rule!r} implements none of linear/sum/product/softmax/norm")
    return fams

_PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Register a preset under its name (the CLI and ``preset="name"`` arguments look it up)."""
    _PRESETS[preset.name] = preset
    return preset


def get_preset(preset: str | Preset) -> Preset:
    """Look a preset up by name (or pass a :class:`Preset` through)."""
    if isinstance(preset, Preset):
        return preset
    try:
        return _PRESETS[preset]
    except KeyError:
        raise KeyError(f"unknown preset {preset!r}; known: {', '.join(sorted(_PRESETS))}") from None


def presets() -> dict[str, Preset]:
    """All registered presets by name."""
    return dict(_PRESETS)


_BASE = {"sum": r.Epsilon(1e-6), "bias": r.BiasInDenominator(), "product": r.Uniform(), "softmax": r.Pass(),
         "norm": r.Pass()}

_MERGE = {"norm": r.MergeBatchNorm()}  # batch norm merged into the layer before it, as zennit's canonizers do

register_preset(Preset("epsilon", {**_BASE, **_MERGE, "linear": r.Epsilon(1e-6)},
                       description="ε-rule (ε=1e-6) for every linear op; AttnLRP's uniform rule for products"))
register_preset(Preset("epsilon_plus", {**_BASE, **_MERGE, "conv": r.ZPlus(), "dense": r.Epsilon(1e-6)},
                       description="zennit EpsilonPlus: z⁺ for convolutions, ε for dense layers"))
register_preset(Preset("epsilon_plus_flat", {**_BASE, **_MERGE, "input": r.Flat(), "conv": r.ZPlus(),
                                             "dense": r.Epsilon(1e-6)},
                       description="zennit EpsilonPlusFlat: flat input layer, z⁺ convolutions, ε dense"))
register_preset(Preset("epsilon_gamma_box", {**_BASE, **_MERGE, "input": r.ZBox(-3.0, 3.0), "conv": r.Gamma(0.25),
                                             "dense": r.Epsilon(1e-6)},
                       description="zennit EpsilonGammaBox: z-box input layer, γ=0.25 convolutions, ε dense"))
register_preset(Preset("epsilon_alpha2_beta1", {**_BASE, **_MERGE, "conv": r.AlphaBeta(2.0, 1.0),
                                                "dense": r.Epsilon(1e-6)},
                       description="zennit EpsilonAlpha2Beta1: α2β1 for convolutions, ε dense"))
# LXT computes AttnLRP as input × modified gradient, which never divides: its ε-rules have ε = 0. A stabiliser far
# below float32 resolution reproduces that and keeps 0/0 at exactly-zero outputs (which carry no relevance) at 0.
_LXT = {"linear": r.Epsilon(1e-12), "sum": r.Epsilon(1e-12), "product": r.Uniform(1e-12),
        "norm": r.LinearisedNorm(1e-12)}

register_preset(Preset("attnlrp", {**_BASE, **_LXT, "softmax": r.AttnLRPSoftmax()},
                       description="AttnLRP (as LXT): ε→0 linear, uniform products, AttnLRP softmax, norms linearised"))
register_preset(Preset("cp_lrp", {**_BASE, **_LXT, "attention": r.Constant(1e-12), "product": r.Constant(1e-12),
                                  "softmax": r.Block()},
                       description="CP-LRP (as LXT): attention weights and gates held constant"))
register_preset(Preset("paper", {"linear": r.Epsilon(1e-11), "sum": r.Proportional(), "product": r.Proportional(),
                                 "attention": r.Uniform(1e-11), "softmax": r.Block(), "norm": r.Pass()},
                       description="DynamicLRP paper: ε linear, |·|-proportional add/sum/mul, value-path attention"))
