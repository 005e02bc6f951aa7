"""Compiled search kernels (numba): the lookup-table scan and the search's top-k selections.

:func:`scan_topk` is the lookup-table scan: probed lists -> table sums -> top-S heap. For each
query it walks the rows of its probed lists, sums the query's tables over each row's codes, and
keeps the ``S`` best candidates in a bounded max-heap ordered by (distance, id). No per-candidate array is ever materialised, so a query's cost is its codes'
table lookups plus a heap test per code: the fixed costs of the NumPy scanner (its per-chunk
arrays, padded buffer and selection passes) are gone.

The value of a (query, row) pair is computed with exactly the NumPy scanner's float32 arithmetic
(``pipeline.search.scan.ShardSearcher._code_dists``): the tables summed over m in order starting
from 0, times the row's scale (float16, widened exactly), plus the row's bias, plus the list's
coarse distance, each a separate float32 rounding (numba does not contract them into fused
multiply-adds without ``fastmath``). So both scanners rank the same values, and the heap's
order (distance, then smaller id) is ``pipeline.search.topk.topk_smallest``'s: they return the
same candidates on any CPU.

:func:`rows_topk` is the probe's selection: the P smallest (distance, column) of each row.
:func:`topk_by_id` selects and merges ranked candidates (``pipeline.search.topk.topk_smallest``).

The kernels release the GIL, so the searcher's query threads run them in parallel. They are
compiled on first use and cached on disk (numba's cache; ``NUMBA_CACHE_DIR`` moves it).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# float16 bit pattern -> float32, exact (NumPy's conversion), for the row scales.
HALF_TO_FLOAT = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
NO_SCALES = np.zeros(0, np.uint16)


@njit(nogil=True, cache=True, inline="always")
def _sift_down(hd, hi, hr, start, n):
    """Restore the max-heap (by (distance, id)) of ``hd/hi/hr[:n]`` below ``start``."""
    i = start
    while True:
        c = 2 * i + 1
        if c >= n:
            return
        r = c + 1
        if r < n and (hd[r] > hd[c] or (hd[r] == hd[c] and hi[r] > hi[c])):
            c = r
        if hd[c] > hd[i] or (hd[c] == hd[i] and hi[c] > hi[i]):
            hd[i], hd[c] = hd[c], hd[i]
            hi[i], hi[c] = hi[c], hi[i]
            hr[i], hr[c] = hr[c], hr[i]
            i = c
        else:
            return


@njit(nogil=True, cache=True, inline="always")
def _push(hd, hi, hr, n, d, i_, r_):
    """Add (d, i_, r_) to the max-heap of ``n`` entries (room for it is there)."""
    i = n
    while i > 0:
        parent = (i - 1) // 2
        if hd[parent] > d or (hd[parent] == d and hi[parent] > i_):
            break
        hd[i], hi[i], hr[i] = hd[parent], hi[parent], hr[parent]
        i = parent
    hd[i], hi[i], hr[i] = d, i_, r_


@njit(nogil=True, cache=True, inline="always")
def _sort_heap(hd, hi, hr, n):
    """Sort the heap's ``n`` entries ascending by (distance, id), in place."""
    for end in range(n - 1, 0, -1):
        hd[0], hd[end] = hd[end], hd[0]
        hi[0], hi[end] = hi[end], hi[0]
        hr[0], hr[end] = hr[end], hr[0]
        _sift_down(hd, hi, hr, 0, end)


@njit(nogil=True, cache=True, inline="always")
def _write_row(hd, hi, hr, n, q, out_D, out_I, out_P):
    """Row ``q`` of the outputs: the heap's ``n`` entries sorted, then (inf, -1, -1) padding."""
    _sort_heap(hd, hi, hr, n)
    for j in range(n):
        out_D[q, j] = hd[j]
        out_I[q, j] = hi[j]
        out_P[q, j] = hr[j]
    for j in range(n, out_D.shape[1]):
        out_D[q, j] = np.inf
        out_I[q, j] = -1
        out_P[q, j] = -1


def rows_topk(d_QL, out_D, out_I):
    """The ``P = out_D.shape[1]`` smallest entries of each row of ``d_QL`` (float32), sorted by
    (value, column), into ``out_D`` (float32) and ``out_I`` (int64 columns); NaN entries are left
    out and missing ones are (inf, -1). :func:`topk_by_id` with the columns as ids (a broadcast
    view: nothing materialised)."""
    cols_QL = np.broadcast_to(np.arange(d_QL.shape[1], dtype=np.int64), d_QL.shape)
    topk_by_id(d_QL, cols_QL, cols_QL, out_D, out_I, np.empty(out_I.shape, np.int64))


