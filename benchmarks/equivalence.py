"""Equivalence table: our presets against zennit 0.5.1, LXT 2.1 and Captum 0.9.0 on the same models and inputs.

Usage: ``python benchmarks/equivalence.py [--out results/equivalence.md] [--parts zennit,pretrained,captum,lxt]``
(float64, random weights or the two pretrained models, a batch of 2-3 with a different target per row). Each row:
model, preset, anchor, max |ours − anchor| / max |anchor|, and the sum of relevance of each. The cases are those of
tests/test_compare_*.py (which assert the bounds and the documented differences).
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
    from test_compare_zennit import imagenet_photos, zbox_vs_zennit

    x, low, high = imagenet_photos()
    for name, canonizer in (("vgg16", VGGCanonizer), ("vgg16_bn", VGGCanonizer), ("resnet50", ResNetCanonizer)):
        torch.manual_seed(0)
        model = _randomise_batch_norms(getattr(torchvision.models, name)(weights=None).double().eval(), 0.0)
        ours, theirs = zbox_vs_zennit(model, [canonizer()], x, low, high, torch.tensor([281, 967]))
        row(f"{name} + {canonizer.__name__}, 224², 2 photos", "epsilon_gamma_box", "zennit", ours, theirs,
            "box bounds of [0, 1] pixels after ImageNet normalisation; BN eps 0")


def pretrained_rows():
    import test_compare_pretrained as tp

    name = "EfficientNet-Lite0 (pretrained), 224², 2 photos"
    for preset in ("epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"):
        note = "stem z-box bounds of [0, 1] pixels as the preset's input rule" if preset == "epsilon_gamma_box" else ""
        row(name, preset, "zennit + BN merge + skip Sum", tp.our_result(preset), tp.zennit_result(preset),
            "BN eps folded into the running variance. " + note)
    row(name, "epsilon_plus_flat", "zennit + BN merge + skip Sum", tp.our_result("epsilon_plus_flat"),
        tp.zennit_result("epsilon_plus_flat"), "flat rule on the zero-padded stem: ones on the image only")
    row(name, "epsilon_gamma_box, z-box by module", "zennit + BN merge + skip Sum",
        tp.our_result("epsilon_gamma_box", "-by-module"), tp.zennit_result("epsilon_gamma_box"),
        "the stem's z-box given by module instead")
    row(name, "epsilon_plus", "zennit + BN merge + skip Sum", tp.our_result("epsilon_plus", fold_eps=False),
        tp.zennit_result("epsilon_plus", fold_eps=False),
        "real BN eps 1e-3: zennit keeps it after merging (documented)")
    row(name, "epsilon_plus", "zennit + BN merge, no skip canonizer", tp.our_result("epsilon_plus"),
        tp.zennit_result("epsilon_plus", skip_canonizer=False),
        "zennit gives both branches of an unwrapped skip addition the full relevance (documented)")


def lxt_rows():
    from test_compare_lxt import CASES

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = pathlib.Path(__file__).resolve().parents[1] / "tests" / "lxt_case.py"
    cases = [(f"{m} ({a})", (m, p, a), "token relevance") for m, p, a in CASES]
    cases += [(f"MiniLM (pretrained, {a}), 2 sentences", ("minilm", "attnlrp", a),
               "token relevance; random head on the mean-pooled embedding") for a in ("eager", "sdpa")]
    cases += [(f"ViT-B/16 ({n}², {(n // 16) ** 2} patches)", ("vit", "cp_lrp", str(n)),
               "pixel relevance; LXT's ViT recipe: CP-LRP attention + zennit γ 0.25 conv / 0.05 linear")
              for n in (64, 224)]
    for label, args, note in cases:
        done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                              timeout=1800)
        preset = args[1] + (" + γ conv/dense" if args[0] == "vit" else "")
        if done.returncode:
            ROWS.append(f"| {label} | {preset} | LXT | error | | | {done.stderr.strip()[-80:]} |")
            continue
        rel, seed_ours, seed_lxt, sum_ours, sum_lxt = map(float, done.stdout.split()[-5:])
        ROWS.append(f"| {label} | {preset} | LXT | {rel:.1e} | {sum_ours:.6g} | {sum_lxt:.6g} "
                    f"| {note}; seeds {seed_ours:.6g} / {seed_lxt:.6g} |")
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
    from test_compare_captum import GAMMA_CASES, _captum_gamma, _ours_gamma, _residual_case

    for case, make in GAMMA_CASES.items():
        model, x, target = make()
        row(case, "epsilon_gamma_box, γ 0.25 conv, ε 1e-9", "Captum LRP GammaRule", _ours_gamma(model, x, target),
            _captum_gamma(model, x, target), "ε on the input layer")
    model, x, target = _setup("cnn", bias=False)
    x = x.abs().clamp(max=1)
    row("cnn (no bias), x in [0, 1]", "γ on the input layer too", "Captum LRP GammaRule",
        _ours_gamma(model, x, target, first=True), _captum_gamma(model, x, target, first=True))
    model, x, target = _setup("cnn", bias=True)
    row("cnn (biases of both signs)", "epsilon_gamma_box, γ 0.25 conv, ε 1e-9", "Captum LRP GammaRule",
        _ours_gamma(model, x, target), _captum_gamma(model, x, target),
        "Captum keeps b, zennit and we use b + γb⁺ (documented)")
    model, x, target = _setup("cnn", bias=False)
    row("cnn (no bias), signed x", "γ on the input layer too", "Captum LRP GammaRule",
        _ours_gamma(model, x, target, first=True), _captum_gamma(model, x, target, first=True),
        "Captum's γ is not sign-aware (documented)")
    for name in ("chain", "residual", "resnet18"):
        model, x, target, logit, captum, _ = _residual_case(name)
        ours = _ours(model, x, target)
        note = f"logits {', '.join(f'{v:.4g}' for v in logit.tolist())}; Σ per row ours " + ", ".join(
            f"{v:.4g}" for v in ours.flatten(1).sum(1).tolist()) + ", Captum " + ", ".join(
            f"{v:.4g}" for v in captum.flatten(1).sum(1).tolist())
        if name != "chain":
            note += " -- Captum creates relevance at skip additions, silently (documented)"
        row(f"{name} (no biases)", "epsilon (1e-9)", "Captum LRP", ours, captum, note)


NOTES = """## Notes

