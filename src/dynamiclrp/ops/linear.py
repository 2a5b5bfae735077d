"""Linear algebra: mm, bmm, addmm, baddbmm, convolution (1d/2d/3d, transposed, groups, stride, dilation).

A product of an activation and a weight is explained by the preset's ``dense``/``conv`` rule (or ``input`` for
the first layer); a product of two activations by its ``product`` rule (``attention`` when one factor is a
softmax output). Fused ops are split: ``addmm`` -> add(bias, mm), convolution with bias -> add(bias, conv),
``baddbmm`` -> add(bias, bmm).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ActivationUnavailableError
from ..plan import active_plan, caching_weights
from ..rules import PLAIN, LinearMap, MergeBatchNorm, Stabilised, add_terms
from .attention import product_step_of
from .base import (
    NEXT,
    PART,
    OpSpec,
    held_constant,
    identity_gradient,
    one_operand_step,
    out_shape,
    relu_above,
    rule_form,
    saved,
    sole_consumer,
    stabilised_gradient,
    through_views,
    undo_views,
)
from .elementwise import _VIEWS, Add, AddTerms, BiasAdd, _scaled
from .reduce import Reduction
from .shape import MaxPool


def _bias_add_of(ctx):
    """The bias addition of this linear op: a part of the same fused node (``addmm``, convolution), or an addition
    after views of its output (``F.linear`` on a non-contiguous input, see :class:`~.elementwise.Add`); or None."""
    graph, node = ctx.run.graph, ctx.node
    add = sole_consumer(graph, node.id)
    if add is not None and add.fn is node.fn:
        return add if isinstance(add.spec, BiasAdd) else None
    while add is not None and add.kind in _VIEWS:
        node, add = add, sole_consumer(graph, add.id)
    if add is None or not isinstance(add.spec, BiasAdd):
        return None
    e = add.inputs[add.spec.linear_index]
    return add if e is not None and e.child == node.id else None


def _layer_output(ctx):
    """The node whose output is this layer's output with its bias: the bias addition, or the op itself."""
    return _bias_add_of(ctx) or ctx.node


def _fused_bias(ctx):
    """The bias of this linear op when its bias addition passed all relevance on (BiasInDenominator), else None."""
    add = _bias_add_of(ctx)
    if add is None or not add.spec.fuses(ctx, add):
        return None
    b = add.spec.bias_term(ctx, add)
    if b is not None and add.fn is not ctx.node.fn:  # added after views: a 1-d bias along the last dimension
        b = b.reshape([1] * (len(out_shape(ctx.node.fn)) - 1) + [-1])
    return b


def _from_saved_layer_output(ctx):
    """This op's output from a copy of its layer's output (bias included) that a consumer saved, the bias
    subtracted; None where there is no such copy. Only a fused bias (``addmm``, convolution): after views the copy
    would have the view's shape."""
    add = _bias_add_of(ctx)
    if add is None or add.fn is not ctx.node.fn:
        return None
    return add.spec.linear_output(ctx, add)


def _after_relu(ctx, x_i: int) -> bool:
    """Whether operand ``x_i`` is a ReLU's output (through views and max-pooling, which keep it non-negative)."""
    nodes = ctx.run.graph.nodes
    node = through_views(nodes, ctx.producer(x_i))
    while node is not None and node.kind.startswith("MaxPool") and node.inputs and node.inputs[0] is not None:
        node = through_views(nodes, nodes[node.inputs[0].child])
    return node is not None and node.kind == "ReluBackward0"


def _pre_activation(ctx, R, through_batch_norm: bool):
    """The layer's output (bias, and merged batch norm, included) read off a ReLU that alone consumes it: ReLU saves
    its output, equal to its input wherever that is positive. Used only if the relevance is zero wherever the ReLU
    output is zero (true for the rules above a ReLU that weigh by the activation); else None (recompute)."""
    graph, node = ctx.run.graph, _layer_output(ctx)
    if through_batch_norm:
        node = sole_consumer(graph, node.id)
    found = None if node is None else relu_above(graph, node, ctx.dtype)
    if found is None:
        return None
    relu, r = found
    if r.shape != R.shape:
        return None
    if _weighs_by_value(ctx, relu):  # the graph proves it: no pass over R, no read by the host
        return r
    # relevance where the ReLU output is 0 (r >= 0): |R| (1 - sign r) > 0 there; arithmetic, as bool tensors are slow
    if bool(R.abs().mul_(r.sign().neg_().add_(1)).amax() > 0):
        return None
    return r


