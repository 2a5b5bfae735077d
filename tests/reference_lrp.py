r"""A slow, independent reference LRP propagator over the fuzz IR (:mod:`fuzz_models`).

It runs the program forward once in float64, recording every activation, then walks the IR backwards, one op at
a time, applying the LRP rules as written in the literature -- not by calling dynamiclrp. Linear ops and
convolutions are written as explicit contribution tensors :math:`c_{ij} = x_i w_{ij}` (a convolution as im2col:
``unfold`` the input into patches, a matrix product per location, ``fold`` the patch relevance back), so every
rule is the textbook sum over :math:`j`:

* ε [Bach 2015]: :math:`R_i = \sum_j c_{ij} R_j / \mathrm{stab}(z_j)`, :math:`z_j = \sum_i c_{ij} + b_j`,
  :math:`\mathrm{stab}(z) = z + \varepsilon\,\mathrm{sign}(z)`, :math:`\mathrm{sign}(0) = 1`;
* z⁺: :math:`c^+_{ij} = (x_i w_{ij})^+`, denominator :math:`\sum_i c^+_{ij} + b_j^+`;
* αβ: :math:`\alpha\,c^+ / \mathrm{stab}(z^+) - \beta\,c^- / \mathrm{stab}(z^-)` with :math:`b^\pm` in the
  denominators;
* γ (sign-aware, as zennit): for :math:`z_j > 0` the contributions :math:`c + \gamma c^+` over
  :math:`\sum_i (c + \gamma c^+) + b + \gamma b^+`, for :math:`z_j < 0` :math:`c + \gamma c^-` over
  :math:`\sum_i (c + \gamma c^-) + b + \gamma b^-`; nothing for :math:`z_j = 0`;
* z-box: :math:`c_{ij} - l_i w_{ij}^+ - h_i w_{ij}^-` over its sum (the bias cancels);
* flat: one per connection (padding excluded) over the count (the bias ignored).

An input layer is a layer whose data operand is a model input seen through views and one zero padding; flat ones
and z-box bounds are not put on the padded positions (the padding is part of the layer's map, as a convolution's
own padding), also when views lie between the padding and the layer.

Biases enter the linear op's denominator (textbook LRP; what is not passed down is absorbed), also a bias added
on its own (``x @ W.T + b``: a 1-d parameter of the layer's width added to a bias-free layer's output that nothing
else uses; a frozen one is a plain addend, since the graph cannot tell it from a constant). Additions
:math:`z = \sum_k t_k` use the ε-rule with unit weights, :math:`R_k = t_k R / \mathrm{stab}(z)` (summed back over
broadcast dimensions); a learned addend's share goes to the parameter. Sums, means and average pools the same with
their coefficients. A product of two activations is split half/half (AttnLRP's uniform rule): element-wise
:math:`R_a = R_b = R/2`; a matrix product :math:`z = AB` gives each factor half of the ε-rule with the other held
fixed. A product whose factor is computed from the other by element-wise ops, views and reductions
(:math:`a \cdot f(a)`) is an activation (or a normalisation) written out by hand: all relevance to :math:`a`.
A product with a constant, ReLU, tanh, views, slices, cat: identity / routing. Max pooling: winner takes all.
Softmax: identity, or AttnLRP's :math:`R_x = x (R - s \sum R)`. Layer norm: identity, or the ε-rule on the map
with the statistics held constant (AttnLRP's linearised layer norm). Eval-mode batch norm: merged into the linear
op or convolution it alone follows (:math:`w' = w\,\gamma/\sigma`, :math:`b' = (b - \mu)\,\gamma/\sigma + \beta`,
as zennit's canonizers) and then identity, or, linearised, the ε-rule on :math:`x \mapsto x\,\gamma/\sigma`.

The rule of each op comes from a preset table below (:data:`PRESETS`), written from the preset docstrings of
dynamiclrp (``epsilon``, ``epsilon_plus``, ``epsilon_plus_flat``, ``epsilon_gamma_box``,
``epsilon_alpha2_beta1``, ``attnlrp``, ``paper``). The ``paper`` preset replaces the ε-rule of sums and products by
the DynamicLRP paper's magnitude-proportional split :math:`R_k = |t_k| R / (\sum_{k'} |t_{k'}| + \varepsilon)`,
applied also between a layer and its bias, and lets softmax absorb its relevance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fuzz_models import BN_EPS, Node, Program, apply, materialize

# rule specs: ("eps", ε), ("zplus", ε), ("gamma", γ, ε), ("alphabeta", α, β, ε), ("zbox", low, high, ε),
# ("flat", ε); sums: ("eps", ε); products: ("uniform", ε); softmax: "pass" | "attnlrp";
# norms: "pass" | ("linearised", ε)
EPS6 = ("eps", 1e-6)
_BASE = {"sum": ("eps", 1e-6), "product": ("uniform", 1e-6), "softmax": "pass", "norm": "pass",
         "batchnorm": "merge"}

#: the rule per place: input_dense / input_conv (a layer whose data operand is the model input, seen through views),
#: dense, conv, sum, product, softmax, norm (layer norm), batchnorm ("merge": into the layer before it)
PRESETS: dict[str, dict] = {
    "epsilon": {**_BASE, "input_dense": EPS6, "input_conv": EPS6, "dense": EPS6, "conv": EPS6},
    # zennit EpsilonPlus: z⁺ for convolutions, ε for dense layers (a dense layer on the input is a dense layer)
    "epsilon_plus": {**_BASE, "input_dense": EPS6, "input_conv": ("zplus", 1e-6), "dense": EPS6,
                     "conv": ("zplus", 1e-6)},
    # zennit EpsilonPlusFlat: flat input layer (dense or conv), z⁺ convolutions, ε dense
    "epsilon_plus_flat": {**_BASE, "input_dense": ("flat", 1e-6), "input_conv": ("flat", 1e-6), "dense": EPS6,
                          "conv": ("zplus", 1e-6)},
    # zennit EpsilonGammaBox: z-box input layer (-3..3), γ = 0.25 convolutions, ε dense
    "epsilon_gamma_box": {**_BASE, "input_dense": ("zbox", -3.0, 3.0, 1e-6), "input_conv": ("zbox", -3.0, 3.0, 1e-6),
                          "dense": EPS6, "conv": ("gamma", 0.25, 1e-6)},
    # zennit EpsilonAlpha2Beta1: α2β1 convolutions, ε dense
    "epsilon_alpha2_beta1": {**_BASE, "input_dense": EPS6, "input_conv": ("alphabeta", 2.0, 1.0, 1e-6),
                             "dense": EPS6, "conv": ("alphabeta", 2.0, 1.0, 1e-6)},
    # AttnLRP as LXT: ε -> 0 (1e-12) everywhere, uniform products, AttnLRP softmax, linearised layer norm
    "attnlrp": {"input_dense": ("eps", 1e-12), "input_conv": ("eps", 1e-12), "dense": ("eps", 1e-12),
                "conv": ("eps", 1e-12), "sum": ("eps", 1e-12), "product": ("uniform", 1e-12),
                "softmax": "attnlrp", "norm": ("linearised", 1e-12), "batchnorm": ("linearised", 1e-12)},
    # the DynamicLRP paper: ε (1e-11) for linear ops; |·|-proportional sums and element-wise products,
    # R_k = |t_k| R / (Σ|t| + ε), also between a layer and its bias (the bias gets its share); a matrix product of
    # two activations halved as AttnLRP's (ε 1e-11); softmax absorbs everything (value path only); norms identity
    "paper": {"input_dense": ("eps", 1e-11), "input_conv": ("eps", 1e-11), "dense": ("eps", 1e-11),
              "conv": ("eps", 1e-11), "sum": ("prop", 1e-11), "product": ("prop", 1e-11), "bias": "split",
              "softmax": "block", "norm": "pass", "batchnorm": "pass"},
}

LN_EPS = 1e-5  # F.layer_norm's default


# the smallest |denominator| / (sum of the magnitudes it adds up) met in one propagation:
# below ~1e-5 a denominator is mostly cancellation, and float64 rounding alone (1e-16 of the magnitudes) moves the
# result by more than the comparison's 1e-10 (or flips its sign): such a case is ill-conditioned, not comparable
_CONDITION = [float("inf")]


def watch(den: torch.Tensor, mag: torch.Tensor, R: torch.Tensor) -> None:
    """Record how well ``den`` (a stabilised denominator, or a value whose sign selects a rule) is determined.
    Every entry counts, also where ``R`` is 0 here: rounding may leave 1e-17 there in another implementation,
    which a cancelled denominator magnifies (by 1/ε)."""
    flows = torch.ones(torch.broadcast_shapes(R.shape, den.shape, mag.shape), dtype=torch.bool)
    if bool(flows.any()):
        ratio = torch.broadcast_to(den.abs() / mag.clamp(min=1e-300), flows.shape)
        _CONDITION[0] = min(_CONDITION[0], float(ratio[flows].min()))


def stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def sum_to(r: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``r`` over the dimensions along which a tensor of ``shape`` was broadcast (same rank)."""
    dims = [d for d, (n, m) in enumerate(zip(r.shape, shape)) if m == 1 and n != 1]
    return r.sum(dims, keepdim=True) if dims else r


