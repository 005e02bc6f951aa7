"""Codebook initialisation from residual quantization (greedy per-step k-means on residuals).

Public API:

- ``rq_codebooks(xn_ND, M, K, xhat0_ND=None, niter=10, seed=0) -> np.ndarray (M, K, D)``:
  step ``m`` is k-means (Faiss) on the residuals left by steps ``< m`` (starting from
  ``xhat0``, e.g. the IVF centroid).
- ``init_from_rq(model, x_ND, list_ids_N=None, max_points=65536, niter=10, seed=0)``: learns
  the RQ codebooks on normalised training vectors and copies them (plus small Gaussian noise,
  ``config.init_noise`` times the codebook's std) into every step codebook and pre-selector.
  Because step networks start as the identity on the codeword, the fresh model then decodes
  like this RQ.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.qinco_model import QINCo

log = logging.getLogger(__name__)


def rq_codebooks(xn_ND: np.ndarray, M: int, K: int, xhat0_ND: np.ndarray | None = None,
                 niter: int = 10, seed: int = 0) -> np.ndarray:
    """Greedy residual-quantization codebooks ``(M, K, D)`` (see module docstring)."""
    import faiss

    x = np.ascontiguousarray(xn_ND, dtype=np.float32)
    N, D = x.shape
    r = x - (0 if xhat0_ND is None else np.asarray(xhat0_ND, dtype=np.float32))
    r = np.ascontiguousarray(r, dtype=np.float32)
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


@torch.no_grad()
def init_from_rq(model: QINCo, x_ND: np.ndarray, list_ids_N: np.ndarray | None = None,
                 max_points: int = 65536, niter: int = 10, seed: int = 0) -> np.ndarray:
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
    cbs = rq_codebooks(xn.cpu().numpy(), cfg.M, cfg.K, xhat0.cpu().numpy(), niter=niter, seed=seed)
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
