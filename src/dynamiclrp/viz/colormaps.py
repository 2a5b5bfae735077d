"""Diverging colour maps for relevance, as piecewise-linear tables (numpy only, no matplotlib).

Relevance is normalised symmetrically to ``[-1, 1]`` and mapped so that 0 falls on the map's centre colour:
negative relevance is blue/cyan, positive red/yellow, and zero is white (``bwr``, ``rdbu``), black (``coldhot``)
or mid grey (``gray``). ``reds`` shows positive relevance only (negative is clipped to white).
"""

from __future__ import annotations

import numpy as np

# (position in [0, 1], (r, g, b) in [0, 1]); 0.5 is relevance 0.
_TABLES: dict[str, list[tuple[float, tuple[float, float, float]]]] = {
    "bwr": [(0.0, (0.0, 0.0, 1.0)), (0.5, (1.0, 1.0, 1.0)), (1.0, (1.0, 0.0, 0.0))],
    # ColorBrewer RdBu, reversed (blue = negative)
    "rdbu": [(0.0, (0.020, 0.188, 0.380)), (0.1, (0.129, 0.400, 0.675)), (0.2, (0.263, 0.576, 0.765)),
             (0.3, (0.573, 0.773, 0.871)), (0.4, (0.820, 0.898, 0.941)), (0.5, (0.969, 0.969, 0.969)),
             (0.6, (0.992, 0.859, 0.780)), (0.7, (0.957, 0.647, 0.510)), (0.8, (0.839, 0.376, 0.302)),
             (0.9, (0.698, 0.094, 0.169)), (1.0, (0.404, 0.0, 0.122))],
    "coldhot": [(0.0, (0.0, 1.0, 1.0)), (0.25, (0.0, 0.0, 1.0)), (0.5, (0.0, 0.0, 0.0)),
                (0.75, (1.0, 0.0, 0.0)), (1.0, (1.0, 1.0, 0.0))],
    "gray": [(0.0, (0.0, 0.0, 0.0)), (1.0, (1.0, 1.0, 1.0))],
    "reds": [(0.0, (1.0, 1.0, 1.0)), (0.5, (1.0, 1.0, 1.0)), (0.75, (0.984, 0.416, 0.290)),
             (1.0, (0.404, 0.0, 0.051))],
}

COLORMAPS: tuple[str, ...] = tuple(_TABLES)
"""Names of the built-in colour maps."""


def colormap(name: str) -> np.ndarray:
    """The colour map ``name`` as a 255 × 3 float table (odd, so that 0 has its own row).

    Parameters
    ----------
    name : str
        One of :data:`COLORMAPS`, or any matplotlib colour map name (matplotlib is imported then).

    Returns
    -------
    numpy.ndarray
        Shape (255, 3), values in [0, 1]; row 127 is the colour of relevance 0 for diverging maps.

    Examples
    --------
    >>> colormap("bwr")[[0, -1]].tolist()
    [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """
    pos = np.linspace(0.0, 1.0, 255)
    if name in _TABLES:
        xs = np.array([p for p, _ in _TABLES[name]])
        cs = np.array([c for _, c in _TABLES[name]])
        return np.stack([np.interp(pos, xs, cs[:, k]) for k in range(3)], axis=1)
    try:
        import matplotlib

        cmap = matplotlib.colormaps[name]
    except (ImportError, KeyError):
        raise ValueError(f"unknown colour map {name!r}; built in: {', '.join(COLORMAPS)} "
                         "(or any matplotlib colour map when matplotlib is installed)") from None
    return np.asarray(cmap(pos))[:, :3]


def apply_colormap(values: np.ndarray, name: str = "bwr") -> np.ndarray:
    """Map values in ``[-1, 1]`` (0 = no relevance) to RGB ``uint8``.

    Examples
    --------
    >>> apply_colormap(np.array([-1.0, 0.0, 1.0]), "bwr").tolist()
    [[0, 0, 255], [255, 255, 255], [255, 0, 0]]
    """
    table = colormap(name)
    v = np.clip((np.nan_to_num(np.asarray(values, dtype=np.float64)) + 1.0) / 2.0, 0.0, 1.0)
    idx = np.rint(v * 254).astype(np.int64)
    return np.rint(table[idx] * 255).astype(np.uint8)
