"""Reductions and pooling that add activations up: sum, mean, cumsum, average pooling (family ``sum``).

The rule needs the summands, which autograd does not keep for sum and mean: a promise recovers them.
"""

from __future__ import annotations

import torch.nn.functional as F

from .base import OpSpec, out_shape, saved


class Reduction(OpSpec):
    """``z = combine(x)`` for a linear ``combine`` with non-negative coefficients."""

    family = "sum"

    def __init__(self, combine, saves_self: bool = False):
        self.combine, self.saves_self = combine, saves_self

    def saved_input(self, node, i):
        return saved(node.fn, "self") if self.saves_self and i == 0 else None

    def output(self, node, nr):
        x = self.saved_input(node, 0)
        return None if x is None else self.combine(node.fn)(x)

    def forward(self, node, inputs):
        return self.combine(node.fn)(inputs[0])

    def relevance(self, ctx):
        (R,) = ctx.R
        x = ctx.input(0)
        (rx,) = ctx.rule("sum").sum([x], R, self.combine(ctx.node.fn))
        return [rx]


def _sum_dims(fn):
    return lambda x: x.sum(saved(fn, "dim"), keepdim=saved(fn, "keepdim"))


def _mean_dims(fn):
    return lambda x: x.mean(saved(fn, "dim"), keepdim=saved(fn, "keepdim"))


def _avg_pool(fn):
    def pool(x):
        f = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(saved(fn, "kernel_size")) - 1]
        args = [saved(fn, "kernel_size"), saved(fn, "stride"), saved(fn, "padding"), saved(fn, "ceil_mode"),
                saved(fn, "count_include_pad")]
        if f is not F.avg_pool1d:
            args.append(saved(fn, "divisor_override"))
        return f(x, *args)

    return pool


def _adaptive_avg(nd: int):
    def bind(fn):
        size = out_shape(fn)[-nd:]  # the input may be unbatched
        return lambda x: (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[nd - 1](x, size)

    return bind


REDUCE_OPS = {
    "SumBackward0": Reduction(lambda fn: lambda x: x.sum()),
    "SumBackward1": Reduction(_sum_dims),
    "MeanBackward0": Reduction(lambda fn: lambda x: x.mean()),
    "MeanBackward1": Reduction(_mean_dims),
    "CumsumBackward0": Reduction(lambda fn: lambda x: x.cumsum(saved(fn, "dim"))),
    "AvgPool2DBackward0": Reduction(_avg_pool, saves_self=True),
    "AvgPool3DBackward0": Reduction(_avg_pool, saves_self=True),
    "AdaptiveAvgPool2DBackward0": Reduction(_adaptive_avg(2), saves_self=True),
    "AdaptiveAvgPool3DBackward0": Reduction(_adaptive_avg(3), saves_self=True),
}
