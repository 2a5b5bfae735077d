"""``subtract_addends``: an addend autograd dropped, recovered as the saved sum less the other addends.

The formula: for :math:`s = \\mathrm{fl}(a + b)` the recovered addend is :math:`a' = \\mathrm{fl}(s - b)`, and
:math:`|a' - a| \\le \\tfrac12 \\mathrm{ulp}(s) + \\tfrac12 \\mathrm{ulp}(a')`. Off (the default), every dropped
activation is replayed bitwise; on, the residual branch's layer is not recomputed, the relevance stays within
rounding of the exact one, and every use is counted in ``Attribution.approximations``.
"""

from __future__ import annotations

import os

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