**Captum's γ rule.** Captum 0.9.0's `GammaRule` replaces the weight by w + γw⁺ and leaves the bias alone, whatever
the signs of the inputs and of the output (the textbook γ-rule, meant for inputs ≥ 0 and positive outputs). zennit's
`Gamma`, which `epsilon_gamma_box` reproduces, is sign-aware (x⁻ pairs with w + γw⁻, negative outputs are explained
by w + γw⁻) and modifies the bias like the weights (b + γb⁺). They coincide where those differences vanish: inputs ≥ 0
at every γ layer (after a ReLU, or pixels in [0, 1] at the input layer), biases ≤ 0 and relevance only at positive
outputs (a ReLU after each γ layer). The table shows both: exact there (random torchvision VGG16 has zero biases),
and 4e-2 with positive biases, 1.0 with signed inputs at a γ layer (`tests/test_compare_captum.py`).

**EfficientNet-Lite0 and zennit.** zennit needs two canonizers for this model (`tests/test_compare_pretrained.py`):
`NamedMergeBatchNorm` with explicit conv → BN pairs (`SequentialMergeBatchNorm` finds no pair, because every conv is
a `Conv2dStaticSamePadding` with a `static_padding` child, so never the leaf just before a BN), and an
`AttributeCanonizer` routing the 9 skip additions through zennit's `Sum` module (without it zennit's gradient gives
both branches of `x + inputs` the full relevance: 0.98 relative difference, Σ 69× ours). Batch-norm eps is 1e-3 in
this model and some running variances are 0 (dead channels), so eps cannot be set to 0; the exact rows fold eps
into the running variance (the same function) and the "real BN eps" row shows zennit's leftover eps. The stem conv
reads an explicitly zero-padded image (`ZeroPad2d((0, 1, 0, 1))`, TF "same" padding). zennit's first-layer rules act
on the module's input and pad their own surrogates with zeros. Ours find the model input through the zero padding
(`ConstantPadNdBackward0`) and apply the input rule to the image, with the padding folded into the layer's linear
map (`ops/linear.py: _zero_padded_input`): the same thing, exact. (Before that, found by these tests, the stem got
γ instead of the z-box, 1.08 relative, and the flat rule counted the padding as inputs, 2.7e-2.)

