"""Exact, deterministic top-k selection and merging of k-NN result lists.

Every ranking in the search path orders candidates by (squared distance, then smaller id), so
results do not depend on how the database is split into shards, on thread scheduling, or on the
order in which candidates were scanned. Padding entries (id -1, distance +inf) always sort last.
"""

from __future__ import annotations

import numpy as np

PAD_ID = -1


def _sort_keys(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys that put padding (id < 0 or NaN distance) after every real entry."""
    pad = (I < 0) | np.isnan(D)
    key_D = np.where(pad, np.inf, D)
    key_I = np.where(pad, np.iinfo(np.int64).max, I)
    return key_D, key_I


def _pad_to(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    Q, C = D.shape
    if C >= k:
        return D, I
    D_pad = np.full((Q, k), np.inf, dtype=D.dtype)
    I_pad = np.full((Q, k), PAD_ID, dtype=np.int64)
    D_pad[:, :C] = D
    I_pad[:, :C] = I
    return D_pad, I_pad


def topk_smallest(D_QC: np.ndarray, I_QC: np.ndarray, k: int,
                  payload_QC: np.ndarray | None = None):
    """Per row, the k entries with the smallest (distance, id), sorted.

    Ties at the k-th distance are resolved by id, so the selection is exact and deterministic
    even when many candidates share a distance (identical codes give identical approximate
    distances). Rows with fewer than k real entries are padded with (inf, -1).

    Returns ``(D_QK, I_QK)`` or, when ``payload_QC`` is given, ``(D_QK, I_QK, payload_QK)``
    where the payload follows its entry (padding payload is -1).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    D_QC = np.asarray(D_QC, dtype=np.float32)
    I_QC = np.asarray(I_QC, dtype=np.int64)
    if D_QC.shape != I_QC.shape or D_QC.ndim != 2:
        raise ValueError(f"distance/id shapes differ or are not 2-D: {D_QC.shape} vs {I_QC.shape}")
    has_payload = payload_QC is not None
    if has_payload:
        payload_QC = np.asarray(payload_QC, dtype=np.int64)
        if payload_QC.shape != D_QC.shape:
            raise ValueError(f"payload shape {payload_QC.shape} != {D_QC.shape}")
    else:
        payload_QC = np.zeros_like(I_QC)
    key_D, key_I = _sort_keys(D_QC, I_QC)
    Q, C = key_D.shape

    if C <= k:
        sel_QK = np.lexsort((key_I, key_D), axis=-1)
    else:
        part_QK = np.argpartition(key_D, k - 1, axis=1)[:, :k]
        kth_Q = np.take_along_axis(key_D, part_QK, axis=1).max(axis=1)
        # Rows where more than k entries are <= the k-th distance have a tie at the boundary
        # that argpartition resolved arbitrarily; redo those rows exactly.
        n_le_Q = np.count_nonzero(key_D <= kth_Q[:, None], axis=1)
        for q in np.flatnonzero(n_le_Q > k):
            cand = np.flatnonzero(key_D[q] <= kth_Q[q])
            order = np.lexsort((key_I[q, cand], key_D[q, cand]))[:k]
            part_QK[q] = cand[order]
        D_sel = np.take_along_axis(key_D, part_QK, axis=1)
        I_sel = np.take_along_axis(key_I, part_QK, axis=1)
        order_QK = np.lexsort((I_sel, D_sel), axis=-1)
        sel_QK = np.take_along_axis(part_QK, order_QK, axis=1)

    D_out = np.take_along_axis(key_D, sel_QK, axis=1)
    I_out = np.take_along_axis(I_QC, sel_QK, axis=1)
    P_out = np.take_along_axis(payload_QC, sel_QK, axis=1)
    pad = np.take_along_axis(key_I, sel_QK, axis=1) == np.iinfo(np.int64).max
    I_out = np.where(pad, PAD_ID, I_out)
    P_out = np.where(pad, PAD_ID, P_out)
    D_out = D_out.astype(np.float32, copy=False)
    if C < k:
        D_out, I_out = _pad_to(D_out, I_out, k)
        if has_payload:
            P_full = np.full((Q, k), PAD_ID, dtype=np.int64)
            P_full[:, :C] = P_out
            P_out = P_full
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
