"""The gradient form (:mod:`dynamiclrp.gradient_form`) against the node-by-node propagation, in float64.

The gradient form computes the ε → 0 limit of the ε-rules (ε ≤ 1e-12). The node-by-node side runs with
ε = 1e-30 on every ε-rule, so both compute the same limit and must agree to rounding and to the 1e-12 guard the
gradient form keeps on its few divisions (the seed over the logit, the identity rule's y / x): 1e-9 of the largest
relevance. A wrong factor (a missing half, a held-constant operand that still gets gradient) is off by O(1).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dynamiclrp
from dynamiclrp import rules as r
from dynamiclrp.errors import ActivationUnavailableError, DynamicLRPError, GraphFreedError

D = torch.float64
TOL = 1e-9

LIMIT = {"linear": r.Epsilon(1e-30), "sum": r.Epsilon(1e-30), "norm": r.LinearisedNorm(1e-30)}
LIMIT_PRESET = {"attnlrp": {**LIMIT, "product": r.Uniform(1e-30)},
                "cp_lrp": {**LIMIT, "product": r.Constant(1e-30), "attention": r.Constant(1e-30)}}


def _at(fn):
    """A stand-in for the context a step reads its autograd node through (``ctx.node.fn``)."""
    return SimpleNamespace(node=SimpleNamespace(fn=fn))


class Mixer(nn.Module):
    """One of each op the gradient form hooks or passes: linear layers with and without bias, layer norm,
    attention by hand (scaled scores, an untracked causal mask, softmax, the product with the values), a residual
    stream, RMSNorm by hand (``x * rsqrt(mean(x²) + ε) * w``), SwiGLU (a product of two activations), GELU (erf
    and tanh), tanh, sigmoid, mean pooling, slicing, cat, scaling by constants."""

    def __init__(self, d: int = 8, masked: bool = True):
        super().__init__()
        self.masked = masked
        self.inp = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.rms = nn.Parameter(torch.rand(d) + 0.5)
        self.gate, self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ff = nn.Linear(d, d)
        self.head = nn.Linear(3 * d, 3)

    def forward(self, x):
        t = x.shape[1]
        h = self.inp(x)
        a = self.ln(h)
        s = self.q(a) @ self.k(a).transpose(-1, -2) / math.sqrt(a.shape[-1])
        mask = torch.triu(torch.full((t, t), -1e9, dtype=x.dtype), 1)
        h = h + torch.softmax(s + mask if self.masked else s, -1) @ self.v(a)
        n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.rms
        h = h + self.down(F.gelu(F.silu(self.gate(n)) * self.up(n), approximate="tanh"))
        h = h + F.gelu(self.ff(h))
        feats = torch.cat([h.mean(1), torch.tanh(h[:, 0]) * 2.0, torch.sigmoid(h[:, -1])], -1)
        return self.head(feats) / 2.0


def mixer():
    torch.manual_seed(0)
    return Mixer().to(D).eval(), torch.randn(2, 5, 8, dtype=D)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp"])
def test_matches_node_by_node_on_every_op(preset):
    model, x = mixer()
    mods = ["ln", "v", "down", "ff"]
    ref = dynamiclrp.explain(model, x, preset=preset, modules=mods, ledger=False, gradient_form=False,
                             rules=LIMIT_PRESET[preset])
    got = dynamiclrp.explain(model, x, preset=preset, modules=mods, ledger=False, gradient_form=True)
    assert got.stats.gradient_form and not ref.stats.gradient_form
    assert rel_diff(got.inputs[0], ref.inputs[0]) < TOL
    for m in mods:
        assert rel_diff(got.modules[m], ref.modules[m]) < TOL, m
    assert float(got.inputs[0].abs().sum()) > 0


def test_default_presets_agree_to_their_epsilon():
    """With the presets' own ε = 1e-12 on the node-by-node side: the difference is ε's, far below float32."""
    model, x = mixer()
    for preset in ("attnlrp", "cp_lrp"):
        ref = dynamiclrp.explain(model, x, preset=preset, ledger=False, gradient_form=False)
        got = dynamiclrp.explain(model, x, preset=preset, ledger=False)
        assert got.stats.gradient_form
        assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-7


def test_cp_lrp_gives_held_constant_operands_nothing():
    """CP-LRP holds the attention weights and the gate constant: the query/key and gate layers get nothing."""
    model, x = mixer()
    att = dynamiclrp.explain(model, x, preset="cp_lrp", modules=["q", "k", "gate", "up"], ledger=False)
    assert att.stats.gradient_form
    for m in ("q", "k", "gate"):
        assert float(att.modules[m].abs().max()) == 0.0, m
    assert float(att.modules["up"].abs().max()) > 0


transformers = pytest.importorskip("transformers")


def tiny(name: str, attn: str):
    torch.manual_seed(0)
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64)
        model = transformers.BertForSequenceClassification._from_config(cfg, attn_implementation=attn)
        return model.to(D).eval(), lambda o: o.logits
    if name == "llama":  # grouped-query attention, RMSNorm and SwiGLU
        cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=attn)
        return model.to(D).eval(), lambda o: o.logits[:, -1]
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)
    return model.to(D).eval(), lambda o: o.logits[:, -1]


@pytest.mark.parametrize("name,attn,preset", [(n, a, p) for n in ("bert", "gpt2") for a in ("eager", "sdpa")
                                              for p in ("attnlrp", "cp_lrp")])
def test_matches_node_by_node_on_transformers(name, attn, preset):
    """Fused SDPA attention included: its query, key and value gradients scaled by the parts' rules. Under CP-LRP
    the attention (the fused node, or eager attention's product of weights and values) gives the values their
    gradient alone, the node bypassed."""
    model, out = tiny(name, attn)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    # padding: the attention mask reaches the softmax (by hand) or SDPA (fused). GPT-2's is left padding under its
    # causal mask: the padded queries' rows attend only to padded keys, every logit rounded away by the fill value
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs["attention_mask"][1, :3] = 0
    ref = dynamiclrp.explain(model, inputs, preset=preset, output=out, ledger=False, gradient_form=False,
                             rules=LIMIT_PRESET[preset])
    got = dynamiclrp.explain(model, inputs, preset=preset, output=out, ledger=False)
    assert got.stats.gradient_form
    # BERT's GELU (identity rule) in both presets; GPT-2's GELU is written out, x * f(x) with f(x) held constant:
    # the product's gradient for x alone. Under CP-LRP each layer's attention (fused, or the product with the
    # values) and GPT-2's packed projection. Below the pick of BERT's class token and of GPT-2's last token, the last
    # layer's MLP projections (under CP-LRP BERT's attention output projection too) multiply those rows alone; the
    # pass starts below GPT-2's LM head, read at the last token (its product of that row alone)
    expected = {"GeluBackward0": 2} if name == "bert" else {"MulBackward0": 2, "MmBackward0": 1}
    expected["AddmmBackward0"] = 2
    if preset == "cp_lrp":
        expected["BmmBackward0" if attn == "eager" else "ScaledDotProductFlashAttentionForCpuBackward0"] = 2
        expected["AddmmBackward0"] += 1 if name == "bert" else 2
    assert got.stats.bypassed_kinds == expected
    for k in ref.embeddings:
        assert rel_diff(got.embeddings[k], ref.embeddings[k]) < TOL, k


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp"])
def test_llama_bypasses(attn, preset, monkeypatch):
    """LLaMA's bypasses: its RMSNorms' products ``x * f(x)`` (not the final one, nor the first layer's, whose input
    is the recorded embedding: it must get its gradient through autograd), the SiLUs under AttnLRP; under CP-LRP
    the gates' products and the second layer's attention, routed through its RMSNorm; below the pick of the last
    token, the last block's MLP projections multiply its rows alone, and the pass starts below the LM head. The same
    answer as without bypasses."""
    from dynamiclrp import gradient_form

    model, out = tiny("llama", attn)
    inputs = {"input_ids": torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))}
    got = dynamiclrp.explain(model, inputs, preset=preset, output=out, ledger=False)
    monkeypatch.setattr(gradient_form, "BYPASSES", False)
    plain = dynamiclrp.explain(model, inputs, preset=preset, output=out, ledger=False)
    expected = {"MulBackward0": 3, "SiluBackward0": 2} if preset == "attnlrp" else {
        "MulBackward0": 5, "BmmBackward0" if attn == "eager" else "ScaledDotProductFlashAttentionForCpuBackward0": 1}
    # below the pick of the last token, the last block's MLP projections multiply its rows alone (AttnLRP: gate and
    # up, their route passing the block's norm by hand, whose product's step counts once more; CP-LRP: up and down,
    # and the attention's output projection where the attention is fused, its values' step a direct one)
    expected["MmBackward0"] = 3 if preset == "cp_lrp" and attn == "sdpa" else 2
    expected["MulBackward0"] += preset == "attnlrp"
    expected["MmBackward0"] += 1  # the pass starts below the LM head, read at the last token (that row's product)
    assert got.stats.gradient_form and got.stats.bypassed_kinds == expected and plain.stats.bypassed == 0
    assert float(plain.tokens.abs().max()) > 0
    if preset == "cp_lrp":
        assert rel_diff(got.tokens, plain.tokens) < 1e-12
        return
    # transformers' RMSNorm casts to float32 and back: the gate's and the up projection's gradients, carried through
    # the last block's norm one by one, are rounded to float32 there one by one, where the plain pass rounds their
    # sum: float32 rounding (4e-10 here). Without the cast, the same to float64's
    assert rel_diff(got.tokens, plain.tokens) < 1e-7
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def without_cast(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", without_cast)
    plain = dynamiclrp.explain(model, inputs, preset=preset, output=out, ledger=False)
    monkeypatch.setattr(gradient_form, "BYPASSES", True)
    got = dynamiclrp.explain(model, inputs, preset=preset, output=out, ledger=False)
    assert got.stats.bypassed_kinds == expected and rel_diff(got.tokens, plain.tokens) < 1e-12


# ---------------------------------------------------------------------------------------------- when it is not used
class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c(x)).flatten(1))


def test_rules_without_a_gradient_form_propagate_node_by_node():
    torch.manual_seed(0)
    model, x = Conv().to(D).eval(), torch.randn(2, 3, 8, 8, dtype=D)
    att = dynamiclrp.explain(model, x, preset="epsilon_plus", ledger=False)
    assert not att.stats.gradient_form  # z⁺ needs w⁺: not the gradient of the layer
    with pytest.raises(DynamicLRPError, match=r"\(node #\d+\) has no gradient form"):
        dynamiclrp.explain(model, x, preset="epsilon_plus", ledger=False, gradient_form=True)
    mixer_model, mixer_x = mixer()
    with pytest.raises(DynamicLRPError, match="no gradient form"):  # the paper's proportional rule on sums
        dynamiclrp.explain(mixer_model, mixer_x, preset="paper", ledger=False, gradient_form=True)
    att = dynamiclrp.explain(model, x, preset="attnlrp", ledger=False)
    assert att.stats.gradient_form


class EpsilonCNN(nn.Module):
    """Every place the ε-rule's stabilised gradient form sits: convolutions with and without bias followed by a
    batch norm merged into them, a residual sum, a transposed convolution whose batch norm cannot be merged, a
    batch norm after max-pooling (no linear op below: passed through), average pooling, a dense layer with a
    batch norm merged into its ``mm``, a dense layer on a non-contiguous 3-d input (its bias an addition of its
    own), a mean, and dense layers with and without bias."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.up, self.bu = nn.ConvTranspose2d(6, 4, 2, stride=2), nn.BatchNorm2d(4)
        self.bp = nn.BatchNorm2d(4)
        self.tok = nn.Linear(4, 5)
        self.fc, self.bf = nn.Linear(5, 7), nn.BatchNorm1d(7)
        self.head = nn.Linear(7, 3, bias=False)
        with torch.no_grad():
            for bn in (self.b1, self.b2, self.bu, self.bp, self.bf):
                bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.3, 0.3)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.c2(h)) + h)
        h = F.max_pool2d(self.bu(self.up(h)), 2)
        h = F.avg_pool2d(F.relu(self.bp(h)), 2, stride=1)
        t = self.tok(h.flatten(2).transpose(1, 2)).mean(1)  # F.linear on a non-contiguous input: mm + view + add
        return self.head(F.relu(self.bf(self.fc(t))))


def keep_every_scratch_buffer(monkeypatch) -> list[int]:
    """Make the run keep its scratch buffers whatever their size (as it does for large CPU tensors, which no test
    model has): the buffers are then reused from layer to layer, where a buffer still in use would show. Returns
    a list that counts the reuses."""
    from dynamiclrp import engine

    monkeypatch.setattr(engine, "SCRATCH_BYTES", 0)
    reused, scratch = [0], engine.Run.scratch

    def counted(self, key, like):
        known = len(self._scratch)
        buf = scratch(self, key, like)
        reused[0] += len(self._scratch) == known
        return buf
    monkeypatch.setattr(engine.Run, "scratch", counted)
    return reused


@pytest.mark.parametrize("kept_scratch", [False, True])
@pytest.mark.parametrize("eps", [{"linear": r.Epsilon(0.3), "sum": r.Epsilon(0.1)}, {}])
def test_epsilon_above_the_limit_is_the_stabilised_gradient(eps, kept_scratch, monkeypatch):
    """The ε-rule with a real stabiliser (the ``epsilon`` preset's 1e-6; 0.3 and 0.1 where a factor left out
    would show) has a gradient form: the gradient arriving at the layer's output times :math:`|z| / (|z| + ε)`.
    It must give the node-by-node answer to rounding, in float64, batch norms merged as zennit merges them; also
    with the run's scratch memory reused from layer to layer."""
    reused = keep_every_scratch_buffer(monkeypatch) if kept_scratch else [1]
    torch.manual_seed(0)
    model, x = EpsilonCNN().to(D).eval(), torch.randn(2, 3, 8, 8, dtype=D)
    kw = dict(preset="epsilon", rules=eps, target=[0, 2])
    got = dynamiclrp.explain(model, x, ledger=False, gradient_form=True, **kw)
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert got.stats.gradient_form and not ref.stats.gradient_form and reused[0]
    scale = ref.inputs[0].abs().max()
    assert (got.inputs[0] - ref.inputs[0]).abs().max() <= 1e-12 * scale
    if eps:  # the stabiliser matters here: the ε → 0 limit is far off
        limit = dynamiclrp.explain(model, x, ledger=False, preset="epsilon", target=[0, 2],
                                   rules={"linear": r.Epsilon(1e-30), "sum": r.Epsilon(1e-30)})
        assert (limit.inputs[0] - ref.inputs[0]).abs().max() > 1e-2 * scale


class TokenMLP(nn.Module):
    """A feed-forward block on a sequence (``x``: batch x tokens x d), T5's: ``down(relu(up(x)))``, each linear layer
    an ``mm`` (or ``addmm``) between two views, then the mean over tokens."""

    def __init__(self, bias: bool):
        super().__init__()
        self.up, self.down = nn.Linear(6, 10, bias=bias), nn.Linear(10, 4, bias=bias)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))).mean(1)


@pytest.mark.parametrize("bias", [False, True])
def test_epsilon_step_reads_the_layer_output_off_a_relu_above_views(bias, monkeypatch):
    r"""The ε-rule's factor :math:`|z| / (|z| + ε)` on a linear layer over tokens whose output a ReLU alone reads
    through a view (``mm``, then the view back to batch x tokens): the ReLU saved :math:`z` wherever it is positive,
    and its backward gave the gradient 0 elsewhere, so the step needs no recomputed product. The relevance pass makes
    no product of the layer's input with its weight (14 x 6 by 6 x 10), which it does where the ReLU is not used,
    and equals the node-by-node answer in float64 with a stabiliser (0.3) large enough to show."""
    from dynamiclrp.ops import base

    torch.manual_seed(0)
    model, x = TokenMLP(bias).to(D).eval(), torch.randn(2, 7, 6, dtype=D)
    kw = dict(preset="epsilon", rules={"linear": r.Epsilon(0.3)})

    def relevance_pass():
        xg = x.clone().requires_grad_()
        y = model(xg)
        with _Counting() as products:
            got = dynamiclrp.propagate(y, wrt=[xg], ledger=False, **kw)
        return got, products.shapes

    got, shapes = relevance_pass()
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert got.stats.gradient_form and ((14, 6), (6, 10)) not in shapes
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12
    monkeypatch.setattr(base, "relu_above", lambda *a: None)  # the output recomputed: the product is made
    again, shapes = relevance_pass()
    assert ((14, 6), (6, 10)) in shapes and rel_diff(again.inputs[0], ref.inputs[0]) < 1e-12


