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

import numpy as np

from pipeline.codec.ivf import auto_nlist
from pipeline.codec.model_file import save_model, save_report
from pipeline.errors import ConfigError
from pipeline.io import storage
from pipeline.io.inputs import plan_inputs
from pipeline.train.loop import train_model
from pipeline.progress import Progress, training_progress
from pipeline.train.recipe import resolve_model
from pipeline.train.setup import INIT_ROWS, plan_split, read_split_local, sample_extra_rows

log = logging.getLogger(__name__)


def run_train(data_uris: list[str], out_uri: str, qcfg_overrides: dict[str, Any], preset: str, tcfg,
              device: str = "cpu", options=None, echo: Callable[[str], None] = print,
              explicit_train: frozenset[str] = frozenset(), sample_from: list[str] | None = None,
              sample_size: int | None = None, ivf_auto: bool = False,
              columns: tuple[str | None, str | None] = (None, None)) -> list[dict]:
    """Train and save a model; returns the per-epoch history (epoch 0 = RQ initialisation).

    ``preset="auto"`` trains the recipe :func:`pipeline.train.recipe.choose_recipe` picks from
    the data (the fields of ``tcfg`` named in ``explicit_train`` and the non-None
    ``qcfg_overrides`` win over it). ``sample_from`` adds up to ``sample_size`` rows of those
    files (all when None) to the training rows, never a row equal to a validation row.
    ``ivf_auto`` chooses the IVF lists from the vectors of ``data_uris`` and ``sample_from``
    (:func:`pipeline.codec.ivf.auto_nlist`) in place of ``qcfg_overrides["nlist"]``. ``columns``:
    the parquet vector and id columns (None: ``vector`` and ``id``)."""
    t0 = time.time()
    inputs = plan_inputs(data_uris, options=options, vector_column=columns[0], id_column=columns[1])
    total = sum(i.count for i in inputs)
    if total <= tcfg.val_size:
        raise ConfigError(f"{storage.redact(data_uris[0])}: {total} vectors; need more than "
                          f"the {tcfg.val_size} held out for validation")
    # the rows `--workers N` trains on (pipeline.train.setup)
    plan = plan_split(total, tcfg)
    x_val, x_init, x_train = read_split_local(inputs, plan, options)
    data = {"uris": [storage.redact(u) for u in data_uris], "rows": int(total),
            "train_rows": int(min(len(x_train), tcfg.max_train or len(x_train))),
            "val_rows": int(len(x_val)), "split": plan.to_dict()}
    if sample_from:
        extra_inputs = plan_inputs(sample_from, options=options, vector_column=columns[0], id_column=columns[1])
        if extra_inputs[0].dim != inputs[0].dim:
            raise ConfigError(f"{storage.redact(sample_from[0])}: vectors of dimension {extra_inputs[0].dim}, "
                              f"the training data has {inputs[0].dim}")
        x_extra, drawn = sample_extra_rows(extra_inputs, x_val, sample_size, tcfg.seed, options)
        x_train = np.concatenate([x_train, x_extra])
        # the set-up sample (normalisation, k-means, RQ) is topped up with sampled rows, to INIT_ROWS in all
        room = max(0, INIT_ROWS - len(x_init))
        pick = np.random.default_rng(tcfg.seed).permutation(len(x_extra))[:room]
        x_init = np.concatenate([x_init, x_extra[np.sort(pick)]])
        data["sample_from"] = {"uris": [storage.redact(u) for u in sample_from], "rows": len(x_extra), **drawn}
        data["train_rows"] += len(x_extra)
    data["init_rows"] = int(len(x_init))
    ivf_why = None
    if ivf_auto:
        n_index = total + (sum(i.count for i in extra_inputs) if sample_from else 0)
        nlist, ivf_why = auto_nlist(n_index, len(x_init))
        qcfg_overrides = {**qcfg_overrides, "nlist": nlist}
    qcfg, tcfg, recipe = resolve_model(preset, inputs[0].dim, data["train_rows"], qcfg_overrides, tcfg,
                                       explicit_train, device)
    echo(f"training {preset} ({qcfg.code_bytes:g} bytes/vector) on {data['train_rows']} vectors, "
         f"validating on {len(x_val)}")
    if ivf_why is not None:
        echo(f"  IVF (--ivf auto): {ivf_why}")
    if recipe is not None:
        for what, why in recipe.reasons.items():
            echo(f"  {what}: {why}")
        if recipe.overridden:
            echo(f"  given instead of the recipe's: {recipe.overridden}")

    # a bar over the epochs, or over the seconds of a time budget (the epochs it allows are unknown)
    bar = training_progress(tcfg.epochs, tcfg.time_budget_s) or Progress(0, "epochs", "train")

    def progress(rec: dict, trainer) -> None:
        if rec.get("rq_init"):
            echo(f"epoch 0 (RQ init): val MSE {rec['val_mse']:.6g}")
            return
        echo(f"epoch {rec['epoch']}: {rec['samples_per_s']:.0f} samples/s, {rec['seconds']:.1f} s, "
             f"train MSE {rec['train_mse']:.6g}, val MSE {rec['val_mse']:.6g}{' *' if rec['best'] else ''}")
        step = 1 if bar.unit == "epochs" else min(bar.total - bar.done, int(trainer.time_used_s) - bar.done)
        bar.update(max(0, step), samples_per_s=f"{rec['samples_per_s']:.0f}", val_mse=f"{rec['val_mse']:.4g}")

    read_s = time.time() - t0
    # the band already holds about max_train rows, all of which the Ray Train workers use too
    with bar:
        model, history = train_model(x_train, x_val, qcfg, tcfg.replace(max_train=None), device=device,
                                     on_epoch_end=progress, x_init_ND=x_init)
    train_s = time.time() - t0 - read_s
    meta = {"train_config": tcfg.to_dict(), "preset": preset, "history": history, "data": data,
            "recipe": recipe.to_dict() if recipe is not None else None, "ivf_auto": ivf_why}
    save_model(model, out_uri, metadata=meta, options=options)
    best = min(history, key=lambda h: h["val_mse"])
    save_report(out_uri, {"job": "train", "mode": "in-process", "preset": preset, "config": qcfg.to_dict(),
                          "train_config": tcfg.to_dict(), "data": data, "recipe": meta["recipe"],
                          "best_val_mse": best["val_mse"], "best_epoch": best.get("epoch", 0),
                          "epochs_done": max(h.get("epoch", 0) for h in history),
                          "timings_s": {"read": read_s, "train": train_s, "total": time.time() - t0},
                          "history": history}, options)
    echo(f"saved model to {storage.redact(out_uri)} (best val MSE {best['val_mse']:.6g})")
    return history
