"""The RQ initialisation of a QINCo model against Faiss RQ trained on the same vectors.

For each dataset and code size: the first ``--n-train`` learn vectors set up a model
(``pipeline.train.setup.init_model``: normalisation, Faiss ``ResidualQuantizer`` codebooks with
beam 5) and train Faiss RQ (``RQ{M}x8``, beam 5, the baseline of ``bench_baselines.py``); both
encode and decode the last ``--n-val`` learn vectors. Prints a table and writes
``bench/out/rq_init.json``.

    python bench/bench_rq_init.py [--datasets debdesc384 dwsift glove50] [--bytes 8 16] [--n-train 20000]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pipeline.codec.decoder import decode, reconstruction_mse  # noqa: E402
from pipeline.codec.encoder import encode  # noqa: E402
from pipeline.codec.model import config_from_preset  # noqa: E402
from pipeline.io import storage, vectors  # noqa: E402
from pipeline.stages.baselines import format_table, make_quantizer  # noqa: E402
from pipeline.stages.datasets import resolve_dataset  # noqa: E402
from pipeline.sysinfo import machine_info  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.setup import init_model  # noqa: E402


COLUMNS = ("dataset", "bytes", "n_train", "faiss_rq_mse", "init_mse", "x_faiss_rq", "faiss_rq_s", "init_s")


def one_row(name: str, nbytes: int, x_tr: np.ndarray, x_val: np.ndarray, preset: str) -> dict:
    t = time.perf_counter()
    rq = make_quantizer("RQ", nbytes, x_tr.shape[1])
    rq.train(x_tr)
    mse_rq = reconstruction_mse(x_val, rq.sa_decode(rq.sa_encode(x_val)))
    rq_s = time.perf_counter() - t
    t = time.perf_counter()
    model = init_model(config_from_preset(preset, x_tr.shape[1], M=nbytes), TrainConfig(), x_tr)
    init_s = time.perf_counter() - t
    codes, lids = encode(model, x_val)
    mse = reconstruction_mse(x_val, decode(model, codes, lids))
    return {"dataset": name, "bytes": nbytes, "n_train": len(x_tr), "faiss_rq_mse": mse_rq, "init_mse": mse,
            "x_faiss_rq": mse / mse_rq, "faiss_rq_s": rq_s, "init_s": init_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["debdesc384", "dwsift", "glove50"])
    ap.add_argument("--bytes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-val", type=int, default=2000)
    ap.add_argument("--preset", default="cpu", help="the model's architecture (its encoding beam)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(HERE / "out" / "rq_init.json"))
    a = ap.parse_args(argv)
    rows = []
    for name in a.datasets:
        ds = resolve_dataset(name, a.data_dir)
        learn = vectors.read_vectors(ds.learn).astype(np.float32)
        x_tr, x_val = learn[:a.n_train], learn[-a.n_val:]
        for nb in a.bytes:
            rows.append(one_row(name, nb, x_tr, x_val, a.preset))
            print(format_table(rows[-1:], COLUMNS), flush=True)
    print(format_table(rows, COLUMNS))
    report = {"command": "python bench/bench_rq_init.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
              "machine": machine_info(), "args": vars(a), "rows": rows}
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(a.out, json.dumps(report, indent=2).encode())
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
