"""Softmax and scaled dot-product attention.

A fused attention node (every backend torch produces: CPU flash, CUDA flash, memory-efficient, cuDNN) is split
into its primitive parts so that the preset's rules apply to each, exactly as for attention written out by hand:

``out = P @ V`` (family ``attention``) <- ``P = softmax(L)`` (``softmax``) <- ``L = S + mask`` (``sum``, only when
there is a mask) <- ``S = scale * Q @ Kᵀ`` (``product``). Grouped-query attention (fewer K/V heads) is handled by
repeating K and V inside the recomputed products, whose vector-Jacobian products sum the repeats back.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ..errors import ActivationUnavailableError, DynamicLRPError
from ..rules import BLOCKED, IDENTITY, PLAIN, Stabilised, over_stabilized, stabilize
from .base import (
    NEXT,
    PART,
    SCRATCH,
    DirectStep,
    OpSpec,
    PreHook,
    WholeStep,
    broadcast_shape,
    carried_flag,
    held_constant,
    identity_gradient,
    ratio_,
    rule_form,
    saved,
    scaled_gradient,
    spare,
    stabilised_gradient,
    stabilising_factor,
    through_views,
)
from .elementwise import AddTerms, softmax_applies_stabiliser


class Softmax(OpSpec):
    """Softmax along ``dim`` (family ``softmax``).

    Its logits are often ``scores + mask`` with a mask autograd did not record; the Promise System then replays
    them with the mask taken as zero (*provisional*). That is exact for the rules wherever the mask is 0 (attended)
    and irrelevant where it masks (probability 0, relevance 0) -- which holds exactly when, on the positions the
    saved probabilities attend to, ``log p - logits`` is constant per row. The check is made; a mask that does
    more (a position bias) raises an error instead of a wrong answer. Masked positions then get no relevance,
    as with a ``-inf`` mask, whatever fill value (``-inf``, ``finfo.min``, ``-1e4``) the model used. A row whose
    every attended logit the fill value rounded away (a padded query: equal probabilities whatever its scores)
    counts as fully masked and gets none either.

    One case the check cannot see: an untracked constant that *shifts* a whole row (softmax is blind to it). A
    frozen layer bias there is refused (:class:`~dynamiclrp.ops.elementwise.BiasAdd`); any other untracked
    addend is taken to be a mask, so a frozen per-row shift parameter added to the logits would be explained as
    if it were zero. :func:`dynamiclrp.explain` tracks every parameter, which rules this out; it concerns
    :func:`dynamiclrp.propagate` on a graph built with frozen parameters.
    """

    family = "softmax"
    checks_provisional = True

    def output(self, node, nr):
        return saved(node.fn, "result")

    def forward(self, node, inputs):
        return torch.softmax(inputs[0], saved(node.fn, "dim"))

    def dim(self, node):
        return saved(node.fn, "dim")

    def relevance(self, ctx):
        (R,) = ctx.R
        rule = ctx.rule("softmax")
        if 0 in getattr(rule, "constant_operands", ()):  # blocked: the logits (and what made them) get nothing
            return [None]
        s, dim = ctx.output(0), self.dim(ctx.node)
        x, attended = None, None
        if getattr(rule, "needs_input", True) or _masked_logits(ctx):
            x = ctx.input(0)
            e = ctx.node.inputs[0]
            if e is not None and (e.child, e.nr) in ctx.run.promises.provisional:
                weights = _check_mask(ctx.node, x, s, dim, ctx.run.scratch)
                # a check switched off (a test) returns None: nothing is then masked
                attended = None if weights is None else weights.sign_()  # 1.0 where attended, else 0.0
                ctx.run.promises.certify((e.child, e.nr))
        r = rule.softmax(x, s, R, dim)
        if attended is not None:  # masked logits get no relevance, as with a -inf mask, whatever the fill value
            r = r.mul_(attended) if r is not R and r.shape == attended.shape else r * attended
        return [r]

    def gradient_step(self, ctx):
        """AttnLRP's rule is softmax's own gradient (masked logits, whatever their fill value, get a gradient of
        0 or of the order of their probability); a blocked softmax passes nothing; the identity rule (``Pass``)
        the identity's step, with the mask check where the logits may carry an untracked mask."""
        form = rule_form(ctx.rule("softmax"), "softmax")
        if form is IDENTITY:
            chain = scores_chain(ctx, ctx.node)
            if chain is not None:  # the logits are a product's scaled scores: worked out a block at a time
                return _scores_identity_step(ctx, chain)
            # R_x = R_y needs x: logits that may carry an untracked mask are known only with the mask taken as
            # zero, which is checked against the output as node by node (masked logits get nothing)
            return _masked_identity_step(ctx) if _masked_logits(ctx) else identity_gradient(ctx)
        return PLAIN if form is PLAIN else scaled_gradient((None,)) if form is BLOCKED else None


def _masked_identity_step(ctx):
    r"""The identity rule's step (:math:`g_x = g_y\,y / x`) on a softmax whose logits may carry an untracked mask:
    logits the Promise System knows only with the mask taken as zero (provisional) are checked against the output
    first, as :meth:`Softmax.relevance` checks them (a constant that is not a mask raises), and the masked ones get
    nothing. Where the logits are a sum whose ε-step this step takes over
    (:func:`~dynamiclrp.ops.elementwise.softmax_applies_stabiliser`), the ratio and that step's factor
    :math:`|x| / (|x| + \varepsilon)` come as one, :math:`g_x = g_y\,y / \mathrm{stab}_\varepsilon(x)`, with no
    ratio by :math:`x`: a logit of 0 carries its relevance on to the sum's ε-rule, as node by node, where the ratio
    was infinite (and sent the run node by node). The node is read through ``ctx`` when the step runs."""
    producer = ctx.producer(0)
    eps = None if producer is None else softmax_applies_stabiliser(ctx, producer)

    def hook(grad_inputs, grad_outputs):
        g = grad_outputs[0]
        if g is None or grad_inputs[0] is None:
            return grad_inputs
        node, run = ctx.node, ctx.run
        # the node's dtype (a float32 softmax in a float64 model), as its backward's
        s, x = ctx.output(0).to(g.dtype), ctx.input(0).to(g.dtype)
        out = spare(grad_inputs[0], g.shape, g.dtype, g, s, x)  # softmax's own result, ours to overwrite
        e = node.inputs[0]
        if e is not None and (e.child, e.nr) in run.promises.provisional:  # the masked positions' weights 0
            s = _check_mask(node, x, s, saved(node.fn, "dim"), run.scratch, run.mask_checks)
            run.promises.certify((e.child, e.nr))
        q = torch.mul(g, s) if out is None else torch.mul(g, s, out=out)  # R_x = R_y (the identity)
        if eps is None:
            q = ratio_(q, x)
        else:  # R_x / stab(x), its denominator in a scratch buffer
            _over_stab(q, x if x.shape == q.shape else x.expand(q.shape), eps, run.scratch(SCRATCH[1], q))
        run.carried.append(carried_flag(q))
        return (q,) + (None,) * (len(grad_inputs) - 1)
    return hook


def _masked_logits(ctx) -> bool:
    """Whether the logits come (through views) from an op that may add an untracked mask."""
    node = through_views(ctx.run.graph.nodes, ctx.producer(0))
    return node is not None and (node.spec.zero_constants or node.spec.always_provisional)


class _ScoresChain(NamedTuple):
    """Logits made as ``softmax(scores [* c] [+ mask or bias])`` from a matrix product (see :func:`scores_chain`):
    graph node ids, and the rules' numbers the softmax step applies."""

    product: int  # the scores' matrix product, Q Kᵀ (a BmmBackward0)
    scaling: int | None  # the scaling by a constant c (a product or a quotient), None where there is none (T5)
    through: tuple  # every node below the softmax down to the product, in order (the mask's sum, the scaling, views)
    mask: int | None  # the sum with a mask or a bias (its ε-step applied by the softmax step), None where none
    mask_eps: float | None
    bias: int | None  # the sum's operand that is a recorded bias, not the scores (T5's position bias)
    eps: float  # the product's ε-rule (Stabilised): its ε and factor
    scale: float
    #: whether the softmax's step applies the product's factor too (the product's step is then its plain gradient);
    #: not where a bias whose relevance is asked for shares the logits' gradient (the sum's backward hands it the
    #: same gradient as the scores): the step then leaves the product's factor for the product's own step
    #: (:func:`product_step_of`), worked out with the rest, a block at a time (carried by hand, it folds the factor
    #: all the same and hands the bias its own gradient apart)
    folds_product: bool
    #: a second sum above the first that adds a mask autograd did not record, ``(x + bias) + mask`` (T5 under
    #: transformers 5, whose attention adds the position bias and the mask one after the other): its node and ε,
    #: its ε-step applied by the softmax's step too; None where the mask is added in the first sum or not at all
    outer: int | None = None
    outer_eps: float | None = None


