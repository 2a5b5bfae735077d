"""End-to-end tests of the propagation engine and the Promise System.

Exactness checks run in float64 on bias-free models with ε → 0 (``Epsilon(1e-12)`` for linear ops and sums)
and conservative product rules, where the relevance of the inputs must add up to the explained output value.
"""

from __future__ import annotations

import math
import os
import signal
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dynamiclrp
from dynamiclrp import engine
from dynamiclrp.ops import OPS, Identity
from dynamiclrp.promise import Promises
from dynamiclrp.rules import Epsilon, Pass, Uniform
from host_reads import HostReads

D = torch.float64
# batch norm passed unchanged (merging it into the convolution would give the layer a bias by design)
EXACT = {"linear": Epsilon(1e-12), "sum": Epsilon(1e-12), "product": Uniform(1e-12), "norm": Pass()}


# ----------------------------------------------------------------------------------------------------------
# helpers


@contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging the suite) if the body runs longer than ``seconds``."""

    def handler(signum, frame):
        raise TimeoutError(f"propagation did not finish within {seconds} s (deadlock?)")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def row_sums(r: torch.Tensor) -> torch.Tensor:
    return r.reshape(r.shape[0], -1).sum(1)


def assert_row_conservation(att, y, target, rel=1e-6):
    """Per row: the input relevance sums to the output value at the target."""
    expected = y.detach()[torch.arange(y.shape[0]), torch.as_tensor(target)]
    got = row_sums(att.inputs[0])
    assert got.dtype == D
    for g, e in zip(got.tolist(), expected.tolist()):
        assert g == pytest.approx(e, rel=rel, abs=1e-12)


def non_leaf_nodes(att) -> int:
    return sum(1 for n in att.extra["run"].graph.nodes if n.inputs)


def randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


# ----------------------------------------------------------------------------------------------------------
# models


def make_mlp(bias=False):
    return nn.Sequential(nn.Linear(6, 16, bias=bias), nn.ReLU(), nn.Linear(16, 12, bias=bias), nn.ReLU(),
                         nn.Linear(12, 4, bias=bias))


def make_cnn(bias=False):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, bias=bias), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, 5, bias=bias),
    )


class ResCNN(nn.Module):
    """Residual blocks x + f(x), f with batch norm (eval mode): relevance passes norms unchanged."""

    def __init__(self, bias=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.f1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4), nn.ReLU(),
                                nn.Conv2d(4, 4, 3, padding=1, bias=bias))
        self.f2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4, affine=False),
                                nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=bias))
        self.fc = nn.Linear(4, 3, bias=bias)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.f1(x))
        x = x + self.f2(x)
        return self.fc(x.mean((2, 3)))


class CatSplitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 8, bias=False)
        self.l2 = nn.Linear(4, 4, bias=False)
        self.l3 = nn.Linear(12, 3, bias=False)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        a, b = h.split(4, dim=1)
        c = torch.cat([self.l2(a), b, a], 1)
        u, v = torch.stack([c, torch.tanh(c)], 0).unbind(0)
        return self.l3(u + v)


class TinyTransformer(nn.Module):
    """Pre-norm block: self-attention (by hand or SDPA) and an MLP, both residual; mean-pooled head."""

    def __init__(self, d=8, heads=2, sdpa=False, bias=False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=bias) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=bias), nn.LayerNorm(d, bias=bias)
        self.f1, self.f2 = nn.Linear(d, 16, bias=bias), nn.Linear(16, d, bias=bias)
        self.head = nn.Linear(d, 3, bias=bias)
        self.heads, self.sdpa = heads, sdpa

    def forward(self, x):
        B, T, d = x.shape
        h = self.heads
        y = self.ln1(x)
        q, k, v = (f(y).view(B, T, h, d // h).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1) @ v
        x = x + self.o(o.transpose(1, 2).reshape(B, T, d))
        x = x + self.f2(F.gelu(self.f1(self.ln2(x))))
        return self.head(x.mean(1))


def seeded(factory, seed=0, dtype=D):
    torch.manual_seed(seed)
    return factory().to(dtype).eval()


# ----------------------------------------------------------------------------------------------------------
# exact conservation, end to end


def test_mlp_conserves():
    m = seeded(make_mlp)
    x = torch.randn(3, 6, dtype=D, requires_grad=True)
    y = m(x)
    att = dynamiclrp.propagate(y, target=[0, 3, 1], wrt=[x], rules=EXACT)
    assert att.inputs[0].shape == x.shape
    assert_row_conservation(att, y, [0, 3, 1])
    assert att.stats.ops["ReluBackward0"] == 2


def test_cnn_conserves():
    m = seeded(make_cnn)
    x = torch.randn(2, 3, 10, 10, dtype=D, requires_grad=True)
    y = m(x)
    att = dynamiclrp.propagate(y, target=[1, 4], wrt=[x], rules=EXACT)
    assert_row_conservation(att, y, [1, 4])
    for kind in ("ConvolutionBackward0", "MaxPool2DWithIndicesBackward0", "AdaptiveAvgPool2DBackward0"):
        assert kind in att.stats.ops
    # max pooling routes everything to the window maxima: 3/4 of the first conv's outputs get nothing
    assert (att.inputs[0] != 0).any()


def test_residual_cnn_with_batchnorm_conserves():
    m = seeded(ResCNN)
    randomise_bn(m)
    x = torch.randn(2, 3, 8, 8, dtype=D, requires_grad=True)
    y = m(x)
    att = dynamiclrp.propagate(y, target=[0, 2], wrt=[x], rules=EXACT)
    assert att.stats.ops["NativeBatchNormBackward0"] == 2
    assert att.stats.ops["AddBackward0"] == 2
    assert_row_conservation(att, y, [0, 2])


@pytest.mark.parametrize("train", [False, True])
def test_batchnorm_with_affine_bias_is_finite(train):
    m = seeded(lambda: ResCNN(bias=True))
    randomise_bn(m)
    m.train(train)
    x = torch.randn(4, 3, 8, 8, dtype=D, requires_grad=True)
    y = m(x)
    att = dynamiclrp.propagate(y, target=1, wrt=[x])
    assert torch.isfinite(att.inputs[0]).all()
    assert att.inputs[0].abs().sum() > 0
    # the ledger accounts for every bit of the seed, whatever biases took: in the linear ops' denominators
    # (absorbed there, the default) or split off to the bias parameters (the paper's bias rule)
    c = att.conservation()
    assert c["seed"] == pytest.approx(c["inputs"] + c["parameters"] + c["absorbed"], rel=1e-9, abs=1e-12)
    assert c["parameters"] == 0.0 and c["absorbed"] != 0.0
    x2 = x.detach().clone().requires_grad_()
    split = dynamiclrp.propagate(m(x2), target=1, wrt=[x2], rules={"bias": dynamiclrp.rules.Epsilon(1e-6)})
    c = split.conservation()
    assert c["seed"] == pytest.approx(c["inputs"] + c["parameters"] + c["absorbed"], rel=1e-9, abs=1e-12)
    assert c["parameters"] != 0.0


def test_cat_split_stack_unbind_conserves():
    m = seeded(CatSplitNet)
    x = torch.randn(3, 6, dtype=D, requires_grad=True)
    y = m(x)
    att = dynamiclrp.propagate(y, target=[0, 1, 2], wrt=[x], rules=EXACT)
    for kind in ("CatBackward0", "SplitBackward0", "StackBackward0", "UnbindBackward0"):
        assert att.stats.ops[kind] == 1
    assert_row_conservation(att, y, [0, 1, 2])


@pytest.mark.parametrize("sdpa", [False, True], ids=["by-hand", "sdpa"])
def test_transformer_block_conserves(sdpa):
    m = seeded(lambda: TinyTransformer(sdpa=sdpa), seed=1)
    x = torch.randn(2, 5, 8, dtype=D, requires_grad=True)
    y = m(x)
    att = dynamiclrp.propagate(y, target=[0, 2], wrt=[x], preset="epsilon", rules=EXACT)
    assert_row_conservation(att, y, [0, 2])
    assert att.stats.ops["NativeLayerNormBackward0"] == 2
    assert ("ScaledDotProductFlashAttentionForCpuBackward0" in att.stats.ops) == sdpa


def test_sdpa_matches_attention_by_hand():
    # the fused node is split into the same primitive parts as attention written out; only the place of the
    # scale differs (inside the scores product for SDPA), which matters through the product's stabiliser alone
    x = torch.randn(2, 5, 8, dtype=D)
    rel = []
    for sdpa in (False, True):
        m = seeded(lambda sdpa=sdpa: TinyTransformer(sdpa=sdpa), seed=1)
        xi = x.clone().requires_grad_()
        for preset in ("epsilon", "attnlrp"):
            rel.append(dynamiclrp.propagate(m(xi), target=[0, 2], wrt=[xi], preset=preset,
                                            rules={"product": Uniform(1e-12)}).inputs[0])
    torch.testing.assert_close(rel[0], rel[2], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(rel[1], rel[3], rtol=1e-7, atol=1e-9)
    assert not torch.allclose(rel[0], rel[1])  # the softmax rule does matter


def test_attnlrp_ledger_accounts_for_everything():
    m = seeded(lambda: TinyTransformer(bias=True), seed=2)
    x = torch.randn(2, 5, 8, dtype=D, requires_grad=True)
    y = m(x)
    att = dynamiclrp.propagate(y, target=[1, 0], wrt=[x], preset="attnlrp")
    c = att.conservation()
    assert c["seed"] == pytest.approx(float((y[0, 1] + y[1, 0]).detach()), rel=1e-12)
    assert c["seed"] == pytest.approx(c["inputs"] + c["parameters"] + c["absorbed"], rel=1e-9, abs=1e-12)
    assert abs(c["absorbed"]) > 1e-6  # the AttnLRP softmax rule is not conservative ...
    soft = [e for e in att.ledger if e.kind == "SoftmaxBackward0"]
    assert len(soft) == 1 and abs(float(soft[0].absorbed)) > 1e-6  # ... and the ledger says where
    # biases took their share, inside the linear ops' denominators: absorbed beyond the softmax's part
    assert abs(c["absorbed"] - sum(float(e.absorbed) for e in soft)) > 1e-6
    for e in att.ledger:  # every entry balances by construction
        assert float(e.r_in) == pytest.approx(float(e.r_data + e.r_params + e.absorbed), abs=1e-12)


def test_ledger_zero_absorption_when_exact():
    m = seeded(make_mlp)
    x = torch.randn(2, 6, dtype=D, requires_grad=True)
    att = dynamiclrp.propagate(m(x), target=0, wrt=[x], rules=EXACT)
    c = att.conservation()
    assert c["parameters"] == 0.0
    assert abs(c["absorbed"]) <= 1e-9 * abs(c["seed"])
    assert c["inputs"] == pytest.approx(c["seed"], rel=1e-9)


# ----------------------------------------------------------------------------------------------------------
# Promise System invariants


class DiamondNet(nn.Module):
    """The input feeds three branches, and one hidden activation is used three times (twice in one op)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(5, 5, bias=False) for _ in range(3))
        self.out = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        h = self.a(x)
        u = h * 2.0 + torch.tanh(h) + h  # h: three consumers, no one saves it as an operand
        v = torch.relu(self.b(x)) + self.c(x)
        w = u + v + x  # x itself used a third time
        return self.out(w + w * 0.5)


