"""The QINCo / QINCo2 quantizer: configuration, presets and the ``QINCo`` module.

A vector ``x`` is normalised (``(x - mean_D) / scale``) and encoded as ``M`` codes of ``K``
values. Step ``m`` turns codeword ``c = codebook_m[code]`` into a context-dependent codeword
``f_m(c, x̂)`` where ``x̂`` is the reconstruction so far, and ``x̂ += f_m(c, x̂)``.

- Step network, ``variant="qinco1"`` (QINCo): ``z = c + W_cat [c; x̂] + b`` followed by ``L``
  residual blocks ``z += W2 relu(W1 z)`` (``D -> h -> D``); the codeword is ``z``.
- ``variant="qinco2"`` (QINCo2): ``e = in_proj(c)`` (``D -> de``), ``e += W_cat [e; x̂] + b``,
  ``L`` blocks ``de -> dh -> de``, ``f = c + out_proj(e)``.

The concat Linear is held as two halves (``concat_c`` on the codeword part, ``concat_x`` on the
context) so the per-codeword half can be computed once per step and shared by every vector
(see :meth:`QincoStep.codeword_table`). Concat, block down-projections and ``out_proj`` start at
zero, so a fresh model decodes exactly like its residual-quantization initialisation.

Without IVF, step 1 is a plain codebook (no context yet). With an IVF coarse quantizer
(``nlist > 0``; centroids in the ``centroids_LD`` buffer, raw space) the list centroid is
``x̂⁰`` and all ``M`` steps are networks. Every network step may hold a plain pre-selector
codebook ``presel_KD``: only its ``A`` nearest codewords to the residual are passed through the
network during beam search (``A = 0``: all ``K``).

The training loss (codes found without gradient by beam search, then decoded with gradient) is
:class:`pipeline.train.loss.TrainingLoss`, a module around the model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.config import JsonConfig
from pipeline.codec.metric import check_metric
from pipeline.errors import ConfigError, VectorFormatError

VARIANTS = ("qinco1", "qinco2")


@dataclass
class QincoConfig(JsonConfig):
    """Architecture of a QINCo model (no training hyper-parameters).

    ``B`` is the encoding beam, ``B_train`` the beam used to find codes during training
    (0: same as ``B``); ``A`` the number of pre-selected candidates per beam entry (0: all K).
    """

    dim: int
    M: int = 8
    K: int = 256
    variant: str = "qinco2"
    L: int = 2
    h: int = 256
    de: int = 128
    dh: int = 256
    A: int = 16
    B: int = 8
    B_train: int = 0
    nlist: int = 0
    init_noise: float = 0.01
    metric: str = "l2"  # l2, ip or cosine (pipeline.codec.metric)

    def __post_init__(self) -> None:
        check_metric(self.metric)
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("dim", "M", "K", "B"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("L", "h", "de", "dh", "A", "B_train", "nlist"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.K < 2 or self.K > 65536:
            raise ConfigError(f"K must be in [2, 65536], got {self.K}")
        if self.variant == "qinco1" and self.h < 1 and self.L > 0:
            raise ConfigError("qinco1 needs h >= 1")
        if self.variant == "qinco2" and (self.de < 1 or (self.L > 0 and self.dh < 1)):
            raise ConfigError("qinco2 needs de >= 1 and dh >= 1")

    @property
    def code_bytes(self) -> float:
        """Bytes per vector of the M codes (the IVF list id is not counted)."""
        return self.M * math.log2(self.K) / 8

    @property
    def train_beam(self) -> int:
        return self.B_train or self.B

    @property
    def effective_A(self) -> int:
        """Candidates evaluated per beam entry at network steps."""
        return self.K if self.A <= 0 or self.A >= self.K else self.A


# Published QINCo / QINCo2 settings (M and K are per use case; 8 x 256 = 8 bytes by default).
PRESETS: dict[str, dict[str, Any]] = {
    "qinco1": dict(variant="qinco1", L=16, h=256, A=0, B=1, B_train=1),
    "qinco2-S": dict(variant="qinco2", L=2, de=128, dh=256, A=16, B=32, B_train=8),
    "qinco2-M": dict(variant="qinco2", L=4, de=384, dh=384, A=16, B=32, B_train=8),
    "qinco2-L": dict(variant="qinco2", L=16, de=384, dh=384, A=16, B=32, B_train=8),
    # Small enough to make real progress in minutes on two CPU cores.
    "cpu": dict(variant="qinco2", L=2, de=64, dh=128, A=8, B=4, B_train=2),
}


def encode_flops_per_vector(cfg: QincoConfig) -> float:
    """Multiply-add FLOPs (2 per MAC) to encode one vector with beam search and pre-selection.

    Counts IVF assignment, pre-selection distances, the context projection per beam entry, and
    per candidate the residual blocks, output projection and distance. The per-codeword table is
    computed once per batch and is left out.
    """
    D, K = cfg.dim, cfg.K
    E = cfg.de if cfg.variant == "qinco2" else D
    hidden = cfg.dh if cfg.variant == "qinco2" else cfg.h
    A = cfg.effective_A
    flops = 2.0 * max(cfg.nlist, 0) * D
    F = 1
    for m in range(cfg.M):
        plain = m == 0 and not cfg.nlist
        if plain:
            flops += 2.0 * F * K * D
            cands = F * K
        else:
            if 0 < cfg.A < K:
                flops += 2.0 * F * K * D
            cands = F * A
            per_cand = cfg.L * 4.0 * E * hidden + 3.0 * D
            if cfg.variant == "qinco2":
                per_cand += 2.0 * E * D
            flops += 2.0 * F * D * E + cands * per_cand
        F = min(cfg.B, cands)
    return flops


def config_from_preset(name: str, dim: int, **overrides: Any) -> QincoConfig:
    """``QincoConfig`` for preset ``name`` (see :data:`PRESETS`) with ``overrides`` applied
    (``None`` values are ignored so CLI defaults can be passed through)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    kw = dict(PRESETS[name])
    fields = {f.name for f in dataclasses.fields(QincoConfig)}
    for k, v in overrides.items():
        if k not in fields:
            raise ConfigError(f"unknown model option {k!r}")
        if v is not None:
            kw[k] = v
    return QincoConfig(dim=int(dim), **kw)


