"""Batched QINCo encoding: beam search over the M steps with candidate pre-selection.

At each step every beam entry proposes candidates: all K codewords for a plain step, or for a
network step the ``A`` codewords of the cheap pre-selector codebook nearest to the residual
(``A = 0`` or ``A >= K``: all K, in code order). Candidates go through the step network, the
``B`` best partial reconstructions over all beam entries are kept, and the best final one
gives the codes (``B = 1``: greedy). The per-codeword part of the first layer is computed once
per step (:meth:`QincoStep.codeword_table`), not per vector.

Public API:

- ``beam_search(model, xn_ND, xhat0_ND, B, A, tables=None) -> (codes_NM int64, xhat_ND)``
  (tensors, normalised space; used by training and by :func:`encode`)
- ``assign_lists(model, x_ND) -> np.ndarray int64`` (nearest IVF centroid, Faiss)
- ``encode(model, x_ND, list_ids_N=None, batch_size=None, device="cpu", B=None, A=None,
  progress=False, source="<input>") -> (codes_NM uint8|uint16, list_ids_N int64 | None)``
- ``codes_dtype(K)``, ``auto_batch_size(model, B, A)``
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import ConfigError
from pipeline.qinco_model import QINCo, validate_vectors

log = logging.getLogger(__name__)

# Bytes allowed for the per-chunk candidate tensors (network activations over B x A x width).
CANDIDATE_BUDGET_BYTES = 256 << 20


def codes_dtype(K: int) -> np.dtype:
    """Smallest unsigned dtype holding codes of ``K`` values (uint8 up to 256, uint16 up to 65,536)."""
    if K <= 256:
        return np.dtype(np.uint8)
    if K <= 65536:
        return np.dtype(np.uint16)
    raise ConfigError(f"K={K} is larger than 65,536")


def _sq_dists(r_xD: Tensor, c_KD: Tensor) -> Tensor:
    """Squared L2 distances between rows of ``r`` (any leading shape) and codewords ``c``,
    always in float32 (the expanded form loses too much precision in half precision)."""
    with torch.autocast(r_xD.device.type, enabled=False):
        r, c = r_xD.float(), c_KD.float()
        return (r ** 2).sum(-1, keepdim=True) - 2 * r @ c.T + (c ** 2).sum(-1)


def _gather_rows(t_NF_: Tensor, idx_NG: Tensor) -> Tensor:
    """``t[n, idx[n, g]]`` for a tensor with leading dims (N, F, ...)."""
    n = torch.arange(t_NF_.shape[0], device=t_NF_.device)[:, None]
    return t_NF_[n, idx_NG]


def beam_search(model: QINCo, xn_ND: Tensor, xhat0_ND: Tensor, B: int, A: int,
                tables: list[Tensor | None] | None = None) -> tuple[Tensor, Tensor]:
    """Codes (``(N, M)`` int64) and reconstruction (normalised) of normalised vectors ``xn``.

    ``xhat0`` is the starting reconstruction (zeros, or the list centroid with IVF). ``tables``
    optionally holds precomputed :meth:`QincoStep.codeword_table` results per step.
    """
    N, D = xn_ND.shape
    K = model.config.K
    B = max(1, int(B))
    xhat_NFD = xhat0_ND[:, None, :]
    codes_NFm = torch.zeros(N, 1, 0, dtype=torch.long, device=xn_ND.device)
    for m, step in enumerate(model.steps):
        F = xhat_NFD.shape[1]
        r_NFD = xn_ND[:, None, :] - xhat_NFD
        c_KD = step.codebook_KD
        if step.plain:
            dist_NFA = _sq_dists(r_NFD, c_KD)
            idx_NFA = None
            Ae = K
        else:
            if step.has_presel and 0 < A < K:
                pd_NFK = _sq_dists(r_NFD, step.presel_KD)
                idx_NFA = pd_NFK.topk(A, dim=-1, largest=False).indices.sort(dim=-1).values
                Ae = A
            else:
                idx_NFA = None
                Ae = K
            table_KE = tables[m] if tables is not None and tables[m] is not None else step.codeword_table()
            ctx_NFE = step.context(xhat_NFD)
            if idx_NFA is None:
                z = table_KE[None, None] + ctx_NFE[:, :, None, :]
                cw_NFAD = step.finish(z, c_KD[None, None].expand(N, F, K, D))
            else:
                z = table_KE[idx_NFA] + ctx_NFE[:, :, None, :]
                cw_NFAD = step.finish(z, c_KD[idx_NFA])
            dist_NFA = ((r_NFD[:, :, None, :] - cw_NFAD.float()) ** 2).sum(-1)
        Fout = min(B, F * Ae)
        sel_NG = dist_NFA.reshape(N, F * Ae).topk(Fout, dim=-1, largest=False).indices
        parent_NG = torch.div(sel_NG, Ae, rounding_mode="floor")
        j_NG = sel_NG - parent_NG * Ae
        if idx_NFA is None:
            code_NG = j_NG
        else:
            code_NG = idx_NFA.reshape(N, F * Ae).gather(1, sel_NG)
        if step.plain:
            new_NGD = c_KD[code_NG]
        else:
            new_NGD = cw_NFAD.reshape(N, F * Ae, D)[torch.arange(N, device=sel_NG.device)[:, None], sel_NG]
        xhat_NFD = _gather_rows(xhat_NFD, parent_NG) + new_NGD.float()
        codes_NFm = torch.cat([_gather_rows(codes_NFm, parent_NG), code_NG[:, :, None]], dim=2)
    # topk returns sorted candidates: entry 0 of the last step is the best final one
    return codes_NFm[:, 0, :], xhat_NFD[:, 0, :]


def assign_lists(model: QINCo, x_ND: np.ndarray | Tensor) -> np.ndarray:
    """Nearest IVF centroid (exact L2, Faiss) of each raw vector, as int64 ``(N,)``."""
    import faiss

    if not model.ivf:
        raise ConfigError("assign_lists needs an IVF model (nlist > 0)")
    cent = model.centroids_LD.detach().cpu().numpy().astype(np.float32)
    if cent.shape[0] != model.config.nlist:
        raise ConfigError("IVF model has no centroids")
    x = x_ND.detach().cpu().numpy() if isinstance(x_ND, Tensor) else np.asarray(x_ND)
    index = faiss.IndexFlatL2(cent.shape[1])
    index.add(cent)
    out = np.empty(len(x), dtype=np.int64)
    step = 65536
    for i in range(0, len(x), step):
        _, I = index.search(np.ascontiguousarray(x[i:i + step], dtype=np.float32), 1)
        out[i:i + step] = I[:, 0]
    return out


def auto_batch_size(model: QINCo, B: int, A: int) -> int:
    """Vectors per chunk so the candidate activations stay under ``CANDIDATE_BUDGET_BYTES``."""
    c = model.config
    width = max(c.dim, c.de if c.variant == "qinco2" else c.dim, c.dh if c.variant == "qinco2" else c.h)
    per_cand = 4 * (3 * width + 2 * c.dim)
    cands = max(B, 1) * max(c.effective_A if A is None else (A if 0 < A < c.K else c.K), 1)
    cands = max(cands, c.K)  # plain step / pre-selection distances
    return int(max(16, min(65536, CANDIDATE_BUDGET_BYTES // (per_cand * cands))))


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _to_tensor(x: np.ndarray | Tensor, device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)


def encode(model: QINCo, x_ND: np.ndarray | Tensor, list_ids_N: np.ndarray | None = None,
           batch_size: int | None = None, device: str | torch.device = "cpu",
           B: int | None = None, A: int | None = None, progress: bool = False,
           source: str = "<input>") -> tuple[np.ndarray, np.ndarray | None]:
    """Encode raw vectors; returns ``(codes_NM, list_ids_N)``.

    ``codes_NM`` is uint8 for K <= 256 else uint16; ``list_ids_N`` (int64) is the IVF list of
    each vector (computed when not given) or ``None`` without IVF. ``B``/``A`` default to the
    model's config. Invalid input raises ``VectorFormatError`` naming ``source`` and the row.
    """
    cfg = model.config
    validate_vectors(x_ND, cfg.dim, source)
    B = cfg.B if B is None else int(B)
    A = cfg.A if A is None else int(A)
    N = x_ND.shape[0]
    if model.ivf:
        if list_ids_N is None:
            list_ids_N = assign_lists(model, x_ND)
        list_ids_N = np.asarray(list_ids_N, dtype=np.int64)
        if list_ids_N.shape != (N,):
            raise ConfigError(f"list ids have shape {list_ids_N.shape}, expected ({N},)")
        if N and (list_ids_N.min() < 0 or list_ids_N.max() >= cfg.nlist):
            raise ConfigError(f"list ids must be in [0, {cfg.nlist})")
    else:
        list_ids_N = None
    dev = torch.device(device)
    model = model.to(dev).eval()
    bs = batch_size or auto_batch_size(model, B, A)
    out = np.empty((N, cfg.M), dtype=codes_dtype(cfg.K))
    t0 = last = time.time()
    with torch.inference_mode(), _autocast(dev):
        tables = [None if s.plain else s.codeword_table() for s in model.steps]
        for i in range(0, N, bs):
            xb = _to_tensor(x_ND[i:i + bs], dev)
            lb = None if list_ids_N is None else torch.from_numpy(list_ids_N[i:i + bs]).to(dev)
            xn = model.normalise(xb)
            xhat0 = model.initial_xhat(xb.shape[0], lb)
            codes, _ = beam_search(model, xn, xhat0, B=B, A=A, tables=tables)
            out[i:i + bs] = codes.cpu().numpy().astype(out.dtype)
            now = time.time()
            if progress and (now - last > 5 or i + bs >= N):
                done = min(i + bs, N)
                log.info("encoded %d/%d vectors (%.0f vec/s)", done, N, done / max(now - t0, 1e-9))
                last = now
    return out, list_ids_N
