"""Peak memory of one explanation against the gradient pass, one fresh process per (model, method) (issue #8).

Usage::

    python benchmarks/memory.py [--cases vgg16 resnet50 vit_b_16 bert@s128b1 llama300m@s128b1 t5small@s128b1]
                                [--jobs 1] [--device cpu] [--out results/memory.md] [--quick]

Cases and methods are those of ``benchmarks/speed.py`` (same models, inputs, explained logits, the same callables).
Each (case, method) runs in a new Python process that imports, builds the model (for an LXT anchor: patches
transformers / torchvision first), reads its resident memory, runs the method **once** (no warm-up) and reads
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the peak resident set size of the whole process. Nothing is
subtracted from the peak; the RSS after the build (current, and the maximum reached while building) is reported
so that the increment of the call is visible. The target compares peaks: each dynamiclrp preset ≤ 1.3× the full
gradient pass. RSS does not depend on CPU load, so ``--jobs 2`` may run two processes side by side.

With ``--device cuda`` (a GPU machine) the same processes report ``torch.cuda.memory_allocated`` after the build
and ``torch.cuda.max_memory_allocated`` after the call (peak statistics reset after the build) instead.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import resource
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import speed  # noqa: E402
import torch  # noqa: E402

warnings.simplefilter("ignore")


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_max_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def methods(spec: dict) -> list[str]:
    """The method names of speed.py for this case (anchors included, those LXT lacks excluded)."""
    name = spec["name"]
    out = ["full", "floor"] + [f"dynamiclrp {p}" for p in speed.OURS.get(name, speed.OURS["text"])]
    for p in speed.OURS.get(name, speed.OURS["text"]):  # a half-precision model: the other relevance dtype
        out += [f"dynamiclrp {p}{suffix}" for suffix in speed.half_rows(spec, p) if suffix != speed.TF32]
    if name in ("vgg16", "resnet50"):  # a plan keeps transformed weights: what a data-set loop holds
        out += ["dynamiclrp epsilon_plus + plan", "dynamiclrp epsilon_alpha2_beta1 + plan"]
        out += ["zennit EpsilonPlus", "zennit EpsilonGammaBox", "zennit EpsilonAlpha2Beta1"]
    if name == "vgg16":
        out.append("Captum LRP (ε)")
    out += {"bert": ["LXT AttnLRP"], "llama300m": ["LXT AttnLRP", "LXT CP-LRP"],
            "llama1b": ["LXT AttnLRP", "LXT CP-LRP"], "vit_b_16": ["LXT CP-LRP"]}.get(name, [])
    return out


def one(spec: dict, method: str, quick: bool, device: str) -> dict:
    """In the child: build, measure, run once, measure."""
    import dynamiclrp  # noqa: F401 - imported by every method's process alike (the same baseline)
    if method.startswith("LXT"):
        speed.lxt_patch(spec, method)
    case = speed.Case(spec, quick, device)
    if method.startswith("LXT"):
        fn = speed.lxt_run(case)
    elif method == "full":
        fn = case.full()
    elif method == "floor":
        fn = case.floor()
    elif method.endswith(" + plan"):  # two calls with one plan: the second reuses it, as a loop does
        once = case.ours(method.split(" ")[1], plan=True)

        def fn():
            once()
            once()
    elif any(method.endswith(suffix) for suffix in speed.SUFFIXES):
        suffix = next(x for x in speed.SUFFIXES if method.endswith(x))
        fn = case.ours(method.split(" ", 1)[1].removesuffix(suffix), **speed.ROW_OPTION[suffix])
    elif method.startswith("dynamiclrp "):
        fn = case.ours(method.split(" ", 1)[1])
    elif method.startswith("zennit "):
        fn = case.zennit(method.split(" ", 1)[1])
    elif method.startswith("Captum"):
        fn = case.captum()
    else:
        raise ValueError(method)
    rec = {"build_now": rss_now_mb(), "build_max": rss_max_mb(), "params": case.nparams, "desc": case.desc}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        rec["cuda_build"] = torch.cuda.memory_allocated() / 2**20
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        rec["cuda_peak"] = torch.cuda.max_memory_allocated() / 2**20
    rec["seconds"] = time.perf_counter() - t
    rec["peak"] = rss_max_mb()
    rec["after"] = rss_now_mb()
    return rec


def spawn(spec: dict, method: str, quick: bool, device: str, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec), method, "--device", device,
           "--threads", str(threads)] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=speed.child_env(threads), timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith("@@mem "):
            return json.loads(line[6:])
        if line.startswith("@@error "):
            return {"error": line[8:]}
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"process exited with {done.returncode}: {tail}"[:200]}


def section(spec: dict, recs: dict, device: str) -> list[str]:
    ok = {k: r for k, r in recs.items() if "error" not in r}
    desc = next((r["desc"] for r in ok.values()), "")
    lines = [f"## {spec['case']}", "", f"- {desc}; one fresh process per method, one call, no warm-up", ""]
    if device == "cuda":
        lines += ["| method | allocated after build MB | peak allocated MB | increment MB | × full (peak) "
                  "| × full (increment) | call s |", "|---|---|---|---|---|---|---|"]
        key_b, key_p = "cuda_build", "cuda_peak"
    else:
        lines += ["| method | RSS after build MB (max during build) | peak RSS MB | increment MB | × full (peak) "
                  "| × full (increment) | call s |", "|---|---|---|---|---|---|---|"]
        key_b, key_p = "build_now", "peak"
    full = ok.get("full")
    for k, r in recs.items():
        if "error" in r:
            lines.append(f"| {k} | **failed**: {r['error'].replace('|', '/')} | – | – | – | – | – |")
            continue
        inc = r[key_p] - r[key_b]
        rp = f"{r[key_p] / full[key_p]:.2f}" if full else "–"
        ri = f"{inc / (full[key_p] - full[key_b]):.2f}" if full and full[key_p] > full[key_b] else "–"
        build = f"{r[key_b]:.0f}" + (f" ({r['build_max']:.0f})" if device != "cuda" else "")
        # the process peak covers the build too: when the build reached it, the call's own peak is at most that
        le = "≤ " if device != "cuda" and r["peak"] <= r["build_max"] + 0.5 else ""
        lines.append(f"| {k} | {build} | {le}{r[key_p]:.0f} | {le}{inc:.0f} | {rp} | {ri} | {r['seconds']:.2f} |")
    if any(r["peak"] <= r["build_max"] + 0.5 for r in ok.values()) and device != "cuda":
        lines += ["", "≤: the process peak was reached while building the model (the call itself stayed below it)."]
    lines.append("")
    for k, r in ok.items():
        if k.startswith("dynamiclrp ") and full:
            ratio = r[key_p] / full[key_p]
            inc = (r[key_p] - r[key_b]) / max(full[key_p] - full[key_b], 1e-9)
            lines.append(f"- {'PASS' if ratio <= 1.3 else 'MISS'} {k.split(' ', 1)[1]} peak ≤ 1.3× full: "
                         f"{ratio:.2f}× (increment over the built model: {inc:.2f}× full's)")
    lines.append("")
    return lines


HEADER = """# Memory: one explanation against the gradient pass ({device})

