"""In-process training job: vector files -> a saved model, without Ray.

What ``qinco train`` runs without ``--workers``: read up to ``max_train + val`` vectors from the
files in order, hold out a seeded random validation split, train with
:func:`pipeline.train.loop.train_model` (normalisation, optional IVF, RQ initialisation, the loop,
additive decoder) and save the model directory with its training history and data provenance.
``--workers N`` runs the same loop on Ray Train instead (:mod:`pipeline.distributed.train`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from pipeline.io import storage, vectors
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def read_training_vectors(data_uris: list[str], limit: int | None, options=None) -> np.ndarray:
    """The first ``limit`` vectors (all when None) of the files, in order, as float32."""
    parts: list[np.ndarray] = []
    for uri in data_uris:
        rows = None if limit is None else limit - sum(len(p) for p in parts)
        if rows is not None and rows <= 0:
            break
        parts.append(vectors.read_vectors(uri, options=options, max_rows=rows).astype(np.float32))
    return np.concatenate(parts)


def run_train(data_uris: list[str], out_uri: str, qcfg_overrides: dict[str, Any], preset: str, tcfg,
              device: str = "cpu", options=None, echo: Callable[[str], None] = print) -> list[dict]:
    """Train and save a model; returns the per-epoch history (epoch 0 = RQ initialisation)."""
    import time

    from pipeline.codec.model_file import save_model, save_report
    from pipeline.codec.model import config_from_preset
    from pipeline.train.loop import train_model

    t0 = time.time()
    limit = None if tcfg.max_train is None else tcfg.max_train + tcfg.val_size
    x = read_training_vectors(data_uris, limit, options)
    if len(x) <= tcfg.val_size:
        raise ConfigError(f"{storage.redact(data_uris[0])}: {len(x)} vectors; need more than "
                          f"the {tcfg.val_size} held out for validation")
    perm = np.random.default_rng(tcfg.seed).permutation(len(x))
    x_val, x_train = x[np.sort(perm[:tcfg.val_size])], x[np.sort(perm[tcfg.val_size:])]
    qcfg = config_from_preset(preset, x.shape[1], **qcfg_overrides)
    echo(f"training {preset} ({qcfg.code_bytes:g} bytes/vector) on {len(x_train)} vectors, "
         f"validating on {len(x_val)}")

    def progress(rec: dict, trainer) -> None:
        if rec.get("rq_init"):
            echo(f"epoch 0 (RQ init): val MSE {rec['val_mse']:.6g}")
            return
        echo(f"epoch {rec['epoch']}: {rec['samples_per_s']:.0f} samples/s, {rec['seconds']:.1f} s, "
             f"train MSE {rec['train_mse']:.6g}, val MSE {rec['val_mse']:.6g}{' *' if rec['best'] else ''}")

    read_s = time.time() - t0
    model, history = train_model(x_train, x_val, qcfg, tcfg, device=device, on_epoch_end=progress)
    train_s = time.time() - t0 - read_s
    meta = {"train_config": tcfg.to_dict(), "preset": preset, "history": history,
            "data": {"uris": [storage.redact(u) for u in data_uris], "rows_read": int(len(x)),
                     "train_rows": int(min(len(x_train), tcfg.max_train or len(x_train))),
                     "val_rows": int(len(x_val)), "split_seed": tcfg.seed}}
    save_model(model, out_uri, metadata=meta, options=options)
    best = min(history, key=lambda h: h["val_mse"])
    save_report(out_uri, {"job": "train", "mode": "in-process", "preset": preset, "config": qcfg.to_dict(),
                          "train_config": tcfg.to_dict(), "data": meta["data"],
                          "best_val_mse": best["val_mse"], "best_epoch": best.get("epoch", 0),
                          "epochs_done": max(h.get("epoch", 0) for h in history),
                          "timings_s": {"read": read_s, "train": train_s, "total": time.time() - t0},
                          "history": history}, options)
    echo(f"saved model to {storage.redact(out_uri)} (best val MSE {best['val_mse']:.6g})")
    return history
