"""The scale benchmark's generated data: a pure function of its seed, the same in any pieces and
in every file format it is written to."""

from __future__ import annotations

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

import scale_data  # noqa: E402
from pipeline.io import vectors  # noqa: E402


def test_rows_are_a_function_of_the_seed_whatever_the_pieces(monkeypatch):
    monkeypatch.setattr(scale_data, "BLOCK", 1000)
    a, _ = scale_data.anchors(seed=3, data_dir="/nonexistent")
    whole = scale_data.rows(a, 5, 0, 3500)
    pieces = np.concatenate([scale_data.rows(a, 5, s, e) for s, e in ((0, 999), (999, 2001), (2001, 3500))])
    np.testing.assert_array_equal(whole, pieces)
    np.testing.assert_array_equal(scale_data.rows(a, 5, 1500, 1700), whole[1500:1700])
    assert whole.dtype == np.uint8 and whole.shape == (3500, 128)
    assert not np.array_equal(scale_data.rows(a, 6, 0, 3500), whole)  # another seed, other data
    a2, src = scale_data.anchors(seed=3, data_dir="/nonexistent")
    assert src == "synthetic" and np.array_equal(a, a2)
    q = scale_data.queries(a, 5, 50)
    assert q.shape == (50, 128) and not (q[:, None, :] == whole[None, :50]).all(-1).any()


def test_every_format_holds_the_same_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(scale_data, "BLOCK", 700)
    a, _ = scale_data.anchors(seed=0, data_dir="/nonexistent")
    want = scale_data.rows(a, 0, 0, 2000)
    for ext in ("bvecs", "u8bin", "parquet"):
        path = str(tmp_path / f"base.{ext}")
        scale_data.write(path, 2000, seed=0, anchors_AD=a, log=lambda *_: None)
        np.testing.assert_array_equal(vectors.read_vectors(path), want)
