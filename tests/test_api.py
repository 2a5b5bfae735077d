"""The public API: targets and seeds, explain() options, and errors with messages that say what to do."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dynamiclrp
from dynamiclrp.errors import (
    ActivationUnavailableError,
    DynamicLRPError,
    GraphFreedError,
    MissingRuleError,
    NoGraphError,
    NonFiniteError,
    TargetError,
)
from dynamiclrp.ops import OPS, Identity, Routing
from dynamiclrp.rules import Epsilon, Flat, Uniform

D = torch.float64
EXACT = {"linear": Epsilon(1e-12), "sum": Epsilon(1e-12), "product": Uniform(1e-12)}


def mlp(bias=False, dtype=D, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8, bias=bias), nn.ReLU(), nn.Linear(8, 8, bias=bias), nn.ReLU(),
                         nn.Linear(8, 3, bias=bias)).to(dtype).eval()


def cnn(dtype=D, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).to(dtype).eval()


class Attention(nn.Module):
    def __init__(self, d=8, heads=2):
        super().__init__()
        self.qkv, self.o, self.ln = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.LayerNorm(d)
        self.head, self.heads = nn.Linear(d, 3), heads

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), -1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(B, T, d))
        return self.head(x[:, 0])


def tiny_transformer(dtype=D, seed=0):
    torch.manual_seed(seed)
    return Attention().to(dtype).eval()


def rows(r):
    return r.reshape(r.shape[0], -1).sum(1)


def run(model, x, target, **kw):
    xi = x.clone().requires_grad_()
    y = model(xi)
    return dynamiclrp.propagate(y, target=target, wrt=[xi], **kw), y.detach()


# ----------------------------------------------------------------------------------------------------------
# targets and seeds


def test_int_target_seeds_the_output_value():
    m, x = mlp(), torch.randn(3, 5, dtype=D)
    att, y = run(m, x, 2, rules=EXACT)
    (seed,) = att.outputs
    expected = torch.zeros_like(y)
    expected[:, 2] = y[:, 2]
    assert torch.equal(seed, expected)
    torch.testing.assert_close(rows(att.inputs[0]), y[:, 2], rtol=1e-9, atol=1e-12)
    assert att.total_seed() == pytest.approx(float(y[:, 2].sum()))


@pytest.mark.parametrize("kind", ["list", "tuple", "long", "int32"])
def test_per_row_targets(kind):
    m, x = mlp(), torch.randn(3, 5, dtype=D)
    idx = [2, 0, 1]
    target = {"list": idx, "tuple": tuple(idx), "long": torch.tensor(idx),
              "int32": torch.tensor(idx, dtype=torch.int32)}[kind]
    att, y = run(m, x, target, rules=EXACT)
    picked = y[torch.arange(3), torch.tensor(idx)]
    assert torch.equal(att.outputs[0].nonzero()[:, 1], torch.tensor(idx))
    assert torch.equal(att.outputs[0].sum(1), picked)
    torch.testing.assert_close(rows(att.inputs[0]), picked, rtol=1e-9, atol=1e-12)
    # the same as explaining each row with an int target
    for i, t in enumerate(idx):
        single, _ = run(m, x[i:i + 1], t, rules=EXACT)
        torch.testing.assert_close(att.inputs[0][i:i + 1], single.inputs[0], rtol=1e-12, atol=1e-14)


def test_none_target_is_argmax_and_callable_target():
    m, x = mlp(), torch.randn(4, 5, dtype=D)
    att, y = run(m, x, None)
    assert torch.equal(att.outputs[0].ne(0).float().argmax(1), y.argmax(1))
    att2, _ = run(m, x, lambda out: out.argmax(-1))
    assert torch.equal(att.inputs[0], att2.inputs[0])
    att3, _ = run(m, x, lambda out: out.argmin(-1), rules=EXACT)
    assert torch.equal(att3.outputs[0].sum(1), y.min(1).values)
    torch.testing.assert_close(rows(att3.inputs[0]), y.min(1).values, rtol=1e-9, atol=1e-12)


def test_explicit_seed_tensor():
    m, x = mlp(), torch.randn(2, 5, dtype=D)
    seed = torch.tensor([[1.0, 0.0, -2.0], [0.0, 0.5, 0.0]], dtype=D)
    att, y = run(m, x, seed, rules=EXACT)
    assert torch.equal(att.outputs[0], seed)
    # relevance is linear in the seed (rules fixed at the forward activations)
    parts = [run(m, x, seed * (torch.arange(3) == j), rules=EXACT)[0].inputs[0] for j in range(3)]
    torch.testing.assert_close(att.inputs[0], sum(parts), rtol=1e-9, atol=1e-12)
    # an explicit one-hot-times-value seed is the int target
    onehot = torch.zeros_like(y)
    onehot[:, 1] = y[:, 1]
    torch.testing.assert_close(run(m, x, onehot)[0].inputs[0], run(m, x, 1)[0].inputs[0], rtol=0, atol=0)
    # a callable may return an explicit seed too
    att_c, _ = run(m, x, lambda out: torch.ones_like(out), rules=EXACT)
    assert torch.equal(att_c.outputs[0], torch.ones_like(y))
    torch.testing.assert_close(rows(att_c.inputs[0]), torch.full((2,), 3.0, dtype=D), rtol=1e-9, atol=1e-12)


def test_scalar_output():
    m, x = mlp(), torch.randn(2, 5, dtype=D, requires_grad=True)
    y = m(x).sum()
    att = dynamiclrp.propagate(y, wrt=[x], rules=EXACT)
    assert att.outputs[0].shape == () and float(att.outputs[0]) == float(y.detach())
    assert float(att.inputs[0].sum()) == pytest.approx(float(y.detach()), rel=1e-9)
    with pytest.raises(TargetError, match="scalar"):
        dynamiclrp.propagate(y, target=2, wrt=[x])


def test_targets_on_a_sequence_output():
    torch.manual_seed(7)
    enc, head = nn.Linear(4, 6, bias=False).double(), nn.Linear(6, 3, bias=False).double()
    x = torch.randn(2, 5, 4, dtype=D, requires_grad=True)
    y = head(torch.relu(enc(x)))  # (batch, positions, classes)
    yd = y.detach()
    # an int: that class at every position
    att = dynamiclrp.propagate(y, target=2, wrt=[x], rules=EXACT)
    torch.testing.assert_close(att.inputs[0].sum((1, 2)), yd[..., 2].sum(1), rtol=1e-9, atol=1e-12)
    # one index per row, broadcast over positions
    att = dynamiclrp.propagate(y, target=[0, 1], wrt=[x], rules=EXACT)
    assert torch.equal(att.outputs[0].sum(-1), torch.stack([yd[0, :, 0], yd[1, :, 1]]))
    # one index per row and position
    idx = torch.randint(0, 3, (2, 5))
    att = dynamiclrp.propagate(y, target=idx, wrt=[x], rules=EXACT)
    picked = yd.gather(-1, idx[..., None])[..., 0]
    assert torch.equal(att.outputs[0].sum(-1), picked)
    # relevance of each position's input stays at that position (the encoder works per position)
    torch.testing.assert_close(att.inputs[0].sum(-1), picked, rtol=1e-9, atol=1e-12)
    with pytest.raises(TargetError, match="does not fit"):
        dynamiclrp.propagate(y, target=torch.zeros(2, 4, dtype=torch.long), wrt=[x])


def test_ledger_off():
    m, x = mlp(), torch.randn(2, 5, dtype=D)
    att, _ = run(m, x, 0, ledger=False, rules=EXACT, gradient_form=False)
    on, _ = run(m, x, 0, rules=EXACT)
    assert att.ledger is None
    assert torch.equal(att.inputs[0], on.inputs[0])  # the ledger only observes
    fast, _ = run(m, x, 0, ledger=False, rules=EXACT)  # these rules have a gradient form: used without a ledger
    assert fast.stats.gradient_form and not on.stats.gradient_form
    limit, _ = run(m, x, 0, rules={k: Epsilon(1e-30) for k in ("linear", "sum")})  # the form's ε → 0 limit
    torch.testing.assert_close(fast.inputs[0], limit.inputs[0], rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="ledger=True"):
        att.conservation()
    assert len(on.ledger) == on.stats.rules_run


def test_several_outputs_one_target_each():
    torch.manual_seed(1)
    body, h1, h2 = nn.Linear(5, 6, bias=False).double(), nn.Linear(6, 3, bias=False).double(), \
        nn.Linear(6, 4, bias=False).double()
    x = torch.randn(2, 5, dtype=D, requires_grad=True)
    h = torch.tanh(body(x))
    y1, y2 = h1(h), h2(h)
    both = dynamiclrp.propagate((y1, y2), target=(0, [3, 1]), wrt=[x], rules=EXACT)
    assert len(both.outputs) == 2
    assert torch.equal(both.outputs[0][:, 0], y1[:, 0].detach()) and both.outputs[0][:, 1:].eq(0).all()
    assert torch.equal(both.outputs[1].sum(1), y2.detach()[[0, 1], [3, 1]])
    one = dynamiclrp.propagate(y1, target=0, wrt=[x], rules=EXACT).inputs[0]
    two = dynamiclrp.propagate(y2, target=[3, 1], wrt=[x], rules=EXACT).inputs[0]
    torch.testing.assert_close(both.inputs[0], one + two, rtol=1e-9, atol=1e-12)
    expected = y1[:, 0] + y2[[0, 1], [3, 1]]
    torch.testing.assert_close(rows(both.inputs[0]), expected.detach(), rtol=1e-9, atol=1e-12)
    with pytest.raises(DynamicLRPError, match="2 outputs but 3 targets"):
        dynamiclrp.propagate((y1, y2), target=(0, 1, 2), wrt=[x])


def test_same_output_twice_and_outputs_of_one_node():
    m, x = mlp(), torch.randn(2, 5, dtype=D, requires_grad=True)
    y = m(x)
    a = dynamiclrp.propagate((y, y), target=(0, 2), wrt=[x], rules=EXACT).inputs[0]
    b = dynamiclrp.propagate(y, target=0, wrt=[x], rules=EXACT).inputs[0]
    c = dynamiclrp.propagate(y, target=2, wrt=[x], rules=EXACT).inputs[0]
    torch.testing.assert_close(a, b + c, rtol=1e-9, atol=1e-12)
    # start/end logits: two output slots of the same unbind node (QA-style)
    torch.manual_seed(2)
    enc, qa = nn.Linear(4, 6, bias=False).double(), nn.Linear(6, 2, bias=False).double()
    tok = torch.randn(2, 7, 4, dtype=D, requires_grad=True)
    start, end = qa(torch.relu(enc(tok))).unbind(-1)
    assert start.grad_fn is end.grad_fn
    att = dynamiclrp.propagate((start, end), target=([1, 2], [4, 6]), wrt=[tok], rules=EXACT)
    expected = start.detach()[[0, 1], [1, 2]] + end.detach()[[0, 1], [4, 6]]
    torch.testing.assert_close(rows(att.inputs[0]), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_batch_rows_are_independent(name):
    model, shape = {"mlp": (mlp, (2, 5)), "cnn": (cnn, (2, 3, 8, 8)),
                    "transformer": (tiny_transformer, (2, 5, 8))}[name]
    m = model()
    x = torch.randn(shape, dtype=D)
    a, _ = run(m, x, [1, 0], preset="attnlrp")
    b, _ = run(m, x, [1, 2], preset="attnlrp")
    torch.testing.assert_close(a.inputs[0][0], b.inputs[0][0], rtol=0, atol=1e-12)
    assert not torch.allclose(a.inputs[0][1], b.inputs[0][1])
    # and row 0 alone gives the same relevance as row 0 in the batch
    alone, _ = run(m, x[:1], [1], preset="attnlrp")
    torch.testing.assert_close(alone.inputs[0][0], a.inputs[0][0], rtol=1e-9, atol=1e-12)


def test_seed_one_vs_value():
    m, x = mlp(), torch.randn(3, 5, dtype=D)
    lin = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 3, bias=False)).double()
    for model in (lin, m):
        v, y = run(model, x, [0, 1, 2], rules=EXACT)
        o, _ = run(model, x, [0, 1, 2], rules=EXACT, seed="one")
        val = y[torch.arange(3), [0, 1, 2]]
        assert torch.equal(o.outputs[0].sum(1), torch.ones(3, dtype=D))
        torch.testing.assert_close(o.inputs[0], v.inputs[0] / val[:, None], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(rows(o.inputs[0]), torch.ones(3, dtype=D), rtol=1e-9, atol=1e-12)
    with pytest.raises(TargetError, match="seed must be"):
        run(m, x, 0, seed="bogus")


def test_dtype_argument_gives_float64_relevance():
    m32 = mlp(dtype=torch.float32)
    x = torch.randn(2, 5)
    att, y = run(m32, x, 1, dtype=D)
    ref, _ = run(m32, x, 1)
    assert att.inputs[0].dtype == D and att.outputs[0].dtype == D and ref.inputs[0].dtype == torch.float32
    assert torch.equal(att.outputs[0], ref.outputs[0].double())
    torch.testing.assert_close(att.inputs[0], ref.inputs[0].double(), rtol=1e-4, atol=1e-6)




def test_dtype_float64_relevance_conserves_to_float64_precision():
    m32 = mlp(dtype=torch.float32)
    x = torch.randn(2, 5)
    att, y = run(m32, x, 1, dtype=D, rules=EXACT)
    torch.testing.assert_close(rows(att.inputs[0]), y[:, 1].double(), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# explain()


def test_explain_modules_and_params():
    m, x = mlp(), torch.randn(3, 5, dtype=D)
    att = dynamiclrp.explain(m, x, target=[0, 1, 2], modules=["0", "1", "3"], params=["0.weight", "2.weight"],
                             rules=EXACT)
    y = m(x).detach()
    picked = y[torch.arange(3), [0, 1, 2]]
    assert att.inputs[0].shape == x.shape
    assert att.modules["0"].shape == (3, 8) and att.modules["1"].shape == (3, 8)
    assert att.modules["3"].shape == (3, 8)
    assert att.params["0.weight"].shape == m[0].weight.shape == (8, 5)
    assert att.params["2.weight"].shape == (8, 8)
    for r in (att.inputs[0], att.modules["0"], att.modules["1"], att.modules["3"]):
        torch.testing.assert_close(rows(r), picked, rtol=1e-9, atol=1e-12)
    # ReLU passes relevance unchanged
    torch.testing.assert_close(att.modules["0"], att.modules["1"], rtol=0, atol=0)
    # a weight gets what its layer passes on (ε -> 0): the total seed
    assert float(att.params["0.weight"].sum()) == pytest.approx(float(picked.sum()), rel=1e-9)
    assert float(att.params["2.weight"].sum()) == pytest.approx(float(picked.sum()), rel=1e-9)
    # asking for params and modules does not change the input relevance
    plain = dynamiclrp.explain(m, x, target=[0, 1, 2], rules=EXACT)
    torch.testing.assert_close(plain.inputs[0], att.inputs[0], rtol=0, atol=0)


def test_explain_output_selector_and_mapping_inputs():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3, bias=False), nn.Linear(4, 2, bias=False)

        def forward(self, x, scale):
            return {"first": self.a(x) * scale, "second": self.b(x)}

    torch.manual_seed(3)
    m = TwoHeads().double()
    x = torch.randn(2, 4, dtype=D)
    att = dynamiclrp.explain(m, {"x": x, "scale": 2}, target=1, output=lambda out: out["second"], rules=EXACT)
    torch.testing.assert_close(rows(att.inputs[0]), m.b(x)[:, 1].detach(), rtol=1e-9, atol=1e-12)
    default = dynamiclrp.explain(m, {"x": x, "scale": 2}, target=1, rules=EXACT)  # the first tensor
    torch.testing.assert_close(rows(default.inputs[0]), 2 * m.a(x)[:, 1].detach(), rtol=1e-9, atol=1e-12)


def test_module_rules_apply_only_inside_the_module():
    m, x = mlp(), torch.randn(2, 5, dtype=D)
    base = dynamiclrp.explain(m, x, target=1, modules=["1", "3"], rules=EXACT)
    flat = dynamiclrp.explain(m, x, target=1, modules=["1", "3"], module_rules={"0": Flat(1e-12)},
                              rules=EXACT)
    # outside the first layer nothing changed
    torch.testing.assert_close(flat.modules["3"], base.modules["3"], rtol=0, atol=0)
    torch.testing.assert_close(flat.modules["1"], base.modules["1"], rtol=0, atol=0)
    # the flat rule on a dense layer spreads each row's relevance equally over the input features
    r = flat.inputs[0]
    torch.testing.assert_close(r, r[:, :1].expand_as(r), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rows(r), rows(base.inputs[0]), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(r, base.inputs[0])
    # a large ε on the last layer only: it absorbs there, and every layer below still conserves exactly
    last = dynamiclrp.explain(m, x, target=1, modules=["3"], module_rules={"4": {"dense": Epsilon(1.0)}},
                              rules=EXACT)
    y1 = m(x)[:, 1].detach()
    assert (rows(last.modules["3"]) - y1).abs().min() > 1e-6
    torch.testing.assert_close(rows(last.inputs[0]), rows(last.modules["3"]), rtol=1e-9, atol=1e-12)




def test_module_rules_flat_on_a_layer_with_bias():
    m, x = mlp(bias=True), torch.randn(2, 5, dtype=D)
    att = dynamiclrp.explain(m, x, target=1, module_rules={"0": Flat()})
    r = att.inputs[0]
    torch.testing.assert_close(r, r[:, :1].expand_as(r), rtol=1e-9, atol=1e-12)


def test_explain_restores_the_model_even_when_forward_fails():
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            self.lin(x)
            raise ValueError("boom")

    m = Failing()
    m.lin.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="boom"):
        dynamiclrp.explain(m, torch.randn(1, 3), modules=["lin"])
    assert not m.lin.weight.requires_grad and m.lin.bias.requires_grad
    assert not m.lin._forward_hooks


def test_explain_hooks_removed_and_flags_restored():
    m = cnn(torch.float32)
    m[0].weight.requires_grad_(False)
    m.train()
    flags = [p.requires_grad for p in m.parameters()]
    att = dynamiclrp.explain(m, torch.randn(2, 3, 8, 8), modules=["2", "5"], params=["8.weight"],
                             module_rules={"4": Epsilon(0.01)})
    assert att.modules["2"].shape == (2, 4, 8, 8) and att.modules["5"].shape == (2, 4, 2, 2)
    assert att.params["8.weight"].shape == (3, 4)
    assert [p.requires_grad for p in m.parameters()] == flags
    assert all(mod.training for mod in m.modules())
    for mod in m.modules():
        assert not mod._forward_hooks
    assert all(p.grad is None for p in m.parameters())


def test_explain_unknown_names():
    m = mlp()
    with pytest.raises(DynamicLRPError, match="no module named 'nope'"):
        dynamiclrp.explain(m, torch.randn(1, 5, dtype=D), modules=["nope"])
    with pytest.raises(DynamicLRPError, match="no parameter named 'nope.weight'"):
        dynamiclrp.explain(m, torch.randn(1, 5, dtype=D), params=["nope.weight"])
    with pytest.raises(DynamicLRPError, match="no module named"):
        dynamiclrp.explain(m, torch.randn(1, 5, dtype=D), module_rules={"nope": Flat()})


# ----------------------------------------------------------------------------------------------------------
# errors


def test_no_graph_error_mentions_no_grad():
    m, x = mlp(), torch.randn(2, 5, dtype=D)
    with torch.no_grad():
        y = m(x)
    with pytest.raises(NoGraphError, match="no_grad"):
        dynamiclrp.propagate(y, wrt=[x])
    with pytest.raises(NoGraphError):
        dynamiclrp.propagate([], wrt=[x])


def test_graph_freed_error_mentions_retain_graph():
    m = mlp()
    x = torch.randn(2, 5, dtype=D, requires_grad=True)
    y = m(x)
    y.sum().backward()
    with pytest.raises(GraphFreedError, match="retain_graph"):
        dynamiclrp.propagate(y, wrt=[x])
    # with retain_graph=True it still works
    y = m(x)
    y.sum().backward(retain_graph=True)
    att = dynamiclrp.propagate(y, target=0, wrt=[x], rules=EXACT)
    torch.testing.assert_close(rows(att.inputs[0]), y[:, 0].detach(), rtol=1e-9, atol=1e-12)


def test_graph_freed_error_for_convolution():
    m = cnn()
    x = torch.randn(1, 3, 8, 8, dtype=D, requires_grad=True)
    y = m(x)
    y.sum().backward()
    with pytest.raises(GraphFreedError, match="retain_graph"):
        dynamiclrp.propagate(y, wrt=[x])


@pytest.mark.parametrize(("target", "match"), [
    (3, "out of range"),
    (-1, "out of range"),
    ([0, 1, 2], "does not fit"),
    (torch.tensor([0, 1, 5]), "does not fit"),
    (torch.tensor([[0, 1]]), "does not fit"),
    ([0.5, 1.0], "integers"),
    (torch.tensor([0, 1], dtype=torch.bool), "integers"),
    (True, "bool"),
    (torch.zeros(3, 3, dtype=D), "explicit seed must have the output's shape"),
    (torch.full((2, 3), float("nan"), dtype=D), "NaN or inf"),
    ([0, 7], "out of range"),
    ("zero", "cannot read target"),
])
def test_target_errors(target, match):
    m, x = mlp(), torch.randn(2, 5, dtype=D, requires_grad=True)
    with pytest.raises(TargetError, match=match):
        dynamiclrp.propagate(m(x), target=target, wrt=[x])


def test_target_error_from_callable():
    m, x = mlp(), torch.randn(2, 5, dtype=D, requires_grad=True)
    with pytest.raises(TargetError, match="out of range"):
        dynamiclrp.propagate(m(x), target=lambda out: out.argmax(-1) + 3, wrt=[x])


def test_target_error_is_a_value_error():
    assert issubclass(TargetError, ValueError) and issubclass(TargetError, DynamicLRPError)


def test_nan_output_raises_non_finite():
    m, x = mlp(), torch.randn(2, 5, dtype=D, requires_grad=True)
    y = m(x) * torch.tensor([1.0, float("nan"), 1.0], dtype=D)
    with pytest.raises(NonFiniteError, match="NaN"):
        dynamiclrp.propagate(y, target=0, wrt=[x])
    with pytest.raises(NonFiniteError):
        dynamiclrp.propagate(m(x) / 0.0 * 0.0 + m(x) * float("inf"), target=0, wrt=[x])


def test_non_finite_relevance_from_a_rule():
    lin = nn.Linear(3, 2, bias=False).double()
    x = torch.zeros(2, 3, dtype=D, requires_grad=True)
    y = lin(x)
    with pytest.raises(NonFiniteError, match="check_finite=False"):
        dynamiclrp.propagate(y, target=0, wrt=[x], rules={"linear": Epsilon(0.0)})
    att = dynamiclrp.propagate(y, target=0, wrt=[x], rules={"linear": Epsilon(0.0)}, check_finite=False)
    assert torch.isnan(att.inputs[0]).all()


@pytest.mark.parametrize("ledger", [True, False])
def test_one_non_finite_element_is_caught_with_and_without_the_ledger(ledger):
    """With the ledger on, finiteness is read off the sums it takes (a NaN or an inf anywhere makes the sum
    non-finite); without it, off each tensor's extremes. Either way one bad element among finite ones raises and
    names the node; the finite run books the same ledger as one computed from the relevance by hand."""
    lin = nn.Linear(3, 2, bias=False).double()
    x = torch.randn(4, 3, dtype=D)
    x[2] = 0.0  # one row whose outputs are exactly 0: ε = 0 divides 0 by 0 there only
    x.requires_grad_()
    with pytest.raises(NonFiniteError, match=r"MmBackward0 rule \(node #\d+\)"):
        dynamiclrp.propagate(lin(x), target=0, wrt=[x], rules={"linear": Epsilon(0.0)}, ledger=ledger,
                             gradient_form=False)  # the gradient form computes the ε → 0 limit: no 0/0
    att = dynamiclrp.propagate(lin(x), target=0, wrt=[x], rules={"linear": Epsilon(0.0)}, ledger=ledger,
                               check_finite=False, gradient_form=False)
    assert torch.isnan(att.inputs[0][2]).all() and torch.isfinite(att.inputs[0][[0, 1, 3]]).all()
    if ledger:
        x.data[2] = 1.0
        att = dynamiclrp.propagate(lin(x), target=0, wrt=[x], rules={"linear": Epsilon(0.0)})
        (mm,) = [e for e in att.ledger if e.kind == "MmBackward0"]
        assert float(mm.r_in) == pytest.approx(float(att.outputs[0].sum()), rel=1e-12)
        assert float(mm.r_data) == pytest.approx(float(att.inputs[0].sum()), rel=1e-12)


class Triple(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 3 * x

    @staticmethod
    def backward(ctx, g):
        return 3 * g


class Reverse(torch.autograd.Function):
    """Flips the last dimension (a routing op with its own backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.flip(-1)

    @staticmethod
    def backward(ctx, g):
        return g.flip(-1)


@pytest.fixture
def clean_ops():
    before = dict(OPS)
    yield
    OPS.clear()
    OPS.update(before)


def _custom_net(op):
    torch.manual_seed(4)
    l1, l2 = nn.Linear(4, 6, bias=False).double(), nn.Linear(6, 3, bias=False).double()

    def f(x):
        h = torch.relu(l1(x))
        return l2(op(h) + h)  # the add needs op's output: the custom op must be replayable
    return f


def test_custom_function_without_rule_raises_missing_rule(clean_ops):
    f = _custom_net(Triple.apply)
    x = torch.randn(2, 4, dtype=D, requires_grad=True)
    y = f(x) + f(x)
    with pytest.raises(MissingRuleError) as err:
        dynamiclrp.propagate(y, wrt=[x])
    msg = str(err.value)
    assert "TripleBackward" in msg and "x2" in msg and "register_op" in msg and "strict=False" in msg


def _compare_custom_with_builtin(custom, builtin):
    x = torch.randn(3, 4, dtype=D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = _custom_net(custom)(xa), _custom_net(builtin)(xb)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    a = dynamiclrp.propagate(ya, target=[0, 1, 2], wrt=[xa], rules=EXACT)
    b = dynamiclrp.propagate(yb, target=[0, 1, 2], wrt=[xb], rules=EXACT)
    torch.testing.assert_close(a.inputs[0], b.inputs[0], rtol=1e-12, atol=1e-14)
    picked = ya.detach()[torch.arange(3), [0, 1, 2]]
    torch.testing.assert_close(rows(a.inputs[0]), picked, rtol=1e-9, atol=1e-12)
    assert a.approximations == {}
    return a


def test_register_op_for_custom_function(clean_ops):
    spec = Identity(replay=lambda fn, x: 3 * x)
    dynamiclrp.register_op(Triple, spec)
    assert OPS["TripleBackward"] is spec
    att = _compare_custom_with_builtin(Triple.apply, lambda h: h * 3.0)
    assert att.stats.ops["TripleBackward"] == 1
    assert att.stats.internal_nodes >= 1  # its output was replayed with the registered forward




def test_register_routing_op_for_custom_function(clean_ops):
    dynamiclrp.register_op(Reverse, Routing(lambda fn, x: x.flip(-1)))
    _compare_custom_with_builtin(Reverse.apply, lambda h: h.flip(-1))


def test_register_op_by_name(clean_ops):
    dynamiclrp.register_op("TripleBackward", Identity(replay=lambda fn, x: 3 * x))
    x = torch.randn(2, 4, dtype=D, requires_grad=True)
    y = _custom_net(Triple.apply)(x)
    att = dynamiclrp.propagate(y, target=0, wrt=[x], rules=EXACT)
    torch.testing.assert_close(rows(att.inputs[0]), y[:, 0].detach(), rtol=1e-9, atol=1e-12)


def test_missing_rule_without_replay_is_activation_unavailable(clean_ops):
    dynamiclrp.register_op(Triple, Identity())  # a rule, but no way to recover the output
    x = torch.randn(2, 4, dtype=D, requires_grad=True)
    y = _custom_net(Triple.apply)(x)
    with pytest.raises(ActivationUnavailableError, match="TripleBackward"):
        dynamiclrp.propagate(y, target=0, wrt=[x])


def test_activation_unavailable_error_names_the_node():
    torch.manual_seed(5)
    a, b = nn.Linear(3, 3, bias=False).double(), nn.Linear(3, 3, bias=False).double()
    x = torch.randn(2, 3, dtype=D, requires_grad=True)
    y = (F.elu(a(x)) + b(x)).sum(1, keepdim=True)  # the add needs elu's output, which cannot be rebuilt
    with pytest.raises(ActivationUnavailableError, match="EluBackward0.*register an op entry"):
        dynamiclrp.propagate(y, target=0, wrt=[x])


def test_strict_false_uses_the_fallback_and_reports_it(clean_ops):
    torch.manual_seed(6)
    lin = nn.Linear(4, 3, bias=False).double()
    x = torch.randn(2, 4, dtype=D, requires_grad=True)
    y = lin(Triple.apply(x))
    with pytest.raises(MissingRuleError):
        dynamiclrp.propagate(y, target=0, wrt=[x])
    with pytest.warns(UserWarning, match="TripleBackward"):
        att = dynamiclrp.propagate(y, target=0, wrt=[x], strict=False, rules=EXACT)
    assert att.approximations == {"TripleBackward: fallback rule (equal split)": 1}
    torch.testing.assert_close(rows(att.inputs[0]), y[:, 0].detach(), rtol=1e-9, atol=1e-12)




def test_strict_false_fallback_on_an_intermediate_operand(clean_ops):
    torch.manual_seed(6)
    l1, l2 = nn.Linear(4, 4, bias=False).double(), nn.Linear(4, 3, bias=False).double()
    x = torch.randn(2, 4, dtype=D, requires_grad=True)
    y = l2(Triple.apply(l1(x)))  # l2 saves Triple's output: no replay needed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        att = dynamiclrp.propagate(y, target=0, wrt=[x], strict=False, rules=EXACT)
    assert att.approximations == {"TripleBackward: fallback rule (equal split)": 1}
    torch.testing.assert_close(rows(att.inputs[0]), y[:, 0].detach(), rtol=1e-9, atol=1e-12)


def test_wrt_errors():
    m = mlp()
    x = torch.randn(2, 5, dtype=D, requires_grad=True)
    y = m(x)
    other = torch.randn(2, 5, dtype=D, requires_grad=True)
    with pytest.raises(DynamicLRPError, match="not part of the outputs' graph"):
        dynamiclrp.propagate(y, wrt=[x, other])
    with pytest.raises(DynamicLRPError, match="does not require grad"):
        dynamiclrp.propagate(y, wrt=[torch.randn(2, 5, dtype=D)])
    with pytest.raises(TypeError, match="not a tensor"):
        dynamiclrp.propagate(y, wrt=[x, "x"])
    with pytest.raises(TypeError, match="not a tensor"):
        dynamiclrp.propagate((y, 3), wrt=[x])


def test_wrt_intermediate_and_parameter_and_single_tensor():
    m = mlp()
    x = torch.randn(2, 5, dtype=D, requires_grad=True)
    h = m[1](m[0](x))
    y = m[4](m[3](m[2](h)))
    att = dynamiclrp.propagate(y, target=1, wrt=[h, m[2].weight, x], rules=EXACT)
    torch.testing.assert_close(rows(att.inputs[0]), y[:, 1].detach(), rtol=1e-9, atol=1e-12)
    assert att.inputs[1].shape == m[2].weight.shape
    assert float(att.inputs[1].sum()) == pytest.approx(float(y[:, 1].detach().sum()), rel=1e-9)
    single = dynamiclrp.propagate(y, target=1, wrt=x, rules=EXACT)
    assert torch.equal(single.input, att.inputs[2])
    # wrt empty: nothing to return, but the run still reports its statistics
    none = dynamiclrp.propagate(y, target=1, rules=EXACT)
    assert none.inputs == [] and none.stats.nodes > 0


def test_unknown_preset():
    m, x = mlp(), torch.randn(1, 5, dtype=D, requires_grad=True)
    with pytest.raises(KeyError, match="unknown preset"):
        dynamiclrp.propagate(m(x), wrt=[x], preset="nope")


def test_missing_rule_error_names_the_innermost_module(clean_ops):
    """explain() names the module whose forward made a node without a rule: the innermost one, also when the node is
    the first or the last its module makes (the sequence-number ranges are half open, no throw-away nodes)."""

    class Tripled(nn.Module):
        def forward(self, h):
            return Triple.apply(h)  # the module's only node: first and last at once

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.tripled = nn.Linear(4, 4).double(), Tripled()

        def forward(self, x):
            return self.tripled(self.lin(x))

    model = nn.Sequential(Block(), nn.Linear(4, 2).double())
    with pytest.raises(MissingRuleError, match=r"TripleBackward \(x1, in module 0\.tripled\)"):
        dynamiclrp.explain(model, torch.randn(3, 4, dtype=D), target=0)
    _, scopes, _ = dynamiclrp.api.explain_forward(model, torch.randn(3, 4, dtype=D))
    ranges = {name: (start, end) for start, end, name in scopes.ranges}
    assert ranges["0.tripled"][1] - ranges["0.tripled"][0] == 1  # exactly one node, no probes in between
    assert ranges["0"][0] <= ranges["0.lin"][0] and ranges["0.tripled"][1] <= ranges["0"][1]


def test_module_scopes_keep_this_threads_calls_of_this_model():
    """The scope hooks are global module hooks: calls of another model, or of this one on another thread (whose
    sequence numbers are its own), are not recorded; none is left registered afterwards."""
    import threading

    from dynamiclrp.scopes import record_scopes

    model, other = nn.Sequential(nn.Linear(4, 4).double()), nn.Linear(4, 4).double()
    x = torch.randn(2, 4, dtype=D, requires_grad=True)
    with record_scopes(model) as scopes:
        worker = threading.Thread(target=lambda: model(x))
        worker.start()
        worker.join()
        other(x)
        assert scopes.ranges == []
        model(x)
    assert sorted(name for _, _, name in scopes.ranges) == ["", "0"]
    model(x)
    assert len(scopes.ranges) == 2


def test_module_scopes_without_the_counter_getter(clean_ops, monkeypatch):
    """A torch without ``_get_sequence_nr``: the stamps make a throw-away node each, and the paths are the same."""
    from dynamiclrp import scopes as scopes_module

    monkeypatch.setattr(scopes_module, "_stamp", scopes_module._probe_stamp)
    model = nn.Sequential(nn.Linear(4, 4).double(), nn.Sequential(nn.ReLU()), nn.Linear(4, 2).double())
    x = torch.randn(3, 4, dtype=D, requires_grad=True)
    outs, scopes, _ = dynamiclrp.api.explain_forward(model, x)
    paths, todo = {}, [outs[0].grad_fn]
    while todo:
        fn = todo.pop()
        paths.setdefault(fn.name(), set()).add(scopes.path_of(fn))
        todo += [f for f, _ in fn.next_functions if f is not None]
    assert paths["ReluBackward0"] == {"1.0"} and paths["AddmmBackward0"] == {"0", "2"}
