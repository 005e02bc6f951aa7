"""Where the real datasets live and which file holds which split.

A dataset folder holds ``learn``, ``base``, ``query`` vector files (``.fvecs``, ``.bvecs`` or
``.npy``, the first found in that order) and ``groundtruth.ivecs``. The folder is found through
``$QINCO_DATA_DIR`` (default ``../shared/data`` next to the repository); the files are read in
place, never copied.
``make_synthetic`` writes a small clustered dataset in the same layout for demos and tests.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from pipeline.config import JsonConfig
from pipeline.errors import PipelineError
from pipeline.io import storage, vectors
from pipeline.search.evaluation import knn_ground_truth

DATASETS = ("dwsift", "glove50", "debdesc384")

_ENV = "QINCO_DATA_DIR"
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]  # pipeline/stages/datasets.py -> the repository
_VECTOR_SUFFIXES = (".fvecs", ".bvecs", ".npy")


def data_dir(explicit: str | os.PathLike | None = None) -> pathlib.Path:
    """The datasets folder: ``explicit`` if given, else ``$QINCO_DATA_DIR``, else ``<repo>/../shared/data``."""
    return _data_dir(explicit)


def _data_dir(explicit: str | os.PathLike | None) -> pathlib.Path:
    if explicit:
        return pathlib.Path(explicit)
    env = os.environ.get(_ENV)
    if env:
        return pathlib.Path(env)
    return _REPO_ROOT.parent / "shared" / "data"


@dataclasses.dataclass
class Dataset(JsonConfig):
    """The four files of one dataset (as URIs: local paths here)."""

    name: str
    learn: str
    base: str
    query: str
    groundtruth: str


def _hint() -> str:
    return f"set {_ENV} to the folder holding {', '.join(DATASETS)} (or pass --data-dir)"


def _find_split(folder: pathlib.Path, split: str) -> str:
    for suffix in _VECTOR_SUFFIXES:
        p = folder / f"{split}{suffix}"
        if p.is_file():
            return str(p)
    tried = " or ".join(f"{split}{s}" for s in _VECTOR_SUFFIXES)
    raise PipelineError(f"{folder}: dataset file {tried} not found; {_hint()}")


def resolve_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Locate the files of dataset ``name``; raise a ``PipelineError`` saying what is missing."""
    if name not in DATASETS:
        raise PipelineError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    root = _data_dir(data_dir)
    folder = root / name
    if not folder.is_dir():
        raise PipelineError(f"{folder}: dataset folder not found; {_hint()}")
    gt = folder / "groundtruth.ivecs"
    if not gt.is_file():
        raise PipelineError(f"{gt}: ground-truth file not found; {_hint()}")
    return Dataset(
        name=name,
        learn=_find_split(folder, "learn"),
        base=_find_split(folder, "base"),
        query=_find_split(folder, "query"),
        groundtruth=str(gt),
    )


def clustered_vectors(n: int, d: int, n_clusters: int = 32, seed: int = 0, stream: int = 0,
                      spread: float = 0.25) -> np.ndarray:
    """``n`` float32 vectors drawn around ``n_clusters`` Gaussian centres (fixed by ``seed``).

    Splits generated with the same ``seed`` and different ``stream`` share the same centres but
    not their points, so learn, base and queries come from one distribution, as in real data.
    """
    centres_CD = np.random.default_rng(seed).normal(size=(n_clusters, d))
    rng = np.random.default_rng([seed, stream + 1])
    assign_N = rng.integers(0, n_clusters, size=n)
    x_ND = centres_CD[assign_N] + spread * rng.normal(size=(n, d))
    return x_ND.astype(np.float32)


def make_synthetic(out: str, n_learn: int = 5000, n_base: int = 10000, n_query: int = 200,
                   d: int = 32, k: int = 100, seed: int = 0) -> Dataset:
    """Write a small clustered dataset (``.fvecs`` + exact ``groundtruth.ivecs``) under ``out``."""
    splits = {"learn": n_learn, "base": n_base, "query": n_query}
    uris = {}
    for stream, (split, n) in enumerate(splits.items()):
        x = clustered_vectors(n, d, seed=seed, stream=stream)
        uris[split] = storage.join(out, f"{split}.fvecs")
        vectors.write_vectors(uris[split], x)
    queries = vectors.read_vectors(uris["query"])
    _, gt = knn_ground_truth(queries, vectors.iter_blocks(uris["base"], 1_000_000), k=min(k, n_base))
    uris["groundtruth"] = storage.join(out, "groundtruth.ivecs")
    vectors.write_vectors(uris["groundtruth"], gt.astype(np.int32))
    return Dataset(name="synthetic", **uris)