def _weighs_by_value(ctx, node) -> bool:
    """Whether the graph proves that the relevance the engine gives output 0 of ``node`` is zero wherever that
    output is: every consumer, seen through views that keep every element and through max-pooling (a window's
    relevance goes to its maximum, where the value is the window's output), weighs the relevance of its operand by
    the operand -- a rule that declares ``weighs_by_operand`` (ε, z⁺, γ, αβ) on a linear op whose other operand is
    a weight (not the input layer's rule), on a sum, or on an average pooling or mean -- and the operands are the
    saved values themselves (not addends recovered by subtraction). One such consumer's relevance is ``x ⊙ g``, so
    the sum of them all is 0 where ``x`` is. Else False: the caller then compares relevance and output element by
    element."""
    from ..engine import Context  # noqa: PLC0415 - the engine imports this module

    run = ctx.run
    if run.subtract_addends:
        return False
    graph, stack = run.graph, [node.id]
    while stack:
        for cid, i in graph.consumers.get((stack.pop(), 0), ()):
            c = graph.nodes[cid]
            if c.spec.invert is not None and len(c.inputs) == 1:  # a view, a copy: the same values
                stack.append(cid)
                continue
            if isinstance(c.spec, MaxPool) and i == 0:
                # routes each window's relevance to its maximum, which is 0 where that window's output is
                stack.append(cid)
                continue
            at = Context(run, c, [])
            if isinstance(c.spec, Product) and len(c.inputs) == 2 and not at.is_data(1 - i):
                family = c.spec.family_at(at, i)
                if family != "input" and getattr(at.rule(family), "weighs_by_operand", False):
                    continue
            elif type(c.spec) in (Add, AddTerms) and getattr(at.rule(c.spec.family), "weighs_by_operand", False):
                continue
            elif isinstance(c.spec, Reduction) and i == 0 and getattr(at.rule("sum"), "weighs_by_operand", False):
                continue  # average pooling, a mean: the sum rule on the pooled values, x ⊙ Jᵀ s
            return False
    return True


@dataclass(frozen=True)
class _MergedNorm:
    """An eval batch norm merged into the linear op before it: ``y = scale * z + shift`` per output feature (shaped
    to broadcast over the op's output); ``sources``: the tensors ``scale`` is computed from (the key of a plan's
    merged weight); ``positive``: whether every scale is > 0 (read off the device only where asked, and then once
    per plan: :class:`_DeviceTruth`)."""

    scale: torch.Tensor
    shift: torch.Tensor
    eps: float
    sources: tuple
    positive: _DeviceTruth


class _DeviceTruth:
    """A truth value computed on the tensors' device, brought to the host (a sync on a GPU) the first time it is
    asked for, then remembered: a plan keeps this object with the batch norm's constants, so a loop of explanations
    reads it once, not once per layer per explanation. ``flags``: one truth value, or element ``i`` of several
    that are read together (every batch norm of a graph: one read instead of one per layer)."""

    __slots__ = ("_flags", "_i")

    def __init__(self, flags: torch.Tensor | _HostCopy, i: int = 0):
        self._flags = flags if isinstance(flags, _HostCopy) else _HostCopy(flags)
        self._i = i

    def __bool__(self) -> bool:
        return bool(self._flags[self._i])


class _HostCopy:
    """A device tensor's elements as a host list, read (one sync) the first time one of them is asked for."""

    __slots__ = ("_tensor", "_values")

    def __init__(self, tensor: torch.Tensor):
        self._tensor, self._values = tensor, None

    def __getitem__(self, i: int):
        if self._values is None:
            self._values, self._tensor = self._tensor.reshape(-1).tolist(), None
        return self._values[i]


def _batch_norm_after(ctx, bias_handled: bool):
    """The eval-mode batch norm node that directly follows this linear op (after its bias addition, when the bias
    goes into the op's denominator: ``bias_handled``) and whose rule is MergeBatchNorm, or None."""
    if not bias_handled:
        return None
    bn = sole_consumer(ctx.run.graph, _layer_output(ctx).id, operand=0)
    if bn is None or out_shape(bn.fn) != out_shape(ctx.node.fn):  # not after views of the op's output
        return None
    if "BatchNorm" not in bn.kind or saved(bn.fn, "training", False):  # native, cuDNN, MIOpen
        return None
    return bn if isinstance(ctx.rule_at(bn, "norm"), MergeBatchNorm) else None


def layer_gradient_step(ctx, at):
    r"""The gradient step of a node of the linear layer whose op ``ctx`` is at (one operand a weight): the op
    itself, its bias addition or the batch norm merged into it, at which ``at`` is (the context the step reads its
    node through). The ε → 0 rule is the layer's own gradient (its bias in the denominator; a merged batch norm's
    scale is its gradient). A larger ε (:class:`~dynamiclrp.rules.Stabilised`) scales the gradient arriving at the
    layer's output -- the node whose output is the rule's denominator (:func:`_layer_top`) -- and the other nodes'
    backward is the layer's own. None for a rule without a gradient form."""
    spec = ctx.node.spec
    form = rule_form(ctx.rule(spec.family_at(ctx, spec.data_operand(ctx))), "linear")
    if form is PLAIN:
        return PLAIN
    if not isinstance(form, Stabilised):
        return None
    return stabilised_gradient(at, form.eps) if _layer_top(ctx) is at.node else PLAIN


