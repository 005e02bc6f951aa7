"""Batched QINCo encoding of raw vectors: IVF list assignment, then beam search.

- ``encode(model, x_ND, list_ids_N=None, batch_size=None, device="cpu", B=None, A=None,
  progress=False, source="<input>", lut_weight=0.0, precision=None)
  -> (codes_NM uint8|uint16, list_ids_N int64 | None)``
- ``assign_lists(model, x_ND) -> np.ndarray int64`` (nearest IVF centroid; through an HNSW graph
  from ``ivf.HNSW_ASSIGN_MIN_NLIST`` lists on)
- ``reconstruct(model, x_ND, list_ids_N=None, **encode_kw)``: encode then decode.

The search itself is :func:`pipeline.codec.beam_search.beam_search`; a vector's codes do not
depend on the rest of its batch, but unlike decoding they are not promised bit-equal across batch
sizes or CPUs (the beam search's products are ordinary GEMMs).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import Tensor

from pipeline.codec.beam_search import LutChoice, auto_batch_size, beam_search, step_tables
from pipeline.codec.codes import code_dtype
from pipeline.codec.decoder import decode
from pipeline.codec.ivf import assign, assigner
from pipeline.codec.model import QINCo, on_device, validate_vectors
from pipeline.codec.precision import autocast
from pipeline.codec.metric import prepare
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def assign_lists(model: QINCo, x_ND: np.ndarray | Tensor) -> np.ndarray:
    """Nearest IVF centroid (L2) of each raw vector, as int64 ``(N,)``: exact below
    ``ivf.HNSW_ASSIGN_MIN_NLIST`` lists, else through an HNSW graph built once per model object."""
    if not model.ivf:
        raise ConfigError("assign_lists needs an IVF model (nlist > 0)")
    if model.centroids_LD.shape[0] != model.config.nlist:
        raise ConfigError("IVF model has no centroids")
    x = x_ND.detach().cpu().numpy() if isinstance(x_ND, Tensor) else np.asarray(x_ND)
    return assign(_assigner(model), x)[1][:, 0]


def _assigner(model: QINCo):
    """:func:`ivf.assigner` of the model's centroids, kept on the model while they are unchanged
    (a graph over 65,536 centroids takes seconds to build)."""
    key = (model.centroids_LD.data_ptr(), tuple(model.centroids_LD.shape), model.centroids_LD._version)
    cached = getattr(model, "_assigner_cache", None)
    if cached is None or cached[0] != key:
        cached = (key, assigner(model.centroids_LD.detach().cpu().numpy()))
        model._assigner_cache = cached
    return cached[1]


def _to_tensor(x: np.ndarray | Tensor, device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)


def encode(model: QINCo, x_ND: np.ndarray | Tensor, list_ids_N: np.ndarray | None = None,
           batch_size: int | None = None, device: str | torch.device = "cpu",
           B: int | None = None, A: int | None = None, progress: bool = False,
           source: str = "<input>", lut_weight: float = 0.0,
           precision: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode raw vectors; returns ``(codes_NM, list_ids_N)``.

    ``codes_NM`` is uint8 for K <= 256 else uint16; ``list_ids_N`` (int64) is the IVF list of
    each vector (computed when not given) or ``None`` without IVF. ``B``/``A`` default to the
    model's config; ``lut_weight``: see :class:`LutChoice`. ``precision``: the networks' arithmetic
    (:data:`pipeline.codec.precision.PRECISIONS`; default float16 on CUDA, float32 on CPU; on CPUs
    with bfloat16 instructions bfloat16 encodes faster with a slightly higher error: bench/RESULTS.md,
    "Encoding in bfloat16").
    Invalid input raises ``VectorFormatError`` naming ``source`` and the row.
    """
    cfg = model.config
    validate_vectors(x_ND, cfg.dim, source)
    x_ND = prepare(x_ND, cfg.metric, source)  # unit rows for cosine
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
    if lut_weight:
        LutChoice(model, lut_weight)  # checks the weight and the model before any work
    model = on_device(model, device)  # the caller's model stays where it is
    dev = model.device
    bs = batch_size or 16 * auto_batch_size(model, B, A)
    out = np.empty((N, cfg.M), dtype=code_dtype(cfg.K))
    t0 = last = time.time()
    with torch.inference_mode(), autocast(dev, precision):
        tables = step_tables(model)
        for i in range(0, N, bs):
            xb = _to_tensor(x_ND[i:i + bs], dev)
            lb = None if list_ids_N is None else torch.from_numpy(list_ids_N[i:i + bs]).to(dev)
            xn = model.normalise(xb)
            xhat0 = model.initial_xhat(xb.shape[0], lb)
            codes, _ = beam_search(model, xn, xhat0, B=B, A=A, tables=tables, lut_weight=lut_weight)
            out[i:i + bs] = codes.cpu().numpy().astype(out.dtype)
            now = time.time()
            if progress and (now - last > 5 or i + bs >= N):
                done = min(i + bs, N)
                log.info("encoded %d/%d vectors (%.0f vec/s)", done, N, done / max(now - t0, 1e-9))
                last = now
    return out, list_ids_N


def reconstruct(model: QINCo, x_ND: np.ndarray | Tensor, list_ids_N: np.ndarray | None = None,
                **encode_kw) -> np.ndarray:
    """Encode then decode raw vectors (``encode_kw``: batch_size, device, B, A, ...)."""
    codes, lids = encode(model, x_ND, list_ids_N, **encode_kw)
    kw = {k: encode_kw[k] for k in ("device", "batch_size") if k in encode_kw}
    return decode(model, codes, lids, **kw)
