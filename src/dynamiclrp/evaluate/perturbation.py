r"""Pixel flipping / region perturbation: MoRF and LeRF curves, ABPC, comprehensiveness and sufficiency.

An attribution map ranks the input's units (pixels, or patches of pixels) from most to least relevant. The input is
then occluded cumulatively, a fixed number of units per step, in that order (*most relevant first*, MoRF [1]) or
in the reverse order (*least relevant first*, LeRF [2]); after each step the model's score for the explained class
is recorded. With :math:`f_k` the score after :math:`k` of :math:`K` steps and the fraction removed
:math:`t_k = k / K` on the x-axis, the trapezoidal area under a curve is

.. math:: \mathrm{AUC}(f) = \sum_{k=1}^{K} \frac{t_k - t_{k-1}}{2} (f_{k-1} + f_k) ,

and [1]-[4]

.. math::
    \mathrm{ABPC} &= \mathrm{AUC}(f^{\mathrm{LeRF}}) - \mathrm{AUC}(f^{\mathrm{MoRF}}) \quad (\uparrow) \\
    \mathrm{comprehensiveness} &= f_0 - \mathrm{AUC}(f^{\mathrm{MoRF}}) \quad (\uparrow) \\
    \mathrm{sufficiency} &= f_0 - \mathrm{AUC}(f^{\mathrm{LeRF}}) \quad (\downarrow)

(:math:`f_0` is the unoccluded score, so :math:`f_0 = \mathrm{AUC}` of the flat curve :math:`y = f_0`).
Comprehensiveness is the area over the MoRF curve, the AOPC of Samek et al. [1] in area form; comprehensiveness and
sufficiency are the ERASER measures of DeYoung et al. [3] in the area-under-curve form the DynamicLRP paper [4] uses.

Normalisation: the x-axis is the fraction removed, :math:`t \in [0, 1]`, so for probabilities every value lies in
:math:`[-1, 1]`. The DynamicLRP paper plots its curves against 0, 4, …, 196 and divides the area by the 49 steps,
which is 4× ours: pass ``scale=4`` to :meth:`PerturbationResult.summary` to compare with its tables.

Occluded units are replaced by the same units of a *replacement image*: a Gaussian-blurred copy (the paper's
kernel 51, σ 20 at 224 px, scaled to the image size), the per-image channel mean, or Gaussian noise.

The *score* is the softmax probability of the target (per sample), the target logit, or whether the arg-max equals
the label (``score="correct"``): its mean over a data set is the paper's dataset-accuracy curve, and since the areas
are linear in the curve, the mean of per-sample ABPC equals the ABPC of the mean curve.

References
----------
.. [1] W. Samek, A. Binder, G. Montavon, S. Lapuschkin, K.-R. Müller. Evaluating the visualization of what a deep
   neural network has learned. IEEE TNNLS 28(11), 2017.
.. [2] J. Blücher, J. Vielhaben, N. Strodthoff. Decoupling pixel flipping and occlusion strategy for consistent XAI
   benchmarks. TMLR, 2024 (arXiv 2401.06654; ABPC = area between the LeRF and MoRF curves).
.. [3] J. DeYoung, S. Jain, N. F. Rajani, E. Lehman, C. Xiong, R. Socher, B. C. Wallace. ERASER: A benchmark to
   evaluate rationalized NLP models. ACL 2020.
.. [4] K. Lee, S. Millan Arias. Always keep your promises: DynamicLRP. arXiv 2512.07010 (§5, ABPC protocol).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

AttributionFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "PerturbationResult", "auc", "blur_params", "evaluate", "gaussian_blur", "gaussian_kernel",
    "perturbation_curves", "replacement", "unit_scores",
]


# ----------------------------------------------------------------------------------------------- replacement


def blur_params(size: int, kernel_size: int = 51, sigma: float = 20.0, reference: int = 224) -> tuple[int, float]:
    """Kernel size and σ of the paper's blur (51, 20 at ``reference`` = 224 px) scaled to an image side ``size``.

    The kernel is rounded to the nearest odd size of at least 3: 224 px → (51, 20.0), 28 px → (7, 2.5).
    """
    k = max(3, int(round(kernel_size * size / reference)))
    if k % 2 == 0:
        k += 1
    return k, sigma * size / reference


def gaussian_kernel(kernel_size: int, sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    r"""Normalised 1-D Gaussian kernel :math:`g_i \propto \exp(-i^2 / 2\sigma^2)`, :math:`|i| \le (k-1)/2`."""
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, not {kernel_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, not {sigma}")
    i = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(i ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: torch.Tensor, kernel_size: int | None = None, sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur of images ``(N, C, H, W)``, each channel on its own, reflect padding (replicate
    where the image is smaller than the kernel). Without arguments: the paper's kernel scaled to the image size."""
    if x.dim() != 4:
        raise ValueError(f"gaussian_blur expects (N, C, H, W), got shape {tuple(x.shape)}")
    if kernel_size is None or sigma is None:
        k0, s0 = blur_params(min(x.shape[-2:]))
        kernel_size, sigma = kernel_size or k0, sigma or s0
    n, c, h, w = x.shape
    g = gaussian_kernel(kernel_size, sigma, x.dtype, x.device)
    p = kernel_size // 2
    mode = "reflect" if p < min(h, w) else "replicate"
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(F.pad(y, (p, p, 0, 0), mode=mode), g.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, p, p), mode=mode), g.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def replacement(x: torch.Tensor, kind: str | torch.Tensor | Callable = "blur", *,
                generator: torch.Generator | None = None, noise_std: float = 1.0) -> torch.Tensor:
    """The values that occluded units take: ``"blur"`` (Gaussian-blurred copy, paper kernel scaled), ``"mean"``
    (each image's per-channel mean), ``"noise"`` (N(0, ``noise_std``²) noise), ``"zero"``, a tensor broadcastable
    to ``x``, or a callable ``x -> tensor``."""
    if isinstance(kind, torch.Tensor):
        return kind.to(x).expand_as(x)
    if callable(kind):
        return kind(x)
    if kind == "blur":
        return gaussian_blur(x)
    if kind == "mean":
        dims = tuple(range(2, x.dim())) if x.dim() > 2 else (1,)
        return x.mean(dims, keepdim=True).expand_as(x)
    if kind == "noise":
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu" if generator is None
                            else generator.device)
        return (noise * noise_std).to(x.device)
    if kind == "zero":
        return torch.zeros_like(x)
    raise ValueError(f"unknown replacement {kind!r}: 'blur', 'mean', 'noise', 'zero', a tensor or a callable")