def validate_vectors(x_ND: np.ndarray | Tensor, dim: int, source: str = "<input>") -> None:
    """Raise ``VectorFormatError`` naming ``source`` and the first bad row when ``x_ND`` is not a
    2-d array of ``dim`` finite values per row."""
    shape = tuple(x_ND.shape)
    if len(shape) != 2:
        raise VectorFormatError(source, f"expected a 2-d array of vectors, got shape {shape}")
    if shape[1] != dim:
        raise VectorFormatError(source, f"vectors have dimension {shape[1]}, the model expects {dim}")
    if isinstance(x_ND, Tensor):
        if x_ND.is_floating_point():
            bad = ~torch.isfinite(x_ND).all(dim=1)
            if bool(bad.any()):
                row = int(torch.nonzero(bad)[0, 0])
                raise VectorFormatError(source, "vector contains NaN or Inf", row=row)
        return
    if np.issubdtype(x_ND.dtype, np.floating):
        bad = ~np.isfinite(x_ND).all(axis=1)
        if bad.any():
            raise VectorFormatError(source, "vector contains NaN or Inf", row=int(np.argmax(bad)))


def on_device(model: "QINCo", device: str | torch.device) -> "QINCo":
    """``model`` itself when it is on ``device``, else a copy of it there.

    ``nn.Module.to`` moves a module in place, so an encode or decode on another device would
    otherwise move the caller's model (and, on a GPU, its memory) without saying so. The copy is
    made once per call: callers that run many batches load the model on their device first
    (``pipeline.codec.model_file.load_model(uri, device=...)``), as the encode and search jobs do.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # "cuda" names the current device, e.g. cuda:0
        dev = torch.device("cuda", torch.cuda.current_device())
    return model if model.device == dev else copy.deepcopy(model).to(dev)


class _Block(nn.Module):
    """Residual MLP block ``z + W2 relu(W1 z)`` (no biases); ``W2`` starts at zero."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        nn.init.kaiming_uniform_(self.up.weight, nonlinearity="relu")
        nn.init.zeros_(self.down.weight)

    def forward(self, z: Tensor) -> Tensor:
        return z + self.down(torch.relu(self.up(z)))


