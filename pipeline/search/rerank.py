"""Stage 4 of a search: exact distances to the neural decoder's reconstruction of the shortlist.

``rerank`` decodes each distinct candidate (id) once, computes squared L2
distances from explicit float64 differences (``sqdist_rows``) and keeps the best ``k``, ties by
id. Every value it ranks depends only on the (query, candidate) pair, given a decoder that
decodes a row the same whatever rows come with it (``pipeline.codec.decoder.Decoder``).
After ``R < k`` re-ranked results the rest follow in the order of the stage before
(``append_lut_tail``). The pairwise stage is the same function with the pairwise decoder, keeping
its best candidates with their codes (``positions``, ``keep_candidates``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pipeline.codec.metric import ranks_by_ip
from pipeline.errors import ConfigError
from pipeline.search.topk import PAD_ID, merge_topk, topk_smallest

DecodeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def sqdist_rows(q_QD: np.ndarray, x_QXD: np.ndarray) -> np.ndarray:
    """Exact squared L2 distances ``||q_i - x_ij||^2`` -> ``(Q, X)`` float32.

    Computed from explicit differences in float64 (no ``|q|^2 - 2qx + |x|^2`` cancellation), so
    the value for a (query, vector) pair does not depend on the batch it is computed in: the
    re-ranker and ``brute_force_reference`` agree bit for bit.
    """
    diff_QXD = x_QXD.astype(np.float64) - q_QD.astype(np.float64)[:, None, :]
    np.multiply(diff_QXD, diff_QXD, out=diff_QXD)
    return diff_QXD.sum(axis=-1).astype(np.float32)


def ipdist_rows(q_QD: np.ndarray, x_QXD: np.ndarray) -> np.ndarray:
    """``-2 <q_i, x_ij>`` -> ``(Q, X)`` float32, the inner-product metrics' ranking value (smaller
    is better), summed in float64 term by term like :func:`sqdist_rows`."""
    prod_QXD = x_QXD.astype(np.float64) * q_QD.astype(np.float64)[:, None, :]
    return (-2.0 * prod_QXD.sum(axis=-1)).astype(np.float32)


def rank_values(metric: str):
    """The exact ranking value of (query, vector) pairs for ``metric``: :func:`sqdist_rows` or
    :func:`ipdist_rows`."""
    return ipdist_rows if ranks_by_ip(metric) else sqdist_rows


def brute_force_reference(q_QD: np.ndarray, vectors_ND: np.ndarray, ids_N: np.ndarray,
                          k: int, batch_entries: int = 1 << 22, metric: str = "l2"):
    """Exact k-NN by scanning all vectors; ties broken by smaller id, padding (inf, -1). The
    values are the search's ranking values for ``metric`` (``-2 <q, x>`` for the inner-product
    metrics, over the vectors as given: prepare them first for cosine)."""
    dist = rank_values(metric)
    q_QD = np.asarray(q_QD, dtype=np.float32)
    vectors_ND = np.asarray(vectors_ND, dtype=np.float32)
    ids_N = np.asarray(ids_N, dtype=np.int64)
    Q, D = q_QD.shape
    N = vectors_ND.shape[0]
    if vectors_ND.shape[1] != D or ids_N.shape != (N,):
        raise ValueError(f"shape mismatch: queries {q_QD.shape}, vectors {vectors_ND.shape}, "
                         f"ids {ids_N.shape}")
    best = (np.full((Q, k), np.inf, np.float32), np.full((Q, k), PAD_ID, np.int64))
    n_blk = max(1, batch_entries // max(1, Q * D))
    for a in range(0, N, n_blk):
        x_QXD = np.broadcast_to(vectors_ND[None, a:a + n_blk], (Q, min(n_blk, N - a), D))
        D_QX = dist(q_QD, x_QXD)
        I_QX = np.broadcast_to(ids_N[None, a:a + n_blk], D_QX.shape)
        best = merge_topk([best, (D_QX, I_QX)], k)
    return best



def rerank(decode_fn: DecodeFn, q_QD: np.ndarray, I_QS: np.ndarray, codes_QSM: np.ndarray,
           lists_QS: np.ndarray, k: int, batch_rows: int = 65536,
           positions: bool = False, metric: str = "l2") -> tuple[np.ndarray, ...]:
    """Top-``k`` of the candidates ``(I_QS, codes_QSM, lists_QS)`` by exact squared distance to
    ``decode_fn(codes_NM, list_ids_N)``; padding candidates have id -1. With ``positions``, a
    third array gives each result's column in the candidates (-1 for padding).

    A candidate shortlisted by several queries (the same id: ids are unique in an index, so the
    same row) is decoded once, ``batch_rows`` at a time.
    """
    Q, S = I_QS.shape
    D = q_QD.shape[1]
    valid = I_QS >= 0
    x_QSD = np.zeros((Q, S, D), np.float32)
    if valid.any():
        # one id is one row (ids are unique in an index): each distinct candidate is decoded once
        _, first, inv = np.unique(I_QS[valid], return_index=True, return_inverse=True)
        codes_UM = codes_QSM[valid][first]
        lists_U = lists_QS[valid][first].astype(np.int64)
        x_UD = np.empty((len(first), D), np.float32)
        for a in range(0, len(first), batch_rows):
            x = np.asarray(decode_fn(codes_UM[a:a + batch_rows], lists_U[a:a + batch_rows]), dtype=np.float32)
            if x.shape != (min(batch_rows, len(first) - a), D):
                raise ConfigError(f"the decoder returned shape {x.shape}, expected "
                                  f"{(min(batch_rows, len(first) - a), D)}")
            x_UD[a:a + len(x)] = x
        x_QSD[valid] = x_UD[inv.ravel()]
    d_QS = np.empty((Q, S), np.float32)
    step = max(1, (1 << 22) // max(1, S * D))
    for a in range(0, Q, step):
        d_QS[a:a + step] = rank_values(metric)(q_QD[a:a + step], x_QSD[a:a + step])
    d_QS[~valid] = np.inf
    if positions:
        return topk_smallest(d_QS, np.where(valid, I_QS, PAD_ID), k,
                             payload_QC=np.broadcast_to(np.arange(S, dtype=np.int64), (Q, S)))
    return topk_smallest(d_QS, np.where(valid, I_QS, PAD_ID), k)


def keep_candidates(merged: tuple[np.ndarray, ...], D_QX: np.ndarray, I_QX: np.ndarray,
                    pos_QX: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The shortlist ``(D, I, codes, lists)`` reduced to the candidates at columns ``pos_QX`` of
    ``merged`` (in that order, with distances ``D_QX``); -1 columns become padding."""
    codes_QSM, lists_QS = merged[2], merged[3]
    safe = np.maximum(pos_QX, 0)
    codes = np.take_along_axis(codes_QSM, safe[..., None], axis=1)
    lists = np.where(pos_QX < 0, -1, np.take_along_axis(lists_QS, safe, axis=1))
    return D_QX, I_QX, codes, lists


def append_lut_tail(D_QR: np.ndarray, I_QR: np.ndarray, D_QS: np.ndarray, I_QS: np.ndarray,
                    k: int) -> tuple[np.ndarray, np.ndarray]:
    """Results ``R..k-1`` from the lookup-table shortlist after the ``R`` re-ranked ones.

    The re-ranked results are the shortlist's first ``R`` entries, so the tail (shortlist entries
    ``R..k-1``, with their lookup-table distances) holds no duplicate.
    """
    R = D_QR.shape[1]
    return (np.concatenate([D_QR, D_QS[:, R:k]], axis=1),
            np.concatenate([I_QR, I_QS[:, R:k]], axis=1))
