r"""Resampling and padding: upsampling / interpolation, padding, pixel (un)shuffle, im2col / col2im.

Four kinds of op live here:

* **Copies** -- nearest-neighbour resampling, every padding mode, pixel shuffle, ``unfold`` (im2col): each output
  element is a copy of one input element (or a constant), so relevance follows the elements back through the
  node's own backward (routing, exact and conservative: copies of one element have their relevance summed).
* **Interpolation** -- linear, bilinear, trilinear, bicubic, and the anti-aliased bilinear / bicubic of
  ``antialias=True``: :math:`z_j = \sum_i w_{ji} x_i` with fixed interpolation weights (that sum to one per
  output), linear in the input and without a parameter, exactly like average pooling. The preset's ``sum``
  rule explains it, the ε-rule being

  .. math:: R_i = \sum_j \frac{w_{ji} x_i}{\mathrm{stab}_\varepsilon(z_j)} R_j .

  Linear / bilinear / trilinear weights are non-negative, so every rule of the ``sum`` family applies as to an
  average; the cubic kernel (a = −0.75) has small negative lobes, which the ε-rule handles exactly (it is the
  exact decomposition of a linear map) -- with the magnitude-proportional rule the denominator
  :math:`\sum_i w_{ji}|x_i|` can then come close to zero.
* **Overlap-add** -- ``fold`` (col2im) adds the patches that overlap an output position: a sum (``sum`` family).
* **Copies into a view** -- ``CopySlices``, the node autograd records for a ``copy_`` into a view of a tensor:
  circular padding (``F.pad(mode="circular")`` writes the wrapped borders into an empty tensor) and slice
  assignment (``pos[i, :n] = resized`` in SigLIP-2's position embeddings). Routing, see :class:`CopyIntoView`.

The input of an upsampling node is not saved by autograd: a promise recovers it. Reflection and replication
padding save theirs and are Arg Nodes. Constant padding does not save its fill value, so its replay is
provisional (see :class:`ConstantPad`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import DynamicLRPError
from .base import OpSpec, Routing, out_shape, route, saved
from .reduce import Reduction

aten = torch.ops.aten


# ----------------------------------------------------------------------------------------------------------
# interpolation (family "sum")


def _scales(fn, nd: int) -> list:
    names = ("scales",) if nd == 1 else ("scales_d", "scales_h", "scales_w")[3 - nd:]
    return [saved(fn, n, None) for n in names]


def _interp(op, nd: int):
    """``combine(fn)``: the interpolation with the node's saved output size, corner mode and scales."""

    def bind(fn):
        size, corners, scales = list(saved(fn, "output_size")), saved(fn, "align_corners"), _scales(fn, nd)
        return lambda x: op(x, size, corners, *scales)

    return bind


class Interpolation(Reduction):
    r"""Linear interpolation with fixed weights :math:`z_j = \sum_i w_{ji} x_i` (family ``sum``).

    Upsampling or downsampling by (bi/tri)linear or (anti-aliased) cubic interpolation is a weighted sum of input
    elements whose weights depend only on positions, not on the data: it is the same kind of op as average
    pooling, and the preset's ``sum`` rule (ε-rule: :math:`R_i = x_i \sum_j w_{ji} R_j / \mathrm{stab}(z_j)`)
    applies. The weights are never materialised: the rule takes the op's own vector-Jacobian product.
    """


# ----------------------------------------------------------------------------------------------------------
# copies (routing)


def _nearest(op, nd: int):
    def replay(fn, x):
        return op(x, list(saved(fn, "output_size")), *_scales(fn, nd))

    return replay


def _routing(replay, transparent: bool = False) -> Routing:
    spec = Routing(replay)
    spec.transparent = transparent
    return spec


class SavedSelfRouting(Routing):
    """A routing op that saved its input (``self``): an Arg Node whose output is replayed from it."""

    def saved_input(self, node, i):
        return saved(node.fn, "self") if i == 0 else None

    def output(self, node, nr):
        x = saved(node.fn, "self")
        return None if x is None or nr != 0 else self.replay(node.fn, x)


