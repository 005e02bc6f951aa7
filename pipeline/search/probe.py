"""Stage 1 of a search: the IVF lists each query visits.

``coarse_probe`` gives the probe of an index: an exact, batch-invariant ``FlatProbe`` over the
centroids, or an HNSW graph from ``pipeline.codec.ivf.HNSW_MIN_NLIST`` lists on.
``probe_lists`` asks it for the ``nprobe`` nearest lists of each query and applies the adaptive
``probe_ratio`` (``prune_lists``). Distances to the centroids are recomputed in float64
(``coarse_dists``), so a list's distance does not depend on the batch.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.codec.ivf import HNSW_MIN_NLIST, hnsw_index
from pipeline.codec.metric import prepare, ranks_by_ip
from pipeline.codec.rowwise import matmul_rows
from pipeline.errors import ConfigError
from pipeline.search.kernels import rows_topk, warm
from pipeline.search.params import SearchParams


class FlatProbe:
    """Exact nearest IVF centroids by squared L2, searched like a Faiss index (``.search(q, P)``,
    ``.ntotal``, ``.d``): ``||c||^2 - 2 <q, c>`` by one batch-invariant product
    (:func:`pipeline.codec.rowwise.matmul_rows`) per query batch and a sorted top-P
    (:func:`pipeline.search.kernels.rows_topk`), ties broken by the smaller list id. A query's
    lists therefore do not depend on the batch it is probed in.
    Every search probes with it below ``HNSW_MIN_NLIST`` lists (:func:`coarse_probe`).
    """

    def __init__(self, centroids_LD: np.ndarray, metric: str = "l2"):
        self.c_LD = torch.from_numpy(np.ascontiguousarray(centroids_LD, dtype=np.float32))
        self.cT_DL = self.c_LD.T.contiguous()
        self.ip = ranks_by_ip(metric)
        self.cnorm_L = (self.c_LD * self.c_LD).sum(1)
        self.ntotal, self.d = self.c_LD.shape
        warm()

    def search(self, q_QD: np.ndarray, P: int) -> tuple[np.ndarray, np.ndarray]:
        """``(D_QP, I_QP)``: squared distances (float32, ascending) and ids (int64) of the ``P``
        nearest centroids of each query (``P <= ntotal``); with an inner-product metric, the
        ``P`` centroids of largest inner product, with ``-2 <q, c>``."""
        P = int(P)
        q = torch.from_numpy(np.ascontiguousarray(q_QD, dtype=np.float32))
        # -2 <q, c> as the product of -2 q (exact: a power of two), then + ||c||^2 in place
        d_QL = matmul_rows(q * -2.0, self.cT_DL)
        if not self.ip:
            d_QL += self.cnorm_L
        v, i = np.empty((q.shape[0], P), np.float32), np.empty((q.shape[0], P), np.int64)
        rows_topk(d_QL.numpy(), v, i)
        if self.ip:
            return v, i
        qn_Q1 = (q * q).sum(1, keepdim=True).numpy()
        return v + qn_Q1, i


def coarse_dists(q_QD: np.ndarray, lists_QP: np.ndarray, centroids_LD: np.ndarray,
                 metric: str = "l2") -> np.ndarray:
    """``||q - c_l||^2`` (with an inner-product metric ``-2 <q, c_l>``) for each probed list (inf
    for -1), computed in float64 and rounded to float32, so that the value does not depend on
    the batch it is computed in."""
    c_QPD = np.asarray(centroids_LD)[np.maximum(lists_QP, 0)].astype(np.float64)
    if ranks_by_ip(metric):
        Dc_QP = -2.0 * np.einsum("qpd,qd->qp", c_QPD, np.asarray(q_QD).astype(np.float64))
    else:
        diff = c_QPD - np.asarray(q_QD).astype(np.float64)[:, None, :]
        Dc_QP = np.einsum("qpd,qpd->qp", diff, diff)
    Dc_QP[lists_QP < 0] = np.inf
    return Dc_QP.astype(np.float32)


def prune_lists(q_QD: np.ndarray, lists_QP: np.ndarray, centroids_LD: np.ndarray,
                probe_ratio: float | None) -> np.ndarray:
    """The probed lists a query visits with ``SearchParams.probe_ratio`` r: a list stays if
    ``||q - c_l||^2 <= r * min_j ||q - c_j||^2`` over the query's probed lists, and becomes -1
    (not visited) otherwise; the nearest list always stays. ``None`` keeps every list. The
    distances are ``coarse_dists``', so the choice depends only on the query and the lists, not on
    the batch or the shard."""
    if probe_ratio is None:
        return lists_QP
    Dc_QP = coarse_dists(q_QD, lists_QP, centroids_LD)  # probe_ratio is refused with an inner-product metric
    nearest_Q = Dc_QP.min(axis=1, initial=np.inf).astype(np.float64)
    keep = Dc_QP.astype(np.float64) <= float(probe_ratio) * nearest_Q[:, None]
    return np.where(keep & (lists_QP >= 0), lists_QP, -1)



def coarse_probe(centroids_LD: np.ndarray, metric: str = "l2"):
    """The probe of an index with these centroids: ``FlatProbe``, or HNSW for many lists (by
    squared L2, or by inner product for the inner-product metrics)."""
    centroids_LD = np.ascontiguousarray(centroids_LD, dtype=np.float32)
    if centroids_LD.shape[0] >= HNSW_MIN_NLIST:
        return hnsw_index(centroids_LD, inner_product=ranks_by_ip(metric))
    return FlatProbe(centroids_LD, metric)


def check_queries(q_QD: np.ndarray, D: int, metric: str | None = None) -> np.ndarray:
    """Queries as contiguous float32 ``(Q, D)``; ConfigError naming the first NaN/Inf row. With
    ``metric`` (where queries enter a search) they are also prepared for it (unit rows for
    cosine, :func:`pipeline.codec.metric.prepare`)."""
    q_QD = np.ascontiguousarray(q_QD, dtype=np.float32)
    if q_QD.ndim != 2 or q_QD.shape[1] != D:
        raise ConfigError(f"queries must have shape (Q, {D}), got {q_QD.shape}")
    bad = ~np.isfinite(q_QD).all(axis=1)
    if bad.any():
        raise ConfigError(f"query row {int(np.flatnonzero(bad)[0])} contains NaN or Inf")
    if metric is not None:
        q_QD = np.ascontiguousarray(prepare(q_QD, metric, "queries"))
    return q_QD


def probe_lists(probe, centroids_LD: np.ndarray, q_QD: np.ndarray, params: SearchParams,
                metric: str = "l2") -> np.ndarray:
    """The lists each query visits (int64 ``(Q, P)``, -1 where none): its ``nprobe`` nearest
    (capped at nlist), pruned by ``params.probe_ratio`` (a ratio of squared distances: L2 only)."""
    if params.probe_ratio is not None and ranks_by_ip(metric):
        raise ConfigError(f"probe_ratio compares squared L2 distances; this index's metric is {metric}: "
                          "search it without probe_ratio")
    nlist = centroids_LD.shape[0]
    P = max(1, min(int(params.nprobe), nlist))
    if hasattr(probe, "hnsw"):
        probe.hnsw.efSearch = max(probe.hnsw.efSearch, 2 * P)
    _, lists_QP = probe.search(q_QD, P)
    lists_QP = np.asarray(lists_QP, dtype=np.int64)
    return prune_lists(q_QD, lists_QP, centroids_LD, params.probe_ratio)