#: the scalings of a chain: node type -> whether it divides
_SCALINGS = {"MulBackward0": False, "MulBackward1": False, "DivBackward0": True, "DivBackward1": True}
#: the views between a batched product and its scaling (``torch.matmul`` folds the batch dimensions)
_PRODUCT_VIEWS = frozenset({"UnsafeViewBackward0", "ViewBackward0", "ReshapeAliasBackward0"})


def scores_chain(ctx, softmax) -> _ScoresChain | None:
    r"""The chain below ``softmax`` (a graph node; ``ctx``: a context of the same run) whose steps its identity
    rule's step takes over, or None: attention written out, :math:`P = \mathrm{softmax}(c\,QK^\top + M)` with
    ``M`` a mask autograd did not record, a recorded bias beside the scores (T5's position bias, its mask added or
    not; its value is recovered once; or the mask added in a second sum, :math:`(c\,QK^\top + B) + M`, as T5
    under transformers 5 adds it: both sums' ε-steps then taken), or none, the softmax passing relevance unchanged
    and the scores product under an ε-rule (:class:`~dynamiclrp.rules.Stabilised`; the ``epsilon`` preset). Along
    it: the batched product (``bmm``), views, a scaling by one constant number (its own gradient; T5 has none), the sum
    (whose ε-step :func:`~dynamiclrp.ops.elementwise.softmax_applies_stabiliser` gives the softmax step), each
    read by the next alone, none recorded nor seeded, all in the softmax's dtype, the softmax over the last
    dimension.

    The softmax step then computes what the steps of the sum and of the product would have, on the scores
    recomputed a block of rows at a time (no tokens x tokens tensor replayed and kept), and the product's own step
    is the plain gradient. Both steps ask this one function, so they cannot disagree; it works the chain out once
    per run (kept in :attr:`~dynamiclrp.engine.Run.derived`)."""
    key = (_SCORES_CHAIN, softmax.id)
    derived = ctx.run.derived
    if key not in derived:
        derived[key] = _find_scores_chain(ctx, softmax)
    return derived[key]


#: the key (with the softmax's node id) of its :func:`scores_chain` in :attr:`dynamiclrp.engine.Run.derived`
_SCORES_CHAIN = "scores chain"


def _find_scores_chain(ctx, softmax) -> _ScoresChain | None:
    """:func:`scores_chain`, worked out."""
    run = ctx.run
    graph, nodes = run.graph, run.graph.nodes
    if softmax.spec.family != "softmax" or rule_form(ctx.rule_at(softmax, "softmax"), "softmax") is not IDENTITY:
        return None
    dim = saved(softmax.fn, "dim", None)
    s = saved(softmax.fn, "result", None)
    if s is None or dim not in (-1, s.dim() - 1):
        return None

    def alone(node) -> bool:  # read by the next node of the chain only, and nothing asks for it
        cons = graph.consumers.get((node.id, 0), ())
        return len(cons) == 1 and cons[0][1] == 0 and (node.id, 0) not in run.record and \
            (node.id, 0) not in run.seeds and len(graph.parts(node.fn)) == 1

    node = ctx.producer(0) if ctx.node is softmax else (
        None if softmax.inputs[0] is None else nodes[softmax.inputs[0].child])
    from ..engine import Context  # noqa: PLC0415 - the engine imports this module
    mask = mask_eps = bias = outer = outer_eps = None
    through = []
    inner = _inner_sum(nodes, node)
    if inner is not None:  # (x + bias) + mask: the mask's sum above the bias's
        outer_eps = softmax_applies_stabiliser(ctx, node)
        inner_form = rule_form(ctx.rule_at(inner, "sum"), "sum")
        if outer_eps is None or not isinstance(inner_form, Stabilised) or not alone(node) or any(
                node.spec.term_factor(node, k) != 1.0 for k, e in enumerate(node.inputs) if e is not None):
            return None
        outer, mask_eps = node.id, inner_form.eps
        through.append(outer)
        node = inner
    if node is not None and isinstance(node.spec, AddTerms) and node.spec.family == "sum":
        if outer is None:
            mask_eps = softmax_applies_stabiliser(ctx, node)
        scores = [k for k, e in enumerate(node.inputs) if e is not None and _to_product(nodes, nodes[e.child])]
        others = [k for k, e in enumerate(node.inputs) if e is not None and k not in scores]
        if mask_eps is None or len(scores) != 1 or len(others) > 1 or not alone(node) or any(
                node.spec.term_factor(node, k) != 1.0 for k in (*scores, *others)):
            return None
        bias = others[0] if others else None
        mask, node = node.id, nodes[node.inputs[scores[0]].child]
        through.append(mask)
    scaling = None
    if node is not None and node.kind in _SCALINGS:
        if not alone(node) or node.inputs[0] is None or any(e is not None for e in node.inputs[1:]):
            return None
        c = saved(node.fn, "other", None)  # one number (a tensor of one element): the step scales each block by it
        if not isinstance(c, (int, float)) and not (isinstance(c, torch.Tensor) and c.numel() == 1):
            return None
        if node.spec.gradient_step(Context(run, node, [])) is not PLAIN:
            return None
        scaling = node
        through.append(scaling.id)
        node = nodes[node.inputs[0].child]
    if node is None:
        return None
    while node.kind in _PRODUCT_VIEWS and alone(node) and node.inputs and node.inputs[0] is not None:
        through.append(node.id)
        node = nodes[node.inputs[0].child]
    if node.kind != "BmmBackward0" or not alone(node) or any(
            e is None or not nodes[e.child].data for e in node.inputs):
        return None
    form = rule_form(ctx.rule_at(node, "product"), "product")
    q, kt = saved(node.fn, "self", None), saved(node.fn, "mat2", None)
    if not isinstance(form, Stabilised) or q is None or kt is None or q.dtype != s.dtype or \
            s.numel() != q.shape[0] * q.shape[1] * kt.shape[2]:  # a mask that broadcast the scores to more
        return None
    folds = bias is None or not run.useful[nodes[mask].inputs[bias].child]
    return _ScoresChain(node.id, None if scaling is None else scaling.id, (*through, node.id), mask, mask_eps, bias,
                        form.eps, form.scale, folds, outer, outer_eps)


def _inner_sum(nodes, node):
    """The sum below ``node`` where ``node`` is a sum that adds only constants autograd did not record (a mask) to
    it, and it only recorded operands (``(x + bias) + mask``); else None."""
    if node is None or not isinstance(node.spec, AddTerms) or node.spec.family != "sum":
        return None
    tracked = [e for e in node.inputs if e is not None]
    if len(tracked) != 1 or len(tracked) == len(node.inputs):
        return None
    inner = nodes[tracked[0].child]
    if not isinstance(inner.spec, AddTerms) or inner.spec.family != "sum" or any(e is None for e in inner.inputs):
        return None
    return inner


def chain_takes_sum(ctx, node) -> bool:
    """Whether the sum ``node`` is the first of a chain's two sums (``(x + bias) + mask``, :func:`scores_chain`),
    whose ε-step the softmax's step applies: its own step is then the plain gradient."""
    graph = ctx.run.graph
    cons = graph.consumers.get((node.id, 0), ())
    if len(cons) != 1 or cons[0][1] != 0:
        return False
    outer = graph.nodes[cons[0][0]]
    above = graph.consumers.get((outer.id, 0), ())
    if len(above) != 1 or above[0][1] != 0:
        return False
    chain = scores_chain(ctx, graph.nodes[above[0][0]])
    return chain is not None and chain.outer == outer.id and chain.mask == node.id


def _to_product(nodes, node) -> bool:
    """Whether ``node`` is a batched matrix product, or leads to one through a scaling and views."""
    for _ in range(8):
        if node.kind == "BmmBackward0":
            return True
        if node.kind not in _SCALINGS and node.kind not in _PRODUCT_VIEWS or not node.inputs or node.inputs[0] is None:
            return False
        node = nodes[node.inputs[0].child]
    return False


