"""Cost against graph size: is an explanation linear in the number of autograd nodes? (issue #7)

A residual tanh chain of ``steps`` blocks (mm, add, tanh, mul: four nodes each) on a 2 x 3 input, so that tensor
math is negligible and the engine's per-node work is what is measured. For each size: graph nodes, the median time
of ``propagate`` (ε-rule), the gradient of the same graph (``torch.autograd.grad``) for scale, and the time per
node. Linear means a flat time per node.

Run: ``python benchmarks/scaling.py [--repeats 3] [--out results/scaling.md]``
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import dynamiclrp  # noqa: E402
from dynamiclrp.rules import Epsilon  # noqa: E402

torch.set_num_threads(1)
D = torch.float64
RULES = {"linear": Epsilon(1e-12), "sum": Epsilon(1e-12)}


def chain(steps: int):
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, dtype=D, requires_grad=True)
    w = torch.randn(3, 3, dtype=D) / 3
    x = x0
    for _ in range(steps):
        x = torch.tanh(x @ w + x) * 0.5
    return x0, x.sum(1, keepdim=True)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_250, 2_500, 5_000, 12_500, 25_000])
    ap.add_argument("--out", default="results/scaling.md")
    args = ap.parse_args()
    rows = []
    for steps in args.sizes:
        x0, y = chain(steps)
        att = dynamiclrp.propagate(y, target=0, wrt=[x0], rules=RULES)  # warm-up, and the node count
        nodes = att.stats.nodes
        t_lrp = median_time(lambda y=y, x0=x0: dynamiclrp.propagate(y, target=0, wrt=[x0], rules=RULES), args.repeats)
        t_grad = median_time(lambda y=y, x0=x0: torch.autograd.grad(y.sum(), x0, retain_graph=True), args.repeats)
        rows.append((steps, nodes, t_lrp, t_grad, t_lrp / nodes * 1e6))
        print(f"steps {steps:>6}  nodes {nodes:>7}  propagate {t_lrp:7.3f} s  grad {t_grad:7.3f} s  "
              f"{t_lrp / nodes * 1e6:6.1f} µs/node", flush=True)
    per_node = [r[4] for r in rows]
    spread = max(per_node) / min(per_node)
    lines = [
        "# Cost against graph size (benchmarks/scaling.py)",
        "",
        f"torch {torch.__version__}, 1 thread, CPU; residual tanh chain on a 2 x 3 input (four nodes a block), "
        f"median of {args.repeats}. Linear in nodes means a flat time per node.",
        "",
        "| blocks | graph nodes | propagate (s) | autograd.grad (s) | µs per node | propagate / grad |",
        "|---|---|---|---|---|---|",
        *[f"| {s} | {n} | {t:.3f} | {g:.3f} | {u:.1f} | {t / g:.1f}x |" for s, n, t, g, u in rows],
        "",
        f"Time per node varies by a factor of {spread:.2f} from the smallest to the largest graph "
        f"({'linear' if spread < 1.5 else 'NOT linear'}: PASS if < 1.5).",
    ]
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"per-node spread {spread:.2f} ({'PASS' if spread < 1.5 else 'MISS'}); wrote {args.out}")


if __name__ == "__main__":
    main()