**MiniLM.** The pretrained all-MiniLM-L6-v2 is a `BertModel` without logits. The explained output is a fixed random
linear head (3 outputs, no bias, seed 0) on the model's own sentence embedding, the mask-weighted mean of
`last_hidden_state` (what sentence-transformers computes), target 0 for the first sentence and 2 for the second;
two sentences of different length, padded, with the attention mask. LXT's relevance is input × modified gradient at
the word embeddings with the head's output as seed; ours is `att.tokens` with seed = the output value. LXT 2.1 has
no CP-LRP for BERT, so only AttnLRP is compared.

**ViT-B/16.** LXT's recipe for torchvision's ViT (its `examples/vit_torch.py`): `monkey_patch(vision_transformer)`
(CP-LRP inside the attention, GELU as identity, layer norm linearised), `monkey_patch_zennit` and zennit `Gamma` on
`Conv2d` (0.25 here) and `Linear` (0.05 here). torchvision's attention calls `F.multi_head_attention_forward` with its
projection weights and never calls its `out_proj` module, so zennit's γ never applies to the q/k/v and output
projections: LXT explains them by gradient × input (ε = 0). Ours: `cp_lrp` with `Gamma(0.25)` for conv and
`Gamma(0.05)` for dense, and `module_rules` giving each `self_attention` ε → 0 for its dense ops (without them, γ
on those projections too, the result differs from LXT's by 0.73 relative). Random weights
(torchvision initialises the classifier to zero, so it is drawn at random), at 224² here and at `image_size=64`
(16 patches + the class token) in the test, which keeps CI time down (224² takes about 40 s of CPU).

## Captum's silent results on residual networks

Captum 0.9.0's `LRP` propagates relevance module by module with tensor hooks. An addition that is not a module -- the
skip connection of every ResNet block, `out += identity` -- is invisible to it, and what reaches the two branches is
neither conserved nor even the "full relevance to each branch" of an unwrapped addition in zennit. Nothing warns;
only the convergence delta, if one asks for it, shows the gap. On a network without biases the ε-rule with a tiny ε
is conservative, so Σ relevance must equal the explained logit:

```python
import torch
from torch import nn
from captum.attr import LRP

class Residual(nn.Module):  # no biases: ε-LRP must conserve relevance
    def __init__(self):
        super().__init__()
        self.c0, self.r0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU()
        self.c1, self.r1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU()
        self.c2, self.r2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3, bias=False)

    def forward(self, x):
        h = self.r0(self.c0(x))
        h = self.r2(self.c2(self.r1(self.c1(h))) + h)  # the skip addition
        return self.fc(self.pool(h).flatten(1))

torch.manual_seed(0)
model = Residual().double().eval()
x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
target = torch.tensor([0, 2])
print(model(x).gather(1, target[:, None]).squeeze(1))        # logits   0.1028, 0.2106
rel = LRP(model).attribute(x, target=target)
print(rel.flatten(1).sum(1))                                  # Σ Captum 0.1749, 0.3471 (no warning)
# dynamiclrp.explain(model, x, target=target, preset="epsilon").inputs[0].flatten(1).sum(1) -> 0.1028, 0.2106
```

Without the skip addition Captum and dynamiclrp agree to 1e-16 (the "chain" row). On torchvision's resnet18 (random
weights, batch norms at their defaults, i.e. a per-channel scaling, classifier bias 0) the error compounds over the
8 blocks and Captum's Σ relevance is off by orders of magnitude (the "resnet18" row). The ReLU module that
torchvision's blocks call twice is not the cause: the same network with a separate ReLU per call gives Captum's
numbers to the last bit. `tests/test_compare_captum.py::test_captum_lrp_residual_documented_difference` asserts that
ours is conservative there, Captum's is not, and Captum's convergence delta equals logit − Σ.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="results/equivalence.md")
    ap.add_argument("--parts", default="zennit,pretrained,captum,lxt")
    args = ap.parse_args()
    torch.set_num_threads(1)
    parts = {"zennit": zennit_rows, "pretrained": pretrained_rows, "captum": captum_rows, "lxt": lxt_rows}
    for part in (parts[p] for p in args.parts.split(",")):
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
             "dynamiclrp routes relevance exactly (with Captum's max-pool ε → 0 they are equal).", "", NOTES]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines[-2:]))


if __name__ == "__main__":
    main()