def product_step_of(ctx) -> Any:
    """The ε-step of the matrix product ``ctx.node`` where the step of the softmax above it works it out
    (:func:`scores_chain`), else None: its plain gradient where the softmax's step applies the product's factor
    itself, else a step that multiplies the gradient by the factor that step left for it (:func:`_left_factor`)."""
    graph, node = ctx.run.graph, ctx.node
    for _ in range(8):  # up through views, the scaling and the mask's sum
        cons = graph.consumers.get((node.id, 0), ())
        if len(cons) != 1:
            return None
        node = graph.nodes[cons[0][0]]
        if node.spec.family == "softmax":
            chain = scores_chain(ctx, node)
            if chain is None or chain.product != ctx.node.id:
                return None
            return PLAIN if chain.folds_product else PreHook(_left_factor(ctx, chain))
    return None


def _left_factor(ctx, chain: _ScoresChain):
    r"""Pre-hook of the scores product of a chain that does not fold its factor (:attr:`_ScoresChain.
    folds_product`): the gradient times :math:`a\,|Z| / (|Z| + \varepsilon)`, as the softmax's step left it in
    the run (worked out from the scores it recomputed a block at a time); where it left none (it did not run), as
    :func:`~dynamiclrp.ops.base.stabilised_gradient` works it out."""
    fallback = stabilised_gradient(ctx, chain.eps, chain.scale).hook

    def hook(grad_outputs):
        g = grad_outputs[0]
        derived = ctx.run.derived
        f = derived.pop((_LEFT_FACTOR, ctx.node.id), None)
        if g is None or f is None or f.shape != g.shape:
            return grad_outputs if g is None else fallback(grad_outputs)
        # the product's backward, which runs next, uses its gradient up: its memory then serves the next chain
        derived.setdefault((_LEFT_SPARES, f.shape, f.dtype, f.device), []).append(f)
        return (f.mul_(g),) + tuple(grad_outputs[1:])
    return hook


#: the key (with the product's node id) of the factor a chain's softmax step leaves for the product in
#: :attr:`dynamiclrp.engine.Run.derived`
_LEFT_FACTOR = "scores product factor"
#: the key (with a shape, dtype and device) of the factors' memory in :attr:`dynamiclrp.engine.Run.derived` that
#: the products' backward has used up, for the next chain's factor: a layer's factor then reuses the previous
#: layer's memory, warm in cache (T5-small at 512 tokens, 8 MiB a layer: the factor's passes 26 -> 14 ms per
#: explanation at 2 threads), and the run holds one such tensor to its end (it freed each)
_LEFT_SPARES = "spare product factors"


def _scores_identity_step(ctx, chain: _ScoresChain) -> PreHook:  # noqa: C901 - one step, two forms
    r"""The identity rule's step on a softmax over scaled scores (:func:`scores_chain`), with the ε-steps of the
    mask's sum and of the scores product below it: with :math:`Z = QK^\top` and :math:`X = cZ` (+ the mask, taken
    as 0 where it lets through: checked as :func:`_check_mask` checks it, masked logits get nothing)

    .. math:: g_X = g\,\frac{P}{X}\;\frac{|X|}{|X| + \varepsilon_M}\;a\,\frac{|Z|}{|Z| + \varepsilon_Z}

    (:math:`a`: the product rule's factor), which the scaling's, the sum's and the product's own backward then
    carry to :math:`Q` and :math:`K`, as the steps of the sum (:func:`~dynamiclrp.ops.elementwise.
    softmax_applies_stabiliser`) and of the product (:func:`~dynamiclrp.ops.base.stabilised_gradient`) would. The
    scores are recomputed from the product's saved operands a block of query rows at a time
    (:class:`_ScoreBlocks`), in cache, into softmax's own result (its backward's, which the step replaces): no
    tokens x tokens tensor is replayed or kept. Nodes are read through ``ctx`` when the step runs (a plan rebinds
    it).

    A :class:`~dynamiclrp.ops.base.WholeStep` through the chain: on the CPU the step can also carry each block on
    to the product's operands itself, :math:`g_Q = c\,g_X K` and :math:`g_K = c\,g_X^\top Q` (:math:`g_X / c` for
    a division), so that the gradient form skips the backward of the softmax, of the scaling and of the product
    (:mod:`dynamiclrp.gradient_bypass`): no tokens x tokens gradient is made at all. Only from
    :data:`DIRECT_SCORES` weights up (below, that nested pass costs more than the backward it skips; with a bias of
    its own :data:`BIASED_DIRECT_FACTOR` times as many). Where the sum
    adds a recorded bias whose relevance is asked for (:math:`X = Z + B`, T5), :math:`B` gets the logits' gradient
    :math:`g_X` without the product's factor: carried by hand, the step returns it for the bias's slot too
    (:attr:`~dynamiclrp.ops.base.WholeStep.shared`: summed over the layers that add the bias, and handed on
    once); in the softmax's own gradient, the sum's backward hands it on, and the product's factor is left for the
    product's own step instead (:attr:`_ScoresChain.folds_product`)."""
    def blocks_of(g, to_scores: bool, into=None, bias_into=None, check: bool = True):
        """The blocks, the scores product's output shape (batch x heads, rows, keys), and per block (b, heads, a,
        e, keys, g) with g the logits' gradient of the block's first ``keys`` keys (0 past them), or with
        ``to_scores`` the scores' (the scaling's backward applied, the product's factor folded in); ``into``: a
        dense tensor of the logits' shape each block's g is worked out in (its block, the zeros past its keys
        included); ``bias_into``: likewise, for the bias's gradient (the logits', without the product's factor);
        ``check``: each block's flag is kept for the pass's finiteness check (``Run.carried``), where the
        caller does not check what the blocks make."""
        run, node = ctx.run, ctx.node
        nodes = run.graph.nodes
        product = nodes[chain.product].fn
        scaling = None if chain.scaling is None else nodes[chain.scaling].fn
        q, kt = saved(product, "self"), saved(product, "mat2")
        c, divide = (1.0, False) if scaling is None else (saved(scaling, "other"), _SCALINGS[type(scaling).__name__])
        s = saved(node.fn, "result")
        shape = (q.shape[0], q.shape[1], kt.shape[2])
        blocks = _ScoreBlocks(q, kt.mT, weights=s.reshape(shape))  # a block's keys: up to its last weighted one
        g3, s3 = (blocks.dense(t.reshape(shape), *shape[1:], copy=False) for t in (g, s))
        into3, bias_into3 = (None if t is None else blocks.dense(t.view(shape), *shape[1:], copy=False)
                             for t in (into, bias_into))
        # the slots known with a mask taken as 0: the sum's, where it adds a mask autograd did not record (the step
        # takes it as 0: always checked, as node by node checks it), and a recovered bias's, where its replay did
        sum_node = None if chain.mask is None else nodes[chain.mask]
        checked = [] if sum_node is None else [(chain.mask, 0)]
        untracked = chain.outer is not None or sum_node is not None and any(e is None for e in sum_node.inputs)
        bias3 = None
        if chain.bias is not None:  # its value as the Promise System recovers it (once for the layers sharing it),
            # a mask added to it taken as 0 (provisional: checked below, as softmax checks its logits)
            e = sum_node.inputs[chain.bias]
            checked.append((e.child, e.nr))
            bias = run.promises.dense_value(e.child, e.nr).to(s.dtype)
            bias3 = blocks.dense(bias.expand(s.shape).reshape(shape), *shape[1:], copy=False)

        left = None  # the product's factor, left for its own step (a bias shares the logits' gradient)
        if not chain.folds_product and not to_scores:
            spares = run.derived.setdefault((_LEFT_SPARES, shape, s.dtype, s.device), [])
            left = spares.pop() if spares else torch.empty(shape, dtype=s.dtype, device=s.device)
            run.derived[(_LEFT_FACTOR, chain.product)] = left
            left = blocks.dense(left, *shape[1:], copy=False)

        # x = cx z (+ the bias): the logits, as the forward made them (a mask taken as 0); the gradient handed on is
        # the logits' (the softmax's own result, replaced) or, carried by hand, the scores' (the scaling's backward
        # applied: times cx)
        cx = 1.0 if scaling is None else float(c) ** (-1 if divide else 1)
        k = cx if to_scores else 1.0

        def rows():
            unchecked = [slot for slot in checked if slot in run.promises.provisional]
            provisional = untracked or bool(unchecked)
            # a recorded bias the only value known with a mask taken as 0 (T5's position bias, which every layer
            # adds): once one layer's check finds the mask constant per row at every position (none masked), the
            # other layers take that deviation instead of checking again (on the CPU: the host reads whether the
            # check saw every position; elsewhere each read waits for the device)
            shared = unchecked[0] if not untracked and unchecked == checked[-1:] and chain.bias is not None and \
                s.device.type in CPU_DEVICES else None
            verified = None if shared is None else run.verified_masks.get(shared)
            first, smallest, ranges = len(run.mask_checks), [], []
            whole = shared is not None and verified is None  # whether this check sees every position
            for b, hs, a, e, keys, z in blocks:  # keys up to the block's last weighted one: past it R_X = 0
                ks = (b, hs, slice(a, e), slice(keys))
                x = None if bias3 is None else torch.add(bias3[ks], z, alpha=cx)
                sb = s3[ks]
                if verified is not None:  # checked where the same bias was: only this layer's logits' range
                    ranges.append(torch.aminmax(x))
                elif provisional and keys:  # the masked positions' weights 0 (past the block's keys there are none)
                    sb = _check_mask(node, z if x is None else x, sb, -1, run.scratch, run.mask_checks,
                                     cx if x is None else 1.0, shape[2])
                whole = whole and keys == shape[2]  # past a block's keys no position is attended
                if whole:
                    smallest.append(sb.amin())
                # R_X = R_P (the identity), worked out in the logits' gradient or the bias's (never both)
                work = into3 if into3 is not None else bias_into3
                r = torch.mul(g3[ks], sb, out=None if work is None else work[ks])
                if chain.outer_eps is not None:  # the mask's sum's ε-step: R_(x + bias) = |X| / (|X| + ε) R_X
                    r.mul_(stabilising_factor(torch.mul(z, cx) if x is None else x, chain.outer_eps))
                for t in () if keys == shape[2] else (into3, left, bias_into3):  # no gradient past them, nor any
                    if t is not None:  # factor: 0, not the fresh memory's garbage (the product's step multiplies by it)
                        t[b, hs, a:e, keys:] = 0
                r = _scores_gradient(r, z, x, cx, chain, k, None if left is None else left[ks],
                                     keep=bias_into3 is not None)
                if check:
                    run.carried.append(carried_flag(r))
                yield b, hs, a, e, keys, r
            if verified is not None and ranges:
                low, high = (torch.stack(t) for t in zip(*ranges))
                run.mask_checks.append((_check_numbers(verified, low.amin(), high.amax()), _mask_tol(s.dtype)))
            elif whole and smallest and bool(torch.stack(smallest).amin() > 0):  # no weight 0: none masked
                run.verified_masks[shared] = torch.stack([t[1] for t, _ in run.mask_checks[first:]]).amax()
            if provisional:
                for slot in checked:
                    run.promises.certify(slot)
        return blocks, shape, rows()

    def hook(grad_inputs, grad_outputs):
        g = grad_outputs[0]
        if g is None or grad_inputs[0] is None:
            return grad_inputs
        out = spare(grad_inputs[0], g.shape, g.dtype, g, saved(ctx.node.fn, "result"))
        out = torch.empty(g.shape, dtype=g.dtype, device=g.device) if out is None else out  # dense, either way
        for _ in blocks_of(g, to_scores=False, into=out)[2]:  # each block's ratio worked out in its place in out
            pass
        return (out,) + (None,) * (len(grad_inputs) - 1)

    def direct(grad_outputs):
        g = grad_outputs[0]
        if g is None or g.device.type not in CPU_DEVICES:
            return None
        gb = None if chain.folds_product else torch.empty(g.shape, dtype=g.dtype, device=g.device)  # the logits'
        blocks, _, rows = blocks_of(g, to_scores=True, bias_into=gb, check=False)
        gq, gk = torch.empty_like(blocks.q), torch.zeros_like(blocks.k)  # (1, batch x heads, ...): bmm's are 3-d
        for b, hs, a, e, keys, gz in rows:  # the product's backward, a block at a time (its keys: the rest get 0)
            torch.bmm(gz, blocks.k[b, hs, :keys], out=gq[b, hs, a:e])
            gk[b, hs, :keys].baddbmm_(gz.mT, blocks.q[b, hs, a:e])
        # checked once here, not per block: every element of every block enters gq (as gk), so a block's infinity or
        # NaN (the bias's gradient's too, which the product's factor multiplies: inf x 0 is NaN) makes its row of gq
        # infinite or NaN, whatever the keys hold
        ctx.run.carried.append(carried_flag(gq))
        return (gq.flatten(0, 1), gk.flatten(0, 1).mT) + (() if gb is None else (gb,))
    if saved(ctx.node.fn, "result").numel() < DIRECT_SCORES * (1 if chain.folds_product else BIASED_DIRECT_FACTOR):
        return PreHook(_unchanged, hook)
    # a bias whose relevance is asked for (T5's: an embedding looked up) gets the logits' gradient by hand too,
    # summed over the layers that add it (its slot ``shared``)
    bias = () if chain.folds_product else (tuple(ctx.run.graph.nodes[chain.mask].inputs[chain.bias]),)
    return WholeStep(_unchanged, hook, direct, chain.through, bias)


