"""Tests of :mod:`dynamiclrp.rules` against explicit, independently written LRP formulas (float64).

Every linear op is written here as an explicit contribution tensor ``c[..., i, j] = x_i w_ij`` (outer products for
mm / linear / bmm / matmul, a dense matrix built index by index for convolutions), and each rule's equation is
evaluated on that tensor with ``einsum``. The rules compute the same thing with vector-Jacobian products.

The stabiliser eps used in the exact comparisons is a power of two (exactly representable in float32), see
``test_stabilize_eps_is_not_rounded_to_float32`` for why.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dynamiclrp import rules as r

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}
EXACT = {"rtol": 0.0, "atol": 0.0}
EPS = 2.0**-20  # ~1e-6, exactly representable in float32
BIG_EPS = 0.25  # large enough that a wrong stabiliser (sign convention, placement) shows in the result


# ----------------------------------------------------------------------------------------------------------
# helpers (reference math, written independently of rules.py)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=DT)


def rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=g, dtype=DT)


def stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference stabiliser: z + eps * sign(z) with sign(0) = +1, element by element."""
    sign = torch.ones_like(z)
    sign[z < 0] = -1.0
    return z + eps * sign


def reduce_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum a broadcast result back to ``shape`` (leading dims, then dims where ``shape`` has size 1)."""
    shape = tuple(shape)
    while t.dim() > len(shape):
        t = t.sum(0)
    for d, n in enumerate(shape):
        if n == 1 and t.shape[d] != 1:
            t = t.sum(d, keepdim=True)
    assert t.shape == shape
    return t


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view holding the same values as ``t``."""
    buf = torch.zeros(*t.shape, 2, dtype=t.dtype)
    buf[..., 0] = t
    out = buf[..., 0]
    assert not out.is_contiguous() or out.numel() <= 1
    return out


# ----------------------------------------------------------------------------------------------------------
# linear ops as explicit contribution tensors


@functools.cache
def conv_index(in_chw, w_shape, stride, padding, dilation, groups):
    """Dense-matrix index of conv2d: rows (input pixel), cols (output pixel) and the kernel entry between them."""
    C, H, W = in_chw
    O, Cg, KH, KW = w_shape
    assert Cg * groups == C and O % groups == 0
    Ho = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    rows, cols, widx = [], [], []
    per_group = O // groups
    for o in range(O):
        grp = o // per_group
        for ho in range(Ho):
            for wo in range(Wo):
                for cl in range(Cg):
                    for kh in range(KH):
                        for kw in range(KW):
                            hi = ho * stride[0] - padding[0] + kh * dilation[0]
                            wi = wo * stride[1] - padding[1] + kw * dilation[1]
                            if 0 <= hi < H and 0 <= wi < W:
                                ci = grp * Cg + cl
                                rows.append((ci * H + hi) * W + wi)
                                cols.append((o * Ho + ho) * Wo + wo)
                                widx.append((o, cl, kh, kw))
    # every (input, output) pair is reached by at most one kernel entry, so an element-wise transform of the
    # kernel (clamp, square, w + gamma w+) is the same element-wise transform of the dense matrix
    assert len(set(zip(rows, cols))) == len(rows)
    w_idx = tuple(torch.tensor(k) for k in zip(*widx))
    return torch.tensor(rows), torch.tensor(cols), w_idx, (C * H * W, O * Ho * Wo), (Ho, Wo)


def conv_dense(wt, index) -> torch.Tensor:
    rows, cols, w_idx, size, _ = index
    m = torch.zeros(size, dtype=wt.dtype)
    m[rows, cols] = wt[w_idx]
    return m


@dataclass
class LinCase:
    x: torch.Tensor
    w: torch.Tensor
    fn: Callable  # fn(x, w), linear in x
    transpose: Callable  # direct J_x^T s, as the engine's LinearMaps provide it
    contrib: Callable  # (xt, wt) -> c[*batch, I, J]

    def op(self, kind: str):
        if kind == "plain":
            return self.fn
        if kind == "lmap_autograd":
            return r.LinearMap(self.fn)
        return r.LinearMap(self.fn, self.transpose)


