"""Element-wise ops: additions (family ``sum``), products (``product``), and single-operand ops (identity).

Additions are written as a sum of *terms* (``a - alpha * b`` has the terms ``a`` and ``-alpha * b``) so that one
rule serves add, sub, rsub and the bias additions split off linear layers; broadcasting is undone by the rule's
vector-Jacobian product. Single-operand element-wise ops (activations, casts, Neg, Clone) pass relevance
unchanged, as in zennit's ``Pass`` and LXT's identity rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ActivationUnavailableError
from ..rules import IDENTITY, LINEARISED, PLAIN, BiasInDenominator, Stabilised, add_terms
from .base import NEXT, PART, Identity, OpSpec, held_constant, one_operand_step, rule_form, saved, stabilised_gradient


class AddTerms(OpSpec):
    """``z = sum_k term_k(operand_k)``; ``terms(fn, *operands)`` gives the signed, scaled terms."""

    family = "sum"
    zero_constants = True

    def __init__(self, terms, output=None):
        self.terms, self.out = terms, output

    def output(self, node, nr):
        return None if self.out is None else self.out(node.fn)

    def forward(self, node, inputs):
        return add_terms(*(t for t in self.terms(node.fn, *inputs) if t is not None))

    def sum_rule(self, ctx):
        return ctx.rule(self.family)

    def term_scale(self, node, i: int, dtype: torch.dtype) -> torch.Tensor:
        """Term ``i``'s factor on its operand (``alpha``; ``-alpha`` for a subtrahend), as ones of the output's rank
        put through ``terms``."""
        meta = node.fn._input_metadata[0]
        probe = [None] * len(node.inputs)
        probe[i] = torch.ones([1] * len(meta.shape), dtype=dtype, device=meta.device)
        return self.terms(node.fn, *probe)[i]

    def term_factor(self, node, i: int) -> float | None:
        """Term ``i``'s factor on its operand as a host number (``alpha``, ``-alpha``, ``beta``), or None where the
        term is not a scalar multiple of its operand. The terms are put through with the Python number 1 as the
        operand: no tensor, so a caller on a GPU launches nothing and reads no device value (each read waits for
        the device)."""
        probe = [None] * len(node.inputs)
        probe[i] = 1.0
        try:
            t = self.terms(node.fn, *probe)[i]
        except (AttributeError, TypeError, RuntimeError):  # the term needs a tensor (a cast, a view): no number
            return None
        return float(t) if isinstance(t, (int, float)) else None

    def operand_from_output(self, node, i, out, operands):
        r"""Addend ``i`` as the sum less the other terms, :math:`a' = \mathrm{fl}(s - b)` for :math:`s = a + b`.

        Not exact: the forward rounded :math:`s = \mathrm{fl}(a + b)`, so :math:`|a' - a| \le \tfrac12
        \mathrm{ulp}(s) + \tfrac12 \mathrm{ulp}(a')` (Fast2Sum, Knuth TAOCP vol. 2 §4.2.2, Dekker 1971: the
        subtraction itself is exact when :math:`|b| \ge |a|`). Only for float32/float64 (a half-precision sum's ulp
        is too coarse), a term of scale ±1 (a plain ``+``/``-``), and an addend with the sum's full shape (a
        broadcast addend is not determined by the difference)."""
        if out.dtype not in (torch.float32, torch.float64) or any(
                v is not None and v.dtype != out.dtype for v in operands):
            return None
        sign = self.term_factor(node, i)
        if sign not in (1.0, -1.0):
            return None
        scale = self.term_scale(node, i, out.dtype)
        filled = [torch.ones_like(scale) if k == i else v for k, v in enumerate(operands)]  # addmm's needs all
        others = [t for k, t in enumerate(self.terms(node.fn, *filled)) if k != i]
        if any(t is None for t in others):  # a constant autograd did not record: unknown
            return None
        term = out - add_terms(*others) if others else out.clone()
        return term if sign == 1.0 else term.neg_()

    def relevance(self, ctx):
        (R,) = ctx.R
        n = len(ctx.node.inputs)
        if sum(ctx.is_data(i) for i in range(n)) == 0 and not any(ctx.wants(i) for i in range(n)):
            return [None] * n
        values = [ctx.input(i) for i in range(n)]
        terms = self.terms(ctx.node.fn, *values)
        known = [i for i, t in enumerate(terms) if t is not None]
        if len(known) < n:  # a constant operand outside the graph: recover its term as z - (the others)
            z = ctx.run.promises.available(ctx.node, 0)
            if z is None:
                raise ActivationUnavailableError(
                    f"{ctx.node.kind} (node #{ctx.node.id}) adds a constant autograd did not record (a frozen "
                    "bias, a tensor that does not require grad, or a Python scalar), and no node saved the sum, "
                    "so the constant's share cannot be computed; let that operand require grad (dynamiclrp."
                    "explain does this for parameters) or register a different rule"
                )
            if (ctx.node.id, 0) in ctx.run.promises.provisional:  # replayed with the constant taken as zero
                zero = torch.zeros((), dtype=ctx.dtype, device=z.device)
                terms = [t if t is not None else zero for t in terms]
            else:
                rest = add_terms(*(terms[i] for i in known)) if known else 0
                terms = [t if t is not None else z.to(ctx.dtype) - rest for t in terms]
        rel = self.sum_rule(ctx).sum(terms, R, add_terms)
        # an operand outside the graph (a frozen bias, a constant) keeps its share: returned for the ledger
        # (booked as given to parameters/constants), delivered nowhere
        return [r.sum_to_size(t.shape).reshape(v.shape) if v is not None else r
                for r, t, v in zip(rel, terms, values)]

    def gradient_step(self, ctx):
        """ε → 0 on a sum: :math:`R_k = t_k \\odot J_k^\\top (R / z)`, the terms times the gradient (a constant
        term, recorded or not, keeps its share without anyone computing it). A larger ε: the gradient arriving at
        :math:`z` scaled first (:func:`~.base.stabilised_gradient`, :math:`z` as the Promise System knows it),
        where every operand is recorded or the sum feeds softmaxes alone: a constant autograd did not record is
        then an attention mask the softmax's step checks, taken as zero there as node by node (elsewhere the
        node-by-node rule may take it as zero where the output is not the sum: no form)."""
        form = rule_form(self.sum_rule(ctx), "sum")
        if form is PLAIN:
            return PLAIN
        if isinstance(form, Stabilised) and (all(e is not None for e in ctx.node.inputs) or _masks_softmax(ctx)):
            # a mask's sum that one softmax alone reads: that softmax's step applies the factor (one pass over the
            # logits' size fewer, and no fresh tensor of that size)
            from .attention import chain_takes_sum  # noqa: PLC0415 - attention imports this module

            taken = softmax_applies_stabiliser(ctx, ctx.node) is not None or chain_takes_sum(ctx, ctx.node)
            return PLAIN if taken else stabilised_gradient(ctx, form.eps)
        return None


def softmax_applies_stabiliser(ctx, node) -> float | None:
    r"""The ε of the sum ``node`` (``ctx``: a context of the same run) where the step of the softmax that alone
    reads it applies the sum's stabilising factor :math:`|z| / (|z| + \varepsilon)` (the sum's own step is then
    PLAIN), else None.

    So for ``logits = scores + mask`` (a mask autograd did not record, or a recorded bias: T5's position bias),
    under a softmax passing relevance unchanged (the ``epsilon`` preset): that step computes the ratio
    :math:`g\,s / z` of the logits (and checks a mask on them) anyway, and multiplies its own fresh result by the
    factor in place, on the same :math:`z`. Both steps ask this one function, so they cannot disagree."""
    graph = ctx.run.graph
    if not isinstance(node.spec, AddTerms) or node.spec.family != "sum":
        return None
    form = rule_form(ctx.rule_at(node, "sum"), "sum")
    if not isinstance(form, Stabilised):
        return None
    consumers = graph.consumers.get((node.id, 0), ())
    if len(consumers) != 1 or consumers[0][1] != 0:
        return None
    softmax = graph.nodes[consumers[0][0]]
    if softmax.spec.family != "softmax" or rule_form(ctx.rule_at(softmax, "softmax"), "softmax") is not IDENTITY:
        return None
    return form.eps


def _masks_softmax(ctx) -> bool:
    """Whether every use of the node's output (through views, casts and other sums: T5 adds its mask to the position
    bias, which each layer adds to its scores) is a softmax's logits."""
    graph, stack, seen = ctx.run.graph, [ctx.node.id], 0
    while stack:
        for cid, i in graph.consumers.get((stack.pop(), 0), ()):
            c = graph.nodes[cid]
            if (c.spec.transparent or c.spec.invert is not None) and len(c.inputs) == 1 or \
                    isinstance(c.spec, AddTerms) and c.spec.family == "sum":
                stack.append(cid)
            elif c.spec.family == "softmax" and i == 0:
                seen += 1
            else:
                return False
    return seen > 0


