"""Writes into tensors: scatter, index_put, masked_scatter (filled by the text coverage work)."""

from __future__ import annotations

from .base import OpSpec

INDEX_OPS: dict[str, OpSpec] = {}