class CancellingResidual(nn.Module):
    """A residual stream with exact zeros (channel 0 of ``a(x) + b(x)``: ``b`` the negative of ``a`` there), read
    by a layer norm and by the next sum; that sum's output read by another layer norm and a last sum."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.a, self.b, self.f = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)
        with torch.no_grad():
            self.b.weight[0], self.b.bias[0] = -self.a.weight[0], -self.a.bias[0]

    def forward(self, x):
        s = self.a(x) + self.b(x)
        t = s + self.f(self.ln1(s))
        return self.head((t + self.ln2(t)).mean(1))


class CancellingResidualRMS(CancellingResidual):
    """:class:`CancellingResidual` whose first sum is also read by an RMSNorm written out (``s * rsqrt(mean(s²))``,
    a product whose statistics the rules hold constant: a step with a direct form, which a bypass may run)."""

    def forward(self, x):
        s = self.a(x) + self.b(x)
        t = s + self.f(self.ln1(s)) + self.f(s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))
        return self.head((t + self.ln2(t)).mean(1))


@pytest.mark.parametrize("model_cls", [CancellingResidual, CancellingResidualRMS])
@pytest.mark.parametrize("eps", [{"linear": r.Epsilon(0.05), "sum": r.Epsilon(0.1)}, {}])
def test_identity_rule_on_a_sum_with_exact_zeros(eps, model_cls):
    r"""A layer norm passing relevance on (the ``epsilon`` preset) at a value that is exactly 0 where its output is
    not: the ratio :math:`g\,y / x` cannot carry it, but the ε-rule of the sum below gives it a finite share,
    :math:`R_x / \mathrm{stab}(x)`. The sum's ε-step is applied by its consumers (the norm's step as
    :math:`g\,y / \mathrm{stab}(x)`, the next sum after its own step), so the form carries it: the same relevance as
    node by node, in one gradient pass."""
    torch.manual_seed(0)
    model, x = model_cls().to(D).eval(), torch.randn(2, 4, 6, dtype=D)
    assert not (model.a(x) + model.b(x))[..., 0].any()  # the exact zeros
    kw = dict(preset="epsilon", rules=eps, target=1)
    got = dynamiclrp.explain(model, x, ledger=False, gradient_form=True, **kw)
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert got.stats.gradient_form and not ref.stats.gradient_form
    # with the preset's ε of 1e-6 the zero channel's two addends get relevance 1e6 times the rest, which cancels
    # on its way to the input: float64 rounding of those terms is then 1e-10 of the result, whatever the order
    assert rel_diff(got.inputs[0], ref.inputs[0]) < (1e-12 if eps else 1e-9)


@pytest.mark.parametrize("check_finite", [True, False])
def test_relevance_at_a_zero_value_is_not_dropped(check_finite):
    """The identity rule at a value that is 0 where the rule's output is not (sigmoid, a batch norm after a ReLU)
    gives relevance no ratio can carry: :math:`g = R / 0`. A ReLU's backward below then drops the infinity where
    its output is 0, and the pass would lose that relevance without a trace; the form must notice and leave the run
    to the node-by-node propagation, whether or not finiteness is checked."""
    for mid, preset in [(nn.Sigmoid(), "attnlrp"), (nn.Sigmoid(), "epsilon"), (nn.BatchNorm1d(6), "epsilon"),
                        (nn.BatchNorm1d(6), "attnlrp")]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), mid, nn.Linear(6, 2)).to(D).eval()
        if isinstance(mid, nn.BatchNorm1d):  # a shift: the batch norm of 0 is not 0
            with torch.no_grad():
                mid.running_mean.uniform_(-1, 1), mid.bias.uniform_(-1, 1)
        x = torch.randn(3, 4, dtype=D)
        got = dynamiclrp.explain(model, x, preset=preset, target=0, ledger=False, check_finite=check_finite)
        ref = dynamiclrp.explain(model, x, preset=preset, target=0, gradient_form=False)
        # attnlrp linearises the batch norm: a linear map, no ratio (the form carries everything)
        assert got.stats.gradient_form is (preset == "attnlrp" and not isinstance(mid, nn.Sigmoid))
        torch.testing.assert_close(got.inputs[0], ref.inputs[0], rtol=1e-9, atol=1e-12)
        with torch.no_grad():  # no ReLU output is 0 now: the form carries everything
            model[0].weight.abs_(), model[0].bias.abs_()
        got = dynamiclrp.explain(model, x.abs(), preset=preset, target=0, ledger=False)
        ref = dynamiclrp.explain(model, x.abs(), preset=preset, target=0, gradient_form=False)
        assert got.stats.gradient_form
        torch.testing.assert_close(got.inputs[0], ref.inputs[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kept_scratch", [False, True])
@pytest.mark.parametrize("eps", [{"linear": r.Epsilon(0.3), "sum": r.Epsilon(0.1), "product": r.Uniform(0.2)}, {}])
def test_epsilon_preset_on_a_transformer_without_a_mask(eps, kept_scratch, monkeypatch):
    """The ``epsilon`` preset on every op of the mixer (its mask left out: see the next test): the uniform rule
    with a real ε on the attention products (the ratio halved and stabilised), on SwiGLU's element-wise product
    (halved: the rule does not use ε there), the norms and softmax passed through (the identity's step, layer
    norm's rule being MergeBatchNorm, which merges nothing here), ε-rules on the linear layers and sums; also with
    the run's scratch memory reused from layer to layer."""
    reused = keep_every_scratch_buffer(monkeypatch) if kept_scratch else [1]
    torch.manual_seed(0)
    model, x = Mixer(masked=False).to(D).eval(), torch.randn(2, 5, 8, dtype=D)
    mods = ["ln", "v", "down", "ff"]
    kw = dict(preset="epsilon", rules=eps, modules=mods)
    got = dynamiclrp.explain(model, x, ledger=False, gradient_form=True, **kw)
    ref = dynamiclrp.explain(model, x, ledger=False, gradient_form=False, **kw)
    assert got.stats.gradient_form and not ref.stats.gradient_form and reused[0]
    assert rel_diff(got.inputs[0], ref.inputs[0]) < TOL
    for m in mods:
        assert rel_diff(got.modules[m], ref.modules[m]) < TOL, m


def test_softmax_passed_through_never_reads_logits_known_only_without_their_constant():
    """Softmax under the identity rule needs its logits; where they add a constant autograd did not record, they
    are known only with it taken as zero, which the node-by-node rule checks (a mask: the masked logits get
    nothing; anything else: refused). The gradient form must not use them unchecked: here it refuses as node by
    node does, where it had given an answer for logits it did not know."""
    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 2)
            self.register_buffer("bias", torch.randn(4))

        def forward(self, x):
            return self.out(torch.softmax(self.lin(x) + self.bias, -1) * x)

    torch.manual_seed(0)
    model, x = Biased().to(D).eval(), torch.randn(3, 4, dtype=D)
    for form in (None, False):
        with pytest.raises(ActivationUnavailableError, match="not a plain mask"):
            dynamiclrp.explain(model, x, preset="attnlrp", rules={"softmax": r.Pass()}, target=0, ledger=False,
                               gradient_form=form)


def test_stabilised_sum_with_an_unrecorded_addend_propagates_node_by_node():
    """A sum with an addend autograd did not record (a tensor that does not require grad) may be explained with
    that addend taken as zero, so its output is not the rule's denominator: no gradient form there; unless the sum
    feeds softmaxes alone (the mixer's attention mask), whose step checks that the addend is a mask."""
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.register_buffer("shift", torch.rand(3))

        def forward(self, x):
            return self.lin(x) * 2.0 + self.shift

    model, x = Shift().to(D).eval(), torch.randn(2, 4, dtype=D)
    with pytest.raises(DynamicLRPError, match="AddBackward0.*no gradient form"):
        dynamiclrp.explain(model, x, preset="epsilon", ledger=False, gradient_form=True, target=0)
    model, x = mixer()  # its causal mask feeds a softmax alone: a mask the softmax's step checks (next test)
    got = dynamiclrp.explain(model, x, preset="epsilon", ledger=False, gradient_form=True)
    ref = dynamiclrp.explain(model, x, preset="epsilon", ledger=False, gradient_form=False)
    assert rel_diff(got.inputs[0], ref.inputs[0]) < TOL


class MaskedAttention(nn.Module):
    """Causal attention by hand whose only sum is the untracked mask's: ``softmax(q kᵀ + mask) @ v``, scores of
    magnitude about ``scale``."""

    def __init__(self, d: int = 6, scale: float = 0.05):
        super().__init__()
        self.scale = scale
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.head = nn.Linear(d, 2, bias=False)

    def forward(self, x):
        t = x.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), dtype=x.dtype), 1)
        s = self.q(x) @ self.k(x).transpose(-1, -2) * self.scale
        return self.head((torch.softmax(s + mask, -1) @ self.v(x))[:, -1])


@pytest.mark.parametrize("kept_scratch", [False, True])
def test_mask_sum_stabiliser_applied_by_the_softmax_step(kept_scratch, monkeypatch):
    """The ε-step of ``scores + mask`` (the mask untracked), read by one softmax passing relevance unchanged, is
    applied by that softmax's step (the sum's own step is PLAIN): the same relevance as node by node, where the
    stabiliser matters (scores about 0.05, ε 0.02: the ε → 0 limit is far off); also with the run's scratch
    memory kept."""
    from dynamiclrp import gradient_form

    if kept_scratch:
        keep_every_scratch_buffer(monkeypatch)
    hooked = []

    def steps(run, seeds, _orig=gradient_form.gradient_steps):
        found, reason = _orig(run, seeds)
        hooked.append({run.graph.nodes[nid].kind for nid, _, _ in found})
        return found, reason
    monkeypatch.setattr(gradient_form, "gradient_steps", steps)
    torch.manual_seed(0)
    model, x = MaskedAttention().to(D).eval(), torch.randn(2, 5, 6, dtype=D)
    kw = dict(preset="epsilon", target=1, ledger=False)
    stab = {"sum": r.Epsilon(0.02), "product": r.Uniform(1e-30), "linear": r.Epsilon(1e-30)}
    got = dynamiclrp.explain(model, x, gradient_form=True, rules=stab, **kw)
    ref = dynamiclrp.explain(model, x, gradient_form=False, rules=stab, **kw)
    limit = dynamiclrp.explain(model, x, gradient_form=False, rules={**stab, "sum": r.Epsilon(1e-30)}, **kw)
    assert got.stats.gradient_form and not ref.stats.gradient_form
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12
    assert rel_diff(limit.inputs[0], ref.inputs[0]) > 1e-2
    assert "SoftmaxBackward0" in hooked[0] and "AddBackward0" not in hooked[0]


def test_replayed_values_are_released_once_their_node_has_run(monkeypatch):
    """The gradient form lets go of what the Promise System replayed for a node once the node's backward has run
    (the attention scores each layer's ε-steps recomputed, where the softmax's step does not recompute them
    itself: :func:`~dynamiclrp.ops.attention.scores_chain` declined here), not at the end of the run; the
    relevance is the same."""
    from dynamiclrp.ops import attention
    from dynamiclrp.promise import Promises

    monkeypatch.setattr(attention, "scores_chain", lambda ctx, softmax: None)

    released, forget = [], Promises.forget

    def counted(self, node):
        released.append(node.kind)
        forget(self, node)
    monkeypatch.setattr(Promises, "forget", counted)
    torch.manual_seed(0)
    model, x = MaskedAttention().to(D).eval(), torch.randn(2, 5, 6, dtype=D)
    kw = dict(preset="epsilon", target=1, ledger=False, rules={"sum": r.Epsilon(0.02)})
    got = dynamiclrp.explain(model, x, gradient_form=True, **kw)
    # the scores q kᵀ, their scaling and the masked sum, replayed for the softmax's and the products' ε-steps
    assert got.stats.gradient_form and {"UnsafeViewBackward0", "MulBackward0", "AddBackward0"} <= set(released)
    released.clear()
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12


class WrittenAttention(nn.Module):
    """Multi-head attention written out, ``softmax(q kᵀ * c [+ causal mask]) @ v`` (or ``/ (1 / c)``), the mask
    untracked, scores of magnitude about ``c``; the output's mean over the tokens."""

    def __init__(self, mask: bool = True, divide: bool = False, d: int = 8, heads: int = 2, c: float = 0.05):
        super().__init__()
        self.mask, self.divide, self.heads, self.c = mask, divide, heads, c
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.head = nn.Linear(d, 2, bias=False)

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = (p(x).view(n, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        s = q @ k.transpose(-1, -2)
        s = s / (1 / self.c) if self.divide else s * self.c
        if self.mask:
            s = s + torch.triu(torch.full((t, t), float("-inf"), dtype=x.dtype), 1)
        # every token's output: each block of query rows gets a gradient (the keys' is summed over the blocks)
        return self.head((torch.softmax(s, -1) @ v).transpose(1, 2).flatten(2).mean(1))


@pytest.mark.parametrize("way", ["bypass", "below its size", "no bypass", "off the CPU"])
@pytest.mark.parametrize("variant", ["masked, scaled", "masked, divided", "no mask"])
def test_softmax_step_takes_the_scores_chain(variant, way, monkeypatch):
    """Attention written out under the ε-rule with stabilisers that matter on the mask's sum (0.02) and on the scores
    product (0.01; scores about 0.05): the softmax's step recomputes the scores from the product's operands a block
    of query rows at a time (16 rows here: three blocks, the last one short) and applies the sum's and the
    product's ε-steps itself (:func:`~dynamiclrp.ops.attention.scores_chain`): the relevance node by node gives,
    with the scores product left unhooked and no scores, scaled scores or logits replayed. On the CPU the step also
    carries each block on to the queries and keys (``bypass``): the softmax, the scaling and the product run no
    backward of their own; without the bypass, or off the CPU (:data:`~dynamiclrp.ops.attention.CPU_DEVICES`
    emptied), or for attention weights smaller than :data:`~dynamiclrp.ops.attention.DIRECT_SCORES` (``below its
    size``: these, 3,200), the softmax's backward runs and the step replaces its result."""
    from dynamiclrp import gradient_form
    from dynamiclrp.ops import attention
    from dynamiclrp.promise import Promises

    monkeypatch.setattr(gradient_form, "BYPASSES", way != "no bypass")
    if way != "below its size":
        monkeypatch.setattr(attention, "DIRECT_SCORES", 0)
    if way == "off the CPU":
        monkeypatch.setattr(attention, "CPU_DEVICES", ())
    monkeypatch.setattr(attention, "_BLOCK", 1)
    monkeypatch.setattr(attention, "_HEADS_BLOCK", 1)
    hooked, replayed, value = [], [], Promises.value

    def steps(run, seeds, _orig=gradient_form.gradient_steps):
        found, reason = _orig(run, seeds)
        hooked.append([run.graph.nodes[nid].kind for nid, _, _ in found])
        return found, reason

    def spied(self, nid, nr=0):
        replayed.append(self.graph.nodes[nid].kind)
        return value(self, nid, nr)
    monkeypatch.setattr(gradient_form, "gradient_steps", steps)
    monkeypatch.setattr(Promises, "value", spied)
    torch.manual_seed(0)
    model = WrittenAttention(mask=variant != "no mask", divide=variant == "masked, divided").to(D).eval()
    x = torch.randn(2, 40, 8, dtype=D)
    rules = {"sum": r.Epsilon(0.02), "product": r.Uniform(0.01), "linear": r.Epsilon(1e-30)}
    kw = dict(preset="epsilon", target=1, ledger=False)
    got = dynamiclrp.explain(model, x, gradient_form=True, rules=rules, **kw)
    assert got.stats.gradient_form
    assert hooked[0].count("BmmBackward0") == 1 and "SoftmaxBackward0" in hooked[0]  # the values product alone
    assert not {"UnsafeViewBackward0", "MulBackward0", "DivBackward0", "AddBackward0"} & set(replayed)
    assert got.stats.bypassed_kinds == ({"SoftmaxBackward0": 1} if way == "bypass" else {})
    ref = dynamiclrp.explain(model, x, gradient_form=False, rules=rules, **kw)
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12
    limit = dynamiclrp.explain(model, x, gradient_form=False, rules={**rules, "sum": r.Epsilon(1e-30),
                                                                      "product": r.Uniform(1e-30)}, **kw)
    assert rel_diff(limit.inputs[0], ref.inputs[0]) > 1e-3


class BiasedAttention(nn.Module):
    """T5's attention written out: unscaled scores ``q kᵀ``, to which each layer adds (in place) a position bias all
    layers share, looked up in an embedding of relative positions (``table``; :func:`dynamiclrp.explain` records
    every embedding lookup, so the bias's relevance is asked for) or a parameter; ``causal``: T5's decoder, whose
    bias carries a causal mask autograd did not record (its smallest number where masked); ``mask``: another
    additive constant autograd does not record, added to the bias (T5's encoder's attention mask: 0 where attended,
    its smallest number at padded keys); ``read``: the bias read once more, by the output (its mean added);
    ``apart``: the masks added to the logits after the bias, in a sum of their own (T5 under transformers 5)."""

    def __init__(self, table: bool, causal: bool, d: int = 8, heads: int = 2, layers: int = 2, t: int = 40,
                 mask: torch.Tensor | None = None, read: bool = False, apart: bool = False):
        super().__init__()
        self.apart = apart
        self.qkv = nn.ModuleList(nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(3)) for _ in range(layers))
        self.table = nn.Embedding(2 * t - 1, heads) if table else None
        self.bias = None if table else nn.Parameter(0.3 * torch.randn(heads, t, t))
        self.head, self.heads, self.causal = nn.Linear(d, 2, bias=False), heads, causal
        self.register_buffer("mask", mask)
        self.read = read

    def forward(self, x):
        n, t, d = x.shape
        if self.table is not None:
            pb = self.table(torch.arange(t)[None, :] - torch.arange(t)[:, None] + t - 1).permute(2, 0, 1)[None]
        else:
            pb = self.bias[None, :, :t, :t]
        masks = None  # the constants autograd does not record: added to the bias (transformers 4) or apart
        if self.causal:
            masks = torch.triu(torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype), 1)
            pb = pb if self.apart else pb + masks
        if self.mask is not None:
            masks = self.mask if masks is None else masks + self.mask
            pb = pb if self.apart else pb + self.mask
        for q, k, v in self.qkv:
            qh, kh, vh = (p(x).view(n, t, self.heads, -1).transpose(1, 2) for p in (q, k, v))
            s = qh @ kh.transpose(-1, -2)
            s += pb
            if masks is not None and self.apart:
                s = s + masks
            x = x + (torch.softmax(s, -1) @ vh).transpose(1, 2).reshape(n, t, d)
        return self.head(x.mean(1)) + pb.mean() if self.read else self.head(x.mean(1))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("table", [True, False])
