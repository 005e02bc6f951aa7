"""Distributed fitting on Ray Train: the codec's training loop under TorchTrainer (DDP).

Driver (``run_distributed_training``):

1. Reads only headers of the inputs (any supported format, local or S3), checks them, and
   refuses a run directory that holds a run with other hyper-parameters or data (unless
   ``fresh``).
2. Draws deterministic, disjoint train/validation samples (hash of the global row id, seeded):
   a driver-side sample initialises the model (normalisation, IVF centroids with Faiss k-means,
   RQ codebooks) and a held-out validation set that is never trained on.
3. Runs ``TorchTrainer`` with N workers (gloo on CPU, NCCL on GPU). Each worker streams its
   share of the training sample from object storage with ``ray.train.get_dataset_shard`` and runs
   :class:`pipeline.training.Trainer` with a DDP-wrapped model. Rank 0 checkpoints the full
   trainer state every epoch to ``<out>/checkpoints`` (``RunConfig(name, storage_path)``), so
   re-running the same command resumes at the next epoch; ``FailureConfig`` retries survive a
   worker that dies.
4. Loads the best model of the last checkpoint, fits the least-squares additive decoder on
   training codes, and saves the model directory with config, weights, normalisation,
   centroids, decoder, per-epoch metrics, code version and input provenance.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.config import JsonConfig, code_version
from pipeline.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

RUN_FILE = "qinco_run.json"
STATE_FILE = "trainer.pt"


@dataclass
class DistTrainConfig(JsonConfig):
    """One distributed training run (stored with the model and in the run directory)."""

    data_uris: list[str]
    out_uri: str
    qinco: dict[str, Any]            # QincoConfig.to_dict() (dim filled from the data)
    train: dict[str, Any]            # TrainConfig.to_dict()
    fmt: str | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    init_rows: int = 100_000         # driver-side sample for normalisation / IVF / RQ init
    rows_per_task: int = 65536
    ivf_niter: int = 20
    run_name: str = "train"
    fresh: bool = False
    max_failures: int = 2
    stop_after_epochs: int | None = None   # end this invocation after N epochs (resumable)
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self, inputs_desc: list[dict]) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        return {
            "inputs": [(d["uri"], d["count"], d["dim"], d["header_sha256"]) for d in inputs_desc],
            "fmt": self.fmt,
            "qinco": self.qinco,
            "train": self.train,
            "init_rows": self.init_rows,
        }


def _checkpoint_root(cfg: DistTrainConfig) -> str:
    return storage.join(cfg.out_uri, "checkpoints")


def _save_state(trainer, path: str) -> None:
    """Trainer state as a torch file loadable with ``weights_only=True``."""
    import torch

    state = trainer.state_dict()
    rng = state.get("rng") or {}
    state["rng"] = {"torch": rng["torch"]} if "torch" in rng else {}
    torch.save(state, path)


def _load_state(path: str) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _train_loop_per_worker(config: dict) -> None:
    """Body of every Ray Train worker."""
    import ray.train
    import torch
    import torch.distributed as dist

    from pipeline.qinco_model import QINCo, QincoConfig
    from pipeline.training import Trainer, TrainConfig

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    torch.manual_seed(config["seed"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    qcfg = QincoConfig.from_dict(config["qinco"])
    tcfg = TrainConfig.from_dict(config["train"])
    budget = tcfg.time_budget_s
    # The budget is enforced here at batch granularity, agreed across ranks; the Trainer's own
    # check would let ranks stop at different batches and deadlock DDP.
    tcfg_worker = tcfg.replace(time_budget_s=None)
    model = QINCo(qcfg)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in config["init_state"].items()})
    model.to(device)
    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)
    trainer = Trainer(model, tcfg_worker, device, ddp_model=ddp, total_steps=config["total_steps"])
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            trainer.load_state_dict(_load_state(os.path.join(d, STATE_FILE)))
        if rank == 0:
            print(f"[qinco] resuming at epoch {trainer.epoch + 1} from the last checkpoint", flush=True)
    x_val = np.asarray(config["x_val"], dtype=np.float32)
    lids_val = config.get("lids_val")
    shard = ray.train.get_dataset_shard("train")
    epochs_this_run = 0
    t_run = time.time() - trainer.time_used_s

    def agreed(flag: bool) -> bool:
        if world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    stopped_by_budget = False

    def batches(epoch: int):
        nonlocal stopped_by_budget
        it = shard.iter_batches(batch_size=tcfg.batch_size, batch_format="numpy",
                                local_shuffle_buffer_size=min(4 * tcfg.batch_size, 65536),
                                local_shuffle_seed=tcfg.seed * 1000 + epoch)
        for b in it:
            if agreed(budget is not None and time.time() - t_run >= budget):
                stopped_by_budget = True
                return
            yield b["vector"].astype(np.float32, copy=False)

    while trainer.epoch < tcfg.epochs:
        stats = trainer.train_epoch(batches(trainer.epoch))
        stats["stopped_by_budget"] = stopped_by_budget
        # gather throughput over ranks
        samples = stats["samples"]
        if world > 1:
            t = torch.tensor([float(samples)])
            dist.all_reduce(t)
            samples = int(t.item())
        val = trainer.validate(x_val, lids_val)
        rec = trainer.end_epoch(stats, val)
        rec["samples_all_workers"] = samples
        rec["samples_per_s_all_workers"] = samples / max(stats["seconds"], 1e-9)
        epochs_this_run += 1
        stop = agreed(bool(rec["stop"]) or stopped_by_budget or
                      (config["stop_after"] is not None and epochs_this_run >= config["stop_after"]))
        metrics = {"epoch": rec["epoch"], "train_mse": rec["train_mse"], "val_mse": rec["val_mse"],
                   "samples_per_s": rec["samples_per_s_all_workers"], "epoch_s": stats["seconds"],
                   "best_val_mse": trainer.best_val, "stop": stop}
        if rank == 0:
            print(f"[qinco] epoch {rec['epoch']}/{tcfg.epochs}: train MSE {rec['train_mse']:.6g}, "
                  f"val MSE {rec['val_mse']:.6g}{' (best)' if rec['best'] else ''}, "
                  f"{metrics['samples_per_s']:.0f} samples/s on {world} worker(s), "
                  f"{stats['seconds']:.1f} s", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                _save_state(trainer, os.path.join(tmp, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
        if stop:
            break


def _describe_inputs(inputs) -> list[dict]:
    return [i.to_dict() for i in inputs]


def _run_file(cfg: DistTrainConfig) -> str:
    return storage.join(_checkpoint_root(cfg), cfg.run_name, RUN_FILE)


def _check_or_record_run(cfg: DistTrainConfig, inputs_desc: list[dict], options) -> None:
    """Refuse to resume a run with different data or hyper-parameters (unless ``fresh``)."""
    path = _run_file(cfg)
    ident = json.loads(json.dumps(cfg.identity(inputs_desc)))
    if cfg.fresh:
        root = storage.join(_checkpoint_root(cfg), cfg.run_name)
        for f in storage.list_files(root, options):
            storage.remove(f, options)
    elif storage.exists(path, options):
        try:
            old = json.loads(storage.read_bytes(path, options))["identity"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{storage.redact(path)}: unreadable run record ({e})") from e
        if old != ident:
            diffs = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
            raise ConfigError(
                f"{storage.redact(_checkpoint_root(cfg))} holds a run with different {', '.join(diffs)}; "
                f"re-run with the same arguments to resume, or pass --fresh to start over")
        return
    storage.write_bytes_atomic(path, json.dumps({"identity": ident, "config": cfg.to_dict(),
                                                 "code_version": code_version()},
                                                indent=2, sort_keys=True).encode(), options)


def _init_model(qcfg, tcfg, x_init: np.ndarray, ivf_niter: int):
    """Normalisation, IVF centroids and RQ codebooks from the driver-side sample."""
    from pipeline.encoder import assign_lists
    from pipeline.ivf import IVFConfig, train_coarse_quantizer
    from pipeline.qinco_model import QINCo
    from pipeline.rq_init import init_from_rq

    model = QINCo(qcfg)
    model.set_normalisation(x_init)
    lids = None
    if qcfg.nlist:
        cent = train_coarse_quantizer(x_init, IVFConfig(nlist=qcfg.nlist, niter=ivf_niter, seed=tcfg.seed))
        model.set_centroids(cent)
        lids = assign_lists(model, x_init)
    init_from_rq(model, x_init, lids, max_points=tcfg.rq_max_points, niter=tcfg.rq_iters, seed=tcfg.seed)
    return model


def _save_init(model, path_uri: str, options) -> None:
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    storage.write_bytes_atomic(path_uri, blob, options)


def _load_init(path_uri: str, options) -> dict:
    from safetensors.torch import load

    return load(storage.read_bytes(path_uri, options))


def run_distributed_training(cfg: DistTrainConfig, options=None) -> dict[str, Any]:
    """Train (or resume) a model on Ray Train; returns a summary and writes the model."""
    import ray.train
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.additive_decoder import fit_additive_decoder
    from pipeline.checkpoint import save_model
    from pipeline.encoder import assign_lists, encode
    from pipeline.qinco_model import QINCo, QincoConfig
    from pipeline.ray_datasource import RowSample, VectorDatasource, plan_inputs, sample_rows_local
    from pipeline.training import TrainConfig

    t0 = time.time()
    inputs = plan_inputs(cfg.data_uris, fmt=cfg.fmt, options=options)
    dim = inputs[0].dim
    qd = dict(cfg.qinco)
    if qd.get("dim") not in (None, dim):
        raise ConfigError(f"{storage.redact(inputs[0].uri)}: data has dimension {dim}, the model "
                          f"config says {qd['dim']}")
    qd["dim"] = dim
    cfg = cfg.replace(qinco=qd)
    qcfg = QincoConfig.from_dict(qd)
    tcfg = TrainConfig.from_dict(cfg.train)
    inputs_desc = _describe_inputs(inputs)
    total = sum(i.count for i in inputs)
    if cfg.workers < 1:
        raise ConfigError(f"workers must be >= 1, got {cfg.workers}")
    _check_or_record_run(cfg, inputs_desc, options)

    # deterministic disjoint samples: validation band first, training band after it
    val_frac = min(0.5, max(1.0 / max(total, 1), 2.0 * tcfg.val_size / max(total, 1)))
    want_train = tcfg.max_train or total
    train_frac = min(1.0 - val_frac, want_train / max(total, 1) * 1.02)
    train_s, val_s = RowSample.pair(train_frac, val_frac, seed=tcfg.seed)
    root = storage.join(_checkpoint_root(cfg), cfg.run_name)
    t = time.time()
    x_val = sample_rows_local(inputs, n=tcfg.val_size, sample=val_s, options=options).astype(np.float32)
    if len(x_val) == 0:
        raise ConfigError("no validation vectors: the input is too small")
    init_uri = storage.join(root, "init_model.safetensors")
    x_init = None
    if storage.exists(init_uri, options):
        init_state = _load_init(init_uri, options)
    else:
        x_init = sample_rows_local(inputs, n=min(cfg.init_rows, int(want_train)), sample=train_s,
                                   options=options).astype(np.float32)
        log.info("initialising from %d sampled vectors (normalisation, %sRQ codebooks)", len(x_init),
                 f"IVF k-means nlist={qcfg.nlist}, " if qcfg.nlist else "")
        model0 = _init_model(qcfg, tcfg, x_init, cfg.ivf_niter)
        _save_init(model0, init_uri, options)
        init_state = {k: v.detach().cpu() for k, v in model0.state_dict().items()}
    init_s = time.time() - t
    lids_val = None
    if qcfg.nlist:
        m_tmp = QINCo(qcfg)
        m_tmp.load_state_dict(init_state)
        lids_val = assign_lists(m_tmp, x_val)

    n_train_est = int(round(train_frac * total))
    steps_per_epoch = max(1, math.ceil(n_train_est / cfg.workers / tcfg.batch_size))
    ds = ray.data.read_datasource(VectorDatasource(inputs, rows_per_task=cfg.rows_per_task,
                                                   options=options, sample=train_s))
    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    fs, path = storage.get_pyarrow_fs(_checkpoint_root(cfg), options)
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "qinco": qcfg.to_dict(), "train": tcfg.to_dict(),
            "init_state": {k: v.numpy() for k, v in init_state.items()},
            "x_val": x_val, "lids_val": lids_val, "total_steps": tcfg.epochs * steps_per_epoch,
            "threads": max(1, int(cfg.cpus_per_worker)), "use_gpu": use_gpu, "seed": tcfg.seed,
            "stop_after": cfg.stop_after_epochs,
        },
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=cfg.run_name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": ds},
    )
    t = time.time()
    result = trainer.fit()
    fit_s = time.time() - t
    if result.checkpoint is None:
        raise CheckpointError(f"{storage.redact(root)}: training produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = _load_state(os.path.join(d, STATE_FILE))
    history = state["history"]
    finished = state["epoch"] >= tcfg.epochs or bool(history and history[-1].get("stop"))
    if not finished:
        log.info("stopped after epoch %d of %d as asked; re-run the same command to continue",
                 state["epoch"], tcfg.epochs)
        return {"status": "paused", "epochs_done": state["epoch"], "history": history, "fit_s": fit_s}

    model = QINCo(qcfg)
    model.load_state_dict(state["best_state"] if state.get("best_state") else state["model"])
    model.eval()
    t = time.time()
    if tcfg.fit_additive:
        if x_init is None:
            x_init = sample_rows_local(inputs, n=min(cfg.init_rows, int(want_train)), sample=train_s,
                                       options=options).astype(np.float32)
        xa = x_init[:tcfg.additive_max_rows]
        la = assign_lists(model, xa) if qcfg.nlist else None
        codes, la = encode(model, xa, la)
        cent = model.centroids_LD.cpu().numpy() if qcfg.nlist else None
        model.set_additive_codebooks(fit_additive_decoder(codes, xa, qcfg.K, la, cent, ridge=tcfg.ridge))
    decoder_s = time.time() - t
    summary = {
        "status": "trained",
        "epochs_done": state["epoch"],
        "best_epoch": state["best_epoch"],
        "best_val_mse": state["best_val"],
        "workers": cfg.workers,
        "timings_s": {"init": init_s, "fit": fit_s, "additive_decoder": decoder_s, "total": time.time() - t0},
        "history": history,
    }
    save_model(model, cfg.out_uri, metadata={
        "train_config": tcfg.to_dict(),
        "job_config": cfg.to_dict(),
        "provenance": {"inputs": [{k: d[k] for k in ("uri", "fmt", "count", "dim", "dtype", "header_sha256")}
                                  for d in inputs_desc],
                       "train_sample": train_s.to_dict(), "val_sample": val_s.to_dict(),
                       "n_val": int(len(x_val))},
        "metrics": summary,
    }, options=options)
    log.info("model saved to %s (best val MSE %.6g at epoch %d)", storage.redact(cfg.out_uri),
             state["best_val"], state["best_epoch"])
    return summary


__all__ = ["DistTrainConfig", "run_distributed_training"]
