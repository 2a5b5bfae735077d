"""What the engine needs to know about one autograd node type.

An :class:`OpSpec` answers four questions about a node and nothing else:

* which operands it saved (``saved_input``) and whether it can reproduce its own output from what it saved
  (``output``) -- a node that can is an *Arg Node* for the Promise System;
* how to replay its forward from its operands (``forward``), so that a promise can recover an activation
  autograd dropped;
* how relevance splits over its operands (``relevance``), by asking the preset for the rule of its *family* and
  applying it to the operands;
* whether it must be split into primitive parts (``decompose``).

Every read of a torch-private attribute (``_saved_self``, ``_saved_mat2``, ...) goes through :func:`saved`, so a
torch release that renames one fails loudly in one place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy
import torch

from ..errors import GraphFreedError, TorchInternalsError
from ..rules import BLOCKED, IDENTITY, PLAIN, stabilize

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Context
    from ..graph import Node

NEXT = "next"  # a decomposition reference to fn.next_functions[j]
PART = "part"  # a decomposition reference to part k of the same fused node

_MISSING = object()


GRAPH_FREED = ("the autograd graph was already freed by backward(): explain before calling backward(), or call "
               "backward(retain_graph=True)")


def freed(err: RuntimeError) -> bool:
    """Whether autograd raised ``err`` because ``backward()`` already freed the graph's saved tensors."""
    msg = str(err)
    return "freed" in msg or "backward through the graph a second time" in msg


def saved(fn: Any, name: str, default: Any = _MISSING) -> Any:
    """Read the torch-private saved value ``_saved_<name>`` of an autograd node.

    Raises :class:`GraphFreedError` when ``backward()`` already freed it and :class:`TorchInternalsError` when
    the attribute does not exist (unless ``default`` is given). A tensor modified in place after it was saved
    reads as ``None``: the Promise System then recovers it elsewhere.
    """
    try:
        return _signed(getattr(fn, "_saved_" + name))
    except AttributeError:
        if default is not _MISSING:
            return default
        raise TorchInternalsError(
            f"{type(fn).__name__} has no attribute '_saved_{name}' in torch {torch.__version__}; "
            "dynamiclrp's op table needs updating for this torch release"
        ) from None
    except RuntimeError as err:
        msg = str(err)
        if freed(err):
            raise GraphFreedError(GRAPH_FREED) from None
        if "inplace" in msg or "in-place" in msg:
            return None
        raise


def _signed(v: Any) -> Any:
    """torch hands negative saved ints (``dim=-1``) back as unsigned 64-bit values; undo that. (Exact type tests
    and one ``max``: this runs on every saved read, thousands per explanation.)"""
    if type(v) is int:  # not a bool
        return v - 2**64 if v >= 2**63 else v
    if type(v) is tuple and v and all(type(d) is int for d in v) and max(v) >= 2**63:
        return tuple(d - 2**64 if d >= 2**63 else d for d in v)
    return v


def broadcast_shape(*shapes: Sequence[int]) -> torch.Size:
    """``torch.broadcast_shapes(*shapes)``, at once where the shapes are equal (the usual case in a hook): torch's
    own costs about 60 µs a call on the CPU, as much as a pass over a small activation."""
    first = shapes[0]
    for s in shapes[1:]:
        if s != first:
            return torch.broadcast_shapes(*shapes)
    return torch.Size(first)


def out_shape(fn: Any, nr: int = 0) -> torch.Size:
    """Shape of output slot ``nr`` of an autograd node (torch-private ``_input_metadata``)."""
    return fn._input_metadata[nr].shape


def recorded_shape(node: Node, nr: int = 0) -> torch.Size | None:
    """Shape of the node's output slot ``nr`` as autograd recorded it (a leaf: its variable's), without recovering
    the value; None for a later part of a fused node, whose output autograd does not describe."""
    if node.part != 0:
        return None
    return node.fn.variable.shape if not node.inputs else torch.Size(out_shape(node.fn, nr))


def undo_views(views: list, t: torch.Tensor, bottom_shape: torch.Size) -> torch.Tensor:
    """``t``, the output of the top of a chain of views that keep every element (ordered from the consumer down),
    taken back to the input of the bottom one: each view is undone (``spec.invert``) with the shape of the node
    below it, ``bottom_shape`` being the shape below the last."""
    for k, v in enumerate(views):
        below = torch.Size(out_shape(views[k + 1].fn)) if k + 1 < len(views) else bottom_shape
        t = v.spec.invert(v.fn, t, below)
    return t


def through_views(nodes: list, node: Node | None) -> Node | None:
    """The first node at or below ``node`` that is not transparent (a view, a cast): what it is a view of."""
    while node is not None and node.spec.transparent and node.inputs and node.inputs[0] is not None:
        node = nodes[node.inputs[0].child]
    return node


