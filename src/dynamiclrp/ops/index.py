r"""Writes into tensors: ``index_add``, ``scatter_add``, ``index_put``, ``scatter``, ``masked_scatter``, ``index_fill``.

Each op writes *source* elements into a *base* tensor at given positions. Two rules, by what an output element is:

* **A copy** (``scatter``, ``index_put`` without accumulation, ``masked_scatter``, ``index_copy``, ``index_fill``):
  every output element is a copy of one base element or one source element (or a constant fill value), so the
  relevance follows the elements back through the node's own backward (:class:`~dynamiclrp.ops.base.Routing`),
  exactly as for ``cat`` or slicing. The overwritten base elements receive none.
* **A sum of copies** (``index_add``, ``scatter_add``, ``index_put(accumulate=True)``): an output element is the
  base element plus every source element written to it, :math:`z_j = b_j + \sum_{i \to j} \alpha s_i`. That is an
  addition, and the preset's ``sum`` rule splits it over the summands, the ε-rule being

  .. math:: R_{b_j} = \frac{b_j}{\mathrm{stab}_\varepsilon(z_j)} R_j, \qquad
            R_{s_i} = \frac{\alpha s_i}{\mathrm{stab}_\varepsilon(z_{j(i)})} R_{j(i)},

  computed as the rule's vector-Jacobian product of the recomputed op (:class:`Accumulate`). A single source
  element at a position that was zero passes its relevance on unchanged; several share it in proportion.

Why these are the LRP rules: an element that is a copy contributes its whole value to exactly one output element,
so the ε-rule of that one-term "sum" gives it all the relevance -- which is what the vector-Jacobian product of a
copy computes (conservative, no activation needed, no ε). An element that is added to others is one term of an
addition and must get the same rule as ``add`` / ``sum`` (family ``sum``: ε, the paper's |·|-proportional rule,
...), so that writing ``z = b.index_add(0, i, s)`` or ``z = b + s_scattered`` explains the same way. Writing the
experts' outputs into the accumulator is such an addition of one term per position (each token goes to an expert
at most once), so their relevance passes on whole.

With duplicate indices and *no* accumulation (``scatter``, ``index_put``), torch leaves undefined which write
wins, and its backward gives each duplicate the gradient: routing then hands the relevance of that position to
every duplicate (not conservative). Models do not write duplicates without accumulating.

**Untracked bases.** The usual accumulator is a fresh constant, ``torch.zeros(...).index_add_(...)`` (the experts
of a mixture of experts, Mixtral / Qwen-MoE / OLMoE). Autograd records no operand for it and saves nothing of its
value, so a base outside the graph is taken as **zeros**, in the replay and in the rule -- unless the node's own
output is available (saved by a consumer), in which case the base is recovered exactly as ``z - writes``. A base
that is a non-zero constant (a buffer that does not require grad) would be mis-read as zeros: let it require grad
so that the graph records it.
"""

from __future__ import annotations

import torch

from ..errors import ActivationUnavailableError
from ..rules import PLAIN
from .base import OpSpec, Routing, out_shape, route, rule_form, saved


