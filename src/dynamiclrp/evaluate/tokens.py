r"""Token metrics: top-k accuracy against known deciding tokens, IoU with a span, token deletion curves.

For a sequence with token relevance :math:`R_1 … R_T`, the top-k set :math:`\mathrm{top}_k(R)` holds the k
positions of largest relevance among the *allowed* ones (padding, special or question tokens masked out, as the
DynamicLRP paper masks the question in SQuAD [1]). Against a set :math:`G` of ground-truth positions:

.. math::
    \mathrm{acc}@k = \frac{|\mathrm{top}_k(R) \cap G|}{k}, \qquad
    \mathrm{IoU}@k = \frac{|\mathrm{top}_k(R) \cap G|}{|\mathrm{top}_k(R) \cup G|}

averaged over sequences; the pooled IoU :math:`\sum |\cap| / \sum |\cup|` is the paper's dataset IoU [1].
acc@1 is the paper's "top-1" and acc@2 its "top-2" (hits / 2N). LXT's AttnLRP paper [2] reports the same
top-1 accuracy and an IoU against the answer span on SQuAD.

Token deletion replaces tokens by a filler id (``[MASK]``, ``[UNK]``, padding, …) most relevant first (MoRF) or
least relevant first (LeRF), and records the target's probability — the ERASER comprehensiveness / sufficiency
protocol [3] as curves; the areas are read off as for images (:class:`~dynamiclrp.evaluate.PerturbationResult`).

References
----------
.. [1] K. Lee, S. Millan Arias. Always keep your promises: DynamicLRP. arXiv 2512.07010 (§5, SQuADv2).
.. [2] R. Achtibat et al. AttnLRP: attention-aware layer-wise relevance propagation for transformers. ICML 2024.
.. [3] J. DeYoung et al. ERASER: A benchmark to evaluate rationalized NLP models. ACL 2020.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .perturbation import PerturbationResult, _score

__all__ = ["as_mask", "token_deletion", "topk_accuracy", "topk_iou", "topk_positions"]


def as_mask(positions: torch.Tensor | Sequence[Sequence[int]], shape: tuple[int, int],
            device=None) -> torch.Tensor:
    """A boolean ``(N, T)`` mask from a mask (returned as bool) or from one list of positions per sequence."""
    if isinstance(positions, torch.Tensor) and positions.shape == torch.Size(shape):
        return positions.to(device=device, dtype=torch.bool)
    m = torch.zeros(shape, dtype=torch.bool, device=device)
    for i, ps in enumerate(positions):
        for p in ps:
            m[i, int(p)] = True
    return m


def topk_positions(relevance: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``(N, k)`` of the k most relevant allowed tokens (signed relevance; ties by position)."""
    r = relevance.detach().double()
    if r.dim() != 2:
        raise ValueError(f"token relevance must be (N, T), got {tuple(r.shape)}")
    if allowed is not None:
        allowed = allowed.to(r.device, torch.bool)
        if bool((allowed.sum(1) < k).any()):
            raise ValueError(f"a sequence has fewer than k={k} allowed tokens")
        r = r.masked_fill(~allowed, -torch.inf)
    return torch.sort(r, dim=1, descending=True, stable=True).indices[:, :k]


def _hits(relevance, truth, k, allowed):
    n, t = relevance.shape
    g = as_mask(truth, (n, t), relevance.device)
    top = torch.zeros(n, t, dtype=torch.bool, device=relevance.device)
    top.scatter_(1, topk_positions(relevance, k, allowed), True)
    return top, g


def topk_accuracy(relevance: torch.Tensor, truth, k: int = 1, allowed: torch.Tensor | None = None,
                  reduction: str = "mean") -> torch.Tensor | float:
    """Fraction of the top-k relevant tokens that are ground-truth tokens, ``|top_k ∩ G| / k``.

    Parameters
    ----------
    relevance : Tensor ``(N, T)``
    truth : bool Tensor ``(N, T)`` or sequence of position lists
    k : int
    allowed : bool Tensor ``(N, T)``, optional
        Tokens that may be ranked (mask padding / special / question tokens).
    reduction : {"mean", "none"}
    """
    top, g = _hits(relevance, truth, k, allowed)
    acc = (top & g).sum(1).double() / k
    return float(acc.mean()) if reduction == "mean" else acc


