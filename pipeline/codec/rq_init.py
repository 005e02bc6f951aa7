"""Codebook initialisation from residual quantization: greedy per-step k-means on residuals, or
Faiss's ``ResidualQuantizer`` trained with beam search (better codebooks, a few times slower).

Public API:

- ``rq_codebooks(xn_ND, M, K, xhat0_ND=None, niter=10, seed=0, beam=0) -> np.ndarray (M, K, D)``:
  with ``beam=0`` step ``m`` is k-means (Faiss) on the residuals left by steps ``< m``
  (starting from ``xhat0``, e.g. the IVF centroid); with ``beam > 0`` (and K a power of two)
  the codebooks of a Faiss ``ResidualQuantizer`` trained on the same residuals with that beam
  (the Faiss RQ baseline uses 5).
- ``init_from_rq(model, x_ND, list_ids_N=None, max_points=65536, niter=10, seed=0, beam=0)``: learns
  the RQ codebooks on normalised training vectors and copies them (plus small Gaussian noise,
  ``config.init_noise`` times the codebook's std) into every step codebook and pre-selector.
  Because step networks start as the identity on the codeword, the fresh model then decodes
  like this RQ.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
import torch

from pipeline.codec.model import QINCo

log = logging.getLogger(__name__)


def rq_codebooks(xn_ND: np.ndarray, M: int, K: int, xhat0_ND: np.ndarray | None = None,
                 niter: int = 10, seed: int = 0, beam: int = 0) -> np.ndarray:
    """Residual-quantization codebooks ``(M, K, D)`` (see module docstring)."""
    x = np.ascontiguousarray(xn_ND, dtype=np.float32)
    N, D = x.shape
    r = x - (0 if xhat0_ND is None else np.asarray(xhat0_ND, dtype=np.float32))
    r = np.ascontiguousarray(r, dtype=np.float32)
    if beam > 0 and N >= K and K & (K - 1) == 0:
        return _faiss_rq_codebooks(r, M, K, niter, seed, beam)
    out = np.empty((M, K, D), dtype=np.float32)
    for m in range(M):
        if N >= K:
            km = faiss.Kmeans(D, K, niter=niter, seed=seed + m, verbose=False,
                              max_points_per_centroid=max(1, N // K + 1))
            km.train(r)
            cb = km.centroids.astype(np.float32)
        else:  # too few points: sample with replacement, slightly perturbed
            rng = np.random.default_rng(seed + m)
            cb = r[rng.integers(0, N, K)] + rng.normal(0, 1e-3, (K, D)).astype(np.float32)
        index = faiss.IndexFlatL2(D)
        index.add(cb)
        _, I = index.search(r, 1)
        r = np.ascontiguousarray(r - cb[I[:, 0]])
        out[m] = cb
        log.debug("RQ step %d/%d: residual MSE %.4g", m + 1, M, float((r ** 2).sum(1).mean()))
    return out


def _faiss_rq_codebooks(r_ND: np.ndarray, M: int, K: int, niter: int, seed: int, beam: int) -> np.ndarray:
    D = r_ND.shape[1]
    rq = faiss.ResidualQuantizer(D, M, int(K).bit_length() - 1)
    rq.max_beam_size = int(beam)
    rq.cp.niter = int(niter)
    rq.cp.seed = int(seed)
    # Each step's k-means runs on the residuals of every beam entry (N x beam points): use them all
    # (a cap of N / K per centroid would train on 1 / beam of them, and worse codebooks).
    rq.cp.max_points_per_centroid = max(256, -(-len(r_ND) * max(1, int(beam)) // K) + 1)
    rq.cp.verbose = False
    rq.train(r_ND)
    cbs = faiss.vector_to_array(rq.codebooks).reshape(M, K, D).astype(np.float32)
    log.debug("Faiss RQ (beam %d) codebooks trained on %d residuals", beam, len(r_ND))
    return cbs


@torch.no_grad()
def init_from_rq(model: QINCo, x_ND: np.ndarray, list_ids_N: np.ndarray | None = None,
                 max_points: int = 65536, niter: int = 10, seed: int = 0, beam: int = 0) -> np.ndarray:
    """Initialise ``model``'s codebooks and pre-selectors from RQ; returns the RQ codebooks
    (normalised space). Normalisation (and centroids with IVF) must already be set."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    x = np.asarray(x_ND, dtype=np.float32)
    sel = np.sort(rng.choice(len(x), max_points, replace=False)) if len(x) > max_points else np.arange(len(x))
    xs = torch.from_numpy(x[sel]).to(model.device)
    xn = model.normalise(xs)
    lids = None
    if model.ivf:
        lids = (torch.from_numpy(np.asarray(list_ids_N)[sel]).to(model.device)
                if list_ids_N is not None else model.assign_lists_tensor(xs))
    xhat0 = model.initial_xhat(len(sel), lids)
    cbs = rq_codebooks(xn.cpu().numpy(), cfg.M, cfg.K, xhat0.cpu().numpy(), niter=niter, seed=seed,
                       beam=beam)
    gen = torch.Generator().manual_seed(seed)
    for m, step in enumerate(model.steps):
        cb = torch.from_numpy(cbs[m])
        std = float(cb.std())
        noisy = cb + torch.randn(cb.shape, generator=gen) * std * cfg.init_noise
        step.codebook_KD.copy_(noisy.to(step.codebook_KD))
        if step.has_presel:
            noisy = cb + torch.randn(cb.shape, generator=gen) * std * cfg.init_noise
            step.presel_KD.copy_(noisy.to(step.presel_KD))
    return cbs
