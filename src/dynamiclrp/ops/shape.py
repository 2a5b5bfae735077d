"""Routing ops: views, permutations, broadcasts, slicing, indexing, concatenation, splitting, max selection.

Each output element is a copy of one input element (or a selection among several), so relevance follows the
elements back through the node's own backward (:func:`~dynamiclrp.ops.base.route`): exact, conservative, and
no activation needed. The ``replay`` functions let the Promise System carry an activation through them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Routing, out_shape, saved


def _reshape(fn, x):
    return x.reshape(out_shape(fn))


def _index(fn, x):
    return torch.ops.aten.index.Tensor(x, list(saved(fn, "indices")))


def _maxpool(fn, x):
    nd = len(saved(fn, "kernel_size"))  # not x.dim(): the input may be unbatched
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    return pool(x, saved(fn, "kernel_size"), saved(fn, "stride"), saved(fn, "padding"),
                saved(fn, "dilation"), saved(fn, "ceil_mode"))


class MaxPool(Routing):
    """Max pooling: winner takes all (relevance to the arg-max of each window)."""

    def __init__(self):
        super().__init__(lambda fn, x: _maxpool(fn, x))

    def saved_input(self, node, i):
        return saved(node.fn, "self") if i == 0 else None

    def output(self, node, nr):
        x = saved(node.fn, "self")
        return None if x is None or nr != 0 else _maxpool(node.fn, x)


class Gather(Routing):
    def __init__(self):
        super().__init__(lambda fn, x: torch.gather(x, saved(fn, "dim"), saved(fn, "index")))

    def saved_input(self, node, i):
        return saved(node.fn, "self") if i == 0 else None

    def output(self, node, nr):
        x = saved(node.fn, "self")
        return None if x is None else self.replay(node.fn, x)


class MaxFull(Routing):
    def output(self, node, nr):
        return saved(node.fn, "result")

    def saved_input(self, node, i):
        return saved(node.fn, "self") if i == 0 else None


class Where(Routing):
    """``where(cond, a, b)``: relevance follows the selected element; a constant operand replays as zero."""

    zero_constants = True

    def forward(self, node, inputs):
        cond = saved(node.fn, "condition")
        a, b = (x if x is not None else torch.zeros((), dtype=_dtype(inputs), device=cond.device)
                for x in inputs)
        return torch.where(cond, a, b)


class MaskedFill(Routing):
    """``x.masked_fill(mask, value)``: relevance of filled positions is dropped. The fill value is not saved, so a
    replay fills zeros and is *provisional* (see :class:`~dynamiclrp.ops.attention.Softmax`)."""

    always_provisional = True

    def forward(self, node, inputs):
        return inputs[0].masked_fill(saved(node.fn, "mask"), 0.0)


def _dtype(inputs):
    return next((x.dtype for x in inputs if x is not None), torch.float32)


def _routing(replay=None, transparent=True, invert=None):
    spec = Routing(replay)
    spec.transparent = transparent
    spec.invert = invert
    return spec


def _unreshape(fn, y, shape):
    return y.reshape(shape)


def _untranspose(fn, y, shape):
    return y.transpose(saved(fn, "dim0"), saved(fn, "dim1"))


def _unpermute(fn, y, shape):
    dims = [d % y.dim() for d in saved(fn, "dims")]
    return y.permute([dims.index(k) for k in range(len(dims))])


def _unexpand(fn, y, shape):
    """Expanded copies are identical: the first along every new or expanded dimension."""
    y = y[(0,) * (y.dim() - len(shape))]
    for d, n in enumerate(shape):
        if n == 1 and y.shape[d] != 1:
            y = y.narrow(d, 0, 1)
    return y


SHAPE_OPS = {
    **{k: _routing(_reshape, invert=_unreshape) for k in (
        "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0",
        "SqueezeBackward1", "SqueezeBackward2", "UnsqueezeBackward0",
    )},
    "ExpandBackward0": _routing(lambda fn, x: x.expand(out_shape(fn)), invert=_unexpand),
    "TransposeBackward0": _routing(lambda fn, x: x.transpose(saved(fn, "dim0"), saved(fn, "dim1")),
                                   invert=_untranspose),
    "TransposeBackward1": _routing(lambda fn, x: x.transpose(saved(fn, "dim0"), saved(fn, "dim1")),
                                   invert=_untranspose),
    "TBackward0": _routing(lambda fn, x: x.t(), invert=lambda fn, y, shape: y.t()),
    "PermuteBackward0": _routing(lambda fn, x: x.permute(saved(fn, "dims")), invert=_unpermute),
    "RepeatBackward0": _routing(lambda fn, x: x.repeat(saved(fn, "repeats"))),
    "SliceBackward0": _routing(lambda fn, x: torch.ops.aten.slice.Tensor(
        x, saved(fn, "dim"), saved(fn, "start"), saved(fn, "end"), saved(fn, "step"))),
    "SelectBackward0": _routing(lambda fn, x: x.select(saved(fn, "dim"), saved(fn, "index"))),
    "IndexBackward0": _routing(_index),
    "IndexSelectBackward0": _routing(lambda fn, x: x.index_select(saved(fn, "dim"), saved(fn, "index"))),
    "FlipBackward0": _routing(lambda fn, x: x.flip(saved(fn, "dims"))),
    "RollBackward0": _routing(lambda fn, x: x.roll(saved(fn, "shifts"), saved(fn, "dims"))),
    "UnfoldBackward0": _routing(lambda fn, x: x.unfold(saved(fn, "dimension"), saved(fn, "size"),
                                                       saved(fn, "step"))),
    "CatBackward0": _routing(lambda fn, *xs: torch.cat(xs, saved(fn, "dim")), transparent=False),
    "StackBackward0": _routing(lambda fn, *xs: torch.stack(xs, saved(fn, "dim")), transparent=False),
    "SplitBackward0": _routing(lambda fn, x: x.split(saved(fn, "split_size"), saved(fn, "dim"))),
    "SplitWithSizesBackward0": _routing(lambda fn, x: x.split(list(saved(fn, "split_sizes")), saved(fn, "dim"))),
    "UnbindBackward0": _routing(lambda fn, x: x.unbind(saved(fn, "dim"))),
    "GatherBackward0": Gather(),
    "MaxBackward0": _routing(lambda fn, x: x.max(saved(fn, "dim"), saved(fn, "keepdim"))),
    "MaxBackward1": MaxFull(lambda fn, x: x.max()),
    "MaskedFillBackward0": MaskedFill(),
    "WhereBackward0": Where(),
    "MaxPool2DWithIndicesBackward0": MaxPool(),
    "MaxPool3DWithIndicesBackward0": MaxPool(),
    # topk / sort values are copies of the elements they select (mixture-of-experts routing): a gather with the
    # saved indices replays them
    "TopkBackward0": _routing(lambda fn, x: x.gather(saved(fn, "dim"), saved(fn, "indices")), transparent=False),
    "SortBackward0": _routing(lambda fn, x: x.gather(saved(fn, "dim"), saved(fn, "indices")), transparent=False),
    "SortBackward1": _routing(lambda fn, x: x.gather(saved(fn, "dim"), saved(fn, "indices")), transparent=False),
    # masked_fill with a 0-dim tensor as the value (DistilBERT): the value is a constant, as for MaskedFillBackward0
    "MaskedFillBackward1": MaskedFill(),
    "DiagonalBackward0": _routing(lambda fn, x: x.diagonal(saved(fn, "offset"), saved(fn, "dim1"), saved(fn, "dim2"))),
}
