"""The arithmetic of the step networks at inference: float32, or bfloat16 / float16 under autocast."""

from __future__ import annotations

import contextlib

import torch

from pipeline.errors import ConfigError

PRECISIONS = ("float32", "bfloat16", "float16")


def resolve_precision(precision: str | None, device_type: str) -> str:
    """The inference precision on a device of ``device_type`` (``None``: float16 on CUDA, float32
    elsewhere); raises ``ConfigError`` for an unknown one, or float16 without CUDA."""
    if precision is None:
        precision = "float16" if device_type == "cuda" else "float32"
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "float16" and device_type != "cuda":
        raise ConfigError("float16 inference needs a CUDA device; use bfloat16 on CPU")
    return precision


def autocast(device: torch.device, precision: str | None = None):
    """Autocast context for inference (:func:`resolve_precision`). The network runs in the reduced
    precision; reconstructions are accumulated in float32."""
    precision = resolve_precision(precision, device.type)
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, precision))