# ----------------------------------------------------------------------------------------------------------
# linear rules on explicit contributions


def linear_rule(spec, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, R: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Relevance of ``x`` (..., in) for ``z = x Wᵀ + b`` (W: out × in), output relevance ``R`` (..., out).

    ``mask`` (like ``x``): 1 where an input position exists (0 on the padding of a convolution's patches).
    """
    kind = spec[0]
    eps = spec[-1]
    mask = torch.ones_like(x) if mask is None else mask
    c = x[..., None, :] * W  # c[..., j, i] = x_i w_ji
    bias = torch.zeros(W.shape[0], dtype=x.dtype) if b is None else b
    if kind == "eps":
        z = c.sum(-1) + bias
        watch(stab(z, eps), c.abs().sum(-1) + bias.abs(), R)
        return (c * (R / stab(z, eps))[..., None]).sum(-2)
    if kind == "zplus":
        cp = c.clamp(min=0)
        z = cp.sum(-1) + bias.clamp(min=0)
        return (cp * (R / stab(z, eps))[..., None]).sum(-2)
    if kind == "alphabeta":
        alpha, beta = spec[1], spec[2]
        cp, cn = c.clamp(min=0), c.clamp(max=0)
        zp = cp.sum(-1) + bias.clamp(min=0)
        zn = cn.sum(-1) + bias.clamp(max=0)
        return (alpha * cp * (R / stab(zp, eps))[..., None] - beta * cn * (R / stab(zn, eps))[..., None]).sum(-2)
    if kind == "gamma":
        g = spec[1]
        z = c.sum(-1) + bias
        watch(z, c.abs().sum(-1) + bias.abs(), R)  # its sign selects the rule
        cpos, cneg = c + g * c.clamp(min=0), c + g * c.clamp(max=0)
        zpos = cpos.sum(-1) + bias + g * bias.clamp(min=0)
        zneg = cneg.sum(-1) + bias + g * bias.clamp(max=0)
        sp = torch.where(z > 0, R, 0.0) / stab(zpos, eps)
        sn = torch.where(z < 0, R, 0.0) / stab(zneg, eps)
        return (cpos * sp[..., None] + cneg * sn[..., None]).sum(-2)
    if kind == "zbox":
        low, high = spec[1], spec[2]
        cb = c - (low * mask)[..., None, :] * W.clamp(min=0) - (high * mask)[..., None, :] * W.clamp(max=0)
        z = cb.sum(-1)
        watch(stab(z, eps), cb.abs().sum(-1), R)
        return (cb * (R / stab(z, eps))[..., None]).sum(-2)
    if kind == "flat":
        cf = mask[..., None, :] * torch.ones_like(W)
        z = cf.sum(-1)
        return (cf * (R / stab(z, eps))[..., None]).sum(-2)
    raise ValueError(spec)


def conv_rule(spec, x, W, b, R, stride: int, pad: int, dilation: int = 1, groups: int = 1,
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """A convolution as im2col: per group, patches (B, L, C·k·k), weights (O, C·k·k), the linear rule per
    location; the patch relevance folded back (overlaps summed, padding dropped). ``valid`` (like ``x``): 0 where
    ``x`` is padding added before the layer (no flat ones, no z-box bounds there)."""
    valid = torch.ones_like(x) if valid is None else valid
    k = W.shape[-1]
    H, Wd = x.shape[-2:]
    geo = {"dilation": dilation, "padding": pad, "stride": stride}
    cg, og = x.shape[1] // groups, W.shape[0] // groups
    out = []
    for g in range(groups):
        xg = x[:, g * cg:(g + 1) * cg]
        patches = F.unfold(xg, k, **geo).transpose(1, 2)  # (B, L, CKK)
        mask = F.unfold(valid[:, g * cg:(g + 1) * cg], k, **geo).transpose(1, 2)
        Rl = R[:, g * og:(g + 1) * og].flatten(2).transpose(1, 2)  # (B, L, O)
        bg = None if b is None else b[g * og:(g + 1) * og]
        rp = linear_rule(spec, patches, W[g * og:(g + 1) * og].flatten(1), bg, Rl, mask)
        out.append(F.fold(rp.transpose(1, 2), (H, Wd), k, **geo))
    return torch.cat(out, 1)


# ----------------------------------------------------------------------------------------------------------
# the structure of the program

ELEMENTWISE = {"relu", "tanh", "act", "scale", "add", "mul", "add_param", "mul_param", "reshape", "permute", "slice",
               "expand"}
REDUCTIONS = {"reduce", "avgpool2d", "cumsum"}
VIEWS = {"reshape", "permute", "slice", "expand"}  # padding is not a view: it adds elements


def is_model_input(prog: Program, i: int) -> bool:
    """Whether node ``i`` is a model input seen through views and one zero padding (a padded stem is the input
    layer)."""

    def through_views(j):
        while prog.nodes[j].op in VIEWS:
            j = prog.nodes[j].args[0]
        return j

    i = through_views(i)
    if prog.nodes[i].op == "pad":
        i = through_views(prog.nodes[i].args[0])
    return prog.nodes[i].op == "input"


def live_consumers(prog: Program) -> dict[int, list[int]]:
    """For each node, the nodes that use it (once per operand slot), among the nodes the outputs depend on."""
    live = set(prog.outputs)
    for i in range(len(prog.nodes) - 1, -1, -1):
        if i in live:
            live.update(prog.nodes[i].args)
    consumers: dict[int, list[int]] = {i: [] for i in range(len(prog.nodes))}
    for i in sorted(live):
        for j in prog.nodes[i].args:
            consumers[j].append(i)
    return consumers


def merged_batch_norm(prog: Program, i: int, consumers, params, table):
    """(scale, shift) per output feature of the eval batch norm that alone consumes layer ``i``, if merged."""
    cons = consumers[i]
    if table["batchnorm"] != "merge" or len(cons) != 1 or prog.nodes[cons[0]].op != "batchnorm":
        return None
    k = cons[0]
    scale = 1.0 / torch.sqrt(params[f"{k}.running_var"] + BN_EPS)
    if f"{k}.weight" in params:
        scale = scale * params[f"{k}.weight"]
    shift = -params[f"{k}.running_mean"] * scale + params.get(f"{k}.bias", 0.0)
    return scale, shift


_TRACKED = [True]  # whether the parameters require grad in the run compared with (see reference_lrp's ``frozen``)


def separate_bias(prog: Program, i: int, consumers, tracked: bool | None = None) -> int | None:
    """The ``add_param`` node that is the bias of bias-free linear node ``i`` (``x @ W.T + b`` written out: a 1-d
    parameter of the layer's width added to its output, which nothing else uses), or None. Only a parameter the
    graph records (``tracked``): a frozen one is a constant outside the graph, which nothing tells from a buffer."""
    node = prog.nodes[i]
    tracked = _TRACKED[0] if tracked is None else tracked
    if not tracked or node.op != "linear" or node.attrs["bias"] or len(consumers[i]) != 1:
        return None
    k = consumers[i][0]
    add = prog.nodes[k]
    return k if add.op == "add_param" and add.attrs["pshape"] == (node.attrs["out"],) else None


def _layer(prog, i, consumers, params, table):
    """Weight and bias of layer ``i`` (a bias added on its own included), with a following batch norm merged in."""
    W, b = params[f"{i}.weight"], params.get(f"{i}.bias")
    k = separate_bias(prog, i, consumers) if table.get("bias") != "split" else None
    if k is not None:
        b = params[f"{k}.p"]
    merged = merged_batch_norm(prog, i if k is None else k, consumers, params, table)
    if merged is not None:
        scale, shift = merged
        W = W * scale.reshape(-1, *([1] * (W.dim() - 1)))
        b = shift if b is None else b * scale + shift
    return W, b


def derived(prog: Program, i: int, j: int) -> str | None:
    """Whether activation ``i`` is computed from activation ``j`` alone (element-wise ops, views, reductions):
    ``"norm"`` if a reduction is involved, ``"activation"`` if not, None otherwise. What counts as "from j": j and
    what j is itself an element-wise function of, four steps down."""
    nodes = prog.nodes
    sources, frontier = set(), [j]
    for _ in range(4):
        nxt = []
        for n in frontier:
            if n in sources:
                continue
            sources.add(n)
            if nodes[n].op in ELEMENTWISE:
                nxt.extend(nodes[n].args)
        frontier = nxt
    reduced, seen, stack = False, set(), [i]
    while stack:
        n = stack.pop()
        if n in sources or n in seen:
            continue
        seen.add(n)
        if len(seen) > 64 or nodes[n].op not in ELEMENTWISE | REDUCTIONS:
            return None
        reduced = reduced or nodes[n].op in REDUCTIONS
        stack.extend(nodes[n].args)
    return "norm" if reduced else "activation"


# ----------------------------------------------------------------------------------------------------------
# the propagation


@dataclass
class Reference:
    inputs: list[torch.Tensor]  # relevance of each model input
    seeds: list[torch.Tensor]
    to_params: float  # relevance handed to learned addends
    values: list[torch.Tensor]  # every activation of the forward
    condition: float = float("inf")  # see watch(): below 1e-5 the case is ill-conditioned
    relevance: list = None  # the relevance of every node (None where none arrived), for debugging

    @property
    def seed(self) -> float:
        return float(sum(s.sum() for s in self.seeds))

    @property
    def absorbed(self) -> float:
        return self.seed - float(sum(r.sum() for r in self.inputs)) - self.to_params


def forward(prog: Program, params: dict, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    vals = [x.detach() for x in xs]
    with torch.no_grad():
        for i, n in enumerate(prog.nodes[len(xs):], start=len(xs)):
            vals.append(apply(n, [vals[j] for j in n.args], params, i))
    return vals


def reference_lrp(prog: Program, xs: list[torch.Tensor], targets: list[list[int]], preset: str = "epsilon",
                  params: dict | None = None, frozen: bool = False) -> Reference:
    """Relevance of the inputs ``xs`` of ``prog`` for one class index per row and output; seed = the output
    value. ``frozen``: the parameters do not require grad (only changes what counts as a bias added on its own,
    see :func:`separate_bias`)."""
    _TRACKED[0] = not frozen
    params = materialize(prog) if params is None else params
    table = PRESETS[preset]
    vals = forward(prog, params, xs)
    n = len(prog.nodes)
    rel: list[torch.Tensor | None] = [None] * n
    seeds = []
    for o, t in zip(prog.outputs, targets):
        y = vals[o]
        s = torch.zeros_like(y)
        rows = torch.arange(y.shape[0])
        s[rows, torch.as_tensor(t)] = y[rows, torch.as_tensor(t)]
        seeds.append(s)
        rel[o] = s if rel[o] is None else rel[o] + s
    to_params = 0.0
    consumers = live_consumers(prog)
    _CONDITION[0] = float("inf")
    for i in range(n - 1, len(xs) - 1, -1):
        R = rel[i]
        if R is None:
            continue
        node = prog.nodes[i]
        operands = [vals[j] for j in node.args]
        out, p_rel = _op_relevance(prog, i, node, operands, vals[i], R, params, table, consumers)
        to_params += p_rel
        for j, r in zip(node.args, out):
            if r is not None:
                assert r.shape == vals[j].shape, (node, r.shape, vals[j].shape)
                rel[j] = r if rel[j] is None else rel[j] + r
    r_in = [rel[i] if rel[i] is not None else torch.zeros_like(x) for i, x in zip(prog.inputs, xs)]
    return Reference(r_in, seeds, to_params, vals, _CONDITION[0], rel)


def _padding_mask(prog: Program, j: int, x: torch.Tensor, params: dict) -> torch.Tensor | None:
    """For an input layer whose operand ``j`` is a zero-padded input seen through views: 1 on the image, 0 on the
    padding, carried through the views (its rule sees the image, the padding is part of its map); else None."""
    path = []
    while prog.nodes[j].op in VIEWS:
        path.append(j)
        j = prog.nodes[j].args[0]
    if prog.nodes[j].op != "pad":
        return None
    a = prog.nodes[j].attrs
    n = prog.nodes[j].shape[-1] - a["left"] - a["right"]
    valid = torch.zeros((x.shape[0], *prog.nodes[j].shape), dtype=x.dtype)
    valid.narrow(-1, a["left"], n).fill_(1.0)
    for k in reversed(path):
        valid = apply(prog.nodes[k], [valid], params, k)
    return valid.reshape(x.shape)


def _sum_den(prop: bool, combined: torch.Tensor, y: torch.Tensor, mag: torch.Tensor, eps: float, R) -> torch.Tensor:
    """Denominator of a sum rule: Σ|t| + ε (proportional), or stab(z) (ε-rule, recording its condition)."""
    if prop:
        return combined + eps
    watch(stab(y, eps), mag, R)
    return stab(y, eps)


def _op_relevance(prog, i, node, xs, y, R, params, table, consumers):
    """(relevance per operand, relevance given to parameters) of IR node ``i``."""
    op, a = node.op, node.attrs
    x = xs[0]
    if op in ("linear", "conv2d") and table.get("bias") == "split" and f"{i}.bias" in params:
        # the bias addition split off the layer takes the sum rule: the bias gets its share
        b = params[f"{i}.bias"]
        b = b if op == "linear" else b.reshape(-1, 1, 1)
        z = y - b
        s = R / (z.abs() + b.abs() + table["sum"][1])
        out, _ = _op_relevance(prog, i, Node(op, node.args, {**a, "bias": False}, node.shape), xs, z, z.abs() * s,
                               {k: v for k, v in params.items() if k != f"{i}.bias"}, table, consumers)
        return out, float(sum_to(b.abs() * s, b.shape).sum())
    if op in ("linear", "conv2d"):
        first = is_model_input(prog, node.args[0])
        spec = table[("input_" if first else "") + ("dense" if op == "linear" else "conv")]
        valid = _padding_mask(prog, node.args[0], x, params) if first else None
        W, b = _layer(prog, i, consumers, params, table)
        if op == "linear":
            return [linear_rule(spec, x, W, b, R, valid)], 0.0
        return [conv_rule(spec, x, W, b, R, a["stride"], a["pad"], a["dilation"], a["groups"], valid)], 0.0
    if op in ("relu", "tanh", "act", "scale", "mul_param"):
        return [R], 0.0
    prop, eps_sum = table["sum"][0] == "prop", table["sum"][1]
    t = x.abs() if prop else x  # the terms the sum rules split by: |x| for the proportional rule
    if op == "cumsum":  # z_j = sum_{i <= j} x_i: R_i = x_i sum_{j >= i} R_j / stab(z_j)
        d = a["dim"]
        s = R / _sum_den(prop, t.cumsum(d), y, x.abs().cumsum(d), eps_sum, R)
        return [t * s.flip(d).cumsum(d).flip(d)], 0.0
    if op == "pad":
        return [R.narrow(-1, a["left"], x.shape[-1])], 0.0
    if op == "expand":
        return [R.sum(a["dim"], keepdim=True)], 0.0
    if op == "add_param" and table.get("bias") != "split" and any(separate_bias(prog, j, consumers) == i
                                                                  for j in node.args):
        return [R], 0.0  # a layer's bias: all relevance to the layer, which puts the bias in its denominator
    if op in ("add", "add_param"):
        ta = x
        tb = a["sign"] * xs[1] if op == "add" else params[f"{i}.p"]
        if prop:
            ta, tb = ta.abs(), tb.abs()
        s = R / _sum_den(prop, ta + tb, ta + tb, ta.abs() + tb.abs(), eps_sum, R)
        ra, rb = sum_to(ta * s, ta.shape), sum_to(tb * s, tb.shape)
        if op == "add":
            return [ra, rb], 0.0
        return [ra], float(rb.sum())
    if op == "mul":
        for k in (1, 0):  # a · f(a): everything to a
            if derived(prog, node.args[k], node.args[1 - k]) is not None:
                out = [None, None]
                out[1 - k] = sum_to(R, xs[1 - k].shape)
                return out, 0.0
        if table["product"][0] == "prop":  # R_a = |a| R / (|a| + |b| + ε)
            s = R / (xs[0].abs() + xs[1].abs() + table["product"][1])
            return [sum_to(xs[0].abs() * s, xs[0].shape), sum_to(xs[1].abs() * s, xs[1].shape)], 0.0
        return [sum_to(R / 2, xs[0].shape), sum_to(R / 2, xs[1].shape)], 0.0
    if op == "matmul":
        A, Bm = xs
        c = A[:, :, None, :] * Bm[:, None, :, :]  # (B, T, S, F): c[t, s, f] = A_tf B_sf
        z = c.sum(-1)
        s = R / (2 * stab(z, table["product"][1]))
        watch(stab(z, table["product"][1]), c.abs().sum(-1), R)
        return [(c * s[..., None]).sum(2), (c * s[..., None]).sum(1)], 0.0
    if op == "cat":
        d = a["dim"]
        return list(R.split([x.shape[d], xs[1].shape[d]], dim=d)), 0.0
    if op == "reshape":
        return [R.reshape(x.shape)], 0.0
    if op == "permute":
        return [R.transpose(-1, -2)], 0.0
    if op == "slice":
        r = torch.zeros_like(x)
        r.narrow(a["dim"], a["start"], a["stop"] - a["start"]).copy_(R)
        return [r], 0.0
    if op == "reduce":
        d = a["dim"]
        f = torch.sum if a["how"] == "sum" else torch.mean
        s = R / _sum_den(prop, f(t, dim=d, keepdim=a["keepdim"]), y, f(x.abs(), dim=d, keepdim=a["keepdim"]), eps_sum,
                         R)
        if not a["keepdim"]:
            s = s.unsqueeze(d)
        coef = 1.0 if a["how"] == "sum" else 1.0 / x.shape[d]
        return [t * coef * s], 0.0
    if op == "avgpool2d":
        k, st = a["k"], a["stride"]
        s = R / _sum_den(prop, F.avg_pool2d(t, k, st), y, F.avg_pool2d(x.abs(), k, st), eps_sum, R)
        patches = F.unfold(t, k, stride=st)  # (B, C·k·k, L)
        B, C = x.shape[:2]
        rp = patches.reshape(B, C, k * k, -1) * (s.reshape(B, C, 1, -1) / (k * k))
        return [F.fold(rp.reshape(B, C * k * k, -1), x.shape[-2:], k, stride=st)], 0.0
    if op == "maxpool2d":
        k, st = a["k"], a["stride"]
        B, C = x.shape[:2]
        patches = F.unfold(x, k, stride=st).reshape(B, C, k * k, -1)
        win = F.one_hot(patches.argmax(2), k * k).permute(0, 1, 3, 2).to(x.dtype)  # first maximum of each window
        rp = win * R.reshape(B, C, 1, -1)
        return [F.fold(rp.reshape(B, C * k * k, -1), x.shape[-2:], k, stride=st)], 0.0
    if op == "softmax":
        if table["softmax"] == "pass":
            return [R], 0.0
        if table["softmax"] == "block":
            return [torch.zeros_like(x)], 0.0
        return [x * (R - y * R.sum(a["dim"], keepdim=True))], 0.0
    if op == "layer_norm":
        rule = table["norm"]
        if rule == "pass":
            return [R], 0.0
        # the map t -> (t - mean t) · rstd · w with rstd held fixed; its transpose applied to R / stab(y)
        rstd = 1.0 / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + LN_EPS)
        w = params.get(f"{i}.weight")
        u = R / stab(y, rule[1]) * rstd * (1.0 if w is None else w)
        b = params.get(f"{i}.bias")
        watch(stab(y, rule[1]), (x.abs() + x.mean(-1, keepdim=True).abs()) * rstd * (1.0 if w is None else w.abs())
              + (0.0 if b is None else b.abs()), R)
        return [x * (u - u.mean(-1, keepdim=True))], 0.0
    if op == "batchnorm":
        rule = table["batchnorm"]
        if rule in ("merge", "pass"):
            return [R], 0.0
        scale = 1.0 / torch.sqrt(params[f"{i}.running_var"] + BN_EPS)
        if f"{i}.weight" in params:
            scale = scale * params[f"{i}.weight"]
        scale = scale.reshape(-1, *([1] * (x.dim() - 2)))
        watch(stab(y, rule[1]), (x * scale).abs() + (y - x * scale).abs(), R)
        return [x * scale * R / stab(y, rule[1])], 0.0
    raise ValueError(op)
