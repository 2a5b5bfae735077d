"""``subtract_addends``: an addend autograd dropped, recovered as the saved sum less the other addends.

The formula: for :math:`s = \\mathrm{fl}(a + b)` the recovered addend is :math:`a' = \\mathrm{fl}(s - b)`, and
:math:`|a' - a| \\le \\tfrac12 \\mathrm{ulp}(s) + \\tfrac12 \\mathrm{ulp}(a')`. Off (the default), every dropped
activation is replayed bitwise; on, the residual branch's layer is not recomputed, the relevance stays within
rounding of the exact one, and every use is counted in ``Attribution.approximations``.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import dynamiclrp
from dynamiclrp.graph import Graph
from dynamiclrp.ops import OPS
from dynamiclrp.promise import Promises

NOTE = "addend recovered as the saved sum less the other addends"


def _ulp(t: torch.Tensor) -> torch.Tensor:
    t = t.abs()
    return torch.nextafter(t, torch.full_like(t, float("inf"))) - t


def _recomputed(monkeypatch) -> list[int]:
    """Node ids whose output a weighted product (addmm's or mm's) recomputes from its saved operands."""
    hits: list[int] = []
    for spec in (OPS["AddmmBackward0"].product, OPS["MmBackward0"]):
        real = spec.output
        monkeypatch.setattr(spec, "output", lambda node, nr, real=real: (hits.append(node.id), real(node, nr))[1])
    return hits


class Residual(nn.Module):
    """Post-norm residual blocks, as BERT's: ``ln(x + lin(x))``; the layer norm saves the sum, nothing saves
    ``lin(x)``."""

    def __init__(self, d=8, depth=2):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.lns = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for lin, ln in zip(self.lins, self.lns):
            x = ln(x + lin(torch.tanh(x)))
        return self.head(x)


def _graph_of_a_sum(dtype):
    """``s = lin(x) + b`` normalised: the addition's operand 0 is mm's output, which nothing saved."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 16, bias=False).to(dtype)  # no bias: the replayed mm is bitwise the forward's
    x = torch.randn(4, 16, dtype=dtype, requires_grad=True)
    b = (torch.randn(4, 16, dtype=dtype) * 30).requires_grad_()  # a residual much larger than the branch
    a = lin(x)
    s = a + b
    y = nn.functional.layer_norm(s, (16,))
    graph = Graph.build([y.grad_fn])
    add = next(n for n in graph.nodes if n.kind == "AddBackward0")
    return graph, add, a.detach(), b.detach(), s.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recovered_addend_is_the_sum_less_the_other_within_the_bound(dtype):
    graph, add, a, b, s = _graph_of_a_sum(dtype)
    edge = add.inputs[0]
    exact = Promises(graph).value(edge.child, edge.nr)
    assert torch.equal(exact, a)  # the default replays the layer
    notes: dict[str, int] = {}
    fast = Promises(graph, notes, subtract_addends=True).value(edge.child, edge.nr)
    assert torch.equal(fast, s - b)
    assert bool(((fast - a).abs() <= 0.5 * _ulp(s) + 0.5 * _ulp(fast)).all())
    assert not torch.equal(fast, a)  # the check above is not vacuous: the residual is 30x the branch
    assert [k for k in notes if NOTE in k] and sum(notes.values()) == 1


def test_half_precision_sums_are_replayed():
    graph, add, a, _, _ = _graph_of_a_sum(torch.bfloat16)
    edge = add.inputs[0]
    notes: dict[str, int] = {}
    assert torch.equal(Promises(graph, notes, subtract_addends=True).value(edge.child, edge.nr), a)
    assert notes == {}


def test_broadcast_addend_is_replayed():
    """``s = a + c`` with ``c`` of shape (1, d) broadcast over rows: ``s - a`` does not determine ``c``."""
    torch.manual_seed(1)
    lin, lin2 = nn.Linear(8, 8).double(), nn.Linear(8, 8).double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    a = lin(x)
    c = lin2(x[:1])
    y = nn.functional.layer_norm(a.tanh() + c, (8,))  # tanh saves its output: a's own value is not needed
    graph = Graph.build([y.grad_fn])
    add = next(n for n in graph.nodes if n.kind == "AddBackward0")
    edge = add.inputs[1]
    notes: dict[str, int] = {}
    got = Promises(graph, notes, subtract_addends=True).value(edge.child, edge.nr)
    assert got.shape == (1, 8) and torch.equal(got, c.detach())
    assert notes == {}


