"""Batched QINCo decoding, full or from a prefix of the codes (multi-rate).

Public API:

- ``decode(model, codes_NM, list_ids_N=None, prefix=None, batch_size=None, device="cpu")
  -> np.ndarray float32 (N, D)``: raw-space reconstruction from the first ``prefix`` codes
  (all ``M`` when ``None``; with IVF, ``prefix=0`` gives the list centroid).
- ``Decoder(model, precision=None, device="cpu")``: ``decode`` for repeated calls with a fixed
  model (re-ranking), its per-model work done once; called as ``decoder(codes_NM, list_ids_N)``.
- ``decode_tensor(model, codes_NM, list_ids_N=None, prefix=None, tables=None, weights=None)
  -> Tensor``: the same on tensors already on the model's device (used by re-ranking).

- ``reconstruction_mse(x_ND, xhat_ND) -> float``: mean over vectors of the squared L2 error
  (the convention Faiss reports).
- ``model_centroids``, ``model_codebooks``, ``model_row_scales``: a model's inputs to the
  lookup-table stage (its IVF centroids, additive codebooks and per-row scales);
  ``model_pairwise``: its pairwise decoder (the pairwise stage's), or None.

A row decodes to the same bits whatever rows it is decoded with and whatever the thread count
(the products are :mod:`pipeline.codec.rowwise`'s), so re-ranking is exact across batches and shards.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pipeline.codec.additive import row_scales
from pipeline.codec.model import QINCo, on_device
from pipeline.codec.pairwise import PairwiseDecoder
from pipeline.codec.precision import autocast
from pipeline.codec.rowwise import TILE_ROWS, linear_rows, matmul_rows
from pipeline.errors import ConfigError


def decode_tensor(model: QINCo, codes_NM: Tensor, list_ids_N: Tensor | None = None,
                  prefix: int | None = None, tables: list[Tensor | None] | None = None,
                  weights: list[StepWeights | None] | None = None) -> Tensor:
    """Raw-space reconstruction (float32 tensor) of ``codes_NM`` using the first ``prefix`` steps.

    Every product goes through :mod:`pipeline.codec.rowwise`, so a row's reconstruction is the same
    whatever rows it is decoded with and however many threads run: the search's exact distances
    do not depend on the batch, the shards or the threads. ``tables`` (``codeword_tables``) and
    ``weights`` (``step_weights``) are computed here when not given; with reduced-precision
    ``weights`` the step networks run in that precision (without autocast), as they would under
    autocast.
    """
    M = model.config.M
    m_used = M if prefix is None else int(prefix)
    codes_NM = codes_NM.long()
    tables = codeword_tables(model) if tables is None else tables
    weights = step_weights(model, None) if weights is None else weights
    xhat = model.initial_xhat(codes_NM.shape[0], list_ids_N)
    for m in range(m_used):
        step = model.steps[m]
        c_ND = step.codebook_KD[codes_NM[:, m]]
        if step.plain:
            xhat = xhat + c_ND
            continue
        w = weights[m]
        xhat = xhat + w.finish(tables[m][codes_NM[:, m]] + w.linear(xhat, w.concat_x), c_ND).float()
    return model.denormalise(xhat)


class StepWeights:
    """One step network's weights for inference, optionally cast once to a reduced precision.

    Applied as autocast applies them (each product's inputs cast to that precision, elementwise
    operations in their inputs' promoted type), with the same results bit for bit and without
    autocast's per-operation dispatch and weight casts. ``dtype`` None keeps the weights as they
    are (float32). The products are :func:`pipeline.codec.rowwise.matmul_rows`.
    """

    def __init__(self, step, dtype: torch.dtype | None):
        self.dtype = dtype

        def cast(lin: torch.nn.Linear) -> Tensor:
            # (in, out), contiguous: the batched product then reads one copy of the weights for
            # every tile (a transposed view would be copied per tile). A snapshot either way.
            w = lin.weight.detach()
            return (w if dtype is None else w.to(dtype)).T.contiguous()

        self.qinco2 = step.variant == "qinco2"
        self.concat_x = cast(step.concat_x)
        self.blocks = [(cast(b.up), cast(b.down)) for b in step.blocks]
        self.out_proj = cast(step.out_proj) if self.qinco2 else None

    def linear(self, x: Tensor, w_IO: Tensor) -> Tensor:
        return matmul_rows(x if self.dtype is None else x.to(self.dtype), w_IO)

    def finish(self, z_xE: Tensor, c_xD: Tensor) -> Tensor:
        """``QincoStep.finish`` (blocks, then QINCo2's output projection)."""
        for up, down in self.blocks:
            z_xE = z_xE + self.linear(torch.relu_(self.linear(z_xE, up)), down)
        if self.qinco2:
            return c_xD + self.linear(z_xE, self.out_proj)
        return z_xE


def step_weights(model: QINCo, dtype: torch.dtype | None) -> list[StepWeights | None]:
    """``StepWeights`` of every step (None for a plain step)."""
    return [None if s.plain else StepWeights(s, dtype) for s in model.steps]


def codeword_tables(model: QINCo) -> list[Tensor | None]:
    """Per step, ``QincoStep.codeword_table`` computed with :mod:`pipeline.codec.rowwise`'s products, so
    that it is the same in every process whatever its thread count (None for a plain step)."""
    out: list[Tensor | None] = []
    for step in model.steps:
        if step.plain:
            out.append(None)
            continue
        e = step.codebook_KD.detach()
        if step.variant == "qinco2":
            e = linear_rows(e, step.in_proj.weight.detach())
        out.append(e + linear_rows(e, step.concat_c.weight.detach(), step.concat_c.bias.detach()))
    return out


class Decoder:
    """``decode`` for one model, precision and device, with the per-model work done once: the
    step networks' codeword tables, their reduced-precision weights and, for a model on another
    device, a copy of it there (the caller's model is not moved): work a re-rank would otherwise
    repeat for every query batch. The tables and weights are a snapshot: build a new ``Decoder`` after
    the model's weights change (``decode`` builds one per call).
    """

    def __init__(self, model: QINCo, precision: str | None = None, device: str | torch.device = "cpu"):
        # QINCo has no layer that acts differently in training mode, so the caller's model is
        # used as it is (on another device, a copy: ``on_device``).
        model = on_device(model, device)
        dev = model.device
        self.model, self.device, self.precision = model, dev, precision
        with torch.inference_mode():
            with autocast(dev, precision):
                self.tables = codeword_tables(model)
            low = precision not in (None, "float32") or (precision is None and dev.type == "cuda")
            self.weights = step_weights(model, (torch.bfloat16 if precision == "bfloat16" else torch.float16)
                                        if low else None)

    def __call__(self, codes_NM: np.ndarray, list_ids_N: np.ndarray | None = None,
                 prefix: int | None = None, batch_size: int | None = None) -> np.ndarray:
        model, cfg, dev = self.model, self.model.config, self.device
        codes_NM = np.asarray(codes_NM)
        if codes_NM.ndim != 2 or codes_NM.shape[1] != cfg.M:
            raise ConfigError(f"codes have shape {codes_NM.shape}, the model expects (N, {cfg.M})")
        if prefix is not None and not 0 <= int(prefix) <= cfg.M:
            raise ConfigError(f"prefix must be in [0, {cfg.M}], got {prefix}")
        if not model.ivf and prefix is not None and int(prefix) == 0:
            raise ConfigError("prefix 0 is only meaningful with IVF (it decodes to the list centroid)")
        N = codes_NM.shape[0]
        if codes_NM.size and int(codes_NM.max()) >= cfg.K:
            raise ConfigError(f"code value {int(codes_NM.max())} is out of range for K={cfg.K}")
        if model.ivf:
            if list_ids_N is None:
                raise ConfigError("an IVF model needs the list id of each code")
            list_ids_N = np.asarray(list_ids_N, dtype=np.int64)
            if list_ids_N.shape != (N,):
                raise ConfigError(f"list ids have shape {list_ids_N.shape}, expected ({N},)")
        bs = batch_size or 65536
        out = np.empty((N, cfg.dim), dtype=np.float32)
        with torch.inference_mode():
            for i in range(0, N, bs):
                c = codes_NM[i:i + bs]
                n = len(c)
                # Whole tiles of rows (copies of the last row after it): each product of the
                # networks is then one batched call (pipeline.codec.rowwise); the rows do not change.
                pad = -n % TILE_ROWS
                cb = torch.from_numpy(np.pad(c, ((0, pad), (0, 0)), mode="edge").astype(np.int64)).to(dev)
                lb = None
                if list_ids_N is not None:
                    lb = torch.from_numpy(np.pad(list_ids_N[i:i + bs], (0, pad), mode="edge")).to(dev)
                out[i:i + n] = decode_tensor(model, cb, lb, prefix, self.tables,
                                             self.weights)[:n].float().cpu().numpy()
        return out


def decode(model: QINCo, codes_NM: np.ndarray, list_ids_N: np.ndarray | None = None,
           prefix: int | None = None, batch_size: int | None = None,
           device: str | torch.device = "cpu", precision: str | None = None) -> np.ndarray:
    """Decode codes to raw float32 vectors (see module docstring).

    ``precision``: the networks' arithmetic, "float32", "bfloat16" (CPUs with AVX512-BF16 or
    AMX run it faster) or "float16" (CUDA); default float16 on CUDA, float32 on CPU.
    Repeated decodes with a fixed model: use a ``Decoder``.
    """
    return Decoder(model, precision, device)(codes_NM, list_ids_N, prefix, batch_size)


def reconstruction_mse(x_ND: np.ndarray | Tensor, xhat_ND: np.ndarray | Tensor, block_rows: int = 65536) -> float:
    """Mean over vectors of ``||x - x̂||²`` (the convention Faiss reports), accumulated in float64
    block by block."""
    x_ND = np.asarray(x_ND.cpu() if isinstance(x_ND, Tensor) else x_ND)
    xhat_ND = np.asarray(xhat_ND.cpu() if isinstance(xhat_ND, Tensor) else xhat_ND)
    if x_ND.shape != xhat_ND.shape or x_ND.ndim != 2:
        raise ConfigError(f"shapes differ or are not 2-D: {x_ND.shape} vs {xhat_ND.shape}")
    if x_ND.shape[0] == 0:
        raise ConfigError("no vectors to compare")
    total = 0.0
    for i0 in range(0, x_ND.shape[0], block_rows):
        diff = x_ND[i0:i0 + block_rows].astype(np.float64) - xhat_ND[i0:i0 + block_rows]
        total += float(np.einsum("nd,nd->", diff, diff))
    return total / x_ND.shape[0]


def model_centroids(model: QINCo) -> np.ndarray:
    """The model's IVF centroids ``(nlist, D)`` as float32; one zero centroid without IVF."""
    c = getattr(model, "centroids_LD", None)
    if c is None or c.numel() == 0:
        return np.zeros((1, model.config.dim), np.float32)
    return c.detach().cpu().numpy().astype(np.float32)


def model_codebooks(model: QINCo) -> np.ndarray:
    """The model's additive codebooks ``(M, K, D)`` as float32; ConfigError when it has none."""
    cb = getattr(model, "additive_MKD", None)
    if cb is None or cb.numel() == 0:
        raise ConfigError("the model has no additive decoder; retrain or fit it before building a searchable index")
    return cb.detach().cpu().numpy().astype(np.float32)


def model_row_scales(model: QINCo, codes_NM: np.ndarray, list_ids_N: np.ndarray | None,
                     device: str = "cpu") -> np.ndarray:
    """:func:`pipeline.codec.additive.row_scales` of ``codes_NM`` for a QINCo ``model``: its
    additive codebooks, its IVF centroids and its float32 decode (on ``device``) as the exact
    reconstruction. Float16 ``(N,)``.

    A row's scale is a function of its codes and list only (decoding is row by row), so the encode
    job can store it with the codes and a search that computes it gets the same value.
    """
    ivf = model.ivf  # without IVF there is no list and the residual is the whole vector
    return row_scales(codes_NM, list_ids_N if ivf else None, model_centroids(model) if ivf else None,
                      model_codebooks(model), lambda c, l: decode(model, c, l, device=device, precision="float32"))


def model_pairwise(model: QINCo) -> PairwiseDecoder | None:
    """The model's pairwise decoder (:mod:`pipeline.codec.pairwise`), or None when it has none
    (no pair helped, or the model was saved before the pairwise decoder existed)."""
    pairs = getattr(model, "pairwise_pairs_P2", None)
    if pairs is None or not pairs.shape[0] or not model.additive_MKD.shape[0]:
        return None
    return PairwiseDecoder(model_codebooks(model), pairs.cpu().numpy(), model.pairwise_PQD.cpu().numpy(),
                           model_centroids(model) if model.ivf else None)
