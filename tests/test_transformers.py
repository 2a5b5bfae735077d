"""Attention written three ways gives one answer: fused SDPA nodes, eager primitives, and untracked masks.

Hugging Face models run the same weights with ``attn_implementation="sdpa"`` (one fused autograd node, split by
the op table) and ``"eager"`` (matmuls, a mask added as a constant autograd does not record, softmax). In float64
their relevance must agree. Differences come only from the ε of the mask addition that eager attention has and
SDPA does not (an addition of zeros: S/(S+ε)), so the bound below is 1e-5 relative.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import dynamiclrp
from dynamiclrp import ActivationUnavailableError

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _models(cls, cfg):
    torch.manual_seed(0)
    sdpa = cls._from_config(copy.deepcopy(cfg), attn_implementation="sdpa", dtype=torch.float64).eval()
    eager = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager", dtype=torch.float64).eval()
    eager.load_state_dict(sdpa.state_dict())
    return sdpa, eager


CASES = {
    "bert": (transformers.BertForSequenceClassification,
             dict(cfg="BertConfig", vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64), None),
    "llama-gqa": (transformers.LlamaForCausalLM,
                  dict(cfg="LlamaConfig", vocab_size=128, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
                  lambda o: o.logits[:, -1]),
    "gpt2": (transformers.GPT2LMHeadModel,
             dict(cfg="GPT2Config", vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64),
             lambda o: o.logits[:, -1]),
}


@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp", "paper"])
@pytest.mark.parametrize("name", list(CASES))
def test_sdpa_and_eager_attention_agree(name, preset):
    cls, kw, out = CASES[name]
    kw = dict(kw)
    cfg = getattr(transformers, kw.pop("cfg"))(**kw)
    sdpa, eager = _models(cls, cfg)
    a = dynamiclrp.explain(sdpa, {"input_ids": IDS}, preset=preset, output=out)
    b = dynamiclrp.explain(eager, {"input_ids": IDS}, preset=preset, output=out)
    assert a.tokens.shape == IDS.shape
    assert torch.isfinite(a.tokens).all() and torch.isfinite(b.tokens).all()
    assert float(b.tokens.abs().max()) > 0
    rel = float((a.tokens - b.tokens).abs().max() / b.tokens.abs().max())
    assert rel < 1e-5, rel
    assert not a.approximations and not b.approximations


def _attention_inputs(gen_seed=1):
    g = torch.Generator().manual_seed(gen_seed)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    return q, k, v


def _eager_attention(q, k, v, mask):
    scores = q @ k.transpose(-2, -1) / 2.0
    return torch.softmax(scores + mask, -1) @ v


@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float64).min, -1e4])
def test_untracked_additive_mask_is_exact(fill):
    """A causal mask added as a constant is recovered as zero where attended, checked against the softmax."""
    q, k, v = _attention_inputs()
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    mask = torch.zeros(5, 5, dtype=torch.float64).masked_fill(~causal, fill)
    y = _eager_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5)
    seed = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    tiny = {"sum": dynamiclrp.rules.Epsilon(1e-12), "product": dynamiclrp.rules.Uniform(1e-12)}
    a = dynamiclrp.propagate(y, target=seed * y.detach(), wrt=[q, k, v], preset="attnlrp", rules=tiny)
    b = dynamiclrp.propagate(ref, target=seed * ref.detach(), wrt=[q, k, v], preset="attnlrp", rules=tiny)
    for ra, rb in zip(a.inputs, b.inputs):
        torch.testing.assert_close(ra, rb, rtol=1e-9, atol=1e-12)


def test_untracked_position_bias_raises():
    """A constant that is not a plain mask (a position bias) cannot be recovered: error, not a wrong answer."""
    q, k, v = _attention_inputs()
    bias = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = _eager_attention(q, k, v, bias)
    with pytest.raises(ActivationUnavailableError, match="position bias"):
        dynamiclrp.propagate(y, wrt=[q], preset="attnlrp")


def test_untracked_constant_needed_by_a_sum_raises():
    """x + c with c a constant autograd did not record, feeding a sum: its share is unknowable."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = (x * 2.0 + torch.ones(4, dtype=torch.float64)).sum(-1)
    with pytest.raises(ActivationUnavailableError, match="constant autograd did not record"):
        dynamiclrp.propagate(y, wrt=[x])


def test_tracked_position_bias_works():
    """The same position bias, made to require grad, is part of the graph and the answer is exact."""
    q, k, v = _attention_inputs()
    bias = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    y = _eager_attention(q, k, v, bias)
    a = dynamiclrp.propagate(y, wrt=[q, k, v, bias], preset="attnlrp")
    assert all(torch.isfinite(r).all() for r in a.inputs)
    assert float(a.inputs[3].abs().sum()) > 0