class BiasAdd(AddTerms):
    """The bias addition split off a linear layer (``addmm``, convolution with bias): family ``bias``.

    With the :class:`~dynamiclrp.rules.BiasInDenominator` rule all relevance goes to the linear op, which takes
    the bias into its own denominator; otherwise the ``sum`` rule splits it between the two (the paper's choice).
    """

    family = "bias"

    def __init__(self, terms, linear_index: int, untracked_is_bias: bool = False):
        super().__init__(terms)
        self.linear_index, self.untracked_is_bias = linear_index, untracked_is_bias

    def fuses(self, ctx, node) -> bool:
        """Whether the bias goes into the linear op's denominator: the rule says so and the bias is a parameter
        or constant (a data tensor added by ``baddbmm`` is an operand like any other and keeps its share).

        A bias outside the graph (frozen) is fused where it can only be a bias (``addmm``, a convolution's) and
        its value can be had as the layer's output minus the linear term (from a saved copy of the output);
        else (a ``baddbmm`` attention mask, or no saved output) it is split off by the ``sum`` rule."""
        if not isinstance(ctx.rule_at(node, "bias"), BiasInDenominator):
            return False
        if not _sole_use_of_linear_output(ctx.run.graph, node, self.linear_index):
            return False  # the linear op's output is used elsewhere too: this is not (only) its bias
        e = node.inputs[1 - self.linear_index]
        if e is None:
            return (self.untracked_is_bias and (node.id, 0) not in ctx.run.promises.provisional
                    and ctx.run.promises.available(node, 0) is not None)
        return not ctx.run.graph.nodes[e.child].data

    def sum_rule(self, ctx):
        rule = ctx.rule("bias")
        return ctx.rule("sum") if isinstance(rule, BiasInDenominator) else rule

    def gradient_step(self, ctx):
        """Where the bias goes into the linear op's denominator, the layer's step (``ops.linear``); else the sum
        rule's."""
        if not self.fuses(ctx, ctx.node):
            return super().gradient_step(ctx)
        from ..engine import Context  # noqa: PLC0415 - the engine imports the op entries
        from .linear import layer_gradient_step, linear_op_below  # noqa: PLC0415 - linear imports this module

        op = linear_op_below(ctx.run.graph, ctx.node)
        at = None if op is None else Context(ctx.run, op, [])
        if at is None or at.is_data(0) and at.is_data(1):  # a product of two activations has a rule of its own
            return None
        return layer_gradient_step(at, ctx)

    def relevance(self, ctx):
        if self.fuses(ctx, ctx.node):
            out = [None] * len(ctx.node.inputs)
            out[self.linear_index] = ctx.R[0]
            return out
        node = ctx.node
        if self.untracked_is_bias and node.inputs[1 - self.linear_index] is None and (
                (node.id, 0) in ctx.run.promises.provisional):
            # the output is known only as a replay with the bias taken as zero, which a softmax after it certified
            # as a mask; but this addend is a layer's bias, not a mask, and softmax is blind to a per-row shift
            raise ActivationUnavailableError(
                f"{node.kind} (node #{node.id}) adds a frozen layer bias before a softmax; its value is not in the "
                "graph and the softmax cannot reveal it. Let the parameters require grad (dynamiclrp.explain does "
                "this) or explain with propagate() on a graph where the bias is tracked"
            )
        return super().relevance(ctx)

    def linear_output(self, ctx, node) -> torch.Tensor | None:
        """The linear op's output (without bias) of this addition ``node``, from a copy of the layer's output that a
        consumer saved (GELU saves its input, the attention matmul its operands behind views), less the bias term:
        one subtraction instead of recomputing the product. None when no copy was saved or the bias is frozen
        (its value is itself the output less the product)."""
        if node.inputs[1 - self.linear_index] is None:
            return None
        zb = ctx.run.promises.values.get((node.id, 0))  # an explained output, or recovered already
        zb = zb if zb is not None else ctx.run.promises.saved_copy(node)
        if zb is None or zb.dtype != ctx.dtype:  # a lower-precision copy would not be exact
            return None
        b = self.bias_term(ctx, node)
        if b is None:
            return None
        factor = self.term_factor(node, self.linear_index)
        if factor is None:
            return zb / self.term_scale(node, self.linear_index, ctx.dtype) - b
        return zb - b if factor == 1 else zb / factor - b  # a division by exactly 1 changes nothing

    def bias_term(self, ctx, node) -> torch.Tensor | None:
        """The bias term (scaled and shaped to broadcast over the linear op's output) of this addition ``node``,
        divided by the linear term's scale; None when it cannot be had (then the rule must not fuse)."""
        i, j = self.linear_index, 1 - self.linear_index
        e = node.inputs[j]
        promises = ctx.run.promises
        operands = [None, None]
        factor = None if e is None else self.term_factor(node, i)
        if factor is not None:  # the bias term alone, over the linear term's factor, shaped to the output's rank
            operands[j] = promises.value(e.child, e.nr).to(ctx.dtype)
            b = self.terms(node.fn, *operands)[j]
            b = b if factor == 1 else b / factor
            rank = len(node.fn._input_metadata[0].shape)
            return b.reshape((1,) * (rank - b.dim()) + tuple(b.shape)) if b.dim() < rank else b
        scale = self.term_scale(node, i, ctx.dtype)  # ones of the output's rank: the result broadcasts over it
        if e is None:  # frozen: the layer's output less its linear term
            z = promises.available(node, 0)
            lin = node.inputs[i]
            if z is None or lin is None:
                return None
            operands[i] = promises.value(lin.child, lin.nr).to(ctx.dtype)
            return (z.to(ctx.dtype) - self.terms(node.fn, *operands)[i]) / scale
        operands[i] = torch.ones_like(scale)  # some terms functions need every operand (addmm's)
        operands[j] = promises.value(e.child, e.nr).to(ctx.dtype)
        return self.terms(node.fn, *operands)[j] / scale


