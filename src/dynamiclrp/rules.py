r"""LRP rules as pure tensor math: no graph, no nodes.

A rule answers "how does relevance split over the operands of one operation?" for one *family* of operations:

* ``linear(x, w, R, fn, z=None, b=None)`` -- an op linear in ``x`` with a weight ``w`` (``fn(x, w)``: mm, conv,
  bmm with a parameter) and an optional bias ``b`` (broadcastable to the output) that enters the denominators as
  each rule modifies it, as in zennit. ``z = fn(x, w)`` (without bias) may be passed when already known.
  Returns the relevance of ``x``.
* ``sum(terms, R, combine)`` -- an op that adds its terms up (``combine`` is linear with non-negative coefficients:
  add, sub with its sign folded into the term, sum, mean, cumsum, average pooling). Returns one relevance per term.
* ``product(a, b, R, fn)`` -- a product of two activations (element-wise mul, matmul of two activations).
* ``softmax(x, s, R, dim)`` -- relevance of the logits ``x`` given the probabilities ``s``.

Throughout, :math:`z` is the op's output, :math:`R` the relevance at the output, and
:math:`\mathrm{stab}_\varepsilon(z) = z + \varepsilon\,\mathrm{sign}(z)` with :math:`\mathrm{sign}(0)=1`
(the convention of zennit). :math:`J^\top s` (a vector-Jacobian product) is computed by autograd on the small
recomputed op, which makes every rule exact for every stride, padding, grouping and broadcast the op supports.

References
----------
.. [1] Bach et al., "On pixel-wise explanations for non-linear classifier decisions by layer-wise relevance
   propagation", PLOS ONE 2015.
.. [2] Montavon et al., "Layer-wise relevance propagation: an overview", in Explainable AI, Springer 2019.
.. [3] Achtibat et al., "AttnLRP: attention-aware layer-wise relevance propagation for transformers", ICML 2024.
.. [4] Ali et al., "XAI for transformers: better explanations through conservative propagation", ICML 2022.
.. [5] Lee & Millan Arias, "Always keep your promises: DynamicLRP", arXiv 2512.07010.
.. [6] Anders et al., "Software for dataset-wide XAI: from local explanations to global insights with
   Zennit, CoRelAy, and ViRelAy", arXiv 2106.13200.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .plan import keeps_weights, weight_derived

Tensor = torch.Tensor
LinearFn = Callable[[Tensor, Tensor], Tensor]

# ----------------------------------------------------------------------------------------------------------
# the gradient form (see dynamiclrp.gradient_form): what a rule does to the ratio g = R / x

#: an ε at or below this only guards 0/0: the rule is its ε → 0 limit, which carries relevance as input × gradient
GRADIENT_EPS = 1e-12
#: the op's own backward, unchanged, carries the ratio
PLAIN = "plain"
#: relevance passes unchanged (``R_x = R_y``): the ratio is multiplied by ``y / x``
IDENTITY = "identity"
#: the op's gradient with its normalisation statistics held constant
LINEARISED = "linearised"
#: nothing passes
BLOCKED = "blocked"


@dataclass(frozen=True)
class Stabilised:
    r"""The ε-rule's gradient form for an ε above :data:`GRADIENT_EPS` (a linear op, a sum): the ratio arriving at
    the layer's output :math:`z` is multiplied by :math:`z / \mathrm{stab}_\varepsilon(z) = |z| / (|z| +
    \varepsilon)` before the op's own backward. With :math:`R = z \odot g`,
    :math:`R_x = x \odot J^\top (R / \mathrm{stab}_\varepsilon(z)) = x \odot J^\top (g\,|z| / (|z| + \varepsilon))`:
    exactly the ε-rule, whatever ε."""

    eps: float
    #: a factor on top (AttnLRP's uniform rule halves a matrix product's ratio for each factor)
    scale: float = 1.0
    #: the factors on an element-wise product's two gradients where the rule does not use ε there (the uniform
    #: rule: :math:`R / 2` each), else None (no form for an element-wise product)
    elementwise: tuple[float, float] | None = None


def stabilize(z: Tensor, eps: float) -> Tensor:
    r"""Return :math:`z + \varepsilon\,\mathrm{sign}(z)` with :math:`\mathrm{sign}(0) = 1` (a fresh tensor)."""
    # sign(sign(z) + 1/2) is -1 below zero and +1 at ±0 and above (NaN stays NaN), in one allocation and four
    # arithmetic passes: torch.where on a comparison costs several times as much on CPU, where bool tensors are slow
    s = z.sign()
    s.add_(0.5).sign_()
    if z.requires_grad and torch.is_grad_enabled():  # out= cannot be differentiated (a rule used inside autograd)
        return z + eps * s
    return torch.add(z, s, alpha=eps, out=s)


def over_stabilized(R: Tensor, z: Tensor, eps: float) -> Tensor:
    r""":math:`R / \mathrm{stab}_\varepsilon(z)`, written into the denominator's memory where the shapes allow
    (one large allocation fewer per rule)."""
    d = stabilize(z, eps)
    if d.shape != R.shape or d.dtype != R.dtype or torch.is_grad_enabled():
        return R / d
    return torch.div(R, d, out=d)


def over_stabilized_nonnegative(R: Tensor, z: Tensor, eps: float | Tensor) -> Tensor:
    r""":math:`R / \mathrm{stab}_\varepsilon(z)` for a ``z`` that is a sum of non-negative contributions (z⁺):
    there :math:`\mathrm{stab}_\varepsilon(z) = z + \varepsilon` exactly (sign(±0) = +1), one pass instead of
    four. Written into ``z``'s memory when the rule computed it (``z`` is not read again). ``eps`` may be a
    non-negative tensor that broadcasts over ``z`` (a bias's positive part plus ε, added in the same pass)."""
    if _fits(z, R) and _writable(z, R):
        return torch.div(R, z.add_(eps), out=z)
    return R / (z + eps)


def _positive_part(z: Tensor) -> Tensor:
    r""":math:`1[z > 0]` as numbers, without a bool tensor (slow on CPU): :math:`\max(\mathrm{sign}(z), 0)`."""
    return z.sign().clamp_(min=0)


def _negative_part(z: Tensor) -> Tensor:
    r""":math:`1[z < 0]` as numbers: :math:`\max(-\mathrm{sign}(z), 0)`."""
    return z.sign().neg_().clamp_(min=0)


def safe_divide(r: Tensor, z: Tensor) -> Tensor:
    """``r / z`` with 0 where ``z == 0`` (used where a zero denominator means no contribution at all)."""
    return torch.where(z == 0, torch.zeros_like(r), r / torch.where(z == 0, torch.ones_like(z), z))


def vjp(fn: Callable[..., Tensor], inputs: Sequence[Tensor], grad: Tensor) -> tuple[Tensor, ...]:
    """Vector-Jacobian products :math:`J_i^\\top g` of ``fn`` at ``inputs`` (fn is linear in each input here)."""
    with torch.enable_grad():
        xs = [x.detach().requires_grad_(True) for x in inputs]
        out = fn(*xs)
        return torch.autograd.grad(out, xs, grad)


def _product_vjp(fn: Callable[..., Tensor], a: Tensor, b: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """:math:`(J_a^\\top s, J_b^\\top s)` of ``fn(a, b)``: for a matrix product ``s bᵀ`` and ``aᵀ s`` directly
    (no recomputation, no autograd round trip), else by autograd."""
    if _matrix_product(fn, a, b):
        return s @ b.mT, a.mT @ s
    return vjp(fn, [a, b], s)


def add_terms(*terms: Tensor) -> Tensor:
    """:math:`\\sum_k t_k` with broadcasting: the ``combine`` of additions (add, sub, bias additions)."""
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _scaled_terms(terms: Sequence[Tensor], grads: Sequence[Tensor], s: Tensor, spare: Tensor | None) -> list[Tensor]:
    """:math:`[t_k \\odot g_k]` for a ``sum`` op's terms and vector-Jacobian products of ``s``, written into memory
    the rule holds where it can: ``spare`` (a tensor it no longer needs), the last product that reads ``s`` into
    ``s``, and a fresh ``g_k`` (a reduction) into itself."""
    last = max((k for k, g in enumerate(grads) if g is s), default=-1)
    out = []
    for k, (t, g) in enumerate(zip(terms, grads)):
        later = grads[k + 1:]
        if spare is not None and _fits(spare, t) and spare.shape == g.shape and _writable(spare, t, g, s):
            out.append(torch.mul(t, g, out=spare))
            spare = None
        elif g is not s or k == last:
            out.append(_times(t, g, *terms, *later, None if k == last else s))
        else:
            out.append(t * g)
    return out


def _zero_scalar(t: Tensor) -> bool:
    """A 0-dim tensor holding 0: a term that leaves a sum unchanged (±0 alike, which the stabiliser treats alike).
    Read on the CPU only: on a GPU the read would wait for the device, and adding the zero changes nothing."""
    return t.dim() == 0 and t.device.type == "cpu" and float(t) == 0.0


def _sum_vjp(combine: Callable[..., Tensor], inputs: Sequence[Tensor], grad: Tensor) -> Sequence[Tensor]:
    """:math:`J_k^\\top g` of a ``sum`` op: for :func:`add_terms` each term's is ``g`` summed to the term's shape
    (no autograd needed), else by autograd."""
    if combine is add_terms:
        return [grad.sum_to_size(t.shape) for t in inputs]
    return vjp(combine, inputs, grad)


class LinearMap:
    """``z = fn(x, w)``, linear in ``x`` for fixed ``w``, with its transpose :math:`J_x^\\top s`.

    ``transpose(s, x, w)`` computes the vector-Jacobian product directly when the op provides it (``s @ w.T``
    for mm, ``convolution_backward`` for convolutions); otherwise autograd differentiates a recomputation.
    ``stack = (dx, dw)`` names the dimensions of ``x`` and ``w`` that the op sums over together (input channels,
    input features), where :math:`f(x_1, w_1) + f(x_2, w_2) = f([x_1, x_2], [w_1, w_2])` with both concatenated
    along them; None where the op cannot be split that way (grouped convolutions).
    A plain callable ``fn(x, w)`` can be used wherever a LinearMap is expected.
    """

    def __init__(self, fn: LinearFn, transpose: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
                 stack: tuple[int, int] | None = None):
        self.fn, self._transpose, self.stack = fn, transpose, stack

    def __call__(self, x: Tensor, w: Tensor) -> Tensor:
        return self.fn(x, w)

    def transpose(self, s: Tensor, x: Tensor, w: Tensor) -> Tensor:
        if self._transpose is not None:
            return self._transpose(s, x, w)
        (g,) = vjp(lambda x_: self.fn(x_, w), [x], s)
        return g


def transpose(fn, s: Tensor, x: Tensor, w: Tensor) -> Tensor:
    """:math:`J_x^\\top s` of ``fn`` at ``(x, w)`` (direct for a :class:`LinearMap`, else by autograd)."""
    if isinstance(fn, LinearMap):
        return fn.transpose(s, x, w)
    (g,) = vjp(lambda x_: fn(x_, w), [x], s)
    return g


def _plus(z: Tensor, b: Tensor | None) -> Tensor:
    return z if b is None else z + b


def _plus_(z: Tensor, b: Tensor | None) -> Tensor:
    """``z + b`` into ``z``, a tensor the rule itself just computed (one allocation fewer)."""
    return z if b is None else z.add_(b)


def _pos(b: Tensor | None) -> Tensor | None:
    return None if b is None else b.clamp(min=0)


def _writable(g: Tensor, *keep: Tensor | None) -> bool:
    """Whether ``g``, a tensor a rule has just computed, may be overwritten: no autograd recording, dense memory
    and no storage shared with a tensor in ``keep`` (an operand, or one still to be read). Writing a rule's
    products into memory it already holds saves an allocation per pass, and on CPU a fresh large tensor costs
    several times the arithmetic that fills it (page faults)."""
    if torch.is_grad_enabled() or not (g.is_contiguous() or g.is_contiguous(memory_format=torch.channels_last)):
        return False
    p = g.untyped_storage().data_ptr()
    return all(k is None or k.untyped_storage().data_ptr() != p for k in keep)


def _fits(g: Tensor, x: Tensor) -> bool:
    """Whether ``g <op> x`` has ``g``'s shape and dtype (so it can be written into ``g``)."""
    return g.dtype == x.dtype and (g.shape == x.shape or torch.broadcast_shapes(g.shape, x.shape) == g.shape)


def _times(x: Tensor, g: Tensor, *keep: Tensor | None) -> Tensor:
    """``x * g``, into ``g`` when it is the rule's own tensor (:func:`_writable` with ``x`` and ``keep``)."""
    return g.mul_(x) if _fits(g, x) and _writable(g, x, *keep) else x * g


def _add_into(total: Tensor, g: Tensor, *keep: Tensor | None) -> Tensor:
    """``total + g``, into ``total`` when it is the rule's own tensor."""
    return total.add_(g) if _fits(total, g) and _writable(total, g, *keep) else total + g


def _linear_terms(pairs: Sequence[tuple[Tensor | None, Tensor]], s: Tensor, fn) -> Tensor:
    """:math:`\\sum_k x_k \\odot J_{w_k}^\\top s` for (input, weight) pairs (a None input is zero: skipped)."""
    stacked = _stacked(pairs, fn)
    if stacked is not None:  # one transpose: the terms are the slices of X ⊙ Jᵀ s along the stacked dimension
        X, W, dim, k = stacked
        parts = _times(X, transpose(fn, s, X, W), s, W).chunk(k, dim)
        total = parts[0] + parts[1]
        for part in parts[2:]:
            total.add_(part)
        return total
    total = None
    for x, w in pairs:
        if x is None:
            continue
        g = _times(x, transpose(fn, s, x, w), s, w)
        total = g if total is None else _add_into(total, g)
    return total


def _products(pairs: Sequence[tuple[Tensor | None, Tensor]], fn) -> Tensor:
    """:math:`\\sum_k f(x_k, w_k)` (a None input is zero: skipped)."""
    stacked = _stacked(pairs, fn)
    if stacked is not None:
        X, W, _, _ = stacked
        return fn(X, W)
    total = None
    for x, w in pairs:
        if x is None:
            continue
        z = fn(x, w)
        total = z if total is None else _add_into(total, z, *(t for pair in pairs for t in pair))
    return total


def _stacked(pairs: Sequence[tuple[Tensor | None, Tensor]], fn) -> tuple[Tensor, Tensor, int, int] | None:
    """``(X, W, dim, k)``: the ``k`` terms' inputs and weights concatenated along the dimension the op sums over
    (``fn.stack``: input channels, input features), so that :math:`\\sum_k f(x_k, w_k) = f(X, W)` is one product
    and the terms' transposes are one too. Where the weights are no larger than the inputs (an input layer split by
    sign: three channels), one product over twice the channels costs about what one of the two did; a large weight
    is not copied. None where fewer than two terms remain, or the op cannot stack them."""
    dims = getattr(fn, "stack", None)
    live = [(x, w) for x, w in pairs if x is not None]
    if dims is None or len(live) < 2:
        return None
    (x0, w0), k = live[0], len(live)
    if any(x.shape != x0.shape or x.dtype != x0.dtype or w.shape != w0.shape for x, w in live) \
            or w0.numel() > x0.numel():
        return None
    weights = tuple(w for _, w in live)
    W = weight_derived("stacked", weights, lambda: torch.cat(weights, dims[1]))
    return torch.cat([x for x, _ in live], dims[0]), W, dims[0], k


def _w_pos(w: Tensor) -> Tensor:
    """:math:`w^+` (kept by an active :class:`~dynamiclrp.plan.Plan` between explanations)."""
    return weight_derived("+", w, lambda: w.clamp(min=0))


def _w_neg(w: Tensor, alone: bool = False) -> Tensor:
    """:math:`w^-` (kept by an active plan). ``alone``: the caller multiplies it by itself, not stacked with
    :math:`w^+` into one product (the αβ-rule on a ReLU's output): where a plan keeps :math:`w^+` it is then
    :math:`w - w^+`, the same tensor (:math:`w - w = 0` where :math:`w \\ge 0`, :math:`w - 0 = w` elsewhere), one
    pass over the weight as the clamp is, and the plan holds one transformed copy of the weight instead of two.
    A stacked product's weight is kept by the plan itself, keyed by the tensors it was stacked from: those must be
    the plan's own."""
    if alone and keeps_weights():
        return w - _w_pos(w)
    return weight_derived("-", w, lambda: w.clamp(max=0))


def _nonnegative_shift(b: Tensor | None, eps: float, out_scale: Tensor | None = None) -> float | Tensor:
    r""":math:`(b^+ + \varepsilon) / s`, what a denominator of non-negative contributions is shifted by (its bias's
    positive part and the stabiliser, over the scale of a merged batch norm): from the layer's constants alone, so
    kept by an active plan (three small ops per layer otherwise)."""
    if b is None and out_scale is None:
        return eps

    def compute():
        shift = eps if b is None else _pos(b) + eps
        return shift if out_scale is None else shift / out_scale
    sources = tuple(t for t in (b, out_scale) if t is not None)
    return weight_derived(("shift", eps, b is not None, out_scale is not None), sources, compute)


def _signs(x: Tensor, nonnegative: bool = False) -> tuple[Tensor | None, Tensor | None]:
    """:math:`(x^+, x^-)`, None for a part that is zero everywhere: its terms vanish exactly, so a rule that splits
    by sign skips them, and a layer after a ReLU (:math:`x^- = 0`) costs half the products. ``nonnegative``: the
    caller knows :math:`x \\ge 0` from the graph (a ReLU's output), which spares a reduction and a host sync."""
    if nonnegative:
        return x, None
    low, high = torch.aminmax(x)  # one reduction; comparisons on the whole tensor are slow on CPU
    negative, positive = torch.stack((low < 0, high > 0)).tolist()  # one host read (a GPU waits for each)
    if not negative:
        return x, None
    if not positive:
        return None, x
    return x.clamp(min=0), x.clamp(max=0)


# ----------------------------------------------------------------------------------------------------------
# rules for linear ops with a weight


@dataclass(frozen=True)
class Epsilon:
    r"""ε-rule [1, 2].

    .. math:: R_i = \sum_j \frac{x_i w_{ij}}{\mathrm{stab}_\varepsilon(z_j)} R_j
        = x_i \left(J^\top \frac{R}{\mathrm{stab}_\varepsilon(z)}\right)_i

    For ops that add terms up (``sum``) the same equation with unit weights:
    :math:`R_k = t_k \odot J_k^\top (R / \mathrm{stab}_\varepsilon(z))`, :math:`z = \sum_k t_k`.
    For a product of two activations (``product``) the op is linear in each factor once the other is fixed,
    and the ε-rule sends the whole relevance to each; AttnLRP's :class:`Uniform` halves it.
    """

    eps: float = 1e-6
    product_takes_z = True  # product(..., z=) takes the op's output when a saved copy holds it
    uses_z = True  # the op's output is the denominator: callers pass it when they have it
    #: its relevance for an operand is that operand times something (x ⊙ g, x⁺ ⊙ g⁺ + x⁻ ⊙ g⁻; for a sum t ⊙ g):
    #: zero wherever the operand is, which lets a ReLU's output stand for the layer below it (a subclass that
    #: changes the form must say False)
    weighs_by_operand = True

    def gradient_form(self, family: str):
        """ε → 0: the op's own gradient (both factors of a product whole). A larger ε on a linear op or a sum:
        :class:`Stabilised` (a product of two activations has no such form here)."""
        if family in ("product", "attention"):
            return (1.0, 1.0) if self.eps <= GRADIENT_EPS else None
        return PLAIN if self.eps <= GRADIENT_EPS else Stabilised(self.eps)

    def linear(self, x: Tensor, w: Tensor, R: Tensor, fn: LinearFn, z: Tensor | None = None,
               b: Tensor | None = None) -> Tensor:
        """Relevance of ``x``: :math:`z = xw + b` in the denominator."""
        if z is None:
            z = fn(x, w)
        return _linear_terms([(x, w)], over_stabilized(R, _plus(z, b), self.eps), fn)

    def sum(self, terms: Sequence[Tensor], R: Tensor, combine: Callable[..., Tensor]) -> list[Tensor]:
        if combine is add_terms:  # a zero scalar (an untracked mask taken as zero) adds nothing to z
            live = [t for t in terms if not _zero_scalar(t)] or terms[:1]
            z, spare = add_terms(*live), None
            if len(live) > 1:
                spare = z  # a fresh sum, no longer needed once s is computed
        else:
            z, spare = combine(*terms), None
        s = over_stabilized(R, z, self.eps)
        return _scaled_terms(terms, _sum_vjp(combine, terms, s), s, spare)

    def product(self, a: Tensor, b: Tensor, R: Tensor, fn, z: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Each factor, the other held fixed: :math:`R_a = a \\odot J_a^\\top (R / \\mathrm{stab}(z))`, and the
        same for :math:`b`; together they receive :math:`2R` (the paper's code for Bmm)."""
        s = over_stabilized(R, fn(a, b) if z is None else z, self.eps)
        ga, gb = _product_vjp(fn, a, b, s)
        return _times(a, ga, s, b, gb), _times(b, gb, s, a)


@dataclass(frozen=True)
class ZPlus:
    r"""z⁺-rule [2]: only positive contributions (zennit's ``ZPlus``: :math:`x^+ w^+ + x^- w^-`).

    .. math:: R_i = \sum_j \frac{x_i^+ w_{ij}^+ + x_i^- w_{ij}^-}
                    {\mathrm{stab}(\sum_{i'} x_{i'}^+ w_{i'j}^+ + x_{i'}^- w_{i'j}^-)} R_j
    """

    eps: float = 1e-6
    takes_out_scale = True  # see ``linear``: a merged batch norm's positive scale, without forming s·w
    takes_x_nonnegative = True  # the caller may say that x >= 0 (a ReLU's output): no sign split to find
    weighs_by_operand = True  # see Epsilon

    def linear(self, x, w, R, fn, z=None, b=None, out_scale=None, x_nonnegative=False):
        """Relevance of ``x``.

        ``x_nonnegative``: the caller knows :math:`x \\ge 0` from the graph (see :func:`_signs`). ``out_scale``: a
        positive factor :math:`s` per output feature that the layer's output is multiplied by before its bias ``b``
        is added (a batch norm merged into it): the rule of the layer with weight :math:`s w`, computed without
        forming it. For :math:`s > 0`, :math:`(s w)^\\pm = s w^\\pm`, so
        :math:`R / (s z^+ + b^+ + \\varepsilon)` carried back through :math:`s w^+` is
        :math:`R / (z^+ + (b^+ + \\varepsilon)/s)` carried back through :math:`w^+`."""
        xp, xn = _signs(x, x_nonnegative)
        pairs = [(xp, None if xp is None else _w_pos(w)), (xn, None if xn is None else _w_neg(w))]
        shift = _nonnegative_shift(b, self.eps, out_scale)  # x⁺w⁺ + x⁻w⁻ + b⁺ + ε > 0
        return _linear_terms(pairs, over_stabilized_nonnegative(R, _products(pairs, fn), shift), fn)


@dataclass(frozen=True)
class Gamma:
    r"""γ-rule [2], sign-aware as zennit's ``Gamma`` [6].

    With :math:`w^{\pm\gamma} = w + \gamma w^{\pm}`, outputs with :math:`z_j > 0` are explained by the
    contributions that raise them, :math:`z^+_j = \sum_i x_i^+ w_{ij}^{+\gamma} + x_i^- w_{ij}^{-\gamma}`,
    outputs with :math:`z_j < 0` by those that lower them,
    :math:`z^-_j = \sum_i x_i^+ w_{ij}^{-\gamma} + x_i^- w_{ij}^{+\gamma}`:

    .. math:: R_i = \sum_{j: z_j>0} \frac{x_i^+ w_{ij}^{+\gamma} + x_i^- w_{ij}^{-\gamma}}{\mathrm{stab}(z^+_j)} R_j
                  + \sum_{j: z_j<0} \frac{x_i^+ w_{ij}^{-\gamma} + x_i^- w_{ij}^{+\gamma}}{\mathrm{stab}(z^-_j)} R_j
    """

    gamma: float = 0.25
    eps: float = 1e-6
    uses_z = True  # for the sign of each output
    takes_x_nonnegative = True
    weighs_by_operand = True  # see Epsilon

    def linear(self, x, w, R, fn, z=None, b=None, x_nonnegative=False):
        xp, xn = _signs(x, x_nonnegative)
        if xn is None:
            return self._nonnegative(x, w, R, fn, z, b)
        g = self.gamma
        wp = weight_derived(("gamma+", g), w, lambda: w + g * w.clamp(min=0))
        wn = weight_derived(("gamma-", g), w, lambda: w + g * w.clamp(max=0))
        z = _plus(fn(x, w) if z is None else z, b)
        pos = [(xp, wp), (xn, wn)]
        neg = [(xp, wn), (xn, wp)]
        zp = _plus_(_products(pos, fn), None if b is None else b + self.gamma * b.clamp(min=0))
        zn = _plus_(_products(neg, fn), None if b is None else b + self.gamma * b.clamp(max=0))
        sp = over_stabilized(R * _positive_part(z), zp, self.eps)
        sn = over_stabilized(R * _negative_part(z), zn, self.eps)
        return _add_into(_linear_terms(pos, sp, fn), _linear_terms(neg, sn, fn))

    def _nonnegative(self, x, w, R, fn, z0, b):
        r"""The same for :math:`x \ge 0` (after a ReLU), in one product and two transposes instead of two and
        two: with :math:`z = xw` and :math:`u = xw^+`, :math:`z^+ = z + \gamma u`,
        :math:`z^- = (1+\gamma) z - \gamma u`, and
        :math:`J_{w^{+\gamma}}^\top s^+ + J_{w^{-\gamma}}^\top s^- = J_w^\top((1+\gamma)s^- + s^+)
        + \gamma J_{w^+}^\top(s^+ - s^-)`. Only :math:`z^\pm` where :math:`z \gtrless 0` are used, and there
        :math:`|z^\pm| \ge |z|`: no cancellation enters a denominator."""
        g, wpos = self.gamma, _w_pos(w)
        z0 = fn(x, w) if z0 is None else z0
        u = fn(x, wpos)
        z = _plus(z0, b)
        zp = _plus(z0 + g * u, None if b is None else b + g * b.clamp(min=0))
        zn = _plus((1 + g) * z0 - g * u, None if b is None else b + g * b.clamp(max=0))
        sp = over_stabilized(R * _positive_part(z), zp, self.eps)
        sn = over_stabilized(R * _negative_part(z), zn, self.eps)
        return _times(x, _add_into(transpose(fn, (1 + g) * sn + sp, x, w), g * transpose(fn, sp - sn, x, wpos)))


@dataclass(frozen=True)
class AlphaBeta:
    r"""αβ-rule [1] with :math:`\alpha - \beta = 1`, as zennit's ``AlphaBeta``.

    .. math:: R_i = \sum_j \left(\alpha \frac{(x_i w_{ij})^+}{\mathrm{stab}(\sum_i (x_i w_{ij})^+)}
                  - \beta \frac{(x_i w_{ij})^-}{\mathrm{stab}(\sum_i (x_i w_{ij})^-)}\right) R_j

    with :math:`(x w)^+ = x^+ w^+ + x^- w^-` and :math:`(x w)^- = x^+ w^- + x^- w^+`.
    """

    alpha: float = 2.0
    beta: float = 1.0
    eps: float = 1e-6
    takes_x_nonnegative = True
    weighs_by_operand = True  # see Epsilon

    def linear(self, x, w, R, fn, z=None, b=None, x_nonnegative=False):
        (xp, xn), wp = _signs(x, x_nonnegative), _w_pos(w)
        wn = _w_neg(w, alone=xn is None)  # with x⁻ it is stacked with w⁺ (x⁺w⁺ + x⁻w⁻ as one product)
        pos, neg = [(xp, wp), (xn, wn)], [(xp, wn), (xn, wp)]
        zn = _plus_(_products(neg, fn), None if b is None else b.clamp(max=0))
        shift = _nonnegative_shift(b, self.eps)  # zp >= 0: its stabiliser added with its bias
        rp = _linear_terms(pos, over_stabilized_nonnegative(R, _products(pos, fn), shift), fn)
        rn = _linear_terms(neg, over_stabilized(R, zn, self.eps), fn)
        if _fits(rp, rn) and _writable(rp, rn) and _writable(rn, rp):  # both the rule's own: no allocation
            return rp.mul_(self.alpha).sub_(rn.mul_(self.beta))
        return self.alpha * rp - self.beta * rn


@dataclass(frozen=True)
class Flat:
    r"""Flat rule [2]: relevance spread uniformly over each output's receptive field.

    .. math:: R_i = \sum_j \frac{1}{\mathrm{stab}(\sum_{i'} 1_{ij})} R_j

    where :math:`1_{ij}=1` when input :math:`i` is connected to output :math:`j` (weights and inputs set to one).
    """

    eps: float = 1e-6

    def linear(self, x, w, R, fn, z=None, b=None):  # the bias is zeroed (zennit)
        ones_x, ones_w = torch.ones_like(x), weight_derived("ones", w, lambda: torch.ones_like(w))
        return _linear_terms([(ones_x, ones_w)], over_stabilized(R, fn(ones_x, ones_w), self.eps), fn)


@dataclass(frozen=True)
class WSquare:
    r"""w²-rule [2]: :math:`R_i = \sum_j \frac{w_{ij}^2}{\mathrm{stab}(\sum_{i'} w_{i'j}^2)} R_j`."""

    eps: float = 1e-6

    def linear(self, x, w, R, fn, z=None, b=None):
        ones_x, w2 = torch.ones_like(x), weight_derived("square", w, lambda: w * w)
        z2 = _plus(fn(ones_x, w2), None if b is None else b * b)
        return _linear_terms([(ones_x, w2)], over_stabilized(R, z2, self.eps), fn)


@dataclass(frozen=True)
class ZBox:
    r"""zᴮ-rule [2] for an input layer bounded by :math:`l \le x \le h` (zennit's ``ZBox``).

    .. math:: R_i = \sum_j \frac{x_i w_{ij} - l_i w_{ij}^+ - h_i w_{ij}^-}
                    {\mathrm{stab}(\sum_{i'} x_{i'} w_{i'j} - l_{i'} w_{i'j}^+ - h_{i'} w_{i'j}^-)} R_j

    ``low`` and ``high`` are scalars or tensors broadcastable to the input.
    """

    low: float | Tensor = -3.0
    high: float | Tensor = 3.0
    eps: float = 1e-6
    uses_z = True

    def linear(self, x, w, R, fn, z=None, b=None):  # b - b⁺ - b⁻ = 0: the bias cancels (as in zennit)
        low = torch.as_tensor(self.low, dtype=x.dtype, device=x.device).expand_as(x)
        high = torch.as_tensor(self.high, dtype=x.dtype, device=x.device).expand_as(x)
        terms = [(x, w), (-low, _w_pos(w)), (-high, _w_neg(w))]  # x w - l w⁺ - h w⁻
        zb = _products(terms, fn) if z is None else _add_into(_products(terms[1:], fn), z)
        return _linear_terms(terms, over_stabilized(R, zb, self.eps), fn)


@dataclass(frozen=True)
class BiasInDenominator:
    """Rule for the bias addition split off a linear layer (family ``bias``): pass all relevance to the linear op,
    which then takes the bias into its own denominator, modified by its rule -- textbook LRP [2] and zennit [6]
    (:math:`z_j = \\sum_i x_i w_{ij} + b_j`). The bias's share is absorbed (recorded in the ledger).

    Without it (``bias`` falling back to the ``sum`` family), the addition splits relevance between the linear
    op's output and the bias by the ``sum`` rule, as the DynamicLRP paper does.
    """

    def gradient_form(self, family: str):
        return PLAIN


# ----------------------------------------------------------------------------------------------------------
# rules for sums and products of activations


@dataclass(frozen=True)
class Proportional:
    r"""The paper's magnitude-proportional rule [5] (used for Add, Sum/Mean, Mul, Div in its code).

    .. math:: R_k = \frac{|t_k|}{\sum_{k'} |t_{k'}| + \varepsilon} R

    for the terms of a sum, and for an element-wise product :math:`a \odot b` the same split over :math:`|a|`
    and :math:`|b|`; a matrix product of two activations is split as by :class:`Uniform`, with this rule's ε.
    Conservative, but a heuristic rather than a Taylor-derived rule.
    """

    eps: float = 1e-11
    product_takes_z = True  # product(..., z=) takes the op's output when a saved copy holds it

    def sum(self, terms, R, combine):
        mags = [t.abs() for t in terms]
        s = R / (combine(*mags) + self.eps)
        return [m * g for m, g in zip(mags, _sum_vjp(combine, mags, s))]

    def product(self, a, b, R, fn, z=None):
        if not _elementwise(fn):  # a matrix product: the bilinear form has no |·| split; halve it (AttnLRP)
            return Uniform(self.eps).product(a, b, R, fn, z)
        aa, bb = a.abs(), b.abs()
        s = R / (aa + bb + self.eps)
        return (aa * s).sum_to_size(a.shape), (bb * s).sum_to_size(b.shape)


@dataclass(frozen=True)
class Uniform:
    r"""AttnLRP's uniform rule for a product of two activations [3].

    Element-wise :math:`z = a \odot b`: :math:`R_a = R_b = R / 2`. Matrix product :math:`z = A B` (bilinear
    form): each factor gets half of the ε-rule that treats the other as constant,

    .. math:: R_{A,ik} = \sum_p A_{ik} B_{kp} \frac{R_{ip}}{2\,\mathrm{stab}(z_{ip})}, \qquad
              R_{B,kp} = \sum_i A_{ik} B_{kp} \frac{R_{ip}}{2\,\mathrm{stab}(z_{ip})}.

    For sums (``sum``) it splits relevance equally over the terms.
    """

    eps: float = 1e-6
    product_takes_z = True  # product(..., z=) takes the op's output when a saved copy holds it

    def gradient_form(self, family: str):
        """Half the gradient to each factor of a product (an equal split of a sum has no gradient form); with ε
        above the limit, a matrix product's ratio also stabilised (:class:`Stabilised`), an element-wise
        product's halved alone (the rule does not use ε there)."""
        if family not in ("product", "attention"):
            return None
        return (0.5, 0.5) if self.eps <= GRADIENT_EPS else Stabilised(self.eps, 0.5, (0.5, 0.5))

    def product(self, a, b, R, fn, z=None):
        if _elementwise(fn):
            half = R / 2
            return half.sum_to_size(a.shape), half.sum_to_size(b.shape)
        s = over_stabilized(R, fn(a, b) if z is None else z, self.eps).mul_(0.5)  # = R / (2 stab(z)), exactly
        ga, gb = _product_vjp(fn, a, b, s)
        return _times(a, ga, s, b, gb), _times(b, gb, s, a)

    def sum(self, terms, R, combine):
        ones = [torch.ones_like(t) for t in terms]
        s = R / combine(*ones)
        return list(_sum_vjp(combine, ones, s))


@dataclass(frozen=True)
class Constant:
    r"""CP-LRP for products [4]: the first factor (attention weights) is a constant, the second gets all.

    .. math:: R_a = 0, \qquad R_b = b \odot J_b^\top \frac{R}{\mathrm{stab}_\varepsilon(z)}
    """

    eps: float = 1e-6
    product_takes_z = True  # product(..., z=) takes the op's output when a saved copy holds it
    constant_operands = (0,)  # the engine then visits nothing below the first factor (its relevance is zero)

    def gradient_form(self, family: str):
        """No gradient to the first factor, the whole gradient to the second."""
        return (None, 1.0) if family in ("product", "attention") and self.eps <= GRADIENT_EPS else None

    def product(self, a, b, R, fn, z=None):
        if _elementwise(fn):
            return torch.zeros_like(a), R.sum_to_size(b.shape)
        s = over_stabilized(R, fn(a, b) if z is None else z, self.eps)
        if _matrix_product(fn, a, b):
            gb = a.mT @ s
        else:
            (gb,) = vjp(lambda b_: fn(a, b_), [b], s)
        return torch.zeros_like(a), _times(b, gb, s, a)


def _matrix_product(fn, a: Tensor, b: Tensor) -> bool:
    """``mm``/``bmm``, or ``matmul`` without broadcasting (equal batch dimensions): their transposes are plain
    matrix products (``s bᵀ``, ``aᵀ s``), no autograd round trip."""
    if fn is torch.bmm or fn is torch.mm:
        return True
    return fn is torch.matmul and a.dim() == b.dim() >= 2 and a.shape[:-2] == b.shape[:-2]


def _elementwise(fn) -> bool:
    return fn is torch.mul or fn is operator.mul


# ----------------------------------------------------------------------------------------------------------
# softmax and normalisation


@dataclass(frozen=True)
class AttnLRPSoftmax:
    r"""AttnLRP's softmax rule [3] (the ε→0 Taylor rule at the input):

    .. math:: R_{x_i} = x_i \left(R_i - s_i \sum_j R_j\right)

    along the softmax dimension, with :math:`s` the softmax output. Not conservative by design: the missing
    part is absorbed (recorded in the ledger). Masked logits (:math:`x_i = -\infty`) get 0.
    """

    def gradient_form(self, family: str):
        r"""With :math:`R = s \odot g`: :math:`R_x = x \odot s \odot (g - \sum_j s_j g_j)`, the input times
        softmax's own gradient."""
        return PLAIN

    def softmax(self, x, s, R, dim):
        t = s * R.sum(dim, keepdim=True)
        r = (torch.sub(R, t, out=t) if t.shape == R.shape and not torch.is_grad_enabled() else R - t).mul_(x)
        if not bool(torch.isfinite(x.sum())):  # -inf logits (a mask in the graph): 0, not -inf * 0
            r = torch.where(torch.isfinite(x), r, torch.zeros_like(r))
        return r


@dataclass(frozen=True)
class Pass:
    """Identity: relevance passes unchanged to the (first) operand; for softmax and normalisation layers."""

    needs_input = False

    def gradient_form(self, family: str):
        return IDENTITY

    def softmax(self, x, s, R, dim):
        return R

    def norm(self, R):
        return R


@dataclass(frozen=True)
class LinearisedNorm:
    r"""Normalisation with its statistics held constant (AttnLRP / LXT [3]): the ε-rule on the linear map
    :math:`x \mapsto (x - \bar x)\,\sigma^{-1} w` that remains when :math:`\sigma` is fixed,

    .. math:: R_x = x \odot J^\top \frac{R}{\mathrm{stab}_\varepsilon(y)}, \qquad y = (x - \bar x)\,\sigma^{-1} w + b,

    the bias :math:`b` taking its share. For a normalisation written out by hand (``x * rsqrt(mean(x²) + ε)``) it
    passes relevance to the normalised operand; the centring, if any, is then an addition with its own rule.
    """

    eps: float = 1e-12
    linearises = True
    needs_input = True

    def gradient_form(self, family: str):
        return LINEARISED if self.eps <= GRADIENT_EPS else None

    def linearised(self, x, R, fn, y):
        (g,) = vjp(fn, [x], over_stabilized(R, y, self.eps))
        return x * g

    def norm(self, R):
        return R


@dataclass(frozen=True)
class MergeBatchNorm:
    """Batch norm in eval mode right after a convolution or dense layer is merged into it, as zennit's canonizers
    do [6]: the layer is explained with :math:`w' = w\\,\\gamma/\\sigma` and :math:`b' = (b - \\mu)\\,
    \\gamma/\\sigma + \\beta`, and the batch norm passes relevance unchanged. A norm layer that follows no linear
    op is passed through (zennit's ``Pass``)."""

    needs_input = False

    def gradient_form(self, family: str):
        """The identity's, where it merges nothing (the batch norm merged into a layer has the layer's step)."""
        return IDENTITY

    def norm(self, R):
        return R


@dataclass(frozen=True)
class Block:
    """Absorbs all relevance: nothing is passed on (e.g. softmax in the value-path-only attention setting)."""

    needs_input = False
    constant_operands = (0,)  # the engine then visits nothing below (the logits' relevance is zero)

    def gradient_form(self, family: str):
        return BLOCKED

    def softmax(self, x, s, R, dim):
        return torch.zeros_like(R)

    def norm(self, R):
        return torch.zeros_like(R)
