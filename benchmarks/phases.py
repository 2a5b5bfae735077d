"""Where the time of one explanation goes: per engine phase and per op family (issue #8).

Phases: the model's forward (with the graph recorded), reading the graph (``Graph.build``), and the backward
relevance pass, split into the rules' own work per op family and the Promise System's replays. Timed by wrapping
the entry points with ``time.perf_counter`` (CPU, synchronous), medians over ``--reps`` runs.

Where the preset has a gradient form (``attnlrp``, ``cp_lrp``; :mod:`dynamiclrp.gradient_form`) the relevance pass
is one autograd call instead: its total, the hooks' own time per node kind, and the planning of the hooks
(``steps``); ``--gradient-form off`` times the node-by-node pass for the same preset.

Run: ``python benchmarks/phases.py [--models vgg16 resnet50 bert] [--preset epsilon] [--gradient-form auto|off]
[--out results/phases.md]``
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import pathlib
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import dynamiclrp  # noqa: E402
from dynamiclrp import api, engine, graph, promise  # noqa: E402
from dynamiclrp.gradient_form import PreparedPass  # noqa: E402
from dynamiclrp.ops.base import PreHook  # noqa: E402

torch.set_num_threads(1)


def models(names):
    """(label, model, inputs, explain keywords) per name: ``vgg16``, ``resnet50``, ``vit_b_16``, ``bert`` as before,
    or any case of ``benchmarks/speed.py`` (``t5small@s128b1``, ``llama300m``, ...), built as it builds them."""
    import torchvision

    for name in names:
        if name in ("vgg16", "resnet50", "vit_b_16"):
            model = getattr(torchvision.models, name)().eval()
            if name == "vit_b_16":  # torchvision initialises the head to zero: every gradient would be zero
                with torch.no_grad():
                    model.heads.head.weight.normal_(0, 0.05)
                    model.heads.head.bias.normal_(0, 0.05)
            yield name, model, torch.randn(1, 3, 224, 224), {}
        elif name == "bert":
            from transformers import BertConfig, BertForSequenceClassification

            m = BertForSequenceClassification(BertConfig(attn_implementation="eager")).eval()
            yield "bert-base (128 tokens)", m, {"input_ids": torch.randint(0, 30000, (1, 128))}, {}
        else:
            import speed  # noqa: PLC0415 - a sibling script: its cases, built the same way

            case = speed.Case(speed.parse_case(name))
            inputs = case.inputs if isinstance(case.inputs, torch.Tensor) else {**case.inputs, **case.kw}
            yield f"{name} ({case.desc})", case.model, inputs, {"output": case.select}


class Timers:
    def __init__(self):
        self.t = collections.defaultdict(float)

    @contextlib.contextmanager
    def patch(self):
        saved = []

        def wrap(obj, attr, key):
            orig = getattr(obj, attr)
            saved.append((obj, attr, orig))

            def timed(*a, **k):
                t0 = time.perf_counter()
                try:
                    return orig(*a, **k)
                finally:
                    self.t[key(a) if callable(key) else key] += time.perf_counter() - t0

            setattr(obj, attr, timed)

        wrap(api, "_forward", "forward")
        orig_build = graph.Graph.build.__func__
        saved.append((graph.Graph, "build", graph.Graph.build))

        def build(cls, roots, plan=None):
            t0 = time.perf_counter()
            try:
                return orig_build(cls, roots, plan)
            finally:
                self.t["graph"] += time.perf_counter() - t0

        graph.Graph.build = classmethod(build)
        wrap(promise.Promises, "_replay", "promise replays")
        orig_prop = engine.Run.propagate
        saved.append((engine.Run, "propagate", orig_prop))
        timers = self

        def propagate(run, seeds):
            # time each node's rule by its family (replays it triggers are subtracted below)
            specs = {}
            for n in run.graph.nodes:
                if id(n.spec) not in specs:
                    specs[id(n.spec)] = n.spec
            originals = {}
            for sid, spec in specs.items():
                fam = spec.family or type(spec).__name__
                originals[sid] = spec.relevance

                def rel(ctx, _orig=spec.relevance, _fam=fam):
                    t0 = time.perf_counter()
                    r0 = timers.t["promise replays"]
                    try:
                        return _orig(ctx)
                    finally:
                        timers.t[f"rules: {_fam}"] += time.perf_counter() - t0 - (timers.t["promise replays"] - r0)

                spec.relevance = rel
            t0 = time.perf_counter()
            try:
                return orig_prop(run, seeds)
            finally:
                timers.t["relevance pass (total)"] += time.perf_counter() - t0
                for spec in specs.values():
                    del spec.relevance  # back to the class's method

        engine.Run.propagate = propagate
        wrap(api, "prepare_gradient_form", "gradient form: steps")
        orig_grad = api.propagate_gradient_form
        saved.append((api, "propagate_gradient_form", orig_grad))

        def timed_hook(h, key):
            def hook(*a):
                t0 = time.perf_counter()
                try:
                    return h(*a)
                finally:
                    timers.t[key] += time.perf_counter() - t0
            return hook

        def gradient_pass(run, seeds, prepared):
            # each hook timed under its node's kind; the rest of the pass is autograd's own backward (a timed step
            # is a plain hook: no bypass of its node, and nothing a plan keeps)
            kind = {nid: run.graph.nodes[nid].kind for nid, _, _ in prepared.steps}
            steps = [(nid, PreHook(timed_hook(h.hook, f"hooks: {kind[nid]}")) if isinstance(h, PreHook)
                      else timed_hook(h, f"hooks: {kind[nid]}"), ctx) for nid, h, ctx in prepared.steps]
            t0 = time.perf_counter()
            try:
                return orig_grad(run, seeds, PreparedPass(steps, prepared.reason))
            finally:
                timers.t["gradient form: pass (total)"] += time.perf_counter() - t0

        api.propagate_gradient_form = gradient_pass
        try:
            yield
        finally:
            for obj, attr, orig in reversed(saved):
                setattr(obj, attr, orig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vgg16", "resnet50", "bert"])
    ap.add_argument("--preset", default="epsilon")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default="results/phases.md")
    ap.add_argument("--gradient-form", choices=["auto", "off"], default="auto",
                    help="off: gradient_form=False (node by node even where the preset has a gradient form)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kw = {"gradient_form": False} if args.gradient_form == "off" else {}
    lines = [f"# Where the time goes (benchmarks/phases.py, preset `{args.preset}`)", "",
             f"torch {torch.__version__}, CPU, {args.threads} thread(s), medians of {args.reps} runs after a warm-up; "
             "seconds and share of the whole explanation. `rules: <family>` is the rules' own time (replays they "
             "triggered are under `promise replays`); `other` is the engine loop, seeding and bookkeeping.", ""]
    for name, model, x, how in models(args.models):
        call = {**kw, **how}
        dynamiclrp.explain(model, x, preset=args.preset, ledger=False, check_finite=False, **call)  # warm-up
        runs = []
        for _ in range(args.reps):
            timers = Timers()
            with timers.patch():
                t0 = time.perf_counter()
                dynamiclrp.explain(model, x, preset=args.preset, ledger=False, check_finite=False, **call)
                timers.t["total"] = time.perf_counter() - t0
            t = dict(timers.t)
            # per run, then the median: medians of the parts do not add up to the median of the whole, and on a
            # machine that drifts by ±20 % their difference is noise, not overhead
            t["other (api: seeding, results)"] = t["total"] - sum(t.get(k, 0.0) for k in (
                "forward", "graph", "relevance pass (total)", "gradient form: steps", "gradient form: pass (total)"))
            runs.append(t)
        keys = sorted({k for r in runs for k in r}, key=lambda k: -statistics.median(r.get(k, 0) for r in runs))
        med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}
        lines += [f"## {name}", "", "| phase | s | share |", "|---|---|---|"]
        for k in ["total", "forward", "graph", "relevance pass (total)", "promise replays",
                  *[k for k in keys if k.startswith("rules:")], "gradient form: steps", "gradient form: pass (total)",
                  *[k for k in keys if k.startswith("hooks:")], "other (api: seeding, results)"]:
            if k in med:
                lines.append(f"| {k} | {med[k]:.4f} | {med[k] / med['total']:.1%} |")
        lines.append("")
        print("\n".join(lines[-(len(med) + 4):]), flush=True)
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