class Add(AddTerms):
    """``AddBackward0``. Also recognises a linear layer's bias added on its own: ``F.linear`` on a 3-d input that is
    not contiguous runs ``mm`` on the folded input, a view back, then ``+ bias`` (no ``addmm``). When one operand
    is a 1-d parameter and the other a weighted ``mm`` seen through views, the addition is that layer's bias
    (family ``bias``), so the layer gets the same rule whatever the memory layout of its input."""

    def __init__(self, terms):
        super().__init__(terms)
        self._bias_adds = (BiasAdd(terms, linear_index=0), BiasAdd(terms, linear_index=1))

    def decompose(self, fn):
        i = _unfused_linear_bias(fn)
        if i is None:
            return super().decompose(fn)
        return [("AddBackward0", self._bias_adds[i], [(NEXT, 0), (NEXT, 1)])]


_VIEWS = ("UnsafeViewBackward0", "ViewBackward0", "ReshapeAliasBackward0")


def _sole_use_of_linear_output(graph, add, linear_index: int) -> bool:
    """Whether the addition ``add`` alone uses the output of the linear op below it (seen through views), so that
    the linear op can take the addend into its denominator (see ``ops.linear._bias_add_of``)."""
    e = add.inputs[linear_index]
    while e is not None:
        if len(graph.consumers.get((e.child, e.nr), ())) != 1:
            return False
        below = graph.nodes[e.child]
        if below.kind not in _VIEWS:
            return True
        e = below.inputs[0]
    return False


