"""Does an explanation grow with sequence length like the gradient does? (issue #8)

Usage: ``python benchmarks/seq_scaling.py [--lengths 128 256 512 1024 2048] [--threads 1] [--reps N] [--quick]
[--out results/seq_scaling.md]``

A small LLaMA-style decoder (``LlamaForCausalLM``: vocab 32000, hidden 256, 4 layers, 4 heads, intermediate 688,
untied head, eager attention unless ``--attn sdpa``, random weights, ``logits_to_keep=1``), batch 1, explained at
the last position's top logit. For each length: the full gradient pass (forward + backward with parameter
gradients), the floor (gradient with respect to ``inputs_embeds`` only, parameters frozen) and
``dynamiclrp.explain(..., preset="attnlrp", ledger=False, check_finite=False)``, medians of interleaved repetitions
(5 when the full pass takes < 2 s at that length, else 3) after one warm-up round; each length in the same process,
one after the other. The slope of a method is its time growth from the shortest to the longest length divided by the
length growth; the report gives the ratio of the explanation's slope to the gradient's (1 = it grows like the
gradient) and the log-log exponent.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import speed  # noqa: E402
import torch  # noqa: E402

warnings.simplefilter("ignore")


def cell(v) -> str:
    return f"{v:.3f}" if v is not None else "–"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--preset", default="attnlrp")
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                    help="the attention the model is built with (sdpa: one fused node per layer)")
    ap.add_argument("--out", default="results/seq_scaling.md")
    ap.add_argument("--quick", action="store_true", help="lengths 32, 64, 128, one repetition")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [32, 64, 128] if args.quick else args.lengths
    rows = {}
    desc = ""
    t_start = time.time()
    for n in lengths:
        case = speed.Case({**speed.parse_case(f"llama_small@s{n}b1"), "attn": args.attn})
        desc = case.desc.replace(f"× {n} tokens", "× N tokens")
        errors: dict = {}
        fns = {"full": case.full(), "floor": case.floor(), args.preset: case.ours(args.preset)}
        times, reps = speed.interleave(fns, 1 if args.quick else args.reps, False, errors)
        med = {k: statistics.median(v) for k, v in times.items() if v}
        rows[n] = (med, reps, errors, speed.load())
        line = f"{n}: " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()) + (f" errors {errors}" if errors else "")
        print(line, flush=True)
        del case, fns
    ok = [n for n in lengths if args.preset in rows[n][0] and "full" in rows[n][0]]
    out = [f"# Sequence-length scaling: `{args.preset}` against the gradient pass (CPU, {args.threads} thread"
           f"{'s' if args.threads > 1 else ''})", "",
           f"Written by `benchmarks/seq_scaling.py` (issue #8). torch {torch.__version__}. {desc}; the last "
           "position's top logit. Medians of interleaved repetitions after one warm-up round (n per row); every "
           f"length in one process, one after the other; total wall time {time.time() - t_start:.0f} s.", "",
           f"| tokens | full s | floor s | {args.preset} s | × full | × floor | n | load (1 min) |",
           "|---|---|---|---|---|---|---|---|"]
    for n in lengths:
        med, reps, errors, ld = rows[n]
        f, fl, e = med.get("full"), med.get("floor"), med.get(args.preset)
        rf = f"{e / f:.2f}" if e and f else "–"
        rl = f"{e / fl:.2f}" if e and fl else "–"
        err = "; ".join(f"{k}: {v}" for k, v in errors.items())
        out.append(f"| {n} | {cell(f)} | {cell(fl)} | {cell(e) if e else err} | {rf} | {rl} | {reps} | {ld} |")
    out.append("")
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        slope = {k: (rows[b][0][k] - rows[a][0][k]) / (b - a) for k in ("full", "floor", args.preset)
                 if k in rows[a][0] and k in rows[b][0]}
        expo = {k: math.log(rows[b][0][k] / rows[a][0][k]) / math.log(b / a) for k in slope}
        out.append(f"Slopes from {a} to {b} tokens (seconds per 1,000 tokens): "
                   + ", ".join(f"{k} {1000 * v:.3f}" for k, v in slope.items()) + ".")
        out.append("")
        out.append(f"- **slope ratio {args.preset} / full: {slope[args.preset] / slope['full']:.2f}**"
                   + (f"; {args.preset} / floor: {slope[args.preset] / slope['floor']:.2f}" if "floor" in slope
                      else ""))
        out.append(f"- log-log exponent (time ∝ tokens^k) from {a} to {b}: "
                   + ", ".join(f"{k} {v:.2f}" for k, v in expo.items()))
        out.append(f"- ratio {args.preset} / full at {a} tokens: {rows[a][0][args.preset] / rows[a][0]['full']:.2f}, "
                   f"at {b}: {rows[b][0][args.preset] / rows[b][0]['full']:.2f}")
        out.append("")
    text = "\n".join(out)
    print(text)
    p = pathlib.Path(args.out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text + "\n")


if __name__ == "__main__":
    main()
