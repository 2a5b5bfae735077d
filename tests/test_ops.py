"""Each op's LRP rule against an explicit float64 formula computed independently in the test.

Every test builds a tiny graph ``y = op(x, ...)``, seeds it with an explicit random relevance ``R`` (``target=R``)
and compares the relevance ``dynamiclrp.propagate`` returns for the operands with the rule written out by hand:

* additions, sums, means, cumsum, average pooling (family ``sum``): the ε-rule ``R_k = t_k R / stab(z)``;
* linear ops with a ``nn.Parameter`` weight (mm, bmm, addmm, convolutions): ``R_i = sum_j x_i w_ij R_j / stab(z_j)``,
  written with the op's explicit Jacobian (contributions ``C_ji = J_ji x_i``);
* products of two activations: AttnLRP's uniform rule (``R/2`` each for element-wise products);
* routing ops: the op's own vector-Jacobian product of ``R`` (exact element routing);
* single-operand element-wise ops: ``R`` unchanged;
* softmax, norms and scaled dot-product attention: the preset's rules applied by hand to an eager recomputation.

Operands whose values autograd does not save (add, sum, mean, softmax input) are produced in several ways -- as
leaves and as outputs of preceding ops (a scalar product, ``exp``, a dense layer, a biased linear layer, a
non-contiguous transpose) -- so that the Promise System's recovery is exercised; the relevance is then read at
that intermediate tensor (``wrt=[a]``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dynamiclrp
from dynamiclrp.ops.base import saved
from dynamiclrp.presets import get_preset
from dynamiclrp.rules import AlphaBeta, Block, Constant, Epsilon, Gamma, Pass, Uniform, ZBox, ZPlus

D = torch.float64
EPS = 1e-6  # the ε of the built-in presets (sum, linear, products)
SPLIT = {"bias": Epsilon(EPS)}  # the bias addition split off a linear op gets the ε-rule (the paper), not fused
TIGHT = {"sum": Epsilon(1e-12), "linear": Epsilon(1e-12), "product": Uniform(1e-12)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------------------
# helpers


def leaf(*shape, positive=False):
    t = torch.rand(*shape, dtype=D) + 0.5 if positive else torch.randn(*shape, dtype=D)
    return t.requires_grad_(True)


def param(*shape, scale=1.0):
    return torch.nn.Parameter(scale * torch.randn(*shape, dtype=D))


def stab(z, eps=EPS):
    """z + eps * sign(z), sign(0) = 1 (zennit's convention)."""
    return z + torch.where(z >= 0, eps, -eps).to(z.dtype)


# The formulas of this file are written with the ε of EPS and identity norms. The LXT presets run at ε → 0 with
# linearised layer norms and CP-LRP's constant gates (checked against LXT itself in test_compare_lxt.py), so
# they are evaluated here with the rules the formulas spell out.
AT_EPS = {"linear": Epsilon(EPS), "sum": Epsilon(EPS), "product": Uniform(EPS), "norm": Pass()}


def rel(y, R, wrt, preset="epsilon", **kw):
    """Relevance of each tensor of ``wrt`` for the explicit seed ``R`` at ``y``."""
    if preset in ("attnlrp", "cp_lrp"):
        extra = {"attention": Constant(EPS)} if preset == "cp_lrp" else {}
        kw["rules"] = {**AT_EPS, **extra, **kw.get("rules", {})}
    return dynamiclrp.propagate(y, target=R, wrt=list(wrt), preset=preset, **kw).inputs


def close(actual, expected):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-9, atol=1e-11)


def seed_like(y):
    return torch.randn(y.shape, dtype=y.dtype)


def contributions(f, x):
    """Contributions ``C[j, i] = J[j, i] * x_i`` of input element i to output element j of a linear map f."""
    x = x.detach()
    J = torch.autograd.functional.jacobian(f, x)
    n_out = J.numel() // x.numel()
    return J.reshape(n_out, x.numel()) * x.reshape(1, -1)


def epsilon_ref(f, x, R, eps=EPS, z=None):
    """R_i = sum_j C_ji R_j / stab(z_j) for the linear map f (z defaults to sum_i C_ji)."""
    C = contributions(f, x)
    z = C.sum(1) if z is None else z.detach().reshape(-1)
    return (C * (R.detach().reshape(-1) / stab(z, eps))[:, None]).sum(0).reshape(x.shape)


def vjp(ys, xs, Rs):
    """The op's own vector-Jacobian product: the routing reference."""
    return torch.autograd.grad(ys, xs, Rs, retain_graph=True, allow_unused=True)


def _square(n):
    return torch.nn.Parameter(torch.eye(n, dtype=D) + 0.3 * torch.randn(n, n, dtype=D))


# Ways to produce an operand ``a`` from a leaf ``x`` (same shape): the leaf itself, or a preceding op, so the
# Promise System has to recover ``a`` (from the op's saved output/operands, or by replaying views and additions).
SOURCES = {
    "leaf": lambda x: x,
    "scalar_mul": lambda x: x * 1.0,
    "exp": lambda x: x.exp(),
    "dense": lambda x: x @ _square(x.shape[-1]),
    "linear_bias": lambda x: F.linear(x, _square(x.shape[-1]), torch.nn.Parameter(torch.randn(x.shape[-1], dtype=D))),
    "noncontig": lambda x: x.mT.contiguous().exp().mT,
    "relu": lambda x: torch.relu(x),
}


def source(name, *shape):
    """(x, a): a leaf x and the operand a = SOURCES[name](x), or a = x for a leaf."""
    x = leaf(*shape)
    a = SOURCES[name](x)
    if name == "noncontig":
        assert not a.is_contiguous()
    return x, a


SOURCE_NAMES = list(SOURCES)


# ----------------------------------------------------------------------------------------------------------
# additions: family "sum"


@pytest.mark.parametrize("src_a", SOURCE_NAMES)
@pytest.mark.parametrize("src_b", ["leaf", "exp", "linear_bias"])
def test_add_epsilon(src_a, src_b):
    _, a = source(src_a, 3, 4)
    _, b = source(src_b, 3, 4)
    y = a + b
    R = seed_like(y)
    ra, rb = rel(y, R, [a, b])
    s = R / stab((a + b).detach())
    close(ra, a.detach() * s)
    close(rb, b.detach() * s)


@pytest.mark.parametrize("shape_b", [(4,), (3, 1), (1, 4), ()])
def test_add_broadcast(shape_b):
    _, a = source("dense", 3, 4)
    b = leaf(*shape_b).exp() if shape_b else leaf(1).exp()[0]
    y = a + b
    R = seed_like(y)
    ra, rb = rel(y, R, [a, b])
    s = R / stab((a + b).detach())
    close(ra, a.detach() * s)
    close(rb, (b.detach() * s).sum_to_size(b.shape))


def test_add_alpha_and_sub_rsub():
    _, a = source("exp", 3, 4)
    _, b = source("dense", 3, 4)
    R = torch.randn(3, 4, dtype=D)
    av, bv = a.detach(), b.detach()

    y = torch.add(a, b, alpha=2.5)
    s = R / stab(av + 2.5 * bv)
    ra, rb = rel(y, R, [a, b])
    close(ra, av * s)
    close(rb, 2.5 * bv * s)

    y = a - b
    s = R / stab(av - bv)
    ra, rb = rel(y, R, [a, b])
    close(ra, av * s)
    close(rb, -bv * s)

    y = torch.sub(a, b, alpha=0.5)
    s = R / stab(av - 0.5 * bv)
    ra, rb = rel(y, R, [a, b])
    close(ra, av * s)
    close(rb, -0.5 * bv * s)

    y = torch.rsub(a, b)  # b - a
    assert type(y.grad_fn).__name__ == "RsubBackward0"
    s = R / stab(bv - av)
    ra, rb = rel(y, R, [a, b])
    close(ra, -av * s)
    close(rb, bv * s)


def test_sub_broadcast_noncontiguous():
    xa = leaf(4, 3)
    a = xa.t()  # non-contiguous (3, 4)
    b = leaf(3, 1)
    y = a - b
    R = seed_like(y)
    rxa, rb = rel(y, R, [xa, b])
    s = R / stab((a - b).detach())
    close(rxa, (a.detach() * s).t())
    close(rb, (-b.detach() * s).sum(1, keepdim=True))


def test_add_constant_recovered_from_consumer():
    """``a + c`` with a constant c outside the graph: z is read where a consumer saved it, c absorbs its share."""
    _, a = source("dense", 3, 4)
    _, m = source("exp", 3, 4)
    y = (a + 1.5) * m  # MulBackward0 saves a + 1.5
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    close(ra, a.detach() * (R / 2) / stab(a.detach() + 1.5))


def test_add_constant_unrecoverable_is_refused():
    """Without any saved copy of z the constant's share is unknown: a clear error, not a silent guess."""
    _, a = source("dense", 3, 4)
    y = (a + 1.5).sum(-1)
    with pytest.raises(dynamiclrp.ActivationUnavailableError, match="constant"):
        rel(y, seed_like(y), [a])


def test_add_constant_at_the_output_uses_the_output():
    """At the explained output itself z is known (it is the output): the constant's share is exact."""
    _, a = source("dense", 3, 4)
    y = a + 1.5
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    close(ra, a.detach() * R / stab(a.detach() + 1.5))


