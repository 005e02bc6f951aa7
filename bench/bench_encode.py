"""Encode-job throughput and memory on dwsift, beside Faiss IVF-PQ / IVF-RQ ``index.add``.

Measures, on this machine:

- vectors/s of the whole Ray encode job (``pipeline.stages.encode.run_encode``: byte-range reads,
  actor pool, shard writes, manifest commit) with 1 and 2 workers on the first N rows of the
  dwsift base, and with 2 workers on the whole base (10·N rows);
- peak resident memory of every encode actor (``VmHWM``, reported by the actors) at N and 10·N
  vectors: it must not grow with the collection (each actor holds one range at a time);
- Faiss ``IndexIVFPQ`` and ``IndexIVFResidualQuantizer`` ``add`` throughput (same nlist, same
  code bytes, trained on the same rows) on the same data in the same process, 1 and 2 threads;
- an extrapolation to 1 billion vectors: wall time and machine count on CPUs (from the
  measured per-vector cost) and on GPUs (a FLOP-count estimate: no GPU was measured).

Writes ``bench/out/encode.json`` and the "Encode job" section of ``bench/RESULTS.md``.

    .venv/bin/python bench/bench_encode.py [--n-small 22383] [--shard-rows 4096]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import time

import numpy as np

from pipeline.io import storage, vectors
from pipeline.sysinfo import machine_info
from pipeline.config import code_version
from pipeline.codec.model import PRESETS, QincoConfig, config_from_preset, encode_flops_per_vector

log = logging.getLogger("bench_encode")

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_md import update_section  # noqa: E402
BEGIN = "<!-- section: encode-job (bench/bench_encode.py) -->"
END = "<!-- end section: encode-job -->"

# Dense FP16/BF16 tensor-core peak of one H100 SXM (NVIDIA datasheet, without sparsity) and the
# fraction of it assumed reachable by the encoder's small matmuls, top-k and gathers.
H100_PEAK_FLOPS = 989e12
GPU_EFFICIENCY = 0.15
BILLION = 1_000_000_000
DWSIFT_BASE_ROWS = 223_825


# --------------------------------------------------------------------------- helpers
def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def get_model(model_dir: pathlib.Path, learn: str, args) -> tuple[str, dict]:
    """The benchmark's IVF-QINCo2 model: loaded from ``model_dir`` or RQ-initialised there."""
    from pipeline.codec.model_file import load_model, save_model
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import train_model

    uri = str(model_dir)
    if not (model_dir / "config.json").exists():
        x = vectors.read_rows(learn, 0, args.val + args.train_rows).astype(np.float32)
        qcfg = config_from_preset(args.preset, x.shape[1], M=args.M, K=args.K, nlist=args.nlist)
        tcfg = TrainConfig(epochs=0, val_size=args.val, rq_iters=args.rq_iters,
                           additive_max_rows=args.additive_rows, num_threads=2)
        t0 = time.perf_counter()
        model, hist = train_model(x[args.val:], x[:args.val], qcfg, tcfg)
        save_model(model, uri, metadata={"train": "RQ initialisation only (0 epochs)",
                                         "train_rows": len(x) - args.val, "val_mse": hist[0].get("val_mse")})
        log.info("built the model in %.1f s", time.perf_counter() - t0)
    model = load_model(uri)
    info = json.loads((model_dir / "config.json").read_text())
    return uri, {"config": model.config.to_dict(), "code_bytes": model.config.code_bytes,
                 "metadata": info.get("metadata", {})}


