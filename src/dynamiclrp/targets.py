"""Turning a target into seed relevance at an output.

Convention: by default the seed is the *output value* at the target (``seed="value"``), so that input relevance
sums to the explained prediction, less what biases, stabilisers and non-conservative rules absorb (see the
ledger). ``seed="one"`` puts 1 at the target instead (zennit's habit), so relevance sums to 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .errors import TargetError

Target = int | list | tuple | torch.Tensor | Callable | None


def make_seed(output: torch.Tensor, target: Target, seed: str = "value") -> torch.Tensor:
    """Seed relevance for one output tensor.

    ``target`` may be: None (the arg-max of the last dimension, per row); an int (a class index on the last
    dimension, for every row and position); a sequence or integer tensor with one index per row (shape
    ``output.shape[:-1]``, or ``(batch,)`` broadcast over positions); a float tensor of the output's shape (an
    explicit seed, used as given); or a callable on the output returning any of these.
    """
    if seed not in ("value", "one"):
        raise TargetError(f"seed must be 'value' or 'one', not {seed!r}")
    out = output.detach()
    if callable(target) and not isinstance(target, torch.Tensor):
        target = target(out)
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        if target.shape != out.shape:
            raise TargetError(f"an explicit seed must have the output's shape {tuple(out.shape)}, "
                              f"not {tuple(target.shape)}")
        if not bool(torch.isfinite(target).all()):
            raise TargetError("the explicit seed contains NaN or inf")
        return target.to(out.device)
    if out.dim() == 0:
        if target not in (None, 0):
            raise TargetError(f"a scalar output takes no class target, got {target!r}")
        return out.clone() if seed == "value" else torch.ones_like(out)
    idx = _indices(out, target)
    mask = torch.zeros_like(out, dtype=torch.bool).scatter_(-1, idx.unsqueeze(-1), True)
    base = out if seed == "value" else torch.ones_like(out)
    return torch.where(mask, base, torch.zeros_like(out))


def _indices(out: torch.Tensor, target: Any) -> torch.Tensor:
    lead, n = out.shape[:-1], out.shape[-1]
    if target is None:
        return out.argmax(-1)
    if isinstance(target, bool):
        raise TargetError("a target must be a class index, not a bool")
    if isinstance(target, int):
        idx = torch.full(lead, target, dtype=torch.long, device=out.device)
    else:
        try:
            idx = torch.as_tensor(target, device=out.device)
        except (TypeError, ValueError) as err:
            raise TargetError(f"cannot read target {target!r}: {err}") from None
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise TargetError(f"target indices must be integers, got dtype {idx.dtype}")
        idx = idx.long()
        if idx.shape != lead:
            if idx.dim() == 1 and len(lead) >= 1 and idx.shape[0] == lead[0]:
                idx = idx.view(-1, *([1] * (len(lead) - 1))).expand(lead)
            elif idx.dim() == 0:
                idx = idx.expand(lead)
            else:
                raise TargetError(f"target of shape {tuple(idx.shape)} does not fit an output of shape "
                                  f"{tuple(out.shape)}: give one index per row ({lead[0] if lead else 1})")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise TargetError(f"target index out of range for an output with {n} classes: "
                          f"{idx.min().item()}..{idx.max().item()}")
    return idx
