"""GPU checks (run on a CUDA machine): every SDPA backend node, HF models, and VGG16 timing.

Usage: ``PYTHONPATH=src python benchmarks/gpu_check.py --out DIR``. Prints and writes ``DIR/gpu_check.md``.

1. Scaled dot-product attention through each CUDA backend (flash, memory-efficient, cuDNN, math) with masks,
   the causal flag and grouped-query attention: node types, and relevance (attnlrp) against the math backend.
2. Tiny Hugging Face models (BERT, LLaMA with GQA, GPT-2) in bf16 on the GPU with whatever transformers is
   installed there: explain() runs, relevance is finite, sdpa and eager agree.
3. torchvision VGG16 at batch 1 × 224²: explanation time against forward + backward, same run, medians.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import dynamiclrp

warnings.simplefilter("ignore")
LINES: list[str] = []


def log(s: str = "") -> None:
    print(s, flush=True)
    LINES.append(s)


def node_kinds(y):
    seen, stack, kinds = set(), [y.grad_fn], set()
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        kinds.add(type(f).__name__)
        stack.extend(c for c, _ in f.next_functions)
    return sorted(kinds)


def sdpa_backends(dev):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    log("## 1. SDPA backends (attnlrp relevance seeded on every output, vs the float64 math path: max |Δ| / max |R|)")
    log("| backend | dtype | case | node | rel. diff q / k / v |")
    log("|---|---|---|---|---|")
    torch.manual_seed(0)
    cases = {
        "plain": dict(),
        "causal": dict(is_causal=True),
        "bool mask": dict(mask="bool"),
        "float mask": dict(mask="float"),
        "gqa causal": dict(is_causal=True, gqa=True),
    }
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for cname, case in cases.items():
            B, H, L, D = 2, 4, 16, 64
            Hk = 2 if case.get("gqa") else H
            q0 = torch.randn(B, H, L, D, device=dev, dtype=dtype)
            k0 = torch.randn(B, Hk, L, D, device=dev, dtype=dtype)
            v0 = torch.randn(B, Hk, L, D, device=dev, dtype=dtype)
            mask = None
            if case.get("mask") == "bool":
                mask = torch.rand(L, L, device=dev) > 0.3
                mask[:, 0] = True
            elif case.get("mask") == "float":
                mask = torch.randn(L, L, device=dev, dtype=dtype)
            results = {}
            for bname, backend in backends:
                q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
                try:
                    with sdpa_kernel(backend):
                        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                           is_causal=case.get("is_causal", False),
                                                           enable_gqa=bool(case.get("gqa")))
                except RuntimeError as err:
                    results[bname] = ("unsupported", str(err).splitlines()[0][:60])
                    continue
                try:  # seeded with the output itself: every output carries relevance, near-zero ones too
                    att = dynamiclrp.propagate(y, target=lambda o: o.clone(), wrt=[q, k, v], preset="attnlrp")
                    results[bname] = ("ok", [r.double() for r in att.inputs], node_kinds(y)[-1])
                except Exception as err:  # noqa: BLE001 - report every failure in the table
                    results[bname] = ("error", f"{type(err).__name__}: {str(err)[:80]}")
            ref = reference_sdpa(q0, k0, v0, mask, case)
            for bname, res in results.items():
                if res[0] != "ok":
                    log(f"| {bname} | {dtype} | {cname} | {res[0]} | {res[1]} |")
                    continue
                diffs = []
                if ref and ref[0] == "ok":
                    for a, b in zip(res[1], ref[1]):
                        diffs.append(f"{float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)):.1e}")
                finite = all(bool(torch.isfinite(r).all()) for r in res[1])
                log(f"| {bname} | {dtype} | {cname} | {res[2]} | {' / '.join(diffs)}{'' if finite else ' NaN!'} |")


def reference_sdpa(q0, k0, v0, mask, case):
    """The float64 math path's attnlrp relevance, on the same (rounded) inputs: the ground truth of the table."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.double().requires_grad_(True) for t in (q0, k0, v0))
    m = mask if mask is None or mask.dtype == torch.bool else mask.double()
    try:
        with sdpa_kernel(SDPBackend.MATH):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=case.get("is_causal", False),
                                               enable_gqa=bool(case.get("gqa")))
        return ("ok", dynamiclrp.propagate(y, target=lambda o: o.clone(), wrt=[q, k, v], preset="attnlrp").inputs)
    except Exception as err:  # noqa: BLE001 - a float mask on the math path is refused: no reference
        return ("error", str(err))


