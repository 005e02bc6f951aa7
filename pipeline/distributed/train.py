"""Distributed fitting on Ray Train: the codec's training loop under TorchTrainer (DDP).

Driver (``run_distributed_training``):

1. Reads only headers of the inputs (any supported format, local or S3) and checks them
   (empty, corrupt, unreachable, dimension), then refuses a run directory that holds a run
   with another data dimension, other data or other hyper-parameters (unless ``fresh``). All of
   this happens before any training starts.
2. Draws deterministic, disjoint train/validation samples (hash of the global row id, seeded;
   see :class:`pipeline.distributed.datasource.RowSample`) with one parallel byte-range Ray Data read:
   a sample of the training band initialises the model (normalisation, IVF centroids with
   Faiss k-means — two-level for large ``nlist`` — and RQ codebooks; stored once in the run
   directory so a resumed run starts from the same point) and the validation band is never
   trained on.
3. Runs ``TorchTrainer`` with N workers (gloo on CPU, NCCL on GPU). Each worker streams its
   equal share of the training band from storage with ``ray.train.get_dataset_shard`` and runs
   :class:`pipeline.train.loop.Trainer` on a DDP-wrapped model. ``TrainConfig.batch_size`` is the
   global batch (each worker takes ``batch_size / N`` rows per step), so N workers follow the
   same schedule as one. Validation is split across workers and all-reduced. Rank 0 checkpoints
   the full trainer state every epoch under ``<out>/checkpoints/<run_name>``
   (``RunConfig(name, storage_path)``): re-running the same command resumes at the next epoch,
   and ``FailureConfig`` restarts the worker group from the last checkpoint when a worker dies.
4. Takes the best-by-validation weights of the last checkpoint, fits the least-squares additive
   decoder on training codes, and saves the model directory with config, weights,
   normalisation, centroids, decoder, per-epoch metrics, code version and input provenance.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from safetensors.torch import load, save
import torch
import torch.distributed as dist

from pipeline.codec.encoder import assign_lists
from pipeline.codec.metric import prepare
from pipeline.codec.ivf import auto_nlist
from pipeline.codec.model import QINCo, QincoConfig, model_from_state
from pipeline.codec.model_file import save_model, save_report
from pipeline.codec.threads import use_threads
from pipeline.config import JsonConfig, code_version
from pipeline.distributed.datasource import READ_TASK_CPUS, VectorDatasource, read_source, unwrap_ray_error
from pipeline.progress import training_progress
from pipeline.errors import CheckpointError, ConfigError, PipelineError
from pipeline.io import storage
from pipeline.io.inputs import RowSample, hash01, plan_inputs
from pipeline.train.config import TrainConfig
from pipeline.train.loop import Trainer
from pipeline.train.loss import TrainingLoss
from pipeline.train.recipe import AUTO, resolve_model
from pipeline.train.setup import INIT_ROWS, SplitPlan, fit_decoder, init_model, plan_split, read_split_local

log = logging.getLogger(__name__)

RUN_FILE = "qinco_run.json"
STATE_FILE = "trainer.pt"
INIT_FILE = "init_model.safetensors"
LOCAL_SAMPLE_BYTES = 64 << 20  # inputs up to this size are sampled on the driver (no Ray Data pass)


@dataclass
class DistTrainConfig(JsonConfig):
    """One distributed training run (stored with the model and in the run directory).

    ``qinco`` / ``train`` are ``QincoConfig`` / ``TrainConfig`` dicts (``qinco["dim"]`` may be
    ``None``: taken from the data). ``init_rows``: size of the training-band sample used for
    normalisation, IVF k-means, RQ initialisation and the additive decoder.
    ``stop_after_epochs`` ends this invocation after that many epochs (re-run to continue).
    ``local_sample_bytes``: inputs up to this size are sampled on the driver, larger ones with a
    parallel Ray Data read.
    """

    data_uris: list[str]
    out_uri: str
    qinco: dict[str, Any]
    train: dict[str, Any]
    fmt: str | None = None
    vector_column: str | None = None  # parquet inputs: the vectors' column (None: "vector")
    id_column: str | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 0      # torch threads per worker; 0: max(1, int(cpus_per_worker))
    init_rows: int = INIT_ROWS
    rows_per_task: int = 65536
    ivf_niter: int = 20
    run_name: str = "train"
    fresh: bool = False
    max_failures: int = 2
    stop_after_epochs: int | None = None
    local_sample_bytes: int = LOCAL_SAMPLE_BYTES
    preset: str | None = None        # "auto": ``qinco`` holds only the user's options, the recipe the rest
    explicit_train: list[str] = field(default_factory=list)  # ``train`` fields the recipe leaves as given
    ivf_auto: bool = False  # ``--ivf auto``: the IVF lists from the number of vectors (codec.ivf.auto_nlist)
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self, inputs_desc: list[dict]) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        return {
            "inputs": [(d["uri"], d["count"], d["dim"], d["header_sha256"]) for d in inputs_desc],
            "fmt": self.fmt,
            "qinco": self.qinco,
            "train": self.train,
            "init_rows": self.init_rows,
            "ivf_niter": self.ivf_niter,
            **{k: getattr(self, k) for k in ("vector_column", "id_column") if getattr(self, k) is not None},
        }


def checkpoint_root(cfg: DistTrainConfig) -> str:
    """``<out>/checkpoints``: Ray Train's ``storage_path``; the run lives in ``<run_name>/``."""
    return storage.join(cfg.out_uri, "checkpoints")


