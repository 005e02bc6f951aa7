"""Code values: the smallest unsigned integer type that holds codes of ``K`` values.

The one rule every writer and reader of codes follows (encoder, shards, codes files, searcher).
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import ConfigError


def code_dtype(K: int) -> np.dtype:
    """Smallest unsigned dtype holding codes in ``[0, K)``: uint8 up to 256, uint16 up to 65536."""
    if not isinstance(K, (int, np.integer)) or K < 2:
        raise ConfigError(f"codebook size K must be an integer >= 2, got {K!r}")
    if K <= 256:
        return np.dtype(np.uint8)
    if K <= 65536:
        return np.dtype(np.uint16)
    raise ConfigError(f"codebook size K={K} exceeds 65536 (codes are at most 16 bits)")