# ----------------------------------------------------------------------------------------------- ranking


def unit_scores(relevance: torch.Tensor, patch: int | None = None, reduce: str = "abs") -> torch.Tensor:
    """One score per unit and sample, ``(N, units)``, from relevance shaped like the input.

    Images ``(N, C, H, W)``: channels are reduced by ``reduce`` (``"abs"``: Σ|R| over channels, as the paper for
    VGG; ``"sum"``: signed ΣR, as the paper for ViT; ``"none"``: every channel value is its own unit), then with
    ``patch`` = p the map is max-pooled over p×p patches (units = patches, row-major). Vectors ``(N, D)``: one unit
    per feature (``reduce`` ``"abs"`` takes |R|).
    """
    r = relevance.detach()
    if r.dim() == 2:
        if patch is not None:
            raise ValueError("patch needs images (N, C, H, W)")
        return r.abs() if reduce == "abs" else r
    if r.dim() != 4:
        raise ValueError(f"relevance must be (N, D) or (N, C, H, W), got {tuple(r.shape)}")
    if reduce == "abs":
        r = r.abs().sum(1, keepdim=True)
    elif reduce == "sum":
        r = r.sum(1, keepdim=True)
    elif reduce != "none":
        raise ValueError(f"reduce must be 'abs', 'sum' or 'none', not {reduce!r}")
    if patch is not None:
        if r.shape[-1] % patch or r.shape[-2] % patch:
            raise ValueError(f"image {tuple(r.shape[-2:])} is not divisible into {patch}×{patch} patches")
        r = F.max_pool2d(r, patch)
    return r.flatten(1)


