"""Nightly-style fuzz run: many random programs of supported ops, every check of ``tests/test_fuzz.py``.

Usage::

    python benchmarks/fuzz.py [--cases 2000] [--seed 0] [--modes explain,frozen] [--max-ops 10]
                              [--out results/fuzz.md]

Each mode runs ``--cases`` programs (drawn by hypothesis from ``tests/fuzz_models.programs`` with the given seed),
each with a preset drawn from the reference's table. The checks (no crash; the ledger accounts for the seed and
matches the reference's split; batch rows independent; input relevance equal to the independent reference
``tests/reference_lrp.py`` to 1e-10) do not stop the run: failures are counted by category, and the smallest
failing program of each (category, mode, preset) is written to the report. Cases that hit an open finding
(``OPEN_FINDINGS`` in ``tests/test_fuzz.py``, diagnosed in ``results/fuzz_findings.md``) skip the comparison
that finding breaks and are counted; so are ill-conditioned cases (a denominator within 1e-5 of cancelling, where
float64 rounding alone exceeds the comparison's tolerance: ``reference_lrp.watch``); a clear
``ActivationUnavailableError`` on a frozen model whose graph holds an
untracked constant (nothing can recover the activation) is counted as a refusal, not a failure.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from collections import Counter

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import test_fuzz as tf  # noqa: E402
from fuzz_models import MOTIFS, OP_NAMES, programs  # noqa: E402
from reference_lrp import PRESETS  # noqa: E402

torch.set_num_threads(1)
CI_CASES = 150 + 120 + 50 + 150  # max_examples of the four fuzz tests in tests/test_fuzz.py


def run_mode(mode: str, cases: int, seed_: int, max_ops: int, presets: list[str]) -> dict:
    stats = {"cases": 0, "failed_cases": 0, "failures": Counter(), "by_preset": Counter(),
             "failed_by_preset": Counter(), "findings": Counter(), "refused": 0, "ill": 0, "ops": Counter(), "nodes": 0,
             "examples": {}}

    @seed(seed_)
    @settings(max_examples=cases, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(programs(max_ops=max_ops), st.sampled_from(presets))
    def one(prog, preset):
        stats["cases"] += 1
        stats["by_preset"][preset] += 1
        stats["ops"].update(n.op for n in prog.nodes)
        stats["nodes"] += len(prog.nodes)
        for f in tf.open_findings(prog, preset, mode):
            stats["findings"][f] += 1
        before, ill = tf.REFUSED[0], tf.ILL[0]
        failures = tf.check(prog, preset, mode=mode)
        stats["refused"] += tf.REFUSED[0] - before
        stats["ill"] += tf.ILL[0] - ill
        if failures:
            stats["failed_cases"] += 1
            stats["failed_by_preset"][preset] += 1
        for category, message in failures:
            stats["failures"][category] += 1
            key = (category, preset)
            old = stats["examples"].get(key)
            if old is None or len(prog.nodes) < len(old[0].nodes):
                stats["examples"][key] = (prog, message.splitlines()[0][:300])

    one()
    return stats


def report(results: dict, args, elapsed: float) -> str:
    lines = ["# Fuzz results", "",
             f"`python benchmarks/fuzz.py --cases {args.cases} --seed {args.seed} --modes {args.modes} "
             f"--max-ops {args.max_ops}` (torch {torch.__version__}, float64, "
             f"{time.strftime('%Y-%m-%d', time.gmtime())}): {sum(r['cases'] for r in results.values())} cases in "
             f"{elapsed:.0f} s (one CPU thread). CI runs the same checks on a fixed-seed subset "
             f"(`tests/test_fuzz.py`, {CI_CASES} fuzz cases).", ""]
    if args.source:
        lines += [f"dynamiclrp: {args.source}.", ""]
    lines += ["Random programs (`tests/fuzz_models.py`) of " + ", ".join(f"`{o}`" for o in OP_NAMES)
              + ", and motifs " + ", ".join(f"`{m}`" for m in MOTIFS) + "; one or two outputs (one may consume "
              "the other); shared sub-graphs; broadcasting; batch 2-3. Each case is explained by dynamiclrp and by "
              "the independent reference `tests/reference_lrp.py`. Modes: `explain` (`dynamiclrp.explain` on the "
              "module), `frozen` (every parameter frozen, `dynamiclrp.propagate` on the output: autograd keeps "
              "fewer activations and the Promise System recovers them); the same programs in both modes.", ""]
    lines += ["## Summary", "", "| mode | cases | mean nodes | failed cases | crash | reference | conservation | batch "
              "| seed | refused (clear error) | ill-conditioned | skipped comparisons (open findings) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        f = r["failures"]
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(r["findings"].items())) or "none"
        lines.append(f"| {mode} | {r['cases']} | {r['nodes'] / max(r['cases'], 1):.1f} | {r['failed_cases']} | "
                     f"{f['crash']} | {f['reference']} | {f['conservation']} | {f['batch']} | {f['seed']} | "
                     f"{r['refused']} | {r['ill']} | {skipped} |")
    lines += ["", "## By preset", "", "| mode | " + " | ".join(PRESETS) + " |", "|---|" + "---|" * len(PRESETS)]
    for mode, r in results.items():
        lines.append(f"| {mode} | " + " | ".join(f"{r['by_preset'][p]} ({r['failed_by_preset'][p]} failed)"
                                                for p in PRESETS) + " |")
    lines += ["", "## Ops drawn (nodes, all modes)", ""]
    ops = Counter()
    for r in results.values():
        ops.update(r["ops"])
    lines.append(", ".join(f"`{k}` {v}" for k, v in ops.most_common()))
    lines += ["", "## Findings", "",
              "Found by the fuzz tests; details, minimal programs and diagnoses in `results/fuzz_findings.md`. A "
              "finding is fixed when its fix landed in `src/` and its regression test in `tests/test_fuzz.py` "
              "passes as a normal test.", "", "| finding | status | caught by | what |", "|---|---|---|---|"]
    for name, what in tf.FINDINGS.items():
        lines.append(f"| {name} | {'open' if name in tf.OPEN_FINDINGS else 'fixed'} | "
                     f"{tf.FINDING_CATEGORY.get(name, '')} | {what} |")
    found, fixed = len(tf.FINDINGS), len(set(tf.FINDINGS) - set(tf.OPEN_FINDINGS))
    lines += ["", f"Failures found: {found}; fixed: {fixed}; open: {found - fixed}.", ""]
    examples = [(mode, k, v) for mode, r in results.items() for k, v in sorted(r["examples"].items())]
    if examples:
        lines += ["## Failures of this run (smallest program per category and preset)", ""]
        for mode, (category, preset), (prog, message) in examples:
            lines += [f"* {mode}, {preset}, {category}: {message}", "", "```", repr(prog), "```", ""]
    else:
        lines += ["No failures in this run beyond the open findings counted above.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000, help="cases per mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="explain,frozen")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--max-ops", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "results" / "fuzz.md"))
    ap.add_argument("--source", default="", help="what dynamiclrp was run from (for the report)")
    args = ap.parse_args(argv)
    t0 = time.time()
    results = {}
    for mode in args.modes.split(","):
        t = time.time()
        results[mode] = run_mode(mode, args.cases, args.seed, args.max_ops, args.presets.split(","))
        r = results[mode]
        print(f"{mode}: {r['cases']} cases, {r['failed_cases']} failed, {dict(r['failures'])}, refused "
              f"{r['refused']}, open findings hit {dict(r['findings'])} ({time.time() - t:.0f} s)", flush=True)
    text = report(results, args, time.time() - t0)
    pathlib.Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 1 if any(r["failed_cases"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
