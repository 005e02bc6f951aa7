"""Exact ground truth and the accuracy measures used to compare quantizers.

Everything here is plain NumPy/Faiss on in-memory arrays; the database given to
``knn_ground_truth`` may also be a stream of blocks (``pipeline.io.vectors.iter_blocks``), so the
ground truth of a database larger than RAM is computed with bounded memory.

Definitions follow the QINCo papers: ``recall_at`` (R@k) is the fraction of queries whose true
nearest neighbour appears among the first k results; ``k_recall_at_k`` is the big-ann measure
|I[:, :k] ∩ gt[:, :k]| / k; the reconstruction MSE is the mean over vectors of the squared L2
error (not divided by the dimension).
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Iterator

import faiss
import numpy as np

from pipeline.codec.metric import check_metric, prepare, ranks_by_ip
from pipeline.errors import ConfigError
from pipeline.search.topk import topk_smallest

log = logging.getLogger(__name__)


# Distances are computed on (query chunk x base chunk) tiles of at most this many entries.
_TILE_ENTRIES = 1 << 23


def _base_blocks(base, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    if isinstance(base, (str, bytes)):
        raise ConfigError(f"base {base!r}: give an array or blocks (pipeline.io.vectors.iter_blocks), not a file name")
    if not hasattr(base, "shape"):  # blocks (first row, vectors) streamed by the caller
        yield from base
    else:
        base = np.asarray(base)
        if base.ndim != 2:
            raise ConfigError(f"base must be a 2-D array, got shape {base.shape}")
        for i0 in range(0, base.shape[0], block_rows):
            yield i0, base[i0:i0 + block_rows]


def _exact_in_float32(b_BD: np.ndarray, qnorm_max: float, bnorm_max: float) -> bool:
    """Whether float32 products of integer-valued queries with this block are exact: the block is
    integer-valued and every partial sum (norms, products, their sums) is an integer below 2^24."""
    limit = float(1 << 24)
    return (qnorm_max + bnorm_max < limit and 2 * np.sqrt(qnorm_max * bnorm_max) < limit
            and bool(np.all(b_BD == np.round(b_BD))))


def _tile_candidates(dis_QB: np.ndarray, ids_B: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The entries of each row of a tile that can be among its k smallest (distance, id): those
    at most the row's k-th smallest distance, ties at it included (whatever their id), padded
    with (inf, -1). Only these need the exact tie-breaking top-k."""
    Q, B = dis_QB.shape
    if B <= k:
        return dis_QB, np.broadcast_to(ids_B, dis_QB.shape)
    kth_Q = np.partition(dis_QB, k - 1, axis=1)[:, k - 1]
    rows, cols = np.nonzero(dis_QB <= kth_Q[:, None])
    counts = np.bincount(rows, minlength=Q)
    pos = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    D = np.full((Q, int(counts.max())), np.inf, np.float32)
    I = np.full(D.shape, -1, np.int64)  # noqa: E741
    D[rows, pos] = dis_QB[rows, cols]
    I[rows, pos] = ids_B[cols]
    return D, I


