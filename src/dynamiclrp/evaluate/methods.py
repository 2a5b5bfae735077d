"""Attribution functions with the signature the evaluation takes: ``fn(model, inputs, targets) -> relevance``.

Any callable of that signature can be evaluated (zennit, Captum, LXT, …; see ``benchmarks/faithfulness.py`` for
adapters). Here: dynamiclrp itself, a gradient × input reference and a random baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["lrp", "random_attribution"]


def lrp(preset: Any = "epsilon", *, tokens: bool = False, output: Callable | None = None,
        forward_kwargs: Callable[[torch.Tensor], dict] | None = None, **kwargs: Any):
    """dynamiclrp as an attribution function.

    Parameters
    ----------
    preset : str or Preset
        Passed to :func:`dynamiclrp.explain` (with ``**kwargs``: ``rules``, ``seed``, ``module_rules``, ...).
    tokens : bool
        Return the per-token relevance (``Attribution.tokens``) of a token model called with ``input_ids``.
    output : callable, optional
        Selects the explained tensor from the model's output (e.g. ``lambda o: o.logits[:, -1]``).
    forward_kwargs : callable, optional
        ``inputs -> dict`` of extra keyword arguments (e.g. an attention mask) for token models.
    """
    from ..api import explain

    def fn(model, inputs, targets):
        if tokens:
            kw = {"input_ids": inputs, **(forward_kwargs(inputs) if forward_kwargs else {})}
            att = explain(model, kw, target=targets, preset=preset, output=output, **kwargs)
            return att.tokens.detach()
        return explain(model, inputs, target=targets, preset=preset, output=output, **kwargs).inputs[0].detach()

    fn.__name__ = f"lrp_{getattr(preset, 'name', preset)}"
    return fn


def random_attribution(seed: int = 0, tokens: bool = False):
    """Uniform random relevance (a baseline every method should beat); reproducible per call order."""
    gen = torch.Generator().manual_seed(seed)

    def fn(model, inputs, targets):
        shape = inputs.shape
        return torch.rand(shape, generator=gen, dtype=torch.float32).to(inputs.device)

    return fn
