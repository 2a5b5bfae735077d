"""Same-process A/B of one engine setting (a module-level threshold or block size) on a benchmark case (issue #8).

The engine's size thresholds (``dynamiclrp.ops.attention.DIRECT_SCORES``, ``BIASED_DIRECT_FACTOR``, ``_BLOCK``;
``dynamiclrp.ops.base._SUBTRACTED_FROM``; ``dynamiclrp.engine.SCRATCH_BYTES``, ...) each choose between two ways to
the same relevance. Whether a new value pays is a question of a few per cent, on a machine that drifts by more than
that within minutes: so both values run in one process, on one model and input, interleaved as
``benchmarks/speed.py`` runs its methods (``speed.interleave``: one explanation of each per round, the order
reversed every other round), and the verdict is the median of the per-round ratios
with its sign-test interval (``timing_stats.paired_ratio``). The script also prints how far the two answers lie
apart (largest difference over the largest relevance): a setting that picks another path may round differently,
never more.

Run: ``python benchmarks/ab_setting.py t5small@s512b1 dynamiclrp.ops.attention BIASED_DIRECT_FACTOR 1
[--also NAME=VALUE ...] [--preset epsilon] [--plan] [--rounds 15] [--threads 2]``. The value is a Python expression
(``"1 << 18"``); ``--also`` tries more settings of the same module together with the first (a block's two sizes).
Cases as ``benchmarks/speed.py`` builds them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed  # noqa: E402
import timing_stats  # noqa: E402


def explained(result) -> torch.Tensor:
    """The relevance an A/B compares: the tokens' for text, the input's for images."""
    return result.tokens if result.tokens is not None else result.inputs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", help="a case of benchmarks/speed.py, e.g. t5small@s512b1 or vit_b_16")
    ap.add_argument("module", help="the module holding the setting, e.g. dynamiclrp.ops.attention")
    ap.add_argument("name", help="the setting's name in that module")
    ap.add_argument("value", help="the value tried against the module's own (a Python expression)")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=VALUE",
                    help="another setting of the same module, tried together with the first")
    ap.add_argument("--preset", default="epsilon")
    ap.add_argument("--plan", action="store_true",
                    help="each value with a dynamiclrp.Plan of its own (a data-set loop)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    module = importlib.import_module(args.module)
    pairs = [(args.name, args.value), *(tuple(a.split("=", 1)) for a in args.also)]
    for name, _ in pairs:
        if not hasattr(module, name):
            raise SystemExit(f"{args.module} has no setting {name!r}")
    own = {name: getattr(module, name) for name, _ in pairs}
    tried = {name: eval(value, {}) for name, value in pairs}  # noqa: S307 - the caller's own expressions
    case = speed.Case(speed.parse_case(args.case))

    def with_value(value):
        explain = case.ours(args.preset, plan=args.plan)  # its own plan, reused over the rounds

        def run():
            for name, v in value.items():
                setattr(module, name, v)
            try:
                return explain()
            finally:
                for name, v in own.items():
                    setattr(module, name, v)
        return run

    def label(values: dict) -> str:
        return ", ".join(f"{name} = {v!r}" for name, v in values.items())

    runs = {f"{label(own)} (own)": with_value(own), label(tried): with_value(tried)}
    answers = [explained(run()) for run in runs.values()]
    spread = float((answers[0] - answers[1]).abs().max() / answers[0].abs().max().clamp_min(1e-30))
    errors: dict[str, str] = {}
    times, _ = speed.interleave(runs, args.rounds, False, errors)  # as the benchmark times its methods
    if errors:
        raise SystemExit(f"a run failed: {errors}")
    plan = " + plan" if args.plan else ""
    print(f"{args.case}, {args.preset}{plan}, {args.threads} thread(s), {args.rounds} rounds; {case.desc}")
    for label, ts in times.items():
        print(f"  {label}: median {statistics.median(ts) * 1e3:.1f} ms (min {min(ts) * 1e3:.1f})")
    new, old = (times[label] for label in reversed(list(runs)))
    print(f"  tried / own: {timing_stats.paired_ratio(new, old)}")
    print(f"  answers apart: {spread:.3g} of the largest relevance")


if __name__ == "__main__":
    main()
