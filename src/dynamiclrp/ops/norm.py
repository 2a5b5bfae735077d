r"""Normalisation layers: layer, batch, group and fused RMS norm, and weight normalisation (family ``norm``).

Relevance goes to the normalised input only; the affine weight and bias, and the statistics, receive none
(AttnLRP's and the paper's identity treatment: :math:`\hat x = (x - \mu)/\sigma` is explained as if the
statistics were constants, so :math:`R_x = R` with the preset's ``Pass`` rule). Their outputs are reproducible
from what autograd saved, so they are Arg Nodes for the Promise System.

Group norm is layer norm over groups of channels (and instance norm, when torch lowers it to group norm, one
channel per group): the same rule. Weight normalisation is a computation on parameters only (see
:class:`WeightNorm`).
"""

from __future__ import annotations

import torch

from ..rules import IDENTITY, LINEARISED, MergeBatchNorm, vjp
from .base import OpSpec, gradient_of_rule_form, rule_form, saved, spare
from .linear import merged_norm_step


class Norm(OpSpec):
    family = "norm"

    def __init__(self, normalise, linear=None, linear_vjp=None):
        self.normalise, self.linear = normalise, linear  # linear: the map left when the statistics are fixed
        self.linear_vjp = linear_vjp  # its transpose in closed form, ``linear_vjp(fn, w, g)`` (optional)

    def saved_input(self, node, i):
        return saved(node.fn, "input") if i == 0 else None

    def output(self, node, nr):
        x = saved(node.fn, "input")
        w, b = saved(node.fn, "weight", None), saved(node.fn, "bias", None)
        if x is None or nr != 0 or self._bias_unknown(node, w, b):
            return None  # batch norm does not save its bias: replay it with the bias from the graph
        return self._apply(node, x, w, b)

    def forward(self, node, inputs):
        w = inputs[1] if len(inputs) > 1 and inputs[1] is not None else saved(node.fn, "weight", None)
        b = inputs[2] if len(inputs) > 2 and inputs[2] is not None else saved(node.fn, "bias", None)
        if self._bias_unknown(node, w, b):
            raise NotImplementedError
        return self._apply(node, inputs[0], w, b)

    def _apply(self, node, x, w, b):
        y = _eval_batch_norm(node, x, w, b) if node.kind.startswith(_BATCH_NORMS) else None
        return y if y is not None else _affine(node, self.normalise(node.fn, x), w, b)

    @staticmethod
    def _bias_unknown(node, w, b) -> bool:
        """An affine norm whose bias neither autograd saved nor the graph holds (a frozen batch-norm bias).

        The graph cannot tell a frozen bias from no bias, so an affine layer (weight present) is assumed to have
        one: its output is then only recoverable from a consumer that saved it.
        """
        return b is None and (_has(node, 2) or (w is not None and node.kind.startswith(_PER_CHANNEL)))

    def relevance(self, ctx):
        (R,) = ctx.R[:1]
        rule = ctx.rule("norm")
        rest = [None] * (len(ctx.node.inputs) - 1)
        if getattr(rule, "linearises", False) and self.linear is not None:
            x = ctx.input(0)
            w = saved(ctx.node.fn, "weight", None)
            fn = self.linear(ctx.node.fn, None if w is None else w.to(ctx.dtype), ctx.dtype)
            return [rule.linearised(x, R, fn, ctx.output(0))] + rest
        return [rule.norm(R)] + rest

    def gradient_step(self, ctx):
        rule = ctx.rule("norm")
        if isinstance(rule, MergeBatchNorm):
            return merged_norm_step(ctx)
        form = rule_form(rule, "norm")
        if form is not LINEARISED:
            return gradient_of_rule_form(form, ctx)
        if self.linear is None:
            return gradient_of_rule_form(IDENTITY, ctx)  # the rule passes R on where it cannot linearise
        n = len(ctx.node.inputs)

        def hook(grad_inputs, grad_outputs):
            g = grad_outputs[0]
            if g is None or grad_inputs[0] is None:
                return grad_inputs
            fn = ctx.node.fn  # read when the step runs: a plan rebinds the context to the next run's node
            w = saved(fn, "weight", None)
            w = None if w is None else w.to(g.dtype)
            if self.linear_vjp is not None:
                out = spare(grad_inputs[0], g.shape, g.dtype, g, *([] if w is None else [w]))
                gx = self.linear_vjp(fn, w, g, out)
            else:
                (gx,) = vjp(self.linear(fn, w, g.dtype), [ctx.input(0)], g)
            return (gx,) + (None,) * (n - 1)  # R_x = x ⊙ Jᵀ(R / y) = x ⊙ Jᵀ g for R = y ⊙ g

        return hook


