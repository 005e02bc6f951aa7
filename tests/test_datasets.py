"""Dataset resolver and the synthetic dataset writer."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from pipeline.stages import datasets

from pipeline.io import vectors
from pipeline.errors import PipelineError


def _fake_dataset(root: pathlib.Path, name: str, learn_ext: str = ".fvecs",
                  base_ext: str = ".fvecs") -> pathlib.Path:
    folder = root / name
    folder.mkdir(parents=True)
    for f in (f"learn{learn_ext}", f"base{base_ext}", "query.fvecs", "groundtruth.ivecs"):
        (folder / f).write_bytes(b"")
    return folder


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("QINCO_DATA_DIR", str(tmp_path / "env"))
    assert datasets.data_dir() == tmp_path / "env"
    assert datasets.data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("QINCO_DATA_DIR")
    repo = pathlib.Path(__file__).resolve().parents[1]  # the repository holding tests/
    assert datasets.data_dir() == repo.parent / "shared" / "data"


def test_resolve_dataset_finds_files(tmp_path):
    folder = _fake_dataset(tmp_path, "dwsift", learn_ext=".bvecs")
    ds = datasets.resolve_dataset("dwsift", tmp_path)
    assert ds.learn == str(folder / "learn.bvecs")
    assert ds.base == str(folder / "base.fvecs") and ds.query == str(folder / "query.fvecs")
    assert ds.groundtruth == str(folder / "groundtruth.ivecs")
    assert datasets.Dataset.from_dict(ds.to_dict()) == ds
    other = _fake_dataset(tmp_path, "glove50", base_ext=".npy")
    assert datasets.resolve_dataset("glove50", tmp_path).base == str(other / "base.npy")
    (other / "base.fvecs").write_bytes(b"")  # .fvecs comes first
    assert datasets.resolve_dataset("glove50", tmp_path).base == str(other / "base.fvecs")


def test_resolve_dataset_errors_name_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("QINCO_DATA_DIR", str(tmp_path))
    with pytest.raises(PipelineError, match=r"glove50.*not found.*QINCO_DATA_DIR"):
        datasets.resolve_dataset("glove50")
    folder = _fake_dataset(tmp_path, "glove50")
    (folder / "query.fvecs").unlink()
    with pytest.raises(PipelineError, match=r"query\.fvecs or query\.bvecs or query\.npy not found"):
        datasets.resolve_dataset("glove50")
    with pytest.raises(PipelineError, match="unknown dataset"):
        datasets.resolve_dataset("sift1b")


def test_real_datasets_resolve(dwsift_dir):
    ds = datasets.resolve_dataset("dwsift", dwsift_dir.parent)
    info = vectors.info(ds.base)
    assert (info.count, info.dim) == (223_825, 128)


def test_make_synthetic_writes_consistent_dataset(tmp_path):
    ds = datasets.make_synthetic(str(tmp_path / "syn"), n_learn=300, n_base=400, n_query=20, d=8, k=10)
    xl, xb, xq = (vectors.read_vectors(u) for u in (ds.learn, ds.base, ds.query))
    gt = vectors.read_vectors(ds.groundtruth)
    assert xl.shape == (300, 8) and xb.shape == (400, 8) and xq.shape == (20, 8) and gt.shape == (20, 10)
    assert not np.array_equal(xl[:20], xq)
    dist = ((xq[:, None].astype(np.float64) - xb[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(gt[:, 0], dist.argmin(1))