def knn_ground_truth(queries_QD, base, k: int = 100, block_rows: int = 1_000_000,
                     metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of each query in ``base`` (an array, or an iterable of
    ``(first_row, block)`` such as ``pipeline.io.vectors.iter_blocks(uri, block_rows)``).

    The base is processed ``block_rows`` rows at a time and the per-block results are merged,
    so the answer does not depend on ``block_rows``. Distances are computed in float64 (exact
    for integer-valued data such as SIFT), or in float32 where that is exact too (integer-valued
    blocks whose norms and products stay below 2^24, as SIFT's uint8 vectors do; twice as fast),
    and ranked by (distance, smaller id).
    ``metric`` is an index's (:mod:`pipeline.codec.metric`, any case): for ``l2`` D holds squared
    distances (ascending); for ``ip`` inner products and for ``cosine`` cosine similarities
    (descending; queries and base rows divided by their norms). Returns ``(D_QK float32,
    I_QK int64)``; rows are padded with id -1 when the base holds fewer than k vectors.
    """
    metric = check_metric(str(metric).lower())
    ip = ranks_by_ip(metric)
    if k < 1 or block_rows < 1:
        raise ConfigError(f"k and block_rows must be >= 1, got k={k}, block_rows={block_rows}")
    q_QD = np.asarray(queries_QD, dtype=np.float64)
    if q_QD.ndim != 2:
        raise ConfigError(f"queries must be a 2-D array, got shape {q_QD.shape}")
    q_QD = np.asarray(prepare(q_QD, metric, "queries"), dtype=np.float64)
    Q, d = q_QD.shape
    qnorm_Q = (q_QD ** 2).sum(1)
    q_int = bool(np.all(q_QD == np.round(q_QD)))
    q32_QD = q_QD.astype(np.float32)
    D_QK = np.full((Q, k), np.inf, dtype=np.float32)
    I_QK = np.full((Q, k), -1, dtype=np.int64)
    n_done = 0
    t0 = time.perf_counter()
    for first_row, block_BD in _base_blocks(base, block_rows):
        if block_BD.ndim != 2 or block_BD.shape[1] != d:
            raise ConfigError(f"base dimension {block_BD.shape[1:]} differs from query dimension {d}")
        n_b = block_BD.shape[0]
        sub = max(1, min(n_b, _TILE_ENTRIES // max(1, min(Q, 1024))))
        for j0 in range(0, n_b, sub):
            b_BD = np.asarray(prepare(block_BD[j0:j0 + sub], metric, "base"), dtype=np.float64)
            bnorm_B = (b_BD ** 2).sum(1)
            if q_int and len(bnorm_B) and _exact_in_float32(b_BD, qnorm_Q.max(initial=0), bnorm_B.max()):
                dt = np.float32  # exact here, and half the memory traffic
            else:
                dt = np.float64
            q_use, b_use = (q32_QD, b_BD.astype(np.float32)) if dt is np.float32 else (q_QD, b_BD)
            qn_use, bn_use = qnorm_Q.astype(dt), bnorm_B.astype(dt)
            ids_B = np.arange(first_row + j0, first_row + j0 + b_BD.shape[0], dtype=np.int64)
            qstep = max(1, _TILE_ENTRIES // b_BD.shape[0])
            for q0 in range(0, Q, qstep):
                q1 = min(Q, q0 + qstep)
                dis_QB = q_use[q0:q1] @ b_use.T  # in place from here on: the tiles are large
                if not ip:
                    dis_QB *= -2
                    dis_QB += qn_use[q0:q1, None]
                    dis_QB += bn_use[None, :]
                    np.maximum(dis_QB, 0, out=dis_QB)
                else:
                    np.negative(dis_QB, out=dis_QB)
                tile_D, tile_I = _tile_candidates(dis_QB.astype(np.float32, copy=False), ids_B, k)
                cand_D = np.concatenate([D_QK[q0:q1], tile_D], axis=1)
                cand_I = np.concatenate([I_QK[q0:q1], tile_I], axis=1)
                D_QK[q0:q1], I_QK[q0:q1] = topk_smallest(cand_D, cand_I, k)
        n_done += n_b
        dt = time.perf_counter() - t0
        log.info("ground truth: %d base rows scanned for %d queries (%.0f rows/s)",
                 n_done, Q, n_done / max(dt, 1e-9))
    if ip:
        D_QK = np.where(I_QK >= 0, -D_QK, -np.inf).astype(np.float32)
    return D_QK, I_QK


def _check_results(I_QK: np.ndarray, gt_QK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    I_QK = np.asarray(I_QK)
    gt_QK = np.asarray(gt_QK)
    if I_QK.ndim != 2 or gt_QK.ndim != 2:
        raise ConfigError(f"results and ground truth must be 2-D, got {I_QK.shape} and {gt_QK.shape}")
    if I_QK.shape[0] != gt_QK.shape[0]:
        raise ConfigError(f"{I_QK.shape[0]} result rows but {gt_QK.shape[0]} ground-truth rows")
    if I_QK.shape[0] == 0:
        raise ConfigError("no queries to evaluate")
    return I_QK, gt_QK


def recall_at(I_QK, gt_QK, ks: Iterable[int] = (1, 10, 100)) -> dict[str, float]:
    """R@k: fraction of queries whose true nearest neighbour ``gt[:, 0]`` is in ``I[:, :k]``."""
    I_QK, gt_QK = _check_results(I_QK, gt_QK)
    hit_QK = I_QK == gt_QK[:, :1]
    out = {}
    for k in ks:
        if not 1 <= k <= I_QK.shape[1]:
            raise ConfigError(f"R@{k} needs at least {k} results per query, got {I_QK.shape[1]}")
        out[f"R@{k}"] = float(hit_QK[:, :k].any(axis=1).mean())
    return out


def k_recall_at_k(I_QK, gt_QK, k: int) -> float:
    """Mean over queries of |I[:, :k] ∩ gt[:, :k]| / k (ground-truth ids are distinct)."""
    I_QK, gt_QK = _check_results(I_QK, gt_QK)
    if not 1 <= k <= min(I_QK.shape[1], gt_QK.shape[1]):
        raise ConfigError(f"{k}-recall@{k} needs {k} results and {k} ground-truth neighbours, "
                          f"got {I_QK.shape[1]} and {gt_QK.shape[1]}")
    found = 0
    step = max(1, (1 << 22) // (k * k))
    for q0 in range(0, I_QK.shape[0], step):
        g = gt_QK[q0:q0 + step, :k, None]
        r = I_QK[q0:q0 + step, None, :k]
        found += int((g == r).any(axis=2).sum())
    return found / (I_QK.shape[0] * k)


def search_decoded(queries, decoded_base, k: int, metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive search of ``queries`` over ``decoded_base`` (Faiss flat index) by ``metric``:
    the exact neighbours (ground truth) when the base holds the original vectors.

    Returns ``(D_QK, I_QK)``: squared distances for ``l2``, inner products (cosine similarities
    of the normalised rows for ``cosine``) for the others; id -1 pads rows when the base is
    smaller than k.
    """
    xb = np.ascontiguousarray(decoded_base, dtype=np.float32)
    xq = np.ascontiguousarray(queries, dtype=np.float32)
    if xb.ndim != 2 or xq.ndim != 2 or xb.shape[1] != xq.shape[1]:
        raise ConfigError(f"query shape {xq.shape} and base shape {xb.shape} do not match")
    if ranks_by_ip(metric):
        xb, xq = prepare(xb, metric, "base"), prepare(xq, metric, "queries")
        index = faiss.IndexFlatIP(xb.shape[1])
    else:
        index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    D, I = index.search(xq, k)
    return D, I.astype(np.int64, copy=False)