def test_softmax_step_takes_a_chain_with_a_recorded_bias(table, causal, monkeypatch):
    """T5's logits: unscaled scores plus a recorded position bias (with a causal mask autograd did not record, or
    none). The softmax's step recomputes the scores a block of rows at a time, adds the bias (recovered once, its
    mask taken as 0 and checked), and applies the sum's ε-step; the scores product is not recomputed whole. Where
    the bias's relevance is asked for (an embedding looked up), the sum's backward hands the bias the logits'
    gradient, so the product's factor is not folded into it but left for the product's own step; where it is not
    (a parameter), the step folds it and carries the scores' gradient on by hand. Both equal node by node in
    float64 (the inputs' relevance and the bias table's), with stabilisers that matter."""
    from dynamiclrp.ops import attention
    from dynamiclrp.promise import Promises

    monkeypatch.setattr(attention, "_BLOCK", 1)
    monkeypatch.setattr(attention, "_HEADS_BLOCK", 1)
    monkeypatch.setattr(attention, "DIRECT_SCORES", 0)  # carried by hand where it can be, whatever the size
    chains, replayed, scores, value, step = [], [], set(), Promises.value, attention._scores_identity_step

    def spied(self, nid, nr=0):
        replayed.append(nid)
        return value(self, nid, nr)

    def taken(ctx, chain):
        chains.append((chain.scaling, chain.bias is not None, chain.folds_product))
        scores.update(chain.through)
        return step(ctx, chain)
    monkeypatch.setattr(Promises, "value", spied)
    monkeypatch.setattr(attention, "_scores_identity_step", taken)
    torch.manual_seed(0)
    model, x = BiasedAttention(table, causal).to(D).eval(), torch.randn(2, 40, 8, dtype=D)
    rules = {"sum": r.Epsilon(0.02), "product": r.Uniform(0.01), "linear": r.Epsilon(1e-30)}
    kw = dict(preset="epsilon", target=1, ledger=False, rules=rules)
    got = dynamiclrp.explain(model, x, gradient_form=True, **kw)
    assert got.stats.gradient_form and chains == [(None, True, not table)] * 2
    assert len(scores) == 6 and not scores & set(replayed)  # sums, views, products: the scores in blocks alone
    assert got.stats.bypassed_kinds == {"SoftmaxBackward0": 2}
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12
    if table:
        assert float(ref.embeddings["table.weight"].abs().max()) > 0
        assert rel_diff(got.embeddings["table.weight"], ref.embeddings["table.weight"]) < 1e-12
    limit = dynamiclrp.explain(model, x, gradient_form=False, preset="epsilon", target=1, ledger=False,
                               rules={**rules, "sum": r.Epsilon(1e-30), "product": r.Uniform(1e-30)})
    assert rel_diff(limit.inputs[0], ref.inputs[0]) > 1e-3


class TwinBiasedAttention(nn.Module):
    """Two attentions side by side on one input, each adding the same looked-up position bias to its scores, their
    operations interleaved (both scores, both sums, both softmaxes, both value products): backward then runs both
    softmaxes' steps before either scores product's, so both products' factors wait at once."""

    def __init__(self, d: int = 8, heads: int = 2, t: int = 40):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d, bias=False) for _ in range(2))
        self.table, self.heads = nn.Embedding(2 * t - 1, heads), heads
        self.head = nn.Linear(d, 2, bias=False)

    def forward(self, x):
        n, t, d = x.shape
        pb = self.table(torch.arange(t)[None, :] - torch.arange(t)[:, None] + t - 1).permute(2, 0, 1)[None]
        qkv = [[h.view(n, t, self.heads, -1).transpose(1, 2) for h in p(x).split(d, -1)] for p in self.qkv]
        scores = [q @ k.transpose(-1, -2) for q, k, _ in qkv]
        logits = [z + pb for z in scores]
        weights = [torch.softmax(z, -1) for z in logits]
        outs = [w @ v for w, (_, _, v) in zip(weights, qkv)]
        a, b = (o.transpose(1, 2).reshape(n, t, d) for o in outs)
        return self.head((x + a + b).mean(1))


@pytest.mark.parametrize("model", ["layers", "side by side"])
def test_a_product_factors_memory_serves_the_next_chain_never_a_waiting_one(model, monkeypatch):
    """A chain that leaves the scores product its factor (a bias with a gradient of its own) takes memory the
    previous product's backward used up: T5's layers one after the other share one factor's memory. Two chains
    whose factors wait at once (side by side, :class:`TwinBiasedAttention`) each get their own. Equal to node by
    node in float64 either way."""
    from dynamiclrp.ops import attention

    memory, runs, left = [], [], attention._left_factor

    def spied(ctx, chain):
        hook = left(ctx, chain)

        def h(grad_outputs):
            f = ctx.run.derived.get((attention._LEFT_FACTOR, ctx.node.id))
            memory.append(None if f is None else f.data_ptr())
            runs.append(ctx.run)
            return hook(grad_outputs)
        return h
    monkeypatch.setattr(attention, "_left_factor", spied)
    torch.manual_seed(0)
    net = BiasedAttention(table=True, causal=False, layers=3) if model == "layers" else TwinBiasedAttention()
    net, x = net.to(D).eval(), torch.randn(2, 40, 8, dtype=D)
    rules = {"sum": r.Epsilon(0.02), "product": r.Uniform(0.01), "linear": r.Epsilon(1e-30)}
    kw = dict(preset="epsilon", target=1, ledger=False, rules=rules)
    got = dynamiclrp.explain(net, x, gradient_form=True, **kw)
    assert None not in memory and len(memory) == (3 if model == "layers" else 2)
    assert len(set(memory)) == (1 if model == "layers" else 2)
    # every factor made went back to the spares once its product had run: one made for three layers
    (made,) = [v for k, v in runs[-1].derived.items() if k[0] == attention._LEFT_SPARES]
    assert len(made) == (1 if model == "layers" else 2)
    ref = dynamiclrp.explain(net, x, gradient_form=False, **kw)
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12
    assert rel_diff(got.embeddings["table.weight"], ref.embeddings["table.weight"]) < 1e-12


@pytest.mark.parametrize("mask", ["zero", "padded", "padded left", "not a mask"])
def test_a_bias_every_layer_adds_is_checked_once_where_no_position_is_masked(mask, monkeypatch):
    """T5's encoder: each layer adds one recorded position bias, to which an attention mask autograd did not
    record was added (taken as 0, checked by the softmax's step). Where one layer's check finds every position
    attended and the mask constant per row, it is so for every layer adding the same bias: the other layers check
    no more, but hand the pass that deviation against their own logits' tolerance. With padded keys (on the right,
    or on the left) each layer checks: its masked positions are its own to find. A mask that is not one (a half
    spread of 0.01 where some keys get 0.02) passes the check of the layer with large logits (within 1e-3 (1 +
    max |x|) of each block's), fails those of the layers with small ones: refused by the gradient form too, with
    the error node by node gives. Else equal to node by node in float64."""
    from dynamiclrp.ops import attention

    monkeypatch.setattr(attention, "_BLOCK", 1)
    monkeypatch.setattr(attention, "_HEADS_BLOCK", 1)
    checked, check = [], attention._check_mask

    def spied(node, x, s, dim, scratch, deferred=None, *args):
        if deferred is not None:  # the gradient form's (node by node checks at once)
            checked.append(node.id)
        return check(node, x, s, dim, scratch, deferred, *args)
    monkeypatch.setattr(attention, "_check_mask", spied)
    t = 40
    added = torch.zeros(t, t, dtype=D)
    if mask == "padded":  # a block reads the keys up to the last one it weights: not every position
        added[:, -8:] = torch.finfo(D).min
    elif mask == "padded left":  # every key read, 8 of them weighted 0
        added[:, :8] = torch.finfo(D).min
    elif mask == "not a mask":
        added[:, ::5] = 0.02
    torch.manual_seed(0)
    model, x = BiasedAttention(table=True, causal=False, layers=3, mask=added).to(D).eval(), torch.randn(2, t, 8,
                                                                                                         dtype=D)
    with torch.no_grad():  # the last layer's logits within ±28, the others' within ±6
        model.qkv[-1][0].weight.mul_(6.0)
    rules = {"sum": r.Epsilon(0.02), "product": r.Uniform(0.01), "linear": r.Epsilon(1e-30)}
    kw = dict(preset="epsilon", target=1, ledger=False, rules=rules)
    if mask == "not a mask":
        with pytest.raises(ActivationUnavailableError, match="position bias"):
            dynamiclrp.explain(model, x, gradient_form=True, **kw)
        assert len(set(checked)) == 1  # the last layer's check passed, and the others took its deviation
        return
    got = dynamiclrp.explain(model, x, gradient_form=True, **kw)
    assert got.stats.gradient_form
    assert len(set(checked)) == (1 if mask == "zero" else 3)
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12
    assert rel_diff(got.embeddings["table.weight"], ref.embeddings["table.weight"]) < 1e-12


class LookedUpBiasAttention(BiasedAttention):
    """:class:`BiasedAttention` whose bias is the embedding's lookup itself, ``(heads, t, t)``: a row of the table
    per head and query, no view between (the slot the layers read is the one :func:`dynamiclrp.explain` records)."""

    def __init__(self):
        super().__init__(table=True, causal=False)
        self.table = nn.Embedding(7, 40)

    def forward(self, x):
        n, t, d = x.shape
        pb = self.table(torch.arange(self.heads * t).view(self.heads, t) % 7)
        for q, k, v in self.qkv:
            qh, kh, vh = (p(x).view(n, t, self.heads, -1).transpose(1, 2) for p in (q, k, v))
            s = qh @ kh.transpose(-1, -2)
            s += pb
            x = x + (torch.softmax(s, -1) @ vh).transpose(1, 2).reshape(n, t, d)
        return self.head(x.mean(1))


@pytest.mark.parametrize("variant", ["causal", "read", "looked up"])
def test_a_bias_every_layer_adds_gets_their_gradients_summed(variant, monkeypatch):
    """Where the bias's relevance is asked for (an embedding looked up), each layer's step carried on by hand hands
    the bias the logits' gradient too: summed over the layers, carried down to the table's lookup once the last
    layer has given its own (one nested pass). Read elsewhere too (by the output), the bias's node also gets a
    gradient in the outer pass: each pass carries its part. Where the bias is the lookup itself (a recorded slot)
    the sum is added to what the pass reads there, no pass nested. One pass, both softmaxes bypassed, equal to node
    by node in float64 (the inputs' and the table's relevance). Under a causal mask autograd did not record (T5's
    decoder), or none."""
    from dynamiclrp import gradient_bypass, gradient_form
    from dynamiclrp.ops import attention

    monkeypatch.setattr(attention, "DIRECT_SCORES", 0)
    nested, hand_on = [], gradient_bypass._hand_on

    def spied(bypasses, edges, given, frontier, ends):
        nested.append([bypasses.fn(nid).name() for nid, _ in frontier])
        return hand_on(bypasses, edges, given, frontier, ends)
    monkeypatch.setattr(gradient_bypass, "_hand_on", spied)
    passes, run_pass = [], gradient_form.propagate_gradient_form
    monkeypatch.setattr(gradient_form, "propagate_gradient_form",
                        lambda *args, **kw: passes.append(1) or run_pass(*args, **kw))
    torch.manual_seed(0)
    read = variant == "read"
    model = LookedUpBiasAttention() if variant == "looked up" else BiasedAttention(
        table=True, causal=variant == "causal", read=read)  # (a mean of the masked: -inf)
    model, x = model.to(D).eval(), torch.randn(2, 40, 8, dtype=D)
    rules = {"sum": r.Epsilon(0.02), "product": r.Uniform(0.01), "linear": r.Epsilon(1e-30)}
    kw = dict(preset="epsilon", target=1, ledger=False, rules=rules)
    got = dynamiclrp.explain(model, x, gradient_form=True, **kw)
    assert got.stats.gradient_form and got.stats.bypassed_kinds == {"SoftmaxBackward0": 2}
    assert passes == []  # no second pass without bypasses (the api's own call is not the module's name)
    assert nested.count(["EmbeddingBackward0"]) == 1  # the bias's sum, to the table's lookup
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12
    assert rel_diff(got.embeddings["table.weight"], ref.embeddings["table.weight"]) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_a_bias_looked_up_head_last_is_read_dense_by_every_layer(causal, monkeypatch):
    """T5 looks its position bias up as (queries, keys, heads) and permutes the heads to the front, so the bias's
    keys lie a head count apart in memory (and so do those of its sum with a causal mask, which keeps that layout).
    The chain's step takes it with its keys adjacent, copied once: every layer reads that one copy, and so does
    every later reader of the slot (the bias's own step, where its gradients are handed on). The relevance is
    node by node's."""
    from dynamiclrp import promise
    from dynamiclrp.ops import attention

    monkeypatch.setattr(attention, "DIRECT_SCORES", 0)
    read, dense_value = [], promise.Promises.dense_value

    def spied(self, nid, nr=0):
        v = dense_value(self, nid, nr)
        read.append((self, (nid, nr), v))
        return v
    monkeypatch.setattr(promise.Promises, "dense_value", spied)
    torch.manual_seed(0)
    model, x = BiasedAttention(table=True, causal=causal).to(D).eval(), torch.randn(2, 40, 8, dtype=D)
    rules = {"sum": r.Epsilon(0.02), "product": r.Uniform(0.01), "linear": r.Epsilon(1e-30)}
    kw = dict(preset="epsilon", target=1, ledger=False, rules=rules)
    got = dynamiclrp.explain(model, x, gradient_form=True, **kw)
    assert got.stats.gradient_form and got.stats.bypassed_kinds == {"SoftmaxBackward0": 2}
    assert len(read) == 2 and len({k for _, k, _ in read}) == 1  # both layers, one slot
    (_, _, first), (_, _, second) = read
    assert first.stride(-1) == 1 and second is first  # copied once (kept in the slot's place), keys adjacent
    # the slot as autograd's forward laid it out: keys a head count apart (the copy was needed); the copy holds its
    # value (a causal mask added to it, which autograd did not record, taken as 0 and checked by the softmax)
    bias = model.table(torch.arange(40)[None, :] - torch.arange(40)[:, None] + 39).permute(2, 0, 1)[None]
    assert bias.stride(-1) == 2 and torch.equal(first, bias.detach())
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12
    assert rel_diff(got.embeddings["table.weight"], ref.embeddings["table.weight"]) < 1e-12


