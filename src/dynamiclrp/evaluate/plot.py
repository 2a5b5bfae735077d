"""Curve plots (matplotlib, imported here only, Agg backend) saved as PNG."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

from .perturbation import PerturbationResult

__all__ = ["plot_curves"]


def plot_curves(results: Mapping[str, PerturbationResult], path: str | pathlib.Path, *, title: str = "",
                ylabel: str | None = None, dpi: int = 80) -> pathlib.Path:
    """Mean MoRF (left) and LeRF (right) curve of each method, one colour and dash pattern per method, as PNG.

    Parameters
    ----------
    results : mapping name -> PerturbationResult
    path : str or Path
        Where the PNG goes (folders are created).
    title, ylabel : str
    dpi : int
        Resolution (80 keeps a 7×4 inch figure well under 100 KB).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    cmap = plt.get_cmap("tab20")
    styles = ["-", (0, (4, 1.5)), (0, (1, 1)), (0, (4, 1, 1, 1))]  # several methods may coincide: vary the dashes
    for i, (name, res) in enumerate(results.items()):
        curves = res.mean_curves()
        x = res.fractions.numpy()
        s = res.summary()
        colour = cmap(i % 20)
        ls = styles[(i // 20 + i) % len(styles)]
        axes[0].plot(x, curves["morf"].numpy(), color=colour, lw=1.3, ls=ls, label=f"{name} ({s['abpc']:.3f})")
        axes[1].plot(x, curves["lerf"].numpy(), color=colour, lw=1.3, ls=ls)
    score = next(iter(results.values())).score if results else "prob"
    ylabel = ylabel or {"prob": "target probability", "logit": "target logit", "correct": "accuracy"}[score]
    axes[0].set_title("MoRF (most relevant first)", fontsize=9)
    axes[1].set_title("LeRF (least relevant first)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("fraction removed")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    fig.legend(loc="center left", bbox_to_anchor=(0.7, 0.5), fontsize=7, title="method (ABPC)", title_fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.7, 1))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


