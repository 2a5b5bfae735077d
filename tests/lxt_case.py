"""One LXT comparison case, run in its own process (LXT's monkey patches change transformers globally).

Usage: ``python tests/lxt_case.py MODEL PRESET ATTN`` prints ``rel_diff seed_ours seed_lxt``: the max-abs
difference of the token relevance of dynamiclrp and of LXT 2.1 (input × gradient at the embeddings), relative to
LXT's largest, for the same random float64 model, input and target.
"""

from __future__ import annotations

import copy
import importlib
import sys
import warnings

import torch
import transformers as T

import dynamiclrp

warnings.simplefilter("ignore")

MODELS = {
    "llama": ("llama", T.LlamaForCausalLM, lambda: T.LlamaConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64), True),
    "qwen3": ("qwen3", T.Qwen3ForCausalLM, lambda: T.Qwen3Config(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, head_dim=8), True),
    "gemma3": ("gemma3", T.Gemma3ForCausalLM, lambda: T.Gemma3TextConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, head_dim=8), True),
    "gpt2": ("gpt2", T.GPT2LMHeadModel, lambda: T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                                                             n_positions=64), True),
    "bert": ("bert", T.BertForSequenceClassification, lambda: T.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64), False),
}


def main(name: str, preset: str, attn: str) -> None:
    module_name, cls, make_cfg, causal = MODELS[name]
    out = (lambda o: o.logits[:, -1]) if causal else (lambda o: o.logits)
    cfg = make_cfg()
    torch.manual_seed(0)
    ours = cls._from_config(copy.deepcopy(cfg), attn_implementation=attn, dtype=torch.float64).eval()
    state = ours.state_dict()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    att = dynamiclrp.explain(ours, {"input_ids": ids}, preset=preset, output=out)

    from lxt.efficient import monkey_patch

    hf = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    rules = importlib.import_module(f"lxt.efficient.models.{module_name}")
    monkey_patch(hf, getattr(rules, {"attnlrp": "attnLRP", "cp_lrp": "cp_LRP"}[preset]), verbose=False)
    theirs = cls._from_config(copy.deepcopy(cfg), attn_implementation=attn, dtype=torch.float64).eval()
    theirs.load_state_dict(state)
    emb = theirs.get_input_embeddings()(ids).detach().requires_grad_()
    logits = out(theirs(inputs_embeds=emb))
    target = logits.gather(1, logits.argmax(-1, keepdim=True))
    target.sum().backward()
    lxt = (emb * emb.grad).sum(-1)  # LXT's relevance: input × modified gradient, seed = the logit
    rel = float((att.tokens - lxt).abs().max() / lxt.abs().max())
    print(rel, float(att.total_seed()), float(target.sum()))


if __name__ == "__main__":
    main(*sys.argv[1:4])
