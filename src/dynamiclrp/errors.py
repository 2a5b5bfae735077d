"""Exceptions raised by dynamiclrp. Each one names the problem and how to fix it."""

from __future__ import annotations


class DynamicLRPError(RuntimeError):
    """Base class of every error dynamiclrp raises on purpose."""


class NoGraphError(DynamicLRPError):
    """The output has no autograd graph to walk."""


class GraphFreedError(DynamicLRPError):
    """The graph's saved tensors were freed by an earlier ``backward()``."""


class MissingRuleError(DynamicLRPError):
    """An autograd node type has no registered rule."""


class TargetError(DynamicLRPError, ValueError):
    """The target does not fit the output."""


class NonFiniteError(DynamicLRPError):
    """NaN or inf appeared in the output or in a rule's result."""


class ActivationUnavailableError(DynamicLRPError):
    """A rule needs an activation that neither autograd nor the Promise System can recover."""


class TorchInternalsError(DynamicLRPError):
    """A torch-private attribute of an autograd node is missing (a torch release renamed it)."""


class TrainModeWarning(UserWarning):
    """The explained computation ran in train mode (dropout active, batch norm on batch statistics)."""