def merged_norm_step(ctx):
    """The gradient step of a batch norm whose rule is MergeBatchNorm: the layer's (:func:`layer_gradient_step`)
    where the linear op below merges it, else the identity rule's (a norm layer that follows no linear op passes
    relevance unchanged)."""
    from ..engine import Context  # noqa: PLC0415 - the engine imports this module

    graph, e = ctx.run.graph, ctx.node.inputs[0] if ctx.node.inputs else None
    below = None if e is None else graph.nodes[e.child]
    if below is not None and isinstance(below.spec, BiasAdd):
        below = linear_op_below(graph, below)
    if below is not None and isinstance(below.spec, Product):
        op = Context(ctx.run, below, [])
        if not (op.is_data(0) and op.is_data(1)) and _layer_top(op) is ctx.node:
            return layer_gradient_step(op, ctx)
    return identity_gradient(ctx)


def _layer_top(ctx):
    """The node whose output is the denominator of this linear op's rule: the batch norm merged into it (as the
    node-by-node rule merges it: :func:`_merged_batch_norm` and a weight it can scale), else its bias addition
    where the bias goes into its denominator, else the op."""
    add = _bias_add_of(ctx)
    fused = add is not None and add.spec.fuses(ctx, add)
    bn = _batch_norm_after(ctx, fused or add is None)
    if bn is not None:
        x_i = ctx.node.spec.data_operand(ctx)
        w = saved(ctx.node.fn, ctx.node.spec.names[1 - x_i])
        if w is not None and ctx.node.spec.scales_per_output(ctx.node, w.shape, _scale_shape(bn), x_i):
            return bn
    return add if fused else ctx.node


def linear_op_below(graph, add):
    """The linear op whose bias the addition ``add`` (a :class:`BiasAdd`) adds, seen through views, or None."""
    e = add.inputs[add.spec.linear_index]
    node = None if e is None else graph.nodes[e.child]
    while node is not None and node.kind in _VIEWS and node.inputs and node.inputs[0] is not None:
        node = graph.nodes[node.inputs[0].child]
    return node if node is not None and isinstance(node.spec, Product) else None


def _scale_shape(bn) -> torch.Size:
    """The shape of a batch norm's per-channel constants, to broadcast over its output: (1, C, 1, ...)."""
    shape = out_shape(bn.fn)
    return torch.Size([1, shape[1]] + [1] * (len(shape) - 2))


def _merged_batch_norm(ctx, bias_handled: bool) -> _MergedNorm | None:
    """The eval-mode batch norm that directly follows this linear op (:func:`_batch_norm_after`) with its
    constants. They are kept by an active plan while its statistics, scale and bias are unchanged (a pass of
    small ops per layer otherwise)."""
    bn = _batch_norm_after(ctx, bias_handled)
    if bn is None:
        return None
    dt = ctx.dtype
    var, mean = saved(bn.fn, "running_var"), saved(bn.fn, "running_mean")
    gamma = saved(bn.fn, "weight", None)
    eps = _batch_norm_eps(bn)
    view = _scale_shape(bn)  # the batch norm's output has the layer's shape
    beta = None
    if len(bn.inputs) > 2 and bn.inputs[2] is not None:
        beta = ctx.run.promises.value(bn.inputs[2].child, bn.inputs[2].nr)

    def constants():
        together = _graph_batch_norm_constants(ctx.run, dt).get(bn.id)
        if together is not None:
            return together
        scale = (var.to(dt) + eps).rsqrt()
        if gamma is not None:
            scale = scale * gamma.to(dt)
        shift = -mean.to(dt) * scale
        if beta is not None:
            shift = shift + beta.to(dt)
        elif gamma is not None:  # an affine batch norm whose bias β the graph does not hold (frozen)
            shift = _frozen_batch_norm_shift(ctx, bn, scale.reshape(view))
        return scale.reshape(view), shift.reshape(view), _DeviceTruth((scale > 0).all())

    plan = active_plan()
    # β a parameter (a leaf of the graph), or no affine part: the constants depend on these tensors alone
    fixed = gamma is None or beta is not None and not ctx.run.graph.nodes[bn.inputs[2].child].inputs
    if plan is not None and fixed:
        parts = (var, mean) + tuple(t for t in (gamma, beta) if t is not None)
        scale, shift, positive = plan.derived(("batch-norm", eps, dt, len(view)), parts, constants)
    else:
        scale, shift, positive = constants()
    return _MergedNorm(scale, shift, eps, (var,) + (() if gamma is None else (gamma,)), positive)


def _batch_norm_eps(bn) -> float:
    eps = saved(bn.fn, "eps", None)
    return eps if eps is not None else saved(bn.fn, "epsilon")