def _zeros(node, like: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype or (like.dtype if like is not None else torch.float32)
    device = like.device if like is not None else None
    return torch.zeros(out_shape(node.fn), dtype=dtype, device=device)


class Accumulate(OpSpec):
    r"""``z = write(base, source)`` where ``write`` adds source elements into the base: family ``sum``.

    ``combine(fn)`` returns ``write(base, term)`` for a *term* (the source times its scale), linear with unit
    coefficients in both; ``scale(fn)`` is the source's factor (``alpha`` of ``index_add``); ``source`` names the
    saved source (``index_add`` saves it) or is None.
    """

    family = "sum"

    def __init__(self, combine, scale=None, source: str | None = None):
        self.combine, self.scale, self.source = combine, scale, source

    def saved_input(self, node, i):
        if i == 1 and self.source is not None:
            return saved(node.fn, self.source, None)
        return None

    def _alpha(self, fn):
        return 1.0 if self.scale is None else self.scale(fn)

    def forward(self, node, inputs):
        base, src = inputs[0], inputs[1] if len(inputs) > 1 else None
        if src is None:
            src = self.saved_input(node, 1)
        if src is None:
            raise NotImplementedError  # a constant source that autograd did not save
        if base is None:
            base = _zeros(node, src)  # the untracked accumulator (see the module docstring)
        return self.combine(node.fn)(base, self._alpha(node.fn) * src.to(base.dtype))

    def infer_input(self, ctx, i):
        """The base when it lies outside the graph: ``z - write(0, source)`` if the output is at hand, else 0."""
        if i != 0:
            return None
        src = ctx.input(1)
        if src is None:
            return None
        zero = _zeros(ctx.node, src, ctx.dtype)
        z = ctx.run.promises.available(ctx.node, 0)
        if z is None:
            return zero
        return z.to(ctx.dtype) - self.combine(ctx.node.fn)(zero, self._alpha(ctx.node.fn) * src)

    def relevance(self, ctx):
        (R,) = ctx.R
        src = ctx.input(1)
        if src is None:
            raise ActivationUnavailableError(
                f"{ctx.node.kind} (node #{ctx.node.id}) writes a source autograd neither recorded nor saved, so "
                "its share of the sum cannot be computed; let the source require grad"
            )
        base = ctx.input(0)
        if base is None:
            base = _zeros(ctx.node, src, ctx.dtype)
        terms = [base, self._alpha(ctx.node.fn) * src]
        rb, rs = ctx.rule("sum").sum(terms, R, self.combine(ctx.node.fn))
        return [rb, rs] + [None] * (len(ctx.node.inputs) - 2)

    def gradient_step(self, ctx):
        """ε → 0 on the sum: base and source times the gradient (an untracked base keeps its share unseen)."""
        return PLAIN if rule_form(ctx.rule("sum"), "sum") is PLAIN else None


class IndexPut(OpSpec):
    """``base.index_put(indices, values, accumulate)``: a sum of copies when accumulating, else a copy (routing)."""

    def __init__(self):
        self._sum = Accumulate(lambda fn: lambda b, v: torch.ops.aten.index_put(b, _indices(fn), v, True))

    def forward(self, node, inputs):
        base, values = inputs
        if values is None:
            raise NotImplementedError  # constant values are not saved
        if base is None:
            base = _zeros(node, values)
        return torch.ops.aten.index_put(base, _indices(node.fn), values.to(base.dtype),
                                        bool(saved(node.fn, "accumulate")))

    def infer_input(self, ctx, i):
        return self._sum.infer_input(ctx, i) if saved(ctx.node.fn, "accumulate") else None

    def relevance(self, ctx):
        if saved(ctx.node.fn, "accumulate"):
            return self._sum.relevance(ctx)
        return route(ctx)

    def gradient_step(self, ctx):
        return self._sum.gradient_step(ctx) if saved(ctx.node.fn, "accumulate") else PLAIN


def _indices(fn):
    return list(saved(fn, "indices"))


def _routing(replay):
    return Routing(replay)


class Fill(Routing):
    """A fill with a scalar autograd did not save (``scatter(dim, index, value)``, ``index_fill``): routing; a replay
    fills zeros and is *provisional*, as for ``masked_fill`` (only a softmax that checks it may use it)."""

    always_provisional = True


def _scatter(fn, base, src):
    return base.scatter(saved(fn, "dim"), saved(fn, "index"), src)


def _with_base(write):
    """A replay ``write(fn, base, *rest)`` that takes an untracked base as zeros (see the module docstring)."""

    def replay(fn, base, *rest):
        if any(r is None for r in rest):
            raise NotImplementedError
        if base is None:
            base = torch.zeros(out_shape(fn), dtype=rest[0].dtype if rest else torch.float32,
                               device=rest[0].device if rest else None)
        return write(fn, base, *rest)

    return replay


INDEX_OPS: dict[str, OpSpec] = {
    # sums of copies: the `sum` rule over base and source elements
    "IndexAddBackward0": Accumulate(lambda fn: lambda b, s: b.index_add(saved(fn, "dim"), saved(fn, "index"), s),
                                    scale=lambda fn: saved(fn, "alpha"), source="source"),
    "ScatterAddBackward0": Accumulate(
        lambda fn: lambda b, s: b.scatter_add(saved(fn, "dim"), saved(fn, "index"), s)),
    "IndexPutBackward0": IndexPut(),
    "IndexPutImplBackward0": IndexPut(),
    # copies: routing through the node's own backward
    "ScatterBackward0": _routing(_with_base(_scatter)),
    "ScatterBackward1": Fill(lambda fn, x: x.scatter(saved(fn, "dim"), saved(fn, "index"), 0.0)),
    "IndexFillBackward0": Fill(lambda fn, x: x.index_fill(saved(fn, "dim"), saved(fn, "index"), 0.0)),
    "MaskedScatterBackward0": _routing(_with_base(lambda fn, b, s: b.masked_scatter(saved(fn, "mask"), s))),
    "IndexCopyBackward0": _routing(_with_base(
        lambda fn, b, s: b.index_copy(saved(fn, "dim"), saved(fn, "index"), s))),
}
"""The op table's index-write entries."""