def _scores_gradient(r, z, x, cx: float, chain: _ScoresChain, k: float, left=None, keep: bool = False):
    r"""A block of the chain's gradient (:func:`_scores_identity_step`), in place in ``r`` (returned), the relevance
    :math:`R_X = g \odot P` of the logits :math:`X = c_x Z` (+ the bias ``x``, where there is one; else None), ``z``
    the scores :math:`Z` (overwritten): :math:`k` times

    .. math:: g_X = \frac{R_X}{\mathrm{stab}_{\varepsilon_M}(X)}\;a\,\frac{|Z|}{|Z| + \varepsilon_Z}

    (the sum's ε-step, then the product's factor; ``left``: written there instead, for the product's own step;
    ``keep``: ``r`` keeps the sum's ε-step alone, the gradient of the bias ``x`` adds, and the product's factor is
    applied into a new tensor, returned),
    or without a sum :math:`g_X = a\,R_X / (c_x\,\mathrm{stab}_{\varepsilon_Z}(Z))` (the identity's step
    :math:`R_X / X` times the product's :math:`a\,Z/\mathrm{stab}(Z)`). No division by :math:`X`: a logit of 0
    carries its relevance on (the ε-rules below it take it, as node by node), where the ratio would be infinite.
    Without a bias :math:`\mathrm{stab}(X) = \mathrm{sign}(c_x Z)\,(|c_x||Z| + \varepsilon_M)` and the two
    denominators are made in one tensor: eight passes where the ratio and the two factors took fourteen.
    ``copysign`` gives :math:`\mathrm{stab}(-0) = -\varepsilon` where the rules' sign(0) is +1; it changes no
    relevance: a bmm's sum of products is -0 only where every product is ±0, and so is every share of it (and a
    bias's -0 plus a score's sums to -0 only where both are)."""
    a = chain.scale * k
    if chain.mask_eps is None:  # softmax(c Z): a R_X / (c stab(Z))
        _over_stab(r, z, chain.eps)
        return r.mul_(a / cx) if a != cx else r
    if x is None:  # R_X sign(c Z) |Z| a / ((|c||Z| + ε_M)(|Z| + ε_Z)) = R_X Z a sign(c) / (...)
        r.mul_(z)
        t = z.abs_()
        signed = a * math.copysign(1.0, cx)  # a: the rule's factor (1, or AttnLRP's 1/2) times k, never 0
        d = torch.mul(t, abs(cx) / signed).add_(chain.mask_eps / signed)
        return r.div_(d.mul_(t.add_(chain.eps)))
    _over_stab(r, x, chain.mask_eps)
    if left is not None:  # the product's factor, left for its own step
        f = stabilising_factor(z, chain.eps, out=left)
        if chain.scale != 1.0:
            f.mul_(chain.scale)
        return r.mul_(k) if k != 1.0 else r
    t = z.abs_()
    r = torch.mul(r, t) if keep else r.mul_(t)
    r.div_(t.add_(chain.eps))
    return r.mul_(a) if a != 1.0 else r


def _over_stab(r, x, eps: float, out=None) -> None:
    r""":math:`r / \mathrm{stab}_\varepsilon(x)` in place, the denominator as ``copysign(|x| + eps, x)`` (into
    ``out``, where given): three passes where :func:`~dynamiclrp.rules.over_stabilized` takes five for the rules'
    exact sign(±0) = +1, which the softmax's steps do not need (:func:`_scores_gradient`)."""
    r.div_(torch.abs(x, out=out).add_(eps).copysign_(x))


def _unchanged(grad_outputs):
    return grad_outputs