def _graph_batch_norm_constants(run, dt: torch.dtype) -> dict[int, tuple]:
    """``{node id: (scale, shift, positive)}`` for every eval-mode batch norm of the run's graph whose bias is a
    parameter or absent, as :func:`_merged_batch_norm` computes them for one, worked out together the first time
    one is asked for and kept for the run: a few multi-tensor (``_foreach``) ops for all of them instead of eight
    ops per layer, and their positivity read by the host in one go instead of once per layer (on a GPU each read
    waits for the device to drain)."""
    key = ("batch-norm constants", dt)
    found = run.derived.get(key)
    if found is not None:
        return found
    nodes, graph = [], run.graph
    for bn in graph.nodes:
        if bn is None or "BatchNorm" not in bn.kind or saved(bn.fn, "training", False):
            continue
        gamma = saved(bn.fn, "weight", None)
        affine = len(bn.inputs) > 2 and bn.inputs[2] is not None
        if gamma is not None and not (affine and not graph.nodes[bn.inputs[2].child].inputs):
            continue  # the bias frozen, or computed in the graph: one at a time (_merged_batch_norm)
        nodes.append((bn, gamma, affine))
    out: dict[int, tuple] = {}
    if nodes:
        scale = torch._foreach_add([saved(bn.fn, "running_var").to(dt) for bn, _, _ in nodes],
                                   [float(_batch_norm_eps(bn)) for bn, _, _ in nodes])
        torch._foreach_rsqrt_(scale)
        scaled = [i for i, (_, gamma, _) in enumerate(nodes) if gamma is not None]
        if scaled:
            torch._foreach_mul_([scale[i] for i in scaled], [nodes[i][1].to(dt) for i in scaled])
        shift = torch._foreach_mul([saved(bn.fn, "running_mean").to(dt) for bn, _, _ in nodes], scale)
        torch._foreach_neg_(shift)
        biased = [i for i, (_, _, affine) in enumerate(nodes) if affine]
        if biased:
            betas = [run.promises.value(nodes[i][0].inputs[2].child, nodes[i][0].inputs[2].nr).to(dt)
                     for i in biased]
            torch._foreach_add_([shift[i] for i in biased], betas)
        # every scale > 0 (NaN is not): the largest of -scale below zero
        flags = _HostCopy(torch.stack(torch._foreach_max(torch._foreach_neg(scale))).lt(0))
        for i, (bn, _, _) in enumerate(nodes):
            view = _scale_shape(bn)
            out[bn.id] = (scale[i].reshape(view), shift[i].reshape(view), _DeviceTruth(flags, i))
    run.derived[key] = out
    return out


def _merged_bias(b: torch.Tensor | None, merged: _MergedNorm) -> torch.Tensor:
    """The bias of a layer with the batch norm after it merged in, ``b s + t`` (``t`` without a bias of its own):
    from the layer's constants alone, so kept by an active plan."""
    if b is None:
        return merged.shift
    plan = active_plan()
    if plan is None:
        return b * merged.scale + merged.shift
    return plan.derived(("merged bias",), (b, merged.scale, merged.shift), lambda: b * merged.scale + merged.shift)


def _frozen_batch_norm_shift(ctx, bn, scale):
    """``β - μγ/σ`` of a frozen affine batch norm: its output less ``x γ/σ``, from a saved copy of the output."""
    y = ctx.run.promises.available(bn, 0)
    if y is None:
        raise ActivationUnavailableError(
            f"{bn.kind} (node #{bn.id}) is a frozen affine batch norm to be merged into the layer before it, but its "
            "bias is not in the graph and no node saved its output; let the parameters require grad "
            "(dynamiclrp.explain does this) or use a preset without MergeBatchNorm"
        )
    x = ctx.run.promises.value(bn.inputs[0].child, bn.inputs[0].nr).to(ctx.dtype)
    per_element = y.to(ctx.dtype) - x * scale
    dims = [d for d in range(per_element.dim()) if d != 1]
    return per_element.mean(dims) if dims else per_element


def _is_softmax_output(ctx, i: int) -> bool:
    """Whether operand ``i`` is attention weights: a softmax output, seen through views."""
    node = through_views(ctx.run.graph.nodes, ctx.producer(i))
    return node is not None and node.spec.family == "softmax"


def _zero_padded_input(ctx, x_i: int, x: torch.Tensor):
    """``(image, to_operand, from_operand)`` when operand ``x_i`` is a model input zero-padded before this op,
    directly (a TF-"same" stem convolution: ``ZeroPad2d`` then ``conv``) or through views that keep every element
    (``F.linear`` folding a padded sequence), else None. ``to_operand`` pads and re-views (linear: it maps the
    image's relevance too), ``from_operand`` undoes the views and crops. The input layer's rule then works on the
    image itself, as zennit's does on the module's input: flat ones and z-box bounds are not put on the padding."""
    nodes, views = ctx.run.graph.nodes, []
    node = ctx.producer(x_i)
    while node is not None and node.spec.invert is not None and len(node.inputs) == 1 and node.inputs[0] is not None:
        views.append(node)  # from the op down to the padding
        node = nodes[node.inputs[0].child]
    if node is None or node.kind != "ConstantPadNdBackward0" or node.inputs[0] is None:
        return None
    e = node.inputs[0]
    image = ctx.run.promises.value(e.child, e.nr).to(x.dtype)
    pad = list(saved(node.fn, "pad"))
    crop = [-p for p in pad]  # negative padding crops
    padded_shape = F.pad(image, pad).shape

    def to_operand(t):
        t = F.pad(t, pad)
        for v in reversed(views):
            t = v.spec.forward(v, [t])
        return t

    def from_operand(g):
        return F.pad(undo_views(views, g, padded_shape), crop)

    if any(p < 0 for p in pad) or not torch.equal(to_operand(image), x):  # cropping, or a fill other than 0
        return None
    return image, to_operand, from_operand


