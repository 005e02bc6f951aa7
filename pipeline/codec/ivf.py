"""IVF coarse quantizer: k-means centroids, a nearest-list assigner, and balance statistics.

Plain Faiss + NumPy (no Ray). Small ``nlist`` uses a single ``faiss.Kmeans``; large ``nlist`` uses
two-level clustering (a coarse k-means into ~sqrt(nlist) groups, then each group is clustered into
a number of centroids proportional to its size), which keeps each k-means small and is how
billion-scale IVF indexes are usually trained. Large centroid tables are searched with HNSW.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import faiss
import numpy as np

from pipeline.config import JsonConfig
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

# From this many lists on, queries are probed through an HNSW graph over the centroids
# (hnsw_index); below it the exact probe is a small part of a query.
HNSW_MIN_NLIST = 1 << 16
# From this many lists on, vectors are assigned to lists (training, encoding) through the graph:
# an exact scan costs O(nlist) per vector, the graph O(log nlist), and it is faster from about
# 4,096 lists on (bench/RESULTS.md, "Scale"); with NLIST growing as sqrt(N) an exact scan would
# make encoding cost grow faster than N.
HNSW_ASSIGN_MIN_NLIST = 1 << 13
# Assignment search breadth: the nearest list is found for nearly every vector (bench/RESULTS.md,
# "Scale"); a vector given the second-nearest list is still encoded exactly against it.
HNSW_ASSIGN_EF = 32


# ``--ivf auto`` (the default): indexes of fewer vectors than this are flat (no coarse quantizer;
# a query scans every code, which at this size costs less than a probe would save).
AUTO_FLAT_BELOW = 100_000
# Fewest k-means training points per list (Faiss warns below it).
KMEANS_MIN_POINTS_PER_LIST = 39


def auto_nlist(n_vectors: int, n_kmeans: int) -> tuple[int, str]:
    """``--ivf auto``: the number of IVF lists for an index of about ``n_vectors`` vectors whose
    coarse quantizer is trained on ``n_kmeans`` vectors, and why (for the user).

    0 (flat) below ``AUTO_FLAT_BELOW`` vectors; else the power of two nearest to 8 sqrt(N) (so
    between about 5.7 and 11.3 sqrt(N), the range Faiss's guidelines give), lowered while the
    k-means sample would hold fewer than ``KMEANS_MIN_POINTS_PER_LIST`` points per list.
    """
    n_vectors, n_kmeans = int(n_vectors), int(n_kmeans)
    if n_vectors < AUTO_FLAT_BELOW:
        return 0, (f"0 lists (a flat index: every search scans every code), as {n_vectors:,} vectors are fewer "
                   f"than {AUTO_FLAT_BELOW:,}; give --ivf NLIST for an IVF index")
    nlist = 1 << max(0, round(math.log2(8.0 * math.sqrt(n_vectors))))
    why = f"{nlist:,} lists (the power of two nearest 8 sqrt(N), N = {n_vectors:,} vectors)"
    cap = n_kmeans // KMEANS_MIN_POINTS_PER_LIST
    if nlist > cap:
        nlist = 1 << max(0, int(math.log2(max(cap, 1))))
        why = (f"{nlist:,} lists (8 sqrt(N) for N = {n_vectors:,} vectors, lowered so that the {n_kmeans:,} "
               f"k-means vectors give at least {KMEANS_MIN_POINTS_PER_LIST} per list)")
    return nlist, why


@dataclass
class IVFConfig(JsonConfig):
    """Parameters of the coarse quantizer.

    ``max_points_per_centroid`` caps the k-means training set (Faiss subsamples above it);
    ``two_level_threshold``: from this ``nlist`` on, two-level clustering is used.
    """

    nlist: int
    niter: int = 20
    seed: int = 0
    max_points_per_centroid: int = 256
    two_level_threshold: int = 4096

    def __post_init__(self) -> None:
        if self.nlist < 1:
            raise ConfigError(f"IVFConfig.nlist must be >= 1, got {self.nlist}")
        if self.niter < 1:
            raise ConfigError(f"IVFConfig.niter must be >= 1, got {self.niter}")
        if self.max_points_per_centroid < 1:
            raise ConfigError("IVFConfig.max_points_per_centroid must be >= 1")


def _as_f32(x_ND: np.ndarray) -> np.ndarray:
    x_ND = np.asarray(x_ND)
    if x_ND.ndim != 2:
        raise ConfigError(f"expected a 2-D array of vectors, got shape {x_ND.shape}")
    return np.ascontiguousarray(x_ND, dtype=np.float32)


def _kmeans(x_ND: np.ndarray, k: int, cfg: IVFConfig, seed: int, verbose: bool) -> np.ndarray:
    """One Faiss k-means run; returns (k, D) float32 centroids."""
    n, d = x_ND.shape
    if k == n:
        return x_ND.copy()
    km = faiss.Kmeans(
        d, k, niter=cfg.niter, seed=seed, verbose=verbose,
        max_points_per_centroid=cfg.max_points_per_centroid, min_points_per_centroid=1,
    )
    km.train(x_ND)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def split_proportionally(sizes_G: np.ndarray, total: int) -> np.ndarray:
    """Integers ``k_G`` with ``sum(k_G) == total``, ``1 <= k_g <= sizes_g`` for non-empty groups
    (0 for empty ones), each close to ``total * sizes_g / sum(sizes)`` (largest remainder)."""
    sizes_G = np.asarray(sizes_G, dtype=np.int64)
    n = int(sizes_G.sum())
    if total > n:
        raise ConfigError(f"cannot split {total} centroids over {n} points")
    nonempty = sizes_G > 0
    if total < int(nonempty.sum()):
        raise ConfigError(f"cannot give each of {int(nonempty.sum())} groups a centroid with only {total}")
    quota = sizes_G * (total / n)
    k_G = np.where(nonempty, np.clip(np.floor(quota).astype(np.int64), 1, sizes_G), 0)
    # Fix the sum: add where the remainder is largest, remove where the excess is largest.
    while k_G.sum() < total:
        room = np.where(k_G < sizes_G, quota - k_G, -np.inf)
        k_G[int(np.argmax(room))] += 1
    while k_G.sum() > total:
        excess = np.where(k_G > 1, k_G - quota, -np.inf)
        k_G[int(np.argmax(excess))] -= 1
    return k_G


def train_coarse_quantizer(x_ND: np.ndarray, cfg: IVFConfig, progress: bool = True) -> np.ndarray:
    """Train ``cfg.nlist`` IVF centroids on ``x_ND``; returns (nlist, D) float32.

    Raises ConfigError when there are fewer training points than lists.
    """
    x_ND = _as_f32(x_ND)
    n, d = x_ND.shape
    nlist = cfg.nlist
    if nlist > n:
        raise ConfigError(f"IVF nlist={nlist} exceeds the number of training points ({n})")
    t0 = time.time()
    if nlist < cfg.two_level_threshold:
        if progress:
            log.info("k-means: %d points, D=%d -> %d centroids, %d iterations", n, d, nlist, cfg.niter)
        centroids_LD = _kmeans(x_ND, nlist, cfg, cfg.seed, verbose=False)
    else:
        centroids_LD = _two_level(x_ND, cfg, progress)
    if progress:
        log.info("coarse quantizer trained in %.1f s (%.0f points/s)", time.time() - t0,
                 n / max(time.time() - t0, 1e-9))
    assert centroids_LD.shape == (nlist, d)
    return centroids_LD


def _two_level(x_ND: np.ndarray, cfg: IVFConfig, progress: bool) -> np.ndarray:
    n, d = x_ND.shape
    nlist = cfg.nlist
    ngroups = max(1, min(int(round(math.sqrt(nlist))), nlist))
    if progress:
        log.info("two-level k-means: %d points -> %d groups -> %d centroids", n, ngroups, nlist)
    group_centroids_GD = _kmeans(x_ND, ngroups, cfg, cfg.seed, verbose=False)
    _, group_N = assign(group_centroids_GD, x_ND)
    group_N = group_N[:, 0]
    sizes_G = np.bincount(group_N, minlength=ngroups)
    k_G = split_proportionally(sizes_G, nlist)
    order_N = np.argsort(group_N, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes_G)])
    parts = []
    t0 = time.time()
    for g in range(ngroups):
        if k_G[g] == 0:
            continue
        xg_ND = x_ND[order_N[bounds[g]:bounds[g + 1]]]
        parts.append(_kmeans(xg_ND, int(k_G[g]), cfg, cfg.seed + 1 + g, verbose=False))
        if progress and (g + 1) % max(1, ngroups // 10) == 0:
            done = int(k_G[: g + 1].sum())
            log.info("two-level k-means: group %d/%d, %d/%d centroids (%.1f s)",
                     g + 1, ngroups, done, nlist, time.time() - t0)
    return np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.float32)


def hnsw_index(centroids_LD: np.ndarray, m: int = 32, ef_construction: int = 80,
               inner_product: bool = False) -> faiss.Index:
    """An HNSW graph over the centroids: approximate nearest lists, where an exact scan of every
    centroid would cost more (``HNSW_MIN_NLIST``, ``HNSW_ASSIGN_MIN_NLIST``).

    Built on one thread: a parallel build links the graph in the order the threads happen to
    run, and every encoder actor must build the same graph to assign vectors the same way."""
    centroids_LD = _as_f32(centroids_LD)
    index = faiss.IndexHNSWFlat(centroids_LD.shape[1], m,
                                faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2)
    index.hnsw.efConstruction = ef_construction
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.add(centroids_LD)
    finally:
        faiss.omp_set_num_threads(threads)
    index.hnsw.efSearch = HNSW_ASSIGN_EF
    return index


def assigner(centroids_LD: np.ndarray) -> np.ndarray | faiss.Index:
    """What :func:`assign` searches for these centroids: the centroids themselves (exact)
    below ``HNSW_ASSIGN_MIN_NLIST`` lists, else an HNSW graph over them (build it once, reuse it)."""
    centroids_LD = _as_f32(centroids_LD)
    return hnsw_index(centroids_LD) if centroids_LD.shape[0] >= HNSW_ASSIGN_MIN_NLIST else centroids_LD


def assign(centroids_or_index: np.ndarray | faiss.Index, x_ND: np.ndarray, k: int = 1,
           batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest ``k`` lists of each vector, searched in blocks of ``batch`` rows: exact (Faiss
    ``IndexFlatL2``) given centroids, or through a given index (e.g. :func:`hnsw_index`).

    Returns squared L2 distances (N, k) float32 and list ids (N, k) int64. This is how vectors
    are assigned to lists for training and encoding; the search probes with
    :class:`pipeline.search.probe.FlatProbe`, whose ties and batches are its own.
    """
    index = centroids_or_index
    if not isinstance(index, faiss.Index):
        index = faiss.IndexFlatL2(index.shape[1])
        index.add(_as_f32(centroids_or_index))
    x_ND = np.asarray(x_ND)
    if x_ND.ndim != 2 or x_ND.shape[1] != index.d:
        raise ConfigError(f"vectors of shape {x_ND.shape} do not match centroids of dimension {index.d}")
    n = x_ND.shape[0]
    D_Nk = np.empty((n, k), dtype=np.float32)
    I_Nk = np.empty((n, k), dtype=np.int64)
    for i0 in range(0, n, batch):
        xb = np.ascontiguousarray(x_ND[i0:i0 + batch], dtype=np.float32)
        D_Nk[i0:i0 + len(xb)], I_Nk[i0:i0 + len(xb)] = index.search(xb, k)
    return D_Nk, I_Nk


def imbalance_factor(list_ids: np.ndarray, nlist: int) -> float:
    """``nlist * sum(h^2) / (sum h)^2`` over list sizes ``h``: 1.0 when perfectly balanced,
    larger when some lists are much longer (search cost grows with this factor)."""
    h = np.bincount(np.asarray(list_ids, dtype=np.int64).ravel(), minlength=nlist).astype(np.float64)
    tot = h.sum()
    if tot == 0:
        return 0.0
    return float(nlist * (h * h).sum() / (tot * tot))
