"""Offline quickstart: train a tiny CNN to tell a vertical bar from a horizontal one, then explain it.

Everything is generated here (no download): 12×12 images with one bright bar on noise. After a few seconds of
training the CNN is near-perfect, and its LRP heatmap should sit on the bar. The script prints the heatmap as
text, the conservation ledger and the Promise System's statistics.

Run: ``python examples/quickstart.py`` (README's first command sets up the environment and runs it).
"""

from __future__ import annotations

import time

import torch
from torch import nn

import dynamiclrp

SIZE = 12


def make_bars(n: int, generator: torch.Generator, labels: torch.Tensor | None = None):
    """Images with one vertical (label 0) or horizontal (label 1) bar, on Gaussian noise."""
    x = 0.3 * torch.randn(n, 1, SIZE, SIZE, generator=generator)
    if labels is None:
        labels = torch.randint(0, 2, (n,), generator=generator)
    pos = torch.randint(2, SIZE - 2, (n,), generator=generator)
    for i in range(n):
        if labels[i] == 0:
            x[i, 0, :, pos[i]] += 1.5
        else:
            x[i, 0, pos[i], :] += 1.5
    return x, labels


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, 2),
    )


def train(model: nn.Module, generator: torch.Generator, steps: int = 150) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x, y = make_bars(64, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = make_bars(500, generator)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def ascii_heatmap(rel: torch.Tensor) -> str:
    """Positive relevance as ``. : * #`` by strength, negative as ``-``."""
    scale = rel.abs().max().clamp(min=1e-12)
    chars = []
    for row in rel:
        line = ""
        for v in (row / scale).tolist():
            line += "-" if v < -0.25 else " .:*#"[min(4, int(max(v, 0) * 5))]
        chars.append(line)
    return "\n".join(chars)


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = make_model()
    t0 = time.perf_counter()
    acc = train(model, generator)
    print(f"trained a {sum(p.numel() for p in model.parameters())}-parameter CNN in "
          f"{time.perf_counter() - t0:.1f} s: test accuracy {acc:.1%}")
    model.eval()

    x, labels = make_bars(2, torch.Generator().manual_seed(1), labels=torch.tensor([0, 1]))
    att = dynamiclrp.explain(model, x, target=labels, preset="epsilon_plus", modules=["3"])
    logits = model(x).detach()
    for i in range(2):
        name = "vertical" if labels[i] == 0 else "horizontal"
        r = att.inputs[0][i, 0]
        print(f"\nimage {i} ({name} bar), logit {logits[i, labels[i]]:.3f}, "
              f"sum of input relevance {r.sum():.3f}")
        print(ascii_heatmap(r))

    c = att.conservation()
    print(f"\nconservation: seed {c['seed']:.4f} = inputs {c['inputs']:.4f} + parameters (biases) "
          f"{c['parameters']:.4f} + absorbed {c['absorbed']:.4f}")
    s = att.stats
    print(f"graph: {s.nodes} nodes, {s.rules_run} rules run; Promise System: {s.promises} promises, "
          f"{s.internal_nodes} internal nodes, delta {s.delta}")
    print(f"relevance at module '3' (second conv): shape {tuple(att.modules['3'].shape)}")


if __name__ == "__main__":
    main()