Written by `benchmarks/memory.py` (issue #8). torch {torch}; models, inputs and methods as in `results/speed.md`
(`benchmarks/speed.py`), random weights. Each row is its own fresh process:

1. import (dynamiclrp in every one; the anchors' processes also import zennit, Captum or LXT) and build the model;
2. {what};
3. one call of the method, without warm-up ("+ plan" rows: two calls sharing one `dynamiclrp.Plan()`, the second
   reusing the weights the first transformed, as a loop over a data set does);
4. {peak}.

"increment" = peak − after build. PASS/MISS compares peaks (nothing subtracted): each dynamiclrp preset ≤ 1.3×
the full gradient pass (forward + backward with parameter gradients); the increment ratio is shown beside it.
"call s" is the wall time of that one cold call, for orientation only (timings are in `results/speed.md`).

"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=["vgg16", "resnet50", "vit_b_16", "bert@s128b1",
                                                    "llama300m@s128b1", "t5small@s128b1"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="model and input dtype")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="processes side by side (RSS does not depend on load)")
    ap.add_argument("--out", default="results/memory.md")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("SPEC", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        try:
            rec = one(json.loads(args.one[0]), args.one[1], args.quick, args.device)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            print(f"@@error {speed.short(e)}", flush=True)
            return
        print("@@mem " + json.dumps(rec), flush=True)
        return
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    what = ("read `torch.cuda.memory_allocated`, reset the peak statistics" if args.device == "cuda"
            else "read the resident set size (`/proc/self/statm`)")
    peak = ("`torch.cuda.max_memory_allocated`" if args.device == "cuda"
            else "`getrusage(RUSAGE_SELF).ru_maxrss` (peak RSS of the process, libraries and model included)")
    out.write_text(HEADER.format(device="GPU" if args.device == "cuda" else "CPU, peak RSS", torch=torch.__version__,
                                 what=what, peak=peak))
    for c in args.cases:
        spec = {**speed.parse_case(c), "device": args.device, "dtype": args.dtype}
        names = methods(spec)
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futs = {m: pool.submit(spawn, spec, m, args.quick, args.device, args.threads) for m in names}
            recs = {m: f.result() for m, f in futs.items()}
        print("@@records " + json.dumps({"case": c, "records": recs}), flush=True)
        text = section(spec, recs, args.device)
        print("\n".join(text), flush=True)
        with out.open("a") as f:
            f.write("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
