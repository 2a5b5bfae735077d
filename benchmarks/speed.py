"""Time of one explanation against the gradient pass, same run, with zennit and Captum as anchors.

Usage: ``python benchmarks/speed.py [--models vgg16 resnet50] [--reps 5] [--threads 1] [--out results/speed.md]``.

Ratios are to "full" (forward + backward with parameter gradients) and to the "floor" (forward + the gradient
with respect to the input only, parameters frozen), medians of ``--reps`` interleaved repetitions after a
warm-up, batch 1 × 3 × 224 × 224, random weights. zennit runs its composites with the canonizer for the model;
Captum runs ``LRP`` with its default ε-rule (VGG only: Captum's LRP does not support ResNet's additions).
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import statistics
import time
import warnings

import torch
import torchvision

import dynamiclrp

warnings.simplefilter("ignore")


def _full(model, x):
    def run():
        xx = x.clone().requires_grad_()
        y = model(xx)
        y[0, y[0].argmax()].backward()
        model.zero_grad(set_to_none=True)

    return run


def _floor(model, x):
    def run():
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        xx = x.clone().requires_grad_()
        y = model(xx)
        torch.autograd.grad(y[0, y[0].argmax()], xx)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)

    return run


def _ours(model, x, preset):
    return lambda: dynamiclrp.explain(model, x, preset=preset, ledger=False, check_finite=False)


def _zennit(model, x, name, composite):
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonGammaBox, EpsilonPlus
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    canonizer = ResNetCanonizer() if name.startswith("resnet") else VGGCanonizer()
    make = {"EpsilonPlus": lambda: EpsilonPlus(canonizers=[canonizer]),
            "EpsilonGammaBox": lambda: EpsilonGammaBox(low=-3.0, high=3.0, canonizers=[canonizer])}[composite]

    def run():
        with torch.no_grad():
            target = model(x).argmax(1)
        with Gradient(model=model, composite=make()) as attributor:
            attributor(x.clone().requires_grad_(), torch.eye(1000)[target])

    return run


def _captum(model, x):
    from captum.attr import LRP

    def run():
        with torch.no_grad():
            target = int(model(x).argmax(1))
        LRP(model).attribute(x.clone().requires_grad_(), target=target)

    return run


def _model(name):
    model = getattr(torchvision.models, name)(weights=None).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False  # Captum needs out-of-place ReLUs; the same model for every method
    return model


def bench(name, reps):
    torch.manual_seed(0)
    model = _model(name)
    x = torch.randn(1, 3, 224, 224)
    methods = {"full fwd+bwd": _full(model, x), "floor (input grad)": _floor(model, x)}
    for preset in ("epsilon", "epsilon_plus", "epsilon_gamma_box"):
        methods[f"dynamiclrp {preset}"] = _ours(model, x, preset)
    with contextlib.suppress(ImportError):  # the anchors are optional
        methods["zennit EpsilonPlus"] = _zennit(model, x, name, "EpsilonPlus")
        methods["zennit EpsilonGammaBox"] = _zennit(model, x, name, "EpsilonGammaBox")
    if name.startswith("vgg"):
        with contextlib.suppress(ImportError):
            methods["Captum LRP (ε)"] = _captum(model, x)
    for f in methods.values():  # warm-up
        f()
    times = {k: [] for k in methods}
    for _ in range(reps):  # interleaved
        for k, f in methods.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="*", default=["vgg16", "resnet50"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/speed.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"# Speed, CPU, {args.threads} thread(s), batch 1 × 224², medians of {args.reps} interleaved runs "
             f"(torch {torch.__version__})", "", "| model | method | median s | × full | × floor |",
             "|---|---|---|---|---|"]
    for name in args.models:
        med = bench(name, args.reps)
        full, floor = med["full fwd+bwd"], med["floor (input grad)"]
        for k, v in med.items():
            lines.append(f"| {name} | {k} | {v:.3f} | {v / full:.2f} | {v / floor:.2f} |")
            print(lines[-1], flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
