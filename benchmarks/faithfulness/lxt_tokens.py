"""LXT 2.1 token relevance for a trained tiny transformer, in its own process (LXT monkey-patches transformers).

Usage: ``python benchmarks/faithfulness/lxt_tokens.py TASK RULE IN.pt OUT.pt`` with TASK ``bert`` or ``llama``,
RULE ``attnlrp`` or ``cp_lrp``; ``IN.pt`` holds ``state`` (the model's state dict), ``ids`` and ``targets``.
Writes ``{"relevance": (N, T), "seconds": float}``: LXT's relevance, input × modified gradient at the token
embeddings summed over the hidden dimension, seeded with the target logit (eager attention).
"""

from __future__ import annotations

import importlib
import pathlib
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
warnings.simplefilter("ignore")


def main(task: str, rule: str, inp: str, out: str) -> None:
    torch.set_num_threads(1)
    import text_tasks as tt
    from lxt.efficient import monkey_patch

    name = "bert" if task == "bert" else "llama"
    hf = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    rules = importlib.import_module(f"lxt.efficient.models.{name}")
    monkey_patch(hf, getattr(rules, {"attnlrp": "attnLRP", "cp_lrp": "cp_LRP"}[rule]), verbose=False)
    blob = torch.load(inp, weights_only=False)
    model = tt.build(task)
    model.load_state_dict(blob["state"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids, targets = blob["ids"], blob["targets"]
    t0 = time.perf_counter()
    rels = []
    for i in range(0, len(ids), 64):
        emb = model.get_input_embeddings()(ids[i:i + 64]).detach().requires_grad_()
        logits = tt.logits_of(task)(model(inputs_embeds=emb))
        logits.gather(1, targets[i:i + 64, None]).sum().backward()
        rels.append((emb * emb.grad).sum(-1).detach())
    torch.save({"relevance": torch.cat(rels), "seconds": time.perf_counter() - t0}, out)


if __name__ == "__main__":
    main(*sys.argv[1:5])
