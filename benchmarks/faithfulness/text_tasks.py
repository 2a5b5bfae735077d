"""Synthetic text tasks whose deciding tokens are known, and tiny Hugging Face transformers trained on them.

* ``bert`` — ``BertForSequenceClassification`` (2 layers, d 64, 4 heads, random init): "does A occur before B?".
  Every sequence holds exactly one A and one B among noise tokens; the deciding tokens are A and B.
* ``llama`` — ``LlamaForCausalLM`` (2 layers, d 64, 4 heads, 2 KV heads, random init): "are there more A than B?",
  answered as the next token (YES / NO) after a final QUERY token; 1-4 A and 1-4 B (never equal) among noise; the
  deciding tokens are all A and B.

Token ids: 0 PAD, 1 CLS, 2 SEP, 3 A, 4 B, 5 YES, 6 NO, 7 QUERY, 8…63 noise. Sequences have a fixed length (24),
no padding. Usage: ``python benchmarks/faithfulness/text_tasks.py`` trains both (or loads them from
``~/.cache/dynamiclrp/text-<name>-<hash>.pt``) and prints the held-out accuracy.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pathlib
import time

import torch

CACHE = pathlib.Path.home() / ".cache" / "dynamiclrp"
PAD, CLS, SEP, A, B, YES, NO, QUERY, NOISE0, VOCAB = 0, 1, 2, 3, 4, 5, 6, 7, 8, 64
LENGTH = 24
CONFIG = {"length": LENGTH, "vocab": VOCAB, "d": 64, "layers": 2, "heads": 4, "ffn": 128, "batch": 64, "lr": 1e-3,
          "steps": {"bert": 400, "llama": 600}, "seed": 0, "version": 1}


def make_data(task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids (n, T), labels (n,), truth (n, T) bool: the deciding tokens, allowed (n, T) bool)``.

    For ``bert`` the label is 1 if A comes first; for ``llama`` the label is the answer token (YES if #A > #B).
    ``allowed`` excludes the fixed tokens (CLS, SEP, QUERY) from rankings and deletion.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(NOISE0, VOCAB, (n, LENGTH), generator=g)
    allowed = torch.ones(n, LENGTH, dtype=torch.bool)
    labels = torch.empty(n, dtype=torch.long)
    if task == "bert":
        ids[:, 0], ids[:, -1] = CLS, SEP
        allowed[:, 0] = allowed[:, -1] = False
        for i in range(n):
            pa, pb = (torch.randperm(LENGTH - 2, generator=g)[:2] + 1).tolist()
            ids[i, pa], ids[i, pb] = A, B
            labels[i] = int(pa < pb)
    elif task == "llama":
        ids[:, -1] = QUERY
        allowed[:, -1] = False
        for i in range(n):
            na = int(torch.randint(1, 5, (1,), generator=g))
            nb = int(torch.randint(1, 4, (1,), generator=g))
            nb = nb if nb < na else nb + 1  # 1..4, never equal to na
            pos = (torch.randperm(LENGTH - 1, generator=g)[:na + nb]).tolist()
            for p in pos[:na]:
                ids[i, p] = A
            for p in pos[na:]:
                ids[i, p] = B
            labels[i] = YES if na > nb else NO
    else:
        raise ValueError(task)
    truth = (ids == A) | (ids == B)
    return ids, labels, truth, allowed


def config(task: str):
    import transformers as T

    c = CONFIG
    if task == "bert":
        return T.BertConfig(vocab_size=VOCAB, hidden_size=c["d"], num_hidden_layers=c["layers"],
                            num_attention_heads=c["heads"], intermediate_size=c["ffn"], max_position_embeddings=32,
                            num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return T.LlamaConfig(vocab_size=VOCAB, hidden_size=c["d"], num_hidden_layers=c["layers"],
                         num_attention_heads=c["heads"], num_key_value_heads=2, intermediate_size=c["ffn"],
                         max_position_embeddings=32)


def build(task: str, attn: str = "eager"):
    import transformers as T

    cls = T.BertForSequenceClassification if task == "bert" else T.LlamaForCausalLM
    return cls._from_config(copy.deepcopy(config(task)), attn_implementation=attn)


def logits_of(task: str):
    """The explained output: class logits (bert) or the next-token logits at the last position (llama)."""
    return (lambda o: o.logits) if task == "bert" else (lambda o: o.logits[:, -1])


def cache_path(task: str) -> pathlib.Path:
    key = hashlib.sha1(json.dumps(CONFIG, sort_keys=True).encode()).hexdigest()[:12]
    return CACHE / f"text-{task}-{key}.pt"


@torch.no_grad()
def accuracy(model, task: str, ids, labels) -> float:
    model.eval()
    return float((logits_of(task)(model(input_ids=ids)).argmax(-1) == labels).float().mean())


def train(task: str, verbose: bool = True):
    torch.manual_seed(CONFIG["seed"])
    model = build(task)
    opt = torch.optim.AdamW(model.parameters(), lr=CONFIG["lr"])
    steps = CONFIG["steps"][task]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=CONFIG["lr"], total_steps=steps)
    xt, yt, _, _ = make_data(task, 1000, seed=10_000)
    t0 = time.perf_counter()
    for step in range(steps):
        model.train()
        ids, labels, _, _ = make_data(task, CONFIG["batch"], seed=step + 1)
        loss = torch.nn.functional.cross_entropy(logits_of(task)(model(input_ids=ids)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if verbose and (step + 1) % 100 == 0:
            print(f"{task} step {step + 1}: loss {loss.item():.3f}, held-out acc {accuracy(model, task, xt, yt):.3f}",
                  flush=True)
    log = {"seconds": time.perf_counter() - t0, "test_acc": accuracy(model, task, xt, yt), "steps": steps,
           "params": sum(p.numel() for p in model.parameters())}
    return model.eval(), log


def get_model(task: str, verbose: bool = True):
    path = cache_path(task)
    if path.exists():
        blob = torch.load(path, weights_only=False)
        model = build(task)
        model.load_state_dict(blob["state"])
        return model.eval(), blob["log"]
    model, log = train(task, verbose)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "log": log, "config": CONFIG}, path)
    return model, log


if __name__ == "__main__":
    torch.set_num_threads(1)
    for t in ("bert", "llama"):
        print(t, get_model(t)[1])
