"""Equivalence table: our presets against zennit 0.5.1, LXT 2.1 and Captum 0.9.0 on the same models and inputs.

Usage: ``python benchmarks/equivalence.py [--out results/equivalence.md]`` (float64, random weights, a batch of
2-3 with a different target per row). Each row: model, preset, anchor, max |ours − anchor| / max |anchor|, and
the sum of relevance of each. The cases are those of tests/test_compare_*.py (which assert the bounds).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import dynamiclrp  # noqa: E402

warnings.simplefilter("ignore")
D = torch.float64
ROWS: list[str] = []


def row(model, preset, anchor, ours, theirs, note=""):
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    ROWS.append(f"| {model} | {preset} | {anchor} | {rel:.1e} | {float(ours.sum()):.6g} | {float(theirs.sum()):.6g} "
                f"| {note} |")
    print(ROWS[-1], flush=True)


def zennit_rows():
    import torchvision
    from zennit.attribution import Gradient
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    from test_compare_zennit import COMPOSITES, COMPOSITES_CANON, _cnn, _randomise_batch_norms

    x = torch.randn(3, 3, 8, 8, dtype=D, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 3, 0])
    for bias in (False, True):
        for preset, make in COMPOSITES.items():
            model = _cnn(bias)
            with Gradient(model=model, composite=make()) as attributor:
                _, theirs = attributor(x.clone().requires_grad_(), torch.eye(5, dtype=D)[target])
            ours = dynamiclrp.explain(model, x, target=target, preset=preset, seed="one").inputs[0]
            row(f"CNN ({'bias' if bias else 'no bias'})", preset, "zennit", ours, theirs)
    x = torch.randn(2, 3, 64, 64, dtype=D, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([1, 3])
    for name, canonizer in (("vgg11_bn", VGGCanonizer), ("resnet18", ResNetCanonizer), ("resnet50", ResNetCanonizer)):
        for eps in (0.0, 1e-5):
            for preset, make in COMPOSITES_CANON.items():
                torch.manual_seed(0)
                model = _randomise_batch_norms(getattr(torchvision.models, name)(weights=None).double().eval(), eps)
                with Gradient(model=model, composite=make([canonizer()])) as attributor:
                    _, theirs = attributor(x.clone().requires_grad_(), torch.eye(1000, dtype=D)[target])
                ours = dynamiclrp.explain(model, x, target=target, preset=preset, seed="one").inputs[0]
                note = "zennit keeps BN eps after merging (documented)" if eps else "BN eps 0"
                row(f"{name} + {canonizer.__name__}", preset, "zennit", ours, theirs, note)


def lxt_rows():
    from test_compare_lxt import CASES

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = pathlib.Path(__file__).resolve().parents[1] / "tests" / "lxt_case.py"
    for model, preset, attn in CASES:
        done = subprocess.run([sys.executable, str(script), model, preset, attn], capture_output=True, text=True,
                              env=env, timeout=600)
        if done.returncode:
            ROWS.append(f"| {model} ({attn}) | {preset} | LXT | error | | | {done.stderr.strip()[-80:]} |")
            continue
        rel, seed_ours, seed_lxt = map(float, done.stdout.split()[-3:])
        ROWS.append(f"| {model} ({attn}) | {preset} | LXT | {rel:.1e} | seed {seed_ours:.6g} | seed {seed_lxt:.6g} "
                    f"| token relevance |")
        print(ROWS[-1], flush=True)


def captum_rows():
    from captum.attr import InputXGradient

    from test_compare_captum import _captum_lrp, _ours, _setup

    for name, bias in (("cnn", False), ("cnn", True), ("vgg11", True)):
        model, x, target = _setup(name, bias)
        row(f"{name} ({'bias' if bias else 'no bias'})", "epsilon (1e-9)", "Captum LRP, max-pool ε→0",
            _ours(model, x, target), _captum_lrp(model, x, target, maxpool_eps=1e-30))
        model, x, target = _setup(name, bias)
        row(f"{name} ({'bias' if bias else 'no bias'})", "epsilon (1e-9)", "Captum LRP (default)",
            _ours(model, x, target), _captum_lrp(model, x, target), "Captum's ε on max-pooling (documented)")
        if name == "cnn":
            ixg = InputXGradient(model).attribute(x.clone().requires_grad_(), target=target)
            row(f"cnn ({'bias' if bias else 'no bias'})", "epsilon (ε→0)", "Captum InputXGradient",
                _ours(model, x, target, eps=1e-15), ixg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="results/equivalence.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for part in (zennit_rows, captum_rows, lxt_rows):
        try:
            part()
        except ImportError as err:
            ROWS.append(f"| {part.__name__} | | | skipped: {err} | | | |")
    lines = [f"# Equivalence with zennit, LXT and Captum (torch {torch.__version__}, float64)", "",
             "| model | preset | anchor | max rel. difference | Σ ours | Σ anchor | note |",
             "|---|---|---|---|---|---|---|", *ROWS, "",
             "Differences by design, each asserted in tests/test_compare_*.py: zennit's MergeBatchNorm resets a merged "
             "batch norm to identity but keeps its eps, so the canonized model divides by sqrt(1 + eps) after every "
             "merged layer (with eps 0 the results are equal); Captum applies its ε-rule to max-pooling, where "
             "dynamiclrp routes relevance exactly (with Captum's max-pool ε → 0 they are equal).", ""]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines[-2:]))


if __name__ == "__main__":
    main()