def _check_mask(node, x, s, dim, scratch, deferred: list | None = None, scale: float = 1.0,
                keys: int | None = None):
    """Raise unless ``log s - scale * x`` is constant per row on the attended positions (see :class:`Softmax`);
    return the weights of the attended positions: ``s`` where the probability is above 1e-30 / ``keys`` (the
    softmax's size along ``dim``, the whole row's where ``s`` is a block of its keys: a threshold that no row's
    blocking moves), else 0 (a mask of -100, as Swin's, leaves exp(-100) > 0 in float64; it masks all the same).
    The constant holds where every row's spread of ``log s - x`` over its attended positions is at most twice
    ``tol (1 + max |x|)``: each lies that close to the middle of its row's. A NaN anywhere in the check raises too.

    The spread in two reductions, without a bool tensor (slow on CPU): ``log`` of the weights is -inf where
    masked, which the row's maximum passes over; for the minimum the -inf are made +inf. Seven passes over the
    logits' size (four of them writes).

    ``deferred`` (the gradient form's ``Run.mask_checks``): the extremes are not read by the host here but appended
    with the tolerance, and the pass reads them all at its end with its other flags (one read for all the
    softmaxes: each read waits for a GPU, :func:`mask_checks_pass`); a failing check sends the run node by node,
    where this check runs in full (rows a fill value saturated, then the error)."""
    weights = torch.threshold(s, 1e-30 / (s.shape[dim] if keys is None else keys), 0.0)
    c = torch.log(weights, out=scratch(SCRATCH[1], s)).sub_(x, alpha=scale)  # -inf where masked
    high = c.amax(dim, keepdim=True)
    low = c.nan_to_num_(nan=math.nan, posinf=math.inf, neginf=math.inf).amin(dim, keepdim=True)
    half = high.sub_(low).mul_(0.5)  # per row; -inf where nothing is attended
    worst = half.amax()
    tol = _mask_tol(x.dtype)
    found = _check_numbers(worst, *torch.aminmax(x), scale)
    if deferred is not None:
        deferred.append((found, tol))
        return weights
    _, dev, low, high = found.tolist()
    bound = tol * (1 + max(-low, high))
    if not dev <= bound:
        _drop_saturated_rows(dim, weights, half, bound)
        dev = float(half.amax())
    if not dev <= bound:
        raise ActivationUnavailableError(
            f"the logits of {node.kind} (node #{node.id}) include a constant autograd did not record that is not "
            "a plain mask (0 where attended): e.g. a position bias. Let that tensor require grad so the graph "
            "records it"
        )
    return weights


def _mask_tol(dtype: torch.dtype) -> float:
    """The mask check's relative tolerance for logits of ``dtype`` (:func:`_check_mask`)."""
    return 1e-3 if dtype == torch.float64 else 2e-2


def _check_numbers(worst, low, high, scale: float = 1.0) -> torch.Tensor:
    """A mask check's four numbers, on the device: the extremes of the deviation ``worst`` (its largest half
    spread of a row) and of the logits (``low`` and ``high`` times ``|scale|``: max |x| without a tokens x tokens
    ``|x|``), read with the others by the host in one go (:func:`mask_checks_pass`)."""
    worst = worst.reshape(1)
    return torch.cat([worst.neg(), worst, torch.stack((low, high)).to(worst.dtype).mul_(abs(scale))])


def mask_checks_pass(numbers: list[float], tols: list[float]) -> bool:
    """Whether every deferred mask check passes (:func:`_check_mask`): ``numbers`` four per check (the deviations'
    and the logits' extremes), ``tols`` one; NaN fails."""
    for k, tol in enumerate(tols):
        dev_low, dev_high, low, high = numbers[4 * k:4 * k + 4]
        if not max(-dev_low, dev_high) <= tol * (1 + max(-low, high)):
            return False
    return True


def _drop_saturated_rows(dim, weights, half, bound) -> None:
    """Rows that fail the mask check only because a fill value rounded their logits away: every position the row
    attends to was shifted by the same huge constant (a padded query under a causal mask, ``finfo.min`` added twice
    or to a tiny score), which leaves equal probabilities there whatever the logits were. Such a row attends to
    nothing the logits decided: its ``weights`` are made 0 (masked: its relevance 0) and its ``half`` spread -inf
    (the check's). A failing row whose attended probabilities differ stays, and the check raises. Only on the
    check's failure path: it costs three passes."""
    big = torch.where(weights > 0, weights, torch.full((), math.inf, dtype=weights.dtype, device=weights.device))
    saturated = torch.eq(big.amin(dim, keepdim=True), weights.amax(dim, keepdim=True)) & (half > bound)
    if bool(saturated.any()):
        weights.mul_(saturated.logical_not().to(weights.dtype))
        half.masked_fill_(saturated, -math.inf)


def _heads(q, k):
    """K/V repeated to the number of query heads (grouped-query attention)."""
    rep = q.shape[-3] // k.shape[-3] if q.dim() >= 3 and k.dim() >= 3 else 1
    return (lambda t: t.repeat_interleave(rep, dim=-3)) if rep > 1 else (lambda t: t)


def _mask(fn, q, k):
    """The additive mask of an attention node (0 where attended, -inf or a bias elsewhere), or None."""
    m = _given_mask(fn, q)
    L, S = q.shape[-2], k.shape[-2]
    if saved(fn, "is_causal", False):
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        c = torch.zeros(L, S, dtype=q.dtype, device=q.device).masked_fill(~causal, float("-inf"))
        m = c if m is None else m + c
    return None if m is None else m.to(q.dtype)


def _given_mask(fn, q):
    """The mask the attention was called with (``attn_mask``, additive), without ``is_causal``'s; or None."""
    m = saved(fn, "attn_mask", None)
    if m is None:
        m = saved(fn, "attn_bias", None)
    if m is not None and m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(~m, float("-inf"))
    return m


def _scale(fn, q):
    s = saved(fn, "scale", None)
    return s if s is not None else 1.0 / math.sqrt(q.shape[-1])


class _Scores(OpSpec):
    family = "product"
    costly_output = True

    def saved_input(self, node, i):
        return saved(node.fn, ("query", "key")[i]) if i < 2 else None

    def _fn(self, node):
        q = saved(node.fn, "query")
        expand, scale = _heads(q, saved(node.fn, "key")), _scale(node.fn, q)
        return lambda q_, k_: scale * (q_ @ expand(k_).transpose(-2, -1))

    def output(self, node, nr):
        return self._fn(node)(saved(node.fn, "query"), saved(node.fn, "key"))

    def relevance(self, ctx):
        (R,) = ctx.R
        q, k = ctx.input(0), ctx.input(1)
        rule = ctx.rule("product")
        return held_constant(rule, rule.product(q, k, R, self._fn(ctx.node)))


class _Mask(AddTerms):
    """``L = S + M`` with the attention mask ``M``, a constant: the ε-rule on attended entries, 0 where masked."""

    def __init__(self):
        super().__init__(lambda fn, s: [s, _mask(fn, saved(fn, "query"), saved(fn, "key")).to(s.dtype)])

    def relevance(self, ctx):
        (R,) = ctx.R
        s = ctx.input(0)
        m = _mask(ctx.node.fn, saved(ctx.node.fn, "query"), saved(ctx.node.fn, "key")).to(s.dtype).expand_as(s)
        attended = torch.isfinite(m)
        zero = torch.zeros((), dtype=s.dtype)
        rs, _ = ctx.rule("sum").sum([s, torch.where(attended, m, zero)], torch.where(attended, R, zero), _add)
        return [torch.where(attended, rs, zero)]


def _add(a, b):
    return a + b


class _Probs(Softmax):
    checks_provisional = False

    def output(self, node, nr):
        return None

    def forward(self, node, inputs):
        return torch.softmax(inputs[0], -1).nan_to_num(0.0)  # a fully masked row attends to nothing

    def dim(self, node):
        return -1


class _Values(OpSpec):
    family = "attention"

    def saved_input(self, node, i):
        return saved(node.fn, "value") if i == 1 else None

    def output(self, node, nr):
        return saved(node.fn, "output") if nr == 0 else None

    def _fn(self, node):
        q, v = saved(node.fn, "query"), saved(node.fn, "value")
        if q.dim() >= 3 and q.shape[-3] == v.shape[-3]:  # as many value heads as query heads: a plain product
            return torch.matmul
        expand = _heads(q, v)
        return lambda p, v: p @ expand(v)

    def forward(self, node, inputs):
        return self._fn(node)(inputs[0], inputs[1])

    def relevance(self, ctx):
        R = ctx.R[0]
        p, v = ctx.input(0), ctx.input(1)
        rule = ctx.rule("attention")
        if not getattr(rule, "product_takes_z", False):
            return held_constant(rule, rule.product(p, v, R, self._fn(ctx.node)))
        # Divide by the output the kernel computed, which the consumers' relevance was formed from, not by the
        # replayed p @ v: the kernel's own softmax differs from the replay by rounding errors absolute to the sum,
        # so the ratio of the two is arbitrary where an output is near zero (GPT-2 in bf16: 212, and outputs of
        # the wrong sign). The saved output makes the ratio exactly the carried gradient, as autograd's is.
        z = saved(ctx.node.fn, "output")
        z = None if z is None else z.to(ctx.dtype)
        return held_constant(rule, rule.product(p, v, R, self._fn(ctx.node), z=z))


