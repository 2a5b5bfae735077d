"""Random models for the fuzz tests: a small IR, a hypothesis strategy that draws it, a compiler to ``nn.Module``.

An IR program is a DAG of op records in topological order. The first node(s) (one or two) are the model inputs;
every other node names its operands by index and carries the attributes of its op; ``outputs`` lists the nodes
the model returns (each a ``(batch, classes)`` head). Parameters are not drawn by hypothesis: ``materialize`` makes
them from ``param_seed`` (float64, deterministic), so a program prints short and shrinks well.

Ops (shapes always start with the batch dimension, which no op mixes):

=============== =========================================================================================
``linear``      ``F.linear`` on the last dimension (rank 2 or 3; a permuted rank-3 operand is non-contiguous)
``conv2d``      ``F.conv2d`` (kernel 1-3, stride 1-2, padding 0-1, dilation 1-2, groups), optional bias
``relu``/``tanh``  element-wise activations
``act``         sigmoid, GELU or SiLU (element-wise activations with other autograd nodes)
``cumsum``      cumulative sum along a non-batch dimension
``pad``         zero padding of the last dimension (``F.pad``)
``expand``      ``expand`` of a size-1 dimension
``scale``       multiplication by a Python scalar
``add``         ``a + b`` or ``a - b`` of two activations, with broadcasting
``mul``         ``a * b`` of two activations, with broadcasting
``add_param``   ``a + p`` with a learned tensor broadcast over the batch (and some dimensions)
``mul_param``   ``a * p`` with a learned tensor (a constant factor: identity rule)
``cat``         concatenation along a non-batch dimension
``reshape``     (B, F) -> (B, T, F/T); (B, ...) -> (B, -1)
``permute``     swap the last two dimensions
``slice``       a contiguous range of a non-batch dimension
``reduce``      sum or mean over a non-batch dimension (keepdim or not)
``softmax``     softmax over a non-batch dimension
``layer_norm``  layer norm over the last dimension, affine or not
``maxpool2d``   max pooling (kernel 2-3, stride 1-2)
``avgpool2d``   average pooling (kernel 2, stride 1-2)
``matmul``      ``a @ b.transpose(-1, -2)`` of two rank-3 activations (a product of two activations)
``batchnorm``   eval-mode batch norm (running statistics) on (B, F) or (B, C, H, W), affine or not
=============== =========================================================================================

Motifs add several of these at once, in the patterns real models use: ``block`` (linear or conv, maybe batch norm,
ReLU), ``residual`` (``h + block(h)``), ``attention`` (``softmax(q kᵀ) v`` with q, k, v linear in one activation),
``gate`` (``a * f(a)``: an activation written out by hand, or ``a * reduce(a)``: a normalisation), ``center``
(``a - mean(a)``, broadcast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

D = torch.float64
BN_EPS = 1e-5
# ops that need learned tensors
PARAM_OPS = ("linear", "conv2d", "add_param", "mul_param", "layer_norm", "batchnorm")


@dataclass
class Node:
    op: str
    args: tuple[int, ...] = ()
    attrs: dict = field(default_factory=dict)
    shape: tuple[int, ...] = ()  # without the batch dimension

    def __repr__(self) -> str:
        a = ", ".join(f"{k}={v!r}" for k, v in self.attrs.items())
        return f"{self.op}{list(self.args)}({a}) -> {self.shape}"


@dataclass
class Program:
    nodes: list[Node]
    outputs: list[int]
    batch: int
    param_seed: int
    input_seed: int

    def __repr__(self) -> str:
        lines = [f"Program(batch={self.batch}, param_seed={self.param_seed}, input_seed={self.input_seed},"
                 f" outputs={self.outputs})"]
        lines += [f"  %{i} = {n!r}" for i, n in enumerate(self.nodes)]
        return "\n".join(lines)

    @property
    def inputs(self) -> list[int]:
        """The input nodes (the first nodes of the program)."""
        return [i for i, n in enumerate(self.nodes) if n.op == "input"]

    def ops(self) -> set[str]:
        return {n.op for n in self.nodes}


# ----------------------------------------------------------------------------------------------------------
# shapes


def broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    if len(a) != len(b):
        return None
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            return None
        out.append(max(x, y))
    return tuple(out)


def conv_out(n: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


# ----------------------------------------------------------------------------------------------------------
# the strategy

MOTIFS = ("block", "residual", "attention", "gate", "center")
OP_NAMES = ("linear", "conv2d", "relu", "tanh", "scale", "add", "mul", "add_param", "mul_param", "cat", "reshape",
            "permute", "slice", "reduce", "softmax", "layer_norm", "maxpool2d", "avgpool2d", "matmul", "batchnorm",
            "act", "cumsum", "pad", "expand")


def _candidates(op: str, nodes: list[Node]) -> list[int]:
    """Nodes that can be the (first) operand of ``op``."""
    out = []
    for i, n in enumerate(nodes):
        r, s = len(n.shape), n.shape
        ok = {
            "linear": r in (1, 2),
            "conv2d": r == 3 and min(s[1:]) >= 2,
            "maxpool2d": r == 3 and min(s[1:]) >= 3,
            "avgpool2d": r == 3 and min(s[1:]) >= 2,
            "reshape": (r == 1 and s[0] in (4, 6)) or r >= 2,
            "permute": r >= 2,
            "slice": max(s) >= 2,
            "reduce": r >= 2 or (r == 1 and s[0] >= 2),
            "softmax": max(s) >= 2,
            "layer_norm": s[-1] >= 2,
            "matmul": r == 2,
            "batchnorm": r in (1, 3),
            "expand": 1 in s,
            "block": r in (1, 2) or (r == 3 and min(s[1:]) >= 3),
            "residual": r in (1, 2) or (r == 3 and min(s[1:]) >= 3),
            "attention": r == 2,
        }.get(op, True)
        if ok:
            out.append(i)
    return out


def _partners(op: str, nodes: list[Node], a: int) -> list[int]:
    """Nodes that can be the second operand of a two-operand ``op`` with first operand ``a``."""
    sa = nodes[a].shape
    out = []
    for j, n in enumerate(nodes):
        sb = n.shape
        if op in ("add", "mul"):
            ok = broadcast(sa, sb) == sa
        elif op == "cat":
            ok = len(sb) == len(sa) and sum(x != y for x, y in zip(sa, sb)) <= 1
        elif op == "matmul":
            ok = len(sb) == 2 and sb[-1] == sa[-1]
        else:
            ok = False
        if ok:
            out.append(j)
    return out


@st.composite
def programs(draw, max_ops: int = 8, ops: tuple[str, ...] = OP_NAMES, biases: bool = True,
             kinds: tuple[str, ...] = ("dense", "seq", "img"), motifs: tuple[str, ...] = MOTIFS) -> Program:
    """A random program: an input, up to ``max_ops`` ops or motifs on a pool of activations (any of which may be
    reused), and one or two heads (flatten + linear) on activations of the pool."""
    batch = draw(st.integers(2, 3))
    kind = draw(st.sampled_from(kinds))
    if kind == "dense":
        shape = (draw(st.integers(2, 6)),)
    elif kind == "seq":
        shape = (draw(st.integers(2, 3)), draw(st.integers(2, 5)))
    else:
        shape = (draw(st.integers(1, 3)), draw(st.integers(3, 6)), draw(st.integers(3, 6)))
    nodes = [Node("input", shape=shape)]
    if draw(st.integers(0, 3)) == 0:  # a second input, of the same shape or another of the same kind
        nodes.append(Node("input", shape=shape if draw(st.booleans()) else
                          (*shape[:-1], draw(st.integers(2, 6)))))
    n_ops = draw(st.integers(1, max_ops))
    for _ in range(n_ops):
        usable = [op for op in ops + motifs if _candidates(op, nodes)]
        op = draw(st.sampled_from(usable))
        cands = _candidates(op, nodes)
        # prefer recent activations (deep chains) but allow any (shared sub-graphs)
        a = cands[-1 - draw(st.integers(0, len(cands) - 1))]
        if op in MOTIFS:
            _draw_motif(draw, op, nodes, a, biases)
            continue
        node = _draw_op(draw, op, nodes, a, biases)
        if node is not None:
            nodes.append(node)
    n_out = draw(st.integers(1, 2))
    classes = draw(st.integers(2, 4))
    outputs = []
    sources = [len(nodes) - 1] + [draw(st.integers(0, len(nodes) - 1)) for _ in range(n_out - 1)]
    used = _ancestors(nodes, sources)
    sources += [i for i, n in enumerate(nodes) if n.op == "input" and i not in used]  # every input is used
    for src in sources:
        if len(nodes[src].shape) > 1:
            nodes.append(Node("reshape", (src,), {"to": (-1,)}, (math.prod(nodes[src].shape),)))
            src = len(nodes) - 1
        bias = biases and draw(st.booleans())
        nodes.append(Node("linear", (src,), {"out": classes, "bias": bias}, (classes,)))
        outputs.append(len(nodes) - 1)
    return Program(nodes, outputs, batch, draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1)))


def _ancestors(nodes: list[Node], roots: list[int]) -> set[int]:
    seen, stack = set(), list(roots)
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            stack.extend(nodes[i].args)
    return seen


def _draw_motif(draw, motif: str, nodes: list[Node], a: int, biases: bool) -> None:
    """Append the nodes of ``motif`` on operand ``a``."""
    s = nodes[a].shape

    def add(op, args, attrs, shape):
        nodes.append(Node(op, tuple(args), attrs, tuple(shape)))
        return len(nodes) - 1

    def block(h, same: bool):
        sh = nodes[h].shape
        if len(sh) == 3:
            k = draw(st.sampled_from([1, 3]))
            ch = sh[0] if same else draw(st.integers(1, 3))
            out = add("conv2d", [h], {"out": ch, "k": k, "stride": 1, "pad": k // 2, "dilation": 1, "groups": 1,
                                      "bias": biases and draw(st.booleans())}, (ch, *sh[1:]))
        else:
            f = sh[-1] if same else draw(st.integers(2, 6))
            bias = biases and draw(st.integers(0, 2))  # 2: x @ W.T + b, the bias added on its own
            out = add("linear", [h], {"out": f, "bias": bias == 1}, (*sh[:-1], f))
            if bias == 2:
                out = add("add_param", [out], {"pshape": (f,) if len(sh) == 1 else (1, f)}, nodes[out].shape)
        if len(sh) != 2 and biases and draw(st.booleans()):  # batch norm shifts like a bias
            out = add("batchnorm", [out], {"affine": draw(st.booleans())}, nodes[out].shape)
        return add("relu", [out], {}, nodes[out].shape) if draw(st.booleans()) else out

    if motif == "block":
        block(a, same=False)
    elif motif == "residual":
        f = block(a, same=True)
        add("add", [a, f], {"sign": 1}, s)
    elif motif == "attention":
        T, d = s
        dk, dv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        bias = biases and draw(st.booleans())
        q = add("linear", [a], {"out": dk, "bias": bias}, (T, dk))
        k = add("linear", [a], {"out": dk, "bias": bias}, (T, dk))
        v = add("linear", [a], {"out": dv, "bias": bias}, (T, dv))
        sc = add("matmul", [q, k], {}, (T, T))
        if draw(st.booleans()):
            sc = add("scale", [sc], {"c": 0.5}, (T, T))
        p = add("softmax", [sc], {"dim": 2}, (T, T))
        vt = add("permute", [v], {}, (dv, T))
        add("matmul", [p, vt], {}, (T, dv))
    elif motif == "gate":
        how = draw(st.sampled_from(["relu", "tanh", "scale", "reduce"]))
        if how == "reduce":
            d = draw(st.integers(0, len(s) - 1))
            f = add("reduce", [a], {"how": "mean", "dim": d + 1, "keepdim": True},
                    tuple(1 if i == d else x for i, x in enumerate(s)))
            f = add("tanh", [f], {}, nodes[f].shape)
        else:
            f = add(how, [a], {"c": 0.5} if how == "scale" else {}, s)
            if draw(st.booleans()):
                f = add("tanh", [f], {}, s)
        args = [a, f] if draw(st.booleans()) else [f, a]
        if nodes[args[0]].shape != s:  # the broadcast factor second
            args = args[::-1]
        add("mul", args, {}, s)
    elif motif == "center":
        d = draw(st.integers(0, len(s) - 1))
        m = add("reduce", [a], {"how": "mean", "dim": d + 1, "keepdim": True},
                tuple(1 if i == d else x for i, x in enumerate(s)))
        add("add", [a, m], {"sign": -1}, s)


def _draw_op(draw, op: str, nodes: list[Node], a: int, biases: bool) -> Node | None:
    s = nodes[a].shape
    r = len(s)
    if op == "linear":
        out = draw(st.integers(2, 6))
        return Node(op, (a,), {"out": out, "bias": biases and draw(st.booleans())}, (*s[:-1], out))
    if op == "conv2d":
        k = draw(st.integers(1, min(3, *s[1:])))
        stride, pad = draw(st.integers(1, 2)), draw(st.integers(0, 1 if k > 1 else 0))
        dil = 2 if k > 1 and min(s[1:]) + 2 * pad >= 2 * k - 1 and draw(st.integers(0, 3)) == 0 else 1
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if s[0] % g == 0]))
        ch = groups * draw(st.integers(1, 3 if groups == 1 else 2))
        attrs = {"out": ch, "k": k, "stride": stride, "pad": pad, "dilation": dil, "groups": groups,
                 "bias": biases and draw(st.booleans())}
        return Node(op, (a,), attrs, (ch, conv_out(s[1], k, stride, pad, dil), conv_out(s[2], k, stride, pad, dil)))
    if op in ("relu", "tanh"):
        return Node(op, (a,), {}, s)
    if op == "act":
        return Node(op, (a,), {"f": draw(st.sampled_from(["sigmoid", "gelu", "silu"]))}, s)
    if op == "cumsum":
        return Node(op, (a,), {"dim": draw(st.integers(0, r - 1)) + 1}, s)
    if op == "pad":
        left, right = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        return Node(op, (a,), {"left": left, "right": right}, (*s[:-1], s[-1] + left + right))
    if op == "expand":
        d = draw(st.sampled_from([i for i in range(r) if s[i] == 1]))
        k = draw(st.integers(2, 4))
        return Node(op, (a,), {"dim": d + 1, "size": k}, tuple(k if i == d else x for i, x in enumerate(s)))
    if op == "scale":
        return Node(op, (a,), {"c": draw(st.sampled_from([-1.5, 0.5, 2.0]))}, s)
    if op in ("add", "mul", "cat", "matmul"):
        partners = _partners(op, nodes, a)
        if not partners:
            return None
        b = draw(st.sampled_from(partners))
        sb = nodes[b].shape
        if op == "add":
            return Node(op, (a, b), {"sign": draw(st.sampled_from([1, -1]))}, s)
        if op == "mul":
            return Node(op, (a, b), {}, s)
        if op == "matmul":
            return Node(op, (a, b), {}, (s[0], sb[0]))
        diff = [d for d in range(r) if s[d] != sb[d]]
        dim = diff[0] if diff else draw(st.integers(0, r - 1))
        shape = tuple(x + y if d == dim else x for d, (x, y) in enumerate(zip(s, sb)))
        return Node(op, (a, b), {"dim": dim + 1}, shape)
    if op in ("add_param", "mul_param"):
        pshape = tuple(1 if draw(st.booleans()) else d for d in s)
        return Node(op, (a,), {"pshape": pshape}, s)
    if op == "reshape":
        if r == 1:
            t = 2 if s[0] % 2 == 0 and (s[0] % 3 or draw(st.booleans())) else 3
            to = (t, s[0] // t)
        else:
            to = (-1,)
        shape = to if to != (-1,) else (math.prod(s),)
        return Node(op, (a,), {"to": to}, shape)
    if op == "permute":
        return Node(op, (a,), {}, (*s[:-2], s[-1], s[-2]))
    if op == "slice":
        dims = [d for d in range(r) if s[d] >= 2]
        d = draw(st.sampled_from(dims))
        start = draw(st.integers(0, s[d] - 1))
        stop = draw(st.integers(start + 1, s[d]))
        shape = tuple(stop - start if i == d else x for i, x in enumerate(s))
        return Node(op, (a,), {"dim": d + 1, "start": start, "stop": stop}, shape)
    if op == "reduce":
        d = draw(st.integers(0, r - 1))
        keep = r == 1 or draw(st.booleans())
        shape = tuple(1 if i == d else x for i, x in enumerate(s)) if keep else s[:d] + s[d + 1:]
        return Node(op, (a,), {"how": draw(st.sampled_from(["sum", "mean"])), "dim": d + 1, "keepdim": keep},
                    shape)
    if op == "softmax":
        dims = [d for d in range(r) if s[d] >= 2]
        return Node(op, (a,), {"dim": draw(st.sampled_from(dims)) + 1}, s)
    if op in ("layer_norm", "batchnorm"):
        return Node(op, (a,), {"affine": draw(st.booleans())}, s)
    if op == "maxpool2d":
        k = draw(st.integers(2, min(3, *s[1:])))
        stride = draw(st.integers(1, 2))
        return Node(op, (a,), {"k": k, "stride": stride},
                    (s[0], conv_out(s[1], k, stride, 0), conv_out(s[2], k, stride, 0)))
    if op == "avgpool2d":
        stride = draw(st.integers(1, 2))
        return Node(op, (a,), {"k": 2, "stride": stride},
                    (s[0], conv_out(s[1], 2, stride, 0), conv_out(s[2], 2, stride, 0)))
    raise ValueError(op)


# ----------------------------------------------------------------------------------------------------------
# parameters, inputs, compilation


def materialize(prog: Program) -> dict[str, torch.Tensor]:
    """The program's parameters, float64, from ``param_seed``: ``"<node>.<name>"`` -> tensor."""
    g = torch.Generator().manual_seed(prog.param_seed)
    params: dict[str, torch.Tensor] = {}
    for i, n in enumerate(prog.nodes):
        a = n.attrs
        if n.op == "linear":
            fan_in = prog.nodes[n.args[0]].shape[-1]
            params[f"{i}.weight"] = torch.randn(a["out"], fan_in, generator=g, dtype=D) / math.sqrt(fan_in)
            if a["bias"]:
                params[f"{i}.bias"] = 0.5 * torch.randn(a["out"], generator=g, dtype=D)
        elif n.op == "conv2d":
            cin = prog.nodes[n.args[0]].shape[0] // a["groups"]
            fan_in = cin * a["k"] ** 2
            params[f"{i}.weight"] = torch.randn(a["out"], cin, a["k"], a["k"], generator=g, dtype=D) / math.sqrt(fan_in)
            if a["bias"]:
                params[f"{i}.bias"] = 0.5 * torch.randn(a["out"], generator=g, dtype=D)
        elif n.op == "add_param":
            params[f"{i}.p"] = torch.randn(a["pshape"], generator=g, dtype=D)
        elif n.op == "mul_param":
            params[f"{i}.p"] = torch.rand(a["pshape"], generator=g, dtype=D) * 1.5 + 0.25
        elif n.op == "layer_norm" and a["affine"]:
            d = n.shape[-1]
            params[f"{i}.weight"] = torch.rand(d, generator=g, dtype=D) + 0.5
            params[f"{i}.bias"] = 0.5 * torch.randn(d, generator=g, dtype=D)
        elif n.op == "batchnorm":
            c = n.shape[0]
            params[f"{i}.running_mean"] = 0.5 * torch.randn(c, generator=g, dtype=D)
            params[f"{i}.running_var"] = torch.rand(c, generator=g, dtype=D) + 0.5
            if a["affine"]:
                params[f"{i}.weight"] = torch.rand(c, generator=g, dtype=D) + 0.5
                params[f"{i}.bias"] = 0.5 * torch.randn(c, generator=g, dtype=D)
    return params


