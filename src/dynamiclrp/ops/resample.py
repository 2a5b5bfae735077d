r"""Resampling and padding: upsampling / interpolation, padding, pixel (un)shuffle, im2col / col2im.

Three kinds of op live here:

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

Circular padding (``F.pad(mode="circular")``) writes the wrapped borders into an empty tensor: a
``CopySlices`` node, see :mod:`~dynamiclrp.ops.inplace`. The input of an upsampling node is not saved by
autograd: a promise recovers it. Reflection and replication padding save theirs and are Arg Nodes. Constant
padding does not save its fill value, so its replay is
provisional (see :class:`ConstantPad`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import OpSpec, Routing, out_shape, saved
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
}
