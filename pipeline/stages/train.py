"""In-process training job: vector files -> a saved model, without Ray.

What ``qinco train`` runs without ``--workers``: read the validation, initialisation and training
rows of the split both trainers use (:mod:`pipeline.train.setup`: bands of a hash of each row's
global id), train with
:func:`pipeline.train.loop.train_model` (normalisation, optional IVF, RQ initialisation, the loop,
additive decoder) and save the model directory with its training history and data provenance.
``--workers N`` runs the same loop on Ray Train instead (:mod:`pipeline.distributed.train`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from pipeline.codec.model import config_from_preset
from pipeline.codec.model_file import save_model, save_report
from pipeline.errors import ConfigError
from pipeline.io import storage
from pipeline.io.inputs import plan_inputs
from pipeline.train.loop import train_model
from pipeline.train.setup import plan_split, read_split_local

log = logging.getLogger(__name__)


def run_train(data_uris: list[str], out_uri: str, qcfg_overrides: dict[str, Any], preset: str, tcfg,
              device: str = "cpu", options=None, echo: Callable[[str], None] = print) -> list[dict]:
    """Train and save a model; returns the per-epoch history (epoch 0 = RQ initialisation)."""
    t0 = time.time()
    inputs = plan_inputs(data_uris, options=options)
    total = sum(i.count for i in inputs)
    if total <= tcfg.val_size:
        raise ConfigError(f"{storage.redact(data_uris[0])}: {total} vectors; need more than "
                          f"the {tcfg.val_size} held out for validation")
    # the rows `--workers N` trains on (pipeline.train.setup)
    plan = plan_split(total, tcfg)
    x_val, x_init, x_train = read_split_local(inputs, plan, options)
    qcfg = config_from_preset(preset, inputs[0].dim, **qcfg_overrides)
    echo(f"training {preset} ({qcfg.code_bytes:g} bytes/vector) on {len(x_train)} vectors, "
         f"validating on {len(x_val)}")

    def progress(rec: dict, trainer) -> None:
        if rec.get("rq_init"):
            echo(f"epoch 0 (RQ init): val MSE {rec['val_mse']:.6g}")
            return
        echo(f"epoch {rec['epoch']}: {rec['samples_per_s']:.0f} samples/s, {rec['seconds']:.1f} s, "
             f"train MSE {rec['train_mse']:.6g}, val MSE {rec['val_mse']:.6g}{' *' if rec['best'] else ''}")

    read_s = time.time() - t0
    # the band already holds about max_train rows, all of which the Ray Train workers use too
    model, history = train_model(x_train, x_val, qcfg, tcfg.replace(max_train=None), device=device,
                                 on_epoch_end=progress, x_init_ND=x_init)
    train_s = time.time() - t0 - read_s
    meta = {"train_config": tcfg.to_dict(), "preset": preset, "history": history,
            "data": {"uris": [storage.redact(u) for u in data_uris], "rows": int(total),
                     "train_rows": int(min(len(x_train), tcfg.max_train or len(x_train))),
                     "val_rows": int(len(x_val)), "init_rows": int(len(x_init)), "split": plan.to_dict()}}
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
