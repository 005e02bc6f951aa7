"""One search, stage by stage: the functions the in-process searcher and the query job both run.

For a query batch ``q_QD`` and :class:`~pipeline.search.params.SearchParams`:

1. probe (:func:`pipeline.search.probe.probe_lists`): the IVF lists each query visits;
2. :func:`shortlist` on each shard (:class:`pipeline.search.scan.ShardSearcher`): the best
   candidates of its rows by lookup-table distance, with their codes and lists;
3. :func:`merge`: the exact global shortlist of the shards' shortlists;
4. :func:`finish`: with ``pairwise``, the shortlist ranked by exact distance to the pairwise
   decoder's reconstruction and cut to its best ``pairwise``; the neural re-rank of the best
   ``rerank`` (or none), then the tail of the stage before up to ``k``.

``ShardSearcher.search`` runs them in one process over one shard; the query job
(:mod:`pipeline.distributed.shard_pool`) probes on the driver, runs :func:`shortlist` in the shard
actors, merges on the driver and runs :func:`finish` in the actors again. Every value the stages
rank depends only on its (query, row) pair, so both give the same results for any sharding,
query batch and thread count.
"""

from __future__ import annotations

import numpy as np

from pipeline.codec.metric import scores
from pipeline.search.merge import merge_shortlists
from pipeline.search.params import SearchParams
from pipeline.errors import ConfigError
from pipeline.search.rerank import DecodeFn, append_lut_tail, keep_candidates, rerank


def shortlist(searcher, q_QD: np.ndarray, lists_QP: np.ndarray, params: SearchParams,
              threads: int | None = None) -> tuple[np.ndarray, ...]:
    """One shard's shortlist ``(D, I, codes, lists)``, ``params.candidates`` per query; with the
    prefix stage its best ``prefix_shortlist`` by prefix distance ``(D_prefix, I, codes, lists,
    D_full)`` (:func:`merge` completes it). Missing candidates have id -1 and list -1."""
    if params.prefix is None:
        D, I, rows = searcher.lut_search(q_QD, lists_QP, params.candidates, threads=threads)
        extra: tuple[np.ndarray, ...] = ()
    else:
        D, I, rows, D_full = searcher.prefix_search(q_QD, lists_QP, *params.prefix, threads=threads)
        extra = (D_full,)
    safe = np.where(rows < 0, 0, rows)
    codes = searcher.codes_NM[safe]
    lists = np.where(rows < 0, -1, searcher.list_ids_N[safe]).astype(np.int64)
    return (D, I, codes, lists) + extra


def merge(params: SearchParams, parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """The global shortlist ``(D, I, codes, lists)`` of the shards' :func:`shortlist` results."""
    return merge_shortlists(parts, params.candidates, None if params.prefix is None else params.prefix[1])


def finish(decode_fn: DecodeFn | None, q_QD: np.ndarray, merged: tuple[np.ndarray, ...],
           params: SearchParams, pairwise_fn: DecodeFn | None = None,
           metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    """``(D_QK, I_QK)`` from a merged shortlist: with ``params.pairwise``, its best by exact
    distance to ``pairwise_fn``'s reconstruction; the best ``params.reranked`` of those re-ranked
    by exact distance to ``decode_fn``'s, then the order of the stage before; without a decoder
    (or with ``rerank=0``) the ranking of the stage before. The distances returned are the
    metric's scores (:func:`pipeline.codec.metric.scores`: inner products for ``ip``)."""
    D_QK, I_QK = _finish(decode_fn, q_QD, merged, params, pairwise_fn, metric)
    return scores(D_QK, metric), I_QK


def _finish(decode_fn, q_QD, merged, params: SearchParams, pairwise_fn, metric: str):
    if params.pairwise is not None:
        if pairwise_fn is None:
            raise ConfigError("this search asks for the pairwise stage (pairwise="
                              f"{params.pairwise}) but the model has no pairwise decoder; retrain "
                              "it with this version, or search without the pairwise stage")
        D_QS, I_QS, codes_QSM, lists_QS = merged[:4]
        D2, I2, pos = rerank(pairwise_fn, q_QD, I_QS, codes_QSM, lists_QS, params.pairwise, positions=True,
                             metric=metric)
        merged = keep_candidates(merged, D2, I2, pos)
    D_QS, I_QS, codes_QSM, lists_QS = merged[:4]
    k = params.k
    R = params.reranked if decode_fn is not None else 0
    if R == 0:
        return D_QS[:, :k], I_QS[:, :k]
    D_QK, I_QK = rerank(decode_fn, q_QD, I_QS[:, :R], codes_QSM[:, :R], lists_QS[:, :R], min(k, R), metric=metric)
    if R < k:
        D_QK, I_QK = append_lut_tail(D_QK, I_QK, D_QS, I_QS, k)
    return D_QK, I_QK