def _scaled(t, rstd, w, view=None):
    t = t * rstd
    if w is not None:
        t = t * (w if view is None else w.reshape(view))
    return t


def _layer_norm_linear(fn, w, dt):
    """``(x - mean(x)) * rstd * w`` with ``rstd`` held constant: linear in ``x`` (LXT's layer norm)."""
    dims = tuple(range(-len(saved(fn, "normalized_shape")), 0))
    rstd = saved(fn, "result2").to(dt)
    return lambda t: _scaled(t - t.mean(dims, keepdim=True), rstd, w)


def _layer_norm_linear_vjp(fn, w, g, out=None):
    """The transpose of :func:`_layer_norm_linear`: ``rstd * (w g - mean(w g))`` over the normalised dimensions,
    into ``out`` (a tensor like ``g``, or None)."""
    dims = tuple(range(-len(saved(fn, "normalized_shape")), 0))
    wg = torch.mul(g, 1.0 if w is None else w, out=out)
    return wg.sub_(wg.mean(dims, keepdim=True)).mul_(saved(fn, "result2").to(g.dtype))


def _batch_norm_linear(fn, w, dt):
    """Eval: ``x * w / sqrt(var + eps)`` (the running mean is a constant shift); train: centred over the batch."""
    def f(t):
        view = (1, -1) + (1,) * (t.dim() - 2)
        if saved(fn, "training", False):
            dims = (0,) + tuple(range(2, t.dim()))
            return _scaled(t - t.mean(dims, keepdim=True), saved(fn, "result2").to(dt).reshape(view), w, view)
        eps = saved(fn, "eps", None)
        var = saved(fn, "running_var").to(dt)
        return _scaled(t, (var + (saved(fn, "epsilon") if eps is None else eps)).rsqrt().reshape(view), w, view)

    return f


def _has(node, i: int) -> bool:
    return len(node.inputs) > i and node.inputs[i] is not None


# norms whose affine weight and bias are per channel (dimension 1), and which do not save their bias
_PER_CHANNEL = ("NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm", "NativeGroupNorm")


def _affine(node, xhat, w, b):
    if node.kind.startswith(_PER_CHANNEL):
        view = (1, -1) + (1,) * (xhat.dim() - 2)
        w = None if w is None else w.reshape(view)
        b = None if b is None else b.reshape(view)
    if w is not None:
        xhat = xhat * w
    if b is not None:
        xhat = xhat + b
    return xhat


_BATCH_NORMS = ("NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm")


def _eval_batch_norm(node, x, w, b):
    """An eval-mode batch norm replayed by the forward's own kernel on its running statistics: the forward's output
    bit for bit, in one pass (the formula takes four). None in training mode, or where the dtypes differ from the
    statistics' (the formula then computes it)."""
    fn = node.fn
    if saved(fn, "training", False):
        return None
    mean, var = saved(fn, "running_mean"), saved(fn, "running_var")
    if mean is None or var is None or any(t is not None and t.dtype != mean.dtype for t in (x, w, b)):
        return None
    eps = saved(fn, "eps", None)  # the cuDNN / MIOpen nodes call it "epsilon"
    eps = saved(fn, "epsilon") if eps is None else eps
    return torch.batch_norm(x, w, b, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)