def run_dir(cfg: DistTrainConfig) -> str:
    return storage.join(checkpoint_root(cfg), cfg.run_name)


# ----------------------------------------------------------------------------------------- state files

def _save_state(trainer, path: str) -> None:
    """Trainer state as a torch file loadable with ``weights_only=True``."""
    state = trainer.state_dict()
    rng = state.get("rng") or {}
    state["rng"] = {"torch": rng["torch"]} if "torch" in rng else {}
    torch.save(state, path)


def _load_state(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types on truncated or foreign files
        raise CheckpointError(f"{storage.redact(path)}: unreadable trainer checkpoint ({e})") from e


def _save_init(model, uri: str, options) -> None:
    blob = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    storage.write_bytes_atomic(uri, blob, options)


def _load_init(uri: str, options) -> dict:
    try:
        return load(storage.read_bytes(uri, options))
    except PipelineError:
        raise
    except Exception as e:  # safetensors raises its own error types on malformed headers
        raise CheckpointError(f"{storage.redact(uri)}: unreadable initial model ({e})") from e


# ----------------------------------------------------------------------------------------- worker

def _ddp_args() -> set[str]:
    return set(inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters)


def _train_loop_per_worker(config: dict) -> None:
    """Body of every Ray Train worker (see the module docstring, step 3)."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_threads(int(config["threads"]))
    torch.manual_seed(config["seed"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    qcfg = QincoConfig.from_dict(config["qinco"])
    tcfg = TrainConfig.from_dict(config["train"])
    per_worker_batch = max(1, math.ceil(tcfg.batch_size / world))
    model = model_from_state(qcfg, _load_init(config["init_uri"], config["options"])).to(device)
    ddp = None
    if world > 1:
        # Buffers (normalisation, centroids) are fixed during training: synced once at init,
        # not broadcast before every forward (centroid tables can be large).
        kw = {"forward_sync_buffers": False} if "forward_sync_buffers" in _ddp_args() else {"broadcast_buffers": False}
        ddp = torch.nn.parallel.DistributedDataParallel(
            TrainingLoss(model), device_ids=[device.index] if device.type == "cuda" else None, **kw)
    # The Trainer keeps the time budget, agreed across ranks at every batch (Trainer._agreed).
    trainer = Trainer(model, tcfg, device, ddp_model=ddp, total_steps=config["total_steps"])
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        trainer.time_used_s = config["init_s"]  # the set-up counts against the budget, as in-process
    else:
        with ckpt.as_directory() as d:
            trainer.load_state_dict(_load_state(os.path.join(d, STATE_FILE)))
        if rank == 0:
            print(f"[qinco] resuming after epoch {trainer.epoch} from the last checkpoint", flush=True)
    metric = qcfg.metric
    x_val = np.asarray(config["x_val"], dtype=np.float32)[rank::world]
    lids_val = config.get("lids_val")
    if lids_val is not None:
        lids_val = np.asarray(lids_val)[rank::world]
    n_val_total = len(config["x_val"])
    shard = ray.train.get_dataset_shard("train")

    def all_sum(values: list[float]) -> list[float]:
        if world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def agreed(flag: bool) -> bool:
        return all_sum([1.0 if flag else 0.0])[0] > 0

    def batches(epoch: int):
        it = shard.iter_batches(batch_size=per_worker_batch, batch_format="numpy",
                                local_shuffle_buffer_size=min(4 * per_worker_batch, 65536),
                                local_shuffle_seed=tcfg.seed * 1000 + epoch * 16 + rank)
        for b in it:  # as the index sees them (unit rows for cosine)
            yield prepare(b["vector"].astype(np.float32, copy=False), metric, "training data")

    finished = trainer.epoch >= tcfg.max_epochs or bool(trainer.history and trainer.history[-1].get("stop"))
    epochs_this_run = 0
    # rank 0's progress over the epochs, or over the seconds of a time budget: its line (done,
    # total, rate, time left) goes into the epoch line below; a bar only where stderr is a terminal
    bar = None
    if rank == 0:
        bar = training_progress(tcfg.epochs, tcfg.time_budget_s, trainer.epoch, trainer.time_used_s)
    while not finished:
        stats = trainer.train_epoch(batches(trainer.epoch))
        sse = trainer.validate(x_val, lids_val) * len(x_val) if len(x_val) else 0.0
        train_sse = stats["train_mse"] * stats["samples"] if stats["samples"] else 0.0
        samples, sse, train_sse, secs = all_sum([float(stats["samples"]), sse, train_sse,
                                                 float(stats["seconds"])])
        secs = max(secs / world, 1e-9)  # mean epoch time over ranks
        stats["train_mse"] = train_sse / samples if samples else math.nan
        rec = trainer.end_epoch(stats, sse / n_val_total)
        rec["workers"] = world
        rec["samples_all_workers"] = int(samples)
        rec["samples_per_s_all_workers"] = samples / secs
        rec["epoch_s_all_workers"] = secs
        epochs_this_run += 1
        finished = trainer.epoch >= tcfg.max_epochs or bool(rec["stop"])
        pause = config["stop_after"] is not None and epochs_this_run >= config["stop_after"]
        stop = agreed(finished or stats["stopped_by_budget"] or pause)
        metrics = {"epoch": rec["epoch"], "train_mse": rec["train_mse"], "val_mse": rec["val_mse"],
                   "samples": int(samples), "samples_per_s": rec["samples_per_s_all_workers"],
                   "epoch_s": secs, "best_val_mse": trainer.best_val, "stop": stop}
        if rank == 0:
            if bar is not None:
                bar.update(1 if bar.unit == "epochs" else max(0, min(bar.total, int(trainer.time_used_s)) - bar.done))
            print(f"[qinco] epoch {rec['epoch']}/{'-' if tcfg.epochs is None else tcfg.epochs}: train MSE {rec['train_mse']:.6g}, "
                  f"val MSE {rec['val_mse']:.6g}{' (best)' if rec['best'] else ''}, "
                  f"{metrics['samples_per_s']:.0f} samples/s on {world} worker(s), {secs:.1f} s{'' if bar is None else '; ' + bar.line()}",
                  flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                _save_state(trainer, os.path.join(tmp, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
        if stop:
            break


# ----------------------------------------------------------------------------------------- driver

def _check_or_record_run(cfg: DistTrainConfig, inputs_desc: list[dict], options) -> None:
    """Refuse to resume a run with another dimension, other data or other hyper-parameters
    (unless ``fresh``, which discards it); record this run's identity otherwise."""
    path = storage.join(run_dir(cfg), RUN_FILE)
    ident = json.loads(json.dumps(cfg.identity(inputs_desc)))
    if cfg.fresh:
        for f in storage.list_files(run_dir(cfg), options):
            storage.remove(f, options)
    elif storage.exists(path, options):
        try:
            old = json.loads(storage.read_bytes(path, options))["identity"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{storage.redact(path)}: unreadable run record ({e})") from e
        old_dims = {int(i[2]) for i in old.get("inputs", [])}
        new_dim = int(inputs_desc[0]["dim"])
        if old_dims and new_dim not in old_dims:
            raise ConfigError(
                f"{storage.redact(inputs_desc[0]['uri'])}: vectors have dimension {new_dim} but the "
                f"checkpoint at {storage.redact(run_dir(cfg))} was trained on dimension "
                f"{sorted(old_dims)[0]}; use another --out or pass --fresh to start over")
        if old != ident:
            diffs = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
            detail = []
            for k in ("qinco", "train"):
                if k in diffs and isinstance(old.get(k), dict) and isinstance(ident.get(k), dict):
                    detail += [f"{k}.{n}: {old[k].get(n)!r} -> {ident[k].get(n)!r}"
                               for n in sorted(set(old[k]) | set(ident[k])) if old[k].get(n) != ident[k].get(n)]
            raise ConfigError(
                f"{storage.redact(run_dir(cfg))} holds a run with different {', '.join(diffs)}"
                f"{' (' + '; '.join(detail) + ')' if detail else ''}; re-run with the same arguments "
                f"to resume, or pass --fresh to start over")
        return
    storage.write_bytes_atomic(path, json.dumps({"identity": ident, "config": cfg.to_dict(),
                                                 "code_version": code_version()},
                                                indent=2, sort_keys=True).encode(), options)


def draw_samples(inputs, plan: SplitPlan, rows_per_task: int, options,
                 local_bytes: int = LOCAL_SAMPLE_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """The plan's validation and initialisation rows (``pipeline.train.setup``), float32 in global
    id order. Inputs of more than ``local_bytes`` are read in one parallel byte-range Ray Data
    pass, smaller ones in this process; the rows are the same whatever the path or task split."""
    if sum(i.size_bytes for i in inputs) <= local_bytes:
        x_val, x_init, _ = read_split_local(inputs, plan, options, train=False)
        return x_val, x_init
    sample = RowSample(fraction=min(1.0, plan.val_fraction + plan.init_fraction), seed=plan.seed, split="all")
    ds = read_source(VectorDatasource(inputs, rows_per_task=rows_per_task, options=options, sample=sample))
    ds.context.enable_progress_bars = False
    ids, xs = [], []
    try:
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            ids.append(np.asarray(b["id"], dtype=np.int64))
            xs.append(np.asarray(b["vector"]))
    except Exception as e:  # noqa: BLE001 - re-raise the pipeline error naming file and offset
        err = unwrap_ray_error(e)
        if err is e:
            raise
        raise err from None
    dim = inputs[0].dim
    ids_N = np.concatenate(ids) if ids else np.empty(0, np.int64)
    x_ND = np.concatenate(xs) if xs else np.empty((0, dim), np.float32)
    u = hash01(ids_N, plan.seed)

    def pick(mask: np.ndarray, n: int | None) -> np.ndarray:
        sel = np.nonzero(mask)[0]
        sel = sel[np.lexsort((ids_N[sel], u[sel]))[:n]]
        sel = sel[np.argsort(ids_N[sel], kind="stable")]
        return np.ascontiguousarray(x_ND[sel], dtype=np.float32)

    x_val, x_init = pick(u < plan.val_fraction, plan.n_val), pick(u >= plan.val_fraction, plan.n_init)
    if len(x_val) == 0 or len(x_init) == 0:
        raise ConfigError(f"too few vectors for a training and a validation sample ({plan.total} in all)")
    return x_val, x_init


def _torch_trainer(cfg: DistTrainConfig, qcfg: QincoConfig, tcfg: TrainConfig, inputs, plan: SplitPlan,
                   x_val: np.ndarray, lids_val, init_uri: str, init_s: float, options) -> TorchTrainer:
    """The Ray Train run: workers streaming the plan's training band, checkpoints under ``run_dir``."""
    steps_per_epoch = max(1, math.ceil(plan.n_train_estimate / tcfg.batch_size))
    ds = read_source(VectorDatasource(inputs, rows_per_task=cfg.rows_per_task, options=options, sample=plan.samples()[0]))
    ds.context.enable_progress_bars = False  # per-epoch progress is logged by rank 0 instead
    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    spare = (ray.cluster_resources().get("CPU", 0.0) if ray.is_initialized() else math.inf) \
        - cfg.workers * cfg.cpus_per_worker
    if spare < READ_TASK_CPUS:
        log.warning("the %d training workers reserve %.1f CPUs and leave %.1f for the read tasks that "
                    "stream their data: lower cpus_per_worker (and set threads_per_worker) unless "
                    "the cluster autoscales", cfg.workers, cfg.workers * cfg.cpus_per_worker, spare)
    fs, path = storage.get_pyarrow_fs(checkpoint_root(cfg), options)
    return TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "qinco": qcfg.to_dict(), "train": tcfg.to_dict(), "init_uri": init_uri, "options": options,
            "x_val": x_val, "lids_val": lids_val, "total_steps": tcfg.planned_steps(steps_per_epoch),
            "threads": cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker)), "use_gpu": use_gpu, "seed": tcfg.seed,
            "stop_after": cfg.stop_after_epochs, "init_s": init_s,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=cfg.run_name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": ds},
    )