class OpSpec:
    """Default op entry: a single node with no saved operands that cannot be replayed."""

    #: the preset slot asked for this node's rule; ``None`` means the spec applies a fixed rule itself
    family: str | None = None
    #: True if this entry is a documented fallback rather than an explicit rule (coverage reports it)
    fallback: bool = False
    #: True for single-operand ops that neither change values nor mix elements (views, casts): look-through
    transparent: bool = False
    #: a replay may take an operand outside the graph (a constant autograd did not record) as zero; the result
    #: is *provisional* and only a consumer with ``checks_provisional`` (softmax) may use it
    zero_constants: bool = False
    #: this op verifies provisional operands against its saved output before using them
    checks_provisional: bool = False
    #: a replay of this op is always provisional (it fills in a constant that was not saved)
    always_provisional: bool = False
    #: for a view that keeps every element (reshape, transpose, permute, expand, clone): ``invert(fn, y, shape)``
    #: gives its operand (of ``shape``) back from its output ``y``, so a copy saved after the view serves too
    invert: Any = None
    #: ``output`` computes a product (a matrix product, a convolution), not just reads or rescales saved tensors
    costly_output: bool = False

    def decompose(self, fn: Any) -> list[tuple[str, OpSpec, list]]:
        return [(type(fn).__name__, self, [(NEXT, j) for j in range(len(fn.next_functions))])]

    def n_outputs(self, node: Node) -> int:
        return len(node.fn._input_metadata) if node.part == 0 else 1

    def is_data_source(self, node: Node) -> bool:
        """True if this node's output is data even though none of its operands is (an embedding lookup)."""
        return False

    def saved_input(self, node: Node, i: int) -> torch.Tensor | None:
        """Operand ``i`` if the node saved it."""
        return None

    def output(self, node: Node, nr: int) -> torch.Tensor | None:
        """Output slot ``nr`` reproduced from saved tensors alone (this node is then an Arg Node), or None."""
        return None

    def forward(self, node: Node, inputs: list[torch.Tensor | None]) -> torch.Tensor | tuple:
        """Replay the forward op on its operands (``None`` for an operand outside the graph)."""
        raise NotImplementedError

    def operand_from_output(self, node: Node, i: int, out: torch.Tensor,
                            operands: list[torch.Tensor | None]) -> torch.Tensor | None:
        """Operand ``i`` computed from the node's output ``out`` and its other ``operands`` (``operands[i]`` is
        None), or None where the op cannot be undone that way. Used only when the run allows approximate recovery
        (``subtract_addends``): the Promise System then asks an addition for an addend autograd dropped."""
        return None

    def output_at(self, run: Any, node: Node, nr: int, index: torch.Tensor) -> torch.Tensor | None:
        """The elements ``index`` (one row per element: its position in the output, a 2-d output's row and
        column) of output slot ``nr`` as the forward computed them, each worked out on its own (far cheaper than
        the whole output where they are few: a dot product each for a matrix product), or None where the op cannot
        (:func:`~dynamiclrp.ops.base.stabilised_gradient`, where a subtraction left them uncertain)."""
        return None

    def read_off_sum(self, run: Any, node: Node) -> bool:
        """Whether the ε-step should take this node's output off a residual sum (:func:`factor_by_subtraction`)
        rather than recompute it: the op works single elements out (:meth:`output_at`) and recomputing the whole
        output costs several times the subtraction's passes per element."""
        return False

    def infer_input(self, ctx: Context, i: int) -> torch.Tensor | None:
        """Operand ``i`` when it lies outside the graph (a constant), derived from the output; or None."""
        return None

    def relevance(self, ctx: Context) -> list[torch.Tensor | None]:
        """Relevance for each operand, given ``ctx.R`` (relevance per output slot)."""
        raise NotImplementedError

    def gradient_step(self, ctx: Context) -> Any:
        """This node's rule in the gradient form (:mod:`dynamiclrp.gradient_form`): ``PLAIN`` when the node's own
        backward carries the ratio :math:`g = R / x` exactly, a hook ``hook(grad_inputs, grad_outputs) ->
        grad_inputs`` that turns the backward's result into the rule's, or None when the rule has no such form
        (the run then propagates relevance)."""
        return None

    def gradient_step_fused(self, ctx: Context, parts: list[Node]) -> Any:
        """The gradient step of a node split into ``parts`` (``ctx`` is at the head part): the node's backward
        when every part's is plain, else None. A fused op whose parts scale its gradient overrides this."""
        from ..engine import Context  # noqa: PLC0415 - the engine imports this module

        # the head part's step reads its node through ``ctx`` itself (the context a plan rebinds)
        steps = [p.spec.gradient_step(Context(ctx.run, p, []) if k else ctx) for k, p in enumerate(parts)]
        if any(s is not PLAIN for s in steps[1:]):
            return None
        # the head part's output is the node's: a step on the gradient arriving there is the node's
        return steps[0] if steps[0] is PLAIN or isinstance(steps[0], PreHook) or \
            getattr(steps[0], "uniform", None) is not None else None


