"""Time of one explanation against the gradient pass, same run, with zennit, Captum and LXT as anchors (issue #8).

Usage::

    python benchmarks/speed.py [--cases vgg16 resnet50 vit_b_16 bert@s128b1 llama300m@s128b1 t5small@s128b1 ...]
                               [--reps N] [--threads 1] [--presets P ...] [--out results/speed.md] [--append] [--quick]

A case is ``MODEL[@sSEQbBATCH]``: ``vgg16``, ``resnet50``, ``vit_b_16`` (torchvision, random weights, 224², batch
``b``, default 1), ``bert`` (``BertForSequenceClassification(BertConfig())``, BERT-base, 2 labels), ``llama300m``
(``LlamaForCausalLM``: vocab 32000, hidden 1024, 18 layers, 16 heads, intermediate 2816, untied head, ≈ 297 M
parameters), ``t5small`` (``T5ForConditionalGeneration`` as t5-small: d_model 512, 6 + 6 layers, 8 heads, d_ff 2048,
vocab 32128, 32 decoder tokens). Transformers are built from configs with random weights (seed 0), eval mode,
``attn_implementation="eager"`` for ours, the gradient passes and LXT alike (T5 has no SDPA in transformers 4.57).

What is timed (one call each, medians of ``--reps`` interleaved repetitions after one warm-up round):

* ``full``: forward + backward of the explained logit(s) with every parameter requiring grad (parameter grads
  computed, then dropped).
* ``floor``: forward + ``torch.autograd.grad`` of the explained logit(s) with respect to the input only, every
  parameter frozen (token models: with respect to ``inputs_embeds``, the embedding lookup done outside).
* ``dynamiclrp PRESET``: ``dynamiclrp.explain(model, inputs, preset=PRESET, ledger=False, check_finite=False)``,
  forward included (inputs are the image or the token ids); ``+ plan``: the same with one ``dynamiclrp.Plan()``
  reused by every repetition (graph skeleton and transformed weights kept, as in a loop over a data set);
  ``(own process)`` (with ``--isolate``, presets compared with LXT): the same, alone in a process of its own
  started and driven as LXT's are, so that both sides of that comparison run under the same conditions;
  ``+ subtract`` (with ``--subtract-addends``; not VGG): ``subtract_addends=True``, residual branches read off
  the saved sums (an opt-in approximation within an ulp of the sum) instead of replaying their last layer.
* anchors: zennit composites (``EpsilonPlus``, ``EpsilonGammaBox(-3, 3)``, ``EpsilonAlpha2Beta1``) with the
  torchvision canonizer; Captum ``LRP`` (ε, VGG only: it does not support ResNet's additions); LXT 2.1
  (``lxt.efficient``) AttnLRP / CP-LRP in their own processes (LXT patches transformers globally), started once per
  case and driven line by line so that their repetitions interleave with ours, each timed inside its process:
  embedding lookup, forward, backward of the logit with parameters frozen, input × gradient summed per token.
  For ViT-B/16, LXT's torchvision map (CP-LRP in the attention, GELU identity, layer norm linearised) without
  zennit's γ, against our ``cp_lrp``.

The machine's speed drifts (±20 % within minutes here), so each verdict also gives the per-round ratio (ours ÷
anchor, ÷ floor, ÷ full, plan ÷ no plan): its median and a sign-test interval (``benchmarks/timing_stats.py``),
"tie" where that holds 1, and for a target ratio whether the interval lies "within" it, "beyond" it or "straddles"
it. The methods run in reverse order on every other round.

Targets (PASS/MISS printed and written, measured ratio in every line): ``epsilon``, ``epsilon_plus``, ``attnlrp``,
``cp_lrp`` ≤ 1.5× floor; ``epsilon_gamma_box``, ``epsilon_alpha2_beta1`` ≤ 2× full; each of ours faster than the
matching anchor in the same run. Memory is in ``benchmarks/memory.py``.

Explained output: vision and BERT the top class of each row; the decoder the top logit of the last position
(``logits_to_keep=1``); T5 the top logit of the first decoder position.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from timing_stats import paired_ratio  # benchmarks/ is the script's directory, first on sys.path

warnings.simplefilter("ignore")

VISION = ("vgg16", "resnet50", "vit_b_16")
TEXT = ("bert", "llama300m", "t5small", "llama_small", "llama1b")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: the label suffix of the rows that compute relevance in a half-precision model's own dtype
MODEL_DTYPE = " (relevance in the model's dtype)"
#: the suffix of the rows that keep float32 relevance with TF32 matrix products (a half-precision model on CUDA)
TF32 = " (float32 relevance, TF32 products)"
#: the suffix of the rows with float32 relevance where the default is the model's half precision (the gradient
#: form's presets on CUDA)
FLOAT32 = " (float32 relevance)"
SUFFIXES = (MODEL_DTYPE, TF32, FLOAT32)
ROW_OPTION = {MODEL_DTYPE: {"model_dtype": True}, TF32: {"tf32": True}, FLOAT32: {"float32": True}}
#: our presets with a gradient form: on CUDA a half-precision model's relevance is then in its own dtype by default
GRADIENT_FORM_PRESETS = ("attnlrp", "cp_lrp")


def half_rows(spec: dict, preset: str) -> list[str]:
    """The label suffixes of the extra rows a half-precision case times for ``preset``: the relevance dtype that the
    default does not use (the model's, or float32 where the default is the model's: the gradient form on CUDA),
    and on CUDA float32 relevance with TF32 products."""
    if spec.get("dtype") not in HALF:
        return []
    if spec.get("device") != "cuda":
        return [MODEL_DTYPE]
    return [FLOAT32 if preset in GRADIENT_FORM_PRESETS else MODEL_DTYPE, TF32]
OURS = {  # presets timed per model family
    "vgg16": ("epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"),
    "resnet50": ("epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"),
    "vit_b_16": ("epsilon", "epsilon_plus", "attnlrp", "cp_lrp", "epsilon_gamma_box", "epsilon_alpha2_beta1"),
    "text": ("epsilon", "attnlrp", "cp_lrp"),
}
FLOOR_TARGET = ("epsilon", "epsilon_plus", "attnlrp", "cp_lrp")  # ≤ 1.5× floor
FULL_TARGET = ("epsilon_gamma_box", "epsilon_alpha2_beta1")  # ≤ 2× full
ANCHOR_OF = {  # anchor -> our preset it is compared with
    "zennit EpsilonPlus": "epsilon_plus",
    "zennit EpsilonGammaBox": "epsilon_gamma_box",
    "zennit EpsilonAlpha2Beta1": "epsilon_alpha2_beta1",
    "Captum LRP (ε)": "epsilon",
    "LXT AttnLRP": "attnlrp",
    "LXT CP-LRP": "cp_lrp",
}
LXT_MAP = {"LXT AttnLRP": "attnLRP", "LXT CP-LRP": "cp_LRP"}
ONLY: tuple[str, ...] = ()  # --presets: time only these presets (and their anchors)
HF_MODULE = {"bert": "bert", "llama300m": "llama", "t5small": "t5", "llama_small": "llama", "llama1b": "llama"}


# ---------------------------------------------------------------------------------------------------- cases
def parse_case(case: str) -> dict:
    name, _, rest = case.partition("@")
    m = re.fullmatch(r"(?:s(\d+))?(?:b(\d+))?", rest)
    if m is None:
        raise SystemExit(f"bad case {case!r}: MODEL[@sSEQbBATCH], e.g. bert@s512b4 or vit_b_16@b8")
    seq, batch = (int(m[1]) if m[1] else None), int(m[2] or 1)
    if name in TEXT and seq is None:
        seq = 128
    return {"case": case, "name": name, "seq": seq, "batch": batch}


def hf_config(name: str, quick: bool):
    import transformers as T

    if name == "bert":
        kw = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64) if quick else {}
        return T.BertConfig(**kw)
    if name == "llama300m":
        kw = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, intermediate_size=64) if quick else dict(
            vocab_size=32000, hidden_size=1024, num_hidden_layers=18, num_attention_heads=16,
            num_key_value_heads=16, intermediate_size=2816, tie_word_embeddings=False)
        return T.LlamaConfig(max_position_embeddings=4096, **kw)
    if name == "llama1b":  # the GPU case (TinyLlama's shape, ≈ 1.1 B parameters), bf16 at 2,048 tokens
        kw = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64) if quick else dict(
            vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, intermediate_size=5632, tie_word_embeddings=False)
        return T.LlamaConfig(max_position_embeddings=4096, **kw)
    if name == "llama_small":  # benchmarks/seq_scaling.py
        return T.LlamaConfig(vocab_size=32000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=688, max_position_embeddings=4096,
                             tie_word_embeddings=False)
    if name == "t5small":
        kw = dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                  num_heads=4) if quick else dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                                                  num_decoder_layers=6, num_heads=8)
        return T.T5Config(feed_forward_proj="relu", decoder_start_token_id=0, tie_word_embeddings=True, **kw)
    raise ValueError(name)


def hf_class(name: str):
    """Looked up in the transformers module at call time: LXT's BERT patch replaces the module's classes."""
    mod = importlib.import_module(f"transformers.models.{HF_MODULE[name]}.modeling_{HF_MODULE[name]}")
    cls = {"bert": "BertForSequenceClassification", "llama300m": "LlamaForCausalLM", "llama1b": "LlamaForCausalLM",
           "llama_small": "LlamaForCausalLM", "t5small": "T5ForConditionalGeneration"}[name]
    return getattr(mod, cls)


class Case:
    """A model, its input and the pieces every method needs (built the same way in every process)."""

    def __init__(self, spec: dict, quick: bool = False, device: str = "cpu"):
        device = spec.get("device", device)  # set by --device (and carried to the LXT processes in the spec)
        dtype = HALF.get(spec.get("dtype"), torch.float32)
        self.spec, self.quick, self.device = spec, quick, device
        name, batch = spec["name"], spec["batch"]
        torch.manual_seed(0)
        self.kw: dict = {}
        if name in VISION:
            import torchvision

            size = 224
            if quick:
                size = 32 if name == "vit_b_16" else 64
            extra = {"image_size": size} if name == "vit_b_16" else {}
            model = getattr(torchvision.models, name)(weights=None, **extra)
            if name == "vit_b_16":
                with torch.no_grad():  # torchvision initialises the classifier to zero (all logits 0)
                    model.heads.head.weight.normal_(0, 0.05)
                    model.heads.head.bias.normal_(0, 0.05)
            for m in model.modules():
                if isinstance(m, torch.nn.ReLU):
                    m.inplace = False  # Captum needs out-of-place ReLUs; the same model for every method
            self.model = model.eval().to(device, dtype)
            self.x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
            self.inputs = self.x
            self.select = lambda o: o
            self.desc = f"torchvision {name}(weights=None), batch {batch} × 3 × {size}²"
        else:
            cfg = hf_config(name, quick)
            attn = spec.get("attn", "eager")  # seq_scaling.py --attn sdpa: the fused attention (transformers' default)
            self.model = hf_class(name)._from_config(copy.deepcopy(cfg), attn_implementation=attn).eval()
            self.model.to(device, dtype)
            g = torch.Generator().manual_seed(0)
            seq = spec["seq"] if not quick else 16
            ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=g)
            self.inputs = {"input_ids": ids.to(device)}
            if name in ("llama300m", "llama_small", "llama1b"):
                self.kw = {"use_cache": False, "logits_to_keep": 1}
                self.select = lambda o: o.logits[:, -1]
            elif name == "t5small":
                dec = torch.randint(3, cfg.vocab_size, (batch, 32 if not quick else 4), generator=g)
                dec[:, 0] = cfg.decoder_start_token_id
                self.inputs["decoder_input_ids"] = dec.to(device)
                self.kw = {"use_cache": False}
                self.select = lambda o: o.logits[:, 0]
            else:
                self.select = lambda o: o.logits
            n = sum(p.numel() for p in self.model.parameters())
            self.desc = (f"transformers {type(self.model).__name__}, random init, {n / 1e6:.1f} M parameters, "
                         f"batch {batch} × {seq} tokens, {attn} attention")
        if dtype != torch.float32 or device != "cpu":
            self.desc += f"; {str(dtype).removeprefix('torch.')} on {device}"
        self.nparams = sum(p.numel() for p in self.model.parameters())

    # ------------------------------------------------------------------ the pieces
    def embeds(self):
        """Detached leaf embeddings for the floor (and LXT): {kwarg: tensor}."""
        emb = self.model.get_input_embeddings()
        out = {"inputs_embeds": emb(self.inputs["input_ids"]).detach().requires_grad_()}
        if "decoder_input_ids" in self.inputs:
            out["decoder_inputs_embeds"] = emb(self.inputs["decoder_input_ids"]).detach().requires_grad_()
        return out

    def seed(self, out):
        """The explained logits summed (one per row, the top class / token of that row)."""
        y = self.select(out)
        return y.gather(1, y.detach().argmax(1, keepdim=True)).sum()

    def full(self):
        def run():
            if self.spec["name"] in VISION:
                out = self.model(self.x.clone().requires_grad_())
            else:
                out = self.model(**self.inputs, **self.kw)
            self.seed(out).backward()
            self.model.zero_grad(set_to_none=True)

        return run

    def floor(self):
        def run():
            flags = [p.requires_grad for p in self.model.parameters()]
            for p in self.model.parameters():
                p.requires_grad_(False)
            try:
                if self.spec["name"] in VISION:
                    leaves = [self.x.clone().requires_grad_()]
                    out = self.model(leaves[0])
                else:
                    e = self.embeds()
                    leaves = list(e.values())
                    out = self.model(**e, **self.kw)
                torch.autograd.grad(self.seed(out), leaves)
            finally:
                for p, f in zip(self.model.parameters(), flags):
                    p.requires_grad_(f)

        return run

    def ours(self, preset, plan=False, subtract=False, model_dtype=False, tf32=False, float32=False):
        """``model_dtype``: relevance in the model's own (half) precision, as LXT computes it; ``float32``: float32
        relevance (the default for a half-precision model, but for the gradient form's presets on CUDA);
        ``tf32``: float32 relevance with CUDA's matrix products in TF32 (inputs rounded to 10 mantissa bits,
        float32 accumulation: a bf16 model's weights and activations exactly, the relevance ratios to about
        5e-4)."""
        import dynamiclrp

        inputs = self.inputs if self.spec["name"] in VISION else {**self.inputs, **self.kw}
        kw = {"plan": dynamiclrp.Plan()} if plan else {}  # one plan per method, reused over its repetitions
        if subtract:
            kw["subtract_addends"] = True
        if model_dtype:
            kw["dtype"] = HALF[self.spec["dtype"]]
        if float32 or tf32:
            kw["dtype"] = torch.float32

        def run():
            return dynamiclrp.explain(self.model, inputs, preset=preset, output=self.select, ledger=False,
                                      check_finite=False, **kw)
        if not tf32:
            return run

        def run_tf32():
            before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                return run()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = before
        return run_tf32

    def zennit(self, composite):
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus
        from zennit.torchvision import ResNetCanonizer, VGGCanonizer

        name = self.spec["name"]
        canonizer = ResNetCanonizer() if name.startswith("resnet") else VGGCanonizer()
        make = {"EpsilonPlus": lambda: EpsilonPlus(canonizers=[canonizer]),
                "EpsilonGammaBox": lambda: EpsilonGammaBox(low=-3.0, high=3.0, canonizers=[canonizer]),
                "EpsilonAlpha2Beta1": lambda: EpsilonAlpha2Beta1(canonizers=[canonizer])}[composite]
        x = self.x

        def run():
            with torch.no_grad():
                target = self.model(x).argmax(1)
            with Gradient(model=self.model, composite=make()) as attributor:
                attributor(x.clone().requires_grad_(), torch.eye(1000, device=x.device)[target])

        return run

    def captum(self):
        from captum.attr import LRP

        x = self.x

        def run():
            with torch.no_grad():
                target = self.model(x).argmax(1)
            LRP(self.model).attribute(x.clone().requires_grad_(), target=target)

        return run

    def logit(self) -> float:
        with torch.no_grad():
            return float(self.seed(self.model(self.inputs, **self.kw) if self.spec["name"] in VISION
                                   else self.model(**self.inputs, **self.kw)))


# ---------------------------------------------------------------------------------------------------- LXT
def lxt_patch(spec: dict, anchor: str):
    """Monkey-patch transformers / torchvision for ``anchor`` (in a fresh process, before the model is built)."""
    from lxt.efficient import monkey_patch

    name = spec["name"]
    if name == "vit_b_16":
        from torchvision.models import vision_transformer as vt

        if anchor != "LXT CP-LRP":
            raise RuntimeError("LXT 2.1 has only a CP-LRP map for torchvision's ViT")
        monkey_patch(vt, verbose=False)
        return
    if name not in ("bert", "llama300m", "llama1b"):
        raise RuntimeError(f"LXT 2.1 has no map for {name}")
    rules = importlib.import_module(f"lxt.efficient.models.{HF_MODULE[name]}")
    if not hasattr(rules, LXT_MAP[anchor]):
        raise RuntimeError(f"LXT 2.1 has no {LXT_MAP[anchor]} map for {name}")
    hf = importlib.import_module(f"transformers.models.{HF_MODULE[name]}.modeling_{HF_MODULE[name]}")
    monkey_patch(hf, getattr(rules, LXT_MAP[anchor]), verbose=False)


def lxt_run(case: Case):
    """One LXT explanation: parameters frozen, input × modified gradient (summed per token for text)."""
    for p in case.model.parameters():
        p.requires_grad_(False)

    def run():
        if case.spec["name"] in VISION:
            x = case.x.clone().requires_grad_()
            case.seed(case.model(x)).backward()
            return (x * x.grad).sum(1)
        e = case.embeds()
        case.seed(case.model(**e, **case.kw)).backward()
        return sum((t * t.grad).sum(-1).sum(-1) for t in e.values())

    return run


def worker(spec: dict, anchor: str, quick: bool) -> None:
    """Child process: patch (LXT), build, answer ``run`` lines with the time of one explanation (``@@`` lines).
    ``anchor`` "dynamiclrp PRESET": our preset instead, alone in its process (``--isolate``)."""
    try:
        ours = anchor.startswith("dynamiclrp ")
        if not ours:
            lxt_patch(spec, anchor)
        case = Case(spec, quick)
        run = case.ours(anchor.split(" ", 1)[1]) if ours else lxt_run(case)
        print(f"@@ready {case.logit()!r}", flush=True)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        print(f"@@error {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        return
    for line in sys.stdin:
        if line.strip() != "run":
            break
        gc.collect()
        try:
            t = time.perf_counter()
            run()
            print(f"@@time {time.perf_counter() - t!r}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"@@error {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            return


def child_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class Remote:
    """A method in its own process (an LXT anchor, or with ``--isolate`` one of our presets); calling it runs one
    explanation there and returns its inside time."""

    remote = True

    def __init__(self, spec: dict, anchor: str, threads: int, quick: bool):
        self.err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the process
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec), anchor, "--threads", str(threads)]
        if quick:
            cmd.append("--quick")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                  env=child_env(threads))
        self.logit = float(self._read("ready"))

    def _read(self, tag: str) -> str:
        for line in self.p.stdout:
            if line.startswith("@@error"):
                raise RuntimeError(line[8:].strip())
            if line.startswith(f"@@{tag} "):
                return line.split(" ", 1)[1]
        self.err.seek(0)
        raise RuntimeError(f"LXT process ended: {self.err.read()[-300:]}")

    def __call__(self) -> float:
        self.p.stdin.write("run\n")
        self.p.stdin.flush()
        return float(self._read("time"))

    def close(self):
        with contextlib.suppress(Exception):
            self.p.stdin.close()
        with contextlib.suppress(Exception):
            self.p.wait(timeout=60)


# ---------------------------------------------------------------------------------------------------- timing
def short(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}"[:200].replace("|", "/")


def methods_for(case: Case, threads: int, quick: bool, anchors: bool = True,
                subtract: bool = False, isolate: bool = False) -> tuple[dict, dict, list]:
    """(callables, errors, remotes) for every method of the case; ``subtract``: also the ``+ subtract`` rows;
    ``isolate``: also each preset that has an LXT anchor in a process of its own, as LXT runs (``(own process)``
    rows: the same conditions on both sides of the comparison)."""
    name = case.spec["name"]
    fns: dict = {"full": case.full(), "floor": case.floor()}
    errors: dict = {}
    remotes: list = []
    for preset in OURS.get(name, OURS["text"]):
        if ONLY and preset not in ONLY:
            continue
        fns[f"dynamiclrp {preset}"] = case.ours(preset)
        fns[f"dynamiclrp {preset} + plan"] = case.ours(preset, plan=True)
        if subtract and name != "vgg16":  # VGG has no additions
            fns[f"dynamiclrp {preset} + subtract"] = case.ours(preset, subtract=True)
        for suffix in half_rows(case.spec, preset):
            fns[f"dynamiclrp {preset}{suffix}"] = case.ours(preset, **ROW_OPTION[suffix])
    if not anchors:
        return fns, errors, remotes
    if name in ("vgg16", "resnet50"):
        try:
            for comp in ("EpsilonPlus", "EpsilonGammaBox", "EpsilonAlpha2Beta1"):
                if not ONLY or ANCHOR_OF[f"zennit {comp}"] in ONLY:
                    fns[f"zennit {comp}"] = case.zennit(comp)
        except ImportError as e:
            errors["zennit"] = short(e)
    if name == "vgg16" and (not ONLY or "epsilon" in ONLY):
        try:
            fns["Captum LRP (ε)"] = case.captum()
        except ImportError as e:
            errors["Captum LRP (ε)"] = short(e)
    lxt = {"bert": ["LXT AttnLRP"], "llama300m": ["LXT AttnLRP", "LXT CP-LRP"], "vit_b_16": ["LXT CP-LRP"],
           "llama1b": ["LXT AttnLRP", "LXT CP-LRP"],
           "t5small": []}.get(name, [])
    if name == "bert":
        errors["LXT CP-LRP"] = "not available: LXT 2.1 has no CP-LRP map for BERT"
    if name == "t5small":
        errors["LXT AttnLRP"] = errors["LXT CP-LRP"] = "not available: LXT 2.1 has no T5 map"
    def start(key: str, who: str) -> Remote | None:
        try:
            r = Remote(case.spec, who, threads, quick)
        except Exception as e:  # noqa: BLE001
            errors[key] = short(e)
            return None
        remotes.append(r)
        fns[key] = r
        return r

    for anchor in lxt:
        if ONLY and ANCHOR_OF[anchor] not in ONLY:
            continue
        r = start(anchor, anchor)
        if isolate:
            start(f"dynamiclrp {ANCHOR_OF[anchor]} (own process)", f"dynamiclrp {ANCHOR_OF[anchor]}")
        if r is None:
            continue
        ours = case.logit()
        if abs(r.logit - ours) > 1e-4 * max(1.0, abs(ours)):
            errors[anchor + " (model check)"] = f"explained logit differs: LXT {r.logit:.6g} vs ours {ours:.6g}"
    return fns, errors, remotes


def timed(f) -> float:
    gc.collect()
    if getattr(f, "remote", False):
        return f()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:  # GPU work is asynchronous: time from an idle device to an idle device
        torch.cuda.synchronize()
    t = time.perf_counter()
    f()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def interleave(fns: dict, reps: int | None, quick: bool, errors: dict) -> tuple[dict, int]:
    """Warm-up round (errors recorded, method dropped), then ``reps`` interleaved rounds; None: 5 if the full
    gradient pass takes < 2 s, else 3. Odd rounds run the methods in reverse order: a method's place in the round
    moved its time by about 5 % here (the first after the gradient passes ran faster), so each gets both ends."""
    warm: dict = {}
    for k, f in list(fns.items()):
        try:
            warm[k] = timed(f)
        except Exception as e:  # noqa: BLE001 - recorded in the table
            errors[k] = short(e)
            del fns[k]
    if reps is None:
        reps = 1 if quick else (5 if warm.get("full", 0) < 2.0 else 3)
    times: dict = {k: [] for k in fns}
    for rep in range(reps):
        for k, f in list(fns.items())[::-1 if rep % 2 else 1]:
            try:
                times[k].append(timed(f))
            except Exception as e:  # noqa: BLE001
                errors[k] = short(e)
                del fns[k]
                times.pop(k)
    return times, reps


def load() -> str:
    with contextlib.suppress(OSError):
        return f"{os.getloadavg()[0]:.2f}"
    return "?"


def bench(spec: dict, reps: int | None, threads: int, quick: bool, subtract: bool = False,
          isolate: bool = False) -> dict:
    t0 = time.time()
    case = Case(spec, quick)
    fns, errors, remotes = methods_for(case, threads, quick, subtract=subtract, isolate=isolate)
    load0 = load()
    try:
        times, n = interleave(fns, reps, quick, errors)
    finally:
        for r in remotes:
            r.close()
    return {"spec": spec, "desc": case.desc, "times": times, "errors": errors, "reps": n, "load": (load0, load()),
            "wall": time.time() - t0}


# ---------------------------------------------------------------------------------------------------- report
def verdicts(med: dict, times: dict | None = None) -> list[str]:
    """PASS/MISS per target, by ratios of medians (the issue's definition); where ``times`` holds both methods'
    per-round times, each line adds the paired per-round ratio and its interval (benchmarks/timing_stats.py), which
    tells a tie on a drifting machine from a real difference: against 1 for "faster than" and the plan's saving,
    against the target (1.5× the floor, 2× the full pass) for the others."""
    lines = []
    full, floor = med.get("full"), med.get("floor")

    def paired(k: str, base: str, bound: float | None = None) -> str:
        ta, tb = (times or {}).get(k), (times or {}).get(base)
        return f"; {paired_ratio(ta, tb).describe(bound)}" if ta and tb and len(ta) == len(tb) else ""

    for k, v in med.items():
        if not k.startswith("dynamiclrp "):
            continue
        label = k.split(" ", 1)[1]
        if label.endswith(" (own process)"):  # compared with LXT only (below)
            continue
        preset = label.removesuffix(" + plan").removesuffix(" + subtract")
        for suffix in SUFFIXES:
            preset = preset.removesuffix(suffix)
        if preset in FLOOR_TARGET and floor:
            r = v / floor
            lines.append(f"{'PASS' if r <= 1.5 else 'MISS'} {label} ≤ 1.5× floor: {r:.2f}×{paired(k, 'floor', 1.5)}")
        if preset in FULL_TARGET and full:
            r = v / full
            lines.append(f"{'PASS' if r <= 2.0 else 'MISS'} {label} ≤ 2× full: {r:.2f}×{paired(k, 'full', 2.0)}")
        if label.endswith(" + plan") and med.get(f"dynamiclrp {preset}"):
            saving = 1 - v / med[f"dynamiclrp {preset}"]
            lines.append(f"plan saving, {preset} (repeated explanations): {saving:.1%}"
                         f"{paired(k, f'dynamiclrp {preset}')}")
    for anchor, preset in ANCHOR_OF.items():
        for label in (preset, f"{preset} + subtract", f"{preset} (own process)",
                      *(f"{preset}{suffix}" for suffix in SUFFIXES)):
            a, o = med.get(anchor), med.get(f"dynamiclrp {label}")
            if a and o:
                r = o / a
                line = f"{'PASS' if r < 1.0 else 'MISS'} {label} faster than {anchor}: {r:.2f}× its time"
                lines.append(line + paired(f"dynamiclrp {label}", anchor))
    return lines


def section(res: dict, threads: int) -> list[str]:
    spec, times, errors = res["spec"], res["times"], res["errors"]
    med = {k: statistics.median(v) for k, v in times.items() if v}
    full, floor = med.get("full"), med.get("floor")
    out = [f"## {spec['case']} ({threads} thread{'s' if threads > 1 else ''})", "",
           f"- {res['desc']}; medians of {res['reps']} interleaved repetitions after one warm-up round "
           f"({'5 when the full gradient pass takes < 2 s, else 3' if res['reps'] > 1 else 'smoke run'})",
           f"- load average (1 min) at start / end of the timed rounds: {res['load'][0]} / {res['load'][1]}; "
           f"case wall time {res['wall']:.0f} s", "",
           "| method | median s (min–max) | × full | × floor |", "|---|---|---|---|"]
    for k, v in times.items():
        if not v:
            continue
        m = med[k]
        rf = f"{m / full:.2f}" if full else "–"
        rl = f"{m / floor:.2f}" if floor else "–"
        out.append(f"| {k} | {m:.3f} ({min(v):.3f}–{max(v):.3f}) | {rf} | {rl} |")
    for k, e in errors.items():
        out.append(f"| {k} | **{'not run' if e.startswith('not available') else 'failed'}**: {e} | – | – |")
    out += ["", *[f"- {v}" for v in verdicts(med, times)], ""]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=["vgg16", "resnet50", "vit_b_16", "bert@s128b1",
                                                    "llama300m@s128b1", "t5small@s128b1"])
    ap.add_argument("--reps", type=int, default=None, help="default: 5 if full < 2 s, else 3")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (also for the LXT processes)")
    ap.add_argument("--out", default="results/speed.md")
    ap.add_argument("--append", action="store_true", help="append the sections to --out")
    ap.add_argument("--quick", action="store_true", help="tiny configs, 1 repetition (smoke run)")
    ap.add_argument("--presets", nargs="*", help="only these of our presets, with their anchors (default: all)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (a GPU machine)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="model and input dtype")
    ap.add_argument("--subtract-addends", action="store_true",
                    help="also time each preset with subtract_addends=True ('+ subtract' rows; not VGG16)")
    ap.add_argument("--isolate", action="store_true",
                    help="also run each preset compared with LXT in a process of its own, as LXT runs")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "ANCHOR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    global ONLY
    ONLY = tuple(args.presets or ())
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(json.loads(args.worker[0]), args.worker[1], args.quick)
        return
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.append or not out.exists():
        where = (f"{torch.cuda.get_device_name()}, transformers {_version('transformers')}"
                 if args.device == "cuda" else "CPU")
        out.write_text(HEADER.format(torch=torch.__version__, cpu=os.cpu_count(), where=where))
    for case in args.cases:
        spec = {**parse_case(case), "device": args.device, "dtype": args.dtype}
        res = bench(spec, 1 if args.quick else args.reps, args.threads, args.quick, args.subtract_addends,
                    args.isolate)
        text = section(res, args.threads)
        print("\n".join(text), flush=True)
        with out.open("a") as f:  # written case by case: a cut run keeps what it measured
            f.write("\n".join(text) + "\n")


def _version(package: str) -> str:
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return "not installed"


HEADER = """# Speed: one explanation against the gradient pass ({where})

Written by `benchmarks/speed.py` (issue #8). torch {torch}, {cpu} CPU cores; random weights. "full" = forward +
backward with parameter gradients; "floor" = forward + gradient with respect to the input only, parameters frozen;
both on the same model, input and explained logit(s) as the explanations. Ratios are of medians within one section
(one process, interleaved repetitions, the order reversed every other round); each verdict line adds the median of
the per-round ratios with its sign-test interval (`benchmarks/timing_stats.py`): "tie" where the interval holds 1,
and against a target ratio "within", "beyond" or "straddles" (sections before session 11 have it on "faster than"
lines only). dynamiclrp runs
`explain(..., ledger=False, check_finite=False)`; "+ plan"
rows pass one `dynamiclrp.Plan()` to all their repetitions (a data-set loop: the warm-up builds it); "+ subtract"
rows (`--subtract-addends`) pass `subtract_addends=True` (an opt-in approximation within an ulp of each residual
sum, see README). zennit
0.5.1 composites with the torchvision canonizer, Captum `LRP` (ε); LXT 2.1 in its own process per anchor, timed
inside it, its repetitions interleaved with ours. Transformers: eager attention everywhere. A method that failed
shows its error instead of a time.

"""


if __name__ == "__main__":
    main()
