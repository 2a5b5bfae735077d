"""Image heatmaps: relevance → RGB with symmetric normalisation, overlays, grids, PNG files with a colour bar.

Relevance of an image is a tensor shaped like the input, ``(C, H, W)`` (or ``(1, C, H, W)``); :func:`relevance_map`
sums it over channels into one ``(H, W)`` map. Normalisation is *symmetric*: values are divided by one scale for
both signs (the largest ``|R|``, or a high percentile of ``|R|`` so that a few extreme pixels do not wash the map
out), so that 0 stays on the colour map's centre and red and blue are comparable.

>>> import numpy as np
>>> rel = np.zeros((3, 4, 4)); rel[0, 1, 1] = 2.0; rel[1, 2, 2] = -1.0
>>> m = relevance_map(rel)
>>> float(symmetric_normalize(m)[1, 1]), float(symmetric_normalize(m)[2, 2])
(1.0, -0.5)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .colormaps import apply_colormap

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; half/bfloat16 (which numpy cannot hold) as float64
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        x = x.numpy()
    return np.asarray(x)


def relevance_map(relevance: Any, reduce: str = "sum") -> np.ndarray:
    """One ``(H, W)`` map from an image relevance of shape ``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)``.

    Parameters
    ----------
    relevance : Tensor or array-like
        Relevance of one image (channels first), e.g. ``att.inputs[0][i]``.
    reduce : {"sum", "abs", "max"}
        How channels are combined: signed sum (default, conserves relevance), sum of ``|R|``, or the channel
        value with the largest magnitude.

    Returns
    -------
    numpy.ndarray
        Float64 array of shape ``(H, W)``.
    """
    r = _numpy(relevance).astype(np.float64)
    while r.ndim > 3 and r.shape[0] == 1:
        r = r[0]
    if r.ndim == 2:
        return r
    if r.ndim != 3:
        raise ValueError(f"expected relevance of shape (H, W), (C, H, W) or (1, C, H, W), got {r.shape}")
    if reduce == "sum":
        return r.sum(0)
    if reduce == "abs":
        return np.abs(r).sum(0)
    if reduce == "max":
        idx = np.abs(r).argmax(0)
        return np.take_along_axis(r, idx[None], 0)[0]
    raise ValueError(f"reduce must be 'sum', 'abs' or 'max', not {reduce!r}")


def symmetric_normalize(values: Any, percentile: float = 100.0, scale: float | None = None) -> np.ndarray:
    """Divide by one scale for both signs and clip to ``[-1, 1]``: 0 stays 0.

    Parameters
    ----------
    values : array-like
    percentile : float
        The scale is this percentile of ``|values|`` (100: the largest magnitude; 99.5 keeps a few outliers from
        dominating).
    scale : float, optional
        Use this scale instead (e.g. one shared by several maps).

    Returns
    -------
    numpy.ndarray
        Values in ``[-1, 1]``; all zeros when every value is 0.
    """
    v = np.nan_to_num(_numpy(values).astype(np.float64))
    if scale is None:
        scale = float(np.percentile(np.abs(v), percentile)) if v.size else 0.0
    if not scale > 0:
        return np.zeros_like(v)
    return np.clip(v / scale, -1.0, 1.0)


def heatmap(relevance: Any, cmap: str = "bwr", percentile: float = 99.5, reduce: str = "sum",
            scale: float | None = None) -> np.ndarray:
    """Relevance → RGB ``uint8`` heatmap ``(H, W, 3)`` with symmetric normalisation.

    Parameters
    ----------
    relevance : Tensor or array-like
        ``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)``.
    cmap : str
        A colour map of :mod:`dynamiclrp.viz.colormaps` (``bwr``, ``rdbu``, ``coldhot``, ``gray``, ``reds``) or of
        matplotlib.
    percentile, scale
        As in :func:`symmetric_normalize`.
    reduce
        As in :func:`relevance_map`.

    Examples
    --------
    >>> heatmap(np.array([[0.0, 1.0]]), cmap="bwr", percentile=100).tolist()
    [[[255, 255, 255], [255, 0, 0]]]
    """
    return apply_colormap(symmetric_normalize(relevance_map(relevance, reduce), percentile, scale), cmap)


def to_image(image: Any, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """An input image as RGB ``uint8`` ``(H, W, 3)``.

    Accepts ``(H, W, 3)``/``(H, W)`` arrays (uint8, or floats in [0, 1]) and channels-first tensors ``(C, H, W)``
    or ``(1, C, H, W)``; ``mean``/``std`` undo a normalisation first (e.g. :data:`IMAGENET_MEAN`,
    :data:`IMAGENET_STD`).
    """
    a = _numpy(image)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    channels_first = hasattr(image, "detach") or a.shape[-1] not in (1, 3)  # tensors are channels first
    if a.ndim == 3 and a.shape[0] in (1, 3) and channels_first:
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"cannot read an image of shape {a.shape}")
    if a.dtype == np.uint8:
        out = a
    else:
        f = a.astype(np.float64)
        if mean is not None and std is not None:
            f = f * np.asarray(std)[: f.shape[-1]] + np.asarray(mean)[: f.shape[-1]]
        elif f.min() < 0 or f.max() > 1:  # unknown normalisation: stretch to [0, 1]
            lo, hi = f.min(), f.max()
            f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
        out = np.rint(np.clip(f, 0, 1) * 255).astype(np.uint8)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out


def _resize(rgb: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W, C) array (numpy only)."""
    if rgb.shape[:2] == shape:
        return rgb
    rows = (np.arange(shape[0]) * rgb.shape[0] / shape[0]).astype(int)
    cols = (np.arange(shape[1]) * rgb.shape[1] / shape[1]).astype(int)
    return rgb[rows][:, cols]