class ScaledDotProductAttention(OpSpec):
    """Any fused SDPA backend node; split into values, softmax, mask and scores parts."""

    def __init__(self):  # the parts' entries are built once: a plan's fingerprint names them by identity
        self.values, self.probs, self.mask, self.scores = _Values(), _Probs(), _Mask(), _Scores()

    def decompose(self, fn):
        if saved(fn, "dropout_p", 0.0):
            raise DynamicLRPError(
                f"{type(fn).__name__} ran with attention dropout (dropout_p > 0): its random mask cannot be "
                "recovered; put the model in eval() mode before explaining"
            )
        # without making the mask (a queries x keys tensor under is_causal)
        has_mask = bool(saved(fn, "is_causal", False)) or any(saved(fn, n, None) is not None
                                                             for n in ("attn_mask", "attn_bias"))
        kind = type(fn).__name__
        parts = [
            (kind, self.values, [(PART, 1), (NEXT, 2)]),
            ("SoftmaxBackward0", self.probs, [(PART, 2)]),
        ]
        if has_mask:
            parts.append(("AddBackward0", self.mask, [(PART, 3)]))
        parts.append(("MatmulBackward0", self.scores, [(NEXT, 0), (NEXT, 1)]))
        return parts

    def n_outputs(self, node):
        return len(node.fn._input_metadata)

    def gradient_step_fused(self, ctx, parts):
        """The fused backward's query, key and value gradients scaled by the parts' rules: the values product's
        factors (weights, values), softmax's own gradient (or none, blocked), the mask's ε → 0 sum, and the scores
        product's factors (query, key)."""
        from ..engine import Context  # noqa: PLC0415 - the engine imports this module

        at = {type(p.spec): Context(ctx.run, p, []) for p in parts}
        product_forms = (rule_form(at[_Values].rule("attention"), "attention"),
                         rule_form(at[_Scores].rule("product"), "product"))
        softmax = rule_form(at[_Probs].rule("softmax"), "softmax")
        if all(isinstance(f, Stabilised) for f in product_forms):
            mask = rule_form(at[_Mask].rule("sum"), "sum") if _Mask in at else None
            if softmax is not IDENTITY or _Mask in at and not isinstance(mask, Stabilised):
                return None
            return _stabilised_attention_step(ctx, *product_forms, mask)
        weights, values = _factors(product_forms[0])
        q, k = _factors(product_forms[1])
        if 0 in (weights, values, q, k) or softmax not in (PLAIN, BLOCKED):
            return None
        if _Mask in at and rule_form(at[_Mask].rule("sum"), "sum") is not PLAIN:
            return None
        through = None if softmax is BLOCKED or weights is None else weights
        factors = (None if through is None or q is None else through * q,
                   None if through is None or k is None else through * k, values)
        step = scaled_gradient(factors)
        if factors[:2] == (None, None) and values is not None and len(ctx.node.fn.next_functions) == 3:
            # CP-LRP: the values' gradient alone (the node read when the step runs: a plan rebinds the context)
            return DirectStep(step, lambda grads: _values_gradient(ctx.run, ctx.node.fn, grads, values), 2)
        return step


def _stabilised_attention_step(ctx, values: Stabilised, scores: Stabilised, mask: Stabilised | None) -> WholeStep:
    r"""Gradient step of a fused attention node whose products take the ε-rule's gradient form
    (:class:`~dynamiclrp.rules.Stabilised`, the uniform rule's halves included) and whose softmax passes relevance
    unchanged (the identity rule): the query, key and value gradients the node-by-node rules of its parts give,
    in place of the node's own. With the gradient :math:`g` arriving at the output :math:`O = PV`, the weights
    :math:`P = \mathrm{softmax}(L)`, :math:`L = S + M` (the mask, if any, a constant) and
    :math:`S = c\,QK^\top`:

    .. math:: f = a_V\,g\,\frac{|O|}{|O| + \varepsilon_V}, \quad g_V = P^\top f, \quad
              R_S = S \odot \frac{P \odot f V^\top}{\mathrm{stab}_{\varepsilon_M}(L)}, \quad
              u = a_S\,c\,\frac{R_S}{\mathrm{stab}_{\varepsilon_S}(S)}, \quad g_Q = u K, \quad g_K = u^\top Q

    (:math:`a`: the rules' factors; without a mask :math:`R_S = P \odot f V^\top`; masked positions, where
    :math:`M = -\infty`, get nothing). The node is handed :math:`f` (a pre-hook), so that its own backward computes
    :math:`g_V = P^\top f` as it would; the query and key gradients it computes are then replaced (the softmax's
    identity rule :math:`R_L = R_P` is what its backward, which applies softmax's Jacobian, cannot give). Weights
    and scores are recomputed from the saved queries and keys, as node by node; the node is read through ``ctx``
    when the step runs (a plan rebinds it).

    A :class:`~dynamiclrp.ops.base.WholeStep`: on the CPU the step also computes :math:`g_V = P^\top f` in its
    blocks (one product more per block), all three gradients without the node's backward, which the gradient form
    then skips where it can hand them on (:mod:`dynamiclrp.gradient_bypass`): the fused backward costs as much as
    the step again (73 ms per layer at 2,048 tokens under ``is_causal``, 123 ms with a given mask)."""
    def factor(g):  # f, fresh: g may be shared; in the fused kernels' working dtype
        f = stabilising_factor(saved(ctx.node.fn, "output").to(_working_dtype(g)), values.eps).mul_(g)
        return f.mul_(values.scale) if values.scale != 1.0 else f

    def pre(grad_outputs):
        g = grad_outputs[0]
        return grad_outputs if g is None else (factor(g).to(g.dtype),) + tuple(grad_outputs[1:])

    def gradients(f, wanted):  # (g_Q, g_K, g_V or None) in the saved operands' shapes and dtypes
        fn, dt = ctx.node.fn, _working_dtype(f)
        operands = [saved(fn, name) for name in ("query", "key", "value")]
        grads = _stabilised_attention(ctx.run, fn, *(t.to(dt) for t in operands), f.to(dt), scores, mask,
                                      values=wanted[2])
        out = []
        for grad, t, w in zip(grads, operands, wanted):
            if grad is None or not w:
                out.append(None)
                continue
            if grad.dim() >= 3 and t.dim() >= 3 and grad.shape[-3] != t.shape[-3]:  # heads sharing a key or value
                grad = grad.unflatten(-3, (t.shape[-3], -1)).sum(-3)
            out.append(grad.sum_to_size(t.shape).to(t.dtype))
        return out

    def post(grad_inputs, grad_outputs):
        f = grad_outputs[0]
        if f is None or grad_inputs[0] is None and grad_inputs[1] is None:
            return grad_inputs
        gq, gk, _ = gradients(f, [grad_inputs[0] is not None, grad_inputs[1] is not None, False])
        # the values' gradient is the node's own, P^T f; a mask gets nothing (a constant to the rules)
        return (gq, gk, grad_inputs[2]) + (None,) * (len(grad_inputs) - 3)

    def direct(grad_outputs):
        g = grad_outputs[0]
        if g is None or g.device.type not in CPU_DEVICES or any(o is not None for o in grad_outputs[1:]):
            return None  # on a GPU the fused backward is the faster way to g_V (not measured otherwise)
        wanted = [e[0] is not None for e in ctx.node.fn.next_functions[:3]]
        return tuple(gradients(factor(g), wanted)) + (None,) * (len(ctx.node.fn.next_functions) - 3)
    return WholeStep(pre, post, direct)