def _layer_norm(fn, x):
    return (x - saved(fn, "result1")) * saved(fn, "result2")


def _batch_norm(fn, x):
    view = (1, -1) + (1,) * (x.dim() - 2)
    if saved(fn, "training"):
        mean, invstd = saved(fn, "result1"), saved(fn, "result2")
    else:
        mean, var = saved(fn, "running_mean"), saved(fn, "running_var")
        eps = saved(fn, "eps", None)  # the cuDNN / MIOpen nodes call it "epsilon"
        invstd = (var + (saved(fn, "epsilon") if eps is None else eps)).rsqrt()
    return (x - mean.reshape(view)) * invstd.reshape(view)


def _group_norm(fn, x):
    """``(x - mean) * rstd`` per sample and group of channels (``result1``, ``result2``: shape (N, group))."""
    n, g = x.shape[0], saved(fn, "group")
    mean, rstd = saved(fn, "result1"), saved(fn, "result2")
    xg = x.reshape(n, g, -1)
    return ((xg - mean.reshape(n, g, 1)) * rstd.reshape(n, g, 1)).reshape(x.shape)


def _rms_norm(fn, x):
    """``x * rstd`` over the normalised trailing dimensions (``result1``: rstd, broadcastable)."""
    return x * saved(fn, "result1")


class WeightNorm(OpSpec):
    r"""Weight normalisation ``w = g * v / ||v||`` (``torch._weight_norm``; the fused ``_weight_norm_interface``
    node of ``nn.utils.weight_norm`` and of ``nn.utils.parametrizations.weight_norm``, family ``norm``).

    Its operands ``v`` and ``g`` are parameters, so this node is not on the data path: its output is the weight
    of the layer that consumes it (Wav2Vec2's positional convolution), whose rule treats it as the weight. It
    needs an entry all the same -- the engine must know every node -- and it is an Arg Node: autograd saved
    ``v`` and ``g``, from which the weight is recomputed exactly. When parameter relevance is asked for (the
    ``params`` of :func:`dynamiclrp.explain`), the weight's relevance goes to the direction ``v`` through the
    preset's ``norm`` rule, and none to the magnitude ``g`` -- the treatment of layer norm, whose normalised input
    gets the relevance and whose affine scale none: :math:`v / \lVert v\rVert` is a normalisation of ``v``, and
    ``g`` multiplies it as an affine weight does.
    """

    family = "norm"

    def saved_input(self, node, i):
        return saved(node.fn, ("v", "g")[i]) if i < 2 else None

    def output(self, node, nr):
        v, g = saved(node.fn, "v"), saved(node.fn, "g")
        return None if v is None or g is None or nr != 0 else torch._weight_norm(v, g, saved(node.fn, "dim"))

    def forward(self, node, inputs):
        v, g = (inputs[i] if inputs[i] is not None else self.saved_input(node, i) for i in (0, 1))
        return torch._weight_norm(v, g, saved(node.fn, "dim"))

    def relevance(self, ctx):
        R = ctx.R[0]
        return [ctx.rule("norm").norm(R)] + [None] * (len(ctx.node.inputs) - 1)


NORM_OPS = {
    "NativeLayerNormBackward0": Norm(_layer_norm, _layer_norm_linear, _layer_norm_linear_vjp),
    "NativeBatchNormBackward0": Norm(_batch_norm, _batch_norm_linear),
    # batch norm on CUDA (cuDNN) and ROCm (MIOpen): the same layer, the same saved statistics
    "CudnnBatchNormBackward0": Norm(_batch_norm, _batch_norm_linear),
    "MiopenBatchNormBackward0": Norm(_batch_norm, _batch_norm_linear),
    "NativeGroupNormBackward0": Norm(_group_norm),
    # F.rms_norm on CUDA (a fused kernel; on CPU torch writes it out as x * rsqrt(mean(x²) + eps) * w)
    "FusedRmsNormBackward0": Norm(_rms_norm),
    "WeightNormInterfaceBackward0": WeightNorm(),
}