def make_inputs(prog: Program, seed: int | None = None) -> list[torch.Tensor]:
    """One tensor per input node, float64, from ``input_seed`` (or ``seed``)."""
    g = torch.Generator().manual_seed(prog.input_seed if seed is None else seed)
    return [torch.randn(prog.batch, *prog.nodes[i].shape, generator=g, dtype=D) for i in prog.inputs]


def apply(node: Node, xs: list[torch.Tensor], p: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    """The forward op of one IR node (shared by the compiled module and the reference's forward)."""
    a, op = node.attrs, node.op
    x = xs[0]
    if op == "linear":
        return F.linear(x, p[f"{i}.weight"], p.get(f"{i}.bias"))
    if op == "conv2d":
        return F.conv2d(x, p[f"{i}.weight"], p.get(f"{i}.bias"), a["stride"], a["pad"], a["dilation"], a["groups"])
    if op == "relu":
        return torch.relu(x)
    if op == "tanh":
        return torch.tanh(x)
    if op == "act":
        return {"sigmoid": torch.sigmoid, "gelu": F.gelu, "silu": F.silu}[a["f"]](x)
    if op == "cumsum":
        return x.cumsum(a["dim"])
    if op == "pad":
        return F.pad(x, (a["left"], a["right"]))
    if op == "expand":
        size = list(x.shape)
        size[a["dim"]] = a["size"]
        return x.expand(size)
    if op == "scale":
        return x * a["c"]
    if op == "add":
        return x + xs[1] if a["sign"] > 0 else x - xs[1]
    if op == "mul":
        return x * xs[1]
    if op == "add_param":
        return x + p[f"{i}.p"]
    if op == "mul_param":
        return x * p[f"{i}.p"]
    if op == "cat":
        return torch.cat([x, xs[1]], dim=a["dim"])
    if op == "reshape":
        return x.reshape(x.shape[0], *a["to"])
    if op == "permute":
        return x.transpose(-1, -2)
    if op == "slice":
        return x.narrow(a["dim"], a["start"], a["stop"] - a["start"])
    if op == "reduce":
        f = torch.sum if a["how"] == "sum" else torch.mean
        return f(x, dim=a["dim"], keepdim=a["keepdim"])
    if op == "softmax":
        return torch.softmax(x, dim=a["dim"])
    if op == "layer_norm":
        return F.layer_norm(x, (x.shape[-1],), p.get(f"{i}.weight"), p.get(f"{i}.bias"))
    if op == "batchnorm":
        return F.batch_norm(x, p[f"{i}.running_mean"], p[f"{i}.running_var"], p.get(f"{i}.weight"),
                            p.get(f"{i}.bias"), training=False, eps=BN_EPS)
    if op == "maxpool2d":
        return F.max_pool2d(x, a["k"], a["stride"])
    if op == "avgpool2d":
        return F.avg_pool2d(x, a["k"], a["stride"])
    if op == "matmul":
        return x @ xs[1].transpose(-1, -2)
    raise ValueError(op)


BUFFERS = (".running_mean", ".running_var")


class FuzzModel(nn.Module):
    """The program as a module: parameters are ``nn.Parameter`` s (running statistics are buffers), ``forward``
    runs the ops in order and returns the head(s) (a tuple when there are several)."""

    def __init__(self, prog: Program, params: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.prog = prog
        params = materialize(prog) if params is None else params
        self.params = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v.clone()) for k, v in params.items()
                                        if not k.endswith(BUFFERS)})
        self.names = {}
        for k, v in params.items():
            if k.endswith(BUFFERS):
                self.register_buffer("b" + k.replace(".", "_"), v.clone())
                self.names[k] = "b" + k.replace(".", "_")

    def forward(self, *xs):
        vals = self.activations(*xs)
        outs = tuple(vals[o] for o in self.prog.outputs)
        return outs if len(outs) > 1 else outs[0]

    def activations(self, *xs) -> list[torch.Tensor]:
        """Every node's value (the inputs first), from one forward."""
        p = {k.replace("_", ".", 1): v for k, v in self.params.items()}
        p.update({k: getattr(self, b) for k, b in self.names.items()})
        vals = list(xs)
        for i, n in enumerate(self.prog.nodes[len(xs):], start=len(xs)):
            vals.append(apply(n, [vals[j] for j in n.args], p, i))
        return vals


def make_targets(prog: Program, seed: int) -> list[list[int]]:
    """One class index per row for each output."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, prog.nodes[o].shape[-1], (prog.batch,), generator=g).tolist() for o in prog.outputs]