def _unfused_linear_bias(fn) -> int | None:
    """Index of the ``mm`` operand if ``fn`` (an add) is ``view(mm(x, Wᵀ)) + b`` with parameters ``W``, ``b``."""
    nexts = fn.next_functions
    if len(nexts) != 2 or any(n is None for n, _ in nexts):
        return None
    for i, j in ((0, 1), (1, 0)):
        b = getattr(nexts[j][0], "variable", None)
        if not isinstance(b, torch.nn.Parameter) or b.dim() != 1:
            continue
        node = nexts[i][0]
        while type(node).__name__ in _VIEWS:
            node = node.next_functions[0][0]
        if type(node).__name__ != "MmBackward0":
            continue
        wt = node.next_functions[1][0]
        w = getattr(wt.next_functions[0][0], "variable", None) if type(wt).__name__ == "TBackward0" else None
        if isinstance(w, torch.nn.Parameter) and w.dim() == 2 and w.shape[0] == b.shape[0]:
            return i
    return None


class Product(OpSpec):
    """Element-wise ``a * b`` (or ``a / b`` as ``a * (1/b)``): product rule, or identity when one is constant."""

    family = "product"

    def __init__(self, divide: bool = False, names: tuple[str, str] = ("self", "other")):
        self.divide, self.names = divide, names

    def saved_input(self, node, i):
        return saved(node.fn, self.names[i]) if i < 2 else None

    def output(self, node, nr):
        a, b = self.saved_input(node, 0), self.saved_input(node, 1)
        if a is None or b is None:
            return None
        return a / b if self.divide else a * b

    def forward(self, node, inputs):
        a, b = (inputs[i] if inputs[i] is not None else self.saved_input(node, i) for i in (0, 1))
        if a is None or b is None:
            raise NotImplementedError
        return a / b if self.divide else a * b

    def relevance(self, ctx):
        (R,) = ctx.R
        data = ctx.is_data(0), ctx.is_data(1)
        if data[0] and data[1]:
            for i in (1, 0):  # a * f(a): a normalisation or an activation written out by hand
                kind = derived_factor(ctx, i, 1 - i)
                if kind is not None:
                    out = [None, None]
                    r = ctx.rule("norm").norm(R) if kind == "norm" else R
                    out[1 - i] = r.sum_to_size(ctx.input_shape(1 - i))
                    return out
            a, b = ctx.input(0), ctx.input(1)
            if self.divide:
                b = 1.0 / b
            rule = ctx.rule("product")
            return held_constant(rule, rule.product(a, b, R, torch.mul))
        out = [None, None]
        for i in (0, 1):  # a constant factor: the op is linear in the other, ε-rule = identity
            if data[i] or (not data[1 - i] and ctx.wants(i)):
                out[i] = R.sum_to_size(ctx.input_shape(i))
                break
        return out

    def gradient_step(self, ctx):
        """``a * f(a)`` (a norm or an activation by hand): ``a`` gets the whole gradient with ``f(a)`` held
        constant, ``f(a)`` none. A product of two activations: the rule's factors on the two gradients (a quotient
        of two activations has none). One constant factor: the op is linear, its own gradient."""
        data = ctx.is_data(0), ctx.is_data(1)
        if not (data[0] and data[1]):
            keep = next((i for i in (0, 1) if data[i] or (not data[1 - i] and ctx.wants(i))), None)
            if not any(ctx.wants(i) for i in (0, 1) if i != keep):
                return PLAIN  # autograd computes no gradient for the other factor
            return self._step(ctx, tuple(1.0 if i == keep else None for i in (0, 1)))
        for i in (1, 0):
            kind = derived_factor(ctx, i, 1 - i)
            if kind is not None:
                if kind == "norm" and rule_form(ctx.rule("norm"), "norm") not in (LINEARISED, IDENTITY):
                    return None  # the norm rule passes R on to a (R_a = R_y) for these two only
                if self.divide and i == 0:  # f(a) / a: not a's gradient with f(a) fixed
                    return None
                return self._step(ctx, tuple(None if k == i else 1.0 for k in (0, 1)))
        factors = rule_form(ctx.rule("product"), "product")
        if isinstance(factors, Stabilised):
            factors = factors.elementwise
        if factors is None or self.divide:
            return None
        return self._step(ctx, factors)

    def _step(self, ctx, factors: tuple):
        """The factors on the operands' gradients; where one operand alone gets one (RMSNorm's statistics, CP-LRP's
        gate held constant), a :class:`~dynamiclrp.ops.base.DirectStep` that computes that one without the other's
        product (and, for a broadcast operand, its sum)."""
        def direct_for(i, factor):
            if len(ctx.node.fn.next_functions) != 2 or self.divide and i == 1:
                return None
            return _one_factor_gradient(ctx, self, i, factor)
        return one_operand_step(factors, direct_for)