def hf_models(dev):
    try:
        import transformers as T
    except ImportError:
        log("transformers not installed")
        return
    log(f"\n## 2. Hugging Face models on {dev}, transformers {T.__version__}, torch {torch.__version__}")
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 12), device=dev)
    specs = [
        ("bert", T.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128), T.BertForSequenceClassification, None),
        ("llama", T.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=128), T.LlamaForCausalLM,
         lambda o: o.logits[:, -1]),
        ("gpt2", T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64), T.GPT2LMHeadModel,
         lambda o: o.logits[:, -1]),
    ]
    for name, cfg, cls, out in specs:
        for dtype in (torch.float32, torch.bfloat16):
            m1 = cls._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").to(dev, dtype).eval()
            m2 = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").to(dev, dtype).eval()
            m2.load_state_dict(m1.state_dict())
            m3 = copy.deepcopy(m2).double()  # the ground truth: the same (rounded) weights in float64
            for preset in ("attnlrp", "cp_lrp", "epsilon"):  # epsilon: a gradient pass too since session 14 (eager)
                try:  # one target for all three (the float64 model's arg-max): bf16 may rank classes otherwise
                    with torch.no_grad():
                        y3 = m3(input_ids=ids)
                        t = (out(y3) if out else y3.logits).argmax(-1)
                    a = dynamiclrp.explain(m1, {"input_ids": ids}, preset=preset, output=out, target=t)
                    b = dynamiclrp.explain(m2, {"input_ids": ids}, preset=preset, output=out, target=t)
                    c = dynamiclrp.explain(m3, {"input_ids": ids}, preset=preset, output=out, target=t)

                    def d(x, y):
                        return float((x.double() - y.double()).abs().max() / y.double().abs().max())

                    # the gradient form (ledger off): on a GPU, a half-precision model's relevance in its dtype
                    a2 = dynamiclrp.explain(m1, {"input_ids": ids}, preset=preset, output=out, target=t, ledger=False)
                    b2 = dynamiclrp.explain(m2, {"input_ids": ids}, preset=preset, output=out, target=t, ledger=False)
                    log(f"* {name} {dtype} {preset}: tokens finite {bool(torch.isfinite(a.tokens).all())}, "
                        f"sdpa vs eager rel. diff {d(a.tokens, b.tokens):.1e}; vs float64: sdpa "
                        f"{d(a.tokens, c.tokens):.1e}, eager {d(b.tokens, c.tokens):.1e} (the seeds themselves: "
                        f"{d(a.outputs[0], c.outputs[0]):.1e}, {d(b.outputs[0], c.outputs[0]):.1e}); relevance "
                        f"dtype {a.tokens.dtype}; ledger=False (gradient form {a2.stats.gradient_form}, "
                        f"{a2.tokens.dtype}) vs float64: sdpa {d(a2.tokens, c.tokens):.1e}, eager "
                        f"{d(b2.tokens, c.tokens):.1e}")
                except Exception as err:  # noqa: BLE001
                    log(f"* {name} {dtype} {preset}: ERROR {type(err).__name__}: {str(err)[:200]}")


def vgg_timing(dev):
    import torchvision

    log(f"\n## 3. VGG16 timing on {torch.cuda.get_device_name() if dev == 'cuda' else dev}, batch 1 × 224²")
    model = torchvision.models.vgg16(weights=None).to(dev).eval()
    x = torch.randn(1, 3, 224, 224, device=dev)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def full():
        xx = x.clone().requires_grad_()
        y = model(xx)
        y[0, y[0].argmax()].backward()
        model.zero_grad(set_to_none=True)

    def floor():
        for p in model.parameters():
            p.requires_grad_(False)
        xx = x.clone().requires_grad_()
        y = model(xx)
        torch.autograd.grad(y[0, y[0].argmax()], xx)
        for p in model.parameters():
            p.requires_grad_(True)

    methods = {"full fwd+bwd": full, "floor (input grad only)": floor}
    for preset in ("epsilon", "epsilon_plus", "epsilon_gamma_box"):
        methods[preset] = (lambda p: lambda: dynamiclrp.explain(model, x, preset=p, ledger=False,
                                                                check_finite=False))(preset)
    for f in methods.values():
        f()
        f()
    times = {k: [] for k in methods}
    for _ in range(7):
        for k, f in methods.items():
            sync()
            t = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    log("| method | median ms | × full | × floor |")
    log("|---|---|---|---|")
    for k, v in med.items():
        log(f"| {k} | {1000 * v:.1f} | {v / med['full fwd+bwd']:.2f} | {v / med['floor (input grad only)']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"# GPU check: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch {torch.__version__}")
    for step in (sdpa_backends, hf_models, vgg_timing):
        try:
            step(dev)
        except Exception as err:  # noqa: BLE001 - keep going, report
            log(f"\n{step.__name__} failed: {type(err).__name__}: {err}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