class ConstantPad(Routing):
    r"""``F.pad(x, pad, value=c)`` (``constant_pad_nd``; negative pads crop): routing.

    Every output element is either a copy of an input element, whose relevance goes back to it, or the fill
    constant, whose relevance (what the consumer's rule gave a constant: nothing, from an ε-rule on zero padding)
    goes to no operand. Autograd does not save the fill value, so a replay pads with zeros
    and is *provisional* (as for ``masked_fill``): a consumer that needs the padded tensor takes it from a node
    that saved it (a convolution saves its padded input), a softmax checks it, anything else raises rather than
    use a possibly wrong fill value.
    """

    always_provisional = True

    def __init__(self):
        super().__init__(lambda fn, x: F.pad(x, list(saved(fn, "pad"))))


class CopyIntoView(OpSpec):
    r"""``CopySlices`` wrapping ``copy_``: ``out = base`` with a view of it overwritten by ``src`` (broadcast).

    Every output element is a copy of a base element or of a source element, so relevance is routed through the
    node's own backward (exact: overwritten base elements get none, a broadcast source element gets the sum over
    its copies). autograd does not expose the view's geometry, but it is not needed: the op is linear in
    ``(base, src)``, :math:`z = J_b\,b + J_s\,s`, and the node's backward computes :math:`(J_b^\top u,
    J_s^\top u)`; differentiating :math:`\langle J_b^\top u, b\rangle + \langle J_s^\top u, s\rangle` with
    respect to :math:`u` gives :math:`z` back exactly -- the replay. A base outside the graph (``torch.empty``,
    ``torch.zeros``) is taken as zeros, the convention of :mod:`~dynamiclrp.ops.index`: exact where it is
    overwritten (circular padding, SigLIP-2 overwrite every element). ``CopySlices`` around any other in-place
    op on a view (``x[:, i].add_(y)``, ``x[:, i].mul_(y)``) is not a copy and raises.
    """

    @staticmethod
    def _check(node):
        if not _wraps_copy(node.fn):
            wrapped = type(getattr(node.fn, "_wrapped_node", None)).__name__
            raise DynamicLRPError(
                f"CopySlices (node #{node.id}) wraps an in-place op on a view that is not a copy ({wrapped}); only "
                "copy_ / slice assignment into a view has a rule. Write the op out of place, or register a rule "
                "with dynamiclrp.register_op"
            )

    def forward(self, node, inputs):
        if len(inputs) != 2 or not _wraps_copy(node.fn):
            raise NotImplementedError
        base, src = inputs
        if src is None:
            raise NotImplementedError  # a constant source: autograd saved nothing of it
        meta = node.fn._input_metadata[0]
        u = torch.zeros(meta.shape, dtype=src.dtype, device=src.device, requires_grad=True)
        with torch.enable_grad():
            gb, gs = node.fn(u)
            inner = (gs * src).sum()
            if base is not None and gb is not None:
                inner = inner + (gb * base.to(src.dtype)).sum()
            (z,) = torch.autograd.grad(inner, u)
        return z

    def relevance(self, ctx):
        self._check(ctx.node)
        return route(ctx)


