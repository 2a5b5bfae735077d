"""Adapters to evaluation and attribution APIs: a Quantus ``explain_func`` and a Captum-style ``LRP`` class.

Neither imports Quantus or Captum: they only follow their calling conventions.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
>>> lrp = LRP(model, preset="epsilon")
>>> lrp.attribute(torch.randn(2, 4), target=1).shape
torch.Size([2, 4])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..api import explain
from ..presets import Preset


def _tensor(x: Any, device: Any = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device) if device is not None else t


def explain_func(model: torch.nn.Module, inputs: Any, targets: Any, *, preset: str | Preset = "epsilon_plus",
                 seed: str = "value", reduce_axes: Sequence[int] | None = None, device: Any = None,
                 **kwargs: Any) -> np.ndarray:
    """Quantus-compatible explanation function: relevance of ``inputs`` as a numpy array of their shape.

    Use it as ``metric(model=model, x_batch=x, y_batch=y, explain_func=dynamiclrp.integrations.explain_func,
    explain_func_kwargs={"preset": "epsilon_gamma_box"})``.

    Parameters
    ----------
    model : nn.Module
        The model (eval mode is the caller's business, as in Quantus).
    inputs : numpy.ndarray or Tensor
        A batch, channels first.
    targets : int, array-like or Tensor
        One class per row (or one for all).
    preset : str or Preset
        Rule policy (:mod:`dynamiclrp.presets`).
    seed : {"value", "one"}
        Seed relevance at the target.
    reduce_axes : sequence of int, optional
        Axes to sum over, kept with size 1 (``(1,)`` gives ``(N, 1, H, W)`` maps).
    device : str or torch.device, optional
    **kwargs
        Further keyword arguments of :func:`dynamiclrp.explain`; keys Quantus adds for other methods
        (``method``, ``softmax``, ...) are ignored. A ``plan`` (:class:`dynamiclrp.Plan`) in the
        ``explain_func_kwargs`` that every batch's call gets is shared by those calls.

    Returns
    -------
    numpy.ndarray
        Float32 relevance, the shape of ``inputs`` (or reduced over ``reduce_axes``).

    Examples
    --------
    >>> import numpy as np, torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    >>> explain_func(net, np.ones((2, 3, 2, 2), np.float32), np.array([0, 2])).shape
    (2, 3, 2, 2)
    """
    for k in ("method", "softmax", "channel_first", "xai_lib", "img_size", "nr_channels", "abs", "normalise",
              "pos_only", "neg_only", "reduce_axes_", "model"):
        kwargs.pop(k, None)
    x = _tensor(inputs, device)
    dev = next((p.device for p in model.parameters()), x.device)
    x = x.to(dev)
    if not x.is_floating_point():
        x = x.float()
    t = targets
    if isinstance(t, np.ndarray):
        t = torch.as_tensor(t)
    if isinstance(t, torch.Tensor):
        t = t.to(dev).long().reshape(-1)
        if t.numel() == 1 and x.shape[0] != 1:
            t = t.expand(x.shape[0])
    att = explain(model, x, target=t, preset=preset, seed=seed, **kwargs)
    r = att.inputs[0].detach()
    if reduce_axes:
        r = r.sum(dim=tuple(reduce_axes), keepdim=True)
    return r.float().cpu().numpy()


class LRP:
    """Captum-style LRP: ``LRP(model, preset=...).attribute(inputs, target=...)``.

    Unlike Captum's ``LRP`` it needs no rule attributes on modules, handles functional ops, residual additions and
    reused modules, and leaves the model untouched. Attributions equal :func:`dynamiclrp.explain`'s
    ``att.inputs`` (the seed is the output value at the target, as in Captum, so attributions sum to the output
    less what biases and stabilisers absorb).

    Parameters
    ----------
    model : nn.Module
    preset : str or Preset
        Rule policy, default ``"epsilon"`` (Captum's default rule is ε).
    **explain_kwargs
        Default keyword arguments of :func:`dynamiclrp.explain` (``rules``, ``module_rules``, ``seed``, ...).
        ``plan=dynamiclrp.Plan()`` lets the calls of a data-set loop share one execution plan (the graph read and
        the pass worked out once, :class:`dynamiclrp.Plan`).
    """

    def __init__(self, model: torch.nn.Module, preset: str | Preset = "epsilon", **explain_kwargs: Any) -> None:
        self.model = model
        self.preset = preset
        self.explain_kwargs = explain_kwargs
        self.last_attribution = None

    @property
    def multiplies_by_inputs(self) -> bool:
        """LRP attributions are in units of the output (as Captum says for its LRP)."""
        return True

    def has_convergence_delta(self) -> bool:
        return True

    def attribute(self, inputs: torch.Tensor | tuple[torch.Tensor, ...], target: Any = None,
                  additional_forward_args: Any = None, return_convergence_delta: bool = False,
                  **kwargs: Any) -> Any:
        """Relevance of each input, same shape (a tuple for tuple inputs, as Captum).

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            Explained inputs (float).
        target : int, sequence, Tensor or None
            Class per row, as in Captum (None: the arg-max; Captum requires it for multi-class outputs).
        additional_forward_args : any, optional
            Further positional arguments of ``forward`` after the inputs; held constant, not explained.
        return_convergence_delta : bool
            Also return, per row, the explained output minus the sum of all input relevance (what biases and
            stabilisers absorbed), as Captum's ``compute_convergence_delta``.
        **kwargs
            Override keyword arguments of :func:`dynamiclrp.explain` for this call.

        Returns
        -------
        Tensor or tuple of Tensor, and the delta Tensor ``(batch,)`` when requested
        """
        is_tuple = isinstance(inputs, tuple)
        xs = list(inputs) if is_tuple else [inputs]
        extra = additional_forward_args
        if extra is not None and not isinstance(extra, tuple):
            extra = (extra,)
        model = self.model if not extra else _Bound(self.model, extra)
        opts = {**self.explain_kwargs, **kwargs}
        att = explain(model, xs, target=target, preset=self.preset, **opts)
        self.last_attribution = att
        rel = tuple(r.to(x.dtype) if x.is_floating_point() else r for r, x in zip(att.inputs, xs))
        out = rel if is_tuple else rel[0]
        if not return_convergence_delta:
            return out
        seed = sum(o.reshape(o.shape[0], -1).sum(1) for o in att.outputs)
        got = sum(r.reshape(r.shape[0], -1).sum(1) for r in att.inputs)
        return out, (seed - got)


class _Bound(torch.nn.Module):
    """``model`` with trailing positional arguments fixed (Captum's ``additional_forward_args``)."""

    def __init__(self, model: torch.nn.Module, extra: tuple[Any, ...]) -> None:
        super().__init__()
        self.model = model
        self.extra = extra

    def forward(self, *inputs: Any) -> Any:
        return self.model(*inputs, *self.extra)