class QincoStep(nn.Module):
    """One quantization step: codebook, optional pre-selector and (unless plain) step network."""

    def __init__(self, cfg: QincoConfig, plain: bool):
        super().__init__()
        D, K = cfg.dim, cfg.K
        self.plain = plain
        self.variant = cfg.variant
        self.codebook_KD = nn.Parameter(torch.randn(K, D) * 0.1)
        self.has_presel = (not plain) and 0 < cfg.A < K
        if self.has_presel:
            self.presel_KD = nn.Parameter(torch.randn(K, D) * 0.1)
        if plain:
            return
        if cfg.variant == "qinco2":
            E = cfg.de
            self.in_proj = nn.Linear(D, E, bias=False)
            nn.init.kaiming_uniform_(self.in_proj.weight, nonlinearity="relu")
            self.out_proj = nn.Linear(E, D, bias=False)
            nn.init.zeros_(self.out_proj.weight)
            hidden = cfg.dh
        else:
            E = D
            hidden = cfg.h
        self.concat_c = nn.Linear(E, E, bias=True)
        self.concat_x = nn.Linear(D, E, bias=False)
        for p in (self.concat_c.weight, self.concat_c.bias, self.concat_x.weight):
            nn.init.zeros_(p)
        self.blocks = nn.ModuleList([_Block(E, hidden) for _ in range(cfg.L)])

    # -- pieces shared by training decode and batched inference --------------------------
    def codeword_table(self, c_KD: Tensor | None = None) -> Tensor:
        """Per-codeword part of the first layer, ``e + W_cat_c e + b`` (``(K, E)``)."""
        c = self.codebook_KD if c_KD is None else c_KD
        e = self.in_proj(c) if self.variant == "qinco2" else c
        return e + self.concat_c(e)

    def context(self, xhat_xD: Tensor) -> Tensor:
        """Per-reconstruction part of the first layer, ``W_cat_x x̂`` (``(..., E)``)."""
        return self.concat_x(xhat_xD)

    def finish(self, z_xE: Tensor, c_xD: Tensor) -> Tensor:
        """Blocks and output projection, given ``z = table[code] + context`` and the codeword."""
        for blk in self.blocks:
            z_xE = blk(z_xE)
        if self.variant == "qinco2":
            return c_xD + self.out_proj(z_xE)
        return z_xE

    def decode_codes(self, codes_B: Tensor, xhat_BD: Tensor) -> Tensor:
        """Codewords ``f(c[codes], x̂)`` (``(B, D)``), with gradient (training path)."""
        c_BD = self.codebook_KD[codes_B]
        if self.plain:
            return c_BD
        z = self.codeword_table(c_BD) + self.context(xhat_BD)
        return self.finish(z, c_BD)


