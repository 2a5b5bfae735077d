"""The op table: one entry per autograd node type, grouped by family in the modules of this package.

``spec_for(fn)`` looks a node up; :func:`register_op` adds or replaces an entry (e.g. for a custom
``torch.autograd.Function``, whose node type is named ``<FunctionName>Backward``).
"""

from __future__ import annotations

from typing import Any

from ..errors import MissingRuleError
from .attention import ATTENTION_OPS
from .base import NEXT, PART, Identity, OpSpec, Routing, out_shape, route, saved
from .elementwise import ELEMENTWISE_OPS
from .index import INDEX_OPS
from .inplace import INPLACE_OPS
from .leaf import LEAF_OPS
from .linear import MATMUL_OPS
from .norm import NORM_OPS
from .reduce import REDUCE_OPS
from .resample import RESAMPLE_OPS
from .shape import SHAPE_OPS

__all__ = ["OPS", "NEXT", "PART", "Identity", "OpSpec", "Routing", "Missing", "out_shape", "register_op",
           "route", "saved", "spec_for"]

OPS: dict[str, OpSpec] = {
    **ELEMENTWISE_OPS, **MATMUL_OPS, **REDUCE_OPS, **SHAPE_OPS, **NORM_OPS, **ATTENTION_OPS, **LEAF_OPS,
    **RESAMPLE_OPS, **INDEX_OPS, **INPLACE_OPS,
}


class Missing(OpSpec):
    """A node type without a rule. The engine refuses it (strict) or uses the documented fallback.

    Fallback (``strict=False``): relevance is split equally among the operands that depend on the input and
    have the output's shape; the node is reported in ``Attribution.fallbacks``. Without such an operand the
    fallback raises too.
    """

    fallback = True

    def __init__(self, kind: str):
        self.kind = kind

    def relevance(self, ctx):
        (R,) = ctx.R[:1]
        idx = [i for i in range(len(ctx.node.inputs)) if ctx.is_data(i) and ctx.input_shape(i) == R.shape]
        if not idx:
            raise MissingRuleError(
                f"no rule for {self.kind} and no operand the fallback can use; register one with "
                "dynamiclrp.register_op"
            )
        ctx.run.note_approximation(ctx.node, "fallback rule (equal split)")
        return [R / len(idx) if i in idx else None for i in range(len(ctx.node.inputs))]


def spec_for(fn: Any) -> OpSpec:
    kind = type(fn).__name__
    spec = OPS.get(kind)
    return spec if spec is not None else Missing(kind)


class Custom(OpSpec):
    """An op entry made from a plain rule function (see :func:`register_op`)."""

    def __init__(self, rule, forward=None, family=None):
        self.rule, self.replay, self.family = rule, forward, family

    def forward(self, node, inputs):
        if self.replay is None:
            raise NotImplementedError
        return self.replay(*inputs)

    def relevance(self, ctx):
        return list(self.rule(ctx))


def register_op(kind: str | type, spec: OpSpec | Any, forward: Any = None) -> None:
    """Register (or replace) the op entry for an autograd node type.

    Parameters
    ----------
    kind : str or type
        The node's type name (``"MyFnBackward"``) or the ``torch.autograd.Function`` subclass itself.
    spec : OpSpec or callable
        An op entry, or a rule function ``rule(ctx) -> [relevance per operand]`` (``ctx.R[0]`` is the output
        relevance, ``ctx.input(i)`` an operand's value, ``ctx.rule(family)`` the preset's rule).
    forward : callable, optional
        With a rule function: ``forward(*operands)`` replays the op, so promises can pass through it.

    Examples
    --------
    >>> import torch, dynamiclrp
    >>> class Double(torch.autograd.Function):
    ...     @staticmethod
    ...     def forward(ctx, x):
    ...         return 2 * x
    ...     @staticmethod
    ...     def backward(ctx, g):
    ...         return 2 * g
    >>> dynamiclrp.register_op(Double, lambda ctx: [ctx.R[0]], forward=lambda x: 2 * x)
    """
    if isinstance(kind, type):
        kind = kind.__name__ + "Backward"
    OPS[kind] = spec if isinstance(spec, OpSpec) else Custom(spec, forward)
