r"""Reductions and pooling: sums and averages (family ``sum``), dispersions and norms, max / min selections.

* Sums, means, cumsum, average pooling (1d/2d/3d, adaptive): a linear combination with non-negative
  coefficients, explained by the preset's ``sum`` rule. The rule needs the summands, which autograd does not
  keep for sum and mean: a promise recovers them.
* Variance / standard deviation and vector p-norms: a sum of powers of the (centred) elements passed through a
  monotone scalar function; the ``sum`` rule splits the relevance over the powers (see :class:`PowerSum`).
* Max / min reductions, adaptive max pooling, element-wise ``maximum`` / ``minimum``: selections; relevance goes
  to the selected element (routing, ties share it equally as in the op's backward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import DynamicLRPError
from ..rules import PLAIN, Stabilised
from .base import OpSpec, Routing, out_shape, rule_form, saved, stabilised_gradient


class Reduction(OpSpec):
    """``z = combine(x)`` for a linear ``combine`` with fixed coefficients (non-negative for sums, averages and
    pools; interpolation, :mod:`~dynamiclrp.ops.resample`, uses it too)."""

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

    def gradient_step(self, ctx):
        form = rule_form(ctx.rule("sum"), "sum")
        if isinstance(form, Stabilised):  # x ⊙ Jᵀ(R / stab(z)): the gradient arriving at z scaled first
            return stabilised_gradient(ctx, form.eps)
        return PLAIN if form is PLAIN else None  # ε → 0: x ⊙ Jᵀ(R / z)


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


def reduced_dims(dim, ndim: int) -> list[int]:
    """The reduced dimensions, non-negative (``dim=None`` or ``()``: all of them)."""
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return list(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % max(ndim, 1) for d in dims)


def _keep(r, dim, keepdim: bool, ndim: int):
    """A reduction's result with the reduced dimensions put back (size 1), to broadcast against the input."""
    if keepdim or r.dim() == ndim:
        return r
    for d in reduced_dims(dim, ndim):
        r = r.unsqueeze(d)
    return r


