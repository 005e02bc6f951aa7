"""The GPU path in a few minutes: encoder vectors/s per GPU by batch size, the encode job with
``--gpus-per-worker 1`` on 10M generated vectors, and Ray Train samples/s per GPU.

Prepared to run as one short command on a lent GPU machine (no network, no datasets needed):

    python bench/bench_gpu.py --out $OUT/gpu.json [--n-job 10000000] [--skip-job] [--skip-train]

1. a model: ``qinco train --epochs 0`` (RQ initialisation, IVF) on 200,000 generated SIFT-like
   vectors; encoding cost does not depend on the trained weights;
2. the encoder in process on the GPU (float16), at each ``--batch`` size, for the fast setting
   (A=16, B=1) and the model's own A and B: vectors/s over ``--n-encode`` vectors;
3. ``qinco encode --workers 1 --gpus-per-worker 1`` on ``--n-job`` vectors from a local .u8bin:
   the job's vectors/s (reads, IVF assignment, shard writes and commit included);
4. ``qinco train --workers 1 --gpus-per-worker 1`` for 2 epochs: samples/s from its report.

Each figure is printed as it is measured and the JSON is rewritten after each stage, so a run
cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import scale_data  # noqa: E402

from pipeline.codec import encoder  # noqa: E402
from pipeline.codec.model_file import load_model  # noqa: E402
from pipeline.index.manifest import current_version, version_dir  # noqa: E402
from pipeline.io import vectors  # noqa: E402
from pipeline.sysinfo import machine_info  # noqa: E402


def qinco(args: list[str], log: pathlib.Path, timeout: float) -> float:
    """Run the ``qinco`` command; returns its wall seconds (fails loudly with the log's tail)."""
    t = time.perf_counter()
    with open(log, "wb") as f:
        rc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, stdout=f,
                            stderr=subprocess.STDOUT, timeout=timeout).returncode
    if rc:
        raise RuntimeError(f"qinco {args[0]} failed (rc {rc}): {log.read_text(errors='replace')[-2000:]}")
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu.json"))
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--bytes", type=int, default=8)
    ap.add_argument("--nlist", type=int, default=4096)
    ap.add_argument("--batch", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--n-encode", type=int, default=1_000_000)
    ap.add_argument("--train-rows", type=int, default=200_000)
    ap.add_argument("--n-job", type=int, default=10_000_000)
    ap.add_argument("--skip-job", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only checks the script with small sizes")
    a = ap.parse_args(argv)
    gpu = a.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py measures the GPU path: no CUDA device is visible")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    gpus = ["--gpus-per-worker", "1"] if gpu else []
    work = pathlib.Path(a.work or tempfile.mkdtemp(prefix="qinco-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    out_path = pathlib.Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": machine_info(), "gpu": torch.cuda.get_device_name(0) if gpu else None, "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "encoder": [], "stages": {}}

    def save() -> None:
        out_path.write_text(json.dumps(res, indent=2, sort_keys=True))

    anchors_AD, res["anchors"] = scale_data.anchors(0)
    train = work / "train.u8bin"
    vectors_train = scale_data.rows(anchors_AD, 0, (1 << 30) * scale_data.BLOCK, (1 << 30) * scale_data.BLOCK + a.train_rows)
    vectors.write_vectors(str(train), vectors_train)
    model_dir = work / "model"
    res["stages"]["model_s"] = qinco(["train", "--data", str(train), "--out", str(model_dir), "--preset", "cpu",
                                      "--bytes", str(a.bytes), "--ivf", str(a.nlist), "--epochs", "0"],
                                     work / "model.log", 900)
    model = load_model(str(model_dir), device=a.device)
    x = scale_data.rows(anchors_AD, 0, 0, a.n_encode).astype(np.float32)
    lists = encoder.assign_lists(model, x)
    for A, B in ((16, 1), (model.config.A, model.config.B)):
        for batch in a.batch:
            encoder.encode(model, x[:batch], lists[:batch], batch_size=batch, device=a.device, A=A, B=B)  # warm-up
            sync()
            t = time.perf_counter()
            encoder.encode(model, x, lists, batch_size=batch, device=a.device, A=A, B=B)
            sync()
            vps = len(x) / (time.perf_counter() - t)
            res["encoder"].append({"A": A, "B": B, "batch": batch, "vectors": len(x), "vectors_per_s": vps,
                                   "max_memory_GB": torch.cuda.max_memory_allocated() / 1e9 if gpu else None})
            print(f"encoder A={A} B={B} batch {batch}: {vps:,.0f} vectors/s", flush=True)
            save()
    if not a.skip_job:
        base = work / "base.u8bin"
        scale_data.write(str(base), a.n_job, 0, anchors_AD)
        wall = qinco(["encode", "--model", str(model_dir), "--data", str(base), "--out", str(work / "index"),
                      "--workers", "1", *gpus, "--cpus-per-worker", str(max(1, os.cpu_count() // 2)),
                      "--A", "16", "--B", "1", "--shard-rows", "1048576"], work / "encode.log", 1800)
        index = str(work / "index")
        rep = json.loads((pathlib.Path(version_dir(index, current_version(index))) / "report.json").read_text())
        res["stages"]["encode_job"] = {"vectors": a.n_job, "wall_s": wall, "vectors_per_s": rep.get("vectors_per_s")}
        print(f"encode job: {a.n_job:,} vectors in {wall:.0f} s ({rep.get('vectors_per_s') or 0:,.0f} vectors/s "
              "in the encode stage)", flush=True)
        save()
    if not a.skip_train:
        wall = qinco(["train", "--data", str(train), "--out", str(work / "model_ddp"), "--preset", "cpu",
                      "--bytes", str(a.bytes), "--workers", "1", *gpus, "--epochs", "2",
                      "--batch-size", "8192"], work / "train.log", 1200)
        rep = json.loads((work / "model_ddp" / "report.json").read_text())
        res["stages"]["train_ddp"] = {"wall_s": wall, "report": {k: rep[k] for k in rep
                                                                 if "samples" in k or k.endswith("_s")}}
        print(f"train: {wall:.0f} s, {res['stages']['train_ddp']['report']}", flush=True)
        save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
