"""The lookup-table stage over one IVF-QINCo shard: ``ShardSearcher``.

A ``ShardSearcher`` holds one shard's rows (sorted by IVF list) and scores the codes of the lists
each query visits: approximate squared L2 distances from the least-squares additive decoder
``x ≈ c_l + a_n Σ_m C_m[code_m]`` through per-query lookup tables ``<q, C_m[k]>``, and keeps the
best ``S`` (``lut_search``). ``search`` runs the whole pipeline of :mod:`pipeline.search.pipeline`
over the shard (probe, this stage, the re-rank by ``decode_fn``); the query job's actors run
the same functions over theirs.

Optionally (``SearchParams.prefix_steps`` P) stage 2 starts with a prefix stage
(``prefix_search``): the probed lists are ranked with the first P tables only (the unscaled
reconstruction ``c_l + Σ_{m<P} C_m[code_m]``, with its own per-row term), the best
``prefix_shortlist`` are kept and ranked with all M tables. The scan's cost is mostly its table
lookups, one per code and codebook, so the prefix stage makes the scan up to M / P times cheaper.

With ``r_n = Σ_m C_m[code_nm]`` the residual reconstruction of row ``n`` (list ``l``)::

    ||q - c_l - r_n||^2 = ||q - c_l||^2 - 2 Σ_m <q, C_m[code_nm]> + (||r_n||^2 + 2 <c_l, r_n>)

The last term depends only on the row, so it is precomputed once per row (``bias_N``, O(N)
floats); the per-list terms ``<c_l, C_m[k]>`` are folded into it. A query then needs one
``M x K`` table and the scan is ``M`` table gathers per code. With row scales ``a_n``
(``pipeline.codec.additive.row_scales``) the reconstruction is ``c_l + a_n r_n``: the table sum
is multiplied by ``a_n`` and the bias is ``a_n² ||r_n||² + 2 a_n <c_l, r_n>``.

Two scanners compute these values. The default (``scanner="native"``) is one compiled loop per
query (:func:`pipeline.search.kernels.scan_topk`): table sums over each code of the probed lists
and a bounded (distance, id) heap, nothing materialised per candidate. The NumPy scanner
(``scanner="numpy"``), the reference it is tested against, lays every (query, candidate row) pair
of a chunk of queries out flat, sums the ``M`` table entries of each pair with torch's
``embedding_bag`` (a C++ gather-add, one bag per pair) and selects with array passes. Both give
the same candidates and distances, bit for bit. ``bench/bench_scanner.py`` compares them with
Faiss's ``IndexIVFResidualQuantizer`` scan of the same codes, which rebuilds an ``M x K`` table
for every (query, probed list) pair.

Everything is plain NumPy/torch; rankings are exact and break ties by the smaller global
id (see ``pipeline.search.topk``), and every value they rank is computed the same way whatever batch,
shard or thread it is computed in: the tables and the probe by ``pipeline.codec.rowwise``'s products,
the coarse and exact distances in float64 from explicit differences, the table sums pair by pair.
So results do not depend on the query batch, the sharding or the threads.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.codec.codes import code_dtype
from pipeline.codec.metric import check_metric, ranks_by_ip
from pipeline.codec.decoder import model_centroids, model_codebooks, model_pairwise, model_row_scales
from pipeline.codec.rowwise import matmul_rows
from pipeline.errors import ConfigError, VectorFormatError
from pipeline.search.kernels import HALF_TO_FLOAT, NO_SCALES, scan_topk, warm
from pipeline.search.params import SearchParams
from pipeline.search.pipeline import finish, merge, shortlist
from pipeline.search.probe import check_queries, coarse_dists, coarse_probe, probe_lists
from pipeline.search.rerank import DecodeFn
from pipeline.search.topk import PAD_ID, topk_smallest


log = logging.getLogger(__name__)

# Candidate budget of one NumPy scan chunk; ~150 bytes of temporaries per candidate.
SCAN_BUFFER_ENTRIES = 1 << 20
# (query, row) pairs per table gather-add: their int32 table indices (4 MB at M = 16) stay in the
# CPU's cache between being written and being summed (bench/bench_scanner.py measures the gain).
GATHER_BLOCK_PAIRS = 1 << 16
# The lookup-table scanners: the compiled loop (``pipeline.search.kernels``, the default) and the
# NumPy/torch one (the reference it is tested against: the same candidates).
SCANNERS = ("native", "numpy")
# Fewest queries worth a scanner thread of their own.
MIN_QUERIES_PER_THREAD = 16


class ShardSearcher:
    """Searches one shard of an IVF-QINCo index.

    Shard arrays (rows sorted by IVF list): ``list_ids_N`` (int32), ``ids_N`` (int64 global ids),
    ``codes_NM`` (uint8 if K <= 256 else uint16) and CSR ``list_offsets`` (nlist + 1) so that
    list ``l`` is rows ``[off[l], off[l+1])``. Model arrays: ``centroids_LD`` (coarse centroids,
    original space) and ``codebooks_MKD`` (additive decoder of the residual).
    ``decode_fn(codes_NM, list_ids_N) -> x_ND`` is the exact decoder used for re-ranking. It must
    give a row the same output whatever rows come with it and whatever the thread count
    (``pipeline.codec.decoder.Decoder`` does, through ``pipeline.codec.rowwise``): the rows a search decodes
    together depend on the query batch, the shard and the threads, and its results do not.

    ``scale_N`` (optional, ``(N,)``, stored as float16): per-row scales of the additive residual
    (see the module docstring); without them every row's scale is 1. ``pairwise_fn`` (optional,
    ``pipeline.codec.pairwise.PairwiseDecoder``) decodes for the pairwise stage
    (``SearchParams.pairwise``).

    The scan runs on ``num_threads`` threads (query chunks; ``search`` runs each chunk through the
    re-rank on its thread too). Extra threads for the scan alone pay off only for large nprobe
    (bench/bench_scanner.py), so the search job keeps one per actor and scales with actors.
    ``coarse_index`` may be a prebuilt probe over the centroids (e.g. HNSW); ``source`` names the
    shard in error messages.
    """

    def __init__(self, list_ids_N, ids_N, codes_NM, list_offsets, centroids_LD, codebooks_MKD,
                 decode_fn: DecodeFn | None = None, *,
                 coarse_index=None, source: str = "<shard>", decode_batch_size: int = 65536,
                 scan_buffer_entries: int = SCAN_BUFFER_ENTRIES, num_threads: int = 1,
                 scale_N: np.ndarray | None = None, pairwise_fn: DecodeFn | None = None,
                 scanner: str = "native", metric: str = "l2"):
        self.metric = check_metric(metric)
        self.ip = ranks_by_ip(metric)
        if scanner not in SCANNERS:
            raise ConfigError(f"{source}: scanner must be one of {SCANNERS}, got {scanner!r}")
        self.scanner = scanner
        self.source = source
        warm()  # the kernels' compilation (or cache load) belongs to the set-up, not the first search
        self.num_threads = max(1, int(num_threads))
        self.centroids_LD = np.ascontiguousarray(centroids_LD, dtype=np.float32)
        self.codebooks_MKD = np.ascontiguousarray(codebooks_MKD, dtype=np.float32)
        if self.centroids_LD.ndim != 2 or self.codebooks_MKD.ndim != 3:
            raise ConfigError(f"{source}: centroids must be (L, D) and codebooks (M, K, D), got "
                              f"{self.centroids_LD.shape} and {self.codebooks_MKD.shape}")
        self.nlist, self.D = self.centroids_LD.shape
        self.M, self.K, D_cb = self.codebooks_MKD.shape
        if D_cb != self.D:
            raise ConfigError(f"{source}: codebook dim {D_cb} != centroid dim {self.D}")
        # (D, M K): the right-hand side of the lookup tables' product (``_luts``)
        self._codebooks_DMK = torch.from_numpy(
            np.ascontiguousarray(self.codebooks_MKD.reshape(self.M * self.K, self.D).T))

        codes_NM = np.asarray(codes_NM)
        if codes_NM.ndim != 2 or codes_NM.shape[1] != self.M:
            raise VectorFormatError(source, f"codes must have shape (N, {self.M}), "
                                            f"got {codes_NM.shape}")
        if not np.issubdtype(codes_NM.dtype, np.integer):
            raise VectorFormatError(source, f"codes must be integers, got {codes_NM.dtype}")
        self.N = codes_NM.shape[0]
        dtype = code_dtype(self.K)
        if self.N:
            bad = (codes_NM < 0) | (codes_NM >= self.K)
            if bad.any():
                row = int(np.flatnonzero(bad.any(axis=1))[0])
                raise VectorFormatError(source, f"code out of range [0, {self.K}): "
                                                f"{codes_NM[row].tolist()}", row=row)
        self.codes_NM = np.ascontiguousarray(codes_NM, dtype=dtype)
        self.ids_N = np.ascontiguousarray(ids_N, dtype=np.int64)
        self.list_ids_N = np.ascontiguousarray(list_ids_N, dtype=np.int32)
        self.list_offsets = np.ascontiguousarray(list_offsets, dtype=np.int64)
        self._check_layout()
        self.list_sizes_L = np.diff(self.list_offsets)
        self.scale_N = None
        if scale_N is not None:
            scale_N = np.asarray(scale_N)
            if scale_N.shape != (self.N,):
                raise VectorFormatError(source, f"row scales have shape {scale_N.shape}, expected ({self.N},)")
            if not np.isfinite(scale_N).all():
                raise VectorFormatError(source, "row scale is NaN or Inf",
                                        row=int(np.flatnonzero(~np.isfinite(scale_N))[0]))
            self.scale_N = np.ascontiguousarray(scale_N, dtype=np.float16)

        self.decode_fn = decode_fn
        self.pairwise_fn = pairwise_fn
        self.decode_batch_size = int(decode_batch_size)
        self.scan_buffer_entries = int(scan_buffer_entries)
        self.norms_N, self.bias_N = self._row_terms()
        self._prefix_bias: dict[int, np.ndarray] = {}
        self._prefix_lock = threading.Lock()
        self._coarse_index = coarse_index
        if coarse_index is not None and (coarse_index.ntotal != self.nlist
                                         or coarse_index.d != self.D):
            raise ConfigError(f"{source}: coarse index has {coarse_index.ntotal} vectors of dim "
                              f"{coarse_index.d}, expected {self.nlist} of dim {self.D}")


    # ------------------------------------------------------------------ construction
    def _check_layout(self) -> None:
        src, N, off = self.source, self.N, self.list_offsets
        if self.ids_N.shape != (N,) or self.list_ids_N.shape != (N,):
            raise VectorFormatError(src, f"ids {self.ids_N.shape} / list ids "
                                         f"{self.list_ids_N.shape} do not match {N} codes")
        if off.shape != (self.nlist + 1,):
            raise VectorFormatError(src, f"list_offsets must have {self.nlist + 1} entries "
                                         f"(nlist + 1), got {off.shape}")
        if off[0] != 0 or off[-1] != N:
            raise VectorFormatError(src, f"list_offsets must start at 0 and end at N={N}, got "
                                         f"{off[0]} .. {off[-1]}")
        dec = np.flatnonzero(np.diff(off) < 0)
        if dec.size:
            raise VectorFormatError(src, f"list_offsets decrease at list {int(dec[0])}")
        expected_N = np.repeat(np.arange(self.nlist, dtype=np.int32), np.diff(off))
        wrong = np.flatnonzero(expected_N != self.list_ids_N)
        if wrong.size:
            r = int(wrong[0])
            raise VectorFormatError(src, f"list id {int(self.list_ids_N[r])} but list_offsets "
                                         f"put this row in list {int(expected_N[r])}", row=r)

    def _row_terms(self, steps: int | None = None, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
        """``||a_n r_n||^2`` and ``||a_n r_n||^2 + 2 <c_l, a_n r_n>`` per row (float32, computed in
        float64; ``a_n`` = 1 without row scales). With ``steps`` P, the same terms of the unscaled
        residual of the first P codebooks (the prefix stage's). With an inner-product metric the
        row term of ``-2 <q, c_l + a_n r_n>`` is 0."""
        norms_N = np.empty(self.N, np.float32)
        bias_N = np.empty(self.N, np.float32)
        cb_MKD = self.codebooks_MKD.astype(np.float64)
        for a in range(0, self.N, chunk):
            codes = self.codes_NM[a:a + chunk]
            r_ND = np.zeros((codes.shape[0], self.D), np.float64)
            for m in range(self.M if steps is None else steps):
                r_ND += cb_MKD[m][codes[:, m].astype(np.intp)]
            if self.scale_N is not None and steps is None:
                r_ND *= self.scale_N[a:a + chunk, None].astype(np.float64)
            nrm = np.einsum("nd,nd->n", r_ND, r_ND)
            c_ND = self.centroids_LD[self.list_ids_N[a:a + chunk]].astype(np.float64)
            norms_N[a:a + chunk] = nrm
            bias_N[a:a + chunk] = 0.0 if self.ip else nrm + 2.0 * np.einsum("nd,nd->n", c_ND, r_ND)
        return norms_N, bias_N

    # ------------------------------------------------------------------ stage 1: probe
    def _probe(self):
        if self._coarse_index is None:
            self._coarse_index = coarse_probe(self.centroids_LD, self.metric)
        return self._coarse_index

    def probe(self, q_QD, nprobe: int):
        """Nearest ``nprobe`` IVF lists per query -> ``(Dc_QP float32, lists_QP int64)``.

        ``nprobe`` is capped at nlist; missing entries (from approximate coarse indexes) are -1.
        """
        q_QD = check_queries(q_QD, self.D, self.metric)
        P = max(1, min(int(nprobe), self.nlist))
        lists_QP = probe_lists(self._probe(), self.centroids_LD, q_QD, SearchParams(k=1, nprobe=P, shortlist=1),
                               self.metric)
        return self._coarse_dists(q_QD, lists_QP), lists_QP

    # ------------------------------------------------------------------ stage 2: LUT shortlist
    def _coarse_dists(self, q_QD: np.ndarray, lists_QP: np.ndarray) -> np.ndarray:
        return coarse_dists(q_QD, lists_QP, self.centroids_LD, self.metric)

    def _luts(self, q_QD: np.ndarray) -> np.ndarray:
        """Per-query tables ``-2 <q, C_m[k]>`` as float32 ``(Q, M, K)``: one batch-invariant product
        (``pipeline.codec.rowwise``) over the query batch, so a query's tables are the same in any batch,
        shard or thread. The factor -2 is applied to the queries: scaling by a power of two
        commutes with float32 rounding, so each entry is exactly -2 times the plain inner product."""
        M, K = self.M, self.K
        # torch's GEMM runs on the same thread pool as the re-rank's decoder; NumPy's BLAS pool
        # busy-waits after a call and halves the speed of a decode that follows.
        q = np.multiply(q_QD, np.float32(-2.0), dtype=np.float32)
        lut = matmul_rows(torch.from_numpy(q), self._codebooks_DMK)
        return lut.numpy().reshape(-1, M, K)

    def prefix_bias(self, steps: int) -> np.ndarray:
        """Row term of the prefix stage with ``steps`` codebooks (``_row_terms``), computed on first
        use and kept: 4 bytes per row for each ``steps`` searched with."""
        if not 1 <= steps < self.M:
            raise ConfigError(f"{self.source}: prefix_steps must be between 1 and M - 1 = {self.M - 1}, "
                              f"got {steps}")
        with self._prefix_lock:
            if steps not in self._prefix_bias:
                self._prefix_bias[steps] = self._row_terms(steps)[1]
            return self._prefix_bias[steps]

    def _code_dists(self, lut_QMK: np.ndarray, counts_Q: np.ndarray, rows_T: np.ndarray,
                    steps: int | None = None, q_C: np.ndarray | None = None) -> np.ndarray:
        """``Σ_m lut[q, m, code_m] (x a_n) + bias`` for (query, row) pairs -> float32 ``(T,)``; the
        pairs come query by query, ``counts_Q[i]`` of them for query ``q_C[i]`` (default: every
        query of ``lut_QMK`` in order). With ``steps`` P, the prefix stage's value: the first P
        tables, no row scale, the prefix bias.

        The sum runs over m in order in float32 (``embedding_bag`` in sum mode, one bag per
        pair: a C++ gather-add with no intermediate arrays); this is the canonical arithmetic of a
        lookup-table distance, shared by both scanners.
        """
        M, K = self.M, self.K
        P = M if steps is None else steps
        Q = lut_QMK.shape[0]
        q_C = np.arange(Q) if q_C is None else np.asarray(q_C)
        T = len(rows_T)
        itype, ttype = (np.int32, torch.int32) if Q * M * K < 2 ** 31 else (np.int64, torch.int64)
        table = torch.from_numpy(np.ascontiguousarray(lut_QMK, dtype=np.float32).reshape(-1, 1))
        # Row of (query, m, code) in the flattened tables: code + m K + q M K, built per block with
        # whole-block tensor operations (no per-query Python loop) in two passes over its indices.
        mK_P = torch.arange(P, dtype=ttype) * K
        qoff_T = torch.from_numpy(np.repeat(q_C.astype(itype) * (M * K), np.asarray(counts_Q)))
        rows_t = torch.from_numpy(np.ascontiguousarray(rows_T, dtype=np.int64))
        codes_t = torch.from_numpy(self.codes_NM) if self.codes_NM.dtype == np.uint8 else None
        acc_T = np.empty(T, np.float32)
        # One index buffer for all blocks of the call, rather than a fresh 4 MB tensor per block.
        idx_buf = torch.empty((min(T, GATHER_BLOCK_PAIRS), P), dtype=ttype)
        for a in range(0, T, GATHER_BLOCK_PAIRS):
            b = min(T, a + GATHER_BLOCK_PAIRS)
            idx_XP = idx_buf[:b - a]
            if codes_t is not None:
                torch.add(codes_t.index_select(0, rows_t[a:b])[:, :P], mK_P, out=idx_XP)
            else:  # uint16 codes (K > 256): torch has no uint16 arithmetic
                codes_XM = np.take(self.codes_NM, rows_T[a:b], axis=0)[:, :P]
                torch.add(torch.from_numpy(codes_XM.astype(itype)), mK_P, out=idx_XP)
            idx_XP += qoff_T[a:b, None]
            acc_T[a:b] = F.embedding_bag(idx_XP, table, mode="sum")[:, 0].numpy()
        if steps is not None:
            acc_T += np.take(self.prefix_bias(steps), rows_T)
            return acc_T
        if self.scale_N is not None:
            # torch gathers the float16 scales and widens them with vector instructions (exact);
            # NumPy's float16 conversion is element by element, several times slower.
            acc_T *= torch.from_numpy(self.scale_N).index_select(0, rows_t).float().numpy()
        acc_T += np.take(self.bias_N, rows_T)
        return acc_T

    def _lut_dists(self, lut_QMK: np.ndarray, rows_QX: np.ndarray, lists_QP: np.ndarray,
                   Dc_QP: np.ndarray) -> np.ndarray:
        """Approximate distances of given shard rows (each in one of its query's probed lists),
        with exactly the arithmetic (values, order, float32 rounding) of the NumPy scanner: the
        canonical value of a (query, code) pair."""
        Q, X = rows_QX.shape
        safe = np.maximum(rows_QX, 0)
        slot_QX = (self.list_ids_N[safe][:, :, None] == lists_QP[:, None, :]).argmax(axis=2)
        acc = self._code_dists(lut_QMK, np.full(Q, X), safe.ravel()).reshape(Q, X)
        acc += np.take_along_axis(Dc_QP, slot_QX, axis=1)
        return np.where(rows_QX >= 0, acc, np.inf).astype(np.float32)

    def _check_lists(self, lists_QP, Q: int) -> np.ndarray:
        lists_QP = np.ascontiguousarray(lists_QP, dtype=np.int64)
        if lists_QP.ndim != 2 or lists_QP.shape[0] != Q:
            raise ConfigError(f"lists must have shape ({Q}, nprobe), got {lists_QP.shape}")
        if lists_QP.size and lists_QP.max() >= self.nlist:
            raise ConfigError(f"{self.source}: probed list {int(lists_QP.max())} >= nlist "
                              f"{self.nlist}")
        return lists_QP

    def lut_search(self, q_QD, lists_QP, S: int, prefix: tuple[int, int] | None = None,
                   threads: int | None = None):
        """Shortlist of ``S`` candidates per query from the probed lists.

        Returns ``(D_QS float32, I_QS int64 global ids, rows_QS int64 shard rows)`` sorted by
        (approximate squared distance, id); missing candidates are (inf, -1, -1). With ``prefix``
        ``(P, S1)`` the candidates are the best S1 of the prefix stage (``prefix_search``).
        ``threads``: scanner threads (default: as many as pay off, up to ``num_threads``).
        """
        if S < 1:
            raise ConfigError(f"shortlist size must be >= 1, got {S}")
        if prefix is not None:
            _, I_QX, rows_QX, D_QX = self.prefix_search(q_QD, lists_QP, *prefix, threads=threads)
            return topk_smallest(D_QX, I_QX, S, payload_QC=rows_QX)
        q_QD = check_queries(q_QD, self.D)
        lists_QP = self._check_lists(lists_QP, q_QD.shape[0])
        if lists_QP.shape[0] == 0:
            return self._empty(0, S)
        lut_QMK = self._luts(q_QD)
        Dc_QP = self._coarse_dists(q_QD, lists_QP)
        return self._lut_search(lut_QMK, Dc_QP, lists_QP, S, threads=threads)

    def prefix_search(self, q_QD, lists_QP, steps: int, S1: int, threads: int | None = None):
        """The prefix stage: the best ``S1`` candidates per query by the lookup-table distance of the
        first ``steps`` codebooks (see ``SearchParams``), with their full lookup-table distances.

        Returns ``(Dp_QS1, I_QS1, rows_QS1, D_QS1)`` sorted by (prefix distance, id); ``D_QS1`` is the
        full distance (all M tables, row scales), the value ``lut_search`` gives the same pair.
        The selection depends only on the (query, row) pairs, so the best S1 of several shards'
        results is the best S1 of their union: a search merges shards on the prefix distance first.
        """
        q_QD = check_queries(q_QD, self.D)
        lists_QP = self._check_lists(lists_QP, q_QD.shape[0])
        if S1 < 1:
            raise ConfigError(f"prefix shortlist size must be >= 1, got {S1}")
        self.prefix_bias(steps)  # validates steps; computed once, before any scanner thread
        if lists_QP.shape[0] == 0:
            return self._empty(0, S1) + (np.full((0, S1), np.inf, np.float32),)
        lut_QMK = self._luts(q_QD)
        Dc_QP = self._coarse_dists(q_QD, lists_QP)
        return self._lut_search(lut_QMK, Dc_QP, lists_QP, S1, steps, threads)

    def _empty(self, Q: int, S: int):
        return (np.full((Q, S), np.inf, np.float32), np.full((Q, S), PAD_ID, np.int64),
                np.full((Q, S), PAD_ID, np.int64))

    def _threads_for(self, Q: int) -> int:
        """Threads worth using for ``Q`` queries (at most ``num_threads``)."""
        return max(1, min(self.num_threads, Q // MIN_QUERIES_PER_THREAD))

    def _lut_search(self, lut_QMK, Dc_QP, lists_QP, S, steps=None, threads: int | None = None):
        Q = lists_QP.shape[0]
        T = self._threads_for(Q) if threads is None else threads
        one = self._lut_search_native if self.scanner == "native" else self._lut_search_numpy_1
        if T <= 1:
            return one(lut_QMK, Dc_QP, lists_QP, S, steps)

        def part(a: int, b: int):
            return one(lut_QMK[a:b], Dc_QP[a:b], lists_QP[a:b], S, steps)

        return _in_query_parts(part, Q, T)

    def _lut_search_native(self, lut_QMK, Dc_QP, lists_QP, S, steps=None):
        """``_lut_search_numpy_1``'s results from the compiled scan (``pipeline.search.kernels``)."""
        Q = lists_QP.shape[0]
        D_QS, I_QS, R_QS = (np.empty((Q, S), np.float32), np.empty((Q, S), np.int64),
                            np.empty((Q, S), np.int64))
        if steps is None:
            nsum, bias_N = self.M, self.bias_N
            scales = NO_SCALES if self.scale_N is None else self.scale_N.view(np.uint16)
        else:
            nsum, bias_N, scales = steps, self.prefix_bias(steps), NO_SCALES
        scan_topk(np.ascontiguousarray(lut_QMK, dtype=np.float32), np.ascontiguousarray(Dc_QP, dtype=np.float32),
                  np.ascontiguousarray(lists_QP, dtype=np.int64), self.list_offsets, self.codes_NM, scales,
                  HALF_TO_FLOAT, bias_N, self.ids_N, nsum, D_QS, I_QS, R_QS)
        if steps is None:
            return D_QS, I_QS, R_QS
        return D_QS, I_QS, R_QS, self._lut_dists(lut_QMK, R_QS, lists_QP, Dc_QP)

    def _lut_search_numpy_1(self, lut_QMK, Dc_QP, lists_QP, S, steps=None):
        """Top-S by lookup-table distance; with ``steps`` top-S by prefix distance, plus the full
        distances of those candidates (``prefix_search``)."""
        Q, P = lists_QP.shape
        sizes_QP = np.where(lists_QP >= 0, self.list_sizes_L[np.maximum(lists_QP, 0)], 0)
        tot_Q = sizes_QP.sum(axis=1)
        out = self._empty(Q, S)
        # Chunks of queries with similar candidate counts, so that little of a chunk's (queries,
        # widest count) buffer is padding. A query's results do not depend on its chunk.
        order = np.argsort(tot_Q, kind="stable")
        tot_sorted = tot_Q[order].tolist()
        a = 0
        while a < Q:
            # Grow the chunk while its buffer stays within budget and its widest query (its last)
            # within twice (plus a little) of its first.
            b = a + 1
            cap = 2 * max(tot_sorted[a], 1) + 64
            while (b < Q and tot_sorted[b] <= cap
                   and (b + 1 - a) * max(tot_sorted[b], 1) <= self.scan_buffer_entries):
                b += 1
            width = max(tot_sorted[b - 1], 1)
            q_C = order[a:b]
            D_, I_, R_ = self._scan_chunk(lut_QMK, q_C, Dc_QP[q_C], lists_QP[q_C], sizes_QP[q_C],
                                          width, S, steps)
            out[0][q_C], out[1][q_C], out[2][q_C] = D_, I_, R_
            a = b
        if steps is None:
            return out
        return out + (self._lut_dists(lut_QMK, out[2], lists_QP, Dc_QP),)

    def _scan_chunk(self, lut_QMK, q_C, Dc_QP, lists_QP, sizes_QP, C, S, steps=None):
        """Approximate distances of every code in the probed lists, then exact top-S, for the
        queries ``q_C`` (their tables are ``lut_QMK[q_C]``; the other arrays are theirs alone).

        Candidates are laid out query by query (probe slots in order, each a run of consecutive
        shard rows) in a ``(Q, C)`` buffer padded with inf.
        """
        Q, P = lists_QP.shape
        sizes = sizes_QP.ravel()
        T = int(sizes.sum())
        slot_first = np.cumsum(sizes) - sizes  # position of each probe slot's first candidate
        row0 = np.where(lists_QP >= 0, self.list_offsets[np.maximum(lists_QP, 0)], 0).ravel()
        tot_Q = sizes_QP.sum(axis=1)
        q_first = np.cumsum(tot_Q) - tot_Q
        # Per-candidate arrays repeat per-slot or per-query values: one pass each, no gathers.
        pos_T = np.arange(T)
        rows_T = np.repeat(row0 - slot_first, sizes)
        rows_T += pos_T
        d_T = self._code_dists(lut_QMK, tot_Q, rows_T, steps, q_C)
        d_T += np.repeat(Dc_QP.ravel(), sizes)
        cell_T = np.repeat(np.arange(Q) * C - q_first, tot_Q)  # flat buffer cell of each candidate
        cell_T += pos_T
        buf_D = np.full(Q * C, np.inf, np.float32)
        buf_D[cell_T] = d_T
        buf_D = buf_D.reshape(Q, C)

        def rows_of(q_X, c_X):
            """Shard rows of buffer cells (query, column); -1 for padding."""
            g = q_first[q_X] + c_X
            slot = np.searchsorted(slot_first, g, side="right") - 1
            return np.where(c_X < tot_Q[q_X], row0[slot] + (g - slot_first[slot]), PAD_ID)

        def ids_of(rows):
            return np.where(rows >= 0, self.ids_N[np.maximum(rows, 0)], PAD_ID)

        if C <= S:
            cols_QX = np.broadcast_to(np.arange(C), (Q, C))
        else:
                # The S + 1 smallest (unsorted; sorting them costs more than the selection at large S):
            # more than S candidates are at most the S-th distance exactly when the (S + 1)-th, their
            # largest, equals the S-th, their second largest. The S are the others.
            vals, cols = torch.topk(torch.from_numpy(buf_D), S + 1, dim=1, largest=False,
                                    sorted=False)
            top2 = torch.topk(vals, 2, dim=1, largest=True)
            last_Q, kth_Q = top2.values[:, 0].numpy(), top2.values[:, 1].numpy()
            keep = np.arange(S + 1) != top2.indices[:, :1].numpy()
            cols_QX = cols.numpy()[keep].reshape(Q, S)
            # Candidates tied at the S-th distance: choose by id, exactly as topk_smallest.
            for q in np.flatnonzero(last_Q == kth_Q):
                cand = np.flatnonzero(buf_D[q] <= kth_Q[q])
                cand_ids = ids_of(rows_of(np.full(cand.size, q), cand))
                cols_QX[q] = cand[np.lexsort((cand_ids, buf_D[q, cand]))[:S]]
        rows_QX = rows_of(np.broadcast_to(np.arange(Q)[:, None], cols_QX.shape), cols_QX)
        D_QX = np.take_along_axis(buf_D, cols_QX, axis=1)
        return topk_smallest(D_QX, ids_of(rows_QX), S, payload_QC=rows_QX)

    # ------------------------------------------------------------------ the whole search
    def search(self, q_QD, params: SearchParams, timings: dict | None = None):
        """probe -> LUT shortlist -> re-rank (skipped without decode_fn) -> ``(D_QK, I_QK)``: the
        stages of :mod:`pipeline.search.pipeline`, which the query job's actors run too.

        ``timings`` (if given) accumulates seconds per stage under "probe", "lut", "rerank".
        With several threads each takes a part of the queries through the shortlist and the
        re-rank (torch on one thread in each): a decode of a few thousand rows uses two cores
        less well than two decodes of half as many, one per core. A stage's seconds are then
        those of its slowest thread.
        """
        params.validate()
        q_QD = check_queries(q_QD, self.D, self.metric)
        t = timings if timings is not None else {}
        t0 = time.perf_counter()
        lists_QP = probe_lists(self._probe(), self.centroids_LD, q_QD, params, self.metric)
        t["probe"] = t.get("probe", 0.0) + (time.perf_counter() - t0)
        Q = q_QD.shape[0]
        T = self._threads_for(Q)
        if (self.decode_fn is None and params.pairwise is None) or T <= 1:
            return self._search_part(q_QD, lists_QP, params, t, T)
        part_t: list[dict] = []

        def part(a: int, b: int):
            pt: dict = {}
            part_t.append(pt)
            return self._search_part(q_QD[a:b], lists_QP[a:b], params, pt, 1)

        D_QK, I_QK = _in_query_parts(part, Q, T)
        for stage in ("lut", "rerank"):
            t[stage] = t.get(stage, 0.0) + max(p.get(stage, 0.0) for p in part_t)
        return D_QK, I_QK

    def _search_part(self, q_QD, lists_QP, params: SearchParams, t: dict, threads: int):
        """Shortlist and re-rank of probed queries, the scan on ``threads`` threads."""
        t1 = time.perf_counter()
        merged = merge(params, [shortlist(self, q_QD, lists_QP, params, threads)])
        t2 = time.perf_counter()
        t["lut"] = t.get("lut", 0.0) + (t2 - t1)
        D_QK, I_QK = finish(self.decode_fn, q_QD, merged, params, self.pairwise_fn, self.metric)
        if self.decode_fn is not None or params.pairwise is not None:
            t["rerank"] = t.get("rerank", 0.0) + (time.perf_counter() - t2)
        return D_QK, I_QK


def build_searcher(model, list_ids_N, ids_N, codes_NM, list_offsets, *, scale_N=None, lut_scales: bool = True,
                   decode_fn=None, source: str = "<shard>", num_threads: int = 1):
    """``ShardSearcher`` over loaded shard rows of an index built with ``model`` (its centroids,
    additive codebooks and pairwise decoder), with the row scales of the lookup-table stage unless
    ``lut_scales`` is off.

    ``scale_N`` holds the rows' stored scales (``pipeline.index.shards.load_shard_rows``; NaN where a shard has none); the
    scales of rows without one are computed here from the model (``model_row_scales``)."""
    if not lut_scales:
        scale_N = None
    elif len(ids_N):
        scale_N = np.full(len(ids_N), np.nan, np.float16) if scale_N is None else np.array(scale_N, np.float16)
        if scale_N.shape != (len(ids_N),):
            raise ConfigError(f"{source}: row scales have shape {scale_N.shape}, expected ({len(ids_N)},)")
        todo = np.flatnonzero(np.isnan(scale_N))
        if todo.size:
            t = time.perf_counter()
            scale_N[todo] = model_row_scales(model, codes_NM[todo], list_ids_N[todo])
            log.info("%s: row scales of %d rows (shards without a lut_scale column) in %.1f s", source,
                     todo.size, time.perf_counter() - t)
    return ShardSearcher(list_ids_N, ids_N, codes_NM, list_offsets, model_centroids(model), model_codebooks(model),
                         decode_fn=decode_fn, source=source, num_threads=num_threads, scale_N=scale_N,
                         pairwise_fn=model_pairwise(model), metric=model.config.metric)


def _in_query_parts(fn, Q: int, T: int):
    """``fn(a, b)`` on ``T`` consecutive parts ``[a, b)`` of ``Q`` queries, one thread each, results
    (tuples of arrays with one row per query) concatenated. The threads fill the cores; torch's own
    threads inside each would oversubscribe them, so torch runs on one thread meanwhile (its thread
    count is process-wide: it is restored after)."""
    bounds = np.linspace(0, Q, T + 1).astype(int)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(T) as ex:
            parts = list(ex.map(fn, bounds[:-1], bounds[1:]))
    finally:
        torch.set_num_threads(torch_threads)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0])))
