"""Seeded random corruption of every vector format: each damaged file either reads back the
original rows exactly or raises a ``PipelineError`` that names it. Never another exception, a
hang, or different rows."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.io import vectors

N, D = 40, 6
CASES = 200


def _original(fmt: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if fmt in ("bvecs", "u8bin"):
        return rng.integers(0, 256, (N, D)).astype(np.uint8)
    if fmt == "i8bin":
        return rng.integers(-128, 128, (N, D)).astype(np.int8)
    if fmt in ("ivecs", "ibin"):
        return rng.integers(-1000, 1000, (N, D)).astype(np.int32)
    return rng.normal(size=(N, D)).astype(np.float32)


def _header_spans(fmt: str, data: bytes) -> list[tuple[int, int]]:
    """Byte ranges that describe the file rather than hold values: where a flipped bit must be
    caught (a flipped value bit is just another valid value)."""
    if fmt in ("fvecs", "bvecs", "ivecs"):
        rec = 4 + D * _original(fmt).itemsize
        return [(i * rec, i * rec + 4) for i in range(N)]
    if fmt in ("fbin", "u8bin", "i8bin", "ibin"):
        return [(0, 8)]
    if fmt == "npy":
        return [(0, len(data) - N * D * _original(fmt).itemsize)]
    return [(0, 4), (len(data) - 8, len(data))]  # parquet: the magic and footer length


def _corrupt(fmt: str, data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    kind = rng.integers(0, 3)
    if kind == 0:  # truncated anywhere, even to nothing
        return "truncated", data[: int(rng.integers(0, len(data)))]
    if kind == 1:  # bytes appended
        return "appended", data + rng.integers(0, 256, int(rng.integers(1, 40))).astype(np.uint8).tobytes()
    spans = _header_spans(fmt, data)
    lo, hi = spans[int(rng.integers(0, len(spans)))]
    pos = int(rng.integers(lo, hi))
    out = bytearray(data)
    out[pos] ^= 1 << int(rng.integers(0, 8))
    return "header bit flipped", bytes(out)


@pytest.mark.parametrize("fmt", vectors.FORMATS)
def test_corrupted_files_read_exactly_or_fail_naming_the_file(fmt, tmp_path):
    x = _original(fmt)
    clean = str(tmp_path / f"clean.{fmt}")
    vectors.write_vectors(clean, x, fmt=fmt)
    data = open(clean, "rb").read()
    rng = np.random.default_rng(hash(fmt) % 2**32)
    outcomes = {"read": 0, "refused": 0}
    for case in range(CASES):
        path = tmp_path / f"case{case}.{fmt}"
        kind, damaged = _corrupt(fmt, data, rng)
        path.write_bytes(damaged)
        try:
            y = vectors.read_vectors(str(path), fmt=fmt)
        except PipelineError as e:
            assert str(path) in str(e), (case, str(e))
            outcomes["refused"] += 1
        else:
            # a cut between two records of a format with no row count leaves a shorter valid
            # file: its rows must still be the original's first rows
            n = N if kind != "truncated" or fmt not in ("fvecs", "bvecs", "ivecs") else len(y)
            assert y.shape == (n, D) and np.array_equal(y, x[:n]), (case, kind, y.shape)
            outcomes["read"] += 1
        path.unlink()
    assert outcomes["refused"] > CASES // 3, outcomes  # most corruptions are caught, not ignored
