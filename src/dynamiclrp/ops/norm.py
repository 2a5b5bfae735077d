"""Normalisation layers: layer norm and batch norm (family ``norm``).

Relevance goes to the normalised input only; the affine weight and bias, and the statistics, receive none
(AttnLRP's and the paper's identity treatment). Their outputs are reproducible from what autograd saved, so they
are Arg Nodes for the Promise System.
"""

from __future__ import annotations

from .base import OpSpec, saved


class Norm(OpSpec):
    family = "norm"

    def __init__(self, normalise):
        self.normalise = normalise

    def saved_input(self, node, i):
        return saved(node.fn, "input") if i == 0 else None

    def output(self, node, nr):
        x = saved(node.fn, "input")
        w, b = saved(node.fn, "weight", None), saved(node.fn, "bias", None)
        if x is None or nr != 0 or self._bias_unknown(node, w, b):
            return None  # batch norm does not save its bias: replay it with the bias from the graph
        return _affine(node, self.normalise(node.fn, x), w, b)

    def forward(self, node, inputs):
        w = inputs[1] if len(inputs) > 1 and inputs[1] is not None else saved(node.fn, "weight", None)
        b = inputs[2] if len(inputs) > 2 and inputs[2] is not None else saved(node.fn, "bias", None)
        if self._bias_unknown(node, w, b):
            raise NotImplementedError
        return _affine(node, self.normalise(node.fn, inputs[0]), w, b)

    @staticmethod
    def _bias_unknown(node, w, b) -> bool:
        """An affine norm whose bias neither autograd saved nor the graph holds (a frozen batch-norm bias).

        The graph cannot tell a frozen bias from no bias, so an affine layer (weight present) is assumed to have
        one: its output is then only recoverable from a consumer that saved it.
        """
        return b is None and (_has(node, 2) or (w is not None and node.kind.startswith("NativeBatchNorm")))

    def relevance(self, ctx):
        (R,) = ctx.R[:1]
        return [ctx.rule("norm").norm(R)] + [None] * (len(ctx.node.inputs) - 1)


def _has(node, i: int) -> bool:
    return len(node.inputs) > i and node.inputs[i] is not None


def _affine(node, xhat, w, b):
    if node.kind.startswith("NativeBatchNorm"):
        view = (1, -1) + (1,) * (xhat.dim() - 2)
        w = None if w is None else w.reshape(view)
        b = None if b is None else b.reshape(view)
    if w is not None:
        xhat = xhat * w
    if b is not None:
        xhat = xhat + b
    return xhat


def _layer_norm(fn, x):
    return (x - saved(fn, "result1")) * saved(fn, "result2")


def _batch_norm(fn, x):
    view = (1, -1) + (1,) * (x.dim() - 2)
    if saved(fn, "training"):
        mean, invstd = saved(fn, "result1"), saved(fn, "result2")
    else:
        mean, var = saved(fn, "running_mean"), saved(fn, "running_var")
        invstd = (var + saved(fn, "eps")).rsqrt()
    return (x - mean.reshape(view)) * invstd.reshape(view)


NORM_OPS = {
    "NativeLayerNormBackward0": Norm(_layer_norm),
    "NativeBatchNormBackward0": Norm(_batch_norm),
}
