"""dynamiclrp: Layer-wise Relevance Propagation over the PyTorch autograd graph, one operation at a time.

Entry points: :func:`propagate` (on an existing graph) and :func:`explain` (runs the model). Rules live in
:mod:`dynamiclrp.rules`, policies in :mod:`dynamiclrp.presets`, the op table in :mod:`dynamiclrp.ops`.
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
from .presets import Preset, get_preset, presets, register_preset
from .result import Attribution, Stats

__version__ = "0.1.0"

__all__ = [
    "ActivationUnavailableError", "Attribution", "coverage", "CoverageReport", "DynamicLRPError", "explain",
    "get_preset", "GraphFreedError", "MissingRuleError", "NoGraphError", "NonFiniteError", "OpSpec", "Preset",
    "presets", "propagate", "register_op", "register_preset", "rules", "Stats", "TargetError",
    "TorchInternalsError", "TrainModeWarning",
]