def overlay(image: Any, relevance: Any, alpha: float = 0.7, cmap: str = "bwr", percentile: float = 99.5,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """The heatmap blended over a greyscale copy of the image, opaque where ``|R|`` is large.

    Each pixel is ``(1 - w) · grey + w · colour`` with ``w = alpha · |R|/scale``, so regions without relevance show
    the image and relevant regions show the colour.

    Parameters
    ----------
    image : array-like or Tensor
        As in :func:`to_image` (``mean``/``std`` undo a normalisation).
    relevance : array-like or Tensor
        As in :func:`heatmap`; resized (nearest) to the image when the sizes differ.
    alpha : float
        Largest weight of the heatmap.

    Returns
    -------
    numpy.ndarray
        RGB ``uint8`` ``(H, W, 3)``.
    """
    img = to_image(image, mean, std).astype(np.float64)
    grey = np.repeat((img @ np.array([0.299, 0.587, 0.114]))[..., None], 3, -1)
    norm = symmetric_normalize(relevance_map(relevance), percentile)
    col = apply_colormap(norm, cmap).astype(np.float64)
    w = alpha * np.abs(norm)[..., None]
    col, w = _resize(col, img.shape[:2]), _resize(w, img.shape[:2])
    return np.rint((1 - w) * (0.6 * grey + 102) + w * col).clip(0, 255).astype(np.uint8)


def grid(images: Sequence[np.ndarray], ncols: int | None = None, pad: int = 4, fill: int = 255) -> np.ndarray:
    """Tile RGB ``uint8`` images (any sizes) into one image, row by row.

    Examples
    --------
    >>> grid([np.zeros((2, 2, 3), np.uint8)] * 3, ncols=2, pad=1).shape
    (7, 7, 3)
    """
    if not images:
        raise ValueError("no images to tile")
    ims = [to_image(i) for i in images]
    ncols = ncols or len(ims)
    nrows = -(-len(ims) // ncols)
    h = max(i.shape[0] for i in ims)
    w = max(i.shape[1] for i in ims)
    out = np.full((pad + nrows * (h + pad), pad + ncols * (w + pad), 3), fill, np.uint8)
    for k, im in enumerate(ims):
        r, c = divmod(k, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y:y + im.shape[0], x:x + im.shape[1]] = im
    return out


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Save an RGB ``uint8`` array as PNG (needs Pillow)."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("saving PNGs needs Pillow: pip install 'dynamiclrp[viz]'") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_image(image)).save(path, format="PNG", optimize=True)
    return path


def save_heatmap_figure(path: str | Path, images: Sequence[Any], relevances: Sequence[Any],
                        titles: Sequence[str] | None = None, cmap: str = "bwr", percentile: float = 99.5,
                        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                        panels: Sequence[str] = ("image", "heatmap", "overlay"), dpi: int = 80) -> Path:
    """A PNG with one row per image (input, heatmap, overlay) and a colour bar in relevance units per row.

    Needs matplotlib (imported here, with the non-interactive Agg backend).

    Parameters
    ----------
    path : str or Path
        Where to write the PNG.
    images, relevances : sequences of the same length
        Inputs (as for :func:`to_image`) and their relevance (as for :func:`heatmap`).
    titles : sequence of str, optional
        One title per row (e.g. the explained class and its logit).
    panels : sequence of {"image", "heatmap", "overlay"}
        Columns to draw.

    Returns
    -------
    Path
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap, Normalize
    except ImportError:
        raise ImportError("figures need matplotlib: pip install 'dynamiclrp[viz]'") from None
    from .colormaps import colormap

    if len(images) != len(relevances):
        raise ValueError(f"{len(images)} images but {len(relevances)} relevance maps")
    n, k = len(images), len(panels)
    fig, axes = plt.subplots(n, k + 1, figsize=(2.6 * k + 0.5, 2.7 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * k + [0.07]})
    lut = ListedColormap(colormap(cmap))
    for row, (img, rel) in enumerate(zip(images, relevances)):
        m = relevance_map(rel)
        scale = float(np.percentile(np.abs(m), percentile)) or 1.0
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            if panel == "image":
                ax.imshow(to_image(img, mean, std))
                ax.set_title(titles[row] if titles is not None else "input", fontsize=9)
            elif panel == "heatmap":
                ax.imshow(heatmap(m, cmap, scale=scale))
                ax.set_title(f"relevance (sum {m.sum():.3g})", fontsize=9)
            elif panel == "overlay":
                ax.imshow(overlay(img, m, cmap=cmap, percentile=percentile, mean=mean, std=std))
                ax.set_title("overlay", fontsize=9)
            else:
                raise ValueError(f"unknown panel {panel!r}; use image, heatmap or overlay")
            ax.axis("off")
        sm = plt.cm.ScalarMappable(norm=Normalize(-scale, scale), cmap=lut)
        cb = fig.colorbar(sm, cax=axes[row, k])
        cb.ax.tick_params(labelsize=7)
        cb.set_label("relevance", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    plt.close(fig)
    return path
