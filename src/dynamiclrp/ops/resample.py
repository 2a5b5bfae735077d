"""Resampling and padding: upsampling / interpolation, padding (filled by the vision/audio coverage work)."""

from __future__ import annotations

from .base import OpSpec

RESAMPLE_OPS: dict[str, OpSpec] = {}
