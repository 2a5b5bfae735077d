"""Faithfulness evaluation: pixel flipping / region perturbation (MoRF, LeRF, ABPC, comprehensiveness,
sufficiency), token metrics (top-k accuracy, IoU, deletion curves), attribution-function adapters and plots.

Every metric takes relevance from any attribution function ``fn(model, inputs, targets) -> tensor``, so
dynamiclrp, zennit, LXT and Captum are compared on the same inputs and targets.

>>> import torch
>>> from dynamiclrp import evaluate as ev
>>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
>>> x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
>>> res = ev.evaluate(model, x, y, ev.lrp("epsilon"), steps=4, progress=False)
>>> sorted(res.summary())
['abpc', 'auc_lerf', 'auc_morf', 'comprehensiveness', 'n', 'sufficiency']
"""

from .methods import lrp, random_attribution
from .perturbation import (
    PerturbationResult,
    auc,
    blur_params,
    evaluate,
    gaussian_blur,
    gaussian_kernel,
    perturbation_curves,
    replacement,
    unit_scores,
)
from .plot import plot_curves
from .tokens import as_mask, token_deletion, topk_accuracy, topk_iou, topk_positions

__all__ = [
    "PerturbationResult", "as_mask", "auc", "blur_params", "evaluate", "gaussian_blur", "gaussian_kernel", "lrp",
    "perturbation_curves", "plot_curves", "random_attribution", "replacement", "token_deletion", "topk_accuracy",
    "topk_iou", "topk_positions", "unit_scores",
]