def graphs_for_invariants():
    torch.manual_seed(3)
    cases = {
        "residual": (seeded(ResCNN, 3), torch.randn(2, 3, 8, 8, dtype=D)),
        "diamond": (seeded(DiamondNet, 3), torch.randn(3, 5, dtype=D)),
        "catsplit": (seeded(CatSplitNet, 3), torch.randn(3, 6, dtype=D)),
        "transformer": (seeded(lambda: TinyTransformer(sdpa=True), 3), torch.randn(2, 4, 8, dtype=D)),
    }
    randomise_bn(cases["residual"][0])
    return cases


@pytest.mark.parametrize("name", ["residual", "diamond", "catsplit", "transformer"])
def test_each_rule_runs_once_and_each_activation_is_recovered_once(name, monkeypatch):
    model, x = graphs_for_invariants()[name]
    x.requires_grad_()
    y = model(x)
    contexts: list[int] = []
    replays: list[int] = []

    class CountingContext(engine.Context):
        def __init__(self, run, node, R):
            if R:  # a context that runs the node's rule (one built only to ask a node's rules is given no R)
                contexts.append(node.id)
            super().__init__(run, node, R)

    monkeypatch.setattr(engine, "Context", CountingContext)
    orig_replay = Promises._replay

    def replay(self, node):
        replays.append(node.id)
        return orig_replay(self, node)

    with mock.patch.object(Promises, "_replay", autospec=True, side_effect=replay) as spy, time_limit(60):
        att = dynamiclrp.propagate(y, target=0, wrt=[x], rules=EXACT, keep_run=True)
    assert len(contexts) == len(set(contexts)), "a node's rule ran twice"
    assert att.stats.rules_run == len(contexts)
    assert 0 < att.stats.rules_run <= non_leaf_nodes(att)
    assert len(replays) == len(set(replays)), "an activation was replayed twice"
    assert spy.call_count == att.stats.internal_nodes == len(replays)
    assert att.stats.recovered >= att.stats.internal_nodes
    assert att.stats.recovered <= len(att.extra["run"].promises.recovered_keys)  # each value counted once
    assert att.stats.promises > 0
    assert_row_conservation(att, y, [0] * x.shape[0])


