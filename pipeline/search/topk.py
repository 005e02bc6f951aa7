"""Exact, deterministic top-k selection and merging of k-NN result lists.

Every ranking in the search path orders candidates by (squared distance, then smaller id), so
results do not depend on how the database is split into shards, on thread scheduling, or on the
order in which candidates were scanned. Padding entries (id -1, distance +inf) always sort last.
"""

from __future__ import annotations

import numpy as np

from pipeline.search.kernels import topk_by_id

PAD_ID = -1


def topk_smallest(D_QC: np.ndarray, I_QC: np.ndarray, k: int,
                  payload_QC: np.ndarray | None = None):
    """Per row, the k entries with the smallest (distance, id), sorted.

    Ties at the k-th distance are resolved by id, so the selection is exact and deterministic
    even when many candidates share a distance (identical codes give identical approximate
    distances). Entries with id < 0 or a NaN distance are padding; rows with fewer than k real
    entries are padded with (inf, -1). The selection is one compiled pass per row
    (:func:`pipeline.search.kernels.topk_by_id`: a bounded heap, then its k entries sorted).

    Returns ``(D_QK, I_QK)`` or, when ``payload_QC`` is given, ``(D_QK, I_QK, payload_QK)``
    where the payload follows its entry (padding payload is -1).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    D_QC = np.ascontiguousarray(D_QC, dtype=np.float32)
    I_QC = np.ascontiguousarray(I_QC, dtype=np.int64)
    if D_QC.shape != I_QC.shape or D_QC.ndim != 2:
        raise ValueError(f"distance/id shapes differ or are not 2-D: {D_QC.shape} vs {I_QC.shape}")
    has_payload = payload_QC is not None
    if has_payload:
        payload_QC = np.ascontiguousarray(payload_QC, dtype=np.int64)
        if payload_QC.shape != D_QC.shape:
            raise ValueError(f"payload shape {payload_QC.shape} != {D_QC.shape}")
    Q = D_QC.shape[0]
    D_out = np.empty((Q, k), np.float32)
    I_out = np.empty((Q, k), np.int64)
    P_out = np.empty((Q, k), np.int64)
    topk_by_id(D_QC, I_QC, payload_QC if has_payload else I_QC, D_out, I_out, P_out)
    if has_payload:
        return D_out, I_out, P_out
    return D_out, I_out


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int):
    """Exact global top-k of per-shard ``(D_QK, I_QK)`` results for the same queries.

    Ids are assumed unique across shards (shards partition the database). Padding entries
    (id -1 or distance inf/NaN) never displace real results; when fewer than k real results
    exist in total the output is padded with (inf, -1). Ties are broken by smaller id.
    """
    if not results:
        raise ValueError("merge_topk needs at least one result")
    Q = None
    Ds, Is = [], []
    for j, (D, I) in enumerate(results):
        D = np.asarray(D, dtype=np.float32)
        I = np.asarray(I, dtype=np.int64)
        if D.ndim != 2 or D.shape != I.shape:
            raise ValueError(f"result {j}: distance/id shapes {D.shape} vs {I.shape}")
        if Q is None:
            Q = D.shape[0]
        elif D.shape[0] != Q:
            raise ValueError(f"result {j} has {D.shape[0]} queries, expected {Q}")
        Ds.append(D)
        Is.append(I)
    return topk_smallest(np.concatenate(Ds, axis=1), np.concatenate(Is, axis=1), k)
