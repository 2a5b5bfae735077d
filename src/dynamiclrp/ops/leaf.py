"""Leaves and lookups: AccumulateGrad (a tensor that requires grad) and embedding lookups."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import OpSpec, route, saved


class Leaf(OpSpec):
    """A leaf tensor: its value is the variable itself. Data unless it is an ``nn.Parameter``."""

    def decompose(self, fn):
        return [(type(fn).__name__, self, [])]

    def n_outputs(self, node):
        return 1

    def is_data_source(self, node):
        return not isinstance(node.fn.variable, torch.nn.Parameter)

    def output(self, node, nr):
        return node.fn.variable


class Embedding(OpSpec):
    """``weight[indices]``: the start of the data path of a token model; relevance per token is read here."""

    transparent = False

    def is_data_source(self, node):
        return True

    def forward(self, node, inputs):
        pad = saved(node.fn, "padding_idx")
        return F.embedding(saved(node.fn, "indices"), inputs[0], pad if pad is not None and pad >= 0 else None)

    def relevance(self, ctx):
        return route(ctx) if ctx.wants(0) else [None]


LEAF_OPS = {
    "AccumulateGrad": Leaf(),
    "EmbeddingBackward0": Embedding(),
}
