"""The pairwise additive decoder: the additive decoder plus codebooks over pairs of code positions.

QINCo's step networks make a codeword depend on the codes before it, which one codebook per
position cannot express. The pairwise decoder adds, for ``P`` chosen pairs of positions
``(i_p, j_p)``, a table indexed by both codes::

    x ≈ c_l + Σ_m A_m[code_m] + Σ_p B_p[code_{i_p} K + code_{j_p}]

``A`` are the least-squares additive codebooks (:mod:`pipeline.codec.additive`, the lookup-table
stage's); the ``B_p`` (``K²`` rows each) are fitted here to the residual ``target - c_l - Σ A``,
greedily. At each round every pair not yet chosen gets its table (the residual's mean per code
pair, shrunk towards zero for rare pairs: ``sum / (count + λ)``), and the pair whose table lowers
the residual most on held-out rows is kept and its table subtracted. Rounds stop at ``max_pairs``,
at the byte budget of the tables, or when no pair lowers the held-out residual by ``min_gain``
of its energy. The held-out rows also choose ``λ`` for each pair; the kept table is then
refitted on all rows. A pair's gain is re-measured only while it could still be the best one
(its gain at an earlier round bounds it in practice: the residual only shrinks).

The target is the QINCo reconstruction ``x̂`` of each row's codes (what the re-rank after this
stage computes), which the codes determine without the quantisation noise of ``x``; tables
fitted to it need fewer rows. The tables are stored as float16 (``K² x D`` each).

Public API:

- ``fit_pairwise(codes_NM, target_ND, K, additive_MKD, list_ids_N=None, centroids_LD=None, ...)
  -> (pairs_P2 int64, tables_PQD float16)`` with ``Q = K²``;
- ``decode_pairwise(additive_MKD, pairs_P2, tables_PQD, codes_NM, list_ids_N=None,
  centroids_LD=None) -> (N, D) float32``; ``PairwiseDecoder`` holds the arrays for repeated calls
  (the search's pairwise stage: a row decodes to the same bits in any batch).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.codec.additive import decode_additive
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

# Shrinkage of a pair table's cells, in rows: a cell seen c times keeps c / (c + λ) of its mean.
SHRINK_GRID = (1.0, 4.0, 16.0, 64.0)
# Share of the fitting rows held out to choose the pairs and λ.
HOLDOUT_FRACTION = 0.2
# Default budget of all pair tables together (float16).
MAX_TABLE_BYTES = 128 << 20


def table_bytes(K: int, D: int) -> int:
    """Bytes of one pair table: ``K²`` float16 rows of ``D``."""
    return K * K * D * 2


def _cells(codes_NM: torch.Tensor, i: int, j: int, K: int) -> torch.Tensor:
    return codes_NM[:, i] * K + codes_NM[:, j]


def _sums(cells_N: torch.Tensor, r_ND: torch.Tensor, Q: int) -> tuple[torch.Tensor, torch.Tensor]:
    sums = torch.zeros(Q, r_ND.shape[1], dtype=r_ND.dtype).index_add_(0, cells_N, r_ND)
    return sums, torch.bincount(cells_N, minlength=Q).to(r_ND.dtype)


def _best_shrink(cells_f, r_f, cells_v, r_v, Q: int) -> tuple[float, float]:
    """``(held-out gain, λ)`` of the best-shrunk table fitted on the fitting rows: the gain is
    ``Σ ||r||² - ||r - B[cell]||²`` over the held-out rows, from their per-cell sums."""
    s_f, c_f = _sums(cells_f, r_f, Q)
    s_v, c_v = _sums(cells_v, r_v, Q)
    # with B = s_f / (c_f + λ): gain = Σ_cells 2 <s_v, B> - c_v ||B||²
    sv_sf = (s_v * s_f).sum(1, dtype=torch.float64)
    sf_sf = (s_f * s_f).sum(1, dtype=torch.float64)
    c_f, c_v = c_f.double(), c_v.double()
    best = (-np.inf, SHRINK_GRID[0])
    for lam in SHRINK_GRID:
        inv = 1.0 / (c_f + lam)
        gain = float((2.0 * sv_sf * inv - c_v * sf_sf * inv * inv).sum())
        if gain > best[0]:
            best = (gain, lam)
    return best


def fit_pairwise(codes_NM: np.ndarray, target_ND: np.ndarray, K: int, additive_MKD: np.ndarray,
                 list_ids_N: np.ndarray | None = None, centroids_LD: np.ndarray | None = None,
                 max_pairs: int | None = None, max_bytes: int = MAX_TABLE_BYTES,
                 min_gain: float = 1e-3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(P, 2)`` and their float16 tables ``(P, K², D)`` (see the module docstring);
    ``max_pairs`` defaults to ``M``, and the tables stay within ``max_bytes``. ``P`` is 0 when no
    pair helps on held-out rows."""
    codes = np.asarray(codes_NM)
    if codes.ndim != 2:
        raise ConfigError(f"codes must be 2-d, got shape {codes.shape}")
    N, M = codes.shape
    target = np.asarray(target_ND, dtype=np.float32)
    if target.ndim != 2 or target.shape[0] != N:
        raise ConfigError(f"{N} codes but target rows of shape {target.shape}")
    D, Q = target.shape[1], K * K
    limit = min(M * (M - 1) // 2, M if max_pairs is None else int(max_pairs), int(max_bytes) // table_bytes(K, D))
    empty = (np.zeros((0, 2), np.int64), np.zeros((0, Q, D), np.float16))
    if limit < 1 or N < 10:
        return empty
    r_ND = torch.from_numpy(target - decode_additive(additive_MKD, codes, list_ids_N, centroids_LD))
    codes_t = torch.from_numpy(codes.astype(np.int64))
    held = torch.from_numpy(np.random.default_rng(seed).random(N) < HOLDOUT_FRACTION)
    fit_rows, val_rows = torch.nonzero(~held).ravel(), torch.nonzero(held).ravel()
    # stale gains: every pair's gain when last measured (an upper bound, in practice)
    stale = {(i, j): np.inf for i in range(M) for j in range(i + 1, M)}
    pairs: list[tuple[int, int]] = []
    tables: list[np.ndarray] = []
    while len(pairs) < limit and stale:
        r_f, r_v = r_ND[fit_rows], r_ND[val_rows]
        energy = float((r_v.double() ** 2).sum())
        fresh: dict[tuple[int, int], tuple[float, float]] = {}
        for pair in sorted(stale, key=lambda p: -stale[p]):
            if fresh and max(g for g, _ in fresh.values()) >= stale[pair]:
                break
            cells = _cells(codes_t, *pair, K)
            fresh[pair] = _best_shrink(cells[fit_rows], r_f, cells[val_rows], r_v, Q)
            stale[pair] = fresh[pair][0]
        (i, j), (gain, lam) = max(fresh.items(), key=lambda kv: kv[1][0])
        if gain <= min_gain * energy:
            break
        cells = _cells(codes_t, i, j, K)
        s, c = _sums(cells, r_ND, Q)
        table = s / (c + lam)[:, None]
        r_ND -= table[cells]
        del stale[(i, j)]
        pairs.append((i, j))
        tables.append(table.to(torch.float16).numpy())
        log.info("pairwise decoder: pair %d = codes (%d, %d), shrinkage %g rows, held-out residual -%.2f%%",
                 len(pairs), i, j, lam, 100.0 * gain / max(energy, 1e-30))
    if not pairs:
        return empty
    return np.array(pairs, np.int64), np.stack(tables)


def decode_pairwise(additive_MKD: np.ndarray, pairs_P2: np.ndarray, tables_PQD: np.ndarray,
                    codes_NM: np.ndarray, list_ids_N: np.ndarray | None = None,
                    centroids_LD: np.ndarray | None = None) -> np.ndarray:
    """``c_l + Σ_m A_m[code_m] + Σ_p B_p[cell_p]`` as float32 ``(N, D)``, summed in that order
    row by row (the same bits in any batch)."""
    codes = np.asarray(codes_NM).astype(np.int64)
    K = np.asarray(additive_MKD).shape[1]
    out = decode_additive(additive_MKD, codes, list_ids_N, centroids_LD)
    for (i, j), table in zip(np.asarray(pairs_P2), tables_PQD):
        out += table[codes[:, i] * K + codes[:, j]]
    return out


class PairwiseDecoder:
    """``decode_pairwise`` with fixed arrays, called as ``decoder(codes_NM, list_ids_N)``."""

    def __init__(self, additive_MKD: np.ndarray, pairs_P2: np.ndarray, tables_PQD: np.ndarray,
                 centroids_LD: np.ndarray | None = None):
        self.additive_MKD = np.ascontiguousarray(additive_MKD, dtype=np.float32)
        self.pairs_P2 = np.asarray(pairs_P2, dtype=np.int64).reshape(-1, 2)
        self.tables_PQD = np.asarray(tables_PQD)
        M, K, D = self.additive_MKD.shape
        if self.tables_PQD.shape != (len(self.pairs_P2), K * K, D):
            raise ConfigError(f"pair tables have shape {self.tables_PQD.shape}, expected "
                              f"{(len(self.pairs_P2), K * K, D)}")
        if len(self.pairs_P2) and not ((self.pairs_P2 >= 0) & (self.pairs_P2 < M)).all():
            raise ConfigError(f"pair positions must lie in [0, {M}), got {self.pairs_P2.tolist()}")
        self.centroids_LD = None if centroids_LD is None or not len(centroids_LD) else \
            np.ascontiguousarray(centroids_LD, dtype=np.float32)

    @property
    def pairs(self) -> int:
        return len(self.pairs_P2)

    def __call__(self, codes_NM: np.ndarray, list_ids_N: np.ndarray | None = None) -> np.ndarray:
        return decode_pairwise(self.additive_MKD, self.pairs_P2, self.tables_PQD, codes_NM,
                               list_ids_N if self.centroids_LD is not None else None, self.centroids_LD)
