"""Heatmaps of relevance: images (:mod:`dynamiclrp.viz.image`) and tokens (:mod:`dynamiclrp.viz.text`).

Rendering to arrays, HTML and ANSI needs numpy only; saving PNGs needs Pillow, and the figure with a colour bar
needs matplotlib (both imported when used, never by ``import dynamiclrp``).

>>> import numpy as np
>>> from dynamiclrp import viz
>>> rgb = viz.heatmap(np.array([[1.0, 0.0], [-1.0, 0.5]]))
>>> rgb.shape, rgb.dtype.name
((2, 2, 3), 'uint8')
"""

from .colormaps import COLORMAPS, apply_colormap, colormap
from .image import (
    grid,
    heatmap,
    overlay,
    relevance_map,
    save_heatmap_figure,
    save_png,
    symmetric_normalize,
    to_image,
)
from .text import Word, group_tokens, save_token_html, token_ansi, token_html, token_html_page

__all__ = [
    "COLORMAPS", "Word", "apply_colormap", "colormap", "grid", "group_tokens", "heatmap", "overlay",
    "relevance_map", "save_heatmap_figure", "save_png", "save_token_html", "symmetric_normalize", "to_image",
    "token_ansi", "token_html", "token_html_page",
]
