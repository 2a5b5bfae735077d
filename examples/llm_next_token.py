"""Explain a causal language model's next token, and each token of a short greedy generation.

A small random-weight LLaMA with a byte-level BPE tokenizer trained here in well under a second (no LLM weights
ship offline; with a saved model folder use ``dynamiclrp explain text MODEL_DIR "prompt" --generate 5``).
``next_token_target`` seeds one logit at the last position; nothing here is LLaMA-specific.

Run: ``python examples/llm_next_token.py``
"""

from __future__ import annotations

import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import dynamiclrp
from dynamiclrp.integrations import explain_generation, explain_next_token, next_token_target

CORPUS = ["the capital of france is paris", "the capital of italy is rome", "paris is in france",
          "relevance flows from the output back to the tokens"] * 5


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", pad_token="<s>",
                                   model_input_names=["input_ids", "attention_mask"])


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tokenizer = bpe_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    color = sys.stdout.isatty()

    prompt = "the capital of france is"
    r = explain_next_token(model, tokenizer, prompt, preset="attnlrp")
    print(f"{r.label}:\n  {r.ansi(color=color)}")
    r = explain_next_token(model, tokenizer, prompt, token=" paris", preset="attnlrp")
    print(f"{r.label}:\n  {r.ansi(color=color)}")

    for step in explain_generation(model, tokenizer, "the capital", max_new_tokens=3, preset="attnlrp"):
        print(f"{step.label}:\n  {step.ansi(color=color)}")

    # with explain() directly: logits (batch, seq, vocab), one logit at the last position seeded
    enc = tokenizer(prompt, return_tensors="pt")
    att = dynamiclrp.explain(model, dict(enc), target=next_token_target(), preset="attnlrp")
    print(f"token relevance {att.tokens[0].tolist()}")


if __name__ == "__main__":
    main()