def _after_padding(lmap: LinearMap, to_operand, from_operand) -> LinearMap:
    """``x -> lmap(to_operand(x), w)`` with its transpose ``from_operand(lmap.transpose(...))``."""
    return LinearMap(lambda x, w: lmap(to_operand(x), w),
                     lambda s, x, w: from_operand(lmap.transpose(s, to_operand(x), w)))


#: :meth:`Product.read_off_sum`: the fewest terms per element of a product whose output is read off a residual sum
_TERMS_READ_OFF = 768


class Product(OpSpec):
    """``z = fn(a, b)``, bilinear: a weighted linear op when one side is a parameter, a product otherwise."""

    costly_output = True

    def __init__(self, fn, names: tuple[str, str], family: str = "dense"):
        self.fn, self.names, self.linear_family = fn, names, family

    def saved_input(self, node, i):
        return saved(node.fn, self.names[i]) if i < 2 else None

    def output(self, node, nr):
        a, b = self.saved_input(node, 0), self.saved_input(node, 1)
        return None if a is None or b is None else self.fn(a, b)

    def forward(self, node, inputs):
        a, b = (inputs[i] if inputs[i] is not None else self.saved_input(node, i) for i in (0, 1))
        return self.fn(a, b)

    def _mm_operands(self, node):
        """The saved operands of a 2-d ``mm`` (the one product whose elements :meth:`output_at` works out), or
        None."""
        a, b = self.saved_input(node, 0), self.saved_input(node, 1)
        if node.kind != "MmBackward0" or a is None or b is None or a.dim() != 2 or b.dim() != 2:
            return None
        return a, b

    def read_off_sum(self, run, node):
        """An ``mm`` of at least :data:`_TERMS_READ_OFF` terms per element (below, recomputing it costs about as
        much as the subtraction's passes: T5-small's attention output, 512 terms, measured even)."""
        operands = self._mm_operands(node)
        return operands is not None and operands[0].shape[1] >= _TERMS_READ_OFF

    def output_at(self, run, node, nr, index):
        """A matrix product's elements (``mm``: row and column per element), a dot product each, read where the
        operands lie (``torch.sparse.sampled_addmm``: on the CPU 3-5x faster than gathering the rows)."""
        operands = self._mm_operands(node)
        if operands is None:
            return None
        a, b = operands
        rows, cols = index.unbind(1)
        order = torch.argsort(rows * b.shape[1] + cols)  # the sparse layout's: by row, then column
        rows, cols = rows[order], cols[order]
        start = torch.zeros(a.shape[0] + 1, dtype=torch.int64, device=a.device)
        start[1:] = torch.bincount(rows, minlength=a.shape[0]).cumsum(0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
            where = torch.sparse_csr_tensor(start, cols, torch.zeros(len(cols), dtype=a.dtype, device=a.device),
                                            (a.shape[0], b.shape[1]), check_invariants=False)
            got = torch.sparse.sampled_addmm(where, a, b).values()
        return torch.empty_like(got).index_copy_(0, order, got)

    def relevance(self, ctx):
        (R,) = ctx.R
        data = ctx.is_data(0), ctx.is_data(1)
        fn = self.bound_fn(ctx)
        if data[0] and data[1]:
            a, b = ctx.input(0), ctx.input(1)
            family = "attention" if _is_softmax_output(ctx, 0) else "product"
            rule = ctx.rule(family)
            if getattr(rule, "product_takes_z", False):  # the output, where a copy of it was saved (free)
                z = ctx.run.promises.values.get((ctx.node.id, 0))
                z = z if z is not None else ctx.run.promises.saved_copy(ctx.node)
                return held_constant(rule, rule.product(a, b, R, fn, z=z if z is not None and z.dtype == ctx.dtype
                                                        else None))
            return held_constant(rule, rule.product(a, b, R, fn))
        if not (ctx.wants(0) or ctx.wants(1)):
            return [None, None]
        # one side is a weight: the op is linear in the other
        x_i = self.data_operand(ctx)
        w_i = 1 - x_i
        x, w = ctx.input(x_i), ctx.input(w_i)
        family = self.family_at(ctx, x_i)
        rule = ctx.rule(family)
        lmap = self.linear_map(ctx.node, x_i)
        padded = _zero_padded_input(ctx, x_i, x) if family == "input" else None
        if padded is not None:  # the input layer sees the image, the padding is part of its linear map
            x, to_operand, from_operand = padded
            lmap = _after_padding(lmap, to_operand, from_operand)
        out = [None, None]
        b = _fused_bias(ctx)
        uses_z = ctx.wants(x_i) and getattr(rule, "uses_z", False)
        z = ctx.run.promises.values.get((ctx.node.id, 0)) if uses_z else None  # recovered already: free
        if uses_z and z is None:
            z = _from_saved_layer_output(ctx)
        merged = _merged_batch_norm(ctx, b is not None or _bias_add_of(ctx) is None)
        out_scale = None
        if merged is not None and self._scales_output(ctx, rule, w, merged, x_i, uses_z):
            # merged too, but the rule scales the output, not the weight
            out_scale, b = merged.scale, _merged_bias(b, merged)
        elif merged is not None and (w_m := self._merged_weight(ctx, w, merged, x_i)) is not None:
            # merged into the layer before it (zennit's canonizers)
            w, b = w_m, _merged_bias(b, merged)
            z = None if z is None else z * merged.scale
        else:
            merged = None
        if uses_z and z is None:
            # the layer's output with its bias is what the ReLU after it saved, wherever relevance flows
            pre = _pre_activation(ctx, R, merged is not None)
            if pre is not None:
                z = pre if b is None else pre - b
            else:
                z = ctx.run.promises.available(ctx.node, 0)
                z = None if z is None else (z * merged.scale if merged is not None else z)
        z = z if z is not None and z.dtype == ctx.dtype else None  # else recompute at full precision
        if ctx.wants(x_i):
            with caching_weights(not data[w_i]):  # the rule's transforms of w may be kept by a plan
                known = {} if out_scale is None else {"out_scale": out_scale}
                if getattr(rule, "takes_x_nonnegative", False) and _after_relu(ctx, x_i):
                    known["x_nonnegative"] = True
                out[x_i] = rule.linear(x, w, R, lmap, z=z, b=b, **known)
            if padded is not None:
                out[x_i] = to_operand(out[x_i])  # zeros on the padding: its pad node routes the rest back
        if ctx.wants(w_i):  # parameter relevance: the same rule with the roles of input and weight swapped
            out[w_i] = rule.linear(w, x, R, self.linear_map(ctx.node, w_i), b=b)
        return out

    def gradient_step(self, ctx):
        """A product of two activations: the rule's factors on the two gradients. One operand a weight: the
        ε → 0 rule is the op's own gradient, its bias (fused or not) in the denominator."""
        data = ctx.is_data(0), ctx.is_data(1)
        if data[0] and data[1]:
            family = "attention" if _is_softmax_output(ctx, 0) else "product"
            factors = rule_form(ctx.rule(family), family)
            if isinstance(factors, Stabilised):  # one ratio for both factors: R / stab(z), scaled
                step = product_step_of(ctx)  # attention's scores: the softmax's step works it out
                return stabilised_gradient(ctx, factors.eps, factors.scale) if step is None else step
            if factors is None:
                return None

            def direct_for(i, factor):
                # one operand held constant (CP-LRP's attention weights): the other's gradient alone, without
                # the product the backward would also spend on the held one
                if self.fn not in (torch.mm, torch.bmm) or len(ctx.node.fn.next_functions) != 2:
                    return None
                return _one_operand_gradient(ctx, self, i, factor)
            return one_operand_step(factors, direct_for)
        return layer_gradient_step(ctx, ctx)

    def data_operand(self, ctx) -> int:
        """The operand the op is linear in when the other is a weight (the data one; else the one asked for)."""
        data = ctx.is_data(0), ctx.is_data(1)
        return 0 if data[0] or not data[1] and ctx.wants(0) else 1

    def _scales_output(self, ctx, rule, w, merged: _MergedNorm, x_i: int, uses_z: bool) -> bool:
        """Whether the batch norm merged into this op is better given to the rule as a scale of the op's output:
        the rule takes one (``takes_out_scale``) and needs no ``z``, no parameter relevance is asked for, the weight
        could have been scaled per output feature, and every scale is positive. Scaling the weight costs a pass over
        it per explanation without a plan (ResNet-50: as much as a pass over every layer's output at batch 1); the
        rule folds the output's scale into its stabiliser at no cost."""
        return (getattr(rule, "takes_out_scale", False) and not uses_z and not ctx.wants(1 - x_i)
                and self.scales_per_output(ctx.node, w.shape, merged.scale.shape, x_i) and bool(merged.positive))

    def _merged_weight(self, ctx, w, merged, x_i: int):
        """The weight with the batch norm after it merged in (kept by an active plan while neither the weight nor
        the batch norm's variance and scale change), or None if this op cannot take it."""
        plan = active_plan()
        scale = merged.scale
        if plan is None or ctx.is_data(1 - x_i):
            return self.scale_weight(ctx.node, w, scale, x_i)
        return plan.derived(("merge-bn", type(self), x_i, merged.eps), (w, *merged.sources),
                            lambda: self.scale_weight(ctx.node, w, scale, x_i))

    def scales_per_output(self, node, w_shape: torch.Size, scale_shape: torch.Size, x_i: int) -> bool:
        """Whether a weight of shape ``w_shape`` can be scaled per output feature by a scale of shape
        ``scale_shape`` (which broadcasts over the output)."""
        return x_i == 0 and (scale_shape[-1] == w_shape[-1] or scale_shape.numel() == 1)

    def scale_weight(self, node, w, scale, x_i: int):
        """``w`` scaled per output feature (``scale`` broadcasts over the output), or None if not supported."""
        if not self.scales_per_output(node, w.shape, scale.shape, x_i):
            return None
        return w * scale.reshape(-1)  # mm/bmm: the output feature is the weight's last dimension

    def bound_fn(self, ctx):
        return self.fn

    def linear_map(self, node, v: int) -> LinearMap:
        """The op as a function of operand ``v`` (the variable) and the other operand (held fixed)."""
        if v == 0:  # x's features (last dimension) meet w's rows
            stack = {torch.mm: (1, 0), torch.bmm: (2, 1)}.get(self.fn)
            return LinearMap(self.fn, lambda s, x, w: s @ w.mT, stack)
        return LinearMap(lambda x, w: self.fn(w, x), lambda s, x, w: w.mT @ s)

    def family_at(self, ctx, x_i: int) -> str:
        """``input`` when the data operand is a model input (seen through views and zero padding) and the preset
        has an ``input`` rule, else ``dense``/``conv`` (zennit's EpsilonPlus gives a first dense layer the dense
        rule)."""
        nodes = ctx.run.graph.nodes
        producer = through_views(nodes, ctx.producer(x_i))
        if producer is not None and producer.kind == "ConstantPadNdBackward0" and producer.inputs[0] is not None:
            producer = through_views(nodes, nodes[producer.inputs[0].child])
        if producer is not None and not producer.inputs and producer.data and ctx.has_rule("input"):
            return "input"
        return self.linear_family


def _one_operand_gradient(ctx, spec: Product, i: int, factor: float):
    r""":class:`~dynamiclrp.ops.base.DirectStep` computation for a product ``a @ b`` of which only operand ``i``
    gets a gradient: :math:`g_a = f\,g\,b^\top` or :math:`g_b = f\,a^\top g` (the node read from ``ctx`` when
    the step runs: a plan rebinds it)."""
    def direct(grad_outputs):
        g = grad_outputs[0]
        if g is None:
            return None
        other = saved(ctx.node.fn, spec.names[1 - i])
        grad = g @ other.mT if i == 0 else other.mT @ g
        return {i: grad if factor == 1 else grad.mul_(factor)}
    return direct


class Addmm(OpSpec):
    """``beta * bias + alpha * (mat1 @ mat2)``, split into a bias addition and an mm."""

    def __init__(self, product_kind: str, product: Product):
        self.product_kind, self.product = product_kind, product
        # addmm's addend is a bias; baddbmm's may be a mask
        self.bias_add = (_AddmmBias if product_kind == "MmBackward0" else BiasAdd)(
            self._bias_term, 1, untracked_is_bias=product_kind == "MmBackward0")

    def decompose(self, fn):
        return [
            ("AddBackward0", self.bias_add, [(NEXT, 0), (PART, 1)]),
            (self.product_kind, self.product, [(NEXT, 1), (NEXT, 2)]),
        ]

    @staticmethod
    def _bias_term(fn, bias, z_mm):
        return [_scaled(saved(fn, "beta"), bias), _scaled(saved(fn, "alpha"), z_mm)]


class _AddmmBias(BiasAdd):
    """The bias addition of an ``addmm``: its output's elements are the product's plus the bias's
    (:meth:`~dynamiclrp.ops.base.OpSpec.output_at`)."""

    def read_off_sum(self, run, node):
        op = linear_op_below(run.graph, node)
        return op is not None and node.part == 0 and op.spec.read_off_sum(run, op)

    def output_at(self, run, node, nr, index):
        op = linear_op_below(run.graph, node)
        e = node.inputs[1 - self.linear_index]
        if op is None or e is None or node.part != 0:
            return None
        z = op.spec.output_at(run, op, 0, index)
        if z is None:
            return None
        operands = [run.promises.value(e.child, e.nr).expand(out_shape(node.fn, 0))[tuple(index.T)]] * 2
        operands[self.linear_index] = z
        return add_terms(*self.terms(node.fn, *operands))


class Convolution(Product):
    """``conv(x, w)`` without bias (the bias is split into its own addition)."""

    def __init__(self):
        super().__init__(None, ("input", "weight"), family="conv")
        self.bias_add = BiasAdd(self._bias_term, linear_index=0, untracked_is_bias=True)

    def decompose(self, fn):
        sizes = saved(fn, "bias_sym_sizes_opt")
        has_bias = bool(sizes) and sizes[0] > 0  # (0,) means "no bias"
        if not has_bias:
            return [("ConvolutionBackward0", self, [(NEXT, 0), (NEXT, 1)])]
        return [
            ("AddBackward0", self.bias_add, [(PART, 1), (NEXT, 2)]),
            ("ConvolutionBackward0", self, [(NEXT, 0), (NEXT, 1)]),
        ]

    @staticmethod
    def _bias_term(fn, z_conv, bias):
        if bias is None:
            return [z_conv, None]
        return [z_conv, bias.view(1, -1, *([1] * (len(out_shape(fn)) - 2)))]

    def conv_fn(self, fn, args: _ConvArgs | None = None):
        """The node's convolution as ``conv(x, w)`` (no bias); ``args``: its settings, if already read."""
        a = args or _ConvArgs.of(fn)

        def conv(x, w):
            if a.pointwise and all(k == 1 for k in w.shape[2:]):
                return _channel_product(a.strided(x), w)
            nd = x.dim() - 2
            if a.transposed:
                f = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
                return f(x, w, None, a.stride, a.padding, a.output_padding, a.groups, a.dilation)
            f = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
            return f(x, w, None, a.stride, a.padding, a.dilation, a.groups)

        return conv

    def bound_fn(self, ctx):
        return self.conv_fn(ctx.node.fn)

    def scales_per_output(self, node, w_shape, scale_shape, x_i: int) -> bool:
        return x_i == 0 and not saved(node.fn, "transposed")

    def scale_weight(self, node, w, scale, x_i: int):
        """Convolution weights are (out, in/groups, *kernel): scale along the first dimension."""
        if not self.scales_per_output(node, w.shape, scale.shape, x_i):
            return None
        return w * scale.reshape(-1, *([1] * (w.dim() - 1)))

    def linear_map(self, node, v: int) -> LinearMap:
        a = _ConvArgs.of(node.fn)
        conv = self.conv_fn(node.fn, a)
        args = (None, a.stride, a.padding, a.dilation, a.transposed, a.output_padding, a.groups)

        def grad_input(s, x, w):
            if a.pointwise and all(k == 1 for k in w.shape[2:]):
                g = _channel_product(s, w.transpose(0, 1))
                if a.strided(x) is x:
                    return g
                # a strided 1 x 1 convolution reads every stride-th position; the others get no gradient. CPU
                # kernels take up to 5x as long for this (ResNet's downsampling: 10 ms where the product is 2)
                full = g.new_zeros(x.shape)
                a.strided(full).copy_(g)
                return full
            return torch.ops.aten.convolution_backward(s, x, w, *args, [True, False, False])[0]

        def grad_weight(s, w, x):
            return torch.ops.aten.convolution_backward(s, x, w, *args, [False, True, False])[1]

        if v == 0:  # input channels: x's dimension 1, w's 1 (0 when transposed); groups split them
            stack = (1, 0 if a.transposed else 1) if a.groups == 1 else None
            return LinearMap(conv, grad_input, stack)
        return LinearMap(lambda w, x: conv(x, w), grad_weight)

    def output(self, node, nr):
        a, b = self.saved_input(node, 0), self.saved_input(node, 1)
        return None if a is None or b is None else self.conv_fn(node.fn)(a, b)

    def forward(self, node, inputs):
        a, b = (inputs[i] if inputs[i] is not None else self.saved_input(node, i) for i in (0, 1))
        return self.conv_fn(node.fn)(a, b)


@dataclass(frozen=True)
class _ConvArgs:
    """A convolution node's settings, read off its saved values once per use (each read is a torch-private
    attribute lookup, and a rule needs them several times)."""

    stride: tuple
    padding: tuple
    dilation: tuple
    transposed: bool
    output_padding: tuple
    groups: int

    @staticmethod
    def of(fn) -> _ConvArgs:
        return _ConvArgs(saved(fn, "stride"), saved(fn, "padding"), saved(fn, "dilation"), saved(fn, "transposed"),
                         saved(fn, "output_padding"), saved(fn, "groups"))

    @property
    def pointwise(self) -> bool:
        """No padding, no dilation, one group, not transposed: with a 1 x 1 kernel the convolution is then a
        matrix product over the channels of every stride-th position (:meth:`strided`)."""
        return (not self.transposed and self.groups == 1
                and all(v == 0 for v in self.padding) and all(v == 1 for v in self.dilation))

    def strided(self, x: torch.Tensor) -> torch.Tensor:
        """The positions a 1 x 1 kernel reads at this stride: a view of ``x`` (``x`` itself at stride 1)."""
        if all(v == 1 for v in self.stride):
            return x
        return x[(..., *(slice(None, None, v) for v in self.stride))]


def _channel_product(x, w):
    """A 1 x 1 convolution (``w``: out x in x 1 ...) at stride 1 as one matrix product over the channels of every
    position; its transpose is the same with ``w.transpose(0, 1)``. CPU convolution kernels copy the input (im2col)
    for these; ResNet-50 has 33 of them, and 3 more at stride 2 (on the positions they read)."""
    n, c = x.shape[:2]
    y = torch.matmul(w.reshape(w.shape[0], c), x.reshape(n, c, -1))
    return y.reshape(n, w.shape[0], *x.shape[2:])


class MatrixVector(Product):
    """``mv(A, v)`` (``A @ v`` with a 1-d ``v``): linear in each operand; transposes by autograd."""

    def __init__(self):
        super().__init__(torch.mv, ("self", "vec"))

    def linear_map(self, node, v: int) -> LinearMap:
        return LinearMap(self.fn) if v == 0 else LinearMap(lambda x, w: self.fn(w, x))

    def scales_per_output(self, node, w_shape, scale_shape, x_i: int) -> bool:
        return False


MATMUL_OPS = {
    "MvBackward0": MatrixVector(),
    "MmBackward0": Product(torch.mm, ("self", "mat2")),
    "BmmBackward0": Product(torch.bmm, ("self", "mat2")),
    "AddmmBackward0": Addmm("MmBackward0", Product(torch.mm, ("mat1", "mat2"))),
    "BaddbmmBackward0": Addmm("BmmBackward0", Product(torch.bmm, ("batch1", "batch2"))),
    "ConvolutionBackward0": Convolution(),
}
