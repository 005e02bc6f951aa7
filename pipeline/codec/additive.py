"""Least-squares additive codebooks fitted to QINCo codes (the fast AQ decoder for shortlists).

Given codes ``(N, M)`` and vectors, find ``C`` (``(M, K, D)``) minimising
``Σ_n ||x_n - centroid[list_n] - Σ_m C_m[codes_nm]||²`` (+ ``λ ||C||²``). With the one-hot code
matrix ``Φ`` (``N x MK``) this is ``(ΦᵀΦ + λI) C = Φᵀ r``; ``ΦᵀΦ`` is the (MK x MK) code
co-occurrence count matrix and ``Φᵀ r`` sums residuals per code, both accumulated block by
block so data can be streamed (:class:`AdditiveFitter`). ``λ = ridge * mean(diag ΦᵀΦ)``, which
also sets codes never seen to zero.

Public API:

- ``AdditiveFitter(M, K, D)``: ``.add(codes_NM, x_ND, list_ids_N=None, centroids_LD=None)``,
  ``.merge(other)``, ``.solve(ridge=1e-6) -> codebooks_MKD float32``
- ``fit_additive_decoder(codes_NM, x_ND, K, list_ids_N=None, centroids_LD=None, ridge=1e-6,
  block_rows=65536) -> codebooks_MKD float32``
- ``decode_additive(codebooks_MKD, codes_NM, list_ids_N=None, centroids_LD=None) -> (N, D) float32``
- ``row_scales(codes_NM, list_ids_N, centroids_LD, codebooks_MKD, decode_fn) -> (N,) float16``:
  per-row scale ``a_n`` of the additive residual that best matches the exact decoder.
- ``least_squares_scale(r, t)``: that scale for given residuals and targets (NumPy or torch; the
  encoder's lookup-table-aware choice uses it too).

For a QINCo model's codes see :func:`pipeline.codec.decoder.model_row_scales` (what the encode
job stores in each shard's ``lut_scale`` column and a search computes for shards without one).

Row scales: the additive decoder shares one set of codebooks across all rows, but QINCo's steps
shrink or stretch their codewords with the context. Scaling each row's additive residual,
``x ≈ c_l + a_n Σ_m C_m[code_nm]`` with ``a_n = <x̂_n - c_l, r_n> / ||r_n||²`` (the least-squares
fit along ``r_n`` to the exact reconstruction ``x̂_n``), removes that part of the error; a
lookup-table scan pays one multiply per code for it.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import ConfigError

# Bound on a row scale (far beyond any seen in practice: they lie around 1).
MAX_ROW_SCALE = 16.0


def _residual(x_ND: np.ndarray, list_ids_N, centroids_LD) -> np.ndarray:
    x = np.asarray(x_ND, dtype=np.float64)
    if centroids_LD is None:
        return x
    if list_ids_N is None:
        raise ConfigError("list ids are needed together with centroids")
    return x - np.asarray(centroids_LD, dtype=np.float64)[np.asarray(list_ids_N, dtype=np.int64)]


class AdditiveFitter:
    """Streaming accumulator of the normal equations (see module docstring)."""

    def __init__(self, M: int, K: int, D: int):
        self.M, self.K, self.D = int(M), int(K), int(D)
        MK = self.M * self.K
        self.gram = torch.zeros(MK * MK, dtype=torch.float64)
        self.rhs = torch.zeros(MK, self.D, dtype=torch.float64)
        self.count = 0

    def _flat(self, codes_NM: np.ndarray) -> torch.Tensor:
        codes = np.asarray(codes_NM)
        if codes.ndim != 2 or codes.shape[1] != self.M:
            raise ConfigError(f"codes have shape {codes.shape}, expected (N, {self.M})")
        if codes.size and int(codes.max()) >= self.K:
            raise ConfigError(f"code value {int(codes.max())} out of range for K={self.K}")
        offs = np.arange(self.M, dtype=np.int64) * self.K
        return torch.from_numpy(codes.astype(np.int64) + offs)

    def add(self, codes_NM: np.ndarray, x_ND: np.ndarray, list_ids_N: np.ndarray | None = None,
            centroids_LD: np.ndarray | None = None) -> None:
        """Accumulate one block of codes and their raw vectors."""
        flat = self._flat(codes_NM)
        r = _residual(x_ND, list_ids_N, centroids_LD)
        if r.shape != (flat.shape[0], self.D):
            raise ConfigError(f"vectors have shape {r.shape}, expected ({flat.shape[0]}, {self.D})")
        MK = self.M * self.K
        pairs = (flat[:, :, None] * MK + flat[:, None, :]).reshape(-1)
        self.gram += torch.bincount(pairs, minlength=MK * MK).to(torch.float64)
        rt = torch.from_numpy(r)
        for m in range(self.M):
            self.rhs.index_add_(0, flat[:, m], rt)
        self.count += flat.shape[0]

    def merge(self, other: "AdditiveFitter") -> None:
        """Add another accumulator's sums (e.g. from another worker)."""
        if (other.M, other.K, other.D) != (self.M, self.K, self.D):
            raise ConfigError("cannot merge additive fitters of different shapes")
        self.gram += other.gram
        self.rhs += other.rhs
        self.count += other.count

    def solve(self, ridge: float = 1e-6) -> np.ndarray:
        """Codebooks ``(M, K, D)`` float32 solving the ridge-regularised normal equations."""
        if self.count == 0:
            raise ConfigError("no data was added to the additive decoder fit")
        MK = self.M * self.K
        G = self.gram.reshape(MK, MK).clone()
        lam = float(ridge) * max(float(G.diagonal().mean()), 1.0)
        G.diagonal().add_(lam)
        C = torch.linalg.solve(G, self.rhs)
        return C.reshape(self.M, self.K, self.D).to(torch.float32).numpy()