def _one_factor_gradient(ctx, spec: Product, i: int, factor: float):
    r""":class:`~dynamiclrp.ops.base.DirectStep` computation for an element-wise ``a * b`` (or ``a / b``) of which
    only operand ``i`` gets a gradient: :math:`g_a = f\,g \odot b` (:math:`f\,g / b`), summed to ``a``'s shape
    where ``a`` was broadcast. The node is read from ``ctx`` when the step runs (a plan rebinds it)."""
    def direct(grad_outputs):
        g = grad_outputs[0]
        fn = ctx.node.fn
        child, nr = fn.next_functions[i]
        if g is None or child is None or g.is_complex():
            return None
        other = saved(fn, spec.names[1 - i])
        grad = g / other if spec.divide else g * other
        meta = child._input_metadata[nr]
        if grad.shape != meta.shape:
            grad = grad.sum_to_size(meta.shape)
        return {i: (grad if factor == 1 else grad.mul_(factor)).to(meta.dtype)}
    return direct


def _unary(replay=None, out=None, saved_in=None, homogeneous=False, quotient=None):
    return Identity(replay=replay, out=out, saved_in=saved_in, homogeneous=homogeneous, quotient=quotient)


def _quotient(closed_form, at_zero: float):
    """The identity rule's ``f(x) / x`` as ``quotient(fn, x, out, y)`` (:func:`~dynamiclrp.ops.base.identity_gradient`):
    ``y / x`` where a consumer saved the output ``y`` (``at_zero``, the limit :math:`f'(0)`, where ``x = 0``), else
    ``closed_form(fn, x, out)``; into ``out`` (None: allocate)."""
    def quotient(fn, x, out=None, y=None):
        if y is None:
            return closed_form(fn, x, out)
        return (torch.div(y, x) if out is None else torch.div(y, x, out=out)).nan_to_num_(at_zero)
    return quotient