def test_residual_layers_are_not_recomputed_and_relevance_agrees(monkeypatch):
    torch.manual_seed(2)
    model = Residual().double().eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    hits = _recomputed(monkeypatch)
    exact = dynamiclrp.explain(model, x, target=1, preset="attnlrp")
    n_exact = len(hits)
    hits.clear()
    with pytest.warns(UserWarning, match="subtract_addends"):
        fast = dynamiclrp.explain(model, x, target=1, preset="attnlrp", subtract_addends=True)
    assert n_exact >= 2 and len(hits) == n_exact - 2  # one recomputed layer fewer per residual block
    assert exact.approximations == {}
    (key,) = fast.approximations
    assert NOTE in key and fast.approximations[key] == 2
    torch.testing.assert_close(fast.inputs[0], exact.inputs[0], rtol=1e-10, atol=1e-13)
    assert fast.ledger is not None and len(fast.ledger) == len(exact.ledger)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_transformer_relevance_agrees_with_replay(arch, monkeypatch):
    """The residual branches of real transformer blocks (BERT: post-norm, LLaMA: pre-norm RMS) are read off the
    saved sums. In float32 the difference from the replayed relevance is below the replayed relevance's own
    rounding error (measured against the same model in float64)."""
    transformers = pytest.importorskip("transformers")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    torch.manual_seed(3)
    small = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=32, attn_implementation="eager")
    if arch == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2, **small))
        output = None
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **small))
        output = lambda o: o.logits[:, -1]  # noqa: E731
    model = model.eval()
    inputs = {"input_ids": torch.randint(1, 60, (1, 9))}
    hits = _recomputed(monkeypatch)
    exact = dynamiclrp.explain(model, inputs, target=0, preset="attnlrp", output=output)
    n_exact = len(hits)
    hits.clear()
    with pytest.warns(UserWarning, match="subtract_addends"):
        fast = dynamiclrp.explain(model, inputs, target=0, preset="attnlrp", output=output, subtract_addends=True)
    assert len(hits) <= n_exact - 2 * 2  # the attention output and the MLP's last layer, per block
    assert sum(v for k, v in fast.approximations.items() if NOTE in k) >= 4
    ref = dynamiclrp.explain(model.double(), inputs, target=0, preset="attnlrp", output=output).tokens
    rounding = (exact.tokens.double() - ref).abs().max()
    assert 0 < (fast.tokens.double() - exact.tokens.double()).abs().max() <= rounding



def test_addmm_product_recovered_from_its_output():
    """A fused ``addmm``'s bias addition: its matrix-product operand is the output less ``beta * bias`` (addmm's terms
    need every operand, so the recovered one is passed as a placeholder)."""
    torch.manual_seed(5)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    y = lin(x)
    graph = Graph.build([y.grad_fn])
    add = graph.nodes[0]
    assert add.kind == "AddBackward0" and graph.nodes[add.inputs[1].child].kind == "MmBackward0"
    got = add.spec.operand_from_output(add, 1, y.detach(), [lin.bias.detach(), None])
    assert torch.equal(got, y.detach() - lin.bias.detach())


