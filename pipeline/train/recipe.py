"""The default training recipe: model size and training settings chosen from the data.

``qinco train`` without ``--preset`` (or with ``--preset auto``) trains the model that
:func:`choose_recipe` picks from the number of training vectors ``N``, their dimension ``D``,
the code size and the device. Every choice comes with the reason it was made; both go into the
model's JSON (``metadata.recipe``). Options the user gives on the command line win over the
recipe and are recorded as such.

The rules:

- **Network width** follows the training data. The step networks of one model have about
  ``M · (3·D·de + de² + 2·L·de·dh)`` weights; the widest rung of :data:`WIDTHS` whose weights
  number at most ``N · D / DATA_PER_WEIGHT`` is chosen (the narrowest when none fits), so a small
  learn set gets a small network and a large one a wider network, never wider than the device
  trains in a budget (:data:`MAX_WIDTH`).
- **Beam**: ``A=8`` pre-selected candidates per beam entry (``A`` is used in training too, whose
  cost grows with it), beam ``B=8`` to encode and validate, ``B_train=2`` to train (what trains
  fast: the codes it finds are nearly as good).
- **Input noise** where the training set is small for the codebooks: with few training vectors
  per codeword (``N / (M·K)``) the quantizer fits its sample rather than the distribution.
  Gaussian noise on each training batch (``TrainConfig.input_noise``: std = that factor x the
  RMS quantization error per dimension) regularises it: factor 1 up to
  :data:`NOISE_FULL_ROWS` vectors per codeword, falling linearly to 0 at :data:`NOISE_OFF_ROWS`
  (bench/RESULTS.md, "Input noise where the learn set is small").
- **Learning rate**: ``1e-2`` for the CPU-sized networks (the rungs up to ``de=64``), the papers'
  ``8e-4`` for the wider ones, which only a GPU trains; batch 1,024 on the CPU, 8,192 on a GPU (a
  GPU step costs about the same for both, bench/RESULTS.md "Training on a GPU").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.codec.model import QincoConfig, config_from_preset
from pipeline.config import JsonConfig
from pipeline.train.config import TrainConfig

AUTO = "auto"

# (de, dh, L) rungs of the step networks, narrowest first.
WIDTHS: tuple[tuple[int, int, int], ...] = ((32, 64, 1), (64, 128, 2), (128, 256, 2), (384, 384, 4))
# Training values (N · D) per network weight a model may have.
DATA_PER_WEIGHT = 8.0
# The widest rung each device trains within a budget of minutes to an hour.
MAX_WIDTH = {"cpu": 1, "cuda": 3}
# Training vectors per codeword up to which the input noise is full (factor 1), and from which
# there is none.
NOISE_FULL_ROWS = 10.0
NOISE_OFF_ROWS = 20.0


@dataclass
class Recipe(JsonConfig):
    """What the recipe chose for one training run, and why (stored with the model)."""

    n_train: int
    dim: int
    M: int
    K: int
    device: str
    model: dict[str, Any] = field(default_factory=dict)   # QincoConfig fields
    train: dict[str, Any] = field(default_factory=dict)   # TrainConfig fields
    reasons: dict[str, str] = field(default_factory=dict)
    overridden: dict[str, Any] = field(default_factory=dict)  # what the user set instead


def network_weights(dim: int, M: int, de: int, dh: int, L: int) -> int:
    """Weights of the ``M`` step networks of a QINCo2 model (codebooks not counted)."""
    return M * (3 * dim * de + de * de + 2 * L * de * dh)


def _device_kind(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def choose_recipe(n_train: int, dim: int, M: int, K: int = 256, device: str = "cpu") -> Recipe:
    """The recipe for ``n_train`` training vectors of dimension ``dim`` coded in ``M`` codes of
    ``K`` values on ``device`` (see the module docstring)."""
    kind = _device_kind(device)
    values = int(n_train) * int(dim)
    allowed = values / DATA_PER_WEIGHT
    top = MAX_WIDTH[kind]
    rung = 0
    for i, (de, dh, L) in enumerate(WIDTHS[:top + 1]):
        if network_weights(dim, M, de, dh, L) <= allowed:
            rung = i
    de, dh, L = WIDTHS[rung]
    weights = network_weights(dim, M, de, dh, L)
    reasons = {
        "network": (f"{n_train:,} training vectors x {dim} dims = {values:,} values allow "
                    f"{allowed:,.0f} network weights ({DATA_PER_WEIGHT:g} values each); de={de}, dh={dh}, "
                    f"L={L} has {weights:,}" + ("" if rung < top else f", the widest trained on {kind}")
                    + (" (the narrowest rung)" if rung == 0 and weights > allowed else "")),
        "beam": "A=8 pre-selected candidates per beam entry; encode with beam B=8, train with beam 2 "
                "(fast, and the codes it finds are nearly as good)",
    }
    model = dict(variant="qinco2", L=L, de=de, dh=dh, A=8, B=8, B_train=2)
    lr = 1e-2 if rung <= 1 else 8e-4
    batch = 8192 if kind == "cuda" else 1024
    reasons["lr"] = (f"peak rate {lr:g}: " + ("small networks train fastest at 1e-2 (2e-2 diverges)"
                                              if rung <= 1 else "wider networks need a lower rate"))
    reasons["batch_size"] = (f"batch {batch}: " + ("a GPU step costs about the same up to 8,192 rows"
                                                   if kind == "cuda" else "the CPU default"))
    per_codeword = int(n_train) / (int(M) * int(K))
    noise = min(1.0, max(0.0, (NOISE_OFF_ROWS - per_codeword) / (NOISE_OFF_ROWS - NOISE_FULL_ROWS)))
    reasons["input_noise"] = (f"{n_train:,} vectors for {M} x {K} codewords = {per_codeword:.1f} per codeword: "
                              + (f"noise {noise:.2g} x the quantization error on the training vectors"
                                 if noise else f"no input noise (from {NOISE_OFF_ROWS:g} per codeword)"))
    train: dict[str, Any] = dict(lr=lr, batch_size=batch, input_noise=round(noise, 3))
    return Recipe(n_train=int(n_train), dim=int(dim), M=int(M), K=int(K), device=kind,
                  model=model, train=train, reasons=reasons)


def apply_recipe(recipe: Recipe, model_overrides: dict[str, Any], tcfg: TrainConfig,
                 explicit_train: set[str] | frozenset[str] = frozenset()) -> tuple[QincoConfig, TrainConfig, Recipe]:
    """The model and training configs of ``recipe`` with the user's choices on top:
    ``model_overrides`` (``None`` values ignored) and the fields of ``tcfg`` named in
    ``explicit_train``. Returns the configs and the recipe with ``overridden`` filled in."""
    given = {k: v for k, v in model_overrides.items() if v is not None}
    overridden = {k: v for k, v in given.items() if k in recipe.model and recipe.model[k] != v}
    qcfg = config_from_preset("qinco2-S", recipe.dim, **{"M": recipe.M, "K": recipe.K, **recipe.model, **given})
    chosen = {k: v for k, v in recipe.train.items() if k not in explicit_train}
    overridden.update({k: getattr(tcfg, k) for k in recipe.train if k in explicit_train})
    tcfg = tcfg.replace(**chosen)
    return qcfg, tcfg, dataclasses.replace(recipe, overridden=overridden)


def resolve_model(preset: str, dim: int, n_train: int, model_overrides: dict[str, Any], tcfg: TrainConfig,
                  explicit_train: set[str] | frozenset[str] = frozenset(),
                  device: str = "cpu") -> tuple[QincoConfig, TrainConfig, Recipe | None]:
    """The configs a training run uses: the recipe's for ``preset="auto"`` (with the user's
    options on top, see :func:`apply_recipe`), else the named preset's with ``model_overrides``
    and ``tcfg`` as given (recipe ``None``)."""
    if preset != AUTO:
        return config_from_preset(preset, dim, **model_overrides), tcfg, None
    M = model_overrides.get("M") or QincoConfig.M
    K = model_overrides.get("K") or QincoConfig.K
    return apply_recipe(choose_recipe(n_train, dim, M, K, device), model_overrides, tcfg, explicit_train)