def _gelu_closed_form(fn, x, out):
    """``gelu(x) / x`` (the normal CDF Φ(x), or its tanh approximation), 1/2 at 0: a recomputed GELU divided by
    ``x`` costs a third of an ``erf``."""
    a = saved(fn, "approximate")
    y = F.gelu(x, approximate=a) if out is None else torch.ops.aten.gelu.out(x, approximate=a, out=out)
    return y.div_(x).nan_to_num_(0.5)


def _silu_closed_form(fn, x, out):
    """``silu(x) / x = sigmoid(x)`` (a division of a saved output costs less than the exponential)."""
    return torch.sigmoid(x) if out is None else torch.sigmoid(x, out=out)


class Addcmul(OpSpec):
    """``self + value * tensor1 * tensor2``, split into an addition and a product."""

    def __init__(self):  # the parts' entries are built once: a plan's fingerprint names them by identity
        self.add = AddTerms(lambda fn, a, m: [a, None if m is None else saved(fn, "value") * m])
        self.mul = Product(names=("tensor1", "tensor2"))

    def decompose(self, fn):
        return [
            ("AddBackward0", self.add, [(NEXT, 0), (PART, 1)]),
            ("MulBackward0", self.mul, [(NEXT, 1), (NEXT, 2)]),
        ]