def test_add_constant_broadcast_larger_than_data():
    """A constant of a larger shape than the data operand: its term is z - a, the data relevance summed back."""
    a = leaf(4).exp()
    c = torch.randn(3, 4, dtype=D)
    _, m = source("exp", 3, 4)
    y = (a + c) * m
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    av = a.detach()
    close(ra, (av * (R / 2) / stab(av + c)).sum(0))


def test_add_paper_proportional():
    _, a = source("dense", 3, 4)
    _, b = source("noncontig", 3, 4)
    y = a + b
    R = seed_like(y)
    ra, rb = rel(y, R, [a, b], preset="paper")
    aa, bb = a.detach().abs(), b.detach().abs()
    close(ra, aa * R / (aa + bb + 1e-11))
    close(rb, bb * R / (aa + bb + 1e-11))


def test_add_uniform_sum_rule():
    _, a = source("exp", 3, 4)
    b = leaf(4)
    y = a + b
    R = seed_like(y)
    ra, rb = rel(y, R, [a, b], rules={"sum": Uniform()})
    close(ra, R / 2)
    close(rb, (R / 2).sum(0))


# ----------------------------------------------------------------------------------------------------------
# reductions and average pooling: family "sum"


SUM_DIMS = [None, 1, -1, (0, 2), (-1, 0)]


@pytest.mark.parametrize("src", ["leaf", "scalar_mul", "dense", "noncontig"])
@pytest.mark.parametrize("dims, keepdim", [(d, k) for d in SUM_DIMS for k in (False, True) if d is not None or not k])
def test_sum(src, dims, keepdim):
    _, a = source(src, 2, 3, 4)
    y = a.sum() if dims is None else a.sum(dims, keepdim=keepdim)
    assert type(y.grad_fn).__name__ == ("SumBackward0" if dims is None else "SumBackward1")
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    av = a.detach()
    z = av.sum() if dims is None else av.sum(dims, keepdim=True)
    Rk = R if dims is None else R.reshape(z.shape)
    close(ra, av * Rk / stab(z))


@pytest.mark.parametrize("src", ["leaf", "exp", "linear_bias"])
@pytest.mark.parametrize("dims", SUM_DIMS)
def test_mean(src, dims):
    _, a = source(src, 2, 3, 4)
    y = a.mean() if dims is None else a.mean(dims)
    assert type(y.grad_fn).__name__ == ("MeanBackward0" if dims is None else "MeanBackward1")
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    av = a.detach()
    z = av.mean() if dims is None else av.mean(dims, keepdim=True)
    n = av.numel() // z.numel()
    close(ra, (av / n) * R.reshape(z.shape) / stab(z))


def test_sum_conservation_tight_eps():
    _, a = source("dense", 3, 5)
    y = a.sum(1)
    R = seed_like(y)
    (ra,) = rel(y, R, [a], rules=TIGHT)
    close(ra.sum(1), R)


@pytest.mark.parametrize("src", ["leaf", "exp", "dense"])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_cumsum(src, dim):
    _, a = source(src, 3, 4)
    y = a.cumsum(dim)
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    av = a.detach()
    s = R / stab(av.cumsum(dim))
    back = s.flip(dim).cumsum(dim).flip(dim)  # sum over outputs j >= i of s_j
    close(ra, av * back)


AVG_POOLS = {
    "k2": dict(kernel_size=2),
    "k3s1p1": dict(kernel_size=3, stride=1, padding=1),
    "k3s2p1_exclude_pad": dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
    "k2_ceil": dict(kernel_size=2, stride=2, ceil_mode=True),
    "divisor": dict(kernel_size=2, stride=1, divisor_override=3),
    "rect": dict(kernel_size=(1, 3), stride=(1, 2)),
}


@pytest.mark.parametrize("cfg", list(AVG_POOLS))
@pytest.mark.parametrize("src", ["leaf", "dense"])
def test_avg_pool2d(cfg, src):
    _, a = source(src, 2, 3, 5, 5)
    kw = AVG_POOLS[cfg]
    y = F.avg_pool2d(a, **kw)
    assert type(y.grad_fn).__name__ == "AvgPool2DBackward0"
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    close(ra, epsilon_ref(lambda t: F.avg_pool2d(t, **kw), a, R))


def test_avg_pool3d():
    a = leaf(1, 2, 4, 4, 5)
    y = F.avg_pool3d(a, kernel_size=2, stride=(2, 1, 2), padding=(0, 1, 1))
    assert type(y.grad_fn).__name__ == "AvgPool3DBackward0"
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    close(ra, epsilon_ref(lambda t: F.avg_pool3d(t, 2, (2, 1, 2), (0, 1, 1)), a, R))


@pytest.mark.parametrize("size", [(2, 2), (3, 3), (1, 4), (7, 7)])
@pytest.mark.parametrize("src", ["leaf", "exp"])
def test_adaptive_avg_pool2d(size, src):
    """Exact, overlapping (5 -> 3) and up-sampling (5 -> 7, as vgg at small inputs) windows."""
    _, a = source(src, 2, 3, 5, 5)
    y = F.adaptive_avg_pool2d(a, size)
    assert type(y.grad_fn).__name__ == "AdaptiveAvgPool2DBackward0"
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    close(ra, epsilon_ref(lambda t: F.adaptive_avg_pool2d(t, size), a, R))


def test_adaptive_avg_pool3d():
    a = leaf(1, 2, 3, 4, 5)
    y = F.adaptive_avg_pool3d(a, (2, 3, 2))
    assert type(y.grad_fn).__name__ == "AdaptiveAvgPool3DBackward0"
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    close(ra, epsilon_ref(lambda t: F.adaptive_avg_pool3d(t, (2, 3, 2)), a, R))


def test_global_adaptive_avg_pool_is_a_mean():
    _, a = source("dense", 2, 3, 4, 4)
    y = F.adaptive_avg_pool2d(a, 1)
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    av = a.detach()
    z = av.mean((2, 3), keepdim=True)
    close(ra, av / 16 * R / stab(z))


def test_adaptive_avg_pool2d_unbatched():
    a = leaf(3, 5, 5)
    y = F.adaptive_avg_pool2d(a, (2, 2))
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    close(ra, epsilon_ref(lambda t: F.adaptive_avg_pool2d(t, (2, 2)), a, R))


def test_avg_pool2d_unbatched():
    a = leaf(3, 4, 4)
    y = F.avg_pool2d(a, 2)
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    close(ra, epsilon_ref(lambda t: F.avg_pool2d(t, 2), a, R))


# ----------------------------------------------------------------------------------------------------------
# linear ops with a weight: families "dense" / "conv" / "input" (-> "linear")


@pytest.mark.parametrize("src", ["leaf", "exp", "noncontig", "relu"])
def test_mm_param_epsilon(src):
    x, a = source(src, 3, 4)
    W = param(4, 5)
    y = a @ W
    assert type(y.grad_fn).__name__ == "MmBackward0"
    R = seed_like(y)
    ra, rw = rel(y, R, [a, W])
    av, Wv = a.detach(), W.detach()
    s = R / stab(av @ Wv)
    close(ra, torch.einsum("ik,kj,ij->ik", av, Wv, s))
    close(rw, torch.einsum("ik,kj,ij->kj", av, Wv, s))


def test_mm_param_transposed_input_leaf():
    """A non-contiguous data operand (x.t()) read back at the leaf."""
    x = leaf(4, 3)
    W = param(4, 5)
    y = x.t() @ W
    R = seed_like(y)
    (rx,) = rel(y, R, [x])
    xt, Wv = x.detach().t(), W.detach()
    close(rx, torch.einsum("ik,kj,ij->ik", xt, Wv, R / stab(xt @ Wv)).t())


def test_mm_weight_on_the_left():
    W = param(5, 3)
    _, a = source("exp", 3, 4)
    y = W @ a
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    av, Wv = a.detach(), W.detach()
    close(ra, torch.einsum("jk,ki,ji->ki", Wv, av, R / stab(Wv @ av)))


@pytest.mark.parametrize("src", ["leaf", "dense"])
def test_linear_with_bias_addmm(src):
    """addmm = add(bias) + mm, bias split off (the paper): the bias addition and the mm each get the ε-rule."""
    _, a = source(src, 3, 4)
    W, b = param(5, 4), param(5)
    y = F.linear(a, W, b)
    assert type(y.grad_fn).__name__ == "AddmmBackward0"
    R = seed_like(y)
    ra, rb, rw = rel(y, R, [a, b, W], rules=SPLIT)
    av, Wv, bv = a.detach(), W.detach(), b.detach()
    zmm = av @ Wv.t()
    s = R / stab(zmm + bv)
    close(rb, (bv * s).sum(0))
    Rmm = zmm * s
    s2 = Rmm / stab(zmm)
    close(ra, torch.einsum("ik,jk,ij->ik", av, Wv, s2))
    close(rw, torch.einsum("ik,jk,ij->jk", av, Wv, s2))


@pytest.mark.parametrize("src", ["leaf", "dense"])
def test_linear_with_bias_in_denominator(src):
    """The default presets put the bias into the linear op's denominator (textbook LRP, zennit, LXT):
    R_x = x ⊙ Wᵀ(R / stab(xW + b)); the bias gets no relevance; the weight W ⊙ (xᵀ s)."""
    _, a = source(src, 3, 4)
    W, b = param(5, 4), param(5)
    y = F.linear(a, W, b)
    R = seed_like(y)
    ra, rb, rw = rel(y, R, [a, b, W])
    av, Wv, bv = a.detach(), W.detach(), b.detach()
    s = R / stab(av @ Wv.t() + bv)
    close(ra, torch.einsum("ik,jk,ij->ik", av, Wv, s))
    close(rw, torch.einsum("ik,jk,ij->jk", av, Wv, s))
    assert rb.abs().sum() == 0