def run_job(model_uri: str, data: str, index: str, workers: int, shard_rows: int) -> dict:
    """One encode job in a fresh local Ray (fresh actor processes, so their peak RSS is theirs)."""
    import ray

    from pipeline.stages.encode import EncodeJobConfig, run_encode

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # one logical CPU per actor plus one for the byte-range read tasks (light: I/O and a copy)
    ray.init(address="local", num_cpus=workers + 1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        load0 = load_avg()
        t0 = time.perf_counter()
        rep = run_encode(EncodeJobConfig(model_uri=model_uri, data_uris=[data], index_uri=index,
                                         workers=workers, cpus_per_worker=1.0, shard_rows=shard_rows))
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    rss = list(rep["actor_peak_rss_bytes"].values())
    return {"workers": workers, "vectors": rep["vectors"], "shards": rep["shards"],
            "wall_s": wall, "encode_stage_s": rep["stages"]["encode_s"],
            "job_vps": rep["vectors"] / wall, "encode_stage_vps": rep["vectors_per_s"],
            "actors": len(rss), "peak_rss_mb": [r / 2 ** 20 for r in rss],
            "max_peak_rss_mb": max(rss) / 2 ** 20 if rss else None,
            "bytes_out": rep["bytes_out"], "load_before": load0, "load_after": load_avg()}


def faiss_add(xt: np.ndarray, xb: np.ndarray, nlist: int, M: int, nbits: int, threads: list[int]) -> list[dict]:
    """Train IVF-PQ and IVF-RQ (same nlist and code bytes) on ``xt``; time ``add`` of ``xb``."""
    import faiss

    rows = []
    for name, factory in (("IVF-PQ", f"IVF{nlist},PQ{M}x{nbits}"), ("IVF-RQ", f"IVF{nlist},RQ{M}x{nbits}")):
        faiss.omp_set_num_threads(max(threads))
        index = faiss.index_factory(xt.shape[1], factory)
        t0 = time.perf_counter()
        index.train(xt)
        train_s = time.perf_counter() - t0
        for th in threads:
            faiss.omp_set_num_threads(th)
            index.reset()
            load0 = load_avg()
            t0 = time.perf_counter()
            index.add(xb)
            add_s = time.perf_counter() - t0
            rows.append({"method": name, "factory": factory, "threads": th, "vectors": len(xb),
                         "train_s": train_s, "add_s": add_s, "add_vps": len(xb) / add_s,
                         "load_before": load0, "load_after": load_avg()})
            log.info("%s add (%d threads): %.0f vectors/s", factory, th, len(xb) / add_s)
    return rows


def extrapolate(per_core_vps: float, flops: dict[str, float]) -> list[dict]:
    """Wall time and machine count for 1e9 vectors (CPU from measurement, GPU estimated)."""
    rows = []
    bench_flops = flops["bench model"]
    for cores in (2, 32, 96):
        vps = per_core_vps * cores
        for name, f in flops.items():
            v = vps * bench_flops / f
            rows.append({"hardware": f"CPU, {cores} cores", "model": name, "basis":
                         "measured" if name == "bench model" else "measured, scaled by FLOPs",
                         "vps_per_machine": v, "hours_1_machine": BILLION / v / 3600,
                         "machines_24h": math.ceil(BILLION / v / 86400),
                         "machines_1h": math.ceil(BILLION / v / 3600)})
    for name, f in flops.items():
        v = H100_PEAK_FLOPS * GPU_EFFICIENCY / f
        rows.append({"hardware": "1x H100 GPU", "model": name, "basis": "estimate (FLOPs)",
                     "vps_per_machine": v, "hours_1_machine": BILLION / v / 3600,
                     "machines_24h": math.ceil(BILLION / v / 86400), "machines_1h": math.ceil(BILLION / v / 3600)})
    return rows


# --------------------------------------------------------------------------- report
def md_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join(":---" if c[2] == "s" else "---:" for c in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("" if v is None else (str(v) if fmt == "s" else format(v, fmt)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


JOB_COLS = [("workers", "workers", "d"), ("vectors", "vectors", ",d"), ("shards", "shards", "d"),
            ("wall_s", "job wall s", ".1f"), ("job_vps", "job vec/s", ",.0f"),
            ("encode_stage_vps", "encode-stage vec/s", ",.0f"), ("max_peak_rss_mb", "peak RSS/actor MB", ",.0f"),
            ("load", "load avg (1 min)", "s")]
FAISS_COLS = [("method", "method", "s"), ("factory", "factory", "s"), ("threads", "threads", "d"),
              ("vectors", "vectors", ",d"), ("train_s", "train s", ".1f"), ("add_vps", "add vec/s", ",.0f")]
EXT_COLS = [("hardware", "hardware", "s"), ("model", "model", "s"), ("basis", "basis", "s"),
            ("vps_per_machine", "vec/s per machine", ",.1f"), ("hours_1_machine", "hours on 1 machine", ",.2f"),
            ("machines_24h", "machines for 24 h", ",d"), ("machines_1h", "machines for 1 h", ",d")]


def render(res: dict) -> str:
    m = res["model"]["config"]
    jobs = [dict(r, load=f"{r['load_before'][0]} -> {r['load_after'][0]}") for r in res["jobs"]]
    rss = res["rss_check"]
    lines = [
        "## Encode job",
        "",
        f"- machine: {res['machine']['cpu_model']}, {res['machine']['cpu_count']} cores "
        f"({res['machine']['platform']}), shared with other jobs at the time: load average "
        f"{res['load_start']} at the start, {res['load_end']} at the end (1/5/15 min), so times are indicative only",
        f"- date: {res['started']}",
        f"- command: `{res['command']}`",
        f"- data: dwsift base (uint8 bvecs, d=128): N = first {res['n_small']:,} rows (written to a temporary "
        f"bvecs file), 10·N = first {res['n_large']:,} rows"
        + (" (the whole base)" if res["n_large"] >= DWSIFT_BASE_ROWS else
           f" of the {DWSIFT_BASE_ROWS:,}-row base (a subset: at the encode rate under this load the whole "
           "base would not fit the run's time budget)")
        + f"; shards of {res['shard_rows']:,} rows",
        f"- model: IVF-QINCo2, preset `{res['preset']}` (M={m['M']}, K={m['K']}, {res['model']['code_bytes']:g} bytes + list id, "
        f"nlist={m['nlist']}, L={m['L']}, de={m['de']}, dh={m['dh']}, A={m['A']}, B={m['B']}); "
        f"**RQ initialisation only, no training epochs** (encoding cost does not depend on the weights); "
        f"IVF centroids and RQ codebooks fitted on {res['model']['metadata'].get('train_rows', '?'):,} learn rows; "
        f"{res['flops_per_vector']['bench model'] / 1e6:.1f} MFLOP per encoded vector",
        "- job vec/s = vectors / wall time of `run_encode` (planning, Ray Data start, actor start-up and model "
        "load, reads, encoding, shard writes, manifest commit); encode-stage vec/s excludes planning and commit; "
        "each actor runs 1 torch thread on 1 logical CPU, a fresh local Ray per run",
        "",
        md_table(jobs, JOB_COLS),
        "",
        f"Peak RSS per actor (VmHWM reported by each actor): {rss['small_mb']:,.0f} MB at N, "
        f"{rss['large_mb']:,.0f} MB at 10·N (ratio {rss['ratio']:.2f}, limit 1.20: "
        f"{'pass' if rss['ok'] else 'FAIL'}). Scaling 1 -> 2 workers on N: x{res['scaling_1_to_2']:.2f} "
        "(N is a few shards, so start-up and the other jobs' load swings dominate these two short runs).",
        "",
        "Faiss `index.add` after training (same nlist, same 8-byte codes, trained on the same learn rows; "
        "Faiss default RQ beam), on the same 10·N rows in this process:",
        "",
        md_table(res["faiss"], FAISS_COLS),
        "",
        "### 1 billion vectors (extrapolated)",
        "",
        f"- CPU rows: the encode-stage rate per core of the longest run (10·N vectors, 2 workers: "
        f"{res['per_core_vps']:,.0f} vec/s per core, measured under the load above, so pessimistic), times "
        "the cores (linear scaling assumed: workers share nothing but the input files); other models are "
        "scaled by their FLOP count (an estimate). Reads from object storage and shard writes are assumed "
        "to keep up (they are a small part of the job here).",
        f"- GPU rows are an **estimate, not a measurement** (no GPU was used): "
        f"{H100_PEAK_FLOPS / 1e12:.0f} TFLOP/s dense FP16 peak of an H100 times an assumed "
        f"{GPU_EFFICIENCY:.0%} efficiency, divided by the FLOPs per vector "
        + ", ".join(f"{k}: {v / 1e6:,.0f} MFLOP" for k, v in res["flops_per_vector"].items()) + ".",
        "  For the small bench model this is an upper bound: its 64-128-wide matmuls cannot keep tensor cores "
        "busy and top-k / gathers dominate; at millions of vectors/s reading the input (132 bytes per dwsift "
        "vector) from object storage would be the limit instead.",
        "- `qinco2-S` / `qinco2-L` are the QINCo2 paper's small and large settings (L=2 / 16, de=128 / 384, "
        "dh=256 / 384, B=32, A=16), counted with the bench model's M, K and nlist.",
        "",
        md_table(res["extrapolation"], EXT_COLS),
        "",
    ]
    return "\n".join(lines)


def update_results_md(path: pathlib.Path, section: str) -> None:
    """Replace (or append) this script's section of RESULTS.md, leaving other sections alone."""
    update_section(path, BEGIN, END, section)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="dataset root (default: $QINCO_DATA_DIR or ../shared/data)")
    ap.add_argument("--n-large", type=int, default=0, help="10·N (default: the whole base)")
    ap.add_argument("--n-small", type=int, default=0, help="N (default: a tenth of 10·N)")
    ap.add_argument("--shard-rows", type=int, default=4096)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--M", type=int, default=8)
    ap.add_argument("--K", type=int, default=256)
    ap.add_argument("--nlist", type=int, default=256)
    ap.add_argument("--val", type=int, default=5000, help="learn rows held out for validation")
    ap.add_argument("--train-rows", type=int, default=20000,
                    help="learn rows (after the validation rows) fitting the QINCo model and the Faiss indexes")
    ap.add_argument("--rq-iters", type=int, default=4)
    ap.add_argument("--additive-rows", type=int, default=5000)
    ap.add_argument("--model-dir", default=str(HERE / "out" / "encode_model"))
    ap.add_argument("--out", default=str(HERE / "out" / "encode.json"))
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--render-only", action="store_true", help="rewrite the RESULTS.md section from --out")
    a = ap.parse_args(argv)
    if a.render_only:
        res = derive(json.loads(pathlib.Path(a.out).read_text()))
        storage.write_bytes_atomic(a.out, json.dumps(res, indent=2, default=float).encode())
        update_results_md(pathlib.Path(a.results_md), render(res))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = ("python bench/bench_encode.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))).strip()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data_root = pathlib.Path(a.data_dir or os.environ.get("QINCO_DATA_DIR", HERE.parent.parent / "shared" / "data"))
    learn, base = data_root / "dwsift" / "learn.bvecs", data_root / "dwsift" / "base.bvecs"
    if not base.exists():
        print(f"dwsift not found under {data_root} (set QINCO_DATA_DIR)", file=sys.stderr)
        return 2
    res: dict = {"command": command, "started": started, "machine": machine_info(), "load_start": load_avg(),
                 "shard_rows": a.shard_rows, "preset": a.preset, "code_version": code_version()}
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)

    model_uri, res["model"] = get_model(pathlib.Path(a.model_dir), str(learn), a)
    mcfg = QincoConfig.from_dict(res["model"]["config"])
    n_base = vectors.info(str(base)).count
    n_large = min(a.n_large or n_base, n_base)
    n_small = a.n_small or math.ceil(n_large / 10)
    res.update(n_small=n_small, n_large=n_large)
    flops = {"bench model": encode_flops_per_vector(mcfg)}
    for p in ("qinco2-S", "qinco2-L"):
        flops[p] = encode_flops_per_vector(config_from_preset(p, mcfg.dim, M=mcfg.M, K=mcfg.K, nlist=mcfg.nlist))
    res["flops_per_vector"] = flops

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_encode_"))
    try:
        small = str(tmp / "base_small.bvecs")
        vectors.write_vectors(small, vectors.read_rows(str(base), 0, n_small), fmt="bvecs")
        large = str(base)
        if n_large < n_base:
            large = str(tmp / "base_large.bvecs")
            vectors.write_vectors(large, vectors.read_rows(str(base), 0, n_large), fmt="bvecs")
        res["jobs"] = []
        for workers, data, n in ((1, small, n_small), (2, small, n_small), (2, large, n_large)):
            log.info("encode job: %d workers, %d vectors", workers, n)
            r = run_job(model_uri, data, str(tmp / f"index_w{workers}_{n}"), workers, a.shard_rows)
            res["jobs"].append(r)
            print(md_table([dict(r, load=str(r["load_after"][0]))], JOB_COLS), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    derive(res)

    xt = vectors.read_rows(str(learn), a.val, a.val + a.train_rows).astype(np.float32)
    xb = vectors.read_rows(str(base), 0, n_large).astype(np.float32)
    res["faiss"] = faiss_add(xt, xb, mcfg.nlist, mcfg.M, int(math.log2(mcfg.K)), threads=[1, 2])
    for r in res["faiss"]:
        print(f"{r['factory']:>16} threads={r['threads']} add {r['add_vps']:,.0f} vec/s", flush=True)
    res["load_end"] = load_avg()
    storage.write_bytes_atomic(a.out, json.dumps(res, indent=2, default=float).encode())
    section = render(res)
    update_results_md(pathlib.Path(a.results_md), section)
    print(section)
    return 0 if res["rss_check"]["ok"] else 1


def derive(res: dict) -> dict:
    """Figures computed from the measured runs: memory check, scaling, 1e9 extrapolation.

    The per-core cost comes from the longest run (10·N vectors, 2 workers), whose encode stage
    is least affected by start-up time and by load spikes; it already includes any loss from
    running 2 workers, and machines are extrapolated linearly in their cores.
    """
    j1, j2, j2l = res["jobs"]
    res["rss_check"] = {"small_mb": j2["max_peak_rss_mb"], "large_mb": j2l["max_peak_rss_mb"],
                        "ratio": j2l["max_peak_rss_mb"] / j2["max_peak_rss_mb"]}
    res["rss_check"]["ok"] = res["rss_check"]["ratio"] <= 1.2
    res["scaling_1_to_2"] = j2["encode_stage_vps"] / j1["encode_stage_vps"]
    res["per_core_vps"] = j2l["encode_stage_vps"] / j2l["workers"]
    res.pop("scaling_efficiency", None)
    res["extrapolation"] = extrapolate(res["per_core_vps"], res["flops_per_vector"])
    return res


if __name__ == "__main__":
    raise SystemExit(main())
