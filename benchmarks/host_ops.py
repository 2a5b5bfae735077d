"""Host work per explanation: the CPU proxy for a GPU at batch 1 (issue #8).

On a GPU a small model's gradient pass takes a few milliseconds, and an explanation is then bound by the host: the
Python of the engine, one dispatch (and on a GPU one kernel launch) per aten op, and every read of a device value by
the host (``bool(t)``, ``t.item()``, ``t.tolist()``), each of which waits for the device to drain. This script counts
them per explanation, next to the floor's (forward + gradient with respect to the input), and times both on inputs
small enough that the CPU's arithmetic stays minor (ResNet-50 at 16 x 16, tiny transformers): ratios here move
as the host-bound GPU ratios do, without a GPU.

Usage: ``PYTHONPATH=src python benchmarks/host_ops.py [--reps 11] [--out results/host_ops.md]``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import pathlib
import statistics
import warnings

import speed  # benchmarks/ is the script's directory, first on sys.path
import torch
from timing_stats import paired_ratio
from torch.utils._python_dispatch import TorchDispatchMode

import dynamiclrp

warnings.simplefilter("ignore")

#: ops that only describe memory (no kernel on a GPU)
METADATA = {"view", "expand", "transpose", "_unsafe_view", "detach", "t", "permute", "unsqueeze", "squeeze",
            "slice", "select", "alias", "as_strided", "reshape", "unflatten", "split", "chunk", "unbind", "narrow"}
#: ops whose result the host must read from the device
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "unique2", "_unique2"}


class OpCounter(TorchDispatchMode):
    """Counts aten ops by kind: all, those that launch work (not views), and host reads (``tolist`` counted by
    :func:`counted`)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def counted(f) -> dict:
    """One call of ``f`` under the counter: {'ops', 'launching', 'host reads'}."""
    tolist, reads = torch.Tensor.tolist, [0]

    def spy(self, *a, **k):
        reads[0] += 1
        return tolist(self, *a, **k)

    torch.Tensor.tolist = spy
    try:
        with OpCounter() as c:
            f()
    finally:
        torch.Tensor.tolist = tolist
    total = sum(c.ops.values())
    meta = sum(n for k, n in c.ops.items() if k in METADATA)
    return {"ops": total, "launching": total - meta,
            "host reads": reads[0] + sum(n for k, n in c.ops.items() if k in HOST_READS)}


def cases():
    """(name, model, explain-inputs, floor, explain kwargs per preset)."""
    import torchvision
    import transformers as T

    torch.manual_seed(0)
    out = []
    resnet = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 16, 16)
    out.append(("ResNet-50, 16 x 16", resnet, x, ["epsilon", "epsilon_plus", "epsilon_gamma_box"], {"target": 0}))
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=12, num_heads=4,
                                               hidden_dim=64, mlp_dim=128).eval()
    with torch.no_grad():  # torchvision initialises the head to zero: every gradient would be zero
        vit.heads.head.weight.normal_(0, 0.05)
    out.append(("ViT (12 layers, width 64), 32 x 32", vit, torch.randn(1, 3, 32, 32), ["epsilon", "attnlrp", "cp_lrp"],
                {"target": 0}))
    cfg = T.LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=12, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=128)
    llama = T.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ids = {"input_ids": torch.randint(0, 1000, (1, 32))}
    out.append(("LLaMA (12 layers, width 64), 32 tokens", llama, ids, ["epsilon", "attnlrp", "cp_lrp"],
                {"output": lambda o: o.logits[:, -1]}))
    return out


def floor_of(model, inputs, kw):
    """Forward + gradient with respect to the input (the embeddings for text), parameters frozen."""
    if isinstance(inputs, dict):
        emb = model.get_input_embeddings()

        def run():
            e = emb(inputs["input_ids"]).detach().requires_grad_()
            y = kw["output"](model(inputs_embeds=e))
            torch.autograd.grad(y[:, 0].sum(), e)
        return run

    def run():
        x = inputs.clone().requires_grad_()
        torch.autograd.grad(model(x)[:, 0].sum(), x)
    return run


def explainer(model, inputs, preset: str, kw: dict):
    """One explanation as the benchmarks time it (no ledger, no finiteness check)."""
    return lambda: dynamiclrp.explain(model, inputs, preset=preset, ledger=False, check_finite=False, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--out", default="results/host_ops.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    # attention's steps as on a GPU: no host read of a mask, large blocks, the fused backward run (session 17)
    from dynamiclrp.ops import attention
    attention.CPU_DEVICES = ()
    lines = ["# Host work per explanation (the CPU proxy for a GPU at batch 1)", "",
             f"Written by `benchmarks/host_ops.py` (issue #8). torch {torch.__version__}, CPU, one thread, random "
             "weights. Per explanation (`ledger=False, check_finite=False`) and per floor (forward + input "
             "gradient, parameters frozen): aten ops, those that launch work (not views), host reads of device "
             "values (`item`, `bool`, `tolist`, `nonzero`, ...: each one waits for a GPU), and the median time of "
             f"{args.reps} interleaved rounds after a warm-up (`speed.interleave`: order reversed every other round) "
             "with the median per-round ratio to the floor. Fused attention's steps run as on a GPU "
             "(`dynamiclrp.ops.attention.CPU_DEVICES` emptied: no host read of a mask, large blocks).", ""]
    for name, model, inputs, presets, kw in cases():
        for p in model.parameters():
            p.requires_grad_(False)
        fns = {"floor": floor_of(model, inputs, kw)}
        for preset in presets:
            fns[preset] = explainer(model, inputs, preset, kw)
            fns[f"{preset} + plan"] = explainer(model, inputs, preset, {**kw, "plan": dynamiclrp.Plan()})
        errors: dict = {}
        times, _ = speed.interleave(fns, args.reps, False, errors)  # a warm-up round, then the timed ones
        if errors:
            raise RuntimeError(f"{name}: {errors}")
        counts = {k: counted(f) for k, f in fns.items()}
        lines += [f"## {name}", "", "| method | ms | × floor (paired) | aten ops | launching | host reads |",
                  "|---|---|---|---|---|---|"]
        for k in fns:
            ratio = paired_ratio(times[k], times["floor"]).median
            c = counts[k]
            lines.append(f"| {k} | {statistics.median(times[k]) * 1e3:.1f} | {ratio:.2f} | {c['ops']} | "
                         f"{c['launching']} | {c['host reads']} |")
        lines.append("")
        print("\n".join(lines[-len(fns) - 4:]), flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