def test_linear_3d_input_through_views():
    _, a = source("exp", 2, 3, 4)
    W, b = param(5, 4), param(5)
    y = F.linear(a, W, b)
    R = seed_like(y)
    (ra,) = rel(y, R, [a], rules=SPLIT)
    av, Wv, bv = a.detach(), W.detach(), b.detach()
    zmm = av @ Wv.t()
    s2 = zmm * R / stab(zmm + bv) / stab(zmm)
    close(ra, torch.einsum("bik,jk,bij->bik", av, Wv, s2))


def test_matmul_3d_param_no_bias():
    _, a = source("dense", 2, 3, 4)
    W = param(4, 5)
    y = a @ W
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    av, Wv = a.detach(), W.detach()
    close(ra, torch.einsum("bik,kj,bij->bik", av, Wv, R / stab(av @ Wv)))


def test_addmm_beta_alpha():
    _, a = source("exp", 3, 4)
    W, b = param(4, 5), param(5)
    y = torch.addmm(b, a, W, beta=0.5, alpha=2.0)
    R = seed_like(y)
    ra, rb = rel(y, R, [a, b], rules=SPLIT)
    av, Wv, bv = a.detach(), W.detach(), b.detach()
    zmm = 2.0 * (av @ Wv)
    s = R / stab(zmm + 0.5 * bv)
    close(rb, (0.5 * bv * s).sum(0))
    # the mm part sees its own output a @ W (alpha scales the term of the addition)
    Rmm = zmm * s
    close(ra, torch.einsum("ik,kj,ij->ik", av, Wv, Rmm / stab(av @ Wv)))
    # bias in the denominator: z = alpha * aW + beta * b, and R_a = a ⊙ Wᵀ(alpha R / stab(z))
    ra, rb = rel(y, R, [a, b])
    close(ra, torch.einsum("ik,kj,ij->ik", av, Wv, 2.0 * R / stab(zmm + 0.5 * bv, 2.0 * EPS)))
    assert rb.abs().sum() == 0


def test_bmm_param():
    _, a = source("exp", 2, 3, 4)
    W = param(2, 4, 5)
    y = torch.bmm(a, W)
    assert type(y.grad_fn).__name__ == "BmmBackward0"
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    av, Wv = a.detach(), W.detach()
    close(ra, torch.einsum("bik,bkj,bij->bik", av, Wv, R / stab(torch.bmm(av, Wv))))


def test_baddbmm_split():
    _, a = source("exp", 2, 3, 4)
    W = param(2, 4, 5)
    c = leaf(2, 3, 5)
    y = torch.baddbmm(c, a, W)
    assert type(y.grad_fn).__name__ == "BaddbmmBackward0"
    R = seed_like(y)
    ra, rc = rel(y, R, [a, c])
    av, Wv, cv = a.detach(), W.detach(), c.detach()
    zb = torch.bmm(av, Wv)
    s = R / stab(zb + cv)
    close(rc, cv * s)
    close(ra, torch.einsum("bik,bkj,bij->bik", av, Wv, zb * s / stab(zb)))


CONVS = {
    "1d": dict(nd=1, cin=2, cout=3, k=3, size=(7,), kw=dict()),
    "1d_stride_pad": dict(nd=1, cin=2, cout=3, k=3, size=(8,), kw=dict(stride=2, padding=1)),
    "2d": dict(nd=2, cin=2, cout=3, k=3, size=(5, 5), kw=dict()),
    "2d_stride_pad_dil": dict(nd=2, cin=2, cout=3, k=2, size=(6, 6), kw=dict(stride=2, padding=1, dilation=2)),
    "2d_groups": dict(nd=2, cin=4, cout=6, k=3, size=(5, 4), kw=dict(groups=2, padding=1)),
    "2d_depthwise": dict(nd=2, cin=3, cout=3, k=3, size=(4, 4), kw=dict(groups=3, padding=1)),
    "3d": dict(nd=3, cin=2, cout=2, k=2, size=(3, 4, 4), kw=dict(stride=(1, 2, 1))),
    "2d_transposed": dict(nd=2, cin=3, cout=2, k=3, size=(3, 3), kw=dict(stride=2, padding=1, output_padding=1),
                          transposed=True),
    "1d_transposed_groups": dict(nd=1, cin=4, cout=2, k=2, size=(5,), kw=dict(groups=2, dilation=2),
                                 transposed=True),
    "3d_transposed": dict(nd=3, cin=2, cout=2, k=2, size=(2, 3, 3), kw=dict(stride=2), transposed=True),
}


