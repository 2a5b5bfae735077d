"""Make docs/demo.png, the README's picture: two scikit-image photos explained by the pretrained EfficientNet-Lite0
(preset epsilon_gamma_box): photo, heatmap, overlay. Run: ``python docs/make_demo_png.py``."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from skimage import data

import dynamiclrp
from dynamiclrp import viz
from dynamiclrp.integrations.models import efficientnet_lite0, prepare_image


def main() -> None:
    torch.set_num_threads(1)
    model = efficientnet_lite0()
    tiles = []
    for name in ("chelsea", "coffee"):
        x, shown = prepare_image(getattr(data, name)(), 224)
        att = dynamiclrp.explain(model, x, preset="epsilon_gamma_box")
        r = att.inputs[0][0]
        tiles += [shown, viz.heatmap(r), viz.overlay(shown, r)]
    img = Image.fromarray(viz.grid(tiles, ncols=6, pad=4))
    img = img.resize((1120, round(1120 * img.height / img.width)), Image.LANCZOS)
    out = Path(__file__).with_name("demo.png")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
