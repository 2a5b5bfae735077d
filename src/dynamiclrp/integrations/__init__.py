"""Integrations: Hugging Face helpers (:mod:`.hf`), Quantus and Captum adapters (:mod:`.adapters`), model and image
loading for torchvision, timm and user files (:mod:`.models`).

Submodules import transformers, torchvision, timm or Pillow only when their functions are called.
"""

from .adapters import LRP, explain_func
from .hf import (
    TextExplanation,
    TokenRelevance,
    explain_generation,
    explain_next_token,
    explain_qa,
    explain_text,
    next_token_target,
    qa_targets,
    token_relevance,
)
from .models import LoadError, load_image, load_model, load_weights, read_state_dict

__all__ = [
    "LRP", "LoadError", "TextExplanation", "TokenRelevance", "explain_func", "explain_generation",
    "explain_next_token", "explain_qa", "explain_text", "load_image", "load_model", "load_weights",
    "next_token_target", "qa_targets", "read_state_dict", "token_relevance",
]