def test_diamond_graph_replays_internal_nodes_and_conserves():
    m = seeded(DiamondNet, 4)
    x = torch.randn(4, 5, dtype=D, requires_grad=True)
    y = m(x)
    with time_limit(30):
        att = dynamiclrp.propagate(y, target=[0, 1, 2, 0], wrt=[x], rules=EXACT)
    assert att.stats.internal_nodes > 0  # h * 2.0 and friends had to be replayed
    assert att.stats.delta >= att.stats.promises
    assert_row_conservation(att, y, [0, 1, 2, 0])


class _Twice(torch.autograd.Function):
    """y = 2 x, by a custom autograd Function (node type ``_TwiceBackward``)."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


@pytest.fixture
def twice_op():
    spec = Identity(replay=lambda fn, x: 2 * x)
    dynamiclrp.register_op(_Twice, spec)
    try:
        yield spec
    finally:
        OPS.pop("_TwiceBackward", None)


def test_rule_of_a_shared_node_runs_once(twice_op):
    lin_a, lin_b, out = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False)
    for m in (lin_a, lin_b, out):
        m.double()
    x = torch.randn(3, 4, dtype=D, requires_grad=True)
    t1 = _Twice.apply(lin_a(x))
    t2 = _Twice.apply(x)
    h = lin_b(t1) + torch.tanh(t1) + t1 * 3.0 + t2 + t2  # t1 has 3 consumers, t2 two (in the same add chain)
    y = out(h)
    with mock.patch.object(twice_op, "relevance", wraps=twice_op.relevance) as spy:
        att = dynamiclrp.propagate(y, target=1, wrt=[x], rules=EXACT)
    assert spy.call_count == 2
    ids = [c.args[0].node.id for c in spy.call_args_list]
    assert len(set(ids)) == 2
    assert att.stats.ops["_TwiceBackward"] == 2
    assert_row_conservation(att, y, [1, 1, 1])


def test_frozen_model_with_input_requiring_grad():
    m = seeded(ResCNN, 5)
    randomise_bn(m)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    xa = x.clone().requires_grad_()
    ref = dynamiclrp.propagate(m(xa), target=[1, 2], wrt=[xa], rules=EXACT).inputs[0]
    for p in m.parameters():
        p.requires_grad_(False)
    xb = x.clone().requires_grad_()
    y = m(xb)
    att = dynamiclrp.propagate(y, target=[1, 2], wrt=[xb], rules=EXACT)
    assert "AccumulateGrad" in att.stats.ops and att.stats.ops["AccumulateGrad"] == 1  # only the input
    assert att.stats.promises > 0  # operands autograd no longer saved had to be recovered
    assert_row_conservation(att, y, [1, 2])
    torch.testing.assert_close(att.inputs[0], ref, rtol=1e-9, atol=1e-12)
    assert all(not p.requires_grad and p.grad is None for p in m.parameters())


def test_frozen_model_with_biases():
    m = seeded(lambda: make_cnn(bias=True), 6, torch.float32)
    x = torch.randn(2, 3, 10, 10)
    ref = dynamiclrp.explain(m, x, target=[0, 3])
    m.requires_grad_(False)
    # explain() lets the parameters require grad for its forward, so a frozen model gives the same relevance
    att = dynamiclrp.explain(m, x, target=[0, 3])
    assert torch.equal(att.inputs[0], ref.inputs[0])
    assert not any(p.requires_grad for p in m.parameters())
    # on a graph recorded with frozen biases, the biases' share cannot be known: a clear error, not a guess
    xi = x.clone().requires_grad_()
    with pytest.raises(dynamiclrp.ActivationUnavailableError, match="require grad"):
        dynamiclrp.propagate(m(xi), target=[0, 3], wrt=[xi])


class BNResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.fc((x + self.bn(self.conv(x))).mean((2, 3)))  # the add needs the batch norm's output


def test_frozen_batchnorm_bias_feeding_a_residual_add():
    """Batch norm does not save its bias; frozen, it is outside the graph: propagate refuses rather than
    rebuilding the output without it, and explain() (which lets parameters require grad) is exact."""
    m = seeded(BNResidual, 1)
    randomise_bn(m)  # non-zero bias
    x = torch.randn(2, 3, 5, 5, dtype=D)
    xa = x.clone().requires_grad_()
    ref = dynamiclrp.propagate(m(xa), target=0, wrt=[xa], rules=EXACT).inputs[0]
    m.bn.bias.requires_grad_(False)
    xb = x.clone().requires_grad_()
    with pytest.raises(dynamiclrp.ActivationUnavailableError, match="NativeBatchNorm"):
        dynamiclrp.propagate(m(xb), target=0, wrt=[xb], rules=EXACT)
    att = dynamiclrp.explain(m, x, target=0, rules=EXACT)
    torch.testing.assert_close(att.inputs[0], ref, rtol=1e-9, atol=1e-12)
    assert not m.bn.bias.requires_grad


def make_vgg_like():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 16), nn.ReLU(), nn.Dropout(),
        nn.Linear(16, 5),
    )


def test_vgg_like_promise_statistics():
    m = seeded(make_vgg_like, 7, torch.float32)
    n_bias = sum(isinstance(mod, (nn.Conv2d, nn.Linear)) for mod in m.modules())
    att = dynamiclrp.explain(m, torch.randn(2, 3, 8, 8), preset="paper")  # the paper's split bias rule
    assert att.stats.ops["AddBackward0"] == n_bias == 6
    # a bias addition needs its two operands (conv/mm output and bias), which autograd does not keep;
    # every other op of a VGG saved what its rule needs
    assert att.stats.promises == 2 * n_bias
    assert att.stats.internal_nodes == 0
    assert att.stats.delta == att.stats.promises  # each promise resolved by the node right below
    assert att.stats.rho == pytest.approx(att.stats.promises / att.stats.nodes)


# ----------------------------------------------------------------------------------------------------------
# the model and its graph are left as they were


def _grads(model, x, y):
    y.backward(torch.ones_like(y))
    return [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]


@pytest.mark.parametrize("name", ["rescnn", "transformer", "catsplit"])
def test_graph_gives_the_same_gradients_after_propagation(name):
    factory = {"rescnn": lambda: ResCNN(bias=True), "catsplit": CatSplitNet,
               "transformer": lambda: TinyTransformer(sdpa=True, bias=True)}[name]
    m = seeded(factory, 8, torch.float32)
    randomise_bn(m)
    shape = {"rescnn": (2, 3, 8, 8), "transformer": (2, 4, 8), "catsplit": (3, 6)}[name]
    x = torch.randn(shape)
    params_before = [p.detach().clone() for p in m.parameters()]
    buffers_before = [b.clone() for b in m.buffers()]

    xa = x.clone().requires_grad_()
    ya = m(xa)
    att = dynamiclrp.propagate(ya, target=1, wrt=[xa, *m.parameters()])
    assert torch.isfinite(att.inputs[0]).all()
    assert xa.grad is None and all(p.grad is None for p in m.parameters())
    for p, q in zip(m.parameters(), params_before):
        assert torch.equal(p, q)
    for b, c in zip(m.buffers(), buffers_before):
        assert torch.equal(b, c)
    after = _grads(m, xa, ya)

    m.zero_grad(set_to_none=True)
    xb = x.clone().requires_grad_()
    fresh = _grads(m, xb, m(xb))
    assert len(after) == len(fresh)
    for g, h in zip(after, fresh):
        assert torch.equal(g, h)


def test_explain_leaves_model_unchanged():
    torch.manual_seed(9)
    m = ResCNN(bias=True).eval()
    randomise_bn(m)
    m.f1.train()  # mixed modes must survive
    m.f1[1].eval()
    m.stem.weight.requires_grad_(False)
    m.fc.bias.requires_grad_(False)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    modes = {n: mod.training for n, mod in m.named_modules()}
    att = dynamiclrp.explain(m, torch.randn(2, 3, 8, 8), target=1, modules=["f1", "stem"],
                             params=["fc.weight"], module_rules={"f2": {"conv": Epsilon(0.1)}})
    assert torch.isfinite(att.inputs[0]).all()
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert {n: mod.training for n, mod in m.named_modules()} == modes
    assert all(p.grad is None for p in m.parameters())
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    for mod in m.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_same_input_twice_gives_bitwise_identical_relevance(name):
    if name == "cnn":
        m, x = seeded(lambda: make_cnn(bias=True), 10, torch.float32), torch.randn(2, 3, 10, 10)
    else:
        m, x = seeded(lambda: TinyTransformer(sdpa=True, bias=True), 10, torch.float32), torch.randn(2, 5, 8)
    modules = ["f1" if name == "transformer" else "1"]
    a = dynamiclrp.explain(m, x, target=[1, 2], preset="attnlrp", modules=modules)
    b = dynamiclrp.explain(m, x, target=[1, 2], preset="attnlrp", modules=modules)
    assert torch.equal(a.inputs[0], b.inputs[0])
    for k in a.modules:
        assert torch.equal(a.modules[k], b.modules[k])
    assert a.stats == b.stats


# ----------------------------------------------------------------------------------------------------------
# long graphs: iterative graph reading and replay


def test_long_tanh_chain_has_no_recursion_error():
    x0 = torch.randn(2, 3, dtype=D, requires_grad=True)
    x = x0
    for _ in range(20_000):
        x = torch.tanh(x)
    y = x.sum(1, keepdim=True)
    att = dynamiclrp.propagate(y, target=0, wrt=[x0], rules=EXACT)
    assert att.stats.nodes >= 20_000
    assert_row_conservation(att, y, [0, 0])


def test_long_add_chain_replays_without_recursion_error():
    x0 = (torch.rand(2, 3, dtype=D) + 0.5).requires_grad_()  # positive: no cancellation in the final sum
    x = x0
    for _ in range(10_000):  # Mul + Add per step; no node saves the sums, so the whole chain is replayed
        x = x + 1e-4 * x
    y = x.sum(1, keepdim=True)
    att = dynamiclrp.propagate(y, target=0, wrt=[x0], rules=EXACT)
    assert att.stats.nodes >= 20_000
    assert att.stats.internal_nodes >= 10_000
    assert_row_conservation(att, y, [0, 0])


# ----------------------------------------------------------------------------------------------------------
# full-size models


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_torchvision_models(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(11)
    m = getattr(torchvision.models, name)(weights=None).eval()
    att = dynamiclrp.explain(m, torch.randn(1, 3, 224, 224), target=7)
    r = att.inputs[0]
    assert r.shape == (1, 3, 224, 224)
    assert torch.isfinite(r).all() and r.abs().sum() > 0
    c = att.conservation()
    assert c["seed"] == pytest.approx(c["inputs"] + c["parameters"] + c["absorbed"], rel=1e-3, abs=1e-5)
    if name == "vgg16":  # 13 convolutions and 3 linear layers, each with a bias addition
        assert att.stats.ops["AddBackward0"] == 16
        # the bias goes into each layer's denominator: every activation a rule needs was saved
        assert att.stats.promises == 0
        paper = dynamiclrp.explain(m, torch.randn(1, 3, 224, 224), target=7, preset="paper")
        assert paper.stats.promises == 32  # the paper's split bias rule needs both operands of each addition


def test_tiny_bert_tokens():
    transformers = pytest.importorskip("transformers")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(12)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    att = dynamiclrp.explain(model, {"input_ids": ids, "attention_mask": mask}, target=[0, 2])
    assert att.tokens is not None and att.tokens.shape == (2, 7)
    assert torch.isfinite(att.tokens).all()
    assert att.tokens.abs().sum() > 0
    assert att.inputs == []  # no floating-point input
    assert att.stats.ops.get("EmbeddingBackward0", 0) >= 1
    # padded tokens are masked out of every attention: they receive nothing
    assert torch.equal(att.tokens[1, 5:], torch.zeros(2))
    assert all(not mod._forward_hooks for mod in model.modules())


@pytest.mark.parametrize("upper", ["epsilon", "flat"])
def test_pre_activation_read_off_the_relu_equals_recomputation(upper, monkeypatch):
    """A linear op's output (bias included) is read off the ReLU after it where relevance flows; with a rule above
    that sends relevance to zero activations (flat) it is recomputed. Either way the result is the same."""
    import dynamiclrp.ops.linear as linear

    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(4, 6, dtype=D)
    rules = {"4": dynamiclrp.rules.Flat()} if upper == "flat" else {}
    calls = []
    original = linear._pre_activation
    monkeypatch.setattr(linear, "_pre_activation", lambda *a: calls.append(original(*a)) or calls[-1])
    fast = dynamiclrp.explain(m, x, target=[0, 1, 2, 0], module_rules=rules).inputs[0]
    if upper == "flat":  # flat needs no output; below it relevance reaches zero activations: recomputed there
        assert len(calls) == 2 and calls[0] is None and calls[1] is not None
    else:  # the last layer's output is the explained output (known); the two below read theirs off the ReLUs
        assert len(calls) == 2 and all(c is not None for c in calls)
    monkeypatch.setattr(linear, "_pre_activation", lambda *a: None)
    slow = dynamiclrp.explain(m, x, target=[0, 1, 2, 0], module_rules=rules).inputs[0]
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-14)


def test_pre_activation_proved_from_the_graph_reads_nothing(monkeypatch):
    """Where every consumer of a ReLU's output weighs relevance by that output (ε on the layers above, the ε-rule
    of a residual sum), the graph proves that relevance is zero where the output is: no element-wise comparison
    and no read of a device value by the host (one per layer before, a wait on a GPU). Same relevance, bit for
    bit; with a flat rule above, the proof fails and the comparison decides (previous test). Node by node: the
    gradient form, which the ε-rules now have, reads neither."""
    import dynamiclrp.ops.linear as linear

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(torch.relu(self.b(h)) + h)

    torch.manual_seed(4)
    m = Residual().double()
    x = torch.randn(4, 6, dtype=D)
    proofs = []
    original = linear._weighs_by_value
    monkeypatch.setattr(linear, "_weighs_by_value", lambda *a: proofs.append(original(*a)) or proofs[-1])
    with HostReads() as proved:
        fast = dynamiclrp.explain(m, x, target=[0, 1, 2, 0], ledger=False, check_finite=False,
                                  gradient_form=False).inputs[0]
    assert proofs == [True, True]  # both ReLUs: the one under the sum and c, the one under b and the sum
    monkeypatch.setattr(linear, "_weighs_by_value", lambda *a: False)
    with HostReads() as compared:
        slow = dynamiclrp.explain(m, x, target=[0, 1, 2, 0], ledger=False, check_finite=False,
                                  gradient_form=False).inputs[0]
    assert compared.n - proved.n == 2
    assert torch.equal(fast, slow)


def _recomputations(monkeypatch, product) -> list[int]:
    """The ids of the nodes whose output ``product`` (an op entry) recomputes from its saved operands, as they
    happen (the caller clears the list between explanations)."""
    recomputed: list[int] = []
    real_output = product.output
    monkeypatch.setattr(product, "output", lambda node, nr: (recomputed.append(node.id), real_output(node, nr))[1])
    return recomputed


def test_a_copy_saved_behind_views_is_used(monkeypatch):
    """q = linear(x) is saved by the attention's bmm only after view/transpose/expand/clone/reshape: the Promise
    System undoes those views to hand the linear layer's rule its output z, where it would otherwise recompute
    the layer (MmBackward0's ``output`` from its saved operands); the relevance is the same either way."""
    from dynamiclrp.ops import OPS

    torch.manual_seed(4)
    proj = nn.Linear(8, 8, bias=False).double()
    x = torch.randn(2, 5, 8, dtype=D, requires_grad=True)
    mm = OPS["MmBackward0"]
    recomputed = _recomputations(monkeypatch, mm)

    def explain():
        recomputed.clear()
        qh = proj(x).view(2, 5, 2, 4).transpose(1, 2)  # (2, 2, 5, 4)
        y = ((qh @ qh.transpose(-1, -2)).softmax(-1) @ qh).sum((1, 2, 3))[:, None]
        return dynamiclrp.propagate(y, target=0, wrt=[x], rules={"linear": Epsilon(0.1)}).inputs[0]

    with_views = explain()
    assert not recomputed
    for spec in OPS.values():
        monkeypatch.setattr(spec, "invert", None)
    without = explain()
    assert recomputed  # the check above could fail: without undoing views the layer is recomputed
    torch.testing.assert_close(with_views, without, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("where", ["gelu", "gelu, scaled", "attention"])
def test_layer_output_with_bias_read_off_a_saved_copy(where, monkeypatch):
    """addmm's output (bias included) saved by a consumer (GELU saves its input; the attention matmul saves it
    behind views) gives the layer's product as that copy less the bias: the mm is not recomputed, and the relevance
    equals the recomputation's. The addition's factors (``beta``, ``alpha``) are host numbers: reading the copy
    costs no read of a device value (each one waits for a GPU)."""
    from dynamiclrp.ops import OPS
    from dynamiclrp.ops import linear as linear_ops

    torch.manual_seed(5)
    proj, head = nn.Linear(8, 8).double(), nn.Linear(8, 1).double()
    x = torch.randn(2, 5, 8, dtype=D, requires_grad=True)
    mm = OPS["AddmmBackward0"].product
    recomputed = _recomputations(monkeypatch, mm)

    def explain():
        recomputed.clear()
        if where == "gelu, scaled":
            h = torch.addmm(proj.bias, x.view(10, 8), proj.weight.t(), beta=0.5, alpha=2.0).view(2, 5, 8)
        else:
            h = proj(x)
        if where.startswith("gelu"):
            y = head(F.gelu(h)).sum(1)
        else:
            qh = h.view(2, 5, 2, 4).transpose(1, 2)
            y = ((qh @ qh.transpose(-1, -2)).softmax(-1) @ qh).sum((1, 2, 3))[:, None]
        return dynamiclrp.propagate(y, target=0, wrt=[x], rules={"linear": Epsilon(0.1)}, ledger=False,
                                    check_finite=False, gradient_form=False).inputs[0]

    from dynamiclrp.ops.elementwise import BiasAdd

    reads, read_off = [], BiasAdd.linear_output

    def counted(self, ctx, node):
        with HostReads() as r:
            out = read_off(self, ctx, node)
        reads.append(r.n)
        return out

    monkeypatch.setattr(BiasAdd, "linear_output", counted)
    fast = explain()
    assert reads and not any(reads)
    assert not recomputed or where.startswith("gelu") and len(recomputed) == 1  # the head's output feeds a sum
    n_fast = len(recomputed)
    monkeypatch.setattr(linear_ops, "_from_saved_layer_output", lambda ctx: None)
    slow = explain()
    assert len(recomputed) > n_fast  # the check above could fail: without the copy the layer is recomputed
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-14)


def test_softmax_mask_check_refuses_a_position_bias_and_accepts_a_mask():
    """An untracked additive constant before softmax is replayed as zero; the check (log s - logits constant per row
    on attended positions) must refuse a position bias (a wrong answer otherwise) and accept a plain mask, whose
    masked positions then get exactly zero relevance."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 5, 4, generator=g, dtype=D).requires_grad_() for _ in range(3))

    def explain(const):
        y = torch.softmax(q @ k.transpose(-1, -2) + const, -1) @ v
        return dynamiclrp.propagate(y, wrt=[q, k, v], preset="attnlrp").inputs

    bias = torch.arange(5, dtype=D)[None, :] * 0.3 - torch.arange(5, dtype=D)[:, None] * 0.1  # ALiBi-like
    with pytest.raises(dynamiclrp.ActivationUnavailableError, match="not a plain mask"):
        explain(bias)
    with pytest.raises(dynamiclrp.ActivationUnavailableError, match="not a plain mask"):
        explain(torch.zeros(5, 5, dtype=D).index_fill(1, torch.tensor([2]), 0.5))  # one column shifted a little
    mask = torch.zeros(5, 5, dtype=D)
    mask[:, 3:] = -1e4
    for ours, ref in zip(explain(mask), explain(mask.masked_fill(mask < 0, float("-inf")))):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    # a constant per row (one the softmax cannot see) passes the check; its relevance is the plain mask's
    row_shift = torch.arange(5, dtype=D)[:, None] * 7.0
    for ours, ref in zip(explain(mask + row_shift), explain(mask)):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_scratch_buffers_are_per_key_shape_and_dtype_and_end_with_the_run(monkeypatch):
    """Op entries' temporaries (the softmax's mask check, the ε-step's factor) reuse one buffer per key, shape and
    dtype for a whole run, from ``SCRATCH_BYTES`` up on the CPU (below, None: the op allocates); the run drops
    them at its end."""
    from dynamiclrp import engine
    from dynamiclrp.engine import Run
    from dynamiclrp.graph import Graph
    from dynamiclrp.presets import get_preset

    x = torch.randn(3, 4, dtype=D, requires_grad=True)
    run = Run(Graph.build([(x @ x.T).grad_fn]), get_preset("attnlrp"), D, set())
    like = torch.empty(2, 3, dtype=D)
    assert run.scratch("a", like) is None  # 48 bytes: the op allocates
    monkeypatch.setattr(engine, "SCRATCH_BYTES", like.numel() * like.element_size())
    assert run.scratch("a", like[:1]) is None  # below
    a = run.scratch("a", like)
    assert run.scratch("a", like) is a and a.shape == like.shape and a.dtype == D
    assert run.scratch("b", like) is not a
    assert run.scratch("a", like.float()) is None and run.scratch("a", torch.empty(3, 3, dtype=D)) is not a
    run.propagate({})
    assert run.scratch("a", like) is not a  # a new run's buffer


@pytest.mark.parametrize("case", ["relu after a view", "cat with an untracked cache"])
def test_more_saved_copies_spare_a_recomputation(case, monkeypatch):
    """mm -> view -> ReLU (a linear layer on a 3-d input, no bias): z read off the ReLU; k = linear(x) appended to an
    untracked (empty) cache by cat, saved by the attention matmul: read off the cat's copy. Same relevance as
    recomputing."""
    from dynamiclrp.ops import OPS
    from dynamiclrp.ops import linear as linear_ops
    from dynamiclrp.promise import Promises

    torch.manual_seed(7)
    proj, key = nn.Linear(8, 8, bias=False).double(), nn.Linear(8, 8, bias=False).double()
    x = torch.randn(2, 5, 8, dtype=D, requires_grad=True)
    mm = OPS["MmBackward0"]
    recomputed = _recomputations(monkeypatch, mm)

    def explain():
        recomputed.clear()
        h = proj(x.transpose(0, 1)).transpose(0, 1)  # mm on the folded non-contiguous input, then views
        if case == "relu after a view":
            y = h.relu().sum((1, 2))[:, None]
        else:
            kk = torch.cat([torch.zeros(2, 0, 8, dtype=D), key(x)], 1)  # the key is used through the cat only
            y = ((h @ kk.transpose(-1, -2)).softmax(-1) @ kk).sum((1, 2))[:, None]
        return dynamiclrp.propagate(y, target=0, wrt=[x], rules={"linear": Epsilon(0.1)}).inputs[0]

    fast = explain()
    assert not recomputed
    if case == "relu after a view":
        monkeypatch.setattr(linear_ops, "_pre_activation", lambda *a: None)
    else:
        monkeypatch.setattr(Promises, "_part_of_cat", lambda *a: None)
    slow = explain()
    assert recomputed  # the check above could fail: without the copy the layer is recomputed
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("stride", [1, 2, "mixed"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "3d"])
def test_pointwise_convolution_as_channel_product_equals_the_convolution(layout, stride, monkeypatch):
    """1 x 1 convolutions (no padding, one group) run as a matrix product over channels, at a stride > 1 over the
    positions they read (odd sizes: the last position is read), their transposes writing those positions only;
    every rule gives the same relevance as with the convolution kernels."""
    import dynamiclrp.ops.linear as linear_ops

    torch.manual_seed(8)
    conv = nn.Conv3d if layout == "3d" else nn.Conv2d
    if stride == "mixed":
        stride = (1, 2, 3) if layout == "3d" else (2, 3)
    m = nn.Sequential(conv(4, 6, 1, stride=stride), nn.ReLU(), conv(6, 3, 1), nn.Flatten(1), nn.LazyLinear(2))
    m = m.double()
    x = torch.randn(2, 4, *((3, 5, 5) if layout == "3d" else (5, 5)), dtype=D)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    m(x)  # materialise the lazy layer
    calls = []
    real = linear_ops._channel_product
    monkeypatch.setattr(linear_ops, "_channel_product", lambda *a: (calls.append(1), real(*a))[1])
    for preset in ("epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1", "epsilon_plus_flat"):
        calls.clear()
        fast = dynamiclrp.explain(m, x, target=[0, 1], preset=preset).inputs[0]
        assert calls  # the channel product ran
        with monkeypatch.context() as mp:
            mp.setattr(linear_ops._ConvArgs, "pointwise", property(lambda a: False))
            slow = dynamiclrp.explain(m, x, target=[0, 1], preset=preset).inputs[0]
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-13)


def test_relevance_summed_over_many_uses_leaves_each_share_intact():
    """A value used three times: its relevance is the sum of the three shares (the engine adds the third into the
    sum it made), and no share is overwritten: the recorded relevance of each use (passed on unchanged by clone and
    relu, as a view by view) stays its own."""
    x = (torch.rand(3, 4, dtype=D) + 0.5).requires_grad_()  # positive: every sum far from 0 (ε's effect < 1e-6)
    h = x * 2
    u1, u2, u3 = h.clone(), h.view(12).view(3, 4), h.relu()
    y = (u1 + u2 + u3).sum(1, keepdim=True)
    att = dynamiclrp.propagate(y, target=0, wrt=[x, u1, u2, u3, h], preset="epsilon")
    r_x, r_u1, r_u2, r_u3, r_h = att.inputs
    two_x = 2 * x.detach()
    for r in (r_u1, r_u2, r_u3):
        torch.testing.assert_close(r, two_x, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(r_h, 2 * two_x + two_x.relu(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(r_x, r_h, rtol=1e-12, atol=1e-14)


def test_softmax_mask_check_accepts_a_fully_masked_row():
    """A safe softmax (zeros for a row that attends to nothing, as SDPA's math path gives for a padded query) behind
    a plain untracked mask: the check passes, the row gets no relevance, the rest is finite -- and a position bias
    next to such a row is still refused."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 5, 4, generator=g, dtype=D).requires_grad_() for _ in range(3))
    mask = torch.zeros(5, 5, dtype=D)
    mask[2, :] = float("-inf")
    mask[:, 4] = float("-inf")

    def explain(const):
        y = torch._safe_softmax(q @ k.transpose(-1, -2) + const, -1) @ v
        return dynamiclrp.propagate(y, wrt=[q, k, v], preset="attnlrp").inputs

    r_q, r_k, r_v = explain(mask)
    assert all(bool(torch.isfinite(r).all()) for r in (r_q, r_k, r_v))
    assert (r_q[:, 2] == 0).all() and r_q.abs().sum() > 0
    bias = torch.arange(5, dtype=D)[None, :] * 0.3
    with pytest.raises(dynamiclrp.ActivationUnavailableError, match="not a plain mask"):
        explain(mask + bias)


def test_operands_held_constant_are_not_visited(monkeypatch):
    """CP-LRP holds the attention weights and the MLP's gate constant and blocks the softmax: their relevance is
    zero, so the query/key projections and the gate's layer are not visited at all (no rule runs there). The
    relevance is the one propagating those zeros gives, and a module behind them reports zeros, not None."""
    transformers = pytest.importorskip("transformers")
    from dynamiclrp import rules

    torch.manual_seed(4)
    cfg = transformers.LlamaConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32,
                                   attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    inputs = {"input_ids": torch.randint(1, 60, (1, 9))}
    kw = dict(target=0, preset="cp_lrp", output=lambda o: o.logits[:, -1],
              modules=["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj"])
    skipped = dynamiclrp.explain(model, inputs, **kw)
    monkeypatch.setattr(rules.Constant, "constant_operands", ())
    monkeypatch.setattr(rules.Block, "constant_operands", ())
    visited = dynamiclrp.explain(model, inputs, **kw)
    assert skipped.stats.rules_run < visited.stats.rules_run - 2 * 6  # q, k, gate layers and more, per block
    torch.testing.assert_close(skipped.tokens, visited.tokens, rtol=1e-12, atol=1e-15)
    for name, r in visited.modules.items():
        assert skipped.modules[name] is not None and skipped.modules[name].shape == r.shape
        assert not skipped.modules[name].any() and not r.any()


def test_pre_activation_proved_through_max_pooling(monkeypatch):
    """Max-pooling routes a window's relevance to its maximum, whose value is the window's output: relevance zero
    where the pooled output is stays zero where the ReLU's output is. A ReLU under max-pooling (a VGG block, the
    ResNet stem) is proved from the graph too, without reading a device value; same relevance, bit for bit."""
    import dynamiclrp.ops.linear as linear

    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3, padding=1),
                      nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.Linear(5 * 3 * 3, 3)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    proofs = []
    original = linear._weighs_by_value
    monkeypatch.setattr(linear, "_weighs_by_value", lambda *a: proofs.append(original(*a)) or proofs[-1])
    with HostReads() as proved:
        fast = dynamiclrp.explain(m, x, target=[0, 2], ledger=False, check_finite=False, gradient_form=False).inputs[0]
    assert proofs == [True, True]  # both ReLUs, each under a max-pooling (the second with overlapping windows)
    monkeypatch.setattr(linear, "_weighs_by_value", lambda *a: False)
    with HostReads() as compared:
        slow = dynamiclrp.explain(m, x, target=[0, 2], ledger=False, check_finite=False, gradient_form=False).inputs[0]
    assert compared.n - proved.n == 2
    assert torch.equal(fast, slow) and fast.abs().sum() > 0


def test_pre_activation_proved_under_average_pooling(monkeypatch):
    """Average pooling and a mean take the ε-sum rule: their relevance for the pooled values is ``x ⊙ Jᵀ s``, zero
    where a ReLU's output is. A layer's ReLU under an average pooling or before a global one is proved from the
    graph too (a host read fewer per such layer); same relevance, bit for bit."""
    import dynamiclrp.ops.linear as linear

    torch.manual_seed(6)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 5, 3, padding=1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    proofs = []
    original = linear._weighs_by_value
    monkeypatch.setattr(linear, "_weighs_by_value", lambda *a: proofs.append(original(*a)) or proofs[-1])
    kw = dict(target=[0, 2], preset="epsilon", ledger=False, check_finite=False, gradient_form=False)
    with HostReads() as proved:
        fast = dynamiclrp.explain(m, x, **kw).inputs[0]
    assert proofs == [True, True]  # both ReLUs: under an average pooling, under the global one
    monkeypatch.setattr(linear, "_weighs_by_value", lambda *a: False)
    with HostReads() as compared:
        slow = dynamiclrp.explain(m, x, **kw).inputs[0]
    assert compared.n - proved.n == 2
    assert torch.equal(fast, slow) and fast.abs().sum() > 0


def _conv_bn_net(depth: int) -> nn.Module:
    """Convolution, eval-mode batch norm (random statistics; the second one's scale negative in one channel, so
    that it cannot be taken as a positive scale of the layer's output), ReLU, ``depth`` times, then a linear head."""
    torch.manual_seed(11)
    layers = []
    for i in range(depth):
        bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            if i == 1:
                bn.weight[2] = -0.7
        layers += [nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1, bias=i % 2 == 0), bn, nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double().eval()


def test_merged_batch_norms_are_worked_out_together(monkeypatch):
    """Without a plan the constants of every batch norm merged into the layer before it (scale, shift, whether every
    scale is positive) are worked out together: the host reads the positivity of all of them at once, so the reads
    do not grow with the depth (on a GPU each read waits for the device), and the relevance is the one of the
    constants worked out a layer at a time."""
    from dynamiclrp.ops import linear

    reads = [0]
    tolist = torch.Tensor.tolist

    def spy(self, *a, **k):
        reads[0] += 1
        return tolist(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "tolist", spy)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    kw = dict(target=[0, 2], preset="epsilon_plus", ledger=False, check_finite=False)
    counts, together = [], None
    for depth in (2, 5):
        m = _conv_bn_net(depth)
        reads[0] = 0
        with HostReads() as r:
            together = dynamiclrp.explain(m, x, **kw).inputs[0]
        counts.append(r.n + reads[0])
    assert counts[0] == counts[1]
    monkeypatch.setattr(linear, "_graph_batch_norm_constants", lambda run, dt: {})
    reads[0] = 0
    with HostReads() as r:
        alone = dynamiclrp.explain(m, x, **kw).inputs[0]
    assert r.n + reads[0] > counts[1]  # the check above could fail: one read per layer
    assert torch.equal(together, alone) and together.abs().sum() > 0