@njit(nogil=True, cache=True)
def topk_by_id(D_QC, I_QC, P_QC, out_D, out_I, out_P):
    """Per row, the ``k = out_D.shape[1]`` entries with the smallest (distance, id), sorted, with
    their payloads ``P_QC``; entries with id < 0 or a NaN distance are padding and come last as
    (inf, -1, -1) (``pipeline.search.topk.topk_smallest``'s contract)."""
    Q, C = D_QC.shape
    k = out_D.shape[1]
    hd = np.empty(k, np.float32)
    hi = np.empty(k, np.int64)
    hr = np.empty(k, np.int64)
    for q in range(Q):
        n = 0
        for j in range(C):
            d = D_QC[q, j]
            i_ = I_QC[q, j]
            if i_ < 0 or d != d:
                continue
            if n < k:
                _push(hd, hi, hr, n, d, i_, P_QC[q, j])
                n += 1
            elif d < hd[0] or (d == hd[0] and i_ < hi[0]):
                hd[0], hi[0], hr[0] = d, i_, P_QC[q, j]
                _sift_down(hd, hi, hr, 0, n)
        _write_row(hd, hi, hr, n, q, out_D, out_I, out_P)


@njit(nogil=True, cache=True)
def scan_topk(lut_QMK, Dc_QP, lists_QP, list_offsets, codes_NM, scale_bits_N, half_to_float,
              bias_N, ids_N, steps, out_D, out_I, out_R):
    """Top-S (``S = out_D.shape[1]``) of every query's probed lists by lookup-table distance.

    ``lut_QMK`` float32 tables; ``Dc_QP`` float32 coarse distances and ``lists_QP`` int64 probed
    lists (-1: none) per query; ``list_offsets`` the shard's CSR offsets; ``codes_NM`` uint8 or
    uint16; ``scale_bits_N`` the rows' float16 scales as uint16 (empty: no scales) and
    ``half_to_float`` their widening table; ``bias_N`` float32 row terms; ``steps`` the number of
    tables summed (M, or P for the prefix stage). Writes, per query, the candidates sorted by
    (distance, id) into ``out_D`` (float32), ``out_I`` (global ids) and ``out_R`` (shard rows),
    padded with (inf, -1, -1); candidates whose distance is NaN are left out.
    """
    Q, P = lists_QP.shape
    S = out_D.shape[1]
    use_scale = scale_bits_N.shape[0] > 0
    hd = np.empty(S, np.float32)
    hi = np.empty(S, np.int64)
    hr = np.empty(S, np.int64)
    for q in range(Q):
        lut_MK = lut_QMK[q]
        n = 0
        for p in range(P):
            lst = lists_QP[q, p]
            if lst < 0:
                continue
            dc = Dc_QP[q, p]
            for row in range(list_offsets[lst], list_offsets[lst + 1]):
                acc = np.float32(0.0)
                for m in range(steps):
                    acc += lut_MK[m, codes_NM[row, m]]
                if use_scale:
                    acc = acc * half_to_float[scale_bits_N[row]]
                acc = acc + bias_N[row]
                acc = acc + dc
                if acc != acc:
                    continue
                rid = ids_N[row]
                if n < S:
                    _push(hd, hi, hr, n, acc, rid, row)
                    n += 1
                elif acc < hd[0] or (acc == hd[0] and rid < hi[0]):
                    hd[0], hi[0], hr[0] = acc, rid, row
                    _sift_down(hd, hi, hr, 0, n)
        _write_row(hd, hi, hr, n, q, out_D, out_I, out_R)


def warm() -> None:
    """Compile the kernels (or load them from numba's cache) now, on tiny inputs, so that a
    process pays it when it builds its searcher or probe rather than inside its first search."""
    d = np.zeros((1, 2), np.float32)
    rows_topk(d, np.empty((1, 1), np.float32), np.empty((1, 1), np.int64))
    for codes in (np.zeros((1, 1), np.uint8), np.zeros((1, 1), np.uint16)):
        scan_topk(np.zeros((1, 1, 2), np.float32), np.zeros((1, 1), np.float32), np.zeros((1, 1), np.int64),
                  np.array([0, 1], np.int64), codes, NO_SCALES, HALF_TO_FLOAT, np.zeros(1, np.float32),
                  np.zeros(1, np.int64), 1, np.empty((1, 1), np.float32), np.empty((1, 1), np.int64),
                  np.empty((1, 1), np.int64))