def _conv(cfg):
    nd, tr = cfg["nd"], cfg.get("transposed", False)
    groups = cfg["kw"].get("groups", 1)
    if tr:
        shape = (cfg["cin"], cfg["cout"] // groups) + (cfg["k"],) * nd
        f = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    else:
        shape = (cfg["cout"], cfg["cin"] // groups) + (cfg["k"],) * nd
        f = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return f, param(*shape, scale=0.5)


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("bias", [False, "split", "denominator"])
@pytest.mark.parametrize("src", ["leaf", "scalar_mul"])
def test_convolution_epsilon(name, bias, src):
    cfg = CONVS[name]
    f, W = _conv(cfg)
    out_ch = W.shape[1] * cfg["kw"].get("groups", 1) if cfg.get("transposed") else W.shape[0]
    b = param(out_ch) if bias else None
    _, a = source(src, 2, cfg["cin"], *cfg["size"])
    y = f(a, W, b, **cfg["kw"])
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0"
    R = seed_like(y)
    wrt = [a, W] + ([b] if bias else [])
    got = rel(y, R, wrt, rules=SPLIT if bias == "split" else {})

    def conv(t):
        return f(t, W.detach(), None, **cfg["kw"])

    def conv_w(w):
        return f(a.detach(), w, None, **cfg["kw"])

    zc = conv(a.detach())
    if bias == "denominator":  # z = conv(x) + b in every denominator; the bias keeps its share
        view = (1, -1) + (1,) * cfg["nd"]
        z = zc + b.detach().view(view)
        close(got[0], epsilon_ref(conv, a, R, z=z))
        close(got[1], epsilon_ref(conv_w, W, R, z=z))
        assert got[2].abs().sum() == 0
        return
    if bias:
        view = (1, -1) + (1,) * cfg["nd"]
        z = zc + b.detach().view(view)
        s = R / stab(z)
        close(got[2], (b.detach().view(view) * s).sum([0] + list(range(2, 2 + cfg["nd"]))))
        Rc = zc * s
    else:
        Rc = R
    close(got[0], epsilon_ref(conv, a, Rc, z=zc))
    close(got[1], epsilon_ref(conv_w, W, Rc, z=zc))


def test_conv_unbatched_input():
    a = leaf(2, 6, 6)
    W = param(3, 2, 3, 3)
    y = F.conv2d(a, W)
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    close(ra, epsilon_ref(lambda t: F.conv2d(t, W.detach()), a, R))


def _signed_parts(C):
    return C.clamp(min=0), C.clamp(max=0)


def test_conv_presets_dispatch_input_conv_dense():
    """epsilon_gamma_box: z-box on the input layer, γ on later convolutions, ε on dense layers.

    The references use the contributions ``C_ji = J_ji x_i``: for a convolution each (input, output) pair is
    connected through exactly one weight, so ``x⁺w⁺ + x⁻w⁻ = C⁺`` element by element.
    """
    x = leaf(1, 2, 5, 5)
    W1, W2, W3 = param(3, 2, 2, 2), param(2, 3, 2, 2), param(2 * 3 * 3, 4)
    h1 = F.conv2d(x, W1)
    h2 = F.conv2d(h1, W2)
    y = h2.flatten(1) @ W3
    R = seed_like(y)
    rx, rh1, rh2 = rel(y, R, [x, h1, h2], preset="epsilon_gamma_box")
    xv, h1v, h2v = x.detach(), h1.detach(), h2.detach()
    # dense: ε
    h2f = h2v.flatten(1)
    close(rh2, torch.einsum("ik,kj,ij->ik", h2f, W3.detach(), R / stab(h2f @ W3.detach())).reshape(h2v.shape))
    # conv on an activation: γ = 0.25
    g = 0.25
    J = torch.autograd.functional.jacobian(lambda t: F.conv2d(t, W2.detach()), h1v).reshape(h2v.numel(), -1)
    Wp, Wn = J + g * J.clamp(min=0), J + g * J.clamp(max=0)
    xp, xn = h1v.reshape(1, -1).clamp(min=0), h1v.reshape(1, -1).clamp(max=0)
    pos = xp * Wp + xn * Wn
    neg = xp * Wn + xn * Wp
    z, rr = h2v.reshape(-1), rh2.reshape(-1)
    sp = rr * (z > 0) / stab(pos.sum(1))
    sn = rr * (z < 0) / stab(neg.sum(1))
    close(rh1, ((pos * sp[:, None]).sum(0) + (neg * sn[:, None]).sum(0)).reshape(h1v.shape))
    # input layer: z-box with bounds [-3, 3]
    J = torch.autograd.functional.jacobian(lambda t: F.conv2d(t, W1.detach()), xv).reshape(h1v.numel(), -1)
    C = J * xv.reshape(1, -1) - (-3.0) * J.clamp(min=0) - 3.0 * J.clamp(max=0)
    close(rx, (C * (rh1.reshape(-1) / stab(C.sum(1)))[:, None]).sum(0).reshape(xv.shape))


@pytest.mark.parametrize("preset, rule", [("epsilon_plus", "zplus"), ("epsilon_alpha2_beta1", "alphabeta")])
def test_conv_zplus_alphabeta(preset, rule):
    x = leaf(1, 2, 5, 5)
    h = F.conv2d(x, param(2, 2, 1, 1)) * 1.0  # not an input layer
    W = param(3, 2, 3, 3)
    y = F.conv2d(h, W, padding=1)
    R = seed_like(y)
    (rh,) = rel(y, R, [h], preset=preset)
    C = contributions(lambda t: F.conv2d(t, W.detach(), padding=1), h)
    Cp, Cn = _signed_parts(C)
    r = R.reshape(-1, 1)
    plus = (Cp * r / stab(Cp.sum(1, keepdim=True))).sum(0)
    if rule == "zplus":
        close(rh, plus.reshape(h.shape))
    else:
        minus = (Cn * r / stab(Cn.sum(1, keepdim=True))).sum(0)
        close(rh, (2.0 * plus - 1.0 * minus).reshape(h.shape))


def test_linear_rule_overrides_by_family():
    """A rule given for ``dense`` replaces the preset's; the ``linear`` fallback is used otherwise."""
    _, a = source("exp", 3, 4)
    W = param(4, 5)
    y = a @ W
    R = seed_like(y)
    (r1,) = rel(y, R, [a], rules={"dense": ZPlus()})
    C = a.detach()[:, :, None] * W.detach()[None]  # (i, k, j)
    Cp = C.clamp(min=0)
    close(r1, (Cp * (R / stab(Cp.sum(1)))[:, None, :]).sum(2))
    (r2,) = rel(y, R, [a], rules={"linear": Epsilon(0.5)})
    close(r2, (C * (R / stab(C.sum(1), 0.5))[:, None, :]).sum(2))
    (r3,) = rel(y, R, [a], rules={"linear": Gamma(0.0), "dense": AlphaBeta(1.0, 0.0)})
    close(r3, r1)  # α1β0 = z⁺


def test_zbox_input_dense_layer():
    x = leaf(2, 4)
    W = param(4, 3)
    y = x @ W
    R = seed_like(y)
    (rx,) = rel(y, R, [x], rules={"input": ZBox(-1.0, 2.0)})
    xv, Wv = x.detach(), W.detach()
    C = xv[:, :, None] * Wv[None] + 1.0 * Wv.clamp(min=0)[None] - 2.0 * Wv.clamp(max=0)[None]
    close(rx, (C * (R / stab(C.sum(1)))[:, None, :]).sum(2))


@pytest.mark.parametrize("graph", ["mlp", "conv_pool", "residual", "attention_like"])
def test_conservation_tight_eps(graph):
    """Without biases and with ε = 1e-12, the ε/uniform/routing rules pass on all relevance (ledger: ~0 absorbed)."""
    x = leaf(2, 3, 6, 6) if graph == "conv_pool" else leaf(2, 4, 6)
    if graph == "mlp":
        h = torch.relu(x @ param(6, 8))
        y = (h.transpose(1, 2) @ param(4, 3)).sum(1)
    elif graph == "conv_pool":
        h = torch.relu(F.conv2d(x, param(4, 3, 3, 3), padding=1, stride=1))
        h = F.max_pool2d(h, 2)
        h = F.avg_pool2d(F.conv2d(h, param(2, 4, 1, 1)), 3)
        y = torch.cat([h.flatten(1), F.adaptive_avg_pool2d(h, 1).flatten(1)], 1).mean(1, keepdim=True) * 2.0
    elif graph == "residual":
        h = x @ param(6, 6)
        h = h + torch.relu(h @ param(6, 6))
        y = torch.stack(h.unbind(1), 0).sum((0, -1)).cumsum(-1)
    else:
        q, k, v = (x @ param(6, 6) for _ in range(3))
        p = torch.softmax(q @ k.mT / 2.0, -1)
        y = (p @ v).reshape(2, -1) @ param(24, 3)
    R = seed_like(y)
    att = dynamiclrp.propagate(y, target=R, wrt=[x], rules=TIGHT)
    total = R.sum()
    assert abs(float(att.inputs[0].sum() - total)) < 1e-8 * max(1.0, float(R.abs().sum()))
    absorbed = sum(float(e.absorbed.abs()) for e in att.ledger)
    assert absorbed < 1e-8 * max(1.0, float(R.abs().sum()))


# ----------------------------------------------------------------------------------------------------------
# products of two activations: family "product"


@pytest.mark.parametrize("src_a, src_b", [("leaf", "leaf"), ("dense", "exp"), ("noncontig", "linear_bias")])
def test_mul_uniform(src_a, src_b):
    _, a = source(src_a, 3, 4)
    _, b = source(src_b, 3, 4)
    y = a * b
    R = seed_like(y)
    ra, rb = rel(y, R, [a, b])
    close(ra, R / 2)
    close(rb, R / 2)


def test_mul_div_broadcast_uniform():
    _, a = source("exp", 3, 4)
    b = leaf(4, positive=True)
    R = torch.randn(3, 4, dtype=D)
    for y in (a * b, a / b):
        ra, rb = rel(y, R, [a, b])
        close(ra, R / 2)
        close(rb, (R / 2).sum(0))


def test_div_uniform():
    _, a = source("dense", 3, 4)
    _, b = source("exp", 3, 4)
    y = a / b
    assert type(y.grad_fn).__name__ == "DivBackward0"
    R = seed_like(y)
    ra, rb = rel(y, R, [a, b])
    close(ra, R / 2)
    close(rb, R / 2)


@pytest.mark.parametrize("op", ["mul", "div"])
def test_product_paper_proportional(op):
    _, a = source("dense", 3, 4)
    _, b = source("exp", 3, 4)
    y = a * b if op == "mul" else a / b
    R = seed_like(y)
    ra, rb = rel(y, R, [a, b], preset="paper")
    aa = a.detach().abs()
    bb = b.detach().abs() if op == "mul" else 1.0 / b.detach().abs()
    close(ra, aa * R / (aa + bb + 1e-11))
    close(rb, bb * R / (aa + bb + 1e-11))


@pytest.mark.parametrize("op", ["mul_param", "param_mul", "div_param", "mul_const", "mul_scalar", "div_scalar",
                                "mul_param_broadcast"])
def test_product_with_a_constant_factor_is_identity(op):
    _, a = source("dense", 3, 4)
    if op == "mul_param":
        y = a * param(3, 4)
    elif op == "param_mul":
        y = param(4) * a
    elif op == "div_param":
        y = a / torch.nn.Parameter(torch.rand(3, 4, dtype=D) + 0.5)
    elif op == "mul_const":
        y = a * torch.randn(3, 4, dtype=D)
    elif op == "mul_scalar":
        y = a * 3.0
    elif op == "div_scalar":
        y = a / 3.0
    else:
        a = a[:, :1]
        y = a * param(3, 4)
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    close(ra, R.sum_to_size(a.shape))


@pytest.mark.parametrize("src_a, src_b", [("leaf", "leaf"), ("exp", "dense")])
def test_bmm_two_activations_uniform(src_a, src_b):
    _, a = source(src_a, 2, 3, 4)
    _, b0 = source(src_b, 2, 5, 4)
    b = b0.mT  # (2, 4, 5), non-contiguous
    y = torch.bmm(a, b)
    R = seed_like(y)
    ra, rb = rel(y, R, [a, b])
    av, bv = a.detach(), b.detach()
    s = R / (2 * stab(torch.bmm(av, bv)))
    close(ra, av * (s @ bv.mT))
    close(rb, bv * (av.mT @ s))


def test_epsilon_rule_for_products():
    _, a = source("exp", 2, 3, 4)
    _, b = source("dense", 2, 4, 5)
    y = torch.bmm(a, b)
    R = seed_like(y)
    ra, rb = rel(y, R, [a, b], rules={"product": Epsilon(1e-12)})
    av, bv = a.detach(), b.detach()
    s = R / stab(torch.bmm(av, bv), 1e-12)
    close(ra, av * (s @ bv.mT))
    close(rb, bv * (av.mT @ s))


def test_mm_two_activations_uniform():
    _, a = source("exp", 3, 4)
    _, b = source("dense", 4, 5)
    y = a @ b
    R = seed_like(y)
    ra, rb = rel(y, R, [a, b])
    av, bv = a.detach(), b.detach()
    s = R / (2 * stab(av @ bv))
    close(ra, av * (s @ bv.t()))
    close(rb, bv * (av.t() @ s))


# ----------------------------------------------------------------------------------------------------------
# single-operand element-wise ops: relevance passes unchanged


UNARY = {
    "neg": lambda x: -x,
    "sqrt": lambda x: x.sqrt(),
    "rsqrt": lambda x: x.rsqrt(),
    "pow2": lambda x: x.pow(2),
    "pow_half": lambda x: x**0.5,
    "exp": lambda x: x.exp(),
    "log": lambda x: x.log(),
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "clone": lambda x: x.clone(),
    "contiguous": lambda x: x.mT.contiguous(),
    "rsub_scalar": lambda x: 2.0 - x,
    "mul_scalar": lambda x: x * -3.0,
    "div_scalar": lambda x: x / 4.0,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.1),
    "hardtanh": F.hardtanh,
    "relu6": F.relu6,
    "softplus": F.softplus,
    "elu": F.elu,
    "erf": torch.erf,
    "abs": torch.abs,
    "clamp": lambda x: x.clamp(0.7, 1.2),
    "clamp_min": lambda x: x.clamp(min=0.8),
    "dropout_train": lambda x: F.dropout(x, 0.5, training=True),
}


@pytest.mark.parametrize("name", list(UNARY))
@pytest.mark.parametrize("src", ["leaf", "dense"])
def test_unary_passes_relevance(name, src):
    x = leaf(3, 4, positive=True)
    a = x if src == "leaf" else x @ _square(4).abs()  # keep the operand positive (sqrt, log)
    y = UNARY[name](a)
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    close(ra, R if name != "contiguous" else R.mT)


@pytest.mark.parametrize("to", [torch.float32, torch.float64])
def test_to_copy_passes_relevance(to):
    x = torch.randn(3, 4, dtype=torch.float32 if to == torch.float64 else D, requires_grad=True)
    y = x.to(to)
    assert type(y.grad_fn).__name__ == "ToCopyBackward0"
    R = seed_like(y)
    (rx,) = rel(y, R, [x])
    assert rx.dtype == torch.float64  # relevance in the widest float dtype of the outputs and leaves
    torch.testing.assert_close(rx, R.double(), rtol=0, atol=0)


def test_unary_chain_recovers_activation_for_sum():
    """A sum after a chain of identity ops: its summands are replayed through them (Promise System)."""
    x = leaf(3, 4, positive=True)
    a = (x.sqrt() * 2.0 / 3.0).log().neg()
    y = a.sum(1)
    R = seed_like(y)
    (rx,) = rel(y, R, [x])
    av = a.detach()
    close(rx, av * R[:, None] / stab(av.sum(1, keepdim=True)))


# ----------------------------------------------------------------------------------------------------------
# routing ops: the op's gradient applied to R


ROUTING = {
    "view": lambda x: x.view(4, 3, 2),
    "reshape": lambda x: x.reshape(-1),
    "reshape_noncontig": lambda x: x.transpose(0, 2).reshape(8, 3),
    "flatten": lambda x: x.flatten(1),
    "transpose": lambda x: x.transpose(0, 2),
    "t": lambda x: x[0].t(),
    "permute": lambda x: x.permute(2, 0, 1),
    "expand": lambda x: x[:, :1].expand(2, 5, 4),
    "expand_new_dim": lambda x: x.expand(3, 2, 3, 4),
    "expand_as": lambda x: x[:1].expand_as(x),
    "repeat": lambda x: x.repeat(2, 1, 3),
    "squeeze_dim": lambda x: x[:, :1].squeeze(1),
    "squeeze_all": lambda x: x[:1, :1].squeeze(),
    "squeeze_dims": lambda x: x[:1, :1].squeeze((0, 1)),
    "unsqueeze": lambda x: x.unsqueeze(-2),
    "slice": lambda x: x[:, 1:3],
    "slice_step": lambda x: x[..., ::2],
    "narrow": lambda x: x.narrow(2, 1, 2),
    "index_list": lambda x: x[:, [0, 2, 2]],
    "index_tensor_2d": lambda x: x[torch.tensor([1, 0, 1]), :, torch.tensor([3, 3, 0])],
    "index_bool": lambda x: x[x.detach() > 0],
    "select": lambda x: x[:, 1],
    "select_neg": lambda x: x.select(-1, -1),
    "index_select": lambda x: x.index_select(2, torch.tensor([3, 0, 0])),
    "gather": lambda x: x.gather(2, torch.tensor([[[0, 3], [1, 1], [2, 0]]] * 2)),
    "max_dim": lambda x: x.max(1).values,
    "max_dim_keepdim": lambda x: x.max(-1, keepdim=True).values,
    "max_full": lambda x: x.max(),
    "masked_fill": lambda x: x.masked_fill(x.detach() > 0.5, -1.0),
    "where_const": lambda x: torch.where(x.detach() > 0, x, 0.0),
    "flip": lambda x: x.flip(1),
    "roll": lambda x: x.roll(1, 2),
    "unfold": lambda x: x.unfold(2, 2, 1),
    "pad": lambda x: F.pad(x, (1, 2)),
    "chunk_first": lambda x: x.chunk(2, -1)[0],
    "split_last": lambda x: x.split(2, 1)[1],
    "split_sizes_mid": lambda x: x.split([1, 2], 1)[1],
    "unbind_one": lambda x: x.unbind(0)[1],
}


@pytest.mark.parametrize("name", list(ROUTING))
def test_routing_single_output(name):
    x = leaf(2, 3, 4)
    y = ROUTING[name](x)
    R = seed_like(y)
    (rx,) = rel(y, R, [x])
    (g,) = vjp(y, [x], R)
    close(rx, g)
    if name not in ("masked_fill", "where_const", "pad"):  # these drop the filled/padded elements
        close(rx.sum(), R.sum())


@pytest.mark.parametrize("name", ["view", "transpose", "permute", "reshape_noncontig", "flip", "roll",
                                  "expand", "repeat", "unfold"])
def test_routing_into_a_sum_recovers_values(name):
    """A reduction after a routing op: the summands are replayed through the op from the leaf below."""
    _, a = source("dense", 2, 3, 4)
    h = ROUTING[name](a)
    y = h.sum(-1)
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    hv = h.detach()
    (g,) = vjp(h, [a], hv * R[..., None] / stab(hv.sum(-1, keepdim=True)))
    close(ra, g)


def test_routing_is_element_exact():
    """Routing sends every output element's relevance to the element it came from (explicit indices)."""
    x = leaf(3, 5)
    idx = torch.tensor([[4, 0, 0], [1, 2, 3], [2, 2, 2]])
    y = x.gather(1, idx)
    R = seed_like(y)
    (rx,) = rel(y, R, [x])
    close(rx, torch.zeros(3, 5, dtype=D).scatter_add(1, idx, R))

    x = leaf(2, 6)
    vals, arg = x.max(1)
    R = seed_like(vals)
    (rx,) = rel(vals, R, [x])
    close(rx, torch.zeros(2, 6, dtype=D).scatter(1, arg[:, None], R[:, None]))


@pytest.mark.parametrize("op", ["split", "split_with_sizes", "unbind", "chunk"])
def test_routing_multi_output(op):
    x = leaf(2, 5, 3)
    if op == "split":
        ys = x.split(2, 1)
    elif op == "split_with_sizes":
        ys = x.split([1, 3, 1], 1)
    elif op == "unbind":
        ys = x.unbind(-1)
    else:
        ys = x.chunk(3, 1)
    Rs = [seed_like(y) for y in ys]
    att = dynamiclrp.propagate(list(ys), target=Rs, wrt=[x])
    (g,) = vjp(list(ys), [x], Rs)
    close(att.inputs[0], g)
    close(att.inputs[0].sum(), sum(r.sum() for r in Rs))


@pytest.mark.parametrize("op", ["cat0", "cat_neg", "stack", "stack_neg", "where"])
def test_routing_multi_input(op):
    _, a = source("exp", 2, 3)
    _, b = source("dense", 2, 3)
    c = leaf(2, 3)
    if op == "cat0":
        y = torch.cat([a, b, c], 0)
    elif op == "cat_neg":
        y = torch.cat([a, b, c], -1)
    elif op == "stack":
        y = torch.stack([a, b, c], 1)
    elif op == "stack_neg":
        y = torch.stack([a, b, c], -1)
    else:
        y = torch.where(a.detach() > 1.0, a, b)
    R = seed_like(y)
    if op == "where":
        ra, rb = rel(y, R, [a, b])
        ga, gb = vjp(y, [a, b], R)
    else:
        ra, rb, rc = rel(y, R, [a, b, c])
        ga, gb, gc = vjp(y, [a, b, c], R)
        close(rc, gc)
    close(ra, ga)
    close(rb, gb)
    close(ra.sum() + rb.sum() + (0 if op == "where" else rc.sum()), R.sum())


def test_where_broadcast():
    _, a = source("dense", 3, 4)
    b = leaf(4)
    cond = a.detach() > 0
    y = torch.where(cond, a, b)
    R = seed_like(y)
    ra, rb = rel(y, R, [a, b])
    close(ra, torch.where(cond, R, 0.0))
    close(rb, torch.where(cond, 0.0, R).sum(0))


def test_cat_with_parameter_routes_to_both():
    """ViT's class token: cat(parameter, activation)."""
    cls = param(1, 1, 4)
    _, a = source("dense", 2, 3, 4)
    y = torch.cat([cls.expand(2, -1, -1), a], 1)
    R = seed_like(y)
    ra, rc = rel(y, R, [a, cls])
    close(ra, R[:, 1:])
    close(rc, R[:, :1].sum(0, keepdim=True))


@pytest.mark.parametrize("cfg", [dict(kernel_size=2), dict(kernel_size=3, stride=1, padding=1),
                                 dict(kernel_size=2, stride=1, dilation=2), dict(kernel_size=3, stride=2,
                                                                                  ceil_mode=True)])
def test_max_pool2d(cfg):
    _, a = source("dense", 2, 3, 6, 6)
    y, idx = F.max_pool2d(a, return_indices=True, **cfg)
    assert type(y.grad_fn).__name__ == "MaxPool2DWithIndicesBackward0"
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    expected = torch.zeros(2, 3, 36, dtype=D).scatter_add(2, idx.flatten(2), R.flatten(2)).reshape(a.shape)
    close(ra, expected)


def test_max_pool3d():
    a = leaf(1, 2, 4, 4, 4)
    y, idx = F.max_pool3d(a, 2, stride=(1, 2, 2), return_indices=True)
    assert type(y.grad_fn).__name__ == "MaxPool3DWithIndicesBackward0"
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    close(ra, torch.zeros(1, 2, 64, dtype=D).scatter_add(2, idx.flatten(2), R.flatten(2)).reshape(a.shape))


def test_max_pool_output_recovered_for_a_sum():
    """MaxPool is an Arg Node: the sum after it reads the pooled values from its saved input."""
    x = leaf(1, 2, 4, 4)
    a = x * 1.0
    h = F.max_pool2d(a, 2)
    y = h.sum((2, 3))
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    hv = h.detach()
    (g,) = vjp(h, [a], hv * R[..., None, None] / stab(hv.sum((2, 3), keepdim=True)))
    close(ra, g)


def test_max_pool2d_unbatched_output_recovered():
    x = leaf(2, 4, 4)
    a = x * 1.0
    h = F.max_pool2d(a, 2)
    y = h.softmax(-1)
    R = seed_like(y)
    (ra,) = rel(y, R, [a], preset="attnlrp")
    hv, sv = h.detach(), y.detach()
    Rh = hv * (R - sv * R.sum(-1, keepdim=True))
    (g,) = vjp(h, [a], Rh)
    close(ra, g)


# ----------------------------------------------------------------------------------------------------------
# embedding


def test_embedding():
    W = param(7, 4)
    ids = torch.tensor([[1, 3, 3], [0, 6, 1]])
    e = F.embedding(ids, W)
    V = param(4, 2)
    y = e @ V  # the embedding output is data: the dense layer gets the ε-rule
    R = seed_like(y)
    re, rw = rel(y, R, [e, W])
    ev, Vv = e.detach(), V.detach()
    close(re, torch.einsum("bik,kj,bij->bik", ev, Vv, R / stab(ev @ Vv)))
    close(rw, torch.zeros(7, 4, dtype=D).index_add(0, ids.reshape(-1), re.reshape(-1, 4)))


# ----------------------------------------------------------------------------------------------------------
# normalisation: family "norm" (identity to the input by default)


@pytest.mark.parametrize("src", ["leaf", "dense", "noncontig"])
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm(src, affine):
    _, a = source(src, 2, 3, 4)
    w, b = (param(4), param(4)) if affine else (None, None)
    y = F.layer_norm(a, (4,), w, b)
    assert type(y.grad_fn).__name__ == "NativeLayerNormBackward0"
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    close(ra, R)
    for preset in ("attnlrp", "paper", "cp_lrp"):
        (ra,) = rel(y, R, [a], preset=preset)
        close(ra, R)
    (ra,) = rel(y, R, [a], rules={"norm": Block()})
    close(ra, torch.zeros_like(R))


def test_layer_norm_output_recovered_for_add():
    """NativeLayerNorm is an Arg Node: an addition after it reads its output from the saved statistics."""
    _, a = source("dense", 2, 3, 4)
    _, c = source("exp", 2, 3, 4)
    w, b = param(4), param(4)
    h = F.layer_norm(a, (4,), w, b)
    y = h + c
    R = seed_like(y)
    ra, rc = rel(y, R, [a, c])
    hv, cv = h.detach(), c.detach()
    s = R / stab(hv + cv)
    close(ra, hv * s)
    close(rc, cv * s)


@pytest.mark.parametrize("training", [False, True])
def test_batch_norm(training):
    _, a = source("scalar_mul", 3, 2, 4, 4)
    bn = torch.nn.BatchNorm2d(2).double()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    bn.train(training)
    h = bn(a)
    assert type(h.grad_fn).__name__ == "NativeBatchNormBackward0"
    _, c = source("exp", 3, 2, 4, 4)
    y = h + c  # the batch-norm output (bias included) must be recovered for the addition
    R = seed_like(y)
    ra, rc = rel(y, R, [a, c])
    hv, cv = h.detach(), c.detach()
    s = R / stab(hv + cv)
    close(ra, hv * s)
    close(rc, cv * s)


# ----------------------------------------------------------------------------------------------------------
# softmax


@pytest.mark.parametrize("src", ["leaf", "scalar_mul", "dense", "linear_bias", "noncontig"])
@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_softmax_attnlrp(src, dim):
    _, a = source(src, 3, 4)
    y = torch.softmax(a, dim)
    R = seed_like(y)
    (ra,) = rel(y, R, [a], preset="attnlrp")
    av, sv = a.detach(), y.detach()
    close(ra, av * (R - sv * R.sum(dim, keepdim=True)))


@pytest.mark.parametrize("preset, expect", [("epsilon", "pass"), ("cp_lrp", "block"), ("paper", "block")])
def test_softmax_other_presets(preset, expect):
    _, a = source("dense", 3, 4)
    y = torch.softmax(a, -1)
    R = seed_like(y)
    (ra,) = rel(y, R, [a], preset=preset)
    close(ra, R if expect == "pass" else torch.zeros_like(R))


MASK = torch.tensor([[False, True, False, False], [False, False, False, True], [True, False, False, False]])


def _masked_softmax_case(how, seed_masked):
    _, a = source("dense", 3, 4)
    if how == "where_scalar":
        m = torch.where(MASK, float("-inf"), a)
    else:
        m = a + torch.zeros(3, 4, dtype=D).masked_fill(MASK, float("-inf"))
    y = torch.softmax(m, -1)
    R = seed_like(y)
    if not seed_masked:  # as behind attention's P @ V: no relevance on probabilities that are 0
        R = torch.where(MASK, 0.0, R)
    (ra,) = rel(y, R, [a], preset="attnlrp")
    av, sv = a.detach(), y.detach()
    R_m = torch.where(MASK, 0.0, av * (R - sv * R.sum(-1, keepdim=True)))  # AttnLRP: masked logits get 0
    if how == "add_mask":  # ε-rule of the mask addition, the mask (a constant) is 0 where attended
        R_m = torch.where(MASK, 0.0, av * R_m / stab(av))
    close(ra, R_m)


@pytest.mark.parametrize("how, seed_masked", [
    ("where_scalar", False), ("where_scalar", True), ("add_mask", False), ("add_mask", True),
])
def test_softmax_masked_logits_get_zero(how, seed_masked):
    """Masked logits (-inf) from where() or an added mask (constants autograd did not record) get no relevance."""
    _masked_softmax_case(how, seed_masked)


def test_softmax_after_masked_fill_pass():
    _, a = source("dense", 3, 4)
    y = torch.softmax(a.masked_fill(MASK, float("-inf")), -1)
    R = seed_like(y)
    (ra,) = rel(y, R, [a])
    close(ra, torch.where(MASK, 0.0, R))


def test_masked_fill_values_for_a_sum_are_refused():
    """masked_fill does not save its fill value: only softmax (which checks the replay) may use a replayed output."""
    _, a = source("dense", 3, 4)
    y = a.masked_fill(MASK, 0.0).sum(-1)
    with pytest.raises(dynamiclrp.ActivationUnavailableError):
        rel(y, seed_like(y), [a])


def test_softmax_after_masked_fill_attnlrp():
    _, a = source("dense", 3, 4)
    mask = MASK
    m = a.masked_fill(mask, float("-inf"))
    y = torch.softmax(m, -1)
    R = seed_like(y)
    (rm,) = rel(y, R, [m], preset="attnlrp")
    mv, sv = m.detach(), y.detach()
    expected = torch.where(mask, 0.0, mv * (R - sv * R.sum(-1, keepdim=True)))
    close(rm, expected)
    (ra,) = rel(y, R, [a], preset="attnlrp")
    close(ra, expected)


# ----------------------------------------------------------------------------------------------------------
# scaled dot-product attention, fused node split into values matmul, softmax, mask add, scores matmul


def sdpa_reference(q, k, v, R, preset="attnlrp", mask=None, is_causal=False, scale=None, drop=None):
    """Relevance of q, k, v under ``preset``, from an explicit eager recomputation of attention.

    ``drop``: a dropout multiplier applied to the probabilities (attention dropout), a constant factor.
    """
    q, k, v = q.detach(), k.detach(), v.detach()
    rep = q.shape[-3] // k.shape[-3]
    kr, vr = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    L, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * (q @ kr.mT)
    m = torch.zeros(L, S, dtype=D)
    if mask is not None:
        m = m + (torch.zeros(mask.shape, dtype=D).masked_fill(~mask, float("-inf"))
                 if mask.dtype == torch.bool else mask)
    if is_causal:
        m = m + torch.zeros(L, S, dtype=D).masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    logits = scores + m
    P = torch.softmax(logits, -1)
    Pd = P if drop is None else P * drop
    out = Pd @ vr

    def fold(t):
        return t.unflatten(-3, (k.shape[-3], rep)).sum(-3)

    zero = torch.zeros_like
    if preset == "attnlrp":  # uniform product rule for P @ V, AttnLRP softmax, ε for the mask, uniform for Q Kᵀ
        s = R / (2 * stab(out))
        R_P = Pd * (s @ vr.mT)  # the dropout product by a constant passes it on unchanged
        R_v = v * fold(Pd.mT @ s)
        finite = torch.isfinite(logits)
        R_L = torch.where(finite, logits * (R_P - P * R_P.sum(-1, keepdim=True)), 0.0)
        if mask is not None or is_causal:
            m_fin = torch.where(torch.isfinite(m), m, 0.0)
            R_S = torch.where(finite, scores * R_L / stab(scores + m_fin), 0.0)
        else:
            R_S = R_L
        s2 = R_S / (2 * stab(scores))
        R_q = q * (scale * (s2 @ kr))
        R_k = fold(kr * (scale * (s2.mT @ q)))
        return R_q, R_k, R_v
    if preset == "cp_lrp":  # attention weights constant, softmax blocked
        s = R / stab(out)
        return zero(q), zero(k), v * fold(P.mT @ s)
    if preset == "paper":  # uniform (ε = 1e-11) on the values product, softmax blocked
        s = R / (2 * stab(out, 1e-11))
        return zero(q), zero(k), v * fold(P.mT @ s)
    raise ValueError(preset)


def _qkv(hq=2, hkv=2, L=3, S=3, d=4, projected=False):
    if not projected:
        return leaf(2, hq, L, d), leaf(2, hkv, S, d), leaf(2, hkv, S, d)
    x = leaf(2, max(L, S), 6)

    def proj(h, n):
        return (x[:, :n] @ param(6, h * d, scale=0.5)).view(2, n, h, d).transpose(1, 2)

    return proj(hq, L), proj(hkv, S), proj(hkv, S)


SDPA_CASES = {
    "plain": dict(),
    "projected": dict(projected=True),
    "scale": dict(scale=0.3),
    "float_mask": dict(mask="float"),
    "bool_mask": dict(mask="bool"),
    "causal": dict(is_causal=True),
    "causal_projected": dict(is_causal=True, projected=True),
    "gqa": dict(hq=4, hkv=2, gqa=True),
    "gqa_causal_projected": dict(hq=4, hkv=2, gqa=True, is_causal=True, projected=True),
    "cross_lengths": dict(L=2, S=5),
    "cross_lengths_mask": dict(L=2, S=5, mask="bool"),
    "causal_fewer_queries": dict(L=2, S=4, is_causal=True),
    "causal_more_queries": dict(L=4, S=2, is_causal=True),
}


def _run_sdpa(case):
    c = dict(SDPA_CASES[case])
    q, k, v = _qkv(c.get("hq", 2), c.get("hkv", 2), c.get("L", 3), c.get("S", 3), projected=c.get("projected", False))
    L, S = q.shape[-2], k.shape[-2]
    mask = None
    if c.get("mask") == "float":
        mask = torch.randn(L, S, dtype=D)
    elif c.get("mask") == "bool":
        mask = torch.rand(L, S) > 0.4
        mask[:, 0] = True  # no fully masked row
    kw = dict(attn_mask=mask, is_causal=c.get("is_causal", False), scale=c.get("scale"))
    if c.get("gqa"):
        kw["enable_gqa"] = True
    y = F.scaled_dot_product_attention(q, k, v, **kw)
    return q, k, v, y, dict(mask=mask, is_causal=kw["is_causal"], scale=kw["scale"])


@pytest.mark.parametrize("case", list(SDPA_CASES))
@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp", "paper"])
def test_sdpa(case, preset):
    q, k, v, y, kw = _run_sdpa(case)
    assert type(y.grad_fn).__name__.startswith("ScaledDotProduct")
    R = seed_like(y)
    rq, rk, rv = rel(y, R, [q, k, v], preset=preset)
    eq, ek, ev = sdpa_reference(q, k, v, R, preset=preset, **kw)
    close(rv, ev)
    close(rq, eq)
    close(rk, ek)


def test_sdpa_matches_eager_attention_values_path():
    """With the softmax blocked (cp_lrp) the fused node and eager attention written out agree exactly."""
    q, k, v = leaf(1, 2, 3, 4), leaf(1, 2, 3, 4), leaf(1, 2, 3, 4)
    R = torch.randn(1, 2, 3, 4, dtype=D)
    fused = rel(F.scaled_dot_product_attention(q, k, v), R, [q, k, v], preset="cp_lrp")
    p = torch.softmax(q @ k.mT / 2.0, -1)
    eager = rel(p @ v, R, [q, k, v], preset="cp_lrp")
    for f, e in zip(fused, eager):
        close(f, e)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp"])
def test_fused_sdpa_in_low_precision_divides_by_the_kernels_output(dtype, tol, causal, preset):
    """The relevance reaching a fused attention node was formed from the output its kernel computed. The node's
    rule divides by that output, not by a replay of softmax(q kᵀ) v: in float32 or bf16 the replay differs from
    the kernel's output by rounding errors absolute to the sum, and where an output is near zero their ratio was
    arbitrary (before: bf16 errors 0.1-6, float32 4e-5). Seeded with the output itself, so that every output
    carries relevance; against the float64 math path, within the dtype's own rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    q0, k0, v0 = (torch.randn(2, 4, 16, 64, dtype=D) for _ in range(3))

    def run(dt, backend):
        q, k, v = (t.to(dt).requires_grad_() for t in (q0, k0, v0))
        with sdpa_kernel(backend):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return y, dynamiclrp.propagate(y, target=lambda o: o.clone(), wrt=[q, k, v], preset=preset).inputs

    y, fused = run(dtype, SDPBackend.FLASH_ATTENTION)
    assert type(y.grad_fn).__name__.startswith("ScaledDotProduct")
    _, reference = run(D, SDPBackend.MATH)
    for got, want in zip(fused, reference):
        if not want.any():  # cp_lrp: queries and keys get nothing
            assert not got.any()
            continue
        assert float((got.double() - want).abs().max() / want.abs().max()) < tol


def test_sdpa_math_path_with_dropout():
    """On CPU, SDPA with dropout runs torch's math path (safe softmax, dropout product, bmm): same rules."""
    q, k, v = leaf(1, 2, 3, 4), leaf(1, 2, 3, 4), leaf(1, 2, 3, 4)
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    drop, kinds, stack = None, set(), [y.grad_fn]
    while stack:
        fn = stack.pop()
        kinds.add(type(fn).__name__)
        if type(fn).__name__ == "MulBackward0" and fn.next_functions[1][0] is None:
            drop = fn._saved_other
        stack.extend(c for c, _ in fn.next_functions if c is not None)
    if "ScaledDotProductFlashAttentionForCpuBackward0" in kinds:
        pytest.skip("this torch fuses attention with dropout on CPU")
    assert drop is not None and "SafeSoftmaxBackward0" in kinds
    R = seed_like(y)
    got = rel(y, R, [q, k, v], preset="attnlrp")
    for g, e in zip(got, sdpa_reference(q, k, v, R, drop=drop)):
        close(g, e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused attention with dropout needs CUDA")
def test_fused_sdpa_with_dropout_is_refused():
    q, k, v = (torch.randn(1, 2, 8, 16, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert type(y.grad_fn).__name__ in dynamiclrp.ops.attention.SDPA_KINDS
    with pytest.raises(dynamiclrp.DynamicLRPError, match="dropout"):
        dynamiclrp.propagate(y, target=torch.ones_like(y, dtype=torch.float32), wrt=[q, k, v], preset="attnlrp")


# ----------------------------------------------------------------------------------------------------------
# paper preset: conservation of the proportional rules


def test_paper_preset_sum_and_product_conserve():
    _, a = source("dense", 3, 4)
    _, b = source("exp", 3, 4)
    y = (a * b + a).sum(1)
    R = seed_like(y)
    ra, rb = rel(y, R, [a, b], preset="paper")
    av, bv = a.detach(), b.detach()
    t1, t2 = av * bv, av
    r_sum = R[:, None] * t1.abs() / ((t1.abs() + t2.abs()).sum(1, keepdim=True) + 1e-11)
    r_a_direct = R[:, None] * t2.abs() / ((t1.abs() + t2.abs()).sum(1, keepdim=True) + 1e-11)
    r_prod_a = r_sum * av.abs() / (av.abs() + bv.abs() + 1e-11)
    r_prod_b = r_sum * bv.abs() / (av.abs() + bv.abs() + 1e-11)
    close(ra, r_a_direct + r_prod_a)
    close(rb, r_prod_b)
    close(ra.sum() + rb.sum(), R.sum())


@pytest.mark.parametrize("affine", [True, False])
def test_eval_batch_norm_replays_the_forward_bit_for_bit(affine):
    """An eval-mode batch norm's output is replayed by the forward's own kernel on the running statistics: equal to
    the forward's output bit for bit (the written-out formula differs in the last bits); in training mode the
    formula on the saved batch statistics."""
    g = torch.Generator().manual_seed(3)
    bn = torch.nn.BatchNorm2d(5, affine=affine)
    bn.running_mean.normal_(generator=g)
    bn.running_var.uniform_(0.3, 3.0, generator=g)
    if affine:
        with torch.no_grad():
            bn.weight.normal_(generator=g)
            bn.bias.normal_(generator=g)
    x = torch.randn(2, 5, 7, 6, generator=g).requires_grad_()
    for training in (False, True):
        bn.train(training)
        y = bn(x * 1.5)
        node = dynamiclrp.graph.Graph.build([y.grad_fn]).nodes[0]
        assert node.kind == "NativeBatchNormBackward0"
        inputs = [saved(node.fn, "input"), bn.weight, bn.bias]
        replay = node.spec.forward(node, inputs)
        if training:
            torch.testing.assert_close(replay, y.detach(), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(replay, y.detach())


@pytest.mark.parametrize("negative_scale", [False, True])
def test_zplus_takes_a_merged_batch_norm_as_an_output_scale(negative_scale, monkeypatch):
    """conv → eval batch norm → ReLU under ``epsilon_plus``: the batch norm is merged (zennit's canonizers). With
    every scale γ/σ positive the rule gets it as ``out_scale`` and never forms the scaled weight; with one negative
    it gets the merged weight. Both are the z⁺ equation on the merged layer, computed here by hand."""
    g = torch.Generator().manual_seed(11)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    bn = torch.nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.3, 3.0, generator=g)
        bn.weight.uniform_(0.5, 2.0, generator=g)
        bn.bias.normal_(generator=g)
        if negative_scale:
            bn.weight[1] = -0.7
    model = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)  # both signs: the input layer
    seen = []
    linear = ZPlus.linear

    def spy(self, *args, out_scale=None, **kwargs):
        seen.append(out_scale is not None)
        return linear(self, *args, out_scale=out_scale, **kwargs)

    monkeypatch.setattr(ZPlus, "linear", spy)
    att = dynamiclrp.explain(model, x, target=lambda y: y, preset="epsilon_plus")
    assert seen == [not negative_scale]
    s = bn.weight.detach() / (bn.running_var + bn.eps).sqrt()
    w = conv.weight.detach() * s.reshape(-1, 1, 1, 1)
    b = (conv.bias.detach() - bn.running_mean) * s + bn.bias.detach()
    y = model(x).detach()
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
    zp = F.conv2d(xp, wp, padding=1) + F.conv2d(xn, wn, padding=1) + b.clamp(min=0).reshape(1, -1, 1, 1)
    q = y / (zp + 1e-6)  # R = y (seed: the output itself); the ReLU passes it on unchanged
    expected = (xp * torch.nn.grad.conv2d_input(x.shape, wp, q, padding=1)
                + xn * torch.nn.grad.conv2d_input(x.shape, wn, q, padding=1))
    torch.testing.assert_close(att.inputs[0], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("preset", ["epsilon_plus", "epsilon_alpha2_beta1", "epsilon_gamma_box"])
def test_sign_split_rules_are_told_what_follows_a_relu(preset, monkeypatch):
    """A linear op whose input is a ReLU's output (through max-pooling and views) tells its sign-split rule that
    x >= 0 (no reduction to find out); an input that can be negative (the image, a sigmoid shifted below 0) is
    split by the rule. The relevance is the same either way."""
    g = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Sigmoid(), Shift(-0.5),
        torch.nn.Conv2d(4, 2, 3), torch.nn.Flatten()).double().eval()
    x = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    told = []
    rule_types = {type(rule) for rule in get_preset(preset).families.values()}
    for cls in rule_types & {ZPlus, Gamma, AlphaBeta}:
        linear = cls.linear

        def spy(self, *args, x_nonnegative=False, __linear=linear, **kwargs):
            told.append(x_nonnegative)
            return __linear(self, *args, x_nonnegative=x_nonnegative, **kwargs)

        monkeypatch.setattr(cls, "linear", spy)
    att = dynamiclrp.explain(model, x, target=1, preset=preset)
    # visited from the output: the conv after the shifted sigmoid, the one after ReLU and max-pooling, the input's
    first_is_input = preset == "epsilon_gamma_box"  # its input layer takes z-box, which splits no sign
    assert told == ([False, True] if first_is_input else [False, True, False])
    monkeypatch.undo()
    assert torch.equal(att.inputs[0], dynamiclrp.explain(model, x, target=1, preset=preset).inputs[0])


class Shift(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return x + self.c


@pytest.mark.parametrize("layer", ["conv", "conv_transpose", "linear", "grouped_conv"])
def test_op_table_linear_maps_stack_along_their_input_features(layer):
    """The stacking dimensions the op table declares (``LinearMap.stack``) are the ones its ops sum over: z⁺ on an
    input with both signs (two terms, stacked into one product and one transpose) equals the unstacked rule;
    a grouped convolution declares none."""
    from dynamiclrp.graph import Graph
    from dynamiclrp.rules import LinearMap

    g = torch.Generator().manual_seed(9)
    module = {"conv": torch.nn.Conv2d(3, 2, 3, padding=1, bias=False),
              "conv_transpose": torch.nn.ConvTranspose2d(3, 2, 3, stride=2, bias=False),
              "linear": torch.nn.Linear(3, 2, bias=False),
              "grouped_conv": torch.nn.Conv2d(4, 2, 3, groups=2, bias=False)}[layer].double()
    x = torch.randn(*((5, 3) if layer == "linear" else (2, module.in_channels, 6, 6)), generator=g,
                    dtype=torch.float64, requires_grad=True)
    y = module(x)
    graph = Graph.build([y.grad_fn])
    node = next(n for n in graph.nodes if n.kind in ("ConvolutionBackward0", "MmBackward0"))
    x_i = 0 if layer != "linear" else next(i for i, e in enumerate(node.inputs)
                                           if e is not None and graph.nodes[e.child].data)
    lmap = node.spec.linear_map(node, x_i)
    if layer == "grouped_conv":
        assert lmap.stack is None
        return
    assert lmap.stack is not None
    xv = saved(node.fn, node.spec.names[x_i])
    wv = saved(node.fn, node.spec.names[1 - x_i])
    R = torch.randn(*y.shape, generator=g, dtype=torch.float64)
    calls = []
    fn = lmap.fn

    def counting(a, b):
        calls.append(1)
        return fn(a, b)

    stacked = ZPlus(0.25).linear(xv, wv, R, LinearMap(counting, lmap._transpose, lmap.stack))
    assert len(calls) == 1  # x⁺w⁺ + x⁻w⁻ in one product
    torch.testing.assert_close(stacked, ZPlus(0.25).linear(xv, wv, R, LinearMap(fn, lmap._transpose)),
                               rtol=1e-10, atol=1e-12)


def test_mask_check_returns_the_attended_weights():
    """The softmax's mask check (``ops.attention._check_mask``) on logits known with an untracked mask taken as 0:
    it returns the weights of the attended positions, the probabilities there and exactly 0 where masked, by -inf
    or by a finite fill value such as Swin's -100 (exp(-100) > 0 in float64); a row whose every logit a fill value
    rounded away (the smallest float added: equal weights whatever the scores) counts as masked, weights 0; the
    threshold is the whole row's, so a block of its keys gets the same weights. A position bias that is not a mask
    raises, at once or where the check is deferred (read with the pass's other flags); the tolerance grows with
    the logits' size."""
    from dynamiclrp.errors import ActivationUnavailableError
    from dynamiclrp.ops.attention import _check_mask, mask_checks_pass

    node = type("Node", (), {"kind": "SoftmaxBackward0", "id": 0})()

    def no_scratch(key, like):  # the run's scratch buffers: none here (each temporary fresh)
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=D, generator=g)
    mask = torch.zeros(3, 4, 6, dtype=D)
    mask[0, :, 4:] = -100.0
    mask[1, :, 3:] = -math.inf
    mask[2, 1] = torch.finfo(D).min  # every logit of the row rounded away: equal weights, whatever x
    x[1, 0, :3] = torch.tensor([0.0, -70.0, 0.0])  # a weight of 2e-31: attended (above 1e-30 / 6, not 1e-30 / 4)
    s = torch.softmax(x + mask, -1)
    assert bool((s[2, 1] == 1 / 6).all())
    weights = _check_mask(node, x, s, -1, no_scratch)
    expected = s * (mask == 0)
    assert torch.equal(weights, expected)
    assert float(s[0, :, 4:].min()) > 0 and float(weights[2, 1].abs().max()) == 0 and float(weights[1, 0, 1]) > 0
    block = _check_mask(node, x[..., :4], s[..., :4], -1, no_scratch, keys=6)
    assert torch.equal(block, expected[..., :4])
    scaled = _check_mask(node, x / 4, s, -1, no_scratch, scale=4.0)
    assert torch.equal(scaled, expected)
    # the tolerance grows with the logits (scale times x): a spread of 0.24 passes logits of size 200 (1e-3 x 201)
    wide = 100 * x[0] + torch.linspace(-0.3, 0.3, 6, dtype=D)
    assert float(wide.abs().max()) > 200
    _check_mask(node, 100 * x[0] / 4, torch.softmax(wide, -1), -1, no_scratch, scale=4.0)
    checks = []
    _check_mask(node, x[:2], s[:2], -1, no_scratch, checks)
    assert mask_checks_pass(checks[0][0].tolist(), [checks[0][1]])
    biased = torch.softmax(x + mask + torch.linspace(-1, 1, 6, dtype=D), -1)
    with pytest.raises(ActivationUnavailableError, match="position bias"):
        _check_mask(node, x, biased, -1, no_scratch)
    _check_mask(node, x, biased, -1, no_scratch, checks)
    assert not mask_checks_pass(checks[1][0].tolist(), [checks[1][1]])
