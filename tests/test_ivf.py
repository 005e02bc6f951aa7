"""IVF coarse quantizer: k-means quality, two-level clustering, HNSW assignment, errors."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from pipeline.codec.threads import use_threads
from pipeline.errors import ConfigError
from pipeline.codec.ivf import (
    IVFConfig, assign, hnsw_index, imbalance_factor, split_proportionally,
    train_coarse_quantizer,
)


def _clustered(n: int, d: int, nclusters: int, seed: int = 0, spread: float = 0.05):
    rng = np.random.default_rng(seed)
    centers_CD = rng.normal(size=(nclusters, d)).astype(np.float32)
    labels_N = rng.integers(0, nclusters, size=n)
    x_ND = centers_CD[labels_N] + spread * rng.normal(size=(n, d)).astype(np.float32)
    return x_ND.astype(np.float32), centers_CD, labels_N


def _mse(centroids_LD, x_ND):
    D, _ = assign(centroids_LD, x_ND)
    return float(D.mean())


def test_kmeans_recovers_clusters():
    x_ND, _, labels_N = _clustered(4000, 16, 20)
    nlist = 40  # more lists than true clusters, so each cluster gets at least one centroid
    cfg = IVFConfig(nlist=nlist, niter=20, seed=0)
    c_LD = train_coarse_quantizer(x_ND, cfg, progress=False)
    assert c_LD.shape == (nlist, 16) and c_LD.dtype == np.float32
    rng = np.random.default_rng(5)
    random_LD = x_ND[rng.choice(len(x_ND), nlist, replace=False)]
    mse = _mse(c_LD, x_ND)
    assert mse < 0.5 * _mse(random_LD, x_ND)
    assert mse < 0.5 * 16 * 0.05 ** 2 * 2  # near the generating noise level (0.04)
    # Each list holds points of a single true cluster.
    _, I = assign(c_LD, x_ND)
    I = I[:, 0]
    purity = np.mean([np.bincount(labels_N[I == j]).max() / (I == j).sum()
                      for j in range(nlist) if (I == j).any()])
    assert purity > 0.99
    # Deterministic for a fixed seed.
    np.testing.assert_array_equal(c_LD, train_coarse_quantizer(x_ND, cfg, progress=False))


def test_split_proportionally_sums_exactly():
    sizes = np.array([100, 1, 0, 37, 500, 3])
    for total in (5, 17, 64, 641):
        k = split_proportionally(sizes, total)
        assert k.sum() == total
        assert np.all(k[sizes > 0] >= 1) and np.all(k <= sizes) and k[2] == 0
    k = split_proportionally(np.array([300, 100]), 40)
    assert list(k) == [30, 10]


def test_two_level_matches_flat_kmeans():
    x_ND, _, _ = _clustered(6000, 8, 200, seed=2, spread=0.2)
    nlist = 100
    flat = train_coarse_quantizer(x_ND, IVFConfig(nlist=nlist, niter=10, seed=0), progress=False)
    two = train_coarse_quantizer(
        x_ND, IVFConfig(nlist=nlist, niter=10, seed=0, two_level_threshold=64), progress=False)
    assert two.shape == (nlist, 8)
    assert len(np.unique(two, axis=0)) == nlist
    mse_flat, mse_two = _mse(flat, x_ND), _mse(two, x_ND)
    assert mse_two < 1.25 * mse_flat, (mse_two, mse_flat)
    # Odd nlist (not a square) still gives exactly nlist centroids.
    odd = train_coarse_quantizer(
        x_ND[:2000], IVFConfig(nlist=37, niter=5, two_level_threshold=10), progress=False)
    assert odd.shape == (37, 8)


def test_hnsw_assignment_agrees_with_exact():
    rng = np.random.default_rng(3)
    c_LD = rng.normal(size=(2000, 16)).astype(np.float32)
    x_ND = rng.normal(size=(3000, 16)).astype(np.float32)
    hnsw = hnsw_index(c_LD)
    assert "HNSW" in type(hnsw).__name__
    hnsw.hnsw.efSearch = 128
    _, I_h = assign(hnsw, x_ND, batch=700)
    _, I_f = assign(c_LD, x_ND, batch=700)
    assert I_f.dtype == np.int64 and I_f.shape == (3000, 1)
    assert np.mean(I_h[:, 0] == I_f[:, 0]) >= 0.95
    # Blocked search equals a single brute-force computation.
    d2 = ((x_ND[:, None, :] - c_LD[None, :500, :]) ** 2).sum(-1)
    _, I_small = assign(c_LD[:500], x_ND, k=2, batch=128)
    np.testing.assert_array_equal(I_small[:, 0], d2.argmin(1))


def test_errors_and_imbalance():
    x_ND = np.zeros((10, 4), dtype=np.float32)
    with pytest.raises(ConfigError, match="exceeds the number of training points"):
        train_coarse_quantizer(x_ND, IVFConfig(nlist=11), progress=False)
    with pytest.raises(ConfigError):
        IVFConfig(nlist=0)
    with pytest.raises(ConfigError, match="do not match"):
        assign(np.zeros((3, 4), np.float32), np.zeros((2, 5), np.float32))
    assert imbalance_factor(np.array([0, 1, 2, 3]), 4) == pytest.approx(1.0)
    assert imbalance_factor(np.array([0, 0, 0, 0]), 4) == pytest.approx(4.0)
    cfg = IVFConfig(nlist=8, seed=3)
    assert IVFConfig.from_json(cfg.to_json()) == cfg


def test_many_lists_are_assigned_through_one_deterministic_graph():
    """From HNSW_ASSIGN_MIN_NLIST lists on, encoding assigns through an HNSW graph: built once per model,
    the same graph in every process (so every encoder actor assigns a vector the same way), and
    the nearest list for nearly every vector."""
    import faiss

    from pipeline.codec.encoder import _assigner, assign_lists
    from pipeline.codec.ivf import HNSW_ASSIGN_MIN_NLIST as NLIST
    from pipeline.codec.model import QINCo, QincoConfig

    rng = np.random.default_rng(5)
    c_LD = rng.normal(size=(NLIST, 8)).astype(np.float32)
    x_ND = rng.normal(size=(3000, 8)).astype(np.float32)
    models = []
    for threads in (1, 2):  # the build is single-threaded whatever the caller's thread count
        faiss.omp_set_num_threads(threads)
        m = QINCo(QincoConfig(dim=8, M=2, K=16, L=0, de=8, dh=8, A=2, B=1, nlist=NLIST))
        m.set_centroids(c_LD)
        models.append(m)
        assert "HNSW" in type(_assigner(m)).__name__ and _assigner(m) is _assigner(m)  # kept on the model
    small = QINCo(QincoConfig(dim=8, M=2, K=16, L=0, de=8, dh=8, A=2, B=1, nlist=NLIST // 2))
    small.set_centroids(c_LD[:NLIST // 2])
    assert isinstance(_assigner(small), np.ndarray)  # fewer lists: the exact scan
    lists_a, lists_b = assign_lists(models[0], x_ND), assign_lists(models[1], x_ND)
    np.testing.assert_array_equal(lists_a, lists_b)
    _, exact = assign(c_LD, x_ND)
    assert np.mean(lists_a == exact[:, 0]) >= 0.97
    models[0].set_centroids(c_LD[::-1].copy())  # new centroids: a new graph
    assert not np.array_equal(assign_lists(models[0], x_ND), lists_a)


def test_use_threads_caps_both_pools_of_the_process():
    # an actor given one core must not run Faiss's OpenMP pool (assignment, k-means) on all cores
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        assert use_threads(0) == 1
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
        assert use_threads(2) == 2
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (2, 2)
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