class QINCo(nn.Module):
    """QINCo / QINCo2 quantizer (see module docstring).

    Buffers: ``mean_D`` and ``scale`` (normalisation), ``centroids_LD`` (raw-space IVF
    centroids, ``(0, D)`` without IVF), ``additive_MKD`` (least-squares additive codebooks
    fitted to the codes, raw space; ``(0, K, D)`` until fitted), and the pairwise decoder's
    ``pairwise_pairs_P2`` (code positions, int64) and ``pairwise_PQD`` (its ``K²``-row tables,
    float16; :mod:`pipeline.codec.pairwise`), with ``P = 0`` until fitted.
    """

    def __init__(self, config: QincoConfig):
        super().__init__()
        self.config = config
        D, K = config.dim, config.K
        self.register_buffer("mean_D", torch.zeros(D))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("centroids_LD", torch.zeros(0, D))
        self.register_buffer("additive_MKD", torch.zeros(0, K, D))
        self.register_buffer("pairwise_pairs_P2", torch.zeros(0, 2, dtype=torch.int64))
        self.register_buffer("pairwise_PQD", torch.zeros(0, K * K, D, dtype=torch.float16))
        ivf = config.nlist > 0
        self.steps = nn.ModuleList(
            [QincoStep(config, plain=(m == 0 and not ivf)) for m in range(config.M)])

    # -- state ------------------------------------------------------------------------------
    @property
    def ivf(self) -> bool:
        return self.config.nlist > 0

    @property
    def device(self) -> torch.device:
        return self.mean_D.device

    @torch.no_grad()
    def set_normalisation(self, x_ND: np.ndarray | Tensor) -> None:
        """Learn the per-dimension mean and one scalar scale (RMS of centred values)."""
        x = torch.as_tensor(np.asarray(x_ND, dtype=np.float32) if not isinstance(x_ND, Tensor) else x_ND)
        x = x.to(torch.float64)
        mean = x.mean(0)
        scale = ((x - mean) ** 2).mean().sqrt().clamp_min(1e-12)
        self.mean_D.copy_(mean.to(self.mean_D))
        self.scale.copy_(scale.to(self.scale))

    @torch.no_grad()
    def set_centroids(self, centroids_LD: np.ndarray | Tensor) -> None:
        """Install the IVF coarse centroids (raw space, ``(nlist, D)``)."""
        c = torch.as_tensor(np.asarray(centroids_LD, dtype=np.float32)
                            if not isinstance(centroids_LD, Tensor) else centroids_LD).float()
        if tuple(c.shape) != (self.config.nlist, self.config.dim):
            raise ConfigError(f"centroids have shape {tuple(c.shape)}, the model expects "
                              f"({self.config.nlist}, {self.config.dim}) (nlist, dim)")
        self.centroids_LD = c.to(self.device).contiguous()

    @torch.no_grad()
    def set_additive_codebooks(self, codebooks_MKD: np.ndarray | Tensor | None) -> None:
        """Store additive-decoder codebooks (``(M, K, D)``) with the model; ``None`` clears them."""
        D, K, M = self.config.dim, self.config.K, self.config.M
        if codebooks_MKD is None:
            self.additive_MKD = torch.zeros(0, K, D, device=self.device)
            return
        c = torch.as_tensor(np.asarray(codebooks_MKD, dtype=np.float32)
                            if not isinstance(codebooks_MKD, Tensor) else codebooks_MKD).float()
        if tuple(c.shape) != (M, K, D):
            raise ConfigError(f"additive codebooks have shape {tuple(c.shape)}, expected {(M, K, D)}")
        self.additive_MKD = c.to(self.device).contiguous()

    @torch.no_grad()
    def set_pairwise(self, pairs_P2: np.ndarray, tables_PQD: np.ndarray) -> None:
        """Store the pairwise decoder's pairs ``(P, 2)`` and tables ``(P, K², D)`` (``P = 0``: none)."""
        D, K, M = self.config.dim, self.config.K, self.config.M
        pairs = torch.as_tensor(np.asarray(pairs_P2, dtype=np.int64)).reshape(-1, 2)
        tables = torch.as_tensor(np.asarray(tables_PQD, dtype=np.float16))
        if tuple(tables.shape) != (pairs.shape[0], K * K, D):
            raise ConfigError(f"pair tables have shape {tuple(tables.shape)}, expected {(pairs.shape[0], K * K, D)}")
        if pairs.numel() and not bool(((pairs >= 0) & (pairs < M)).all()):
            raise ConfigError(f"pair positions must lie in [0, {M}), got {pairs.tolist()}")
        self.pairwise_pairs_P2 = pairs.to(self.device).contiguous()
        self.pairwise_PQD = tables.to(self.device).contiguous()

    # -- coordinate changes ---------------------------------------------------------------
    def normalise(self, x_BD: Tensor) -> Tensor:
        return (x_BD.to(self.mean_D.dtype) - self.mean_D) / self.scale

    def denormalise(self, xn_BD: Tensor) -> Tensor:
        return xn_BD.float() * self.scale + self.mean_D

    def initial_xhat(self, n: int, list_ids_B: Tensor | None) -> Tensor:
        """``x̂⁰`` in normalised space: the list centroid with IVF, zero otherwise."""
        if not self.ivf:
            return torch.zeros(n, self.config.dim, device=self.device)
        if list_ids_B is None:
            raise ConfigError("an IVF model needs list ids (see encoder.assign_lists)")
        if self.centroids_LD.shape[0] != self.config.nlist:
            raise ConfigError("IVF model has no centroids; call set_centroids first")
        return self.normalise(self.centroids_LD[list_ids_B.to(self.device).long()])

    @torch.no_grad()
    def assign_lists_tensor(self, x_BD: Tensor) -> Tensor:
        """Nearest centroid of each raw vector (exact L2), as int64."""
        c = self.centroids_LD
        d = (x_BD.float() ** 2).sum(1, keepdim=True) - 2 * x_BD.float() @ c.T + (c ** 2).sum(1)
        return d.argmin(1)

    def extra_repr(self) -> str:
        c = self.config
        return f"variant={c.variant}, D={c.dim}, M={c.M}, K={c.K}, nlist={c.nlist}"


# Buffers whose size the trained state sets (empty until fitted); the pairwise ones may be absent.
SIZED_BY_STATE = ("centroids_LD", "additive_MKD", "pairwise_pairs_P2", "pairwise_PQD")


def model_from_state(qcfg: QincoConfig, state: dict) -> QINCo:
    """A ``QINCo`` holding ``state`` (tensors by name); the centroid, additive- and
    pairwise-decoder buffers take the sizes the state gives them (the pairwise ones are optional:
    files written before it have none)."""
    model = QINCo(qcfg)
    state = {k: torch.as_tensor(v) for k, v in state.items()}
    if "centroids_LD" in state:
        model.centroids_LD = torch.zeros_like(state["centroids_LD"])
    if "additive_MKD" in state:
        model.additive_MKD = torch.zeros_like(state["additive_MKD"])
    for name in SIZED_BY_STATE[2:]:
        if name in state:
            setattr(model, name, torch.zeros_like(state[name], dtype=getattr(model, name).dtype))
        else:
            state[name] = getattr(model, name)
    model.load_state_dict(state)
    return model