#: elements of one block of recomputed attention scores (a group of heads × a block of query rows × the keys they
#: see), and of the keys of one group of heads: sizes that stay in a CPU's cache, as the fused kernels' tiles do
#: (and far below the size from which the C allocator maps each new block afresh: see
#: :meth:`dynamiclrp.engine.Run.scratch`)
_BLOCK, _HEADS_BLOCK = 1 << 17, 1 << 16
#: the same off the CPU (a GPU): every head at once and 64 MiB of float32 scores a block, so that a long sequence
#: takes a few large launches (each waits for the host), not many cache-sized ones
_DEVICE_BLOCK = 1 << 24
#: the devices on which fused attention's steps work as a CPU's cache wants: scores in blocks of :data:`_BLOCK`
#: (elsewhere :data:`_DEVICE_BLOCK`), a given mask read by the host for the keys each block sees (elsewhere every
#: read waits for the device: :func:`_run_mask` reads nothing), the fused backward -- and, for attention written
#: out from :data:`DIRECT_SCORES` weights up, the backward of the softmax, the scaling and the scores product --
#: replaced by the step's own blocks
#: (elsewhere not measured against the device's kernels). ``benchmarks/host_ops.py`` empties it to count a
#: GPU's host work on the CPU.
CPU_DEVICES = ("cpu",)
#: the size of the attention weights (elements) from which the blockwise softmax step (:func:`scores_chain`) also
#: carries the blocks on to the queries and keys by hand, a pass nested in the outer one, so that no tokens x tokens
#: gradient is made (the softmax's and the product's own backward skipped). Below it the nested pass costs more than
#: that backward. Session 21 (the step made cheaper; same-process A/B, 1 thread, the bypass against none, paired
#: medians): BERT-base at 128 tokens (196,608 weights) 1.00x, at 256 (786,432) 0.98x, at 512 (3.1 M) 0.93x; the
#: 297 M decoder at 512 tokens (4.2 M) 0.94x; T5-small's cross-attention (32 x 512 x 8 heads, 131,072) 1.06x
#: (T5-small at 512 tokens) and 1.09x (at 128). Session 17: the 4-layer decoder at 2,048 tokens (16.8 M) 0.82x,
#: its peak memory 1.05x the full pass's where it was 1.38x
DIRECT_SCORES = 1 << 19
#: how many times :data:`DIRECT_SCORES` a chain whose bias gets a gradient of its own (T5's position bias: not
#: :attr:`_ScoresChain.folds_product`) needs before it carries its blocks by hand. Such a chain still makes the
#: bias's tokens x tokens gradient, so the nested pass spares less. Session 26 (same-process A/B, the bypass
#: against none, paired medians): T5-small's encoder at 512 tokens (2.1 M weights a layer) 0.964x without it at
#: 2 threads (97 % interval 0.915-0.991x, 21 rounds) and 0.969x at 1 thread; at 1,024 tokens (8.4 M) 0.987x at
#: 2 threads and 1.09x at 1 thread. BERT-base at 512 tokens (3.1 M, no bias) in the same runs: 1.07x and 1.06x
#: (the bypass still pays there)
BIASED_DIRECT_FACTOR = 8