CONV_SPECS = {
    # name: (N, C, H, W, O, (KH, KW), stride, padding, dilation, groups)
    "conv_strided_grouped": (2, 4, 7, 6, 6, (3, 2), (2, 1), (1, 0), (1, 2), 2),
    "conv_same": (1, 3, 5, 5, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "conv_depthwise": (2, 3, 6, 5, 3, (2, 2), (1, 2), (0, 1), (2, 1), 3),
}
LINEAR_CASES = ["mm", "mm_noncontig", "linear", "bmm", "matmul_shared", *CONV_SPECS, "conv_transpose"]


def make_linear_case(name: str, seed: int) -> LinCase:
    g = gen(seed)
    mT = lambda s, x, w: s @ w.mT  # noqa: E731
    if name == "mm":
        x, w = randn(g, 3, 5), randn(g, 5, 4)
        return LinCase(x, w, torch.mm, mT, lambda xt, wt: xt[:, :, None] * wt[None, :, :])
    if name == "mm_noncontig":
        x, w = randn(g, 5, 3).T, randn(g, 4, 5).T  # transposed views
        return LinCase(x, w, torch.mm, mT, lambda xt, wt: xt[:, :, None] * wt[None, :, :])
    if name == "linear":  # w is (out, in)
        x, w = randn(g, 3, 5), randn(g, 4, 5)
        return LinCase(x, w, lambda x_, w_: F.linear(x_, w_), lambda s, x_, w_: s @ w_,
                       lambda xt, wt: xt[:, :, None] * wt.T[None, :, :])
    if name == "bmm":
        x, w = randn(g, 2, 3, 5), noncontig(randn(g, 2, 5, 4))
        return LinCase(x, w, torch.bmm, mT, lambda xt, wt: xt[:, :, :, None] * wt[:, None, :, :])
    if name == "matmul_shared":  # a batch of inputs against one weight
        x, w = noncontig(randn(g, 2, 3, 5)), randn(g, 5, 4)
        return LinCase(x, w, torch.matmul, mT, lambda xt, wt: xt[..., None] * wt)
    if name == "conv_transpose":
        # conv_transpose2d is the adjoint of conv2d with the same weight, so its dense matrix is the transpose
        N, Cin, H, W, Cout, groups = 2, 4, 3, 4, 6, 2
        k, stride, padding, out_pad, dil = (3, 2), (2, 1), (1, 0), (1, 0), (1, 2)
        x, w = randn(g, N, Cin, H, W), randn(g, Cin, Cout // groups, *k)
        fn = lambda x_, w_: F.conv_transpose2d(x_, w_, None, stride, padding, out_pad, groups, dil)  # noqa: E731
        Ho, Wo = fn(x, w).shape[-2:]
        index = conv_index((Cout, Ho, Wo), tuple(w.shape), stride, padding, dil, groups)
        assert index[4] == (H, W)
        args = (None, stride, padding, dil, True, out_pad, groups)
        return LinCase(
            x, w, fn,
            lambda s, x_, w_: torch.ops.aten.convolution_backward(s, x_, w_, *args, [True, False, False])[0],
            lambda xt, wt: xt.reshape(N, -1)[:, :, None] * conv_dense(wt, index).T[None])
    N, C, H, W, O, k, stride, padding, dil, groups = CONV_SPECS[name]
    x, w = randn(g, N, C, H, W), randn(g, O, C // groups, *k)
    if name == "conv_same":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous input
    index = conv_index((C, H, W), tuple(w.shape), stride, padding, dil, groups)
    fn = lambda x_, w_: F.conv2d(x_, w_, None, stride, padding, dil, groups)  # noqa: E731
    args = (None, stride, padding, dil, False, (0, 0), groups)
    return LinCase(
        x, w, fn,
        lambda s, x_, w_: torch.ops.aten.convolution_backward(s, x_, w_, *args, [True, False, False])[0],
        lambda xt, wt: xt.reshape(N, -1)[:, :, None] * conv_dense(wt, index)[None])


def spread(c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """R_i = sum_j c_ij s_j, for c[*batch, I, J] and s[*batch, J]."""
    return torch.einsum("...ij,...j->...i", c, s)


def flat_out(c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t.reshape(*c.shape[:-2], c.shape[-1])


def ref_linear(rule, case: LinCase, x, w, R) -> torch.Tensor:
    """The rule's equation on explicit contribution tensors."""
    C = case.contrib
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)

    def eps_rule(c):
        return spread(c, flat_out(c, R) / stab(c.sum(-2), rule.eps))

    if isinstance(rule, r.Epsilon):
        out = eps_rule(C(x, w))
    elif isinstance(rule, r.ZPlus):
        out = eps_rule(C(xp, wp) + C(xn, wn))
    elif isinstance(rule, r.Gamma):
        w_up, w_down = w + rule.gamma * wp, w + rule.gamma * wn
        c_up = C(xp, w_up) + C(xn, w_down)  # contributions raising z_j
        c_down = C(xp, w_down) + C(xn, w_up)  # contributions lowering z_j
        z = C(x, w).sum(-2)
        Rf = flat_out(z[..., None, :], R)
        zero = torch.zeros_like(Rf)
        s_up = torch.where(z > 0, Rf / stab(c_up.sum(-2), rule.eps), zero)
        s_down = torch.where(z < 0, Rf / stab(c_down.sum(-2), rule.eps), zero)
        out = spread(c_up, s_up) + spread(c_down, s_down)
    elif isinstance(rule, r.AlphaBeta):
        out = rule.alpha * eps_rule(C(xp, wp) + C(xn, wn)) - rule.beta * eps_rule(C(xp, wn) + C(xn, wp))
    elif isinstance(rule, r.Flat):
        out = eps_rule(C(torch.ones_like(x), torch.ones_like(w)))
    elif isinstance(rule, r.WSquare):
        out = eps_rule(C(torch.ones_like(x), w * w))
    elif isinstance(rule, r.ZBox):
        low = torch.as_tensor(rule.low, dtype=DT).expand_as(x)
        high = torch.as_tensor(rule.high, dtype=DT).expand_as(x)
        out = eps_rule(C(x, w) - C(low, wp) - C(high, wn))
    else:
        raise AssertionError(rule)
    return out.reshape(x.shape)


def make_rule(name: str, x: torch.Tensor, g: torch.Generator):
    if name == "zbox_tensor":  # per-element bounds broadcastable to x (not to the batch dim)
        shape = x.shape[1:]
        return r.ZBox(-(0.5 + rand(g, *shape)), 0.5 + rand(g, *shape), EPS)
    return {
        "epsilon": r.Epsilon(EPS),
        "epsilon_big": r.Epsilon(BIG_EPS),
        "zplus": r.ZPlus(EPS),
        "gamma": r.Gamma(0.25, EPS),
        "gamma_big": r.Gamma(2.0, BIG_EPS),
        "alphabeta": r.AlphaBeta(2.0, 1.0, EPS),
        "alphabeta_b": r.AlphaBeta(1.5, 0.5, BIG_EPS),
        "flat": r.Flat(EPS),
        "flat_big": r.Flat(BIG_EPS),
        "wsquare": r.WSquare(EPS),
        "wsquare_big": r.WSquare(BIG_EPS),
        "zbox_scalar": r.ZBox(-2.0, 3.0, EPS),
    }[name]


LINEAR_RULES = ["epsilon", "epsilon_big", "zplus", "gamma", "gamma_big", "alphabeta", "alphabeta_b", "flat",
                "flat_big", "wsquare", "wsquare_big", "zbox_scalar", "zbox_tensor"]
OP_KINDS = ["plain", "lmap_autograd", "lmap_direct"]


# ----------------------------------------------------------------------------------------------------------
# stabilize, safe_divide, LinearMap, and the reference machinery itself


def test_stabilize_sign_convention():
    z = torch.tensor([2.0, -3.0, 0.0, -0.0, 1e-300, -1e-300], dtype=DT)
    eps = 0.5
    expected = torch.tensor([2.5, -3.5, 0.5, 0.5, 0.5, -0.5], dtype=DT)
    out = r.stabilize(z, eps)
    assert out.dtype == DT and out.shape == z.shape
    assert_close(out, expected, **EXACT)
    assert_close(r.stabilize(z, EPS), stab(z, EPS), **EXACT)
    z32 = z.float()
    assert r.stabilize(z32, 0.5).dtype == torch.float32


@pytest.mark.parametrize("eps", [0.1, 1e-6, 1e-50])
def test_stabilize_eps_is_not_rounded_to_float32(eps):
    z = torch.tensor([0.0, -1.0], dtype=DT)
    assert_close(r.stabilize(z, eps), torch.tensor([eps, -1.0 - eps], dtype=DT), rtol=1e-12, atol=0.0)


def test_epsilon_linear_float64_eps_is_exact():
    x = torch.tensor([[0.3, -0.25]], dtype=DT)
    w = torch.tensor([[1.0], [1.0]], dtype=DT)  # z = 0.05
    R = torch.ones(1, 1, dtype=DT)
    expected = x * 1.0 / (0.05 + 0.1)
    assert_close(r.Epsilon(0.1).linear(x, w, R, torch.mm), expected, **TOL)


def test_safe_divide():
    num = torch.tensor([1.0, 2.0, -3.0, 4.0], dtype=DT)
    den = torch.tensor([2.0, 0.0, 4.0, -0.0], dtype=DT)
    assert_close(r.safe_divide(num, den), torch.tensor([0.5, 0.0, -0.75, 0.0], dtype=DT), **EXACT)


@pytest.mark.parametrize("name", LINEAR_CASES)
def test_reference_contributions_reproduce_the_op(name):
    """The explicit contribution tensors used below sum to the op's output (checks the test machinery)."""
    case = make_linear_case(name, 0)
    z = case.fn(case.x, case.w)
    c = case.contrib(case.x, case.w)
    assert_close(c.sum(-2).reshape(z.shape), z, **TOL)
    # and the direct transposes agree with autograd
    s = randn(gen(1), *z.shape)
    assert_close(r.LinearMap(case.fn, case.transpose).transpose(s, case.x, case.w),
                 r.LinearMap(case.fn).transpose(s, case.x, case.w), **TOL)
    assert_close(spread(c, flat_out(c, s)).reshape(case.x.shape),
                 case.x * r.LinearMap(case.fn).transpose(s, case.x, case.w), **TOL)


def test_linear_map_call_and_transpose():
    g = gen(3)
    x, w, s = randn(g, 3, 4), randn(g, 4, 5), randn(g, 3, 5)
    calls = []

    def tr(s_, x_, w_):
        calls.append(1)
        return s_ @ w_.T

    lm = r.LinearMap(torch.mm, tr)
    assert_close(lm(x, w), x @ w, **EXACT)
    assert_close(lm.transpose(s, x, w), s @ w.T, **EXACT)
    assert calls == [1]
    assert_close(r.LinearMap(torch.mm).transpose(s, x, w), s @ w.T, **TOL)
    # rules use the direct transpose when it is given
    calls.clear()
    r.Epsilon(EPS).linear(x, w, s, lm)
    assert calls == [1]


# ----------------------------------------------------------------------------------------------------------
# linear rules against their equations


@pytest.mark.parametrize("kind", OP_KINDS)
@pytest.mark.parametrize("name", LINEAR_CASES)
@pytest.mark.parametrize("rule_name", LINEAR_RULES)
def test_linear_rule_matches_equation(rule_name, name, kind):
    seed = LINEAR_RULES.index(rule_name) * 31 + LINEAR_CASES.index(name)
    case = make_linear_case(name, seed)
    g = gen(seed + 1000)
    rule = make_rule(rule_name, case.x, g)
    R = randn(g, *case.fn(case.x, case.w).shape)
    out = rule.linear(case.x, case.w, R, case.op(kind))
    assert out.shape == case.x.shape and out.dtype == DT
    assert_close(out, ref_linear(rule, case, case.x, case.w, R), **TOL)


@pytest.mark.parametrize("name", ["mm", "conv_strided_grouped", "bmm"])
@pytest.mark.parametrize("rule_name", ["epsilon", "gamma", "zbox_scalar"])
def test_linear_rule_with_known_z(rule_name, name):
    """Passing ``z = fn(x, w)`` gives the same relevance as letting the rule recompute it."""
    case = make_linear_case(name, 5)
    g = gen(6)
    rule = make_rule(rule_name, case.x, g)
    z = case.fn(case.x, case.w)
    R = randn(g, *z.shape)
    assert_close(rule.linear(case.x, case.w, R, case.fn, z=z.clone()), rule.linear(case.x, case.w, R, case.fn),
                 **TOL)


@pytest.mark.parametrize("name", ["mm", "conv_strided_grouped", "bmm"])
@pytest.mark.parametrize("rule_name", ["zplus", "gamma", "gamma_big", "alphabeta", "alphabeta_b"])
@pytest.mark.parametrize("given_z", [False, True])
def test_sign_split_rules_on_non_negative_input(rule_name, name, given_z):
    """After a ReLU (x >= 0) the rules skip the x⁻ half (γ also rewrites its products): still the equation."""
    case = make_linear_case(name, 11)
    g = gen(12)
    rule = make_rule(rule_name, case.x, g)
    x = case.x.abs() * (rand(g, *case.x.shape) > 0.3)  # non-negative, with exact zeros as after a ReLU
    z = case.fn(x, case.w)
    R = randn(g, *z.shape)
    out = rule.linear(x, case.w, R, case.op("lmap_direct"), z=z.clone() if given_z else None)
    assert_close(out, ref_linear(rule, case, x, case.w, R), **TOL)


def test_gamma_on_non_negative_input_with_bias_matches_the_general_path():
    """The x >= 0 rewrite of γ against the general four-product path (forced with an all-but-one x >= 0)."""
    g = gen(13)
    x, w, b, R = rand(g, 3, 5), randn(g, 5, 4), randn(g, 4), randn(g, 3, 4)
    rule = r.Gamma(0.7, EPS)
    fast = rule.linear(x, w, R, torch.mm, z=x @ w, b=b)
    general = rule.linear(x - 0.0, w, R, torch.mm, b=b)  # same input; compare with a hand-made general call
    xp, wp, wn = x, w + 0.7 * w.clamp(min=0), w + 0.7 * w.clamp(max=0)
    z = x @ w + b
    zp, zn = xp @ wp + b + 0.7 * b.clamp(min=0), xp @ wn + b + 0.7 * b.clamp(max=0)
    sp, sn = R * (z > 0) / stab(zp, EPS), R * (z < 0) / stab(zn, EPS)
    expected = xp * (sp @ wp.T) + xp * (sn @ wn.T)
    assert_close(fast, expected, **TOL)
    assert_close(general, expected, **TOL)


def test_epsilon_linear_uses_given_z_as_denominator():
    """R_i = sum_j x_i w_ij R_j / stab(z_j) with the z that is passed (e.g. one that includes a bias)."""
    g = gen(7)
    x, w, b, R = randn(g, 3, 5), randn(g, 5, 4), randn(g, 4), randn(g, 3, 4)
    z = x @ w + b
    expected = torch.zeros_like(x)
    for n in range(3):
        for i in range(5):
            for j in range(4):
                expected[n, i] += x[n, i] * w[i, j] / stab(z[n, j], BIG_EPS) * R[n, j]
    assert_close(r.Epsilon(BIG_EPS).linear(x, w, R, torch.mm, z=z), expected, **TOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_epsilon_dense_explicit_loops(seed):
    """The epsilon rule against a plain triple loop (no einsum), with and without eps."""
    g = gen(seed)
    x, w, R = randn(g, 2, 4), randn(g, 4, 3), randn(g, 2, 3)
    for eps in (EPS, BIG_EPS):
        expected = torch.zeros_like(x)
        for n in range(2):
            for j in range(3):
                z = sum(x[n, i] * w[i, j] for i in range(4))
                den = z + eps if z >= 0 else z - eps
                for i in range(4):
                    expected[n, i] += x[n, i] * w[i, j] / den * R[n, j]
        assert_close(r.Epsilon(eps).linear(x, w, R, torch.mm), expected, **TOL)


@pytest.mark.parametrize("name", ["conv_strided_grouped", "conv_same", "conv_depthwise"])
@pytest.mark.parametrize("rule_name", ["epsilon_big", "zplus", "gamma"])
def test_conv_rules_against_unfold(rule_name, name):
    """conv2d relevance from an unfold-built contribution tensor c[n, o, l, p] = x_unf[n, g, p, l] w[o, p]."""
    N, C, H, W, O, k, stride, padding, dil, groups = CONV_SPECS[name]
    case = make_linear_case(name, 11)
    x, w = case.x, case.w
    g = gen(12)
    rule = make_rule(rule_name, x, g)
    z = case.fn(x, w)
    R = randn(g, *z.shape)
    Ho, Wo = z.shape[-2:]
    og = O // groups

    def contrib(xt, wt):
        xu = F.unfold(xt, k, dilation=dil, padding=padding, stride=stride)  # (N, C*KH*KW, L)
        xu = xu.reshape(N, groups, -1, Ho * Wo)  # (N, G, Cg*KH*KW, L)
        wf = wt.reshape(groups, og, -1)  # (G, og, Cg*KH*KW)
        return torch.einsum("ngpl,gop->ngolp", xu, wf)  # (N, G, og, L, P)

    def back(c, s):  # s: (N, O, L) -> R_x via fold (adds up the overlapping patches)
        ru = torch.einsum("ngolp,ngol->ngpl", c, s.reshape(N, groups, og, Ho * Wo))
        return F.fold(ru.reshape(N, -1, Ho * Wo), (H, W), k, dilation=dil, padding=padding, stride=stride)

    def den(c):
        return c.sum(-1).reshape(N, O, Ho * Wo)

    Rf = R.reshape(N, O, -1)
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
    if rule_name == "epsilon_big":
        c = contrib(x, w)
        assert_close(den(c).reshape(z.shape), z, **TOL)
        expected = back(c, Rf / stab(den(c), rule.eps))
    elif rule_name == "zplus":
        c = contrib(xp, wp) + contrib(xn, wn)
        expected = back(c, Rf / stab(den(c), rule.eps))
    else:
        w_up, w_down = w + rule.gamma * wp, w + rule.gamma * wn
        c_up, c_down = contrib(xp, w_up) + contrib(xn, w_down), contrib(xp, w_down) + contrib(xn, w_up)
        zf = z.reshape(N, O, -1)
        expected = (back(c_up, torch.where(zf > 0, Rf / stab(den(c_up), rule.eps), 0.0))
                    + back(c_down, torch.where(zf < 0, Rf / stab(den(c_down), rule.eps), 0.0)))
    for kind in OP_KINDS:
        assert_close(rule.linear(x, w, R, case.op(kind)), expected, **TOL)


def test_gamma_zero_output_gets_nothing():
    x = torch.tensor([[1.0, 1.0, 2.0]], dtype=DT)
    w = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [0.0, -0.25]], dtype=DT)  # z = [0, 1]
    R = torch.tensor([[5.0, 0.0]], dtype=DT)
    out = r.Gamma(0.5, EPS).linear(x, w, R, torch.mm)
    assert_close(out, torch.zeros_like(x), **EXACT)
    # relevance at the non-zero output still flows
    R2 = torch.tensor([[5.0, 2.0]], dtype=DT)
    out2 = r.Gamma(0.5, EPS).linear(x, w, R2, torch.mm)
    # z_1 = 1 > 0: c_up = x+ (w + 0.5 w+) + x- (w + 0.5 w-) = [1.5, 0.75, -0.5], sum 1.75
    expected = torch.tensor([[1.5, 0.75, -0.5]], dtype=DT) / (1.75 + EPS) * 2.0
    assert_close(out2, expected, **TOL)


@pytest.mark.parametrize("name", ["mm", "conv_strided_grouped", "matmul_shared"])
def test_gamma_zero_is_epsilon_and_alphabeta_1_0_is_zplus(name):
    case = make_linear_case(name, 21)
    R = randn(gen(22), *case.fn(case.x, case.w).shape)
    x, w, fn = case.x, case.w, case.fn
    assert_close(r.Gamma(0.0, EPS).linear(x, w, R, fn), r.Epsilon(EPS).linear(x, w, R, fn), **TOL)
    assert_close(r.AlphaBeta(1.0, 0.0, EPS).linear(x, w, R, fn), r.ZPlus(EPS).linear(x, w, R, fn), **TOL)


@pytest.mark.parametrize("kind", OP_KINDS)
@pytest.mark.parametrize("name", ["mm", "mm_noncontig", "conv_strided_grouped", "conv_transpose"])
def test_epsilon_weight_relevance(name, kind):
    """Relevance of the weight (roles swapped): R_w = sum over all connections through w of x w R / stab(z)."""
    case = make_linear_case(name, 31)
    x, w = case.x, case.w
    z = case.fn(x, w)
    R = randn(gen(32), *z.shape)
    c = case.contrib(x, w)
    rc = c * flat_out(c, R / stab(z, BIG_EPS))[..., None, :]  # (N, I, J): relevance per connection, per sample
    if name.startswith("mm"):
        expected = rc.sum(0)
        tr = lambda s, w_, x_: x_.mT @ s  # noqa: E731
    else:
        rows, cols, w_idx, _, _ = _conv_index_of(name, x, w, z)
        per_conn = rc.sum(0)  # (input pixel, output pixel) of the op
        if name == "conv_transpose":  # the index is that of the adjoint conv2d: (op output, op input)
            per_conn = per_conn.T
        expected = torch.zeros_like(w).index_put_(w_idx, per_conn[rows, cols], accumulate=True)
        stride, padding, dil, groups, transposed, out_pad = _conv_args(name)
        args = (None, stride, padding, dil, transposed, out_pad, groups)
        tr = lambda s, w_, x_: torch.ops.aten.convolution_backward(  # noqa: E731
            s, x_, w_, *args, [False, True, False])[1]
    fn_w = lambda w_, x_: case.fn(x_, w_)  # noqa: E731
    op = {"plain": fn_w, "lmap_autograd": r.LinearMap(fn_w), "lmap_direct": r.LinearMap(fn_w, tr)}[kind]
    out = r.Epsilon(BIG_EPS).linear(w, x, R, op)
    assert out.shape == w.shape
    assert_close(out, expected, **TOL)


def _conv_args(name):
    if name == "conv_transpose":
        return (2, 1), (1, 0), (1, 2), 2, True, (1, 0)
    _, _, _, _, _, _, stride, padding, dil, groups = CONV_SPECS[name]
    return stride, padding, dil, groups, False, (0, 0)


def _conv_index_of(name, x, w, z):
    stride, padding, dil, groups, transposed, _ = _conv_args(name)
    if transposed:
        return conv_index(tuple(z.shape[1:]), tuple(w.shape), stride, padding, dil, groups)
    return conv_index(tuple(x.shape[1:]), tuple(w.shape), stride, padding, dil, groups)


# ----------------------------------------------------------------------------------------------------------
# conservation and positivity of linear rules


def _conservation_setup(name, seed, bounded=False, mask_pn=True):
    case = make_linear_case(name, seed)
    g = gen(seed + 500)
    if bounded:  # ZBox needs low <= x <= high
        case.x = case.x.clamp(-1.5, 2.5)
    z = case.fn(case.x, case.w)
    R = 0.1 + rand(g, *z.shape)  # positive: a relative tolerance on sum(R) is meaningful
    # outputs without any positive (or without any negative) contribution have a zero z+ (z-) denominator,
    # where the z+ and alpha-beta rules cannot conserve: give them no relevance
    xp, xn, wp, wn = case.x.clamp(min=0), case.x.clamp(max=0), case.w.clamp(min=0), case.w.clamp(max=0)
    zpos = (case.contrib(xp, wp) + case.contrib(xn, wn)).sum(-2).reshape(z.shape)
    zneg = (case.contrib(xp, wn) + case.contrib(xn, wp)).sum(-2).reshape(z.shape)
    if mask_pn:
        R = torch.where((zpos > 0) & (zneg < 0), R, torch.zeros_like(R))
        assert (R > 0).to(DT).mean() > 0.5
    return case, z, R


@pytest.mark.parametrize("name", LINEAR_CASES)
@pytest.mark.parametrize(
    "rule",
    [r.ZPlus(1e-12), r.Flat(1e-12), r.WSquare(1e-12), r.AlphaBeta(2.0, 1.0, 1e-12), r.AlphaBeta(3.0, 2.0, 1e-12),
     r.Gamma(0.25, 1e-12), r.Gamma(4.0, 1e-12), r.ZBox(-1.5, 2.5, 1e-12)],
    ids=["zplus", "flat", "wsquare", "ab21", "ab32", "gamma", "gamma4", "zbox"],
)
def test_linear_rule_conservation(rule, name):
    case, z, R = _conservation_setup(name, 41, bounded=isinstance(rule, r.ZBox))
    out = rule.linear(case.x, case.w, R, case.fn)
    assert torch.isfinite(out).all()
    assert_close(out.sum(), R.sum(), rtol=1e-8, atol=0.0)
    # per sample too (the leading dim is a batch dim in every case)
    assert_close(out.reshape(out.shape[0], -1).sum(1), R.reshape(R.shape[0], -1).sum(1), rtol=1e-8, atol=0.0)


@pytest.mark.parametrize("name", LINEAR_CASES)
def test_epsilon_conservation_bias_free(name):
    case, z, R = _conservation_setup(name, 43, mask_pn=False)
    R = torch.where(z.abs() > 1e-3, R, torch.zeros_like(R))  # no relevance on near-zero outputs
    assert (R > 0).float().mean() > 0.9
    out = r.Epsilon(1e-12).linear(case.x, case.w, R, case.fn)
    assert_close(out.sum(), R.sum(), rtol=1e-8, atol=0.0)


@pytest.mark.parametrize("name", ["mm", "conv_strided_grouped", "conv_transpose", "bmm"])
@pytest.mark.parametrize(
    "rule", [r.ZPlus(EPS), r.Flat(EPS), r.WSquare(EPS), r.AlphaBeta(1.0, 0.0, EPS), r.ZBox(-1.5, 2.5, EPS)],
    ids=["zplus", "flat", "wsquare", "ab10", "zbox"],
)
def test_linear_rule_positivity(rule, name):
    """Rules with non-negative contributions keep non-negative relevance non-negative."""
    case, z, R = _conservation_setup(name, 47, bounded=True)
    out = rule.linear(case.x, case.w, R, case.fn)
    assert (out >= 0).all()
    assert (out > 0).any()


# ----------------------------------------------------------------------------------------------------------
# sums of terms


def _add(*ts):
    out = ts[0]
    for t in ts[1:]:
        out = out + t
    return out


ADD_SHAPES = [((2, 3, 4), (3, 1)), ((5,), (2, 5)), ((2, 1, 3), (1, 4, 1), (4, 3)), ((3, 4), (3, 4))]


def _terms(shapes, seed, nc=False):
    g = gen(seed)
    ts = [randn(g, *s) for s in shapes]
    return [noncontig(t) for t in ts] if nc else ts


@pytest.mark.parametrize("nc", [False, True])
@pytest.mark.parametrize("shapes", ADD_SHAPES, ids=str)
@pytest.mark.parametrize("eps", [EPS, BIG_EPS])
def test_epsilon_sum_broadcast_add(shapes, nc, eps):
    terms = _terms(shapes, len(shapes) + 3 * nc, nc)
    full = torch.broadcast_shapes(*shapes)
    R = randn(gen(9), *full)
    expanded = [t.expand(full) for t in terms]
    z = sum(expanded)
    expected = [reduce_to(te * R / stab(z, eps), t.shape) for te, t in zip(expanded, terms)]
    out = r.Epsilon(eps).sum(terms, R, _add)
    assert len(out) == len(terms)
    for o, e, t in zip(out, expected, terms):
        assert o.shape == t.shape
        assert_close(o, e, **TOL)


@pytest.mark.parametrize("shapes", ADD_SHAPES, ids=str)
def test_proportional_and_uniform_sum_broadcast_add(shapes):
    terms = _terms(shapes, 17)
    full = torch.broadcast_shapes(*shapes)
    R = randn(gen(18), *full)
    expanded = [t.expand(full) for t in terms]
    total_abs = sum(te.abs() for te in expanded)
    prop = r.Proportional(1e-11).sum(terms, R, _add)
    uni = r.Uniform().sum(terms, R, _add)
    K = len(terms)
    for p, u, te, t in zip(prop, uni, expanded, terms):
        assert_close(p, reduce_to(te.abs() / (total_abs + 1e-11) * R, t.shape), **TOL)
        assert_close(u, reduce_to(R.expand(full) / K, t.shape), **TOL)
    # conservation
    assert_close(sum(p.sum() for p in prop), R.sum(), rtol=1e-8, atol=1e-12)
    assert_close(sum(u.sum() for u in uni), R.sum(), **TOL)


def _triu_ones(n):
    """T[i, j] = 1 where output j of a cumsum contains input i (j >= i)."""
    t = torch.zeros(n, n, dtype=DT)
    for i in range(n):
        for j in range(i, n):
            t[i, j] = 1.0
    return t


REDUCTIONS = ["sum_dim1", "sum_all", "mean_dim0", "cumsum_last", "avgpool2"]


def _reduction(kind):
    return {
        "sum_dim1": lambda x: x.sum(1),
        "sum_all": lambda x: x.sum(),
        "mean_dim0": lambda x: x.mean(0),
        "cumsum_last": lambda x: x.cumsum(-1),
        "avgpool2": lambda x: F.avg_pool2d(x, 2),
    }[kind]


def _reduction_weights(kind, shape):
    """Explicit coefficient tensor a[x-index..., z-index...] with z = sum a * x."""
    x_n = torch.Size(shape).numel()
    z_shape = _reduction(kind)(torch.zeros(shape, dtype=DT)).shape
    a = torch.zeros(x_n, max(z_shape.numel(), 1), dtype=DT)
    idx = torch.arange(x_n).reshape(shape)
    zi = torch.arange(max(z_shape.numel(), 1)).reshape(z_shape)
    if kind == "sum_dim1":
        for p in range(shape[0]):
            for q in range(shape[1]):
                for k in range(shape[2]):
                    a[idx[p, q, k], zi[p, k]] = 1.0
    elif kind == "sum_all":
        a[:, 0] = 1.0
    elif kind == "mean_dim0":
        for p in range(shape[0]):
            for q in range(shape[1]):
                for k in range(shape[2]):
                    a[idx[p, q, k], zi[q, k]] = 1.0 / shape[0]
    elif kind == "cumsum_last":
        T = _triu_ones(shape[-1])
        for p in range(shape[0]):
            for q in range(shape[1]):
                for i in range(shape[2]):
                    for j in range(shape[2]):
                        a[idx[p, q, i], zi[p, q, j]] = T[i, j]
    else:  # avg_pool2d, kernel 2, stride 2, on (N, C, H, W)
        for n in range(shape[0]):
            for c in range(shape[1]):
                for h in range(shape[2] // 2 * 2):
                    for w in range(shape[3] // 2 * 2):
                        a[idx[n, c, h, w], zi[n, c, h // 2, w // 2]] = 0.25
    return a, z_shape


@pytest.mark.parametrize("nc", [False, True])
@pytest.mark.parametrize("kind", REDUCTIONS)
def test_sum_rules_on_reductions(kind, nc):
    shape = (2, 3, 5, 4) if kind == "avgpool2" else (3, 4, 5)
    g = gen(REDUCTIONS.index(kind))
    x = randn(g, *shape)
    if nc:
        x = noncontig(x)
    combine = _reduction(kind)
    a, z_shape = _reduction_weights(kind, shape)
    xf = x.reshape(-1)
    c = xf[:, None] * a  # c[i, j] = a_ij x_i
    z = c.sum(0)
    assert_close(z.reshape(z_shape), combine(x), **TOL)
    R = randn(g, *z_shape)
    Rf = R.reshape(-1)
    # epsilon: R_i = sum_j a_ij x_i R_j / stab(z_j)
    (eps_out,) = r.Epsilon(BIG_EPS).sum([x], R, combine)
    assert_close(eps_out, (c * (Rf / stab(z, BIG_EPS))).sum(1).reshape(shape), **TOL)
    # proportional: R_i = sum_j a_ij |x_i| R_j / (sum_i' a_i'j |x_i'| + eps)
    ca = xf.abs()[:, None] * a
    (prop_out,) = r.Proportional(1e-11).sum([x], R, combine)
    assert_close(prop_out, (ca * (Rf / (ca.sum(0) + 1e-11))).sum(1).reshape(shape), **TOL)
    # uniform: R_i = sum_j a_ij R_j / sum_i' a_i'j  (equal split over the connected inputs)
    (uni_out,) = r.Uniform().sum([x], R, combine)
    conn = (a != 0).to(DT)
    assert_close(uni_out, (conn * (Rf / conn.sum(0))).sum(1).reshape(shape), **TOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sum_rules_conservation(seed):
    g = gen(seed)
    a, b, c = randn(g, 2, 3, 4), randn(g, 3, 1), randn(g, 4)
    R = 0.1 + rand(g, 2, 3, 4)
    z = a + b + c
    R = torch.where(z.abs() > 1e-3, R, torch.zeros_like(R))
    for rule, rtol in ((r.Epsilon(1e-12), 1e-8), (r.Proportional(1e-11), 1e-8), (r.Uniform(), 1e-12)):
        out = rule.sum([a, b, c], R, _add)
        assert_close(sum(o.sum() for o in out), R.sum(), rtol=rtol, atol=0.0)
    x = randn(g, 4, 6)
    Rs = 0.1 + rand(g, 6)
    for rule in (r.Proportional(1e-11), r.Uniform()):
        (out,) = rule.sum([x], Rs, lambda t: t.mean(0))
        assert_close(out.sum(0), Rs, rtol=1e-8, atol=0.0)  # per output


# ----------------------------------------------------------------------------------------------------------
# products of two activations


MUL_SHAPES = [((2, 3), (2, 3)), ((3, 1), (2, 3, 4)), ((4,), (3, 4)), ((2, 1, 4), (3, 1))]


@pytest.mark.parametrize("nc", [False, True])
@pytest.mark.parametrize("shapes", MUL_SHAPES, ids=str)
def test_product_rules_elementwise(shapes, nc):
    g = gen(MUL_SHAPES.index(shapes))
    a, b = randn(g, *shapes[0]), randn(g, *shapes[1])
    if nc:
        a, b = noncontig(a), noncontig(b)
    full = torch.broadcast_shapes(a.shape, b.shape)
    R = randn(g, *full)
    ae, be = a.expand(full), b.expand(full)

    ua, ub = r.Uniform().product(a, b, R, torch.mul)
    assert ua.shape == a.shape and ub.shape == b.shape
    assert_close(ua, reduce_to(R / 2, a.shape), **TOL)
    assert_close(ub, reduce_to(R / 2, b.shape), **TOL)

    pa, pb = r.Proportional(1e-11).product(a, b, R, torch.mul)
    den = ae.abs() + be.abs() + 1e-11
    assert_close(pa, reduce_to(ae.abs() / den * R, a.shape), **TOL)
    assert_close(pb, reduce_to(be.abs() / den * R, b.shape), **TOL)
    assert_close(pa.sum() + pb.sum(), R.sum(), rtol=1e-9, atol=1e-12)

    ca, cb = r.Constant().product(a, b, R, torch.mul)
    assert ca.shape == a.shape and cb.shape == b.shape
    assert_close(ca, torch.zeros_like(a), **EXACT)
    assert_close(cb, reduce_to(R, b.shape), **TOL)


def test_uniform_mul_is_exactly_half():
    g = gen(5)
    a, b, R = randn(g, 3, 4), randn(g, 3, 4), randn(g, 3, 4)
    ua, ub = r.Uniform().product(a, b, R, torch.mul)
    assert_close(ua, R * 0.5, **EXACT)
    assert_close(ub, R * 0.5, **EXACT)
    ca, cb = r.Constant().product(a, b, R, torch.mul)
    assert_close(cb, R, **EXACT)
    assert (ca == 0).all()


MATMUL_CASES = [
    ("mm", torch.mm, (3, 4), (4, 5)),
    ("matmul_shared", torch.matmul, (2, 3, 4), (4, 5)),
    ("bmm", torch.bmm, (2, 3, 4), (2, 4, 5)),
    ("matmul_broadcast", torch.matmul, (2, 1, 3, 4), (3, 4, 5)),
    ("matmul_batched", torch.matmul, (2, 3, 3, 4), (2, 3, 4, 5)),  # equal batch dims: direct transposes
]


def _matmul_inputs(name, shape_a, shape_b, nc, seed):
    g = gen(seed)
    a, b = randn(g, *shape_a), randn(g, *shape_b)
    if nc:  # transposed views
        a = a.mT.contiguous().mT
        b = noncontig(b)
    return a, b, g


def _matmul_contrib(a, b):
    """c[..., i, k, p] = a_ik b_kp over the broadcast batch dims."""
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    ae = a.expand(*batch, *a.shape[-2:])
    be = b.expand(*batch, *b.shape[-2:])
    return ae[..., :, :, None] * be[..., None, :, :]


@pytest.mark.parametrize("nc", [False, True])
@pytest.mark.parametrize("case", MATMUL_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("eps", [EPS, BIG_EPS])
def test_product_rules_matmul(case, nc, eps):
    name, fn, sa, sb = case
    a, b, g = _matmul_inputs(name, sa, sb, nc, MATMUL_CASES.index(case))
    c = _matmul_contrib(a, b)
    z = c.sum(-2)
    assert_close(z, fn(a, b), **TOL)
    R = randn(g, *z.shape)
    s = R / stab(z, eps)
    # R_A[ik] = sum_p c_ikp s_ip / 2 ; R_B[kp] = sum_i c_ikp s_ip / 2 (batch dims summed where broadcast)
    full_a = (c * s[..., :, None, :]).sum(-1)
    full_b = (c * s[..., :, None, :]).sum(-3)
    ua, ub = r.Uniform(eps).product(a, b, R, fn)
    assert ua.shape == a.shape and ub.shape == b.shape
    assert_close(ua, reduce_to(full_a / 2, a.shape), **TOL)
    assert_close(ub, reduce_to(full_b / 2, b.shape), **TOL)
    ca, cb = r.Constant(eps).product(a, b, R, fn)
    assert ca.shape == a.shape and cb.shape == b.shape
    assert_close(ca, torch.zeros_like(a), **EXACT)
    assert_close(cb, reduce_to(full_b, b.shape), **TOL)


@pytest.mark.parametrize("case", MATMUL_CASES, ids=lambda c: c[0])
def test_product_rules_matmul_conservation(case):
    name, fn, sa, sb = case
    a, b, g = _matmul_inputs(name, sa, sb, False, 60 + MATMUL_CASES.index(case))
    z = fn(a, b)
    R = torch.where(z.abs() > 1e-3, 0.1 + rand(g, *z.shape), torch.zeros_like(z))
    ua, ub = r.Uniform(1e-12).product(a, b, R, fn)
    assert_close(ua.sum() + ub.sum(), R.sum(), rtol=1e-8, atol=0.0)
    assert_close(ua.sum(), ub.sum(), rtol=1e-10, atol=0.0)  # each factor gets half
    ca, cb = r.Constant(1e-12).product(a, b, R, fn)
    assert_close(cb.sum(), R.sum(), rtol=1e-8, atol=0.0)
    assert ca.abs().sum() == 0


@pytest.mark.parametrize("case", MATMUL_CASES, ids=lambda c: c[0])
def test_proportional_matmul_falls_back_to_bilinear_split(case):
    """For a matmul, Proportional splits each output like Uniform: half of the bilinear epsilon rule per factor."""
    name, fn, sa, sb = case
    a, b, g = _matmul_inputs(name, sa, sb, True, 70 + MATMUL_CASES.index(case))
    z = fn(a, b)
    R = randn(g, *z.shape)
    pa, pb = r.Proportional().product(a, b, R, fn)
    c = _matmul_contrib(a, b)
    s = R / (2 * stab(z, 1e-11))  # the bilinear split with Proportional's own eps
    assert_close(pa, reduce_to((c * s[..., :, None, :]).sum(-1), a.shape), **TOL)
    assert_close(pb, reduce_to((c * s[..., :, None, :]).sum(-3), b.shape), **TOL)


def test_proportional_matmul_conservative_to_its_eps():
    g = gen(80)
    a, b = randn(g, 3, 4), randn(g, 4, 5)
    z = a @ b
    R = torch.where(z.abs() > 1e-2, 0.1 + rand(g, 3, 5), torch.zeros_like(z))
    pa, pb = r.Proportional(1e-11).product(a, b, R, torch.mm)
    assert_close(pa.sum() + pb.sum(), R.sum(), rtol=1e-8, atol=0.0)


# ----------------------------------------------------------------------------------------------------------
# softmax


SOFTMAX_CASES = [((2, 3, 5), -1), ((2, 3, 5), 1), ((4, 3), 0), ((6,), 0)]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape,dim", SOFTMAX_CASES, ids=str)
def test_attnlrp_softmax(shape, dim, masked):
    g = gen(len(shape) + dim)
    x = randn(g, *shape)
    if masked:
        mask = rand(g, *shape) < 0.3
        first = [slice(None)] * len(shape)
        first[dim] = 0
        mask[tuple(first)] = False  # keep one finite logit per softmax row
        first[dim] = -1
        mask[tuple(first)] = True  # and mask at least one
        x = x.masked_fill(mask, float("-inf"))
    s = torch.softmax(x, dim)
    R = randn(g, *shape)
    out = r.AttnLRPSoftmax().softmax(x, s, R, dim)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # explicit loop over the softmax rows: R_xi = x_i (R_i - s_i sum_j R_j), 0 for masked logits
    xm, sm, Rm = x.movedim(dim, -1), s.movedim(dim, -1), R.movedim(dim, -1)
    expected = torch.zeros_like(xm)
    n = xm.shape[-1]
    for row in itertools.product(*[range(k) for k in xm.shape[:-1]]):
        total = sum(Rm[row + (j,)] for j in range(n))
        for i in range(n):
            xi = xm[row + (i,)]
            if torch.isfinite(xi):
                expected[row + (i,)] = xi * (Rm[row + (i,)] - sm[row + (i,)] * total)
    assert_close(out, expected.movedim(-1, dim), **TOL)
    if masked:
        assert (out[torch.isinf(x)] == 0).all()
        assert torch.isinf(x).any()


def test_attnlrp_softmax_masked_with_zero_relevance_is_not_nan():
    x = torch.tensor([[0.5, float("-inf"), -1.0]], dtype=DT)
    s = torch.softmax(x, -1)
    R = torch.tensor([[0.0, 0.0, 2.0]], dtype=DT)
    out = r.AttnLRPSoftmax().softmax(x, s, R, -1)
    expected = torch.tensor([[0.5 * (0.0 - s[0, 0] * 2.0), 0.0, -1.0 * (2.0 - s[0, 2] * 2.0)]], dtype=DT)
    assert_close(out, expected, **TOL)


def test_pass_and_block():
    g = gen(90)
    x = randn(g, 2, 5)
    s, R = torch.softmax(x, -1), randn(g, 2, 5)
    assert_close(r.Pass().softmax(x, s, R, -1), R, **EXACT)
    assert_close(r.Pass().norm(R), R, **EXACT)
    blocked = r.Block().softmax(x, s, R, -1)
    assert blocked.shape == R.shape and blocked.dtype == R.dtype
    assert (blocked == 0).all()
    assert (r.Block().norm(R) == 0).all() and r.Block().norm(R).shape == R.shape


# ----------------------------------------------------------------------------------------------------------
# rules are pure functions: usable under no_grad (as the engine calls them), inputs untouched, no graph kept


@pytest.mark.parametrize("rule_name", LINEAR_RULES)
def test_linear_rules_under_no_grad_and_pure(rule_name):
    case = make_linear_case("conv_strided_grouped", 95)
    g = gen(96)
    rule = make_rule(rule_name, case.x, g)
    R = randn(g, *case.fn(case.x, case.w).shape)
    x0, w0, R0 = case.x.clone(), case.w.clone(), R.clone()
    expected = ref_linear(rule, case, case.x, case.w, R)
    with torch.no_grad():
        out = rule.linear(case.x, case.w, R, case.op("lmap_autograd"))
    assert not out.requires_grad
    assert_close(out, expected, **TOL)
    assert_close(case.x, x0, **EXACT)
    assert_close(case.w, w0, **EXACT)
    assert_close(R, R0, **EXACT)


def test_sum_and_product_rules_under_no_grad():
    g = gen(97)
    a, b, R = randn(g, 3, 4), randn(g, 4, 5), randn(g, 3, 5)
    with torch.no_grad():
        ua, ub = r.Uniform(EPS).product(a, b, R, torch.mm)
        ea, eb = r.Epsilon(EPS).sum([a, b[:3, :4]], R[:, :4], _add)
    assert not (ua.requires_grad or ub.requires_grad or ea.requires_grad or eb.requires_grad)
    z = a @ b
    s = R / stab(z, EPS)
    assert_close(ua, a * (s @ b.T) / 2, **TOL)
    assert_close(ub, b * (a.T @ s) / 2, **TOL)
    zs = a + b[:3, :4]
    assert_close(ea, a * R[:, :4] / stab(zs, EPS), **TOL)
    assert_close(eb, b[:3, :4] * R[:, :4] / stab(zs, EPS), **TOL)


def _storages(*ts) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in ts if isinstance(t, torch.Tensor)}


def _assert_own_memory(outs, inputs):
    """No output shares memory with an input. (Outputs may share memory with each other -- Uniform's sum hands the
    same R/n to every term -- since nothing writes into a relevance it receives; what an in-place write could
    corrupt shows as a difference from the allocating path.)"""
    assert not _storages(*outs) & _storages(*inputs)


@pytest.mark.parametrize("kind", OP_KINDS)
@pytest.mark.parametrize("name", ["mm", "bmm", "matmul_shared", "conv_strided_grouped", "conv_transpose"])
@pytest.mark.parametrize("rule_name", LINEAR_RULES)
def test_linear_rules_write_only_memory_they_computed(rule_name, name, kind):
    """Under no_grad (as the engine calls them) the rules write products and sums into tensors they computed
    themselves: bitwise the values they give under autograd (where they allocate), operands untouched, and an
    output that shares no memory with an operand."""
    case = make_linear_case(name, 300 + LINEAR_RULES.index(rule_name))
    g = gen(301)
    rule = make_rule(rule_name, case.x, g)
    R = randn(g, *case.fn(case.x, case.w).shape)
    x0, w0, R0 = case.x.clone(), case.w.clone(), R.clone()
    allocating = rule.linear(case.x, case.w, R, case.op(kind))
    with torch.no_grad():
        out = rule.linear(case.x, case.w, R, case.op(kind))
    assert_close(out, allocating, **EXACT)
    _assert_own_memory([out], [case.x, case.w, R])
    for t, t0 in ((case.x, x0), (case.w, w0), (R, R0)):
        assert_close(t, t0, **EXACT)


def _doubled(*ts):
    """A combine whose vector-Jacobian products are one tensor for every term (autograd hands the same ``2s`` to
    each): writing one term's product into it would corrupt the next."""
    return r.add_terms(*ts) * 2


@pytest.mark.parametrize("combine", [r.add_terms, _add, _doubled], ids=["add_terms", "autograd", "aliased vjps"])
@pytest.mark.parametrize("shapes", [*ADD_SHAPES, ((3, 4), ()), ((3, 4), (3, 4), ())], ids=str)
@pytest.mark.parametrize("rule", [r.Epsilon(EPS), r.Epsilon(BIG_EPS), r.Proportional(EPS), r.Uniform(EPS)],
                         ids=["epsilon", "epsilon_big", "proportional", "uniform"])
def test_sum_rules_write_only_memory_they_computed(rule, shapes, combine):
    """The sum rules under no_grad: bitwise their values under autograd, operands untouched, no share in an
    operand's memory (the sum and the ratio are reused for the shares)."""
    terms = _terms(shapes, 302)
    R = randn(gen(303), *combine(*terms).shape)
    kept = [t.clone() for t in [*terms, R]]
    allocating = rule.sum(terms, R, combine)
    with torch.no_grad():
        out = rule.sum(terms, R, combine)
    for o, a in zip(out, allocating, strict=True):
        assert_close(o, a, **EXACT)
    _assert_own_memory(out, [*terms, R])
    for t, t0 in zip([*terms, R], kept):
        assert_close(t, t0, **EXACT)


def test_epsilon_sum_with_a_zero_scalar_term_is_the_rule_on_the_rest():
    """A zero scalar term (an untracked mask replayed as zero) changes neither the denominator nor the others'
    shares, and gets nothing itself; -0.0 in a term is stabilised as +0 either way (zennit's sign(0) = +1)."""
    g = gen(304)
    x = randn(g, 3, 4)
    x[0, 0], x[0, 1] = 0.0, -0.0
    R = randn(g, 3, 4)
    zero = torch.zeros((), dtype=DT)
    for eps in (EPS, BIG_EPS):
        with torch.no_grad():
            rx, rc = r.Epsilon(eps).sum([x, zero], R, r.add_terms)
        assert_close(rx, x * R / stab(x + 0.0, eps), **TOL)
        assert rc.shape == () and float(rc) == 0.0


@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("rule", [r.Epsilon(EPS), r.Uniform(EPS), r.Proportional(EPS), r.Constant(EPS)],
                         ids=["epsilon", "uniform", "proportional", "constant"])
def test_product_rules_write_only_memory_they_computed(rule, elementwise):
    """The product rules under no_grad: bitwise their values under autograd, operands untouched, outputs in memory
    of their own -- for direct transposes (bmm), autograd's (matmul, broadcasting) and element-wise products."""
    g = gen(305)
    if elementwise:
        cases = [(torch.mul, randn(g, 2, 3), randn(g, 2, 3)), (torch.mul, randn(g, 3, 1), randn(g, 2, 3, 4))]
    else:
        cases = [(torch.bmm, randn(g, 2, 3, 4), randn(g, 2, 4, 5)),
                 (torch.matmul, randn(g, 2, 1, 3, 4), randn(g, 3, 4, 5))]
    for fn, a, b in cases:
        R = randn(g, *fn(a, b).shape)
        kept = [t.clone() for t in (a, b, R)]
        allocating = rule.product(a, b, R, fn)
        with torch.no_grad():
            out = rule.product(a, b, R, fn)
        for o, al in zip(out, allocating, strict=True):
            assert_close(o, al, **EXACT)
        _assert_own_memory(out, [a, b])  # R itself may pass through (CP-LRP's element-wise rule returns it)
        for t, t0 in zip((a, b, R), kept):
            assert_close(t, t0, **EXACT)


@pytest.mark.parametrize("rule", [r.Epsilon(EPS), r.Uniform(EPS), r.Proportional(EPS), r.Constant(EPS)],
                         ids=["epsilon", "uniform", "proportional", "constant"])
@pytest.mark.parametrize("fn", [torch.bmm, torch.matmul], ids=["bmm (direct transposes)", "matmul (autograd)"])
def test_matrix_product_rules_with_given_output_and_direct_transposes(rule, fn):
    """A product of two activations: passing the saved output z, and bmm's direct transposes (s bᵀ, aᵀ s), give
    what the rule computes from scratch by autograd."""
    g = gen(21)
    a, b, R = randn(g, 2, 3, 4), randn(g, 2, 4, 5), randn(g, 2, 3, 5)
    want = [t.clone() for t in rule.product(a, b, R, lambda x, y: torch.matmul(x, y))]  # autograd path
    got = rule.product(a, b, R, fn, z=torch.bmm(a, b))
    for w_, g_ in zip(want, got):
        assert_close(g_, w_, **TOL)


@pytest.mark.parametrize("rule", [r.Epsilon(), r.ZPlus(), r.Gamma(), r.AlphaBeta(), r.WSquare(),
                                  r.ZBox()], ids=lambda r: type(r).__name__)
def test_rules_work_inside_autograd(rule):
    """The in-place and ``out=`` shortcuts step aside under autograd (tensors requiring grad, grad mode on), where
    ``out=`` would raise: the same values as without it."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(4, 5, generator=g, dtype=torch.float64).requires_grad_()
    R = torch.randn(3, 5, generator=g, dtype=torch.float64)
    out = rule.linear(x, w, R, torch.mm)
    with torch.no_grad():
        ref = rule.linear(x.detach(), w.detach(), R, torch.mm)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------
# sign-split terms stacked into one product; a merged batch norm's scale taken on the output side


def _counting(fn, transpose, stack):
    calls = {"fn": 0, "transpose": 0}

    def f(x, w):
        calls["fn"] += 1
        return fn(x, w)

    def t(s, x, w):
        calls["transpose"] += 1
        return transpose(s, x, w)

    return r.LinearMap(f, t, stack), calls


def _stackable_case(name: str, g: torch.Generator):
    """(x, w, fn, transpose, stack) with more input elements than weights (an input layer: few channels)."""
    if name == "mm":
        return randn(g, 9, 4), randn(g, 4, 3), torch.mm, lambda s, x, w: s @ w.T, (1, 0)
    if name == "bmm":
        return randn(g, 2, 7, 4), randn(g, 2, 4, 3), torch.bmm, lambda s, x, w: s @ w.mT, (2, 1)
    args = (None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1)
    return (randn(g, 2, 3, 6, 5), randn(g, 4, 3, 3, 3), lambda x, w: F.conv2d(x, w, None, 1, 1),
            lambda s, x, w: torch.ops.aten.convolution_backward(s, x, w, *args, [True, False, False])[0], (1, 1))


@pytest.mark.parametrize("name", ["mm", "bmm", "conv"])
@pytest.mark.parametrize("rule_name", ["zplus", "alphabeta", "gamma", "zbox_scalar"])
def test_sign_split_terms_stack_into_one_product(rule_name, name):
    """Where the op can stack (``LinearMap.stack``) and the weight is no larger than the input, the k terms of a
    sign-split rule are one product and one transpose over the inputs and weights concatenated: the equation as
    before, with a k-th of the calls."""
    g = gen(40 + LINEAR_RULES.index(rule_name))
    x, w, fn, tr, stack = _stackable_case(name, g)
    rule = make_rule(rule_name, x, g)
    R = randn(g, *fn(x, w).shape)
    stacked, calls = _counting(fn, tr, stack)
    separate, calls_separate = _counting(fn, tr, None)
    out = rule.linear(x, w, R, stacked)
    assert_close(out, rule.linear(x, w, R, separate), **TOL)
    dense = {"mm": lambda xt, wt: xt[:, :, None] * wt[None], "bmm": lambda xt, wt: xt[..., None] * wt[:, None]}
    if name in dense:  # and the equation itself, on explicit contributions
        assert_close(out, ref_linear(rule, LinCase(x, w, fn, tr, dense[name]), x, w, R), **TOL)
    # products and transposes: z⁺ 2 and 2 separately, 1 and 1 stacked; z-box 3 (2 with z given) and 3; αβ and γ
    # one stacked product and transpose per sign of the output
    expected = {"zplus": (1, 1), "zbox_scalar": (1, 1), "alphabeta": (2, 2), "gamma": (3, 2)}[rule_name]
    assert (calls["fn"], calls["transpose"]) == expected
    assert calls_separate["fn"] > calls["fn"] and calls_separate["transpose"] > calls["transpose"]


def test_terms_are_not_stacked_where_the_weight_is_larger_or_one_term_remains():
    g = gen(50)
    x, w, R = randn(g, 2, 4), randn(g, 4, 3), randn(g, 2, 3)  # w (12) larger than x (8): no copy of w
    lm, calls = _counting(torch.mm, lambda s, x_, w_: s @ w_.T, (1, 0))
    r.ZPlus(EPS).linear(x, w, R, lm)
    assert calls == {"fn": 2, "transpose": 2}
    x = rand(g, 9, 4)  # non-negative: one term
    lm, calls = _counting(torch.mm, lambda s, x_, w_: s @ w_.T, (1, 0))
    r.ZPlus(EPS).linear(x, w, randn(g, 9, 3), lm)
    assert calls == {"fn": 1, "transpose": 1}


@pytest.mark.parametrize("name", ["mm", "conv"])
@pytest.mark.parametrize("signs", ["mixed", "non_negative"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_zplus_output_scale_is_the_rule_of_the_scaled_weight(name, signs, with_bias):
    """ZPlus with ``out_scale = s > 0`` (a batch norm merged into the layer) is z⁺ on the weight ``s w`` (scaled per
    output feature) with bias ``b``: :math:`R / (z^+ + (b^+ + \\varepsilon)/s)` through :math:`w^+` equals
    :math:`R / ((s w)^+ x + b^+ + \\varepsilon)` through :math:`(s w)^+`; against the explicit equation too."""
    g = gen(60)
    x, w, fn, tr, _ = _stackable_case(name, g)
    if signs == "non_negative":
        x = x.abs()
    z = fn(x, w)
    out_features = z.shape[1]
    s = 0.2 + 2 * rand(g, out_features)
    b = randn(g, out_features) if with_bias else None
    view = (1, -1) + (1,) * (z.dim() - 2)
    w_scaled = w * (s if name == "mm" else s.reshape(-1, 1, 1, 1))  # mm: (in, out); conv: (out, in, kh, kw)
    R = randn(g, *z.shape)
    rule = r.ZPlus(BIG_EPS)  # a large ε: its placement shows
    out = rule.linear(x, w, R, r.LinearMap(fn, tr), b=None if b is None else b.reshape(view), out_scale=s.reshape(view))
    assert_close(out, rule.linear(x, w_scaled, R, r.LinearMap(fn, tr), b=None if b is None else b.reshape(view)),
                 **TOL)
    # explicitly: R_i = x_i Σ_j (s w)⁺_ij or (s w)⁻_ij (by the sign of x_i) R_j / (z⁺_j + b⁺_j + ε)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    zp = fn(xp, w_scaled.clamp(min=0)) + fn(xn, w_scaled.clamp(max=0))
    if b is not None:
        zp = zp + b.clamp(min=0).reshape(view)
    q = R / (zp + BIG_EPS)
    expected = xp * tr(q, xp, w_scaled.clamp(min=0)) + xn * tr(q, xn, w_scaled.clamp(max=0))
    assert_close(out, expected, **TOL)