class PowerSum(OpSpec):
    r"""A dispersion or a norm: :math:`z = g\big(c \sum_i t_i\big)` with non-negative terms :math:`t_i`.

    * ``var``: :math:`t_i = (x_i - \bar x)^2`, :math:`c = 1/(N - \delta)` (the correction), :math:`g` the identity;
    * ``std``: the same terms, :math:`g = \sqrt{\cdot}`;
    * ``linalg_vector_norm`` (``torch.norm``, ``Tensor.norm``) of a finite order :math:`p \ne 0`:
      :math:`t_i = |x_i|^p`, :math:`c = 1`, :math:`g = (\cdot)^{1/p}`.

    The preset's ``sum`` rule splits the relevance over the terms, and the terms' relevance goes to the elements
    they are computed from; with the ε-rule (ε → 0)

    .. math:: R_i = \frac{t_i}{\sum_{i'} t_{i'}} R .

    This is the rule the library applies to the same computation written out by hand (``((x - x.mean())**2)
    .mean()``: element-wise powers and the monotone :math:`g` pass relevance unchanged, the mean takes the ``sum``
    rule), here without sending a share to the mean that is subtracted (as layer norm does not). For a norm it is
    also gradient × input: :math:`\lVert x\rVert_p` is positively homogeneous of degree one, so by Euler's theorem
    :math:`\sum_i x_i\,\partial_i \lVert x\rVert_p = \lVert x\rVert_p` with :math:`x_i\,\partial_i
    \lVert x\rVert_p = \lVert x\rVert_p |x_i|^p / \sum_{i'} |x_{i'}|^p`: exact and conservative.
    ``var_mean`` / ``std_mean`` have a second output, the mean, explained by the ``sum`` rule as ``mean`` is.
    The ±∞-norms are a max / min of :math:`|x|`: relevance goes to the selected elements (shared among ties).
    """

    family = "sum"

    def __init__(self, kind: str, with_mean: bool = False):
        self.kind, self.with_mean = kind, with_mean

    def saved_input(self, node, i):
        return saved(node.fn, "self") if i == 0 else None

    def output(self, node, nr):
        if self.kind == "std":
            r = saved(node.fn, "result", None)
            if r is not None and nr == 0:
                return r
        if self.kind == "norm" and nr == 0:
            return saved(node.fn, "result")
        x = saved(node.fn, "self")
        if x is None:
            return None
        out = self.forward(node, [x])
        return out[nr] if isinstance(out, tuple) else out

    def _args(self, fn):
        return saved(fn, "dim", None), bool(saved(fn, "keepdim", False))

    def _correction(self, fn):
        c = saved(fn, "correction", None)
        return 1 if c is None else c

    def forward(self, node, inputs):
        x, fn = inputs[0], node.fn
        dim, keepdim = self._args(fn)
        if self.kind == "norm":
            return torch.linalg.vector_norm(x, saved(fn, "ord"), dim, keepdim)
        f = {"var": torch.var_mean, "std": torch.std_mean}[self.kind]
        out = f(x, dim, correction=self._correction(fn), keepdim=keepdim)
        return tuple(out) if self.with_mean else out[0]

    def _terms(self, fn, x):
        """(terms, combine): the non-negative terms and the linear map that reduces them."""
        dim, keepdim = self._args(fn)
        dims = reduced_dims(dim, x.dim())
        if self.kind == "norm":
            p = float(saved(fn, "ord"))
            return x.abs() ** p, lambda t: t.sum(dims, keepdim=keepdim)
        n = 1
        for d in dims:
            n *= x.shape[d]
        dof = n - self._correction(fn)
        scale = 1.0 / dof if dof > 0 else math.inf
        centred = x - x.mean(dims, keepdim=True)
        return centred * centred, lambda t: t.sum(dims, keepdim=keepdim) * scale

    def relevance(self, ctx):
        fn, x = ctx.node.fn, ctx.input(0)
        R = ctx.R[0]
        rx = None
        if R is not None:
            if self.kind == "norm" and (float(saved(fn, "ord")) == 0 or math.isinf(float(saved(fn, "ord")))):
                rx = self._select(ctx, x, R)
            else:
                t, combine = self._terms(fn, x)
                (rx,) = ctx.rule("sum").sum([t], R, combine)
        if self.with_mean and len(ctx.R) > 1 and ctx.R[1] is not None:
            dim, keepdim = self._args(fn)
            dims = reduced_dims(dim, x.dim())
            (rm,) = ctx.rule("sum").sum([x], ctx.R[1], lambda v: v.mean(dims, keepdim=keepdim))
            rx = rm if rx is None else rx + rm
        return [rx]

    def _select(self, ctx, x, R):
        fn = ctx.node.fn
        p = float(saved(fn, "ord"))
        if p == 0:
            raise DynamicLRPError(
                f"{ctx.node.kind} (node #{ctx.node.id}) is a 0-'norm' (a count of non-zero elements): it is "
                "piecewise constant, so no relevance rule is defined for it; register one with dynamiclrp.register_op"
            )
        dim, keepdim = self._args(fn)
        a = x.abs()
        mask = (a == _keep(ctx.output(0), dim, keepdim, x.dim())).to(R.dtype)
        dims = reduced_dims(dim, x.dim())
        share = _keep(R, dim, keepdim, x.dim()) / mask.sum(dims, keepdim=True)
        return mask * share


class SavedRouting(Routing):
    """A selection that saved its input (``self``) and maybe its result: an Arg Node (relevance by routing)."""

    def __init__(self, replay, result: str | None = None):
        super().__init__(replay)
        self.result = result

    def saved_input(self, node, i):
        return saved(node.fn, "self") if i == 0 else None

    def output(self, node, nr):
        if self.result is not None and nr == 0:
            return saved(node.fn, self.result)
        x = saved(node.fn, "self")
        if x is None:
            return None
        out = self.replay(node.fn, x)
        return out[nr] if isinstance(out, tuple) else out