@pytest.mark.parametrize("way", ["by hand", "in the softmax's gradient"])
@pytest.mark.parametrize("table", [True, False])
@pytest.mark.parametrize("masks", ["causal", "padded", "not a mask"])
def test_softmax_step_takes_a_chain_whose_mask_is_added_apart(masks, table, way, monkeypatch):
    r"""T5 under transformers 5: the logits are ``(q kᵀ + bias) + mask``, the position bias in one sum and the mask
    (autograd did not record it) in a second. The softmax's step takes both sums' ε-steps with the product's, on
    the scores recomputed a block at a time: :math:`g = R_X\,\frac{|X|}{|X| + \varepsilon}\,/\,\mathrm{stab}(X)`
    times the product's factor (:math:`X` the logits, the mask taken as 0 and checked), the sums' own steps plain,
    nothing replayed; carried on by hand or worked out in the softmax's gradient. Equal to node by node in float64,
    under a causal mask or with padded keys, the bias a table looked up (its relevance asked for) or a parameter.
    An unrecorded addend that is not a mask (its spread per row 0.5) is refused, as node by node refuses it."""
    from dynamiclrp import promise
    from dynamiclrp.ops import attention

    monkeypatch.setattr(attention, "DIRECT_SCORES", 0 if way == "by hand" else 1 << 40)
    replayed, value, chains, scores_chain = set(), promise.Promises.value, {}, attention.scores_chain

    def spied(self, nid, nr=0):
        replayed.add(nid)
        return value(self, nid, nr)

    def found(ctx, softmax):
        chain = scores_chain(ctx, softmax)
        if chain is not None:
            chains[softmax.id] = chain
        return chain
    monkeypatch.setattr(promise.Promises, "value", spied)
    monkeypatch.setattr(attention, "scores_chain", found)
    torch.manual_seed(0)
    pad = torch.zeros(2, 1, 1, 40, dtype=D)
    pad[1, ..., 32:] = torch.finfo(D).min
    added = {"padded": pad, "not a mask": 0.5 * torch.randn(1, 1, 40, 40, dtype=D)}.get(masks)
    model = BiasedAttention(table=table, causal=masks == "causal", mask=added, apart=True).to(D).eval()
    x = torch.randn(2, 40, 8, dtype=D)
    rules = {"sum": r.Epsilon(0.02), "product": r.Uniform(0.01), "linear": r.Epsilon(1e-30)}
    kw = dict(preset="epsilon", target=1, ledger=False, rules=rules)
    if masks == "not a mask":
        for form in (True, False):
            with pytest.raises(ActivationUnavailableError, match="not a plain mask"):
                dynamiclrp.explain(model, x, gradient_form=form, **kw)
        return
    got = dynamiclrp.explain(model, x, gradient_form=True, **kw)
    assert got.stats.gradient_form
    assert got.stats.bypassed_kinds == ({"SoftmaxBackward0": 2} if way == "by hand" else {})
    assert len(chains) == 2 and all(c.outer is not None for c in chains.values())  # both layers' softmaxes
    assert not {n for c in chains.values() for n in c.through} & replayed  # no logits, sums or scores replayed
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12
    if table:
        assert rel_diff(got.embeddings["table.weight"], ref.embeddings["table.weight"]) < 1e-12


def test_product_step_works_its_factor_out_where_none_was_left(monkeypatch):
    """The scores product of a chain that leaves its ε-factor to it (a recorded bias whose relevance is asked for)
    finds none where the softmax's step did not leave one: it then works the factor out itself, as the ε-step
    does elsewhere (the scores recomputed), and the answer is node by node's all the same."""
    from dynamiclrp.ops import attention

    made, left_factor = [], attention._left_factor

    def forgetting(ctx, chain):
        hook = left_factor(ctx, chain)

        def dropped(grad_outputs):
            made.append(ctx.run.derived.pop((attention._LEFT_FACTOR, ctx.node.id), None) is not None)
            return hook(grad_outputs)
        return dropped
    monkeypatch.setattr(attention, "_left_factor", forgetting)
    torch.manual_seed(0)
    model, x = BiasedAttention(table=True, causal=True).to(D).eval(), torch.randn(2, 40, 8, dtype=D)
    rules = {"sum": r.Epsilon(0.02), "product": r.Uniform(0.01), "linear": r.Epsilon(1e-30)}
    kw = dict(preset="epsilon", target=1, ledger=False, rules=rules)
    got = dynamiclrp.explain(model, x, gradient_form=True, **kw)
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert got.stats.gradient_form and made == [True, True]
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12
    assert rel_diff(got.embeddings["table.weight"], ref.embeddings["table.weight"]) < 1e-12