def held_constant(rule: Any, rel) -> list:
    """``rel`` (a rule's relevance per operand) with None for the operands the rule holds constant
    (``rule.constant_operands``: CP-LRP's attention weights and gates, a blocked softmax's logits). Their relevance
    is zero by the rule, and zero stays zero below them; None means nothing below is visited at all, where zeros
    would cost the branch's whole pass (the query and key projections, a gate's layer, the recomputed logits)."""
    rel = list(rel)
    for i in getattr(rule, "constant_operands", ()):
        rel[i] = None
    return rel


def rule_form(rule: Any, family: str) -> Any:
    """The rule's gradient form for ``family`` (``rule.gradient_form``), or None for a rule without one."""
    form = getattr(rule, "gradient_form", None)
    return None if form is None else form(family)


class PreHook:
    """A gradient step that acts on the gradient arriving at the node (``hook(grad_outputs) -> grad_outputs``),
    before its backward runs, and, where ``post`` is given, then on the backward's result as well
    (``post(grad_inputs, grad_outputs) -> grad_inputs``, ``grad_outputs`` those ``hook`` returned); a plain
    function is a step on the backward's result alone."""

    __slots__ = ("hook", "post")

    def __init__(self, hook: Any, post: Any = None):
        self.hook, self.post = hook, post


class WholeStep(PreHook):
    """A :class:`PreHook` step that also knows every input gradient of its node without the node's own backward:
    ``direct(grad_outputs)`` returns them, one per input (None: none), or None to decline at run time.
    :mod:`dynamiclrp.gradient_bypass` runs it instead of the node where it can hand those gradients on past it;
    elsewhere the node runs with ``hook`` and ``post``. ``through``: graph node ids below the node, each fed by the
    one before alone (the node's own input's producer first), whose backward the step does too: ``direct`` then
    returns the gradients of the last one's inputs instead. ``shared``: output slots ``(graph node id, nr)`` that a
    node of ``through`` also reads besides the chain (T5's position bias, which every layer's scores add), whose
    gradients ``direct`` returns after those, one per slot: summed over every step that returns one for the same
    slot, and handed on once all have (:class:`dynamiclrp.gradient_bypass.Bypasses`)."""

    __slots__ = ("direct", "through", "shared")

    def __init__(self, hook: Any, post: Any, direct: Any, through: tuple = (), shared: tuple = ()):
        super().__init__(hook, post)
        self.direct, self.through, self.shared = direct, through, shared


class DirectStep:
    """A gradient step on a node's result (a post-hook, as :func:`scaled_gradient` gives) that also knows a cheaper
    way to the same result: the step gives a gradient to input ``slot`` alone, and ``direct(grad_outputs)`` returns
    it as ``{slot: gradient}`` without the node's own backward. :mod:`dynamiclrp.gradient_bypass` runs it instead
    of the node where it can carry that gradient on by hand; elsewhere the node runs and ``post`` applies.
    ``direct`` may return None to decline at run time (the node then runs as usual)."""

    __slots__ = ("post", "direct", "slot", "silenced")

    def __init__(self, post: Any, direct: Any, slot: int):
        self.post, self.direct, self.slot = post, direct, slot
        self.silenced = silenced(post)

    def __call__(self, grad_inputs, grad_outputs):
        return self.post(grad_inputs, grad_outputs)