def derived_factor(ctx, i: int, j: int, max_nodes: int = 64) -> str | None:
    """Whether operand ``i`` of this product is computed from operand ``j`` alone, by element-wise ops, views and
    reductions: then ``a * f(a)`` is not a product of two activations but one activation transformed.

    Returns ``"norm"`` when a reduction is involved (``x * rsqrt(mean(x²) + ε)``, ``(x - μ) / σ``: a normalisation
    written out by hand, which takes the preset's ``norm`` rule like the fused layer-norm node), ``"activation"``
    when it is element-wise only (``x * sigmoid(x)``, ``0.5 x (1 + tanh(...))``: an activation written out by hand,
    which passes relevance to ``a`` as the fused activation does), else None.
    """
    nodes = ctx.run.graph.nodes
    ei, ej = ctx.node.inputs[i], ctx.node.inputs[j]
    if ei is None or ej is None:
        return None
    # what a itself is made of: a, and below it through element-wise steps (0.5 * h, x - mean(x), views)
    sources, frontier = set(), [ej.child]
    for _ in range(4):
        nxt = []
        for n in frontier:
            if n in sources:
                continue
            sources.add(n)
            if _elementwise_step(nodes[n]):
                nxt.extend(e.child for e in nodes[n].inputs if e is not None and nodes[e.child].data)
        frontier = nxt
    reduced, seen, stack = False, set(), [ei.child]
    while stack:
        n = stack.pop()
        if n in sources or n in seen:
            continue
        seen.add(n)
        node = nodes[n]
        if len(seen) > max_nodes:
            return None
        is_reduction = node.spec.family == "sum" and not isinstance(node.spec, AddTerms)
        if not (_elementwise_step(node) or is_reduction):
            return None
        reduced = reduced or is_reduction
        stack.extend(e.child for e in node.inputs if e is not None and nodes[e.child].data)
    return "norm" if reduced else "activation"


def _elementwise_step(node) -> bool:
    """An op that maps values element-wise (activations, casts, scalar arithmetic, sums and products of such) or
    only re-views them."""
    spec = node.spec
    return bool(node.inputs) and (isinstance(spec, (Identity, AddTerms, Product)) or spec.transparent)


def _cast(replay, invert=None):
    spec = Identity(replay=replay, homogeneous=True)
    spec.transparent = True
    spec.invert = invert
    return spec


def _same(fn, y, shape):
    return y


def _self(fn):
    return saved(fn, "self")


def _result(fn):
    return saved(fn, "result")


