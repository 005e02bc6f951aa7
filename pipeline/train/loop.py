"""Training loop for QINCo (single process; the same ``Trainer`` runs under Ray Train DDP).

Loss: per-step MSE of the partial reconstructions in normalised space plus the pre-selectors'
own losses (:class:`pipeline.train.loss.TrainingLoss`); codes are found without gradient and
decoded with it.
AdamW, linear warm-up then cosine decay (over the planned steps, or with
``lr_schedule="time"`` over the wall-time budget), gradient clipping by value, reset of codewords unused
during an epoch (to a random training residual + noise), validation MSE in raw space (the Faiss
convention: mean squared L2 error per vector) after every epoch, best-model keeping, early
stopping and a wall-time budget.

Public API:

- ``Trainer(model, cfg, device="cpu", ddp_model=None, total_steps=None)`` with
  ``train_epoch(batches) -> dict``, ``validate(x_val_ND, list_ids_N=None) -> float``,
  ``end_epoch(stats, val_mse) -> dict`` (history record, ``record["stop"]``),
  ``restore_best()``, ``state_dict()`` / ``load_state_dict(d)`` (exact resume),
  ``budget_exhausted``.
  ``batches`` yields arrays/tensors ``x_BD`` or ``(x_BD, list_ids_B)`` tuples. Under
  ``torch.distributed`` the codeword-usage counts are all-reduced and the reset values are
  broadcast from rank 0 so every replica stays identical.
- ``epoch_batches(x_ND, batch_size, seed, epoch, list_ids_N=None)``: deterministic shuffled
  batches for one epoch.
- ``train_model(x_train_ND, x_val_ND, qcfg, tcfg, device="cpu", centroids=None,
  on_epoch_end=None) -> (QINCo, history)``: normalisation, IVF centroids (k-means when not
  given), RQ initialisation, the loop, best model, additive decoder fitted on training codes.
  ``on_epoch_end(record, trainer)`` is called after each epoch (history record ``epoch=0`` is
  the RQ initialisation).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from pipeline.codec.decoder import decode, reconstruction_mse
from pipeline.codec.encoder import assign_lists, encode
from pipeline.codec.metric import prepare
from pipeline.codec.model import QINCo, QincoConfig, validate_vectors
from pipeline.errors import ConfigError
from pipeline.progress import format_duration
from pipeline.train.config import TrainConfig
from pipeline.train.loss import TrainingLoss
from pipeline.train.setup import fit_decoder, init_model

log = logging.getLogger(__name__)


class WarmupCosine:
    """Learning rate: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``
    steps (constant after warm-up while ``total`` is unknown)."""

    def __init__(self, base_lr: float, warmup: int, total: int | None = None):
        self.base_lr, self.warmup, self.total = base_lr, int(warmup), total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        if not self.total or self.total <= self.warmup:
            return self.base_lr
        t = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return self.base_lr * 0.5 * (1 + math.cos(math.pi * t))

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "warmup": self.warmup, "total": self.total}

    def load_state_dict(self, d: dict) -> None:
        self.base_lr, self.warmup, self.total = d["base_lr"], d["warmup"], d["total"]


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def epoch_batches(x_ND: np.ndarray, batch_size: int, seed: int, epoch: int,
                  list_ids_N: np.ndarray | None = None) -> Iterator[Any]:
    """Shuffled batches of one epoch, identical for the same ``(seed, epoch)``."""
    perm = np.random.default_rng([seed, epoch]).permutation(len(x_ND))
    for i in range(0, len(perm), batch_size):
        idx = np.sort(perm[i:i + batch_size])
        if list_ids_N is None:
            yield x_ND[idx]
        else:
            yield x_ND[idx], list_ids_N[idx]


class Trainer:
    """Holds model, optimizer, schedule, epoch counter, best state and metrics history."""

    def __init__(self, model: QINCo, cfg: TrainConfig, device: str | torch.device = "cpu",
                 ddp_model: torch.nn.Module | None = None, total_steps: int | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.loss = TrainingLoss(self.model)
        self.ddp_model = ddp_model  # a DistributedDataParallel around a TrainingLoss of the model
        torch.manual_seed(cfg.seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.schedule = WarmupCosine(cfg.lr, cfg.warmup_steps, total_steps)
        self.epoch = 0
        self.step = 0
        self.best_val = math.inf
        self.best_epoch = -1
        self.best_state: dict[str, Tensor] | None = None
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []
        self.time_used_s = 0.0
        self.lr_scale = 1.0  # halved each time training diverges

    # -- helpers -----------------------------------------------------------------------------
    @property
    def budget_exhausted(self) -> bool:
        b = self.cfg.time_budget_s
        return b is not None and self.time_used_s >= b

    def _agreed(self, flag: bool) -> bool:
        """``flag`` on any replica (under ``torch.distributed``; else ``flag``): replicas stop at
        the same batch, as DDP needs, although each measures its own time."""
        if not _dist_ready():
            return flag
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _batch(self, b: Any) -> tuple[Tensor, Tensor | None]:
        lids = None
        if isinstance(b, (tuple, list)):
            b, lids = b
        x = b if isinstance(b, Tensor) else torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))
        x = x.to(self.device, dtype=torch.float32)
        if lids is not None:
            lids = torch.as_tensor(np.asarray(lids) if not isinstance(lids, Tensor) else lids).to(self.device).long()
        return x, lids

    def learning_rate(self) -> float:
        """Learning rate of the next step: warm-up by steps, then cosine decay over the steps
        (``lr_schedule="steps"``) or over the wall-time budget (``"time"``), which ends the
        decay when the budget runs out whatever the throughput."""
        cfg = self.cfg
        if cfg.lr_schedule != "time" or self.step < self.schedule.warmup:
            return self.schedule(self.step) * self.lr_scale
        t = min(1.0, self.time_used_s / cfg.time_budget_s)
        if _dist_ready():  # every replica must use the same rate
            tt = torch.tensor([t], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(tt, op=torch.distributed.ReduceOp.MAX)
            t = float(tt)
        return cfg.lr * self.lr_scale * 0.5 * (1 + math.cos(math.pi * t))

    def _raw_mse(self, mse_per_element: float) -> float:
        return float(mse_per_element) * self.model.config.dim * float(self.model.scale) ** 2

    # -- training ----------------------------------------------------------------------------
    def train_epoch(self, batches: Iterable[Any], samples: int | None = None) -> dict[str, Any]:
        """One pass over ``batches`` (``samples`` rows in all, when known: the progress lines then
        give the time left in the epoch); stops early at the end of the batch that crosses the
        time budget. Returns train MSE (raw, per vector), loss, samples, seconds, samples/s,
        last lr, number of reset codewords and ``stopped_by_budget``."""
        cfg, model = self.cfg, self.model
        M, K = model.config.M, model.config.K
        fwd = self.ddp_model if self.ddp_model is not None else self.loss
        model.train()
        usage = torch.zeros(M, K, dtype=torch.long, device=self.device)
        resid_MBD = None
        sum_mse = sum_loss = 0.0
        n = 0
        t0 = last = time.time()
        used0 = self.time_used_s
        stopped = False
        lr = self.learning_rate()
        noise_std = 0.0
        if cfg.input_noise and math.isfinite(self.best_val):
            noise_std = cfg.input_noise * math.sqrt(self.best_val / model.config.dim)
        for b in batches:
            x, lids = self._batch(b)
            if noise_std:
                x = x + torch.randn_like(x) * noise_std
            lr = self.learning_rate()
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            with self._autocast():
                out = fwd(x, lids, B=cfg.B_train or None)
            loss = out["loss"]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_value_(self.params, cfg.grad_clip)
            self.optimizer.step()
            self.step += 1
            codes = out["codes_BM"]
            for m in range(M):
                usage[m] += torch.bincount(codes[:, m], minlength=K)
            resid_MBD = out["xn_BD"][None] - out["xhat_prev_MBD"]
            nb = x.shape[0]
            sum_mse += float(out["mse_per_step"][-1]) * nb
            sum_loss += float(loss.detach()) * nb
            n += nb
            now = time.time()
            self.time_used_s = used0 + (now - t0)
            if now - last >= cfg.log_every_s:
                rate = n / (now - t0)
                done = f"{n:,}/{samples:,}" if samples else f"{n:,}"
                left = ""
                if samples and n < samples:
                    left = f", {format_duration((samples - n) / rate)} left in the epoch"
                log.info("epoch %d: %s samples, %.0f samples/s%s, train MSE %.5g", self.epoch + 1, done, rate, left,
                         self._raw_mse(sum_mse / n))
                last = now
            if self._agreed(self.budget_exhausted):
                stopped = True
                break
        n_reset = 0
        # after a partial epoch cut by the budget the counts are incomplete and no training
        # follows to fit moved codewords, so nothing is reset
        if cfg.reset_unused and resid_MBD is not None and not stopped:
            n_reset = self._reset_unused(usage, resid_MBD)
        self.epoch += 1
        secs = time.time() - t0
        self.time_used_s = used0 + secs
        return {
            "epoch": self.epoch,
            "train_mse": self._raw_mse(sum_mse / n) if n else math.nan,
            "train_loss": sum_loss / n if n else math.nan,
            "samples": n,
            "seconds": secs,
            "samples_per_s": n / secs if secs > 0 else math.nan,
            "lr": lr,
            "n_reset": n_reset,
            "stopped_by_budget": stopped,
        }

    @torch.no_grad()
    def _reset_unused(self, usage_MK: Tensor, resid_MBD: Tensor) -> int:
        """Move codewords unused this epoch to random training residuals + noise."""
        if _dist_ready():
            torch.distributed.all_reduce(usage_MK)
        gen = torch.Generator().manual_seed(self.cfg.seed * 100003 + self.epoch)
        resid = resid_MBD.float().cpu()
        n_total = 0
        for m, step in enumerate(self.model.steps):
            unused = (usage_MK[m] == 0).cpu()
            k = int(unused.sum())
            if k == 0:
                continue
            r = resid[m]
            pick = torch.randint(0, r.shape[0], (k,), generator=gen)
            std = float(r.std()) or 1.0
            new = r[pick] + torch.randn(k, r.shape[1], generator=gen) * std * self.cfg.reset_noise
            new_p = new + torch.randn(k, r.shape[1], generator=gen) * std * self.cfg.reset_noise
            new, new_p = new.to(self.device), new_p.to(self.device)
            if _dist_ready():
                torch.distributed.broadcast(new, src=0)
                torch.distributed.broadcast(new_p, src=0)
            idx = unused.nonzero()[:, 0].to(self.device)
            step.codebook_KD[idx] = new.to(step.codebook_KD.dtype)
            if step.has_presel:
                step.presel_KD[idx] = new_p.to(step.presel_KD.dtype)
            n_total += k
        return n_total

    def validate(self, x_val_ND: np.ndarray | Tensor, list_ids_N: np.ndarray | None = None) -> float:
        """Raw-space reconstruction MSE (mean squared L2 error per vector) with beam ``B_val``."""
        t0 = time.time()
        B = self.cfg.B_val or self.model.config.B
        codes, lids = encode(self.model, x_val_ND, list_ids_N, device=self.device, B=B,
                             source="validation data")
        xhat = decode(self.model, codes, lids, device=self.device)
        self.model.train()
        self.time_used_s += time.time() - t0
        x = x_val_ND.cpu().numpy() if isinstance(x_val_ND, Tensor) else x_val_ND
        return reconstruction_mse(x, xhat)

    def end_epoch(self, stats: dict[str, Any], val_mse: float) -> dict[str, Any]:
        """Record an epoch: keep the best model by ``val_mse``, count epochs without
        improvement; ``record["stop"]`` is set on patience or time budget exhaustion.

        A diverged epoch (``val_mse`` not finite, or above ``diverge_ratio`` x the best) puts
        the best weights back, clears the optimizer's moments and halves the learning rate
        (``record["diverged"]``), so a too-high rate costs an epoch, not the run."""
        rec = dict(stats)
        rec["val_mse"] = float(val_mse)
        rec["time_used_s"] = self.time_used_s
        diverged = self.best_state is not None and not (
            math.isfinite(val_mse) and val_mse <= self.cfg.diverge_ratio * self.best_val)
        if diverged:
            self.restore_best()
            self.optimizer.state.clear()
            self.lr_scale *= 0.5
            rec["diverged"] = True
            log.warning("epoch %s diverged (val MSE %.6g, best %.6g): restored the best weights "
                        "and halved the learning rate (now x%.3g)", rec.get("epoch", self.epoch),
                        val_mse, self.best_val, self.lr_scale)
        improved = val_mse < self.best_val
        if improved:
            self.best_val, self.best_epoch = float(val_mse), int(rec.get("epoch", self.epoch))
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        rec["best"] = improved
        rec["stop"] = bool(self.bad_epochs >= self.cfg.patience or self.budget_exhausted
                           or rec.get("stopped_by_budget", False))
        self.history.append(rec)
        return rec

    def restore_best(self) -> None:
        """Load the best-by-validation weights into the model (no-op if none recorded)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (tensors are references; deep-copy to keep)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "history": copy.deepcopy(self.history),
            "time_used_s": self.time_used_s,
            "lr_scale": self.lr_scale,
            "train_config": self.cfg.to_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate()},
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.model.load_state_dict(d["model"])
        self.optimizer.load_state_dict(d["optimizer"])
        self.schedule.load_state_dict(d["schedule"])
        self.epoch, self.step = int(d["epoch"]), int(d["step"])
        self.best_val, self.best_epoch = float(d["best_val"]), int(d["best_epoch"])
        self.best_state = d["best_state"]
        self.bad_epochs = int(d["bad_epochs"])
        self.history = copy.deepcopy(d["history"])
        self.time_used_s = float(d["time_used_s"])
        self.lr_scale = float(d.get("lr_scale", 1.0))
        rng = d.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "numpy" in rng:
            np.random.set_state(rng["numpy"])
        if "python" in rng:
            random.setstate(rng["python"])


