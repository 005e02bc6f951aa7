"""Stage 3 of a search: the exact global shortlist from several shards' shortlists.

A shard's shortlist is exact for its rows (ties broken by id), so the best ``S`` of the union
of every shard's best ``S`` is what one shard holding every row would return: the results do not
depend on how the index is split.
"""

from __future__ import annotations

import numpy as np

from pipeline.search.topk import topk_smallest


def merge_shortlists(parts: list[tuple[np.ndarray, ...]], k: int, prefix_k: int | None = None):
    """Exact per-query top-k over several shards' shortlists ``(D_QS, I_QS, codes_QSM, lists_QS)``.

    Ordered by distance then id (``topk.topk_smallest``); codes and list ids travel with their
    candidate. Padding entries have id -1, distance inf and list -1.

    With ``prefix_k`` the parts are prefix-stage results (``ShardSearcher.shortlist`` with the
    prefix stage on): a fifth
    array holds each candidate's full lookup-table distance. The best ``prefix_k`` of the union by
    prefix distance are kept (what one shard holding every row would keep), then the best ``k`` of
    those by full distance, which is returned as the distance.
    """
    D = np.concatenate([p[0] for p in parts], axis=1)
    I = np.concatenate([p[1] for p in parts], axis=1)
    codes = np.concatenate([p[2] for p in parts], axis=1)
    lists = np.concatenate([p[3] for p in parts], axis=1)
    Q, T = D.shape
    pos = np.broadcast_to(np.arange(T, dtype=np.int64), (Q, T))
    if prefix_k is None:
        Dk, Ik, pk = topk_smallest(D, I, k, payload_QC=pos)
    else:
        D_full = np.concatenate([p[4] for p in parts], axis=1)
        _, Ip, pp = topk_smallest(D, I, prefix_k, payload_QC=pos)
        Dp_full = np.where(pp < 0, np.inf, np.take_along_axis(D_full, np.maximum(pp, 0), axis=1))
        Dk, Ik, pk = topk_smallest(Dp_full, Ip, k, payload_QC=pp)
    safe = np.where(pk < 0, 0, pk)
    codes_k = np.take_along_axis(codes, safe[..., None], axis=1)
    lists_k = np.where(pk < 0, -1, np.take_along_axis(lists, safe, axis=1))
    return Dk, Ik, codes_k, lists_k