def _scaled(alpha, t):
    """``alpha * t``; ``t`` itself for the usual ``alpha = 1`` (no copy of every residual stream)."""
    return None if t is None else t if alpha == 1 else alpha * t


ELEMENTWISE_OPS = {
    "AddBackward0": Add(lambda fn, a, b: [a, _scaled(saved(fn, "alpha"), b)]),
    "SubBackward0": AddTerms(lambda fn, a, b: [a, None if b is None else -saved(fn, "alpha") * b]),
    "RsubBackward0": AddTerms(lambda fn, a, b: [None if a is None else -saved(fn, "alpha") * a, b]),
    "MulBackward0": Product(),
    "AddcmulBackward0": Addcmul(),
    "DivBackward0": Product(divide=True),
    # one operand and a Python scalar: the op is linear in its operand (ε-rule = identity)
    "AddBackward1": _unary(),
    "SubBackward1": _unary(),
    "RsubBackward1": _unary(),
    "MulBackward1": _unary(lambda fn, x: x * saved(fn, "other"), homogeneous=True),
    "DivBackward1": _unary(lambda fn, x: x / saved(fn, "other"), homogeneous=True),
    "NativeDropoutBackward0": _unary(lambda fn, x: x * saved(fn, "result1") / (1.0 - saved(fn, "p")),
                                     homogeneous=True),
    "NegBackward0": _unary(lambda fn, x: -x, homogeneous=True),
    "CloneBackward0": _cast(lambda fn, x: x.clone(), invert=_same),
    "AliasBackward0": _cast(lambda fn, x: x, invert=_same),
    "ToCopyBackward0": _cast(lambda fn, x: x.to(fn._input_metadata[0].dtype)),
    "ReluBackward0": _unary(lambda fn, x: x.relu(), out=_result, homogeneous=True),
    "GeluBackward0": _unary(lambda fn, x: F.gelu(x, approximate=saved(fn, "approximate")), saved_in=_self,
                            quotient=_quotient(_gelu_closed_form, 0.5)),
    "SiluBackward0": _unary(lambda fn, x: F.silu(x), saved_in=_self, quotient=_quotient(_silu_closed_form, 0.5)),
    "TanhBackward0": _unary(lambda fn, x: x.tanh(), out=_result),
    "SigmoidBackward0": _unary(lambda fn, x: x.sigmoid(), out=_result),
    "ExpBackward0": _unary(lambda fn, x: x.exp(), out=_result),
    "LogBackward0": _unary(lambda fn, x: x.log(), saved_in=_self),
    "SqrtBackward0": _unary(lambda fn, x: x.sqrt(), out=_result),
    "RsqrtBackward0": _unary(lambda fn, x: x.rsqrt(), out=_result),
    "PowBackward0": _unary(lambda fn, x: x.pow(saved(fn, "exponent")), saved_in=_self),
    "HardtanhBackward0": _unary(lambda fn, x: x.clamp(saved(fn, "min_val"), saved(fn, "max_val")),
                                saved_in=_self),
    "LeakyReluBackward0": _unary(lambda fn, x: F.leaky_relu(x, saved(fn, "negative_slope")), saved_in=_self,
                                 homogeneous=True),
    "EluBackward0": _unary(None, out=lambda fn: None),
    "SoftplusBackward0": _unary(lambda fn, x: F.softplus(x, saved(fn, "beta"), saved(fn, "threshold")),
                                saved_in=_self),
    "ErfBackward0": _unary(lambda fn, x: torch.erf(x), saved_in=_self),
    "AbsBackward0": _unary(lambda fn, x: x.abs(), saved_in=_self, homogeneous=True),
    "ClampMinBackward0": _unary(lambda fn, x: x.clamp(min=saved(fn, "min")), saved_in=_self),
    "ClampBackward1": _unary(lambda fn, x: x.clamp(saved(fn, "min", None), saved(fn, "max", None)),
                             saved_in=_self),
}