class Selection(Routing):
    """Element-wise ``maximum`` / ``minimum`` / ``fmax`` / ``fmin`` of two tensors: routing.

    Each output element is one of its two operands' elements; relevance goes to the one selected (half to each on
    a tie, as in the op's backward). An operand outside the graph (``torch.max(scores, torch.tensor(min))`` in
    Pix2Struct's attention) gets no relevance. Both operands are saved: the node is an Arg Node.
    """

    def __init__(self, op):
        super().__init__(lambda fn, a, b: op(a, b))

    def saved_input(self, node, i):
        return saved(node.fn, ("self", "other")[i]) if i < 2 else None

    def output(self, node, nr):
        a, b = saved(node.fn, "self"), saved(node.fn, "other")
        return None if a is None or b is None else self.replay(node.fn, a, b)

    def forward(self, node, inputs):
        a, b = (inputs[i] if inputs[i] is not None else self.saved_input(node, i) for i in (0, 1))
        if a is None or b is None:
            raise NotImplementedError
        return self.replay(node.fn, a, b)


class AsStrided(Routing):
    """``as_strided_`` that re-strides a fresh reduction result in place without moving its elements (routing).

    torch emits it inside ``adaptive_avg_pool2d(x, 1)`` for a channels-last input: the result of ``mean`` is given
    channels-last strides (``out.as_strided_((n, c, 1, 1), (c, 1, c, c))``); elements and values are unchanged.
    Relevance is routed by the node's own backward (exact for any geometry). ``as_strided`` reads the *storage*,
    whose layout the graph does not record, so a replay is only made where the result provably equals the input:
    the input is the fresh (contiguous) output of a sum or mean, the size is unchanged and the strides agree with
    a contiguous layout on every dimension longer than 1. Anything else raises rather than guess.
    """

    transparent = True
    FRESH = ("SumBackward0", "SumBackward1", "MeanBackward0", "MeanBackward1")

    def forward(self, node, inputs):
        fn, (x,) = node.fn, inputs
        producer = fn.next_functions[0][0]
        size, stride = tuple(saved(fn, "size")), tuple(saved(fn, "stride"))
        offset = saved(fn, "storage_offset", None)
        if type(producer).__name__ not in self.FRESH or tuple(x.shape) != size or offset not in (None, 0):
            raise NotImplementedError
        expect = torch.empty(size, device="meta").stride()
        if any(n > 1 and s != e for n, s, e in zip(size, stride, expect)):
            raise NotImplementedError
        return x


def _adaptive_max(nd: int):
    def replay(fn, x):
        size = tuple(out_shape(fn)[-nd:])
        return (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[nd - 1](x, size)

    return replay


def _reduce_dims(op):
    return lambda fn, x: op(x, list(saved(fn, "dim")) if saved(fn, "dim") is not None else [],
                            saved(fn, "keepdim"))


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
    # dispersions and norms
    "VarBackward0": PowerSum("var"),
    "StdBackward0": PowerSum("std"),
    "VarMeanBackward0": PowerSum("var", with_mean=True),
    "StdMeanBackward0": PowerSum("std", with_mean=True),
    "LinalgVectorNormBackward0": PowerSum("norm"),
    # selections (routing)
    "AdaptiveMaxPool2DBackward0": SavedRouting(_adaptive_max(2)),
    "AdaptiveMaxPool3DBackward0": SavedRouting(_adaptive_max(3)),
    "AmaxBackward0": SavedRouting(_reduce_dims(torch.amax), result="result"),
    "AminBackward0": SavedRouting(_reduce_dims(torch.amin), result="result"),
    "MinBackward0": Routing(lambda fn, x: tuple(x.min(saved(fn, "dim"), saved(fn, "keepdim")))),
    "MinBackward1": SavedRouting(lambda fn, x: x.min(), result="result"),
    "MaximumBackward0": Selection(torch.maximum),
    "MinimumBackward0": Selection(torch.minimum),
    "FmaxBackward0": Selection(torch.fmax),
    "FminBackward0": Selection(torch.fmin),
    "AsStridedBackward1": AsStrided(),
}
