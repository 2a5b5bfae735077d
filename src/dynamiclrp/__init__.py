"""dynamiclrp: Layer-wise Relevance Propagation over the PyTorch autograd graph, one operation at a time.

Entry points: :func:`propagate` (on an existing graph) and :func:`explain` (runs the model). Rules live in
:mod:`dynamiclrp.rules`, policies in :mod:`dynamiclrp.presets`, the op table in :mod:`dynamiclrp.ops`.
Heatmaps are in :mod:`dynamiclrp.viz`, Hugging Face / Quantus / Captum helpers in :mod:`dynamiclrp.integrations`
(both loaded on first use), the command line in :mod:`dynamiclrp.cli`.
"""

from . import rules
from .api import explain, propagate
from .coverage import CoverageReport, coverage
from .errors import (
    ActivationUnavailableError,
    DynamicLRPError,
    GraphFreedError,
    MissingRuleError,
    NoGraphError,
    NonFiniteError,
    TargetError,
    TorchInternalsError,
    TrainModeWarning,
)
from .ops import OpSpec, register_op
from .plan import Plan
from .presets import Preset, get_preset, presets, register_preset
from .result import Attribution, Stats

__version__ = "0.1.0"

__all__ = [
    "ActivationUnavailableError", "Attribution", "coverage", "CoverageReport", "DynamicLRPError", "explain",
    "get_preset", "GraphFreedError", "MissingRuleError", "NoGraphError", "NonFiniteError", "OpSpec", "Plan", "Preset",
    "presets", "propagate", "register_op", "register_preset", "rules", "Stats", "TargetError",
    "TorchInternalsError", "TrainModeWarning",
]

# Loaded on first attribute access: the plotting and integration code is not needed by the core.
_LAZY = {"viz": ".viz", "integrations": ".integrations", "LRP": ".integrations.adapters",
         "explain_func": ".integrations.adapters"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(_LAZY[name], __name__)
        return mod if _LAZY[name].endswith(name) else getattr(mod, name)
    raise AttributeError(f"module 'dynamiclrp' has no attribute {name!r}")