# --------------------------------------------------------------------------- the gradient form's ε-factor
# The ε-step of a layer whose output z nothing saved needs only |z| / (|z| + ε). Where a residual sum holds z, the
# Promise System estimates it without replay, d = fl(s - b) with |d - z| <= u (|s| + |d|) + 2η, and the step keeps
# d's factor wherever the bound puts it within the unit roundoff of z's, working out the rest element by element.


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference relative to the largest value."""
    return float((a - b).abs().max() / b.abs().max())


def _branch_graph(dtype, residual=30.0):
    """``s = lin(x) + b`` with a 3-d input (the linear runs as a 2-d ``mm`` between views, as in a transformer),
    normalised (the norm saves ``s``; nothing saves ``lin(x)``)."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 16, bias=False).to(dtype)
    x = torch.randn(2, 4, 16, dtype=dtype, requires_grad=True)
    b = (torch.randn(2, 4, 16, dtype=dtype) * residual).requires_grad_()
    a = lin(x)
    s = a + b
    y = nn.functional.layer_norm(s, (16,))
    graph = Graph.build([y.grad_fn])
    mm = next(n for n in graph.nodes if n.kind == "MmBackward0")
    return graph, mm, a.detach().reshape(8, 16), b.detach().reshape(8, 16), s.detach().reshape(8, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subtracted_estimate_lies_within_its_bound(dtype):
    """``Promises.subtracted``: the estimate is the sum less the other addend, laid out as the slot (mm's 2-d
    output, the sum 3-d), with the sum in that layout too; the bound holds at every element, and is not vacuous
    (the estimate differs from the replayed value: the residual is 30x the branch). Nothing is kept: the slot's
    value is still the replay's."""
    graph, mm, a, b, s = _branch_graph(dtype)
    promises = Promises(graph)
    d, total = promises.subtracted(mm)
    assert d.shape == total.shape == a.shape
    assert torch.equal(d, s - b) and torch.equal(total, s)
    info = torch.finfo(dtype)
    bound = (s.abs() + d.abs()) * (info.eps / 2) + 2 * info.smallest_normal * info.eps
    assert bool(((d - a).abs() <= bound).all())
    assert not torch.equal(d, a)
    assert (mm.id, 0) not in promises.values
    assert torch.equal(promises.value(mm.id), a)  # the replay, bitwise
    assert Promises(graph, subtract_addends=True).subtracted(mm) is None  # the user's uncertified choice instead


def test_an_output_held_exactly_is_found_once(monkeypatch):
    """``Promises.subtracted`` declines an output a consumer saved (the exact value is there) and keeps the copy
    it found: the value asked for next (the ε-step's) is that copy, bitwise, without a second search through the
    consumers, and counted once as recovered."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 16, bias=False)
    x, c = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    a = lin(x)
    y = (a * c).sum()  # the product saves a: a copy of the layer's output
    graph = Graph.build([y.grad_fn])
    mm = next(n for n in graph.nodes if n.kind == "MmBackward0")
    promises, searches, search = Promises(graph), [], Promises._saved_copy

    def spied(self, key, depth=0):
        if depth == 0 and key == (mm.id, 0):
            searches.append(key)
        return search(self, key, depth)
    monkeypatch.setattr(Promises, "_saved_copy", spied)
    assert promises.subtracted(mm) is None
    assert torch.equal(promises.value(mm.id), a.detach())
    assert searches == [(mm.id, 0)] and promises.stats.recovered == 1


class _Cancelling(nn.Module):
    """A residual block whose branch cancels at some outputs: rows 3 and 7 of its weight are ``e0 - e1`` and the
    input's features 0 and 1 differ by one ulp, so those outputs are about 1e-7 while each term is about 1. The
    residual (about 1000) rounds them away in the sum: the estimate there is 0 where the ε-factor of the true output
    is about 0.1, and features 0 and 1 carry large shares through those rows."""

    def __init__(self, d=128):
        super().__init__()
        self.branch = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, 3)
        self.offset = nn.Parameter(torch.full((d,), 1000.0))
        with torch.no_grad():
            self.branch.weight.mul_(8.0)
            for j in (3, 7):
                self.branch.weight[j] = 0.0
                self.branch.weight[j, 0], self.branch.weight[j, 1] = 1.0, -1.0

    def forward(self, x):
        h = torch.relu(x + self.offset)  # about 1000 + x, saved (by the ReLU) for the estimate's subtraction
        return self.head(nn.functional.layer_norm(h + self.branch(x), x.shape[-1:]))


def _read_off_every_sum(monkeypatch):
    """Small layers too (by default only outputs of 2^16 elements and products of 768 terms up are read off)."""
    from dynamiclrp.ops import base, linear

    monkeypatch.setattr(base, "_SUBTRACTED_FROM", 0)
    monkeypatch.setattr(linear, "_TERMS_READ_OFF", 0)


def _cancelling_input(dtype, d=128):
    torch.manual_seed(1)
    x = torch.randn(2, 24, d, dtype=dtype)
    x[..., 1] = torch.nextafter(x[..., 0], torch.full_like(x[..., 0], math.inf))
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_epsilon_factor_from_a_residual_sum_matches_the_replay(dtype, monkeypatch):
    """The gradient form's ε-step at a branch whose output only a residual sum holds takes the factor from the
    Promise System's estimate, works out exactly (a dot product each) the elements the bound leaves uncertain --
    the cancelling outputs among them -- and never recomputes the branch's product. The relevance equals the
    replay's (the step with the branch recomputed) and node by node's."""
    from dynamiclrp.ops import base, linear

    _read_off_every_sum(monkeypatch)
    model, x = _Cancelling().to(dtype).eval(), _cancelling_input(dtype)
    worked_out, output_at = [], linear.Product.output_at

    def spied(self, run, node, nr, index):
        worked_out.append(index.clone())
        return output_at(self, run, node, nr, index)
    monkeypatch.setattr(linear.Product, "output_at", spied)
    hits = _recomputed(monkeypatch)
    kw = dict(target=1, preset="epsilon", ledger=False)
    got = dynamiclrp.explain(model, x, **kw)
    assert got.stats.gradient_form and hits == []  # the branch's product is not recomputed
    (index,) = worked_out
    columns = set(index[:, 1].tolist())
    assert {3, 7} <= columns and len(index) >= 2 * 48  # both cancelling outputs, at every row (2 x 24 rows)
    monkeypatch.setattr(base, "factor_by_subtraction", lambda *a, **k: None)
    replay = dynamiclrp.explain(model, x, **kw)
    assert hits != []
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert rel_diff(got.inputs[0], replay.inputs[0]) < tol
    ref = dynamiclrp.explain(model, x, target=1, preset="epsilon", gradient_form=False)
    assert rel_diff(got.inputs[0], ref.inputs[0]) < (1e-5 if dtype == torch.float32 else 1e-12)


def test_epsilon_factor_from_the_estimate_alone_would_be_wrong(monkeypatch):
    """The check above is not vacuous: the estimate's factor at every element (none worked out) moves features 0
    and 1 of the cancelling rows' inputs far from the replay's relevance."""
    from dynamiclrp.ops import base

    _read_off_every_sum(monkeypatch)
    monkeypatch.setattr(base, "_certain_from", lambda bound, eps, tau: bound * 0 if not isinstance(bound, float)
                        else 0.0)
    model, x = _Cancelling().eval(), _cancelling_input(torch.float32)
    kw = dict(target=1, preset="epsilon", ledger=False)
    got = dynamiclrp.explain(model, x, **kw)
    monkeypatch.setattr(base, "factor_by_subtraction", lambda *a, **k: None)
    replay = dynamiclrp.explain(model, x, **kw)
    assert rel_diff(got.inputs[0][..., :2], replay.inputs[0][..., :2]) > 1e-3


def test_product_works_out_elements_in_any_order():
    """``Product.output_at``: an ``mm``'s elements at an index in any order (each a dot product, as the forward's
    product up to its rounding: float64 here), and an ``addmm``'s bias addition's (the bias's element added)."""
    torch.manual_seed(4)
    x = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 40, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    for y, kind in ((x @ w.T, "MmBackward0"), (torch.addmm(bias, x, w.T), "AddBackward0")):
        graph = Graph.build([y.grad_fn])
        node = next(n for n in graph.nodes if n.kind == kind)
        index = torch.stack([torch.randperm(6).repeat(2)[:9], torch.randperm(9).flip(0)], 1)
        run = SimpleNamespace(graph=graph, promises=Promises(graph))
        got = node.spec.output_at(run, node, 0, index)
        want = y.detach()[index[:, 0], index[:, 1]]
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def test_epsilon_factor_from_a_residual_sum_is_within_the_unit_roundoff(monkeypatch):
    """Where the step keeps the estimate's factor, it is within a few unit roundoffs of the replayed output's (the
    estimate's own error at most one, by the bound; each factor's rounding the rest); where it works elements out,
    each is the forward's dot product up to that product's rounding, :math:`|\\Delta z| \\le \\gamma_K \\sum_k
    |x_k w_k|` (Higham 2002, §3.1: another order of the same sum). Float32, a residual about 200x the branch."""
    from dynamiclrp.ops import base, linear

    _read_off_every_sum(monkeypatch)
    checked, factor, output_at = [], base.factor_by_subtraction, linear.Product.output_at
    worked_out = []

    def spied(self, run, node, nr, index):
        z = output_at(self, run, node, nr, index)
        worked_out.append((index, z.clone(), self.saved_input(node, 0), self.saved_input(node, 1)))
        return z

    def compared(ctx, g, eps, out=None, temp=None):
        f = factor(ctx, g, eps, out, temp)
        if f is not None:
            checked.append((f.clone(), ctx.output(0), eps))
        return f
    monkeypatch.setattr(base, "factor_by_subtraction", compared)
    monkeypatch.setattr(linear.Product, "output_at", spied)
    model, x = _Cancelling().eval(), _cancelling_input(torch.float32)
    dynamiclrp.explain(model, x, target=1, preset="epsilon", ledger=False)
    ((f, z, eps),), ((index, got, a, b),) = checked, worked_out
    u = torch.finfo(torch.float32).eps / 2
    kept = torch.ones_like(f, dtype=torch.bool)
    kept[tuple(index.T)] = False
    assert int(kept.sum()) > 0.9 * kept.numel()
    assert float((f - base.stabilising_factor(z, eps))[kept].abs().max()) <= 4 * u
    rows, cols = index.unbind(1)
    terms = (a.double()[rows] * b.double().mT[cols]).abs().sum(-1)
    gamma = a.shape[1] * u / (1 - a.shape[1] * u)
    assert bool(((got.double() - z[rows, cols].double()).abs() <= gamma * terms).all())


@pytest.mark.parametrize("terms", [512, 768])
def test_products_of_many_terms_are_read_off_their_sum(terms):
    """By default an ``mm``'s output (or an ``addmm``'s bias addition's) is read off a residual sum from 768 terms
    per element up (BERT-base's attention output; an MLP's output, 2,048-3,072); below, recomputing it costs about
    what the subtraction's passes do."""
    x = torch.randn(3, terms, requires_grad=True)
    w = torch.randn(4, terms, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    for y, kind in ((x @ w.T, "MmBackward0"), (torch.addmm(bias, x, w.T), "AddBackward0")):
        graph = Graph.build([y.grad_fn])
        node = next(n for n in graph.nodes if n.kind == kind)
        run = SimpleNamespace(graph=graph, promises=Promises(graph))
        assert node.spec.read_off_sum(run, node) == (terms >= 768)
