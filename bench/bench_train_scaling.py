"""Ray Train data-parallel scaling of QINCo training: 1 vs 2 DDP workers on dwsift learn.

For each setting, runs ``run_distributed_training`` (fresh run directory) for a few epochs and
reads the per-epoch records (epoch time, samples/s over all workers, train/val MSE). Scaling
efficiency = samples/s with 2 workers / (2 x samples/s with 1 worker), each worker on one core
(one torch thread). A 1-worker run with 2 threads is added for context (the same two cores
used by intra-op threading instead of DDP). Faiss PQ and RQ at the same code size are trained
in the same process on the same training sample and scored on the same validation rows.

Prints a table and writes ``bench/out/train_scaling.json``.

    python bench/bench_train_scaling.py [--epochs 2] [--M 8] [--K 256]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.distributed.train import DistTrainConfig, run_distributed_training  # noqa: E402
from pipeline.codec.model import config_from_preset  # noqa: E402
from pipeline.io.inputs import plan_inputs, RowSample, sample_rows_local  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> list[float]:
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def _faiss_baselines(x_train: np.ndarray, x_val: np.ndarray, M: int, nbits: int) -> list[dict]:
    import faiss

    faiss.omp_set_num_threads(2)
    out = []
    for name, factory in (("PQ", f"PQ{M}x{nbits}"), ("RQ", f"RQ{M}x{nbits}")):
        index = faiss.index_factory(x_train.shape[1], factory)
        t0 = time.time()
        index.train(x_train)
        train_s = time.time() - t0
        codes = index.sa_encode(x_val)
        mse = float(((index.sa_decode(codes).astype(np.float64) - x_val) ** 2).sum(1).mean())
        out.append({"method": name, "factory": factory, "train_s": train_s, "val_mse": mse,
                    "train_rows": len(x_train)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="training vectors (default: dwsift learn.bvecs)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--M", type=int, default=8)
    ap.add_argument("--K", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--val", type=int, default=2000)
    ap.add_argument("--init-rows", type=int, default=20000,
                    help="rows for normalisation/RQ init and the additive decoder (not part of the timing)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "train_scaling.json"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = a.data or str(pathlib.Path(os.environ.get("QINCO_DATA_DIR", ROOT.parent / "shared" / "data"))
                         / "dwsift" / "learn.bvecs")
    if not os.path.exists(data):
        print(f"dataset not found: {data} (set QINCO_DATA_DIR)", file=sys.stderr)
        return 2
    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    load_start = _loadavg()
    qd = config_from_preset(a.preset, 1, M=a.M, K=a.K).to_dict()
    qd["dim"] = None
    tcfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, val_size=a.val, patience=a.epochs + 1,
                       additive_max_rows=a.init_rows)
    # (label, workers, torch threads per worker); each worker reserves 0.5 CPU so that one CPU of
    # the local Ray stays free for the read tasks streaming the data
    settings = [("1 worker x 1 thread", 1, 1), ("2 workers x 1 thread", 2, 1),
                ("1 worker x 2 threads", 1, 2)]
    runs = []
    work = tempfile.mkdtemp(prefix="bench_train_scaling_")
    try:
        for label, workers, threads in settings:
            out = os.path.join(work, f"w{workers}_t{threads}")
            t0 = time.time()
            s = run_distributed_training(DistTrainConfig(
                data_uris=[data], out_uri=out, qinco=qd, train=tcfg.to_dict(), workers=workers,
                cpus_per_worker=0.5, threads_per_worker=threads, init_rows=a.init_rows, fresh=True))
            wall = time.time() - t0
            eps = [{"epoch": h["epoch"], "epoch_s": h["epoch_s_all_workers"],
                    "samples": h["samples_all_workers"], "samples_per_s": h["samples_per_s_all_workers"],
                    "train_mse": h["train_mse"], "val_mse": h["val_mse"]} for h in s["history"]]
            runs.append({"setting": label, "workers": workers, "threads_per_worker": threads, "epochs": eps,
                         "samples_per_s": float(np.mean([e["samples_per_s"] for e in eps])),
                         "epoch_s": float(np.mean([e["epoch_s"] for e in eps])),
                         "best_val_mse": s["best_val_mse"], "fit_s": s["timings_s"]["fit"], "wall_s": wall,
                         "load_after": _loadavg()})
            print(f"{label}: {runs[-1]['samples_per_s']:.0f} samples/s, {runs[-1]['epoch_s']:.1f} s/epoch, "
                  f"val MSE {s['best_val_mse']:.0f}, fit {s['timings_s']['fit']:.0f} s", flush=True)
        # Faiss at the same code size, same training band and validation rows as the runs above
        inputs = plan_inputs([data])
        total = inputs[0].count
        val_frac = min(1.0, (a.val + 5 * a.val ** 0.5 + 16) / total)
        x_val = sample_rows_local(inputs, n=a.val, sample=RowSample(val_frac, 0, "val", val_frac)).astype(np.float32)
        x_tr = sample_rows_local(inputs, sample=RowSample(1 - val_frac, 0, "train", val_frac)).astype(np.float32)
        nbits = int(np.log2(a.K))
        faiss_rows = _faiss_baselines(x_tr, x_val, a.M, nbits)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()
    one, two = runs[0]["samples_per_s"], runs[1]["samples_per_s"]
    eff = two / (2 * one)
    result = {
        "benchmark": "train_scaling",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "load_start": load_start,
                    "load_end": _loadavg(), "gpu": None},
        "data": data, "rows": total, "dim": inputs[0].dim,
        "model": {**qd, "code_bytes": a.M * nbits / 8}, "train": tcfg.to_dict(),
        "runs": runs, "scaling_efficiency_2_workers": eff, "faiss": faiss_rows,
        "command": "python bench/bench_train_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print()
    print(f"| setting | samples/s | epoch s | best val MSE | fit s (incl. Ray Train start) |")
    print("|:--|--:|--:|--:|--:|")
    for r in runs:
        print(f"| {r['setting']} | {r['samples_per_s']:,.0f} | {r['epoch_s']:.1f} | {r['best_val_mse']:,.0f} "
              f"| {r['fit_s']:.0f} |")
    for b in faiss_rows:
        print(f"| Faiss {b['factory']} (train on {b['train_rows']:,} rows) | | | {b['val_mse']:,.0f} "
              f"| {b['train_s']:.1f} |")
    print(f"\nscaling efficiency (2 workers vs 1): {eff:.2f}; load average {load_start} -> {_loadavg()}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