class _ScoreBlocks:
    r"""Attention scores :math:`S = c\,QK^\top` (a fused node's, or those of attention written out), a block at a
    time: a group of heads and a block of query rows (:data:`_HEADS_BLOCK`, :data:`_BLOCK`; :data:`_DEVICE_BLOCK`
    off the CPU), so that the keys, the block and the gradients it adds to stay in cache. ``causal`` (a fused
    node's ``is_causal``, top-left: query row :math:`i` sees keys :math:`j \le i`): a block reads only the keys its
    rows can see, half the products of the whole; a given mask (``attn_mask``, additive: :class:`_GivenMask`) is
    sliced along, and a block reads only the keys up to the last one its rows attend to (past it every weight is
    exactly 0: the mask is -inf there). ``weights``, the attention weights themselves (softmax's saved result, of
    the scores' shape): on the CPU a block likewise reads only the keys up to the last one with a non-zero weight
    in its rows, and is yielded even where that leaves none (its consumer writes the zeros). Queries, keys
    (repeated to the query heads), and the ``others`` (tensors of the queries' rows: the output's gradient) are
    made dense once, as ``(batch, heads, rows, features)``: a product per block then copies nothing."""

    def __init__(self, q, k, *others, scale: float = 1.0, causal: bool = False, given: _GivenMask | None = None,
                 weights: torch.Tensor | None = None):
        self.scale, self.causal = scale, causal
        k = _heads(q, k)(k)
        self.L, self.S = q.shape[-2], k.shape[-2]
        self.batch = broadcast_shape(q.shape[:-2], k.shape[:-2], *(t.shape[:-2] for t in others))
        self.heads = self.batch[-1] if self.batch else 1
        self.q, self.k, *self.others = (self.dense(t, *t.shape[-2:]) for t in (q, k, *others))
        self.given = None if given is None else self.dense(given.additive, self.L, self.S, copy=False)
        self.extent = None if given is None else given.extent
        cpu = q.device.type in CPU_DEVICES
        # each block's extent is read by the host (elsewhere each read waits for the device)
        self.weights = None if weights is None or not cpu else self.dense(weights, self.L, self.S, copy=False)
        block, heads_block = (_BLOCK, _HEADS_BLOCK) if cpu else (_DEVICE_BLOCK, _DEVICE_BLOCK)
        self.group = max(1, heads_block // (self.S * k.shape[-1]))
        self.rows = min(max(16, block // (min(self.group, self.heads) * self.S)), max(self.L, 1))  # no more than L
        # the keys a block's rows a:e do not see among a:e (all before a they do): -inf above the diagonal
        self.triangle = torch.full((self.rows, self.rows), -math.inf, dtype=q.dtype, device=q.device).triu_(1) \
            if self.causal else None

    def dense(self, t, *last, copy=True):
        """``t`` as ``(batch, heads, *last)``, detached: a view where it can be (a mask is often broadcast), dense if
        ``copy``."""
        t = t.detach().expand(*self.batch, *last).reshape(-1, self.heads, *last)
        return t.contiguous() if copy else t

    def __iter__(self):
        """``(b, heads, a, e, keys, s)``: the scores ``s`` of rows ``a:e`` of the heads ``heads`` (a slice) of batch
        element ``b`` against the first ``keys`` keys (all of them unless causal)."""
        for b in range(self.q.shape[0]):
            for h in range(0, self.heads, self.group):
                hs = slice(h, h + self.group)
                for a in range(0, self.L, self.rows):
                    e = min(a + self.rows, self.L)
                    keys = min(e, self.S) if self.causal else self.S
                    if self.extent is not None:
                        keys = min(keys, max(self.extent[a:e]) if len(self.extent) > 1 else self.extent[0])
                        if keys == 0:  # rows that attend to nothing: no weights, no gradients
                            continue
                    if self.weights is not None:
                        keys = _weighted_keys(self.weights[b, hs, a:e], keys, e + self.S - self.L)
                    s = torch.bmm(self.q[b, hs, a:e], self.k[b, hs, :keys].mT)
                    yield b, hs, a, e, keys, s if self.scale == 1.0 else s.mul_(self.scale)

    def logits(self, s, b, hs, a, e, keys, out=None):
        """The block's logits: the scores ``s`` plus the mask, into ``out`` (``s`` itself may be given; None: fresh
        memory); ``s`` itself, unchanged, where there is nothing to add."""
        triangle = self.causal and a < keys
        if self.given is not None:
            out = torch.add(s, self.given[b, hs, a:e, :keys], out=out)
        elif not triangle:
            return s
        elif out is None:
            out = s.clone()
        if triangle:
            out[..., a:keys] += self.triangle[:e - a, :keys - a]
        return out


def _weighted_keys(w: torch.Tensor, keys: int, guess: int) -> int:
    """One past the last of the first ``keys`` keys with a non-zero weight anywhere in the block ``w`` (attention
    weights, ``(heads, rows, keys)``, none negative), or a number above it past which every weight is 0 too; 0
    where no key is weighted. Past it every weight of the block is exactly 0: under a causal mask the keys after
    the block's last row, under padding the padded keys. One look at the last key (weighted: a block that sees every
    key), then one at the keys past ``guess`` (the block's last row under a causal mask, aligned at the last key),
    else one pass over the block."""
    if keys == 0 or bool(w[..., keys - 1].any()):
        return keys
    if 0 < guess < keys and not bool(w[..., guess:keys].amax()):
        return guess
    seen = w[..., :keys].amax((0, 1)).nonzero()
    return int(seen[-1]) + 1 if len(seen) else 0


def _working_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the fused attention kernels work in for ``t``: float32 for half precision, else ``t``'s own."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _fused(fn, q) -> dict:
    """The scale and causality of a fused attention node, as :class:`_ScoreBlocks` takes them."""
    return {"scale": _scale(fn, q), "causal": bool(saved(fn, "is_causal", False))}


class _GivenMask(NamedTuple):
    """The mask an attention node was given, worked out once per run (:func:`_run_mask`)."""

    additive: torch.Tensor  # 0 or a bias where attended, -inf elsewhere
    attended: torch.Tensor | None  # 1.0 where attended, else 0.0; None where every row attends to something
    finite: torch.Tensor | None  # the finite part; None where it is all 0 (a boolean mask, or 0 and -inf alone)
    extent: list[int] | None  # per query row (one number: for every row): one past the last key any batch or head
    #                           sees; None: not read (off the CPU), every key


def _run_mask(run, fn, q, dt) -> _GivenMask | None:
    """The mask an attention node was given (:func:`_given_mask`, additive; None where none was) in ``dt``, with
    what the blocks of scores need (:class:`_GivenMask`). On the CPU it is made once per run, with one read by the
    host (the rows' extents, whether a row attends to nothing, whether the mask has a non-zero finite value), and
    kept for the nodes given the same mask: the same tensor, or an equal one (transformers makes a layer's mask anew
    in each layer; the comparison reads no more than one pass). Elsewhere (not in :data:`CPU_DEVICES`) nothing is
    read: no extents (every key is read), the attended positions and the finite part always, and an entry kept for
    the same tensor only. ``run`` None: made afresh."""
    given = saved(fn, "attn_mask", None)
    if given is None:
        given = saved(fn, "attn_bias", None)
    if given is None:
        return None
    reads = given.device.type in CPU_DEVICES
    key = ("mask", given.shape, given.dtype, q.dtype, q.device, dt)
    found = None if run is None else run.derived.get(key)
    if found is not None and (found[0] is given or reads and torch.equal(found[0], given)):
        return found[1]
    m = _given_mask(fn, q)
    attended = given if given.dtype == torch.bool else m > -math.inf  # bool: slow to compute with, cheap to hold
    extent, empty_rows, nonzero = None, True, given.dtype != torch.bool
    if reads:
        seen = attended.to(torch.uint8)
        S = m.shape[-1]
        rows = torch.where(seen.amax(-1) > 0, S - seen.flip(-1).argmax(-1), 0)  # per row of each batch and head
        flags = [(rows == 0).any()] + ([] if given.dtype == torch.bool else [(attended & (m != 0)).any()])
        read = torch.cat([rows.reshape(-1, m.shape[-2]).amax(0), torch.stack(flags)]).tolist()
        extent, empty_rows = read[:m.shape[-2]], bool(read[m.shape[-2]])
        nonzero = nonzero and bool(read[-1])
    zero = torch.zeros((), dtype=m.dtype, device=m.device)
    found = (given, _GivenMask(m.to(dt), attended.to(dt) if empty_rows else None,
                               torch.where(attended, m, zero).to(dt) if nonzero else None, extent))
    if run is not None:
        run.derived[key] = found
    return found[1]


def _stabilised_attention(run, fn, q, k, v, f, scores: Stabilised, mask: Stabilised | None, values: bool = False):
    r""":func:`_stabilised_attention_step`'s gradients ``(g_Q, g_K, g_V)`` (keys and values repeated to the query
    heads; ``f`` the values' stabilised gradient; ``g_V`` None unless ``values``), a block of scores at a time
    (:class:`_ScoreBlocks`). Where the mask
    (``mask``: its sum's rule, None where there is none) has no finite part (only ``is_causal``, or a boolean mask)
    :math:`L = S` wherever relevance flows, and one denominator :math:`\mathrm{stab}(S)` serves both ε-steps when
    their ε agree."""
    given = _run_mask(run, fn, q, q.dtype)
    blocks = _ScoreBlocks(q, k, f, **_fused(fn, q), given=given)
    v = blocks.dense(_heads(q, v)(v), blocks.S, v.shape[-1])
    # where every row attends to something, masked weights are exactly 0 (exp(-inf)), their products too: no need
    # to mark them (given.attended None)
    attended, finite = (None if t is None else blocks.dense(t, blocks.L, blocks.S, copy=False)
                        for t in ((None, None) if given is None else (given.attended, given.finite)))
    (f,), q, k = blocks.others, blocks.q, blocks.k
    mask = mask if blocks.causal or given is not None else None  # the mask's rule, where there is one
    gq, gk = torch.zeros_like(q), torch.zeros_like(k)
    gv = torch.zeros_like(v) if values else None
    factor = scores.scale * blocks.scale
    for b, hs, a, e, keys, s in blocks:
        p = torch.softmax(blocks.logits(s, b, hs, a, e, keys), -1)
        if attended is not None:  # a row that attends to nothing has no weights (NaN)
            p.nan_to_num_(0.0)
        if gv is not None:
            gv[b, hs, :keys].baddbmm_(p.mT, f[b, hs, a:e])
        r = torch.bmm(f[b, hs, a:e], v[b, hs, :keys].mT).mul_(p)  # R_L = R_P = P ⊙ g_P
        if attended is not None:  # masked positions get nothing
            r.mul_(attended[b, hs, a:e, :keys])
        fin = None if finite is None else finite[b, hs, a:e, :keys]
        if mask is not None and (fin is not None or mask.eps != scores.eps):
            r = over_stabilized(r, s if fin is None else s + fin, mask.eps).mul_(s)
            u = over_stabilized(r, s, scores.eps)
        else:  # R_S / stab(S) (no mask), or S (R_L / stab(S)) / stab(S): the same operations, stab(S) made once
            d = stabilize(s, scores.eps)
            u = r.div_(d) if mask is None else r.div_(d).mul_(s).div_(d)
        u.mul_(factor)
        gq[b, hs, a:e].baddbmm_(u, k[b, hs, :keys])
        gk[b, hs, :keys].baddbmm_(u.mT, q[b, hs, a:e])
    return tuple(None if t is None else t.view(*blocks.batch, *t.shape[-2:]) for t in (gq, gk, gv))


def _values_gradient(run, fn, grad_outputs, factor: float):
    r"""The value gradient of a fused attention node, :math:`g_V = \mathrm{factor}\,P^\top g_O`, without the
    query and key gradients its backward also computes (three of its five products over the weights). The weights
    :math:`P = \mathrm{softmax}(\mathrm{scale}\,QK^\top + M)` are recomputed a block at a time
    (:class:`_ScoreBlocks`). Grouped-query heads are summed back onto their shared value head. Returns None (the
    node then runs its own backward) where the output's second gradient (the log-sum-exp) is wanted too, and off
    the CPU: the blocks are sized for a CPU's cache, and on a GPU a loop of small products has not been measured
    against the fused kernels."""
    g = grad_outputs[0]
    if g is None or g.device.type not in CPU_DEVICES or any(o is not None for o in grad_outputs[1:]):
        return None
    q, k = saved(fn, "query"), saved(fn, "key")
    work = _working_dtype(q)
    given = _run_mask(run, fn, q, work)
    blocks = _ScoreBlocks(q.to(work), k.to(work), g.to(work), **_fused(fn, q), given=given)
    (g,) = blocks.others
    dv = g.new_zeros(*g.shape[:2], blocks.S, g.shape[-1])
    for b, hs, a, e, keys, s in blocks:
        p = torch.softmax(blocks.logits(s, b, hs, a, e, keys, out=s), -1)
        if given is not None and given.attended is not None:
            p.nan_to_num_(0.0)  # a fully masked row attends to nothing
        dv[b, hs, :keys].baddbmm_(p.mT, g[b, hs, a:e])
    dv = dv.view(*blocks.batch, blocks.S, g.shape[-1])
    v = saved(fn, "value")
    if dv.shape[-3] != v.shape[-3]:  # grouped-query: the query heads sharing a value head
        dv = dv.unflatten(-3, (v.shape[-3], -1)).sum(-3)
    if dv.shape != v.shape:  # batch dimensions the values were broadcast along
        dv = dv.sum_to_size(v.shape)
    if factor != 1:
        dv.mul_(factor)
    return {2: dv.to(v.dtype)}


SDPA_KINDS = (
    "ScaledDotProductFlashAttentionForCpuBackward0",
    "ScaledDotProductFlashAttentionBackward0",
    "ScaledDotProductEfficientAttentionBackward0",
    "ScaledDotProductCudnnAttentionBackward0",
)

ATTENTION_OPS = {
    "SoftmaxBackward0": Softmax(),
    "SafeSoftmaxBackward0": Softmax(),
    **{k: ScaledDotProductAttention() for k in SDPA_KINDS},
}


def _factors(form) -> tuple:
    """A product rule's factors on its two gradients, or (0, 0) where it has none this fused node can apply (no
    form, or one that scales the product's output: the fused node does not expose it)."""
    return form if isinstance(form, tuple) else (0, 0)
