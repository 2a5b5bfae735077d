r"""In-place ops on views, and the views autograd regenerates after them.

An in-place op on a view of a tensor (``x[:, :3] = y``, ``x[:, 0].relu_()``, ``F.pad(mode="circular")``) is
recorded by autograd as a ``CopySlices`` node on the *base* that wraps the op's own node; a later read of the
modified view becomes an ``AsStridedBackward0`` node that cuts the view out of the modified base again.

Neither node exposes the view's geometry, and neither needs to: both are linear maps :math:`z = J x` whose
backward computes :math:`J^\top u`, so differentiating :math:`\langle J^\top u, x\rangle` with respect to
:math:`u` gives :math:`z = J x` back exactly. That replays them, and their own backward routes relevance.

What has a rule:

* ``CopySlices`` wrapping ``copy_`` (slice assignment, circular padding): routing, :class:`CopyIntoView`.
* ``CopySlices`` wrapping a unary op whose rule is the identity (``relu_``, ``clamp_``, ``mul_(2.0)``, ...):
  relevance passes to the base unchanged, element for element (outside the view the op copies, inside it the
  identity rule holds).
* ``AsStridedBackward0``: routing, :class:`ViewOfBase`.

A ``CopySlices`` around any other in-place op on a view (``x[:, i] += y``, ``x[:, i].mul_(y)``) raises an error
that says to write the op out of place: its rule would need the view's geometry to find the operands.
"""

from __future__ import annotations

import math

import torch

from ..errors import DynamicLRPError
from .base import Identity, OpSpec, Routing, route


def _linear_replay(fn, inputs: list[torch.Tensor | None]) -> torch.Tensor:
    r"""Output of a linear node from its operands, through its backward: :math:`z = \partial_u \sum_k \langle
    J_k^\top u, x_k\rangle` (operands that are None -- constants outside the graph -- are taken as zero)."""
    meta = fn._input_metadata[0]
    x0 = next(x for x in inputs if x is not None)
    u = torch.zeros(meta.shape, dtype=meta.dtype, device=x0.device, requires_grad=True)
    with torch.enable_grad():
        grads = fn(u)
        grads = grads if isinstance(grads, tuple) else (grads,)
        inner = sum((g.to(x.dtype) * x).sum() for g, x in zip(grads, inputs) if g is not None and x is not None)
        (z,) = torch.autograd.grad(inner, u)
    return z.to(x0.dtype)


class ViewOfBase(Routing):
    """``AsStridedBackward0``: a view cut out of a base that an in-place op on another view modified.

    Each output element is a copy of one base element: relevance is routed through the node's own backward
    (exact), and the replay uses the node's backward as described in the module docstring (exact for any
    geometry, also where the view overlaps itself).
    """

    def forward(self, node, inputs):
        if inputs[0] is None:
            raise NotImplementedError
        return _linear_replay(node.fn, [inputs[0]])


class CopyIntoView(OpSpec):
    r"""``CopySlices``: ``out = base`` with a view of it overwritten by an op.

    *Wrapping* ``copy_``: every output element is a copy of a base element or of a source element, so relevance
    is routed through the node's own backward (exact: overwritten base elements get none, a broadcast source
    element gets the sum over its copies). The op is linear in ``(base, src)`` and replays through its backward.
    A base outside the graph (``torch.empty``, ``torch.zeros``) is taken as zeros, the convention of
    :mod:`~dynamiclrp.ops.index`: exact where it is overwritten (circular padding; SigLIP-2 overwrites every
    element).

    *Wrapping a unary op with the identity rule* (``v.relu_()`` on a view ``v`` of ``x``): :math:`R_x = R_{out}`
    element for element. It cannot be replayed (the view's region is unknown); the Promise System then takes
    the value from a consumer that saved it.
    """

    def forward(self, node, inputs):
        if len(inputs) != 2 or not _wraps_copy(node.fn):
            raise NotImplementedError
        base, src = inputs
        if src is None:
            raise NotImplementedError  # a constant source: autograd saved nothing of it
        return _linear_replay(node.fn, [base, src])

    def relevance(self, ctx):
        fn = ctx.node.fn
        if _wraps_copy(fn):
            return route(ctx)
        if _wraps_identity(fn) and len(ctx.node.inputs) == 1:
            return [ctx.R[0]]
        wrapped = type(getattr(fn, "_wrapped_node", None)).__name__
        raise DynamicLRPError(
            f"CopySlices (node #{ctx.node.id}) wraps an in-place {wrapped} on a view (e.g. x[:, i] += y); only "
            "copy_ (slice assignment) and unary in-place ops (relu_, ...) on a view have a rule. Write the op "
            "out of place (x = torch.cat(...), x = x + y), or register a rule with dynamiclrp.register_op"
        )


def _wraps_identity(fn) -> bool:
    """Whether a ``CopySlices`` node wraps a unary op whose rule is the identity (needs ``_wrapped_node``)."""
    from . import spec_for  # the table imports this module

    wrapped = getattr(fn, "_wrapped_node", None)
    if wrapped is None:
        return False
    spec = spec_for(wrapped)
    return type(spec) is Identity and not spec.fallback and len(wrapped.next_functions) == 1


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


INPLACE_OPS: dict[str, OpSpec] = {
    "CopySlices": CopyIntoView(),
    "AsStridedBackward0": ViewOfBase(),
}

