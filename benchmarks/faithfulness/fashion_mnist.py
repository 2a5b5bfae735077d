"""Fashion-MNIST: data loader and a small VGG-style CNN with batch norm, trained with fixed seeds.

Usage: ``python benchmarks/faithfulness/fashion_mnist.py`` trains (or loads from the cache) and prints the test
accuracy. The weights are cached under ``~/.cache/dynamiclrp/fmnist-<hash of the config>.pt``; delete the file to
retrain. Data: the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*.gz``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pathlib
import time

import numpy as np
import torch
from torch import nn

DATA = pathlib.Path("/usr/share/datasets/fashion-mnist")
CACHE = pathlib.Path.home() / ".cache" / "dynamiclrp"
CONFIG = {"widths": [16, 32, 64], "hidden": 128, "epochs": 6, "batch": 128, "lr": 3e-3, "seed": 0, "version": 1}
#: the CI slice (``faithfulness.py --quick``): one epoch on the first 10,000 training images, about 1/36 of the
#: training (the full one took 6-10 minutes on the CI's two cores, against a 10-minute limit)
QUICK_CONFIG = {**CONFIG, "epochs": 1, "train_images": 10_000}
MEAN, STD = 0.2860, 0.3530
CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def load(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) normalised with the training mean/std, and labels (N,)."""
    prefix = "t10k" if split == "test" else "train"
    with gzip.open(DATA / f"{prefix}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(DATA / f"{prefix}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    x = (torch.from_numpy(x.astype(np.float32) / 255.0) - MEAN) / STD
    return x, torch.from_numpy(y.astype(np.int64))


def build(widths=CONFIG["widths"], hidden=CONFIG["hidden"]) -> nn.Sequential:
    """conv-BN-ReLU ×2, max-pool, per width; then dense-ReLU-dense (a small VGG with batch norm)."""
    layers: list[nn.Module] = []
    c = 1
    for w in widths:
        for _ in range(2):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        layers.append(nn.MaxPool2d(2))
    side = 28 // 2 ** len(widths)
    layers += [nn.Flatten(), nn.Linear(c * side * side, hidden), nn.ReLU(), nn.Linear(hidden, 10)]
    return nn.Sequential(*layers)


def cache_path(config: dict = CONFIG) -> pathlib.Path:
    key = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return CACHE / f"fmnist-{key}.pt"


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float(sum((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum() for i in range(0, len(x), 1000))) / len(x)


def train(verbose: bool = True, config: dict = CONFIG) -> tuple[nn.Module, dict]:
    """Train with Adam + one-cycle, fixed seeds; returns the model (eval mode) and a log dict."""
    torch.manual_seed(config["seed"])
    x, y = load("train")
    x, y = x[:config.get("train_images")], y[:config.get("train_images")]
    xt, yt = load("test")
    model = build()
    steps = config["epochs"] * ((len(x) + config["batch"] - 1) // config["batch"])
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config["lr"], total_steps=steps)
    gen = torch.Generator().manual_seed(config["seed"])
    log = {"epochs": [], "params": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    for epoch in range(config["epochs"]):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), config["batch"]):
            idx = perm[i:i + config["batch"]]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5  # horizontal flips: the only augmentation
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, xt, yt)
        log["epochs"].append({"epoch": epoch + 1, "test_acc": acc, "seconds": time.perf_counter() - t0})
        if verbose:
            print(f"epoch {epoch + 1}: test acc {acc:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    log["seconds"] = time.perf_counter() - t0
    log["test_acc"] = log["epochs"][-1]["test_acc"]
    return model.eval(), log


def get_model(verbose: bool = True, config: dict = CONFIG) -> tuple[nn.Module, dict]:
    """The trained model from the cache, training it first if needed."""
    path = cache_path(config)
    model = build()
    if path.exists():
        blob = torch.load(path, weights_only=False)
        model.load_state_dict(blob["state"])
        return model.eval(), blob["log"]
    model, log = train(verbose, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "log": log, "config": config}, path)
    return model, log


if __name__ == "__main__":
    torch.set_num_threads(1)
    m, lg = get_model()
    print(json.dumps({k: v for k, v in lg.items() if k != "epochs"}), lg["epochs"][-1])