class RowsMaskedAttention(WrittenAttention):
    """:class:`WrittenAttention` under a causal mask whose last 8 query rows attend to nothing (a safe softmax gives
    them no weight at all: all zeros), or (``padded``) under no causal mask but with the last 8 keys masked for
    every query (padding)."""

    def __init__(self, padded: bool = False):
        super().__init__()
        self.padded = padded

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = (p(x).view(n, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        mask = torch.zeros(t, t, dtype=x.dtype)
        if self.padded:
            mask[:, t - 8:] = float("-inf")
        else:
            mask = torch.triu(mask.fill_(float("-inf")), 1)
            mask[t - 8:] = float("-inf")
        s = torch._safe_softmax(q @ k.transpose(-1, -2) * self.c + mask, -1)
        return self.head((s @ v).transpose(1, 2).flatten(2).mean(1))


class PoisonedEmpty(TorchDispatchMode):
    """Fresh floating-point memory filled with NaN: a result that reads memory nobody wrote shows it."""

    EMPTY = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default,
             torch.ops.aten.empty_strided.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not isinstance(args[0], torch.Tensor):
            return args[0]  # a number autograd saved (a wrapped number, which a dispatch mode is handed unwrapped)
        out = func(*args, **(kwargs or {}))
        if func in self.EMPTY and out.is_floating_point():
            out.fill_(math.nan)
        return out


@pytest.mark.parametrize("way", ["by hand", "in the softmax's gradient", "in fresh memory"])
@pytest.mark.parametrize("model", ["causal", "rows masked", "keys padded", "causal bias table"])
def test_scores_chain_reads_the_keys_a_block_weights(model, way, monkeypatch):
    """The softmax's step over a chain recomputes a block of query rows' scores only up to the last key its rows
    weight (the saved probabilities; past it every weight is exactly 0, and so is the block's relevance): over 40
    tokens in blocks of 16 rows, under a causal mask 16, 32 and 40 keys, with the last 8 rows attending to nothing
    (a safe softmax) 16, 32 and none, with the last 8 keys padded 32 for each. The keys past it get a gradient of 0
    and, where the step leaves the product's factor to it (a bias table), a factor of 0: fresh memory filled with
    NaN shows any read of memory nobody wrote. Carried to the queries and keys by hand, or worked out in the
    softmax's own gradient or in fresh memory, equal
    to node by node in float64."""
    from dynamiclrp.ops import attention

    monkeypatch.setattr(attention, "_BLOCK", 1)
    monkeypatch.setattr(attention, "_HEADS_BLOCK", 1)
    monkeypatch.setattr(attention, "DIRECT_SCORES", 0 if way == "by hand" else 1 << 40)
    if way == "in fresh memory":
        monkeypatch.setattr(attention, "spare", lambda *args: None)
    extents, weighted_keys = [], attention._weighted_keys

    def spied(w, keys, guess):
        extents.append(weighted_keys(w, keys, guess))
        return extents[-1]
    monkeypatch.setattr(attention, "_weighted_keys", spied)
    torch.manual_seed(0)
    x = torch.randn(2, 40, 8, dtype=D)
    expected = {"rows masked": [16, 32, 0], "keys padded": [32, 32, 32]}.get(model, [16, 32, 40])
    model = {"causal": WrittenAttention, "rows masked": RowsMaskedAttention,
             "keys padded": lambda: RowsMaskedAttention(padded=True)}.get(
        model, lambda: BiasedAttention(table=True, causal=True))().to(D).eval()
    rules = {"sum": r.Epsilon(0.02), "product": r.Uniform(0.01), "linear": r.Epsilon(1e-30)}
    kw = dict(preset="epsilon", target=1, ledger=False, rules=rules)
    with PoisonedEmpty():
        got = dynamiclrp.explain(model, x, gradient_form=True, **kw)
    layers = 2 if isinstance(model, BiasedAttention) else 1
    assert got.stats.gradient_form
    assert extents == expected * 2 * 2 * layers  # batch, heads
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12
    if isinstance(model, BiasedAttention):
        assert rel_diff(got.embeddings["table.weight"], ref.embeddings["table.weight"]) < 1e-12


class WhereMaskedAttention(WrittenAttention):
    """GPT-2's logits: scaled scores masked by ``torch.where`` (a causal mask of the smallest number), then an
    attention mask autograd did not record added: no chain of a product's scores (:func:`dynamiclrp.ops.attention.
    scores_chain`), the softmax's own step with the sum's ε-step."""

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = (p(x).view(n, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        s = torch.where(causal, q @ k.transpose(-1, -2) * self.c, torch.finfo(x.dtype).min)
        s = s + torch.zeros(t, t, dtype=x.dtype)  # the attention mask: nothing padded
        return self.head((torch.softmax(s, -1) @ v).transpose(1, 2).flatten(2).mean(1))


def test_masked_softmax_step_carries_relevance_at_a_logit_of_zero():
    r"""The identity rule's step on a softmax whose logits are a sum with an untracked mask but no product's scores
    (``torch.where`` between): with the sum's ε-step folded in, :math:`g_x = g\,P / \mathrm{stab}_\varepsilon(x)`,
    no ratio :math:`g P / x`. A token whose features are 0 has queries of 0, so logits of exactly 0 against the
    keys it attends to (the tokens before it, whose values are not 0): the ratio was infinite there and sent the
    whole run node by node; the pass now carries that relevance itself, as node by node does, and equals it in
    float64."""
    torch.manual_seed(0)
    model, x = WhereMaskedAttention().to(D).eval(), torch.randn(2, 40, 8, dtype=D)
    x[:, 5] = 0.0
    rules = {"sum": r.Epsilon(0.02), "product": r.Uniform(0.01), "linear": r.Epsilon(1e-30)}
    kw = dict(preset="epsilon", target=1, ledger=False, rules=rules)
    got = dynamiclrp.explain(model, x, gradient_form=True, **kw)
    assert got.stats.gradient_form
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12


class CrossAttentionDecoder(nn.Module):
    """An encoder-decoder's cross-attention written out, two decoder layers: the queries from the decoder's stream,
    the keys and values from the encoder's output (``x``'s first ``t`` tokens, projected; the rest, projected, start
    the decoder's stream), ``softmax(q kᵀ * c) @ v`` added to the stream. The second layer's queries come from a
    stream whose first layer read the encoder's output: its slot lies above the encoder's."""

    def __init__(self, d: int = 8, heads: int = 2, layers: int = 2, t: int = 24, c: float = 0.3):
        super().__init__()
        self.enc, self.dec = nn.Linear(d, d), nn.Linear(d, d)
        self.qkv = nn.ModuleList(nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(3)) for _ in range(layers))
        self.head, self.heads, self.t, self.c = nn.Linear(d, 2, bias=False), heads, t, c

    def forward(self, x):
        n, _, d = x.shape
        e, h = self.enc(x[:, :self.t]), self.dec(x[:, self.t:])
        for q, k, v in self.qkv:
            qh = q(h).view(n, -1, self.heads, d // self.heads).transpose(1, 2)
            kh, vh = (p(e).view(n, -1, self.heads, d // self.heads).transpose(1, 2) for p in (k, v))
            p = torch.softmax(qh @ kh.transpose(-1, -2) * self.c, -1)
            h = h + (p @ vh).transpose(1, 2).reshape(n, -1, d)
        return self.head(h.mean(1))


def test_nested_bypass_declines_a_frontier_above_another(monkeypatch):
    """The second cross-attention's nested pass would end at two slots, the decoder's stream (its queries) and the
    encoder's output (its keys), the first above the second: the first cross-attention reads the encoder's output
    below the stream. Autograd's engine, asked for both, runs the stream's node to reach the encoder's output,
    handing the queries' gradient on below it there, and again in the outer pass after its delivery: counted twice.
    The planner declines that bypass; the first layer's (its queries from the decoder's input projection) stays.
    One pass, node by node's answer in float64."""
    from dynamiclrp.ops import attention

    monkeypatch.setattr(attention, "DIRECT_SCORES", 0)
    torch.manual_seed(0)
    model, x = CrossAttentionDecoder().to(D).eval(), torch.randn(2, 24 + 16, 8, dtype=D)
    rules = {"sum": r.Epsilon(0.02), "product": r.Uniform(0.01), "linear": r.Epsilon(1e-30)}
    kw = dict(preset="epsilon", target=1, ledger=False, rules=rules)
    got = dynamiclrp.explain(model, x, gradient_form=True, **kw)
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert got.stats.gradient_form and got.stats.bypassed_kinds.get("SoftmaxBackward0") == 1
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12


class UnrecordedBiasAttention(WrittenAttention):
    """:class:`WrittenAttention` whose scaled scores get a position bias autograd did not record (a buffer): not a
    mask, so no rule may take it as 0."""

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = (p(x).view(n, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        bias = torch.linspace(-1.0, 1.0, t * t, dtype=x.dtype).view(t, t)
        s = q @ k.transpose(-1, -2) * self.c + bias
        return self.head((torch.softmax(s, -1) @ v).transpose(1, 2).flatten(2).mean(1))


@pytest.mark.parametrize("gradient_form", [True, False])
def test_scores_chain_checks_an_unrecorded_addend_is_a_mask(gradient_form):
    """The softmax's step over a chain takes an addend autograd did not record as 0 (a mask: 0 where attended). It
    checks that on the logits it recomputes, as node by node does: a position bias held in a buffer is refused
    with an error that names it, by the gradient form too (it used to be taken as 0 without a word)."""
    torch.manual_seed(0)
    model, x = UnrecordedBiasAttention().to(D).eval(), torch.randn(2, 40, 8, dtype=D)
    with pytest.raises(ActivationUnavailableError, match="position bias"):
        dynamiclrp.explain(model, x, preset="epsilon", target=1, ledger=False, gradient_form=gradient_form)


class PackedWrittenAttention(WrittenAttention):
    """:class:`WrittenAttention` with queries, keys and values from one projection, split (GPT-2's ``c_attn``)."""

    def __init__(self, d: int = 8, **kw):
        super().__init__(d=d, **kw)
        self.qkv = nn.Linear(d, 3 * d, bias=False)

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = (p.view(n, t, self.heads, -1).transpose(1, 2) for p in self.qkv(x).split(x.shape[-1], -1))
        s = q @ k.transpose(-1, -2) * self.c + torch.triu(torch.full((t, t), float("-inf"), dtype=x.dtype), 1)
        return self.head((torch.softmax(s, -1) @ v).transpose(1, 2).flatten(2).mean(1))


def test_nested_bypass_declines_a_frontier_slot_only_its_region_feeds(monkeypatch):
    """Queries, keys and values split from one projection: the split's values slot gets its gradient from outside the
    softmax's region, its queries' and keys' slots from the region alone. The outer pass gives the split nothing
    there, and no hook may add to nothing: the planner declines the softmax's bypass (it used to fail at run time
    and run the whole pass again without bypasses). One pass, the node-by-node answer."""
    from dynamiclrp import gradient_form
    from dynamiclrp.ops import attention

    monkeypatch.setattr(attention, "DIRECT_SCORES", 0)  # the bypass planned whatever the size
    monkeypatch.setattr(attention, "_BLOCK", 1)
    monkeypatch.setattr(attention, "_HEADS_BLOCK", 1)
    passes, run_pass = [], gradient_form.propagate_gradient_form

    def counted(run, seeds, prepared, bypass=None):
        passes.append(bypass)
        return run_pass(run, seeds, prepared, bypass)
    monkeypatch.setattr(gradient_form, "propagate_gradient_form", counted)
    torch.manual_seed(0)
    model, x = PackedWrittenAttention().to(D).eval(), torch.randn(2, 40, 8, dtype=D)
    rules = {"sum": r.Epsilon(0.02), "product": r.Uniform(0.01), "linear": r.Epsilon(1e-30)}
    kw = dict(preset="epsilon", target=1, ledger=False, rules=rules)
    got = dynamiclrp.explain(model, x, gradient_form=True, **kw)
    assert got.stats.gradient_form and passes == []  # the api's own call is not the module's name: reruns only
    assert "SoftmaxBackward0" not in got.stats.bypassed_kinds
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12


class TensorScaledAttention(WrittenAttention):
    """:class:`WrittenAttention` whose scores are scaled element by element by a constant tensor (not one number)."""

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = (p(x).view(n, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        scale = torch.linspace(0.5, 1.5, t * t, dtype=x.dtype).view(t, t)
        s = q @ k.transpose(-1, -2) * scale + torch.triu(torch.full((t, t), float("-inf"), dtype=x.dtype), 1)
        return self.head((torch.softmax(s, -1) @ v).transpose(1, 2).flatten(2)[:, -1])


class BroadcastMaskAttention(WrittenAttention):
    """One head's scores plus a mask with three heads: the sum broadcasts the scores to more elements."""

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = (p(x).unsqueeze(1) for p in (self.q, self.k, self.v))
        mask = torch.zeros(n, 3, t, t, dtype=x.dtype)
        mask[:, :, :, -1] = float("-inf")
        s = q @ k.transpose(-1, -2) * self.c + mask
        return self.head((torch.softmax(s, -1) @ v).mean(1)[:, -1])


@pytest.mark.parametrize("model_cls", [TensorScaledAttention, BroadcastMaskAttention])
def test_scores_chain_declines(model_cls, monkeypatch):
    """Chains the softmax's step cannot take (:func:`~dynamiclrp.ops.attention.scores_chain`): scores scaled by a
    constant *tensor* (the step scales each block by one number), a mask that broadcasts the scores to more
    elements (the step works on the product's): the product keeps its own ε-step, and the relevance is node by
    node's, in blocks of 16 rows."""
    from dynamiclrp.ops import attention

    monkeypatch.setattr(attention, "_BLOCK", 1)
    monkeypatch.setattr(attention, "_HEADS_BLOCK", 1)
    torch.manual_seed(0)
    model, x = model_cls().to(D).eval(), torch.randn(2, 40, 8, dtype=D)
    rules = {"sum": r.Epsilon(0.02), "product": r.Uniform(0.01), "linear": r.Epsilon(1e-30)}
    kw = dict(preset="epsilon", target=1, ledger=False, rules=rules)
    got = dynamiclrp.explain(model, x, gradient_form=True, **kw)
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert got.stats.gradient_form
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12


def test_mask_checks_of_the_pass_are_read_once(monkeypatch):
    """Softmax's mask check in the gradient form is read by the host with the pass's other flags, once for all the
    softmaxes (each read waits for a GPU); a mask that is not one still refuses, through node by node."""
    tolist, lists = torch.Tensor.tolist, [0]

    def spy(self, *a, **k):
        lists[0] += 1
        return tolist(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "tolist", spy)

    class ThreeLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(MaskedAttention() for _ in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = x + (layer.v(x) * layer.head(x).sum(-1, keepdim=True)) + torch.softmax(
                    layer.q(x) @ layer.k(x).transpose(-1, -2) + torch.triu(torch.full(
                        (x.shape[1], x.shape[1]), float("-inf"), dtype=x.dtype), 1), -1) @ layer.v(x)
            return x.mean(1)

    torch.manual_seed(0)
    model, x = ThreeLayers().to(D).eval(), torch.randn(2, 5, 6, dtype=D)
    kw = dict(preset="epsilon", target=1, ledger=False)
    got = dynamiclrp.explain(model, x, gradient_form=True, **kw)
    assert got.stats.gradient_form and lists[0] == 1  # three softmaxes' checks and the ratios' flags: one read
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-9


@pytest.mark.parametrize("fast_half", [True, False])
def test_ledger_and_dtype_keep_the_node_by_node_propagation(fast_half, monkeypatch):
    """The ledger, or a relevance dtype other than the model's, keeps the node-by-node propagation. On a device with
    fast half precision (a GPU; here the CPU made to count as one) a half-precision model is explained by the
    gradient form in its own dtype by default, as its backward is; asked for float32 relevance, or where the form
    cannot be used (the ledger, ``gradient_form=False``, the paper's proportional sums), node by node in float32.
    Elsewhere float32, node by node."""
    from dynamiclrp import api

    monkeypatch.setattr(api, "HALF_GRADIENT_FORM_DEVICES", ("cpu", "cuda") if fast_half else ("cuda",))
    model, x = mixer()
    assert not dynamiclrp.explain(model, x, preset="attnlrp").stats.gradient_form  # ledger=True by default
    with pytest.raises(DynamicLRPError, match="ledger"):
        dynamiclrp.explain(model, x, preset="attnlrp", gradient_form=True)
    half, xh = Mixer().to(torch.bfloat16).eval(), x.to(torch.bfloat16)
    att = dynamiclrp.explain(half, xh, preset="attnlrp", ledger=False)
    assert att.stats.gradient_form == fast_half
    assert att.inputs[0].dtype == (torch.bfloat16 if fast_half else torch.float32)
    # what no relevance reaches (CP-LRP holds the queries constant) is zeros of the same dtype
    att = dynamiclrp.explain(half, xh, preset="cp_lrp", ledger=False, params=["q.weight", "v.weight"])
    assert not att.params["q.weight"].any() and att.params["v.weight"].any()
    assert {t.dtype for t in (*att.inputs, *att.params.values())} == {att.inputs[0].dtype}
    for kw in ({"dtype": torch.float32}, {}, {"gradient_form": False}, {"preset": "paper"}):
        att = dynamiclrp.explain(half, xh, **{"preset": "attnlrp", "ledger": bool(not kw), **kw})
        assert not att.stats.gradient_form and att.inputs[0].dtype == torch.float32, kw
    with pytest.raises(DynamicLRPError, match="dtype"):
        dynamiclrp.explain(half, xh, preset="attnlrp", ledger=False, gradient_form=True, dtype=torch.float32)


def test_graph_serves_backward_afterwards_without_the_hooks():
    model, x = mixer()
    x = x.requires_grad_()
    y = model(x)
    first = dynamiclrp.propagate(y, target=0, wrt=[x], preset="attnlrp", ledger=False)
    again = dynamiclrp.propagate(y, target=0, wrt=[x], preset="attnlrp", ledger=False)
    assert first.stats.gradient_form and torch.equal(first.inputs[0], again.inputs[0])
    y[:, 0].sum().backward()
    x2 = x.detach().clone().requires_grad_()
    model.zero_grad()
    model(x2)[:, 0].sum().backward()
    assert torch.equal(x.grad, x2.grad)  # a hook left on a node would have changed the gradient


def test_freed_graph_is_named():
    model, x = mixer()
    x = x.requires_grad_()
    y = model(x)
    y.sum().backward()
    with pytest.raises(GraphFreedError, match="retain_graph=True"):
        dynamiclrp.propagate(y, target=0, wrt=[x], preset="attnlrp", ledger=False)


def test_non_finite_relevance_falls_back_to_the_node_by_node_answer():
    """An infinite input that the model saturates (sigmoid(inf) = 1): input × gradient is inf × 0 there, while the
    identity rule passes the finite relevance on. With the check the run falls back; without it, NaN shows."""
    lin = nn.Linear(3, 2).to(D)
    x = torch.tensor([[0.5, float("inf"), -1.0]], dtype=D, requires_grad=True)
    y = lin(torch.sigmoid(x))
    att = dynamiclrp.propagate(y, target=0, wrt=[x], preset="attnlrp", ledger=False)
    ref = dynamiclrp.propagate(y, target=0, wrt=[x], preset="attnlrp", ledger=False, gradient_form=False)
    assert not att.stats.gradient_form and torch.isfinite(att.inputs[0]).all()
    assert torch.equal(att.inputs[0], ref.inputs[0])
    raw = dynamiclrp.propagate(y, target=0, wrt=[x], preset="attnlrp", ledger=False, check_finite=False)
    assert raw.stats.gradient_form and torch.isnan(raw.inputs[0][0, 1])


class PackedAttention(nn.Module):
    """``nn.MultiheadAttention`` in a pre-norm residual block, as torchvision's ViT has it: one packed in-projection
    whose output is split into queries, keys and values, and fused attention."""

    def __init__(self, d: int = 8, gated: bool = False):
        super().__init__()
        self.inp, self.ln, self.head = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, 3)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.gated = gated

    def forward(self, x):
        h = self.inp(x)
        a = self.ln(h)
        if self.gated:  # the projection's input is a product of two activations of h
            a = a * torch.sigmoid(h)
        h = h + self.mha(a, a, a, need_weights=False)[0]
        return self.head(h.mean(1))


@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp"])
def test_fused_projection_bypass(preset, monkeypatch):
    """CP-LRP gives queries and keys no gradient: the packed in-projection's backward is bypassed by a product over
    the value columns only, carried through the layer norm to the residual stream by hand. The same answer as
    without the bypass and as node by node (ε → 0); under AttnLRP the queries have gradients and nothing is
    bypassed. The hooks are gone afterwards."""
    from dynamiclrp import gradient_form

    torch.manual_seed(0)
    model, x = PackedAttention().to(D).eval(), torch.randn(2, 5, 8, dtype=D, requires_grad=True)
    y = model(x)
    got = dynamiclrp.propagate(y, target=0, wrt=[x], preset=preset, ledger=False)
    ref = dynamiclrp.propagate(y, target=0, wrt=[x], preset=preset, ledger=False, gradient_form=False,
                               rules=LIMIT_PRESET[preset])
    monkeypatch.setattr(gradient_form, "BYPASSES", False)
    plain = dynamiclrp.propagate(y, target=0, wrt=[x], preset=preset, ledger=False)
    assert got.stats.bypassed == (2 if preset == "cp_lrp" else 0) and plain.stats.bypassed == 0
    assert rel_diff(got.inputs[0], plain.inputs[0]) < 1e-12
    assert rel_diff(got.inputs[0], ref.inputs[0]) < TOL
    y[:, 0].sum().backward()
    x2 = x.detach().clone().requires_grad_()
    model(x2)[:, 0].sum().backward()
    assert torch.equal(x.grad, x2.grad)


def tiny_vit() -> nn.Module:
    """torchvision's VisionTransformer, two layers of small widths, in float64, its head drawn at random."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5).to(D).eval()
    with torch.no_grad():  # torchvision initialises the head to zero
        model.heads.head.weight.normal_(0, 0.5)
    return model


def test_fused_projection_bypass_on_torchvision_vit(monkeypatch):
    """torchvision's VisionTransformer (two layers, small widths): under CP-LRP both packed in-projections are
    bypassed; the answer is the plain pass's and the node-by-node run's (ε → 0)."""
    from dynamiclrp import gradient_form

    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, dtype=D)
    got = dynamiclrp.explain(model, x, preset="cp_lrp", ledger=False)
    ref = dynamiclrp.explain(model, x, preset="cp_lrp", ledger=False, gradient_form=False,
                             rules=LIMIT_PRESET["cp_lrp"])
    monkeypatch.setattr(gradient_form, "BYPASSES", False)
    plain = dynamiclrp.explain(model, x, preset="cp_lrp", ledger=False)
    # two packed projections, two attentions, two GELUs; below the pick of the class token, the last layer's MLP
    # projections multiply its rows alone
    assert got.stats.bypassed_kinds == {"MmBackward0": 2, "ScaledDotProductFlashAttentionForCpuBackward0": 2,
                                        "GeluBackward0": 2, "AddmmBackward0": 2}
    assert got.stats.bypassed == 8 and plain.stats.bypassed == 0
    assert rel_diff(got.inputs[0], plain.inputs[0]) < 1e-12
    assert rel_diff(got.inputs[0], ref.inputs[0]) < TOL


@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp"])
def test_a_declined_projection_bypass_reads_nothing_again_under_a_plan(preset):
    """Under AttnLRP the queries of torchvision's ViT have gradients, so the packed in-projection's bypass declines
    after one host read per layer; a plan keeps the bypasses, and its later runs decline without reading. Under
    CP-LRP the bypass narrows the product in every run. The answers stay the same."""
    from host_reads import HostReads

    model, plan = tiny_vit(), dynamiclrp.Plan()
    x = torch.randn(2, 3, 32, 32, dtype=D)
    reads, outs, bypassed = [], [], []
    for _ in range(3):
        with HostReads() as counter:
            att = dynamiclrp.explain(model, x, preset=preset, ledger=False, plan=plan)
        reads.append(counter.n)
        outs.append(att.inputs[0])
        bypassed.append(att.stats.bypassed_kinds.get("MmBackward0", 0))
    assert reads[1] == reads[2] and reads[0] - reads[1] == (2 if preset == "attnlrp" else 0)
    assert bypassed == ([0, 0, 0] if preset == "attnlrp" else [2, 2, 2])
    assert torch.equal(outs[0], outs[2])


def test_bypass_steps_aside_where_it_cannot_hand_its_gradient_on(monkeypatch):
    """A recorded activation inside the carried stretch (here the layer norm's output) keeps the node's own
    backward; a carried gradient that finds nothing to join makes the pass run again without bypasses."""
    from dynamiclrp import gradient_bypass

    torch.manual_seed(0)
    model, x = PackedAttention().to(D).eval(), torch.randn(2, 5, 8, dtype=D)
    plain = dynamiclrp.explain(model, x, preset="cp_lrp", ledger=False, modules=["ln"])
    assert plain.stats.gradient_form and plain.stats.bypassed == 0
    free = dynamiclrp.explain(model, x, preset="cp_lrp", ledger=False)
    assert free.stats.bypassed == 2 and rel_diff(free.inputs[0], plain.inputs[0]) < 1e-12

    def refuse(self, nid):
        def hook(grad_outputs):
            if any(k[0] == nid for k in self.pending):
                raise gradient_bypass.UndeliveredError("test")
            return grad_outputs
        return hook

    monkeypatch.setattr(gradient_bypass.Bypasses, "_deliver_hook", refuse)
    again = dynamiclrp.explain(model, x, preset="cp_lrp", ledger=False)
    assert again.stats.gradient_form and again.stats.bypassed == 0
    assert torch.equal(again.inputs[0], plain.inputs[0])


def test_bypass_does_not_carry_through_a_fork(monkeypatch):
    """Below the projection a product of two activations of one tensor: under AttnLRP (half the gradient to each
    factor) its branches meet again at that tensor, which would then get gradient only from the carried branches.
    No bypass of the projection or the attention (the gate's sigmoid, identity rule, is bypassed: it hands its
    gradient straight to the residual stream). CP-LRP holds the first factor constant: the product's step gives the
    layer norm's branch nothing, there is no fork, and the projection, the attention, the product (its other
    operand's gradient alone) and the sigmoid are bypassed. Either way the answer is the plain pass's."""
    from dynamiclrp import gradient_form

    torch.manual_seed(0)
    model, x = PackedAttention(gated=True).to(D).eval(), torch.randn(2, 5, 8, dtype=D)
    for preset in ("attnlrp", "cp_lrp"):
        got = dynamiclrp.explain(model, x, preset=preset, ledger=False)
        monkeypatch.setattr(gradient_form, "BYPASSES", False)
        plain = dynamiclrp.explain(model, x, preset=preset, ledger=False)
        monkeypatch.setattr(gradient_form, "BYPASSES", True)
        expected = {"SigmoidBackward0": 1} if preset == "attnlrp" else {
            "MmBackward0": 1, "ScaledDotProductFlashAttentionForCpuBackward0": 1, "MulBackward0": 1,
            "SigmoidBackward0": 1}
        assert got.stats.gradient_form and got.stats.bypassed_kinds == expected
        assert rel_diff(got.inputs[0], plain.inputs[0]) < 1e-12


class ActivationBlock(nn.Module):
    """A residual MLP block, ``h + W_2 f(W_1 h)``, on a projection of the input: the activation's input is a
    projection of ``h``, which the residual stream also takes."""

    def __init__(self, act: nn.Module, d: int = 6):
        super().__init__()
        self.inp, self.up, self.down, self.head, self.act = (nn.Linear(d, d), nn.Linear(d, 2 * d),
                                                             nn.Linear(2 * d, d), nn.Linear(d, 3), act)

    def forward(self, x):
        h = self.inp(x)
        return self.head(h + self.down(self.act(self.up(h))))


@pytest.mark.parametrize("act,kind", [(nn.GELU(), "GeluBackward0"), (nn.GELU("tanh"), "GeluBackward0"),
                                      (nn.SiLU(), "SiluBackward0"), (nn.Tanh(), "TanhBackward0")])
@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp"])
def test_identity_rule_bypass(act, kind, preset, monkeypatch):
    r"""The identity rule's step :math:`g_x = g_y\,f(x)/x` replaces what the activation's own backward computed; the
    bypass computes it instead of that backward and carries it through the up-projection by hand to the residual
    stream. Explicit formula: with the up-projection's output :math:`u`, the residual stream's gradient gains
    :math:`W_1^\top (g_y f(u)/u)`. Equal to the pass without bypasses, to node by node (ε → 0), and to the
    formula; ``tanh`` saves only its output, so its input is recovered first."""
    from dynamiclrp import gradient_form

    torch.manual_seed(0)
    model, x = ActivationBlock(act).to(D).eval(), torch.randn(4, 6, dtype=D)
    got = dynamiclrp.explain(model, x, preset=preset, target=[0, 2, 1, 0], ledger=False)
    ref = dynamiclrp.explain(model, x, preset=preset, target=[0, 2, 1, 0], ledger=False, gradient_form=False,
                             rules=LIMIT_PRESET[preset])
    monkeypatch.setattr(gradient_form, "BYPASSES", False)
    plain = dynamiclrp.explain(model, x, preset=preset, target=[0, 2, 1, 0], ledger=False)
    assert got.stats.bypassed_kinds == {kind: 1} and plain.stats.bypassed == 0
    assert rel_diff(got.inputs[0], plain.inputs[0]) < 1e-12
    assert rel_diff(got.inputs[0], ref.inputs[0]) < TOL
    # the formula, in float64 by hand: every layer here is linear (the gradient), the activation the identity rule
    with torch.no_grad():
        h = model.inp(x)
        u = model.up(h)
        y = model.head(h + model.down(act(u)))
        seed = torch.zeros_like(y)
        seed[torch.arange(4), torch.tensor([0, 2, 1, 0])] = 1.0  # relevance y_t at the target: ratio 1 there
        g_h = seed @ model.head.weight
        g_h = g_h + ((g_h @ model.down.weight) * act(u) / u) @ model.up.weight
        expected = x * (g_h @ model.inp.weight)
    assert rel_diff(got.inputs[0], expected) < 1e-12


class _Counting(TorchDispatchMode):
    """Counts the calls of each aten op (its overload packet's name) while active, and keeps the operand shapes of
    every matrix product (``shapes``: the last two operands of each ``mm`` and ``addmm``)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}
        self.shapes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in ("mm", "addmm"):
            self.shapes.append(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))[-2:])
        return func(*args, **(kwargs or {}))


class PickedBlock(nn.Module):
    """A residual MLP block, ``h + W_2 f(W_1 \\mathrm{LN}(h))``, of which the head reads some tokens' rows alone
    (``pick``: the class token, a slice of tokens)."""

    def __init__(self, pick, d: int = 6):
        super().__init__()
        self.inp, self.ln, self.up, self.down, self.head = (nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, 2 * d),
                                                            nn.Linear(2 * d, d), nn.Linear(d, 3))
        self.pick = pick

    def forward(self, x):
        h = self.inp(x)
        h = h + self.down(F.gelu(self.up(self.ln(h))))
        picked = h[:, self.pick]
        return self.head(picked if picked.dim() == 2 else picked.mean(1))


@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp"])
def test_projection_bypass_multiplies_the_picked_rows_alone(preset, monkeypatch):
    r"""Below a pick of the class token (``h[:, 0]``), the gradients of the block's projections are zero but in that
    token's rows: the bypass computes :math:`g_x[r] = g[r] W` for those rows alone (a product of 2 rows for a batch
    of 2, not of 2 x 7) and carries it on by hand. Equal to the pass without bypasses and to node by node."""
    from dynamiclrp import gradient_form

    torch.manual_seed(0)
    model, x = PickedBlock(0).to(D).eval(), torch.randn(2, 7, 6, dtype=D)
    got = dynamiclrp.explain(model, x, preset=preset, ledger=False)
    xg = x.clone().requires_grad_()
    y = model(xg)
    with _Counting() as products:  # the relevance pass's products alone
        dynamiclrp.propagate(y, wrt=[xg], preset=preset, ledger=False)
    ref = dynamiclrp.explain(model, x, preset=preset, ledger=False, gradient_form=False, rules=LIMIT_PRESET[preset])
    monkeypatch.setattr(gradient_form, "BYPASSES", False)
    plain = dynamiclrp.explain(model, x, preset=preset, ledger=False)
    assert got.stats.bypassed_kinds == {"AddmmBackward0": 2, "GeluBackward0": 1}
    # the input gradients of down (g: 14 x 6, W: 6 x 12) and up (g: 14 x 12, W: 12 x 6): two rows each
    assert ((2, 6), (6, 12)) in products.shapes and ((2, 12), (12, 6)) in products.shapes
    assert ((14, 6), (6, 12)) not in products.shapes and ((14, 12), (12, 6)) not in products.shapes
    assert float(plain.inputs[0].abs().max()) > 0
    assert rel_diff(got.inputs[0], plain.inputs[0]) < 1e-12
    assert rel_diff(got.inputs[0], ref.inputs[0]) < TOL


class _LMHead(nn.Module):
    """A block, then a head over every token (``bias``: with one), read at the token ``pick`` (an LM head's logits
    at one position, as T5's are read); ``pick`` None reads the tokens' mean instead (every row read)."""

    def __init__(self, pick, bias: bool, d: int = 6, vocab: int = 9):
        super().__init__()
        self.up, self.head, self.pick = nn.Linear(d, d), nn.Linear(d, vocab, bias=bias), pick

    def forward(self, x):
        h = x + torch.tanh(self.up(x))
        logits = self.head(h)
        return logits[:, self.pick] if self.pick is not None else logits.mean(1)


@pytest.mark.parametrize("preset", ["epsilon", "attnlrp"])
@pytest.mark.parametrize("bias", [False, True])
def test_the_pass_starts_below_a_pick_of_a_final_projection(preset, bias, monkeypatch):
    r"""Explained at one token of a head applied to every token, the pass starts at the head's input: the pick
    taken back by hand, the head's step (the ε-rule's factor) and its product worked out at the picked rows alone
    (a product of 2 rows for a batch of 2, none of 14), the rest as before. Equal to the pass started at the output
    and to node by node, in float64, again with a plan. Reading every token (their mean), no row is spared: the
    start stays at the output, and the head multiplies every row."""
    from dynamiclrp import gradient_bypass, gradient_form

    torch.manual_seed(0)
    x = torch.randn(2, 7, 6, dtype=D)
    for pick in (3, None):
        model = _LMHead(pick, bias).to(D).eval()
        xg = x.clone().requires_grad_()
        y = model(xg)
        with _Counting() as products:
            got = dynamiclrp.propagate(y, wrt=[xg], preset=preset, ledger=False)
        assert got.stats.gradient_form
        assert got.stats.bypassed_kinds.get("AddmmBackward0" if bias else "MmBackward0", 0) == (pick is not None)
        plan = dynamiclrp.Plan()
        planned = [dynamiclrp.explain(model, x, preset=preset, ledger=False, plan=plan).inputs[0] for _ in range(2)]
        ref = dynamiclrp.explain(model, x, preset=preset, ledger=False, gradient_form=False,
                                 rules=LIMIT_PRESET.get(preset))
        with monkeypatch.context() as m:
            m.setattr(gradient_form, "seed_below_pick", lambda run, steps, outputs, grads, bypasses: (outputs, grads))
            whole = dynamiclrp.explain(model, x, preset=preset, ledger=False).inputs[0]
        assert float(whole.abs().max()) > 0
        for rel in (got.inputs[0], *planned):
            assert rel_diff(rel, whole) < 1e-12
            assert rel_diff(rel, ref.inputs[0]) < TOL
        # the head's input gradient: 2 rows (one token of each of 2 sequences), or all 14 where every token is read
        assert (((2, 9), (9, 6)) in products.shapes) == (pick is not None)
        assert (((14, 9), (9, 6)) in products.shapes) == (pick is None)
    assert gradient_bypass.seed_below_pick is gradient_form.seed_below_pick


def test_a_declined_projection_bypass_hands_its_gradient_on_by_hand(monkeypatch):
    """Tokens 0 and 6 of 7 picked (``h[:, ::6]``): the first and the last row of the projections' gradients hold
    non-zeros, so their bypasses decline and the nodes run their own backward. The activation's bypass (identity
    rule) carries its gradient by hand through the up-projection: there the declining bypass leaves the node to run
    by hand, and its gradient goes on below it (a route that stopped at the bypassed node would lose it, and the
    pass would run again without any bypass). Equal to the pass without bypasses."""
    from dynamiclrp import gradient_form

    torch.manual_seed(0)
    model, x = PickedBlock(slice(None, None, 6)).to(D).eval(), torch.randn(2, 7, 6, dtype=D)
    got = dynamiclrp.explain(model, x, preset="attnlrp", ledger=False)
    monkeypatch.setattr(gradient_form, "BYPASSES", False)
    plain = dynamiclrp.explain(model, x, preset="attnlrp", ledger=False)
    assert got.stats.bypassed_kinds == {"GeluBackward0": 1} and plain.stats.bypassed == 0
    assert rel_diff(got.inputs[0], plain.inputs[0]) < 1e-12


class _ActivationSummed(nn.Module):
    """``head(h + f(W h))``: the activation's output feeds a sum, which saves nothing."""

    def __init__(self, act: nn.Module, d: int = 6):
        super().__init__()
        self.inp, self.up, self.head, self.act = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 3), act

    def forward(self, x):
        h = self.inp(x)
        return self.head(h + self.act(self.up(h)))


@pytest.mark.parametrize("act,closed_form", [(nn.GELU(), "gelu"), (nn.GELU("tanh"), "gelu"),
                                             (nn.SiLU(), "sigmoid")])
@pytest.mark.parametrize("saved_by_consumer", [True, False])
def test_identity_rule_reads_the_output_a_consumer_saved(act, closed_form, saved_by_consumer):
    r"""The identity rule's :math:`f(x) / x` is the activation's output over its input where a consumer saved the
    output (the next linear layer's input): no GELU or sigmoid is computed beyond the forward's GELU. Where none
    saved it (a sum), the closed form (:math:`\Phi(x)`, the sigmoid) is computed once. Both equal the formula in
    float64, with an exact zero input (limit 1/2)."""
    torch.manual_seed(0)
    model = (ActivationBlock(act) if saved_by_consumer else _ActivationSummed(act)).to(D).eval()
    x = torch.randn(4, 6, dtype=D).mul_(4).round_()
    with torch.no_grad():  # whole numbers, so that one pre-activation is exactly 0: the limit f'(0) = 1/2 there
        for p in (*model.inp.parameters(), model.up.weight):
            p.mul_(4).round_()
        model.up.bias[0] = -(model.up.weight[0] @ model.inp(x)[1])
    with _Counting() as counted:
        got = dynamiclrp.explain(model, x, preset="attnlrp", target=[0, 2, 1, 0], ledger=False)
    assert got.stats.gradient_form
    forward_calls = 1 if closed_form == "gelu" else 0  # the forward's own GELU (SiLU is its own kernel)
    assert counted.calls.get(closed_form, 0) == forward_calls + (0 if saved_by_consumer else 1)
    with torch.no_grad():
        h = model.inp(x)
        u = model.up(h)
        assert u[1, 0] == 0 and (u != 0).sum() == u.numel() - 1
        y = model(x)
        seed = torch.zeros_like(y)
        seed[torch.arange(4), torch.tensor([0, 2, 1, 0])] = 1.0
        g_h = seed @ model.head.weight
        q = torch.where(u == 0, 0.5, act(u) / u)
        inner = g_h @ model.down.weight if saved_by_consumer else g_h
        g_h = g_h + (inner * q) @ model.up.weight
        expected = x * (g_h @ model.inp.weight)
    assert rel_diff(got.inputs[0], expected) < 1e-12


SDPA_CASES = {  # (query heads, key/value heads, queries, keys, mask, is_causal, scale)
    "plain": (4, 4, 40, 45, None, False, None),
    "grouped-query, causal": (4, 2, 40, 40, None, True, None),
    "causal, fewer queries than keys": (2, 2, 40, 45, None, True, 0.3),
    "causal, more queries than keys": (2, 2, 45, 40, None, True, None),
    "boolean padding mask": (2, 2, 40, 45, "bool", False, None),
    "additive mask": (2, 2, 40, 40, "float", False, None),
    # transformers' causal masks, given: a block of query rows reads keys up to the last one its rows see
    "causal mask given, 0 and -inf": (2, 2, 40, 45, "causal float", False, None),
    "causal mask given, boolean": (4, 2, 45, 40, "causal bool", False, None),
}


def _sdpa_case(case, g):
    """Queries, keys, values (float64, requiring grad), the mask and the keyword arguments of an SDPA_CASES case."""
    hq, hkv, L, S, mask, causal, scale = SDPA_CASES[case]
    q = torch.randn(2, hq, L, 8, dtype=D, generator=g).requires_grad_()
    k, v = (torch.randn(2, hkv, S, 8, dtype=D, generator=g).requires_grad_() for _ in range(2))
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, 1, S, generator=g) > 0.3
        m[..., 0] = True  # every query attends to something
    elif mask == "float":
        m = torch.randn(L, S, dtype=D, generator=g)
    elif mask is not None:  # "causal float", "causal bool"
        m = torch.ones(L, S, dtype=torch.bool).tril()
        m = m if mask.endswith("bool") else torch.zeros(L, S, dtype=D).masked_fill(~m, -math.inf)
    return q, k, v, m, dict(attn_mask=m, is_causal=causal, scale=scale, enable_gqa=hq != hkv)


def _additive_mask(m, causal: bool, L: int, S: int) -> torch.Tensor:
    """The mask an SDPA_CASES case adds to the logits, written out (-inf where a query does not attend)."""
    add = torch.zeros(L, S, dtype=D)
    if m is not None:
        add = add + (torch.zeros(m.shape, dtype=D).masked_fill(~m, -math.inf) if m.dtype == torch.bool else m)
    if causal:
        add = add.masked_fill(torch.ones(L, S, dtype=torch.bool).tril().logical_not(), -math.inf)
    return add


@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_values_gradient_of_fused_attention(case, monkeypatch):
    r"""The value gradient CP-LRP keeps from a fused attention node, computed alone a head and a block of 16 query
    rows at a time: the explicit formula :math:`g_V = P^\top g_O`, :math:`P = \mathrm{softmax}(\mathrm{scale}\,QK^\top
    + M)` (grouped heads summed onto their value head), and the node's own backward."""
    from dynamiclrp.ops import attention

    hq, hkv, L, S, mask, causal, scale = SDPA_CASES[case]
    g = torch.Generator().manual_seed(0)
    q, k, v, m, kw = _sdpa_case(case, g)
    o = F.scaled_dot_product_attention(q, k, v, **kw)
    assert type(o.grad_fn).__name__ in attention.SDPA_KINDS
    go = torch.randn(o.shape, dtype=D, generator=g)
    monkeypatch.setattr(attention, "_BLOCK", 1)  # blocks of 16 rows: three here, the last one short
    monkeypatch.setattr(attention, "_HEADS_BLOCK", 1)  # one head at a time
    got = attention._values_gradient(None, o.grad_fn, (go,), 0.5)[2]

    logits = (scale or 1 / math.sqrt(8)) * q.detach() @ k.detach().repeat_interleave(hq // hkv, 1).mT
    logits = logits + _additive_mask(m, causal, L, S)
    formula = (torch.softmax(logits, -1).mT @ go).unflatten(1, (hkv, hq // hkv)).sum(2)
    assert rel_diff(got, 0.5 * formula) < 1e-12
    (own,) = torch.autograd.grad(o, v, go)
    assert rel_diff(got, 0.5 * own) < 1e-12


def test_values_gradient_declines_where_the_log_sum_exp_has_a_gradient():
    from dynamiclrp.ops import attention

    q, k, v = (torch.randn(1, 2, 5, 4, dtype=D, requires_grad=True) for _ in range(3))
    o = F.scaled_dot_product_attention(q, k, v)
    assert attention._values_gradient(None, o.grad_fn, (torch.ones_like(o), torch.ones(1, 2, 5, dtype=D)), 1.0) is None
    assert attention._values_gradient(None, o.grad_fn, (None,), 1.0) is None


@pytest.mark.parametrize("cpu", [True, False], ids=["cpu", "as on a gpu"])
@pytest.mark.parametrize("same_eps", [False, True])
@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_stabilised_gradient_of_fused_attention(case, blocked, same_eps, cpu, monkeypatch):
    r"""The ε-rule's gradient form on a fused attention node (the ``epsilon`` preset: the uniform rule's halves
    with ε on both products, softmax passing relevance unchanged, the mask's sum stabilised), against the formula
    in float64 written out: :math:`f = \tfrac12 g\,|O| / (|O| + \varepsilon)`, :math:`g_V = P^\top f`,
    :math:`R_S = S \odot (P \odot f V^\top) / \mathrm{stab}(L)` on attended positions,
    :math:`u = \tfrac12 c\,R_S / \mathrm{stab}(S)`, :math:`g_Q = u K`, :math:`g_K = u^\top Q` (grouped heads
    summed onto their key and value head); ``blocked``: a head at a time; ``same_eps``: the mask's ε that of the
    scores (a mask of 0 and -inf alone then shares one denominator between the two steps); ``cpu``: the CPU's way
    (the given mask read by the host for the keys each block sees; all three gradients without the node's backward)
    or a GPU's (no read, every key, large blocks; the node's backward for the values)."""
    from dynamiclrp.ops import attention

    if not cpu:
        monkeypatch.setattr(attention, "CPU_DEVICES", ())

    if blocked:
        monkeypatch.setattr(attention, "_BLOCK", 1)  # blocks of 16 rows: three here, the last one short
        monkeypatch.setattr(attention, "_HEADS_BLOCK", 1)  # one head at a time
    hq, hkv, L, S, mask, causal, scale = SDPA_CASES[case]
    g = torch.Generator().manual_seed(0)
    q, k, v, m, kw = _sdpa_case(case, g)
    o = F.scaled_dot_product_attention(q, k, v, **kw)
    go = torch.randn(o.shape, dtype=D, generator=g)
    eps_v, eps_m, eps_s = 0.3, 0.1 if same_eps else 0.2, 0.1
    step = attention._stabilised_attention_step(
        SimpleNamespace(node=SimpleNamespace(fn=o.grad_fn), run=SimpleNamespace(derived={})),
        r.Stabilised(eps_v, 0.5), r.Stabilised(eps_s, 0.5), r.Stabilised(eps_m))
    handed = step.hook((go,))  # the node is handed f and runs its own backward on it; the step then replaces
    own = torch.autograd.grad(o, (q, k, v), handed[0], retain_graph=True)  # the query and key gradients
    replaced = step.post(own, handed)[:3]
    direct = step.direct((go,))  # or all three without the node's backward (g_V in the blocks too)

    def stab(z, eps):
        return z + eps * torch.where(z >= 0, 1.0, -1.0).to(D)

    rep = hq // hkv
    qd, kd, vd = q.detach(), k.detach().repeat_interleave(rep, 1), v.detach().repeat_interleave(rep, 1)
    c = scale or 1 / math.sqrt(8)
    s_ = c * qd @ kd.mT
    add = _additive_mask(m, causal, L, S)
    p = torch.softmax(s_ + add, -1)
    out = o.detach()
    f = 0.5 * go * out.abs() / (out.abs() + eps_v)
    r_l = p * (f @ vd.mT)
    attended = torch.isfinite(add).expand_as(s_)
    if m is not None or causal:
        finite = torch.where(attended, add, torch.zeros((), dtype=D))
        r_s = torch.where(attended, s_ * r_l / stab(s_ + finite, eps_m), torch.zeros((), dtype=D))
    else:
        r_s = r_l
    u = 0.5 * c * r_s / stab(s_, eps_s)

    def groups(t):  # the query heads sharing a key and value head, summed
        return t.unflatten(1, (hkv, rep)).sum(2)

    assert (direct is None) == (not cpu)
    for gq, gk, gv in (replaced, direct[:3]) if cpu else (replaced,):
        assert rel_diff(gv, groups(p.mT @ f)) < 1e-12
        assert rel_diff(gq, u @ kd) < 1e-12
        assert rel_diff(gk, groups(u.mT @ qd)) < 1e-12
    assert not cpu or len(direct) == len(o.grad_fn.next_functions) and all(t is None for t in direct[3:])


def test_given_mask_worked_out_once_per_run(monkeypatch):
    """A fused attention node's given mask, worked out for the blocks of scores: each query row's extent (one past
    the last key any batch element sees), whether a row attends to nothing (then the attended positions are
    marked), whether the mask has a non-zero finite part; kept for an equal mask of another node (transformers
    makes each layer's anew), made again for a different one. Off the CPU nothing is read by the host."""
    from dynamiclrp.ops import attention

    def node(mask):
        q = torch.randn(2, 2, 5, 4, dtype=D, requires_grad=True)
        k = torch.randn(2, 2, 6, 4, dtype=D, requires_grad=True)
        return F.scaled_dot_product_attention(q, k, k, attn_mask=mask).grad_fn

    causal = torch.zeros(5, 6, dtype=D).masked_fill(~torch.ones(5, 6, dtype=torch.bool).tril(), -math.inf)
    run = SimpleNamespace(derived={})
    first = attention._run_mask(run, node(causal), torch.zeros(1, dtype=D), D)
    assert first.extent == [1, 2, 3, 4, 5] and first.attended is None and first.finite is None
    assert attention._run_mask(run, node(causal.clone()), torch.zeros(1, dtype=D), D) is first
    padded = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    padded[0, 0, 1] = False  # batch element 0: row 1 attends to nothing
    padded[:, :, :, 4:] = False
    padded[1, 0, 3, 4] = True  # batch element 1, row 3: up to key 4
    other = attention._run_mask(run, node(padded), torch.zeros(1, dtype=D), D)
    assert other.extent == [4, 4, 4, 5, 4] and other.finite is None
    assert torch.equal(other.attended, padded.to(D))
    bias = causal + torch.randn(5, 6, dtype=D)
    got = attention._run_mask(run, node(bias), torch.zeros(1, dtype=D), D)
    assert got is not first and got.extent == first.extent
    assert torch.equal(got.finite, torch.where(causal == 0, bias, 0.0))
    # where the host does not read (a GPU): no extents, the attended positions and the finite part always, an
    # entry kept for the same tensor only
    monkeypatch.setattr(attention, "CPU_DEVICES", ())
    unread, mask = SimpleNamespace(derived={}), causal.clone()
    blind = attention._run_mask(unread, node(mask), torch.zeros(1, dtype=D), D)
    assert blind.extent is None and torch.equal(blind.attended, (causal == 0).to(D))
    assert torch.equal(blind.finite, torch.zeros(5, 6, dtype=D))
    assert attention._run_mask(unread, node(mask), torch.zeros(1, dtype=D), D) is blind
    assert attention._run_mask(unread, node(causal.clone()), torch.zeros(1, dtype=D), D) is not blind


@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_epsilon_preset_on_fused_attention(case):
    """The ``epsilon`` preset on a model whose attention is fused runs as one gradient pass and agrees with the
    node-by-node run, which splits the node into its parts."""
    g = torch.Generator().manual_seed(1)
    hq, hkv, L, S, mask, causal, scale = SDPA_CASES[case]
    proj = nn.ModuleList(nn.Linear(6, 8 * h) for h in (hq, hkv, hkv)).double()
    head = nn.Linear(8 * hq, 3).double()
    x = torch.randn(2, L, 6, dtype=D, generator=g)
    xs = torch.randn(2, S, 6, dtype=D, generator=g)
    _, _, _, m, kw = _sdpa_case(case, g)

    def model(x, xs):
        q, k, v = (p(t).unflatten(-1, (-1, 8)).transpose(1, 2) for p, t in zip(proj, (x, xs, xs)))
        o = F.scaled_dot_product_attention(q, k, v, **kw)
        return head(o.transpose(1, 2).flatten(2)).sum(1)

    explain = dict(target=[0, 2], wrt=[x, xs], preset="epsilon", ledger=False)
    got = dynamiclrp.propagate(model(x.requires_grad_(), xs.requires_grad_()), **explain)
    ref = dynamiclrp.propagate(model(x, xs), gradient_form=False, **explain)
    assert got.stats.gradient_form and not ref.stats.gradient_form
    for a, b in zip(got.inputs, ref.inputs):
        assert rel_diff(a, b) < 1e-12 and b.abs().sum() > 0


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_epsilon_preset_on_transformers_with_fused_attention(name):
    """BERT and GPT-2 with SDPA attention and a padding mask (GPT-2's under its causal mask) under the ``epsilon``
    preset: one gradient pass, the node-by-node answer."""
    model, out = tiny(name, "sdpa")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs["attention_mask"][1, :3] = 0
    ref = dynamiclrp.explain(model, inputs, preset="epsilon", output=out, ledger=False, gradient_form=False)
    got = dynamiclrp.explain(model, inputs, preset="epsilon", output=out, ledger=False)
    assert got.stats.gradient_form
    for k in ref.embeddings:
        assert rel_diff(got.embeddings[k], ref.embeddings[k]) < 1e-12, k


@pytest.mark.parametrize("kept", [0, 1])
def test_one_operand_gradient_of_a_product(kept):
    """The gradient a product of activations gives its one operand that is not held constant, computed alone:
    :math:`f\\,g\\,b^\\top` for ``a``, :math:`f\\,a^\\top g` for ``b`` -- and the node's own backward, scaled."""
    from dynamiclrp.ops.linear import MATMUL_OPS, _one_operand_gradient

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 5, dtype=D, generator=g).requires_grad_()
    b = torch.randn(3, 5, 6, dtype=D, generator=g).requires_grad_()
    out = torch.bmm(a, b)
    go = torch.randn(out.shape, dtype=D, generator=g)
    got = _one_operand_gradient(_at(out.grad_fn), MATMUL_OPS["BmmBackward0"], kept, 0.5)((go,))
    assert list(got) == [kept]
    formula = go @ b.detach().mT if kept == 0 else a.detach().mT @ go
    own = torch.autograd.grad(out, (a, b)[kept], go)[0]
    assert rel_diff(got[kept], 0.5 * formula) < 1e-15 and rel_diff(got[kept], 0.5 * own) < 1e-15


class SeparateAttention(nn.Module):
    """Fused attention fed by three projections of one layer-normed stream, grouped-query and causal, in a residual
    block (as transformers' SDPA attention has it)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.inp, self.ln, self.head = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, 3)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d // 2), nn.Linear(d, d // 2)

    def forward(self, x):
        x = self.inp(x)
        a = self.ln(x)
        n, t, _ = a.shape
        q, k, v = (p(a).view(n, t, -1, 2).transpose(1, 2) for p in (self.q, self.k, self.v))
        h = x + F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).flatten(2)
        return self.head(h.mean(1))


@pytest.mark.parametrize("model_cls", [PackedAttention, SeparateAttention])
def test_fused_attention_bypass(model_cls, monkeypatch):
    """Under CP-LRP the fused attention's backward is bypassed by its value gradient alone, carried by hand down
    the value path: through the packed projection's split (its query and key parts get nothing) to the projection's
    own bypass, or through the value projection to the layer norm's output, where the query and key projections
    give nothing but the residual stream does. Equal to the pass without bypasses and to node by node."""
    from dynamiclrp import gradient_form

    torch.manual_seed(0)
    model, x = model_cls().to(D).eval(), torch.randn(2, 5, 8, dtype=D)
    got = dynamiclrp.explain(model, x, preset="cp_lrp", ledger=False)
    ref = dynamiclrp.explain(model, x, preset="cp_lrp", ledger=False, gradient_form=False,
                             rules=LIMIT_PRESET["cp_lrp"])
    monkeypatch.setattr(gradient_form, "BYPASSES", False)
    plain = dynamiclrp.explain(model, x, preset="cp_lrp", ledger=False)
    assert got.stats.bypassed == (2 if model_cls is PackedAttention else 1) and plain.stats.bypassed == 0
    assert rel_diff(got.inputs[0], plain.inputs[0]) < 1e-12
    assert rel_diff(got.inputs[0], ref.inputs[0]) < TOL


def _without_norm():
    model = SeparateAttention()
    model.ln = nn.Identity()  # the projections read the residual stream itself
    return model


def _on_the_input():
    model = _without_norm()
    model.inp = nn.Identity()  # the projections and the residual read the input: the frontier is a recorded leaf
    return model


@pytest.mark.parametrize("model_cls", [PackedAttention, SeparateAttention, _without_norm, _on_the_input])
def test_fused_attention_bypass_under_epsilon(model_cls, monkeypatch):
    """Under the ``epsilon`` preset (stabilisers that matter: scores, mask and values ε 0.05) the fused attention's
    step computes the query, key and value gradients itself and its node's backward is skipped: a nested pass
    carries them down through the projections (and the layer norm, whose own bypass carries them on) to the
    residual stream, where the outer pass adds them (:func:`~dynamiclrp.gradient_bypass._nested`). Equal to the
    pass without bypasses and to node by node; also with the residual stream recorded (``modules``), where the
    frontier is the recorded slot: what the nested pass delivers there is added to what the outer pass reads, and
    where the frontier is the input itself (a recorded leaf: no node runs there to take a delivery)."""
    from dynamiclrp import gradient_form

    torch.manual_seed(0)
    model, x = model_cls().to(D).eval(), torch.randn(2, 5, 8, dtype=D)
    kw = dict(preset="epsilon", ledger=False, rules={"sum": r.Epsilon(0.05), "product": r.Uniform(0.05),
                                                       "attention": r.Uniform(0.05)})
    kind = next(k for k in dynamiclrp.explain(model, x, **kw).stats.ops if k.startswith("ScaledDotProduct"))
    got = dynamiclrp.explain(model, x, **kw)
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    modules = [] if isinstance(model.inp, nn.Identity) else ["inp"]
    recorded = dynamiclrp.explain(model, x, modules=modules, **kw)
    recorded_ref = dynamiclrp.explain(model, x, modules=modules, gradient_form=False, **kw)
    monkeypatch.setattr(gradient_form, "BYPASSES", False)
    plain = dynamiclrp.explain(model, x, **kw)
    assert got.stats.bypassed_kinds.get(kind) == 1 and recorded.stats.bypassed_kinds.get(kind) == 1
    assert got.stats.gradient_form and recorded.stats.gradient_form and plain.stats.bypassed == 0
    assert rel_diff(got.inputs[0], plain.inputs[0]) < 1e-12
    assert rel_diff(got.inputs[0], ref.inputs[0]) < 1e-12
    assert rel_diff(recorded.inputs[0], ref.inputs[0]) < 1e-12
    for m in modules:
        assert rel_diff(recorded.modules[m], recorded_ref.modules[m]) < 1e-12


def test_hooks_reuse_only_a_fresh_unshared_gradient_buffer():
    """A hook may overwrite the gradient it replaces (the node's own backward just made it) only when nothing it
    reads shares that memory, and the buffer is dense and of the result's shape and dtype."""
    from dynamiclrp.ops.base import spare

    g, fresh = torch.randn(4, 5), torch.empty(4, 5)
    shape = torch.Size((4, 5))
    assert spare(fresh, shape, torch.float32, g) is fresh
    assert spare(None, shape, torch.float32, g) is None
    assert spare(g, shape, torch.float32, g) is None  # the incoming gradient itself
    assert spare(fresh, shape, torch.float32, g, fresh.view(20)) is None  # shares memory with an operand
    assert spare(torch.empty(8, 5)[:4], shape, torch.float32, g) is None  # a view
    assert spare(torch.empty_strided((4, 5), (1, 4)), shape, torch.float32, g) is None  # not dense
    assert spare(fresh, shape, torch.float64, g) is None
    assert spare(fresh, torch.Size((5, 4)), torch.float32, g) is None


def test_the_hooks_broadcast_shapes_as_torch_does():
    """The hooks' shortcut for ``torch.broadcast_shapes`` (equal shapes returned as they are) answers as torch does,
    mismatches included."""
    from dynamiclrp.ops.base import broadcast_shape

    for shapes in [((2, 3),), ((2, 3), (2, 3), (2, 3)), ((8,), (1,)), ((4, 1, 3), (5, 1), (3,)), ((), (2, 2))]:
        got = broadcast_shape(*(torch.Size(s) for s in shapes))
        assert isinstance(got, torch.Size) and got == torch.broadcast_shapes(*shapes)
    with pytest.raises(RuntimeError):
        broadcast_shape(torch.Size((2, 3)), torch.Size((4, 3)))


def test_scaled_gradient_scales_in_place_only_what_the_node_made_afresh():
    """A rule's factors on the gradients a node's backward returned are applied in place where that gradient is the
    node's own fresh tensor, out of place where it is the incoming gradient (an addition passes it on as is), a
    view, or the same memory as another operand's (each scaled once); the incoming gradient is never changed."""
    from dynamiclrp.ops.base import scaled_gradient

    g_out = torch.randn(4, 5)
    before = g_out.clone()
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    a0, b0 = a.clone(), b.clone()
    step = scaled_gradient((0.5, 0.25))
    got = step((a, b), (g_out,))
    assert got[0] is a and got[1] is b  # fresh: in place
    assert torch.equal(got[0], a0 * 0.5) and torch.equal(got[1], b0 * 0.25)
    shared = torch.randn(4, 5)
    s0 = shared.clone()
    for grads in [(g_out, g_out), (shared, shared), (shared[:2], shared[2:])]:  # incoming; one tensor twice; views
        got = step(grads, (g_out,))
        assert torch.equal(g_out, before) and torch.equal(shared, s0)
        assert torch.equal(got[0], grads[0] * 0.5) and torch.equal(got[1], grads[1] * 0.25)
    uniform = scaled_gradient((0.5, 0.5))
    assert uniform.uniform == 0.5 and step.uniform is None
    assert scaled_gradient((None, 1.0))((a, b), (g_out,)) == (None, b)


# ---------------------------------------------------------------------------------------------- every architecture
def _text_cases():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from arch_text import ARCHITECTURES

    return ARCHITECTURES


def _text_pair(name: str, preset: str):
    """(gradient pass if its rules allow, node by node) on a text architecture of the coverage suite, eager
    attention, float64."""
    from test_coverage_text import to_double

    arch = _text_cases()[name]
    if "eager" not in arch.attn:
        pytest.skip("no eager attention")
    model, inputs, out = arch.small("eager")
    old = torch.get_default_dtype()
    if arch.default_double:
        torch.set_default_dtype(D)
    try:
        model, inputs = model.double().eval(), to_double(inputs)
        ref = dynamiclrp.explain(model, inputs, preset=preset, output=out, ledger=False, gradient_form=False)
        got = dynamiclrp.explain(model, inputs, preset=preset, output=out, ledger=False)
    finally:
        torch.set_default_dtype(old)
    return got, ref


@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp"])
@pytest.mark.parametrize("name", list(_text_cases()))
def test_every_text_architecture(name, preset):
    """Each text architecture of the coverage suite (eager attention, float64): the gradient form is used and
    agrees with the node-by-node run to 1e-6 of the largest token relevance (float32 casts inside RMSNorms and
    softmaxes round the gradient there: about 1e-8), except Mamba, whose float32 output in a float64 model keeps the
    node-by-node run (relevance in float64)."""
    got, ref = _text_pair(name, preset)
    if name == "mamba":
        assert not got.stats.gradient_form
        return
    assert got.stats.gradient_form
    assert rel_diff(got.tokens, ref.tokens) < 1e-6


# one gradient pass (T5: its mask added to the position bias, which each layer adds to its scores)
EPSILON_FORM = {"bert", "distilbert", "roberta", "gpt2", "llama", "gemma3", "qwen3", "clip_text", "t5"}


@pytest.mark.parametrize("name", list(_text_cases()))
def test_epsilon_preset_on_every_text_architecture(name):
    """The ``epsilon`` preset on each text architecture (eager attention, float64): where its rules have a
    gradient form (ε on linear layers and sums, the uniform rule's on attention products, attention masks checked
    by softmax's step) it must agree with the node-by-node run as the AttnLRP presets do (above); where they have
    none, the node-by-node answer comes back all the same."""
    got, ref = _text_pair(name, "epsilon")
    assert got.stats.gradient_form == (name in EPSILON_FORM)
    assert rel_diff(got.tokens, ref.tokens) < 1e-6


@pytest.mark.parametrize("biased", ["biased too", "plain only"])
@pytest.mark.parametrize("name", ["t5", "bert", "llama"])
def test_epsilon_attention_carried_by_hand_on_real_architectures(name, biased, monkeypatch):
    """The ``epsilon`` preset with every eager softmax's step carried on by hand (:data:`dynamiclrp.ops.attention.
    DIRECT_SCORES` 0; in use from half a million attention weights up) on T5, BERT and LLaMA as transformers writes
    them: T5's encoder self-attentions (the position bias's gradient summed over the layers), its decoder's
    (under transformers 5 the causal mask added apart) and its first cross-attention (the second's queries come
    from a stream above the encoder's output: not bypassed,
    :func:`test_nested_bypass_declines_a_frontier_above_another`); one pass, no second one without bypasses.
    In float32: in a float64 model T5 and LLaMA compute the softmax in float32 between two casts, which is no
    chain of the product's scores. Equal to node by node to 1e-5 of the largest relevance, every embedding lookup's
    too (T5's chains in float64: :class:`BiasedAttention`). ``plain only``: a chain whose bias gets a gradient of
    its own (T5's position bias) waits for :data:`~dynamiclrp.ops.attention.BIASED_DIRECT_FACTOR` times
    :data:`~dynamiclrp.ops.attention.DIRECT_SCORES` weights; with that out of reach T5 carries its first
    cross-attention alone (a constant mask, no bias of its own), BERT and LLaMA both their chains as before."""
    from dynamiclrp.ops import attention

    monkeypatch.setattr(attention, "DIRECT_SCORES", 0 if biased == "biased too" else 1)
    if biased == "plain only":
        monkeypatch.setattr(attention, "BIASED_DIRECT_FACTOR", 1 << 40)
    model, inputs, out = _text_cases()[name].small("eager")
    model = model.eval()
    kw = dict(preset="epsilon", output=out, ledger=False)
    got = dynamiclrp.explain(model, inputs, **kw)
    ref = dynamiclrp.explain(model, inputs, gradient_form=False, **kw)
    # T5: its encoder's two, its first cross-attention, and its decoder's two (transformers 4 adds the causal mask
    # to the position bias, transformers 5 to the logits in a second sum: a chain either way)
    assert got.stats.gradient_form and got.stats.bypassed_kinds.get("SoftmaxBackward0", 0) == (
        2 if name != "t5" else 5 if biased == "biased too" else 1)
    assert rel_diff(got.tokens, ref.tokens) < 1e-5
    assert got.embeddings.keys() == ref.embeddings.keys()
    for k in ref.embeddings:
        assert rel_diff(got.embeddings[k], ref.embeddings[k]) < 1e-5, k


class RMSDecoder(nn.Module):
    """Pre-norm decoder blocks as LLaMA writes them, everything by hand: RMSNorm ``x * rsqrt(mean(x²) + ε) * w``
    (its statistics a branch of the stream it normalises), causal attention ``softmax(q kᵀ) @ v``, a SwiGLU MLP,
    residual additions, a final norm before the head. One norm is a layer norm written with a division,
    ``d / sqrt(mean(d²) + ε)``."""

    def __init__(self, d: int = 8, blocks: int = 2):
        super().__init__()
        self.inp, self.head = nn.Linear(d, d), nn.Linear(d, 3)
        self.qkv = nn.ModuleList(nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(3)) for _ in range(blocks))
        self.mlp = nn.ModuleList(nn.ModuleList((nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)))
                                 for _ in range(blocks))
        self.w = nn.Parameter(torch.rand(2 * blocks + 1, d) + 0.5)

    def norm(self, h, k):
        if k == 1:  # the division form
            d = h - h.mean(-1, keepdim=True)
            return d / torch.sqrt(d.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w[k]
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w[k]

    def forward(self, x):
        t = x.shape[1]
        mask = torch.triu(torch.full((t, t), -1e9, dtype=x.dtype), 1)
        h = self.inp(x)
        for b, ((q, k, v), (gate, up, down)) in enumerate(zip(self.qkv, self.mlp)):
            a = self.norm(h, 2 * b)
            h = h + torch.softmax(q(a) @ k(a).transpose(-1, -2) / math.sqrt(a.shape[-1]) + mask, -1) @ v(a)
            n = self.norm(h, 2 * b + 1)
            h = h + down(F.silu(gate(n)) * up(n))
        return self.head(self.norm(h, len(self.w) - 1)[:, -1])


@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp"])
def test_bypass_through_written_out_norms(preset, monkeypatch):
    """A product ``a * f(a)`` (a norm by hand: ``f(a)`` its statistics, held constant) gives ``f(a)``'s branch no
    gradient, so that branch is no fork in a carried route: under CP-LRP the attention's product with the values
    is bypassed through the norm to the residual stream. The products that give one operand alone a gradient (the
    norms; CP-LRP's gate) compute that one without the other's, bypassed too, except the final norm (its stream
    gets no gradient from elsewhere to join). Equal to the pass without bypasses and to node by node (ε → 0). The
    statistics' own nodes (``rsqrt``, ``pow``: identity-rule steps) get no gradient at all and are given no route."""
    from dynamiclrp import gradient_bypass, gradient_form

    routed = []

    def direct(bypasses, kind, step, route):
        routed.append(kind)
        return planned(bypasses, kind, step, route)

    planned = gradient_bypass._direct
    monkeypatch.setattr(gradient_bypass, "_direct", direct)
    torch.manual_seed(0)
    model, x = RMSDecoder().to(D).eval(), torch.randn(2, 5, 8, dtype=D)
    got = dynamiclrp.explain(model, x, preset=preset, ledger=False)
    assert "MulBackward0" in routed and not {"RsqrtBackward0", "PowBackward0", "SqrtBackward0"} & set(routed)
    ref = dynamiclrp.explain(model, x, preset=preset, ledger=False, gradient_form=False, rules=LIMIT_PRESET[preset])
    monkeypatch.setattr(gradient_form, "BYPASSES", False)
    plain = dynamiclrp.explain(model, x, preset=preset, ledger=False)
    # the RMSNorms' products but the final one; under AttnLRP the SiLUs, under CP-LRP the products with the values
    # and the gates. Not the layer norm's division: its centring ``h - mean(h)`` is a fork (both terms carry
    # gradient to ``h``), which also stops the first block's gate, whose route crosses it
    # Below the pick of the last token, the last block's gate and up projections multiply its rows alone; under
    # AttnLRP their gradients go on by hand through the block's norm, whose product's step is counted there once more
    expected = {"MulBackward0": 3 + 1, "SiluBackward0": 2} if preset == "attnlrp" else {"MulBackward0": 4,
                                                                                       "BmmBackward0": 2}
    expected["AddmmBackward0"] = 2
    assert got.stats.bypassed_kinds == expected and plain.stats.bypassed == 0
    assert rel_diff(got.inputs[0], plain.inputs[0]) < 1e-12
    assert rel_diff(got.inputs[0], ref.inputs[0]) < TOL


@pytest.mark.parametrize("op,kept", [(torch.mul, 0), (torch.mul, 1), (torch.div, 0)])
def test_one_factor_gradient_of_an_elementwise_product(op, kept):
    """The gradient an element-wise ``a * b`` (``a / b``) gives its one operand that gets any, computed alone:
    :math:`f\\,g \\odot b` (:math:`f\\,g / b`) for ``a``, :math:`f\\,g \\odot a` for ``b``, summed over the
    dimensions the operand was broadcast along -- and the node's own backward, scaled."""
    from dynamiclrp.ops.elementwise import ELEMENTWISE_OPS, _one_factor_gradient

    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4, 5), (3, 4, 5)]
    shapes[kept] = (3, 1, 5)  # the kept operand broadcast along dimension 1
    a, b = (torch.randn(s, dtype=D, generator=g).requires_grad_() for s in shapes)
    out = op(a, b)
    go = torch.randn(out.shape, dtype=D, generator=g)
    got = _one_factor_gradient(_at(out.grad_fn), ELEMENTWISE_OPS[out.grad_fn.name()], kept, 0.5)((go,))
    assert list(got) == [kept] and got[kept].shape == shapes[kept]
    other = (a, b)[1 - kept].detach()
    formula = (go / other if op is torch.div else go * other).sum(1, keepdim=True)
    own = torch.autograd.grad(out, (a, b)[kept], go)[0]
    assert rel_diff(got[kept], 0.5 * formula) < 1e-15 and rel_diff(got[kept], 0.5 * own) < 1e-15
    assert _one_factor_gradient(_at(out.grad_fn), ELEMENTWISE_OPS[out.grad_fn.name()], kept, 1.0)((None,)) is None


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp"])
def test_half_precision_gradient_form_is_as_close_to_float64(name, attn, preset, monkeypatch):
    """A bf16 model explained by the gradient form in bf16 (the default on a GPU; here the CPU made to count as
    one) against float64 on the same rounded weights: within bf16's own rounding of the forward, as float32
    relevance node by node is (the bound of the half-precision test in test_reliability, 3e-2 of the largest token
    relevance; measured 1e-3 to 9e-3 for both on three draws)."""
    from dynamiclrp import api

    monkeypatch.setattr(api, "HALF_GRADIENT_FORM_DEVICES", ("cpu",))
    model, out = tiny(name, attn)
    half = model.to(torch.bfloat16)
    exact = copy.deepcopy(half).double()
    ids = {"input_ids": torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        target = out(exact(**ids)).argmax(-1)  # one target for all: bf16 may rank the classes otherwise
    kw = dict(preset=preset, output=out, target=target, ledger=False)
    want = dynamiclrp.explain(exact, ids, **kw).tokens
    got = dynamiclrp.explain(half, ids, **kw)
    node_by_node = dynamiclrp.explain(half, ids, dtype=torch.float32, **kw)
    assert got.stats.gradient_form and got.tokens.dtype == torch.bfloat16
    assert not node_by_node.stats.gradient_form
    assert rel_diff(got.tokens.double(), want) < 3e-2 and rel_diff(node_by_node.tokens.double(), want) < 3e-2


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_half_precision_epsilon_gradient_form_is_as_close_as_node_by_node(name, attn, monkeypatch):
    """The ``epsilon`` preset on a bf16 model by the gradient form in bf16 (fused attention's step included):
    against float64 on the same rounded weights it is as close as float32 relevance node by node on the bf16
    model. Both are far (0.2 to 0.9 of the largest token relevance here, against 1e-4 for a float32 model): the
    ε-rule's denominators on this random model amplify the bf16 forward's own rounding, which neither undoes.
    GPT-2's and BERT's bf16 residual streams hold exact zeros (addends that cancel) where a layer norm passes
    relevance on: the form must carry it there (the sum's ε-step in the norm's), not leave the run node by node."""
    from dynamiclrp import api

    monkeypatch.setattr(api, "HALF_GRADIENT_FORM_DEVICES", ("cpu",))
    model, out = tiny(name, attn)
    half = model.to(torch.bfloat16)
    exact = copy.deepcopy(half).double()
    ids = {"input_ids": torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        target = out(exact(**ids)).argmax(-1)
    kw = dict(preset="epsilon", output=out, target=target, ledger=False)
    want = dynamiclrp.explain(exact, ids, **kw).tokens
    got = dynamiclrp.explain(half, ids, **kw)
    node_by_node = dynamiclrp.explain(half, ids, dtype=torch.float32, **kw)
    assert got.stats.gradient_form and got.tokens.dtype == torch.bfloat16
    assert rel_diff(got.tokens.double(), want) <= 1.1 * rel_diff(node_by_node.tokens.double(), want) + 1e-2


def test_planner_forgets_what_it_found_silent_when_a_node_is_silenced_or_speaks():
    """``_Planner._silent`` caches its answers while the set of silenced nodes stands: silencing a node, or letting
    it speak again, forgets them (a route looked for before a projection was bypassed would otherwise keep the
    answer found without it)."""
    from dynamiclrp import get_preset
    from dynamiclrp.engine import Run
    from dynamiclrp.gradient_bypass import _Planner
    from dynamiclrp.graph import Graph

    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    h = torch.tanh(x @ w)  # tanh feeds on mm, which feeds on x
    graph = Graph.build([h.grad_fn])
    leaf = next(n for n in graph.nodes if n.kind == "AccumulateGrad" and n.fn.variable is x)
    run = Run(graph, get_preset("epsilon"), torch.float32, {(leaf.id, 0)})  # x's relevance asked for
    planner = _Planner(run, {}, frozenset({(0, 0)}))
    mm = next(n for n in graph.nodes if n.kind == "MmBackward0")
    tanh = next(n for n in graph.nodes if n.kind == "TanhBackward0")
    assert planner._silent(mm.id) is False
    planner.silence([tanh.fn])
    assert planner._silent(tanh.id) is True and planner._silent(mm.id) is True  # fed only by a silenced node
    planner.speak(tanh.fn)
    assert planner._silent(tanh.id) is False and planner._silent(mm.id) is False


def test_a_ratios_flag_is_finite_exactly_where_its_elements_are():
    """:func:`~dynamiclrp.ops.base.carried_flag` is one number, finite where every element is and not where one
    is inf or NaN, ±inf together included; a half-precision tensor's sum is taken in float32 (its own would
    overflow at 65,504); an empty tensor's is finite. A sum past float32's range is not finite either (the run
    then goes node by node)."""
    from dynamiclrp.ops.base import carried_flag

    def finite(t):
        f = carried_flag(t)
        assert f.shape == (1,)
        return bool(torch.isfinite(f).all())

    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.randn(1000).to(dt)
        assert finite(x) and finite(x[:0])
        for bad in ([math.inf], [-math.inf], [math.nan], [math.inf, -math.inf]):
            y = x.clone()
            y[: len(bad)] = torch.tensor(bad, dtype=dt)
            assert not finite(y), (dt, bad)
    assert finite(torch.full((100,), 60000.0, dtype=torch.float16))  # 6e6: beyond float16, within float32
    assert not finite(torch.full((100,), 1e37))


def test_by_hand_chain_checks_what_it_made_once_per_layer(monkeypatch):
    """The scores chain carried on by hand checks what its blocks made once per layer, on the queries' gradient
    (every element of every block enters it), not block by block: an infinity one block makes (injected here: an
    overflow of the sum's ε-step) is found by that one check, and the run goes node by node, whose answer it then
    gives."""
    from dynamiclrp.ops import attention

    monkeypatch.setattr(attention, "DIRECT_SCORES", 0)
    monkeypatch.setattr(attention, "_BLOCK", 1)
    found, flag, scores_gradient = [], attention.carried_flag, attention._scores_gradient

    def spied(t):
        found.append(bool(torch.isfinite(t).all()))
        return flag(t)

    def overflowing(r, *args, **kw):
        got = scores_gradient(r, *args, **kw)
        if not found and got.numel():
            got.view(-1)[0] = math.inf
        return got
    monkeypatch.setattr(attention, "carried_flag", spied)
    monkeypatch.setattr(attention, "_scores_gradient", overflowing)
    torch.manual_seed(0)
    model, x = WrittenAttention().to(D).eval(), torch.randn(2, 40, 8, dtype=D)
    rules = {"sum": r.Epsilon(0.02), "product": r.Uniform(0.01), "linear": r.Epsilon(1e-30)}
    kw = dict(preset="epsilon", target=1, ledger=False, rules=rules)
    got = dynamiclrp.explain(model, x, **kw)
    assert found == [False]  # one check for the layer's blocks, and it found the infinity
    assert not got.stats.gradient_form
    ref = dynamiclrp.explain(model, x, gradient_form=False, **kw)
    assert torch.equal(got.inputs[0], ref.inputs[0])


@pytest.mark.parametrize("name,preset", [("bert", "epsilon"), ("bert", "attnlrp"), ("llama", "cp_lrp"),
                                         ("gpt2", "cp_lrp")])
def test_planning_shortcuts_agree_with_their_definitions(name, preset):
    """The planning's shortcuts give what their definitions give: the picked-rows region, found from the picks
    down, is the set found by asking every node; every node the steps' own walk reached (``Run.reached``) is one
    the bypass planner finds reached; and the bypasses planned with that walk's answer are those planned without."""
    from dynamiclrp import gradient_bypass as gb
    from dynamiclrp.gradient_form import prepare_gradient_form

    model, out = tiny(name, "eager")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    run = dynamiclrp.explain(model, {"input_ids": ids}, preset=preset, output=out, ledger=False,
                             keep_run=True).extra["run"]
    graph = run.graph
    assert run.reached, "the gradient form's steps were worked out in this run"

    picked: set[int] = set()  # the definition: every node asked, consumers first
    for nid in graph.order:
        if gb._stays_picked(run, graph.nodes[nid], nid, picked):
            picked.add(nid)
    assert gb._picked_rows(run) == picked
    assert picked, "BERT's class token, the decoders' last token: a region below the pick"

    prepared = prepare_gradient_form(run, run.seeds)
    steps = dict(prepared.hooks(run))
    planner = gb._Planner(run, steps, run.seeds)
    assert not any(planner.unreached(nid) for nid in run.reached)
    with_walk = gb.plan_bypasses(run, dict(prepared.hooks(run)), run.seeds)
    run.reached = None
    without = gb.plan_bypasses(run, dict(prepared.hooks(run)), run.seeds)
    assert [(nid, type(h).__name__) for nid, h in with_walk.hooks] == \
        [(nid, type(h).__name__) for nid, h in without.hooks]
