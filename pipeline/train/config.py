"""Training hyper-parameters (stored with every model) and their defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import JsonConfig
from pipeline.errors import ConfigError

# Epochs of a run given neither an epoch count nor a time budget.
DEFAULT_EPOCHS = 10


@dataclass
class TrainConfig(JsonConfig):
    """Training hyper-parameters (stored with the model).

    ``epochs`` caps the passes over the training set; ``None`` trains until early stopping
    (``patience`` epochs without a better validation MSE) or the ``time_budget_s`` ends it, and
    needs a budget.
    """

    epochs: int | None = DEFAULT_EPOCHS
    batch_size: int = 1024
    lr: float = 8e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 0.1
    patience: int = 10
    time_budget_s: float | None = None
    seed: int = 0
    B_train: int = 0          # 0: the model's config.train_beam
    B_val: int = 0            # 0: the model's config.B
    max_train: int | None = None
    val_size: int = 2000
    reset_unused: bool = True
    reset_noise: float = 0.01
    rq_iters: int = 10
    rq_max_points: int = 65536
    rq_beam: int = 5          # beam of the Faiss RQ that initialises the codebooks; 0: greedy k-means
    fit_additive: bool = True
    additive_max_rows: int = 50000
    ridge: float = 1e-6
    # the pairwise decoder (on the additive decoder's rows): at most this many pairs (None: M,
    # 0: none) within this many bytes of float16 tables
    pairwise_pairs: int | None = None
    pairwise_max_bytes: int = 128 << 20
    log_every_s: float = 10.0
    num_threads: int = 0      # 0: leave torch's default
    lr_schedule: str = "steps"  # "steps": cosine over epochs; "time": cosine over time_budget_s
    input_noise: float = 0.0  # Gaussian noise added to each training batch, std = this x the
                              # per-dimension RMS quantization error of the best model so far
    diverge_ratio: float = 1.5  # val MSE above this x the best (or not finite): back to the best
                                # weights, fresh optimizer state, half the learning rate

    def __post_init__(self) -> None:
        if self.epochs is None and self.time_budget_s is None:
            raise ConfigError("epochs=None (train until early stopping or the time budget) needs time_budget_s")
        if (self.epochs is not None and self.epochs < 0) or self.batch_size < 1 or self.lr <= 0 or self.patience < 1:
            raise ConfigError("epochs >= 0, batch_size >= 1, lr > 0 and patience >= 1 are required")
        if not (math.isfinite(self.input_noise) and self.input_noise >= 0):
            raise ConfigError(f"input_noise must be a finite number >= 0, got {self.input_noise}")
        if self.diverge_ratio <= 1:
            raise ConfigError(f"diverge_ratio must be > 1, got {self.diverge_ratio}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"time_budget_s must be positive, got {self.time_budget_s}")
        if self.lr_schedule not in ("steps", "time"):
            raise ConfigError(f"lr_schedule must be 'steps' or 'time', got {self.lr_schedule!r}")
        if self.lr_schedule == "time" and self.time_budget_s is None:
            raise ConfigError("lr_schedule='time' needs time_budget_s")

    @property
    def max_epochs(self) -> float:
        """The epoch cap: ``epochs``, or infinity when the budget and early stopping end training."""
        return math.inf if self.epochs is None else self.epochs

    def planned_steps(self, steps_per_epoch: int) -> int | None:
        """Optimizer steps of the whole run for the ``"steps"`` schedule (None when unbounded)."""
        return None if self.epochs is None else self.epochs * steps_per_epoch


# Peak learning rates per architecture preset. The papers' 8e-4 suits long GPU runs of the
# large presets; the small `cpu` preset, trained for minutes, learns several times faster at
# 1e-2 (and diverges at 2e-2).
PRESET_LR = {"cpu": 1e-2}


DEFAULT_LR = 8e-4


def default_lr(preset: str | None) -> float:
    """Peak learning rate for ``preset`` when the user gives none."""
    return PRESET_LR.get(preset or "", DEFAULT_LR)
