"""Command line: ``dynamiclrp demo | explain image | explain text | coverage | presets``.

Examples::

    dynamiclrp demo --out demo/
    dynamiclrp explain image torchvision:resnet18 --weights resnet18.safetensors photos/ --out heatmaps/
    dynamiclrp explain image efficientnet-lite0 cat.jpg --preset epsilon_plus
    dynamiclrp explain text path/to/hf-model "A sentence to classify." --out tokens.html
    dynamiclrp explain text path/to/qa-model --question "Who?" "Context that holds the answer."
    dynamiclrp explain text path/to/causal-lm "The capital of France is" --generate 3
    dynamiclrp coverage timm:resnet18 --input-shape 1,3,224,224
    dynamiclrp presets

Errors (a missing file, an unknown model, an input the model cannot take) print one line on stderr and exit with
status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_ERROR = 1


class CLIError(Exception):
    """An error with a message meant for the user (printed without traceback)."""


_SUBTRACT_HELP = ("read residual branches off the saved sums (a' = s - b) instead of recomputing their last layer: "
                  "faster, within an ulp of each sum, reported as an approximation")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    p = argparse.ArgumentParser(
        prog="dynamiclrp", parents=[common],
        description="Layer-wise Relevance Propagation for any PyTorch model, one autograd operation at a time.",
        epilog="Run 'dynamiclrp COMMAND --help' for the options of a command.")
    from . import __version__
    from .presets import presets

    names = ", ".join(presets())

    p.add_argument("--version", action="version", version=f"dynamiclrp {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", parents=[common], help="offline demo: photos and sentences explained, one HTML page",
                       description="Explain photos with a pretrained EfficientNet-Lite0 and sentences with a "
                                   "sentiment classifier, offline; write heatmaps, a conservation summary, coverage "
                                   "tables and index.html into --out.")
    d.add_argument("--out", default="dynamiclrp-demo", help="output folder (default: %(default)s)")
    d.add_argument("--quick", action="store_true", help="two photos and two sentences, no preset comparison")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("explain", parents=[common], help="explain an image or a text model",
                       description="Explain an image classifier (explain image) or a Hugging Face text model "
                                   "(explain text).")
    esub = e.add_subparsers(dest="kind", metavar="KIND")
    esub.required = True

    ei = esub.add_parser("image", parents=[common], help="heatmaps for image classifiers",
                         description="Explain an image classifier's prediction (or --target) on image files or "
                                     "folders; write one PNG per image with input, heatmap, overlay and a colour "
                                     "bar.")
    ei.add_argument("model", help="torchvision:NAME, timm:NAME, file.py:factory, or efficientnet-lite0 (pretrained)")
    ei.add_argument("images", nargs="+", help="image files or folders")
    ei.add_argument("--weights", help=".safetensors file or a state dict (loaded with weights_only=True)")
    ei.add_argument("--target", type=int, help="class index to explain (default: the prediction)")
    ei.add_argument("--preset", default="epsilon_gamma_box", help=f"rule preset: {names} (default: %(default)s)")
    ei.add_argument("--out", default="dynamiclrp-heatmaps",
                    help="output folder, or a .png file for a single image (default: %(default)s)")
    ei.add_argument("--size", type=int, default=224, help="input size after resize and centre crop (default 224)")
    ei.add_argument("--grayscale", action="store_true", help="read images as one channel")
    ei.add_argument("--mean", type=_floats, default=None, help="normalisation mean, e.g. 0.5,0.5,0.5 "
                                                              "(default: the timm model's, else ImageNet's)")
    ei.add_argument("--std", type=_floats, default=None, help="normalisation std (default: ImageNet's)")
    ei.add_argument("--cmap", default="bwr", help="colour map: bwr, rdbu, coldhot, gray, reds (default bwr)")
    ei.add_argument("--npy", action="store_true", help="also save the relevance as .npy")
    ei.add_argument("--subtract-addends", action="store_true", help=_SUBTRACT_HELP)

    et = esub.add_parser("text", parents=[common], help="token heatmaps for Hugging Face models",
                         description="Explain a Hugging Face model saved in a local folder (with its tokenizer): "
                                     "sequence classification, extractive QA (start and end), or a causal LM "
                                     "(a given next token, the predicted one, or each token of a generation). "
                                     "Prints a coloured terminal rendering; --out writes HTML.")
    et.add_argument("model", help="folder of a Hugging Face model and tokenizer (save_pretrained)")
    et.add_argument("text", nargs="+", help="text(s); for QA the context")
    et.add_argument("--task", choices=("auto", "classification", "qa", "causal-lm"), default="auto",
                    help="what the model does (default: from config.architectures)")
    et.add_argument("--question", help="QA: the question (the text is the context)")
    et.add_argument("--target", type=int, help="classification: class index (default: the prediction)")
    et.add_argument("--next-token", help="causal LM: the next token to explain (default: the prediction)")
    et.add_argument("--generate", type=int, default=0, metavar="N",
                    help="causal LM: greedily generate N tokens and explain each")
    et.add_argument("--preset", default="attnlrp", help=f"rule preset: {names} (default: %(default)s)")
    et.add_argument("--subtract-addends", action="store_true", help=_SUBTRACT_HELP)
    et.add_argument("--out", help="write the token heatmaps to this HTML file")
    et.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                    help="colours in the terminal rendering (default: auto, when stdout is a terminal)")

    c = sub.add_parser("coverage", parents=[common], help="which op of a model's graph gets which rule",
                       description="Run the model once on example input and list every autograd node type, its "
                                   "count and the rule the preset applies; exit status 3 when an op has no rule.")
    c.add_argument("model", help="torchvision:NAME, timm:NAME, file.py:factory, efficientnet-lite0, or a Hugging "
                                 "Face model folder")
    c.add_argument("--weights", help="weights file for image models")
    c.add_argument("--input-shape", type=_ints, default=None,
                   help="input shape for image models, e.g. 1,3,224,224 (default)")
    c.add_argument("--text", default="Layer-wise relevance propagation explains predictions.",
                   help="example text for Hugging Face models")
    c.add_argument("--preset", default="epsilon", help=f"preset whose rules are listed: {names} "
                                                     "(default: %(default)s)")

    pr = sub.add_parser("presets", parents=[common], help="list the presets and their rules",
                        description="List the registered presets and which rule each applies to each op family.")
    pr.add_argument("name", nargs="?", help="show one preset only")
    return p


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _ints(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in s.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {s!r}")
    return vals


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dynamiclrp`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        handler = {"demo": cmd_demo, "coverage": cmd_coverage, "presets": cmd_presets}.get(args.command)
        if args.command == "explain":
            handler = cmd_explain_image if args.kind == "image" else cmd_explain_text
        return int(handler(args) or 0)
    except BrokenPipeError:  # output piped into head & co.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("dynamiclrp: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line for the user, traceback with --debug
        if debug:
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, KeyError) and msg.startswith(("'", '"')):
            msg = msg[1:-1]
        kind = "" if isinstance(err, CLIError) or _is_ours(err) else f"{type(err).__name__}: "
        print(f"dynamiclrp: error: {kind}{msg} (--debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR


def _is_ours(err: Exception) -> bool:
    from .errors import DynamicLRPError

    return isinstance(err, (DynamicLRPError, FileNotFoundError, KeyError))


# ------------------------------------------------------------------------------------------------------ commands


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .presets import FALLBACK, get_preset, presets

    items = [get_preset(args.name)] if args.name else list(presets().values())
    fams = ("input", "conv", "dense", "linear", "bias", "sum", "product", "attention", "softmax", "norm")
    for pre in items:
        print(f"{pre.name}: {pre.description}")
        for fam in fams:
            try:
                rule = pre.rule(fam)
            except KeyError:
                continue
            via = "" if fam in pre.families else f"  (falls back to {FALLBACK.get(fam, '?')})"
            print(f"    {fam:<10} {rule!r}{via}")
        for kind, rules in pre.kinds.items():
            for fam, rule in rules.items():
                print(f"    {kind}/{fam}: {rule!r}")
        print()
    print("Families: input = first linear op on a model input (if a preset has none: its own conv/dense rule), "
          "conv/dense = convolutions/matrix products with a weight, bias = split-off bias additions, "
          "sum = add/sum/mean/pooling, product = products of activations, attention = attention weights × values, "
          "softmax, norm = normalisation layers.")
    return 0


def _load_image_model(source: str, weights: str | None) -> Any:
    from .integrations.models import load_model

    if weights is not None and not Path(weights).is_file():
        raise CLIError(f"no such weights file: {weights}")
    return load_model(source, weights)


def _forward_check(model: Any, x: Any) -> Any:
    import torch

    try:
        with torch.no_grad():
            return model(x)
    except (RuntimeError, ValueError, IndexError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIError(f"the model cannot take an input of shape {tuple(x.shape)}: {first[:300]}") from None


def cmd_explain_image(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from . import viz
    from .api import explain
    from .integrations.models import IMAGENET_MEAN, IMAGENET_STD, image_files, imagenet_labels, load_image
    from .presets import get_preset

    get_preset(args.preset)
    files = image_files(args.images)
    model = _load_image_model(args.model, args.weights)
    cfg = getattr(model, "pretrained_cfg", None) or {}  # timm models say how they normalise
    mean = args.mean or (tuple(cfg["mean"]) if "mean" in cfg else IMAGENET_MEAN if not args.grayscale else (0.5,))
    std = args.std or (tuple(cfg["std"]) if "std" in cfg else IMAGENET_STD if not args.grayscale else (0.5,))
    out = Path(args.out)
    single_file = out.suffix.lower() == ".png"
    if single_file and len(files) > 1:
        raise CLIError(f"--out {out} is one PNG file but {len(files)} images were given; pass a folder")
    labels = None
    for f in files:
        x, shown = load_image(f, args.size, mean, std, grayscale=args.grayscale)
        logits = _forward_check(model, x)
        logits = logits if isinstance(logits, torch.Tensor) else getattr(logits, "logits", logits)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise CLIError("the model's output is not (batch, classes) logits")
        n = logits.shape[-1]
        if labels is None:
            labels = imagenet_labels() if n == 1000 else None
        if args.target is not None and not 0 <= args.target < n:
            raise CLIError(f"--target {args.target} is out of range: the model has {n} classes")
        att = explain(model, x, target=args.target, preset=args.preset, subtract_addends=args.subtract_addends)
        cls = int(att.outputs[0][0].abs().argmax()) if args.target is None else args.target
        name = labels[cls] if labels else f"class {cls}"
        logit = float(logits[0, cls])
        title = f"{f.name}: {name} (logit {logit:.3g})"
        path = out if single_file else out / f"{f.stem}_lrp.png"
        viz.save_heatmap_figure(path, [shown], [att.inputs[0][0]], [title], cmap=args.cmap)
        c = att.conservation()
        what = f"{name} (class {cls}, " if labels else f"class {cls} ("
        print(f"{f}: explained {what}logit {logit:.4g}); relevance: inputs {c['inputs']:.4g}, "
              f"parameters {c['parameters']:.4g}, absorbed {c['absorbed']:.4g} -> {path}")
        if args.npy:
            np.save(path.with_suffix(".npy"), att.inputs[0][0].detach().cpu().numpy())
    return 0


def _hf_model(folder: str, task: str, base_ok: bool = False) -> tuple[Any, Any, str]:
    p = Path(folder)
    if not p.is_dir():
        raise CLIError(f"no such model folder: {folder} (expected a Hugging Face save_pretrained folder)")
    if not (p / "config.json").is_file():
        raise CLIError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        import transformers
        from transformers import AutoConfig, AutoTokenizer
    except ImportError:
        raise CLIError("explaining text models needs transformers: pip install 'dynamiclrp[hf]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # transformers 5 shows one while loading weights
    config = AutoConfig.from_pretrained(p, local_files_only=True)
    if task == "auto":
        arch = (getattr(config, "architectures", None) or [""])[0]
        if arch.endswith("ForQuestionAnswering"):
            task = "qa"
        elif arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
            task = "causal-lm"
        elif arch.endswith("ForSequenceClassification"):
            task = "classification"
        elif base_ok:
            task = "base"
        else:
            raise CLIError(f"cannot tell the task from config.architectures ({arch or 'none'}); pass --task")
    auto = {"base": transformers.AutoModel, "qa": transformers.AutoModelForQuestionAnswering,
            "causal-lm": transformers.AutoModelForCausalLM,
            "classification": transformers.AutoModelForSequenceClassification}[task]
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise CLIError(f"cannot load the tokenizer from {folder}: {str(err).splitlines()[0]}") from None
    model = auto.from_pretrained(p, local_files_only=True).eval()
    return model, tok, task


def cmd_explain_text(args: argparse.Namespace) -> int:
    from .integrations import hf
    from .presets import get_preset
    from .viz.text import save_token_html

    get_preset(args.preset)
    model, tok, task = _hf_model(args.model, args.task)
    kw = {"subtract_addends": args.subtract_addends}
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    results: list[hf.TokenRelevance] = []
    if task == "classification":
        if args.question:
            raise CLIError("--question is for QA models")
        n = model.config.num_labels
        if args.target is not None and not 0 <= args.target < n:
            raise CLIError(f"--target {args.target} is out of range: the model has {n} labels")
        ex = hf.explain_text(model, tok, args.text, target=args.target, preset=args.preset, **kw)
        results = ex.rows
    elif task == "qa":
        if not args.question:
            raise CLIError("a QA model needs --question (the text is the context)")
        for context in args.text:
            r = hf.explain_qa(model, tok, args.question, context, preset=args.preset, **kw)
            span = "" if r["end"] >= r["start"] else ": the end comes before the start, no span"
            print(f"answer: {r['answer']!r} (tokens {r['start']}..{r['end']}{span})")
            results += [r["start_relevance"], r["end_relevance"]]
    else:
        for prompt in args.text:
            if args.generate > 0:
                results += hf.explain_generation(model, tok, prompt, args.generate, preset=args.preset, **kw)
            else:
                results.append(hf.explain_next_token(model, tok, prompt, args.next_token, preset=args.preset, **kw))
    for r in results:
        print(f"{r.label}:")
        print("  " + r.ansi(color=color))
    if args.out:
        path = save_token_html(args.out, [r.html() for r in results], f"dynamiclrp: {Path(args.model).name}")
        print(f"wrote {path}")
    return 0


def cmd_coverage(args: argparse.Namespace) -> int:
    import torch

    from .coverage import coverage
    from .presets import get_preset

    get_preset(args.preset)
    if Path(args.model).is_dir():
        if args.input_shape:
            raise CLIError("--input-shape is for image models; Hugging Face models take --text")
        model, tok, _ = _hf_model(args.model, "auto", base_ok=True)
        from .integrations.hf import encode, model_inputs

        inputs: Any = model_inputs(model, encode(tok, [args.text]))
    else:
        model = _load_image_model(args.model, args.weights)
        shape = args.input_shape or (1, 3, 224, 224)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        _forward_check(model, x)
        inputs = x
    report = coverage(model, inputs, preset=args.preset)
    print(report.table())
    return 0 if not report.missing else 3


if __name__ == "__main__":
    sys.exit(main())
