"""Fused attention under CP-LRP: the node's own backward against the value gradient alone (issue #8).

CP-LRP gives the queries and keys of attention no gradient, so the gradient form bypasses a fused
``scaled_dot_product_attention`` node and computes :math:`g_V = P^\\top g_O` itself
(:func:`dynamiclrp.ops.attention._values_gradient`, :mod:`dynamiclrp.gradient_bypass`). This times both on the
CPU, one thread, for the shapes of the models in ``results/speed.md`` and for long causal sequences: the fused
backward (``torch.autograd.grad`` of the node's output with respect to queries, keys and values, which is what the
node computes without the bypass) and the value gradient alone, interleaved, medians and minima.

Run: ``python benchmarks/attention_values.py [--reps 15] [--out results/attention_values.md]``
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dynamiclrp.ops.attention import _values_gradient  # noqa: E402

torch.set_num_threads(1)

# (label, batch, heads, tokens, head dim, causal)
SHAPES = [
    ("ViT-B/16, batch 1", 1, 12, 197, 64, False),
    ("ViT-B/16, batch 8", 8, 12, 197, 64, False),
    ("BERT-base, 128 tokens", 1, 12, 128, 64, False),
    ("BERT-base, 512 tokens", 1, 12, 512, 64, False),
    ("BERT-base, 128 tokens, batch 4", 4, 12, 128, 64, False),
    ("decoder, 16 heads, 1,024 causal", 1, 16, 1024, 64, True),
    ("decoder, 32 heads, 2,048 causal", 1, 32, 2048, 64, True),
]


def measure(batch: int, heads: int, tokens: int, dim: int, causal: bool, reps: int) -> dict[str, list[float]]:
    # (batch, tokens, heads, dim) viewed as (batch, heads, tokens, dim): the strided layout models hand over
    q, k, v = (torch.randn(batch, tokens, heads, dim).transpose(1, 2).requires_grad_() for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    grad = torch.randn_like(out)
    fn = out.grad_fn

    def fused():
        return torch.autograd.grad(out, [q, k, v], grad, retain_graph=True)

    def alone():
        return _values_gradient(fn, (grad,), 1.0)

    err = float((alone()[2] - fused()[2]).detach().abs().max())
    times: dict[str, list[float]] = {"fused": [], "alone": []}
    for r in range(reps):
        for name, f in ((("fused", fused), ("alone", alone)) if r % 2 else (("alone", alone), ("fused", fused))):
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    times["err"] = [err]
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default="results/attention_values.md")
    args = ap.parse_args()
    lines = [
        "# Fused attention under CP-LRP: its backward against the value gradient alone",
        "",
        f"Written by `benchmarks/attention_values.py` (issue #8). torch {torch.__version__}, CPU, 1 thread, float32;"
        f" {args.reps} interleaved repetitions after a warm-up, ms. *fused*: the node's own backward (queries, keys"
        " and values); *alone*: `_values_gradient` (what the bypass runs). max |Δ g_V|: the two value gradients'"
        " largest difference.",
        "",
        "| shape | fused: median (min) | alone: median (min) | alone ÷ fused (medians) | max abs. difference |",
        "|---|---|---|---|---|",
    ]
    for label, *shape in SHAPES:
        reps = args.reps if shape[2] < 1024 else max(3, args.reps // 5)
        t = measure(*shape, reps)
        fm, am = statistics.median(t["fused"]) * 1e3, statistics.median(t["alone"]) * 1e3
        row = (f"| {label} | {fm:.1f} ({min(t['fused']) * 1e3:.1f}) | {am:.1f} ({min(t['alone']) * 1e3:.1f}) |"
               f" {am / fm:.2f} | {t['err'][0]:.1e} |")
        print(row, flush=True)
        lines.append(row)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