def _unit_mask(ranks: torch.Tensor, removed: torch.Tensor, shape: torch.Size, patch: int | None,
               channels: int, reduce: str) -> torch.Tensor:
    """Boolean mask shaped like the input: units with ``rank < removed`` (ranks (N, U), removed (S,))."""
    m = ranks[:, None, :] < removed[None, :, None]  # (N, S, U)
    n, s = m.shape[:2]
    if len(shape) == 2:
        return m
    h, w = shape[-2:]
    if reduce == "none":
        return m.view(n, s, channels, h, w)
    if patch is not None:
        m = m.view(n, s, h // patch, w // patch)
        m = m.repeat_interleave(patch, -2).repeat_interleave(patch, -1)
    return m.view(n, s, 1, h, w)


# ----------------------------------------------------------------------------------------------- curves


def _score(logits: torch.Tensor, target: torch.Tensor, label: torch.Tensor | None, score: str) -> torch.Tensor:
    if score == "prob":
        return logits.float().softmax(-1).gather(-1, target[:, None])[:, 0]
    if score == "logit":
        return logits.float().gather(-1, target[:, None])[:, 0]
    if score == "correct":
        return (logits.argmax(-1) == (target if label is None else label)).float()
    raise ValueError(f"score must be 'prob', 'logit' or 'correct', not {score!r}")


@torch.no_grad()
def perturbation_curves(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, relevance: torch.Tensor,
                        target: torch.Tensor | None = None, *, label: torch.Tensor | None = None, steps: int = 49,
                        per_step: int | None = None, patch: int | None = None, reduce: str = "abs",
                        replace: str | torch.Tensor | Callable = "blur", score: str = "prob",
                        orders: Iterable[str] = ("morf", "lerf"), batch_size: int = 256,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """MoRF / LeRF curves ``(N, steps + 1)`` of one batch of inputs.

    Parameters
    ----------
    model : callable
        ``model(x) -> logits (N, classes)``; run under ``torch.no_grad``.
    x : Tensor ``(N, C, H, W)`` or ``(N, D)``
    relevance : Tensor, shaped like ``x``
        Ranks the units (:func:`unit_scores` with ``patch`` and ``reduce``); ties are broken by position.
    target : Tensor ``(N,)``, optional
        The class whose score is recorded; default the prediction on the clean input.
    label : Tensor ``(N,)``, optional
        For ``score="correct"``: the true labels (default: ``target``).
    steps : int
        Number of occlusion steps K; step k occludes ``k * per_step`` units.
    per_step : int, optional
        Units per step; default ``ceil(units / steps)`` (the whole input is occluded at the last step).
    patch : int, optional
        Occlude p×p patches ranked by max-pooled relevance (the paper's ViT protocol: 16×16, 4 per step).
    reduce : {"abs", "sum", "none"}
        Channel reduction of the relevance before ranking.
    replace : str, Tensor or callable
        Replacement values (:func:`replacement`): ``"blur"`` (default), ``"mean"``, ``"noise"``, ``"zero"``, ...
    score : {"prob", "logit", "correct"} or a sequence of them
        Softmax probability of the target, its logit, or 1 if the arg-max equals the label. Several scores are
        read off the same forward passes; the keys are then ``"morf:prob"``, ``"lerf:correct"``, ...
    orders : iterable of {"morf", "lerf"}
    batch_size : int
        Perturbed inputs per forward pass.

    Returns
    -------
    dict
        ``{"morf": (N, steps+1), "lerf": (N, steps+1)}`` (the orders asked for), on ``x``'s device, float32.
    """
    if relevance.shape != x.shape:
        raise ValueError(f"relevance {tuple(relevance.shape)} must have the input's shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        return {o: torch.zeros(0, steps + 1, device=x.device) for o in orders}
    single = isinstance(score, str)
    scores = [score] if single else list(score)
    ranking = unit_scores(relevance.to(x.device), patch, reduce)
    if not bool(torch.isfinite(ranking).all()):
        raise ValueError("relevance contains NaN or inf")
    n, units = ranking.shape
    per_step = per_step or math.ceil(units / steps)
    removed = (torch.arange(steps + 1, device=x.device) * per_step).clamp(max=units)
    baseline = replacement(x, replace, generator=generator)
    if target is None:
        target = model(x).argmax(-1)
    target = torch.as_tensor(target, device=x.device).reshape(n)
    label = None if label is None else torch.as_tensor(label, device=x.device).reshape(n)
    # stable sort: ties keep their position, so a constant map removes units in reading order
    order = torch.sort(ranking, dim=1, descending=True, stable=True).indices
    morf_rank = torch.empty_like(order)
    morf_rank.scatter_(1, order, torch.arange(units, device=x.device).expand(n, units))
    out = {}
    channels = x.shape[1] if x.dim() == 4 else 1
    for o in orders:
        if o not in ("morf", "lerf"):
            raise ValueError(f"order must be 'morf' or 'lerf', not {o!r}")
        ranks = morf_rank if o == "morf" else units - 1 - morf_rank
        curve = torch.empty(len(scores), n, steps + 1, device=x.device)
        # process whole samples' step series in chunks of about batch_size perturbed inputs
        per = max(1, batch_size // (steps + 1))
        for i in range(0, n, per):
            sl = slice(i, i + per)
            mask = _unit_mask(ranks[sl], removed, x.shape, patch, channels, reduce)  # (b, S, ...)
            xs = torch.where(mask, baseline[sl, None], x[sl, None])
            flat = xs.reshape(-1, *x.shape[1:])
            b = xs.shape[0]
            tgt = target[sl].repeat_interleave(steps + 1)
            lab = None if label is None else label[sl].repeat_interleave(steps + 1)
            vals = torch.cat([_scores(model(flat[j:j + batch_size]), tgt[j:j + batch_size],
                                      None if lab is None else lab[j:j + batch_size], scores)
                              for j in range(0, flat.shape[0], batch_size)], 1)
            curve[:, sl] = vals.view(len(scores), b, steps + 1)
        for si, sc in enumerate(scores):
            out[o if single else f"{o}:{sc}"] = curve[si]
    return out


def _scores(logits, target, label, scores):
    return torch.stack([_score(logits, target, label, s) for s in scores])


def auc(curve: torch.Tensor, fractions: torch.Tensor | None = None) -> torch.Tensor:
    """Trapezoidal area under ``curve`` (``(..., K+1)``) over the fraction removed (default ``k / K``)."""
    k = curve.shape[-1] - 1
    if k < 1:
        raise ValueError("a curve needs at least two points")
    if fractions is None:
        fractions = torch.linspace(0, 1, k + 1, dtype=torch.float64, device=curve.device)
    return torch.trapezoid(curve.double(), fractions.to(curve.device).double(), dim=-1)


@dataclass
class PerturbationResult:
    """Curves of a perturbation run and the metrics read off them.

    ``morf`` and ``lerf`` are ``(N, K+1)`` per-sample curves (row i is sample i of the data set, in order).
    Per-sample metrics are properties (tensors of shape ``(N,)``); :meth:`summary` gives their means.
    """

    morf: torch.Tensor
    lerf: torch.Tensor
    fractions: torch.Tensor
    score: str = "prob"
    meta: dict = field(default_factory=dict)

    @property
    def auc_morf(self) -> torch.Tensor:
        return auc(self.morf, self.fractions)

    @property
    def auc_lerf(self) -> torch.Tensor:
        return auc(self.lerf, self.fractions)

    @property
    def abpc(self) -> torch.Tensor:
        """AUC(LeRF) − AUC(MoRF) per sample (↑)."""
        return self.auc_lerf - self.auc_morf

    @property
    def comprehensiveness(self) -> torch.Tensor:
        """f₀ − AUC(MoRF) per sample (↑)."""
        return self.morf[:, 0].double() - self.auc_morf

    @property
    def sufficiency(self) -> torch.Tensor:
        """f₀ − AUC(LeRF) per sample (↓)."""
        return self.lerf[:, 0].double() - self.auc_lerf

    def mean_curves(self) -> dict[str, torch.Tensor]:
        """Mean MoRF and LeRF curves (for ``score="correct"``: the data-set accuracy after each step)."""
        return {"morf": self.morf.double().mean(0), "lerf": self.lerf.double().mean(0)}

    def summary(self, scale: float = 1.0) -> dict[str, float]:
        """Means over samples of ABPC, comprehensiveness, sufficiency, AUCs (×``scale``; 4 gives the paper's
        normalisation) and the count ``n``."""
        out = {k: float(getattr(self, k).mean()) * scale
               for k in ("abpc", "comprehensiveness", "sufficiency", "auc_morf", "auc_lerf")}
        out["n"] = int(self.morf.shape[0])
        return out


# ----------------------------------------------------------------------------------------------- data-set runs


def _dist():
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def _gather_rows(t: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    """All-gather per-rank rows (sample indices ``index``) into ``(total, ...)`` in data-set order."""
    d = torch.distributed
    world = d.get_world_size()
    # pad to the largest shard so that every rank sends the same shape
    count = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    d.all_gather(counts, count)
    most = int(max(c.item() for c in counts))
    pad = torch.zeros(most, *t.shape[1:], dtype=t.dtype, device=t.device)
    pad[:t.shape[0]] = t
    ipad = torch.full((most,), -1, dtype=torch.long, device=t.device)
    ipad[:t.shape[0]] = index.to(t.device)
    rows = [torch.zeros_like(pad) for _ in range(world)]
    idxs = [torch.zeros_like(ipad) for _ in range(world)]
    d.all_gather(rows, pad)
    d.all_gather(idxs, ipad)
    out = torch.zeros(total, *t.shape[1:], dtype=t.dtype, device=t.device)
    for r, i, c in zip(rows, idxs, counts):
        c = int(c.item())
        out[i[:c]] = r[:c]
    return out


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attribution: AttributionFn, *,
             target: str | torch.Tensor = "label", batch_size: int = 64, eval_batch_size: int = 256,
             steps: int = 49, per_step: int | None = None, patch: int | None = None, reduce: str = "abs",
             replace: str | torch.Tensor | Callable = "blur", score: str = "prob", device=None,
             progress: bool = True, desc: str = "perturbation", seed: int = 0) -> PerturbationResult:
    """Perturbation curves of a data set for one attribution function, batched, on any device, sharded over
    ``torch.distributed`` processes when a process group is initialised.

    Parameters
    ----------
    model : nn.Module
        Classifier, ``model(x) -> logits``. Put it in eval mode first.
    x, y : Tensor
        Inputs ``(N, ...)`` and true labels ``(N,)`` (on any device; batches are moved to ``device``).
    attribution : callable
        ``attribution(model, inputs, targets) -> relevance`` shaped like ``inputs`` (dynamiclrp, zennit, Captum,
        LXT, random, ... — see :func:`dynamiclrp.evaluate.lrp`).
    target : "label", "prediction" or Tensor
        What is explained and scored: the true class (the paper), the predicted class, or given indices.
    batch_size : int
        Samples per attribution call; ``eval_batch_size``: perturbed inputs per forward pass.
    steps, per_step, patch, reduce, replace, score
        As in :func:`perturbation_curves`.
    device : torch.device, optional
        Default: the model's device.
    progress : bool
        Show a tqdm progress bar (rank 0 only).
    seed : int
        Seed of the noise replacement (per sample index, so a sharded run draws the same noise).

    Returns
    -------
    PerturbationResult, or a dict score -> PerturbationResult when ``score`` is a sequence
        With the curves of all N samples, in data-set order, on every rank (gathered with ``all_gather``:
        gloo on CPU, NCCL on GPU).

    Notes
    -----
    Distributed: launch with ``torchrun --nproc_per_node P script.py`` and call
    ``torch.distributed.init_process_group("gloo" or "nccl")`` before; rank r takes samples r, r+P, r+2P, ...
    """
    rank, world = _dist()
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    n = x.shape[0]
    index = torch.arange(rank, n, world)
    scores = [score] if isinstance(score, str) else list(score)
    parts = []
    bar = tqdm(total=len(index), desc=desc, disable=not progress or rank != 0, leave=False)
    for i in range(0, len(index), batch_size):
        idx = index[i:i + batch_size]
        xb = x[idx].to(device)
        yb = y[idx].to(device)
        if isinstance(target, torch.Tensor):
            tb = target[idx].to(device)
        elif target == "label":
            tb = yb
        elif target == "prediction":
            with torch.no_grad():
                tb = model(xb).argmax(-1)
        else:
            raise ValueError(f"target must be 'label', 'prediction' or a tensor, not {target!r}")
        rel = attribution(model, xb, tb)
        if isinstance(rel, (tuple, list)):
            rel = rel[0]
        rel = rel.detach().to(device)
        rep = replace
        if replace == "noise":
            noise = torch.stack([torch.randn(xb.shape[1:], generator=torch.Generator().manual_seed(seed + int(j)))
                                 for j in idx])
            rep = noise.to(device=device, dtype=xb.dtype)
        c = perturbation_curves(model, xb, rel, tb, label=yb, steps=steps, per_step=per_step, patch=patch,
                                reduce=reduce, replace=rep, score=score, batch_size=eval_batch_size)
        parts.append(c)
        bar.update(len(idx))
    bar.close()
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    meta = {"steps": steps, "patch": patch, "replace": replace if isinstance(replace, str) else "custom",
            "reduce": reduce, "world_size": world}
    results = {}
    for sc in scores:
        curves = []
        for o in ("morf", "lerf"):
            key = o if isinstance(score, str) else f"{o}:{sc}"
            t = torch.cat([c[key] for c in parts]) if parts else torch.zeros(0, steps + 1, device=device)
            curves.append(_gather_rows(t, index, n) if world > 1 else t)
        results[sc] = PerturbationResult(curves[0].cpu(), curves[1].cpu(), fractions, sc, meta=dict(meta))
    return results[score] if isinstance(score, str) else results