def fit_additive_decoder(codes_NM: np.ndarray, x_ND: np.ndarray, K: int,
                         list_ids_N: np.ndarray | None = None, centroids_LD: np.ndarray | None = None,
                         ridge: float = 1e-6, block_rows: int = 65536) -> np.ndarray:
    """Least-squares additive codebooks ``(M, K, D)`` for ``codes_NM`` (see module docstring)."""
    codes = np.asarray(codes_NM)
    if codes.ndim != 2:
        raise ConfigError(f"codes must be 2-d, got shape {codes.shape}")
    fitter = AdditiveFitter(codes.shape[1], K, np.asarray(x_ND).shape[1])
    for i in range(0, len(codes), block_rows):
        lids = None if list_ids_N is None else np.asarray(list_ids_N)[i:i + block_rows]
        fitter.add(codes[i:i + block_rows], np.asarray(x_ND)[i:i + block_rows], lids, centroids_LD)
    return fitter.solve(ridge)


def decode_additive(codebooks_MKD: np.ndarray, codes_NM: np.ndarray, list_ids_N: np.ndarray | None = None,
                    centroids_LD: np.ndarray | None = None) -> np.ndarray:
    """``centroid[list] + Σ_m C_m[codes_m]`` as float32 ``(N, D)``."""
    cb = np.asarray(codebooks_MKD, dtype=np.float32)
    codes = np.asarray(codes_NM).astype(np.int64)
    M = cb.shape[0]
    if codes.ndim != 2 or codes.shape[1] != M:
        raise ConfigError(f"codes have shape {codes.shape}, codebooks expect (N, {M})")
    out = cb[0][codes[:, 0]].copy()
    for m in range(1, M):
        out += cb[m][codes[:, m]]
    if centroids_LD is not None:
        if list_ids_N is None:
            raise ConfigError("list ids are needed together with centroids")
        out += np.asarray(centroids_LD, dtype=np.float32)[np.asarray(list_ids_N, dtype=np.int64)]
    return out


def least_squares_scale(r, t):
    """``<r, t> / ||r||²`` over the last axis, 1 where ``r`` is (nearly) zero, clipped to
    ``±MAX_ROW_SCALE``: the row scale of residual ``r`` towards target ``t``. NumPy arrays or torch
    tensors (the same arithmetic in each)."""
    xp = np if isinstance(r, np.ndarray) else torch
    rr = (r * r).sum(-1)
    ok = rr > 1e-12 * (t * t).sum(-1).clip(min=1e-30)
    return xp.where(ok, (r * t).sum(-1) / xp.where(ok, rr, 1.0), 1.0).clip(-MAX_ROW_SCALE, MAX_ROW_SCALE)


def row_scales(codes_NM: np.ndarray, list_ids_N: np.ndarray | None, centroids_LD: np.ndarray | None,
               codebooks_MKD: np.ndarray, decode_fn, batch_rows: int = 65536) -> np.ndarray:
    """Least-squares scale of each row's additive residual towards ``decode_fn``'s reconstruction.

    ``decode_fn(codes_NM, list_ids_N) -> x̂_ND`` is the exact decoder. Returns float16 ``(N,)``:
    ``a_n = <x̂_n - c_l, r_n> / ||r_n||²`` with ``r_n = Σ_m C_m[code_nm]``, computed in float64
    row by row (1 where ``r_n`` is zero), clipped to ``±MAX_ROW_SCALE`` and rounded to float16
    (2 bytes per row).
    """
    codes = np.asarray(codes_NM)
    N = codes.shape[0]
    out = np.empty(N, np.float16)
    for a in range(0, N, batch_rows):
        c = codes[a:a + batch_rows]
        lids = None if list_ids_N is None else np.asarray(list_ids_N)[a:a + batch_rows]
        xhat = np.asarray(decode_fn(c, lids), dtype=np.float64)
        if xhat.shape != (len(c), codebooks_MKD.shape[2]):
            raise ConfigError(f"decode_fn returned shape {xhat.shape}, expected {(len(c), codebooks_MKD.shape[2])}")
        r = decode_additive(codebooks_MKD, c).astype(np.float64)
        scale = least_squares_scale(r, _residual(xhat, lids, centroids_LD))
        if not np.isfinite(scale).all():
            raise ConfigError(f"row scale is not finite at row {a + int(np.flatnonzero(~np.isfinite(scale))[0])}")
        out[a:a + batch_rows] = scale
    return out