def stabilised_gradient(ctx: Context, eps: float, scale: float = 1.0) -> PreHook:
    r"""Gradient step of the ε-rule (:class:`~dynamiclrp.rules.Stabilised`) at the node whose output :math:`z` is
    the layer's denominator: the gradient arriving there times :math:`|z| / (|z| + \varepsilon)`, the node's own
    backward then applying :math:`J^\top` (and a batch norm's scale, for a batch norm merged into the layer below).

    :math:`z` comes from a ReLU that alone consumes it (:func:`relu_above`, through views), where there is one:
    ReLU saves its output, equal to :math:`z` where :math:`z > 0`, and its backward gave the gradient 0 wherever
    :math:`z \le 0`, which the factor there (0) keeps 0. Else from the Promise System, as the node-by-node rule
    gets it. The node is read through ``ctx`` when the step runs (a plan rebinds it). ``scale``: a constant factor
    on top (the uniform rule's half)."""
    def hook(grad_outputs):
        g = grad_outputs[0]
        if g is None:
            return grad_outputs
        # the factor is the one fresh tensor: the incoming gradient may be shared (an addition passes it on). Before
        # a node whose backward uses its gradient up (a product, a batch norm) it may live in the run's scratch
        # memory, as may |z| + eps: on CPU a fresh tensor of an activation's size can cost several passes
        run = ctx.run
        out = run.scratch(SCRATCH[0], g) if ctx.node.kind in _CONSUMES_ITS_GRADIENT else None
        relu = relu_above(run.graph, ctx.node, g.dtype)
        if relu is not None:  # a ReLU's output: already |z|, and not ours to overwrite
            z = relu[1]
            f = torch.add(z, eps, out=out)
            f = torch.div(z, f, out=f)
        else:  # in the node's dtype, as its backward; a value with an untracked addend taken as zero may lack
            # the dimensions that addend broadcast it to (T5's position bias plus its batch's mask)
            temp = run.scratch(SCRATCH[1], g)
            f = factor_by_subtraction(ctx, g, eps, out, temp)
            if f is None:
                z = ctx.output(0).to(g.dtype)
                f = stabilising_factor(z if z.shape == g.shape else z.expand(g.shape), eps, out, temp)
        return (times_gradient(f, g),) + tuple(grad_outputs[1:])

    def times_gradient(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        f.mul_(g)
        return f.mul_(scale) if scale != 1.0 else f

    def at_rows(g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """The step on rows ``rows`` of a 2-d output gradient alone (``g``: those rows), the factor worked out
        there alone (:func:`output_rows`' :math:`z`), times ``g``, as ``hook`` multiplies it. None where the
        output's rows are not held (the caller takes the whole step)."""
        z = output_rows(ctx, rows, g.dtype)
        if z is None or z.shape != g.shape:
            return None
        return times_gradient(stabilising_factor(z, eps), g)
    hook.at_rows = at_rows  # type: ignore[attr-defined]
    return PreHook(hook)


def output_rows(ctx: Context, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Rows ``rows`` of the 2-d output of ``ctx``'s node, in ``dtype``, where it is held without work: from a ReLU
    that alone consumes it (:func:`relu_above`: its output, which the ε-factor takes for :math:`z`, as the whole
    step does), saved, or a copy of it saved (:meth:`~dynamiclrp.promise.Promises.held`; an explained output is one);
    else None."""
    run, node = ctx.run, ctx.node
    relu = relu_above(run.graph, node, dtype)
    z = relu[1] if relu is not None else run.promises.held(node, 0)
    return z[rows].to(dtype) if z is not None and z.dim() == 2 else None


def factor_by_subtraction(ctx: Context, g: torch.Tensor, eps: float, out: torch.Tensor | None = None,
                          temp: torch.Tensor | None = None) -> torch.Tensor | None:
    r"""The ε-factor :math:`|z| / (|z| + \varepsilon)` of a layer whose output :math:`z` autograd did not keep,
    without recomputing the layer, where a residual sum holds it: from the Promise System's estimate :math:`d`,
    :math:`|d - z| \le U = u\,(|s| + |d|) + 2\eta` (:meth:`~dynamiclrp.promise.Promises.subtracted`).

    The factor rises with :math:`|z|` at slope :math:`\varepsilon / (|z| + \varepsilon)^2`, so where

    .. math:: |d| \ge U - \varepsilon + \sqrt{\varepsilon U / \tau}

    (:math:`\tau` the unit roundoff of the gradient's dtype) the factor of :math:`d` is within :math:`\tau` of
    :math:`z`'s: the unit roundoff of the factor itself. That holds for every element at or above the threshold
    of the largest :math:`U` (two reductions); the few below it are tested one by one, and where it fails
    (:math:`|z|` within about :math:`\sqrt{\varepsilon U / \tau}` of 0) the output is worked out element by
    element (:meth:`OpSpec.output_at`: a dot product each). On the CPU only (the host reads the extremes; on a
    GPU the product is cheap to recompute). None where no estimate is held, the op cannot work out elements, or so
    many are uncertain that recomputing the whole output is cheaper: the caller recomputes it. ``out``, ``temp``:
    as :func:`stabilising_factor`'s."""
    from .attention import CPU_DEVICES  # noqa: PLC0415 - attention imports this module (the host-reading devices)

    node, run = ctx.node, ctx.run
    if g.device.type not in CPU_DEVICES or g.numel() < _SUBTRACTED_FROM or not node.spec.read_off_sum(run, node):
        return None
    found = run.promises.subtracted(node, 0)
    if found is None:
        return None
    d, s = found
    if d.shape != g.shape or d.dtype != g.dtype or s.shape != d.shape:
        return None
    info = torch.finfo(d.dtype)
    u, eta = info.eps / 2, info.smallest_normal * info.eps
    size = d.abs_()  # the estimate is ours: |d| in its place
    low, high = torch.aminmax(s)
    largest = u * (max(-float(low), float(high)) + float(size.amax())) + 2 * eta
    if not math.isfinite(largest):
        return None
    # the only elements that may be uncertain, found by numpy (on the CPU the tensor's memory; torch's compare and
    # nonzero take about ten times as long, as much as a small layer's product); the threshold raised past its
    # rounding to the dtype, and the few found tested in float64
    limit = _certain_from(largest, eps, u) * (1 + 4 * u)
    size_np = size.detach().numpy()
    at = numpy.unravel_index(numpy.flatnonzero(size_np.reshape(-1) < limit), size_np.shape)
    if at[0].size:  # numpy's indexing of a few hundred elements: a tenth of torch's
        near = size_np[at].astype(numpy.float64)
        bound = numpy.abs(s.detach().numpy()[at].astype(numpy.float64)) + near
        uncertain = near < _certain_from(bound * u + 2 * eta, eps, u)
        at = tuple(i[uncertain] for i in at)
    below = torch.from_numpy(numpy.stack(at, 1))
    if below.shape[0] * _UNCERTAIN_SHARE > size.numel():
        return None
    z = None
    if below.shape[0]:
        z = node.spec.output_at(run, node, 0, below)
        if z is None:
            return None
    f = torch.div(size, torch.add(size, eps, out=temp), out=out)
    if z is not None:
        z = z.to(g.dtype).abs_()
        f[tuple(below.T)] = z.div_(z + eps)
    return f


def _certain_from(bound, eps: float, tau: float):
    r"""The least :math:`|d|` at which an estimate within ``bound`` of :math:`z` gives the ε-factor within
    ``tau``: :math:`U - \varepsilon + \sqrt{\varepsilon U / \tau}` (a number, or an array of bounds)."""
    return bound - eps + numpy.sqrt(eps * bound / tau)


#: :func:`factor_by_subtraction` leaves outputs of fewer elements to the replay (the product of a few rows costs
#: less than the passes' fixed costs)
_SUBTRACTED_FROM = 1 << 16
#: :func:`factor_by_subtraction` recomputes the whole output where more than one element in this many is uncertain
#: (element by element, an uncertain element costs about as much as this many of a matrix product's outputs)
_UNCERTAIN_SHARE = 32


def stabilising_factor(z: torch.Tensor, eps: float, out: torch.Tensor | None = None,
                       temp: torch.Tensor | None = None) -> torch.Tensor:
    r""":math:`|z| / (|z| + \varepsilon)`, the ε-rule's :math:`z / \mathrm{stab}_\varepsilon(z)` (sign(0) = +1
    included), written into ``out`` and with :math:`|z| + \varepsilon` in ``temp`` (None: fresh memory)."""
    f = torch.abs(z, out=out)
    return f.div_(torch.add(f, eps, out=temp))


#: the keys of the two scratch buffers (:meth:`dynamiclrp.engine.Run.scratch`) every step shares: a step uses them
#: during its own turn only (a pre-hook's result in the first, before a node whose backward uses it up at once), so
#: that a run keeps two buffers of a size, not one per purpose
SCRATCH = ("scratch 1", "scratch 2")

# nodes whose backward returns products of the incoming gradient with saved tensors, never that gradient itself or a
# view of it: a gradient handed to one is used up when the node has run (a sum's backward, by contrast, passes it on)
_CONSUMES_ITS_GRADIENT = frozenset({"MmBackward0", "BmmBackward0", "ConvolutionBackward0", "NativeBatchNormBackward0"})


def sole_consumer(graph, nid: int, operand: int | None = None):
    """The node that alone consumes output 0 of node ``nid`` (as its operand ``operand``, if given), or None."""
    consumers = graph.consumers.get((nid, 0), ())
    if len(consumers) != 1 or (operand is not None and consumers[0][1] != operand):
        return None
    return graph.nodes[consumers[0][0]]


def relu_above(graph, node: Node, dtype: torch.dtype) -> tuple[Node, torch.Tensor] | None:
    """The ReLU that alone consumes output 0 of ``node``, directly or through views that keep every element (each
    the sole consumer of the one below: a linear layer on a 3-d input is ``mm``, then a view), and its saved output
    taken back through those views to ``node``'s output shape; None where there is none or it was saved in another
    dtype (a lower-precision copy would not be exact). ReLU saves its output, equal to its input wherever that is
    positive, and its backward gives the gradient 0 wherever the input is not."""
    found = _relu_route(graph, node.id)
    if found is None:
        return None
    relu, views = graph.nodes[found[0]], [graph.nodes[v] for v in found[1]]
    r = saved(relu.fn, "result")
    if r is None or r.dtype != dtype:
        return None
    return relu, undo_views(views[::-1], r, torch.Size(out_shape(node.fn, 0)))


def _relu_route(graph, nid: int) -> tuple[int, tuple[int, ...]] | None:
    """:func:`relu_above`'s ReLU and the views on the way, as node ids (kept by a plan's skeleton: the graph's
    structure alone decides them)."""
    skeleton = getattr(graph, "skeleton", None)
    kept = None if skeleton is None else skeleton.relus
    if kept is not None and nid in kept:
        return kept[nid]
    relu, views = sole_consumer(graph, nid, operand=0), []
    while relu is not None and relu.spec.invert is not None and len(relu.inputs) == 1:
        views.append(relu.id)
        relu = sole_consumer(graph, relu.id, operand=0)
    found = (relu.id, tuple(views)) if relu is not None and relu.kind == "ReluBackward0" else None
    if kept is not None:
        kept[nid] = found
    return found


def scaled_gradient(factors: tuple) -> Any:
    """Gradient step: operand ``i``'s gradient times ``factors[i]`` (None: no gradient; past the end: as is), in
    place where the node's backward made that gradient afresh (:func:`spare`): a new tensor per operand would cost
    the pass an activation's worth of fresh memory, whose page faults cost more than the multiplication. One factor
    for every operand (AttnLRP's halves) is the node's incoming gradient scaled (the backward is linear in it):
    the step's ``uniform`` says so, which lets a fused node whose head part has it take it as its own."""
    def hook(grad_inputs, grad_outputs):
        out = []
        for i, g in enumerate(grad_inputs):
            f = 1.0 if i >= len(factors) else factors[i]
            if g is None or f is None or f == 1.0:
                out.append(None if f is None else g)
                continue
            others = [h for j, h in enumerate(grad_inputs) if j != i and h is not None]
            out.append(g * f if spare(g, g.shape, g.dtype, *grad_outputs, *others) is None else g.mul_(f))
        return tuple(out)
    hook.silenced = frozenset(i for i, f in enumerate(factors) if f is None)  # type: ignore[attr-defined]
    hook.uniform = factors[0] if len(set(factors)) == 1 else None  # type: ignore[attr-defined]
    return hook


def one_operand_step(factors: tuple, direct_for: Any) -> Any:
    """:func:`scaled_gradient` with ``factors``; where one operand alone keeps a factor and
    ``direct_for(i, factor)`` gives a way to compute that operand's gradient without the node's own backward, a
    :class:`DirectStep` (the bypass then skips the product the backward would spend on the held operands)."""
    step = scaled_gradient(factors)
    kept = [i for i, f in enumerate(factors) if f is not None]
    direct = direct_for(kept[0], factors[kept[0]]) if len(kept) == 1 else None
    return step if direct is None else DirectStep(step, direct, kept[0])


def silenced(step: Any) -> frozenset[int]:
    """The inputs a gradient step gives no gradient at all, whatever the node computed for them (a factor None
    of :func:`scaled_gradient`): what only they feed gets nothing from this node."""
    return getattr(step, "silenced", frozenset())


def gradient_of_rule_form(form: Any, ctx: Context) -> Any:
    """The gradient step of a single-operand op whose rule has the gradient form ``form`` (``PLAIN``,
    ``IDENTITY``, ``BLOCKED``), or None."""
    if form is PLAIN:
        return PLAIN
    if form is BLOCKED:
        return scaled_gradient((None,))
    if form is IDENTITY:
        return identity_gradient(ctx)
    return None


def ratio(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``r / x`` (a fresh tensor): the ratio that carries relevance ``r`` at a value ``x``. Where ``x = 0`` and
    ``r = 0`` it is 0 (the relevance ``x g`` is 0 whatever ``g``); where ``x = 0`` but ``r ≠ 0`` no ratio carries
    ``r`` and it is ±inf, which makes the relevance below non-finite: the run's check then falls back to the
    node-by-node propagation instead of losing ``r``."""
    return _zero_undefined_(torch.div(r, x))


def ratio_(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:func:`ratio` in place: ``r`` is overwritten by ``r / x`` and returned."""
    return _zero_undefined_(r.div_(x))


def all_finite(r: torch.Tensor) -> torch.Tensor:
    """Whether every element is finite, as a 0-d bool tensor (no host sync): the extremes are finite exactly then
    (min and max propagate NaN). One reduction, where ``isfinite(r).all()`` writes a bool tensor as large as ``r``.

    On a ratio (:func:`ratio`, NaN already 0) it tells whether the ratio carried all its relevance: an infinity is
    relevance at a zero value. It need not reach the input -- a ReLU's or a max-pooling's backward below drops it
    where the value is 0, and the relevance would be lost without a trace -- so the gradient form flags each ratio
    (``Run.carried``: each ratio's :func:`carried_flag`), reads them after its pass and leaves such a run to the
    node-by-node propagation."""
    return torch.isfinite(extremes(r)).all()


def extremes(r: torch.Tensor) -> torch.Tensor:
    """The smallest and the largest element of ``r`` (zeros for an empty ``r``), as a tensor of two on its device:
    every element is finite exactly where these are (min and max propagate NaN). Several tensors are checked by
    :func:`all_finite` of their extremes concatenated: two ops per tensor, one check and one host read for all."""
    if r.numel() == 0:
        return torch.zeros(2, dtype=r.dtype, device=r.device)
    return torch.stack(torch.aminmax(r))


def carried_flag(r: torch.Tensor) -> torch.Tensor:
    """A ratio's flag for the gradient form's check (``Run.carried``): the sum of its elements, one number on its
    device (in float32 at least: a half-precision sum would overflow at 65,504), non-finite wherever an element
    is. A sum of finite elements can overflow too (past about 1e38 in float32): the pass is then left to the
    node-by-node propagation, slower and never wrong. A fifth of :func:`extremes`' time on a block in cache (a
    sum is one vectorised pass; min and max together are not)."""
    half = r.dtype in (torch.float16, torch.bfloat16)
    return r.sum(dtype=torch.float32 if half else None).reshape(1)


def _zero_undefined_(q: torch.Tensor) -> torch.Tensor:
    """0/0 (NaN) → 0 in place; ±inf kept (see :func:`ratio`)."""
    return q.nan_to_num_(0.0, posinf=math.inf, neginf=-math.inf)


def spare(grad: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype, *others: torch.Tensor) -> Any:
    """A gradient hook may write its result into ``grad``, the gradient the node's own backward just computed and
    the hook replaces, when that is a fresh dense tensor of the result's ``shape`` and ``dtype`` sharing no memory
    with ``others`` (what the hook reads); else None (allocate). Reusing it spares the pass an allocation of an
    activation's size per hook: fresh memory is what a backward pass pays page faults for."""
    if (grad is None or grad.shape != shape or grad.dtype != dtype or grad._base is not None
            or not grad.is_contiguous()):
        return None
    ptr = grad.untyped_storage().data_ptr()
    return None if any(t.untyped_storage().data_ptr() == ptr for t in others) else grad


class IdentityStep(DirectStep):
    """The step :func:`identity_gradient` makes: its node and ``quotient`` kept, so that the gradient form can remake
    it with a stabiliser (:func:`dynamiclrp.gradient_form.gradient_steps`)."""

    __slots__ = ("ctx", "quotient")


def identity_gradient(ctx: Context, quotient: Any = None, stabiliser: float | None = None) -> IdentityStep:
    r"""Gradient step of the identity rule :math:`R_x = R_y`: :math:`g_x = R_x / x = g_y\,y / x`, with
    ``quotient(fn, x, out, y)`` writing :math:`y / x` (its limit at 0 included) into ``out`` (a tensor like ``x``,
    or None: allocate) and returning it, from ``y`` where a consumer saved the output (else None: the quotient's
    closed form, nothing replayed), else by :func:`ratio`. The other operands get nothing.

    ``stabiliser``: the ε of the sum that made ``x``, whose step is taken into this one (its factor
    :math:`|x| / (|x| + \varepsilon)`, :func:`stabilised_gradient`): :math:`g_y\,y / \mathrm{stab}_\varepsilon(x)`,
    which the ε-rule below then reads as :math:`R_x / \mathrm{stab}(x)`. Unlike the ratio it is finite where
    :math:`x = 0` (relevance at a zero value, which the ratio cannot carry: :func:`all_finite`).

    A :class:`DirectStep`: the node's own backward (``gelu_backward``, ``silu_backward``, ...) computes a gradient
    the step then throws away, as costly as the step itself; where the bypass can carry the step's result on by
    hand (:mod:`dynamiclrp.gradient_bypass`) the node is not run at all."""
    def step(x: torch.Tensor, g: torch.Tensor, out_like: torch.Tensor | None) -> torch.Tensor:
        if quotient is not None and stabiliser is None:
            y = ctx.run.promises.saved_copy(ctx.node)  # a consumer saved the output: y / x, nothing recomputed
            out = None if out_like is None else spare(out_like, x.shape, torch.promote_types(x.dtype, g.dtype), x, g)
            return quotient(ctx.node.fn, x, out, y).mul_(g)
        y = ctx.node.spec.output(ctx.node, 0)  # from what the node saved: not kept by the promises
        y = ctx.output(0) if y is None else y.to(g.dtype)
        shape = broadcast_shape(g.shape, y.shape, x.shape)
        out = None if out_like is None else spare(out_like, shape, torch.promote_types(g.dtype, y.dtype), x, g, y)
        q = torch.mul(g, y) if out is None else torch.mul(g, y, out=out)
        if stabiliser is not None:  # never infinite: no flag
            return q.div_(stabilize(x.to(q.dtype), stabiliser))
        q = ratio_(q, x)
        ctx.run.carried.append(carried_flag(q))
        return q

    def hook(grad_inputs, grad_outputs):
        g = grad_outputs[0]
        if g is None or grad_inputs[0] is None:
            return grad_inputs
        r = step(ctx.input(0), g, grad_inputs[0])  # into the node's own result where it can (see spare)
        if r.shape != grad_inputs[0].shape:
            r = r.sum_to_size(grad_inputs[0].shape)
        return (r,) + (None,) * (len(grad_inputs) - 1)

    def direct(grad_outputs):
        g = grad_outputs[0]
        if g is None:
            return None
        x = ctx.input(0)
        r = step(x, g, None)
        if r.shape != x.shape:
            r = r.sum_to_size(x.shape)
        return {0: r.to(x.dtype)}
    made = IdentityStep(hook, direct, 0)
    made.ctx, made.quotient = ctx, quotient
    return made


def with_stabilising_factor(step: Any, slot: int, eps: float, ctx: Context) -> Any:
    r"""``step`` (a node's gradient step, or PLAIN) followed by the factor :math:`|x| / (|x| + \varepsilon)` on the
    gradient it gives operand ``slot``, :math:`x` that operand (``ctx``: a context at the node): the ε-step of the
    sum that made :math:`x`, applied by each of the sum's consumers to what it sends back rather than by the sum to
    their total (:func:`dynamiclrp.gradient_form.gradient_steps`). The product is fresh memory: a node may pass
    one gradient on to several operands (an addition does)."""
    def factor(grad_inputs):
        g = grad_inputs[slot]
        if g is None:
            return grad_inputs
        f = stabilising_factor(ctx.input(slot).to(g.dtype), eps).mul_(g)
        return tuple(f if i == slot else t for i, t in enumerate(grad_inputs))

    if step is PLAIN:
        return lambda grad_inputs, grad_outputs: factor(grad_inputs)
    if isinstance(step, PreHook):
        post = step.post
        return PreHook(step.hook, (lambda gi, go: factor(post(gi, go))) if post is not None else
                       (lambda gi, go: factor(gi)))
    made = lambda gi, go: factor(step(gi, go))  # noqa: E731
    if isinstance(step, DirectStep):
        def direct(grad_outputs):
            grads = step.direct(grad_outputs)
            if grads is None or slot not in grads:
                return grads
            return {**grads, slot: factor(tuple(grads.get(i) for i in range(slot + 1)))[slot]}
        both = DirectStep(made, direct, step.slot)
        both.silenced = step.silenced
        return both
    made.silenced = silenced(step)  # type: ignore[attr-defined]
    return made


def route(ctx: Context) -> list[torch.Tensor | None]:
    """Send relevance back through the node's own backward: exact for routing ops (views, slices, cat, ...).

    For an op that only moves, copies or selects elements, the vector-Jacobian product with the output
    relevance *is* the LRP rule: every output element's relevance goes to the input element it came from,
    summed over copies.
    """
    fn = ctx.node.fn
    meta = fn._input_metadata
    # the node's backward expects gradients of its outputs' dtypes; relevance is cast there and back
    grads = [
        (r if r is not None else torch.zeros(out_shape(fn, k), dtype=ctx.dtype, device=ctx.device)).to(meta[k].dtype)
        for k, r in enumerate(ctx.R)
    ]
    out = fn(*grads) if callable(fn) else fn.apply(*grads)  # custom autograd.Function nodes have .apply
    out = [None if r is None else r.to(ctx.dtype) for r in (out if isinstance(out, tuple) else [out])]
    # as autograd's engine does after calling a node: sum broadcast gradients back to each operand's shape
    for i, r in enumerate(out):
        if r is not None and i < len(ctx.node.inputs) and ctx.node.inputs[i] is not None:
            shape = ctx.input_shape(i)
            if r.shape != shape:
                out[i] = r.sum_to_size(shape)
    return out


class Routing(OpSpec):
    """Ops whose relevance follows the elements: view, permute, cat, slice, index, max-pool, ...

    Relevance is routed through the node's own backward (:func:`routing`). ``replay`` replays the forward on the
    operands; ``family`` is None because no preset rule changes a routing op.
    """

    def __init__(self, replay=None):
        self.replay = replay

    def forward(self, node, inputs):
        if self.replay is None:
            raise NotImplementedError
        return self.replay(node.fn, *inputs)

    def relevance(self, ctx):
        return route(ctx)

    def gradient_step(self, ctx):
        return PLAIN  # the relevance already is the node's backward


class Identity(OpSpec):
    r"""Element-wise ops that pass relevance unchanged to their single operand (Neg, Clone, activations, ...).

    ``homogeneous``: the op is :math:`y = c(x)\,x` with :math:`c` constant where it is differentiable (ReLU,
    scaling, negation, casts): then :math:`y / x` is its gradient, and the gradient form needs no hook."""

    def __init__(self, replay=None, out=None, saved_in=None, fallback=False, homogeneous=False, quotient=None):
        self.replay, self.out, self.saved_in, self.fallback = replay, out, saved_in, fallback
        self.homogeneous = homogeneous
        self.quotient = quotient  # quotient(fn, x, out, y) = y / x; closed form (GELU: Φ(x)) where y is None

    def saved_input(self, node, i):
        return self.saved_in(node.fn) if self.saved_in is not None and i == 0 else None

    def output(self, node, nr):
        if self.out is not None:
            return self.out(node.fn)
        x = self.saved_input(node, 0)
        return None if x is None or self.replay is None else self.replay(node.fn, x)

    def forward(self, node, inputs):
        if self.replay is None:
            raise NotImplementedError
        return self.replay(node.fn, *inputs)

    def relevance(self, ctx):
        (R,) = ctx.R
        return [R] + [None] * (len(ctx.node.inputs) - 1)

    def gradient_step(self, ctx):
        if self.fallback:
            return None
        return PLAIN if self.homogeneous and len(ctx.node.inputs) == 1 else identity_gradient(ctx, self.quotient)