def train_model(x_train_ND: np.ndarray, x_val_ND: np.ndarray, qcfg: QincoConfig, tcfg: TrainConfig,
                device: str | torch.device = "cpu", centroids: np.ndarray | None = None,
                on_epoch_end: Callable[[dict, Trainer], None] | None = None,
                x_init_ND: np.ndarray | None = None) -> tuple[QINCo, list[dict]]:
    """Train a QINCo model end to end (see module docstring); returns the best model by
    validation MSE and the per-epoch history. ``x_init_ND`` (default: the training set) sets up
    the model and fits its additive decoder (:mod:`pipeline.train.setup`)."""
    validate_vectors(x_train_ND, qcfg.dim, "training data")
    validate_vectors(x_val_ND, qcfg.dim, "validation data")
    if len(x_train_ND) == 0 or len(x_val_ND) == 0:
        raise ConfigError("training and validation sets must not be empty")
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    random.seed(tcfg.seed)
    # the vectors as the index sees them (unit rows for cosine: pipeline.codec.metric)
    x_train = prepare(np.asarray(x_train_ND, dtype=np.float32), qcfg.metric, "training data")
    x_val = prepare(np.asarray(x_val_ND, dtype=np.float32), qcfg.metric, "validation data")
    if tcfg.max_train and len(x_train) > tcfg.max_train:
        sel = np.sort(np.random.default_rng(tcfg.seed).choice(len(x_train), tcfg.max_train, replace=False))
        x_train = x_train[sel]
    x_init = x_train if x_init_ND is None else prepare(np.asarray(x_init_ND, dtype=np.float32), qcfg.metric,
                                                       "initialisation data")
    t_start = time.time()
    model = init_model(qcfg, tcfg, x_init, centroids_LD=centroids, device=device)
    lids_train = lids_val = None
    if qcfg.nlist:
        lids_train = assign_lists(model, x_train)
        lids_val = assign_lists(model, x_val)
    steps_per_epoch = math.ceil(len(x_train) / tcfg.batch_size)
    trainer = Trainer(model, tcfg, device, total_steps=tcfg.planned_steps(steps_per_epoch))
    trainer.time_used_s = time.time() - t_start
    init_val = trainer.validate(x_val, lids_val)
    rec0 = trainer.end_epoch({"epoch": 0, "rq_init": True, "samples": 0}, init_val)
    log.info("RQ initialisation: val MSE %.6g (%d train, %d val vectors, %.1f s)",
             init_val, len(x_train), len(x_val), trainer.time_used_s)
    if on_epoch_end:
        on_epoch_end(rec0, trainer)
    while trainer.epoch < tcfg.max_epochs:
        if trainer.budget_exhausted:
            break
        stats = trainer.train_epoch(epoch_batches(x_train, tcfg.batch_size, tcfg.seed, trainer.epoch, lids_train),
                                    samples=len(x_train))
        val = trainer.validate(x_val, lids_val)
        rec = trainer.end_epoch(stats, val)
        log.info("epoch %d: train MSE %.6g, val MSE %.6g%s, %.0f samples/s, %.1f s, %d reset",
                 rec["epoch"], rec["train_mse"], val, " (best)" if rec["best"] else "",
                 rec["samples_per_s"], rec["seconds"], rec["n_reset"])
        if on_epoch_end:
            on_epoch_end(rec, trainer)
        if rec["stop"]:
            break
    trainer.restore_best()
    model.eval()
    fit_decoder(model, x_init, tcfg, device)
    return model, trainer.history