def _wraps_copy(fn) -> bool:
    """Whether a ``CopySlices`` node wraps ``copy_``: read from ``_wrapped_node`` where torch exposes it (2.12+),
    else tested on the node's backward -- a copy's Jacobian holds exactly one 1 per output element, so its
    transpose maps an uneven positive ``u`` to vectors that sum to ``sum(u)`` (when the base is in the graph; an
    in-place ``add_`` gives more, ``mul_`` something else) and maps ones to whole numbers (how many copies each
    source element has)."""
    wrapped = getattr(fn, "_wrapped_node", None)
    if wrapped is not None or hasattr(fn, "_wrapped_node"):
        return type(wrapped).__name__ == "CopyBackwards"
    meta = fn._input_metadata[0]
    if len(fn.next_functions) != 2:
        return False
    with torch.no_grad():
        n = math.prod(meta.shape)  # a fixed, uneven positive probe (no random state touched)
        u = (1.5 + torch.sin(0.7 * torch.arange(n, dtype=torch.float64, device=meta.device))).reshape(meta.shape)
        u = u.to(meta.dtype)
        gb, gs = fn(u)
        counts = fn(torch.ones(meta.shape, dtype=meta.dtype, device=meta.device))[1]
        if gs is None or counts is None or not bool((counts == counts.round()).all() and (counts >= 0).all()):
            return False
        if gb is None:
            return True
        total = gb.double().sum() + gs.double().sum()
        return bool(torch.isclose(total, u.double().sum(), rtol=1e-4, atol=0.0))


def _pad(name: str):
    op = getattr(aten, name)
    return lambda fn, x: op(x, list(saved(fn, "padding")))


def _im2col(fn, x):
    return F.unfold(x, saved(fn, "kernel_size"), saved(fn, "dilation"), saved(fn, "padding"), saved(fn, "stride"))


def _col2im(fn):
    size = tuple(out_shape(fn)[-2:])
    return lambda x: F.fold(x, size, saved(fn, "kernel_size"), saved(fn, "dilation"), saved(fn, "padding"),
                            saved(fn, "stride"))


RESAMPLE_OPS: dict[str, OpSpec] = {
    # nearest-neighbour resampling: each output element copies one input element
    "UpsampleNearest1DBackward0": _routing(_nearest(aten.upsample_nearest1d, 1)),
    "UpsampleNearest2DBackward0": _routing(_nearest(aten.upsample_nearest2d, 2)),
    "UpsampleNearest3DBackward0": _routing(_nearest(aten.upsample_nearest3d, 3)),
    "UpsampleNearestExact1DBackward0": _routing(_nearest(aten._upsample_nearest_exact1d, 1)),
    "UpsampleNearestExact2DBackward0": _routing(_nearest(aten._upsample_nearest_exact2d, 2)),
    "UpsampleNearestExact3DBackward0": _routing(_nearest(aten._upsample_nearest_exact3d, 3)),
    # interpolation: a fixed weighted sum of input elements
    "UpsampleLinear1DBackward0": Interpolation(_interp(aten.upsample_linear1d, 1)),
    "UpsampleBilinear2DBackward0": Interpolation(_interp(aten.upsample_bilinear2d, 2)),
    "UpsampleBilinear2DAaBackward0": Interpolation(_interp(aten._upsample_bilinear2d_aa, 2)),
    "UpsampleBicubic2DBackward0": Interpolation(_interp(aten.upsample_bicubic2d, 2)),
    "UpsampleBicubic2DAaBackward0": Interpolation(_interp(aten._upsample_bicubic2d_aa, 2)),
    "UpsampleTrilinear3DBackward0": Interpolation(_interp(aten.upsample_trilinear3d, 3)),
    # padding: copies of input elements, or a constant
    "ConstantPadNdBackward0": ConstantPad(),
    **{f"{mode}Pad{nd}DBackward0": SavedSelfRouting(_pad(f"{mode.lower()}_pad{nd}d"))
       for mode in ("Reflection", "Replication") for nd in (1, 2, 3)},
    # pixel (un)shuffle: a permutation of elements
    "PixelShuffleBackward0": _routing(lambda fn, x: F.pixel_shuffle(x, saved(fn, "upscale_factor")),
                                      transparent=True),
    "PixelUnshuffleBackward0": _routing(lambda fn, x: F.pixel_unshuffle(x, saved(fn, "downscale_factor")),
                                        transparent=True),
    # unfold (im2col) copies patches out; fold (col2im) adds overlapping patches back up
    "Im2ColBackward0": _routing(_im2col),
    "Col2ImBackward0": Reduction(_col2im),
    # copy_ into a view (circular padding, slice assignment)
    "CopySlices": CopyIntoView(),
}