def _fit(trainer: TorchTrainer, cfg: DistTrainConfig, tcfg: TrainConfig) -> dict:
    """Run (or resume) the Ray Train run; the trainer state of its last checkpoint."""
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - surface the pipeline error (file, offset) if there is one
        err = unwrap_ray_error(e)
        if err is e:
            raise
        raise err from None
    if result.checkpoint is None:
        raise CheckpointError(f"{storage.redact(run_dir(cfg))}: training produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = _load_state(os.path.join(d, STATE_FILE))
    for rec in state["history"]:
        log.info("epoch %d/%s: train MSE %.6g, val MSE %.6g%s, %.0f samples/s on %d worker(s), %.1f s",
                 rec["epoch"], "-" if tcfg.epochs is None else tcfg.epochs, rec["train_mse"], rec["val_mse"], " (best)" if rec.get("best") else "",
                 rec.get("samples_per_s_all_workers", rec["samples_per_s"]), rec.get("workers", 1),
                 rec.get("epoch_s_all_workers", rec["seconds"]))
    return state


def initial_model(cfg: DistTrainConfig, qcfg: QincoConfig, options=None) -> QINCo:
    """The model a run started from (normalisation, centroids, RQ codebooks), as stored in its
    run directory: a resumed run starts from the same point."""
    return model_from_state(qcfg, _load_init(storage.join(run_dir(cfg), INIT_FILE), options))


def run_distributed_training(cfg: DistTrainConfig, options=None) -> dict[str, Any]:
    """Train (or resume) a model on Ray Train; writes the model to ``cfg.out_uri``.

    Returns a summary: ``status`` ("trained", or "paused" after ``stop_after_epochs``),
    ``epochs_done``, ``best_epoch``, ``best_val_mse``, ``history`` (one record per epoch with
    train/val MSE, samples/s, seconds) and timings. Input problems raise before training starts:
    ``VectorFormatError`` / ``StorageError`` naming the file, ``ConfigError`` for a run directory
    holding another dimension or other hyper-parameters.
    """

    t0 = time.time()
    if cfg.workers < 1:
        raise ConfigError(f"workers must be >= 1, got {cfg.workers}")
    if cfg.stop_after_epochs is not None and cfg.stop_after_epochs < 1:
        raise ConfigError(f"stop_after_epochs must be >= 1, got {cfg.stop_after_epochs}")
    # Workers and read tasks may run where the driver's AWS_* variables are unknown.
    options = (options or storage.StorageOptions()).resolved()
    inputs = plan_inputs(cfg.data_uris, fmt=cfg.fmt, options=options, vector_column=cfg.vector_column,
                         id_column=cfg.id_column)
    dim = inputs[0].dim
    qd = dict(cfg.qinco)
    if qd.get("dim") not in (None, dim):
        raise ConfigError(f"{storage.redact(inputs[0].uri)}: data has dimension {dim}, the model "
                          f"config says {qd['dim']}")
    tcfg = TrainConfig.from_dict(cfg.train)
    inputs_desc = [i.to_dict() for i in inputs]
    for d in inputs_desc:
        d["uri"] = storage.redact(d["uri"])
    total = sum(i.count for i in inputs)
    if total <= tcfg.val_size:
        raise ConfigError(f"{storage.redact(inputs[0].uri)}: {total} vectors in all; need more than the "
                          f"{tcfg.val_size} validation vectors")
    # the split both trainers use (pipeline.train.setup): validation band first, training band after it
    plan = plan_split(total, tcfg, cfg.init_rows)
    if cfg.ivf_auto:
        n_init = plan.n_init if plan.n_init is not None else plan.n_train_estimate
        qd["nlist"], why = auto_nlist(total, n_init)
        log.info("IVF (--ivf auto): %s", why)
    recipe = None
    if cfg.preset == AUTO:
        qd.pop("dim", None)
        qcfg, tcfg, recipe = resolve_model(AUTO, dim, plan.n_train_estimate, qd, tcfg,
                                           frozenset(cfg.explicit_train), "cuda" if cfg.gpus_per_worker else "cpu")
        cfg = cfg.replace(qinco=qcfg.to_dict(), train=tcfg.to_dict())
    else:
        qd["dim"] = dim
        cfg = cfg.replace(qinco=qd)
        qcfg = QincoConfig.from_dict(qd)
    _check_or_record_run(cfg, inputs_desc, options)
    train_s, val_s = plan.samples()
    t = time.time()
    x_val, x_init = draw_samples(inputs, plan, cfg.rows_per_task, options, cfg.local_sample_bytes)
    x_val = prepare(x_val, qcfg.metric, "validation data")  # unit rows for cosine
    x_init = prepare(x_init, qcfg.metric, "initialisation data")
    sample_s = time.time() - t
    log.info("sampled %d validation and %d initialisation vectors from %d in %.1f s",
             len(x_val), len(x_init), total, sample_s)
    init_uri = storage.join(run_dir(cfg), INIT_FILE)
    t = time.time()
    if storage.exists(init_uri, options):
        model0 = initial_model(cfg, qcfg, options)
    else:
        log.info("initialising from %d vectors (normalisation, %sRQ codebooks)", len(x_init),
                 f"IVF k-means nlist={qcfg.nlist}, " if qcfg.nlist else "")
        model0 = init_model(qcfg, tcfg, x_init, cfg.ivf_niter)
        _save_init(model0, init_uri, options)
    init_s = time.time() - t
    lids_val = assign_lists(model0, x_val) if qcfg.nlist else None

    n_train_est = plan.n_train_estimate
    trainer = _torch_trainer(cfg, qcfg, tcfg, inputs, plan, x_val, lids_val, init_uri, init_s, options)
    log.info("training on %d worker(s): ~%d training vectors, %d validation, %s epochs, checkpoints in %s",
             cfg.workers, n_train_est, len(x_val),
             "until the budget or early stopping" if tcfg.epochs is None else tcfg.epochs,
             storage.redact(run_dir(cfg)))
    t = time.time()
    state = _fit(trainer, cfg, tcfg)
    history = state["history"]
    fit_s = time.time() - t
    finished = state["epoch"] >= tcfg.max_epochs or bool(history and history[-1].get("stop"))
    if not finished:
        log.info("stopped after epoch %d of %s as asked; re-run the same command to continue",
                 state["epoch"], "-" if tcfg.epochs is None else tcfg.epochs)
        return {"status": "paused", "epochs_done": state["epoch"], "history": history,
                "timings_s": {"sample": sample_s, "init": init_s, "fit": fit_s, "total": time.time() - t0}}

    model = model_from_state(qcfg, state["best_state"] if state.get("best_state") else state["model"])
    model.eval()
    t = time.time()
    fit_decoder(model, x_init, tcfg)
    decoder_s = time.time() - t
    summary = {
        "status": "trained",
        "epochs_done": state["epoch"],
        "best_epoch": state["best_epoch"],
        "best_val_mse": state["best_val"],
        "workers": cfg.workers,
        "code_bytes": qcfg.code_bytes,
        "timings_s": {"sample": sample_s, "init": init_s, "fit": fit_s, "additive_decoder": decoder_s,
                      "total": time.time() - t0},
        "history": history,
    }
    save_model(model, cfg.out_uri, metadata={
        "train_config": tcfg.to_dict(),
        "job_config": cfg.to_dict(),
        "provenance": {"inputs": [{k: d[k] for k in ("uri", "fmt", "count", "dim", "dtype", "header_sha256")}
                                  for d in inputs_desc],
                       "train_sample": train_s.to_dict(), "val_sample": val_s.to_dict(),
                       "n_train_estimate": n_train_est, "n_val": int(len(x_val)),
                       "n_init": int(len(x_init))},
        "metrics": summary,
        "recipe": recipe.to_dict() if recipe is not None else None,
    }, options=options)
    save_report(cfg.out_uri, {"job": "train", "mode": "ray-train", "config": cfg.to_dict(),
                              "train_config": tcfg.to_dict(), **summary}, options)
    log.info("model saved to %s (best val MSE %.6g at epoch %d)", storage.redact(cfg.out_uri),
             state["best_val"], state["best_epoch"])
    return summary
