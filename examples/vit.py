"""Explain a Vision Transformer (torchvision's ``VisionTransformer``) with the AttnLRP and CP-LRP presets.

No pretrained ViT ships offline, so this builds a small random-weight one (the same code runs on
``torchvision.models.vit_b_16`` with real weights: ``dynamiclrp explain image torchvision:vit_b_16 --weights
vit.safetensors --preset attnlrp photo.jpg``). It prints where relevance went and a coarse patch map.

Run: ``python examples/vit.py``
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torchvision.models.vision_transformer import VisionTransformer

import dynamiclrp
from dynamiclrp import viz


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                              mlp_dim=128, num_classes=10).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero: logits 0
    x = torch.randn(2, 3, 32, 32)

    for preset in ("attnlrp", "cp_lrp"):
        att = dynamiclrp.explain(model, x, preset=preset)
        c = att.conservation()
        print(f"{preset:8s} seed {c['seed']:+.4f} = inputs {c['inputs']:+.4f} + parameters {c['parameters']:+.4f}"
              f" + absorbed {c['absorbed']:+.4f}; {att.stats.nodes} graph nodes")

    # relevance per 8x8 patch of the first image (AttnLRP)
    att = dynamiclrp.explain(model, x, preset="attnlrp")
    patches = att.inputs[0][0].sum(0).unfold(0, 8, 8).unfold(1, 8, 8).sum((-1, -2))
    print("relevance per patch (image 0):")
    for row in patches.tolist():
        print("  " + " ".join(f"{v:+.3f}" for v in row))

    report = dynamiclrp.coverage(model, x[:1], preset="attnlrp")
    print(f"coverage: {report.covered_nodes}/{report.nodes} nodes have an explicit rule")
    out = Path(tempfile.gettempdir()) / "dynamiclrp-examples" / "vit_lrp.png"
    viz.save_png(viz.grid([viz.to_image(x[0]), viz.heatmap(att.inputs[0][0], percentile=100)], pad=2), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