def topk_iou(relevance: torch.Tensor, truth, k: int | None = None, allowed: torch.Tensor | None = None,
             reduction: str = "mean") -> torch.Tensor | float:
    """IoU of the top-k set with the ground-truth span, ``|top_k ∩ G| / |top_k ∪ G|``.

    ``k`` defaults to each sequence's own span size ``|G|``. ``reduction``: ``"mean"`` (average of per-sequence
    IoU), ``"pooled"`` (Σ∩ / Σ∪, the paper's data-set IoU) or ``"none"``.
    """
    n, t = relevance.shape
    g = as_mask(truth, (n, t), relevance.device)
    if k is None:
        inter, union = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for i in range(n):
            ki = int(g[i].sum())
            top, gi = _hits(relevance[i:i + 1], g[i:i + 1], max(ki, 1), None if allowed is None else allowed[i:i + 1])
            inter[i] = float((top & gi).sum())
            union[i] = float((top | gi).sum())
    else:
        top, g = _hits(relevance, g, k, allowed)
        inter, union = (top & g).sum(1).double().cpu(), (top | g).sum(1).double().cpu()
    if reduction == "pooled":
        return float(inter.sum() / union.sum())
    iou = inter / union.clamp(min=1)
    return float(iou.mean()) if reduction == "mean" else iou


@torch.no_grad()
def token_deletion(model: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                   relevance: torch.Tensor, target: torch.Tensor | None = None, *, filler: int,
                   allowed: torch.Tensor | None = None, steps: int | None = None, score: str = "prob",
                   batch_size: int = 256) -> PerturbationResult:
    """Token deletion curves: replace the allowed tokens by ``filler``, MoRF and LeRF.

    Parameters
    ----------
    model : callable
        ``model(input_ids) -> logits (N, classes)`` (wrap a Hugging Face model to select its logits; any attention
        mask is the caller's to close over).
    input_ids : Tensor ``(N, T)``
    relevance : Tensor ``(N, T)``
    target : Tensor ``(N,)``, optional
        Class to score; default the clean prediction.
    filler : int
        Token id that replaces deleted tokens.
    allowed : bool Tensor ``(N, T)``, optional
        Tokens that may be deleted (default all); the others are never touched.
    steps : int, optional
        Steps K (default: the largest number of allowed tokens); at step k, ``round(k/K · n_i)`` of the n_i
        allowed tokens of sequence i are deleted.
    score : {"prob", "logit", "correct"}

    Returns
    -------
    PerturbationResult
        ``(N, K+1)`` curves; ABPC, comprehensiveness and sufficiency as for images.
    """
    n, t = input_ids.shape
    dev = input_ids.device
    allowed = torch.ones(n, t, dtype=torch.bool, device=dev) if allowed is None else allowed.to(dev, torch.bool)
    counts = allowed.sum(1)
    steps = steps or int(counts.max())
    if target is None:
        target = model(input_ids).argmax(-1)
    r = relevance.detach().double().to(dev)
    out = {}
    for order in ("morf", "lerf"):
        key = r if order == "morf" else -r
        idx = torch.sort(key.masked_fill(~allowed, -torch.inf), dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(idx)
        rank.scatter_(1, idx, torch.arange(t, device=dev).expand(n, t))
        k = torch.round(torch.arange(steps + 1, device=dev)[None, :] / steps * counts[:, None]).long()  # (N, S)
        mask = (rank[:, None, :] < k[:, :, None]) & allowed[:, None, :]
        ids = torch.where(mask, torch.full_like(input_ids, filler)[:, None], input_ids[:, None]).reshape(-1, t)
        tgt = target.to(dev).repeat_interleave(steps + 1)
        vals = torch.cat([_score(model(ids[j:j + batch_size]), tgt[j:j + batch_size], None, score)
                          for j in range(0, ids.shape[0], batch_size)])
        out[order] = vals.view(n, steps + 1).cpu()
    return PerturbationResult(out["morf"], out["lerf"], torch.linspace(0, 1, steps + 1, dtype=torch.float64), score,
                              meta={"filler": filler})
