"""The whole user path at 1M-10M generated vectors, each stage timed, beside Faiss.

For each N (the collections are prefixes of one generated collection, ``bench/scale_data.py``):

1. data: N SIFT-like uint8 vectors written as ``.u8bin`` into a local SeaweedFS S3 server (the
   encode reads them from there), a training sample from another stream of the generator, 10,000
   queries and their exact nearest neighbours (``search.evaluation.knn_ground_truth``);
2. ``qinco train --ivf NLIST`` on the sample (NLIST grows with N), a fixed time budget;
3. ``qinco encode --workers W`` from S3 into an index on S3, with the encoder's A and B given
   (the fast setting ``--A 16 --B 1`` by default; ``--default-encoder-n`` also encodes the first
   rows with the model's own A and B to compare quality);
4. ``qinco search`` of the queries at each ``--nprobe``, R@1 / R@10 against the ground truth.

Each stage runs as the CLI command a user types, in its own process. Reported per stage: wall
time, vectors/s, peak resident memory of the driver (and of each actor, from the job reports),
shard count, manifest bytes, plan and commit seconds, queries/s. Faiss IVF-PQ with the same
NLIST and code bytes is trained on the same sample and searched in this process on the same
data. Results go to ``--json`` (default ``bench/out/scale.json``), one entry per N, merged with
the entries of earlier runs, so sizes can be measured in separate runs.

    .venv/bin/python bench/bench_scale.py --n 1000000 --work /tmp/scale
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys
import threading
import time

import faiss
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import scale_data  # noqa: E402
from s3_server import S3Server  # noqa: E402

from pipeline.index.manifest import current_version, version_dir  # noqa: E402
from pipeline.codec.model_file import load_model  # noqa: E402
from pipeline.codec.ivf import HNSW_ASSIGN_MIN_NLIST, IVFConfig, assign, assigner, train_coarse_quantizer  # noqa: E402
from pipeline.io import storage, vectors  # noqa: E402
from pipeline.io.results import read_results  # noqa: E402
from pipeline.stages.search import evaluate_results  # noqa: E402
from pipeline.search.evaluation import knn_ground_truth, recall_at  # noqa: E402
from pipeline.sysinfo import machine_info  # noqa: E402

BUCKET = "scale"
TRAIN_STREAM = 1 << 30   # generator blocks of the training sample (disjoint from base and queries)


def default_nlist(n: int) -> int:
    """4,096 lists at 1M, 16,384 at 3M-4M, 65,536 at 10M: the power of two nearest 4 x sqrt(N)."""
    return 1 << int(round(math.log2(4 * math.sqrt(n))))


class PeakRss:
    """Polls a child process's ``VmHWM`` (its peak resident memory, which only grows) until it
    exits; ``value`` is the last reading."""

    def __init__(self, pid: int):
        self.pid, self.value = pid, 0
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()

    def _poll(self) -> None:
        while True:
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.value = int(line.split()[1]) * 1024
            except OSError:
                return
            time.sleep(0.2)


def qinco(args: list[str], log_path: pathlib.Path) -> tuple[float, int]:
    """Run ``python -m pipeline ARGS`` (the ``qinco`` command); returns (wall s, driver peak RSS)."""
    cmd = [sys.executable, "-m", "pipeline", *args]
    print("$ qinco " + " ".join(shlex.quote(a) for a in args), flush=True)
    t0 = time.perf_counter()
    with open(log_path, "wb") as logf:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
        rss = PeakRss(p.pid)
        rc = p.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"qinco {args[0]} failed (rc {rc}); log {log_path}:\n{tail}")
    return wall, rss.value


def prepare_data(n: int, work: pathlib.Path, a, anchors_AD, train_rows: int) -> dict:
    """The base on S3, the training sample, the queries and their ground truth (each made once)."""
    d = work / f"n{n}"
    d.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    base_uri = f"s3://{BUCKET}/n{n}/base.u8bin"
    if not storage.exists(base_uri):
        t = time.perf_counter()
        scale_data.write(base_uri, n, a.seed, anchors_AD)
        out["write_base_s"] = time.perf_counter() - t
    train = d / f"train{train_rows}.u8bin"
    if not train.exists():
        x = scale_data.rows(anchors_AD, a.seed, TRAIN_STREAM * scale_data.BLOCK,
                            TRAIN_STREAM * scale_data.BLOCK + train_rows)
        vectors.write_vectors(str(train), x)
    queries = d / "queries.fvecs"
    gt = d / "gt.ivecs"
    if not gt.exists():
        q = scale_data.queries(anchors_AD, a.seed, a.queries)
        vectors.write_vectors(str(queries), q)
        t = time.perf_counter()
        blocks = ((s, scale_data.rows(anchors_AD, a.seed, s, min(n, s + 1_000_000)))
                  for s in range(0, n, 1_000_000))
        _, I = knn_ground_truth(q, blocks, k=10)
        out["ground_truth_s"] = time.perf_counter() - t
        vectors.write_vectors(str(gt), I.astype(np.int32))
    return {"base": base_uri, "train": str(train), "queries": str(queries), "gt": str(gt), **out}


# From this many lists the Faiss baseline takes the QINCo model's coarse centroids behind a Faiss
# HNSW quantizer (Faiss's own recipe for large NLIST): a flat Faiss k-means and a brute-force
# assignment of every vector would each take tens of minutes on a small machine.
FAISS_SHARED_CENTROIDS_NLIST = 65536


def faiss_baseline(n: int, nlist: int, code_bytes: int, data: dict, anchors_AD, a,
                   model_dir: pathlib.Path) -> list[dict]:
    """Faiss IVF-PQ with the same lists and code bytes: trained on the sample, all N added, the
    same queries searched at each nprobe (all threads of this process)."""
    xt = vectors.read_vectors(data["train"]).astype(np.float32)
    q = vectors.read_vectors(data["queries"]).astype(np.float32)
    gt = vectors.read_vectors(data["gt"]).astype(np.int64)
    t = time.perf_counter()
    if nlist >= FAISS_SHARED_CENTROIDS_NLIST:
        centroids_LD = load_model(str(model_dir)).centroids_LD.numpy()
        quantizer = faiss.IndexHNSWFlat(centroids_LD.shape[1], 32)
        quantizer.add(np.ascontiguousarray(centroids_LD, dtype=np.float32))
        index = faiss.IndexIVFPQ(quantizer, centroids_LD.shape[1], nlist, code_bytes, 8)
        method = f"Faiss IVF{nlist}_HNSW32 (QINCo centroids),PQ{code_bytes}x8"
    else:
        index = faiss.index_factory(128, f"IVF{nlist},PQ{code_bytes}x8")
        method = f"Faiss IVF{nlist},PQ{code_bytes}x8"
    index.train(xt)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    for s in range(0, n, 1_000_000):
        index.add(scale_data.rows(anchors_AD, a.seed, s, min(n, s + 1_000_000)).astype(np.float32))
    add_s = time.perf_counter() - t
    rows = []
    for nprobe in a.nprobe:
        index.nprobe = nprobe
        t = time.perf_counter()
        _, I = index.search(q, 10)
        s = time.perf_counter() - t
        r = recall_at(I, gt, ks=(1, 10))
        rows.append({"method": method, "nprobe": nprobe, "train_s": train_s,
                     "add_vectors_per_s": n / add_s, "queries_per_s": len(q) / s,
                     "R@1": r["R@1"], "R@10": r["R@10"]})
    return rows


def run_n(n: int, a, anchors_AD, work: pathlib.Path) -> dict:
    nlist = a.nlist or default_nlist(n)
    train_rows = a.train_rows or max(300_000, 20 * nlist)
    d = work / f"n{n}"
    t = time.perf_counter()
    data = prepare_data(n, work, a, anchors_AD, train_rows)
    entry: dict = {"n": n, "nlist": nlist, "bytes": a.bytes, "workers": a.workers, "A": a.A, "B": a.B,
                   "shard_rows": a.shard_rows, "data": {k: v for k, v in data.items() if k.endswith("_s")},
                   "data_s": time.perf_counter() - t}

    model = d / f"model_ivf{nlist}"
    if not (model / "config.json").exists() or a.retrain:
        wall, rss = qinco(["train", "--data", data["train"], "--out", str(model), "--preset", "cpu",
                           "--bytes", str(a.bytes), "--ivf", str(nlist), "--time-budget", str(a.train_budget),
                           "--fresh"], d / "train.log")
        rep = json.loads((model / "report.json").read_text())
        (d / f"train_ivf{nlist}.json").write_text(json.dumps(
            {"wall_s": wall, "driver_peak_rss_bytes": rss, "val_mse": rep.get("best_val_mse"), "rows": train_rows,
             "budget_s": a.train_budget}))
    if (d / f"train_ivf{nlist}.json").exists():  # the model of an earlier run of this bench
        entry["train"] = json.loads((d / f"train_ivf{nlist}.json").read_text())
    settings = [("fast", a.A, a.B, n)]
    if a.default_encoder_n:
        settings.append(("default", None, None, min(n, a.default_encoder_n)))
    entry["encode"], entry["search"] = [], []
    for label, A, B, rows in settings:
        index = f"s3://{BUCKET}/n{n}/index_{label}_ivf{nlist}"
        base = data["base"]
        if rows < n:
            # the first rows of the collection: the same vectors the fast setting encodes first
            base = f"s3://{BUCKET}/n{rows}/base.u8bin"
            if not storage.exists(base):
                scale_data.write(base, rows, a.seed, anchors_AD)
        args = ["encode", "--model", str(model), "--data", base, "--out", index, "--workers", str(a.workers),
                "--shard-rows", str(a.shard_rows)]
        if A is not None:
            args += ["--A", str(A), "--B", str(B)]
        if a.fresh_index and storage.exists(storage.join(index, "CURRENT")):
            storage.remove(index, recursive=True)
        wall, rss = qinco(args, d / f"encode_{label}.log")
        rep = json.loads(_latest_report(index))
        actor_rss = list(rep.get("actor_peak_rss_bytes", {}).values())
        entry["encode"].append({
            "setting": label, "A": A, "B": B, "vectors": rep["vectors"], "wall_s": wall,
            "vectors_per_s": rep["vectors_per_s"],
            "vectors_per_s_per_worker": (rep["vectors_per_s"] or 0) / a.workers,
            "driver_peak_rss_bytes": rep.get("driver_peak_rss_bytes", rss), "driver_peak_rss_polled": rss,
            "actor_peak_rss_bytes": max(actor_rss) if actor_rss else None,
            "actor_private_bytes": max(rep.get("actor_private_bytes", {}).values(), default=None),
            "shards": rep["shards"], "manifest_bytes": rep.get("manifest_bytes"),
            "plan_s": rep["stages"].get("plan_s"), "commit_s": rep["stages"].get("commit_s"),
            "encode_s": rep["stages"].get("encode_s"), "bytes_out": rep["bytes_out"]})
        for nprobe in a.nprobe:
            out = str(d / f"results_{label}_np{nprobe}")
            wall, rss = qinco(["search", "--index", index, "--queries", data["queries"], "--k", "10",
                               "--nprobe", str(nprobe), "--workers", str(a.workers), "--out", out],
                              d / f"search_{label}_np{nprobe}.log")
            srep = json.loads(pathlib.Path(out + ".report.json").read_text())
            rec = (evaluate_results(out, data["gt"]) if rows == n else
                   _recall_on_prefix(out, rows, a, anchors_AD, data))
            entry["search"].append({
                "setting": label, "vectors": rows, "nprobe": nprobe, "wall_s": wall,
                "queries_per_s": srep["queries_per_s"], "load_s": srep["stages"].get("load_s"),
                "driver_peak_rss_bytes": srep.get("driver_peak_rss_bytes", rss),
                "actor_peak_rss_bytes": max((x.get("peak_rss_bytes", 0) for x in srep.get("actors", [])),
                                            default=None),
                "R@1": rec["R@1"], "R@10": rec["R@10"]})
    if not a.no_faiss:
        entry["faiss"] = faiss_baseline(n, nlist, a.bytes, data, anchors_AD, a, model)
    return entry


def _latest_report(index: str) -> str:
    """The report of the index's current version."""
    return storage.read_bytes(storage.join(version_dir(index, current_version(index)), "report.json")).decode()


def _recall_on_prefix(results: str, rows: int, a, anchors_AD, data: dict) -> dict:
    """R@1 / R@10 of results over the first ``rows`` vectors: ground truth of that prefix."""
    gt_path = pathlib.Path(data["gt"]).with_name(f"gt_first{rows}.ivecs")
    if not gt_path.exists():
        q = vectors.read_vectors(data["queries"]).astype(np.float32)
        blocks = ((s, scale_data.rows(anchors_AD, a.seed, s, min(rows, s + 1_000_000)))
                  for s in range(0, rows, 1_000_000))
        _, I = knn_ground_truth(q, blocks, k=10)
        vectors.write_vectors(str(gt_path), I.astype(np.int32))
    I, _ = read_results(results)
    return recall_at(I, vectors.read_vectors(str(gt_path)).astype(np.int64), ks=(1, 10))


def print_tables(entries: list[dict]) -> None:
    print("\n| N | NLIST | setting | vectors | workers | wall s | vectors/s | per worker | driver RSS MB "
          "| actor RSS MB | actor private MB | shards | manifest KB | plan s | commit s |")
    print("|" + "---:|" * 15)
    for e in entries:
        for r in e.get("encode", []):
            print(f"| {e['n']:,} | {e['nlist']:,} | {r['setting']} (A={r['A']}, B={r['B']}) | {r['vectors']:,} "
                  f"| {e['workers']} | {r['wall_s']:.0f} | {r['vectors_per_s']:,.0f} "
                  f"| {r['vectors_per_s_per_worker']:,.0f} | {r['driver_peak_rss_bytes'] / 2**20:,.0f} "
                  f"| {(r['actor_peak_rss_bytes'] or 0) / 2**20:,.0f} "
                  f"| {(r.get('actor_private_bytes') or 0) / 2**20:,.0f} | {r['shards']:,} "
                  f"| {(r['manifest_bytes'] or 0) / 1024:,.0f} | {r['plan_s']:.2f} | {r['commit_s']:.2f} |")
    print("\n| N | NLIST | method | vectors | nprobe | queries/s | R@1 | R@10 | actor RSS MB |")
    print("|" + "---:|" * 9)
    for e in entries:
        for r in e.get("search", []):
            print(f"| {e['n']:,} | {e['nlist']:,} | qinco search, {r['setting']} codes | {r['vectors']:,} "
                  f"| {r['nprobe']} | {r['queries_per_s']:,.0f} | {r['R@1']:.4f} | {r['R@10']:.4f} "
                  f"| {(r['actor_peak_rss_bytes'] or 0) / 2**20:,.0f} |")
        for r in e.get("faiss", []):
            print(f"| {e['n']:,} | {e['nlist']:,} | {r['method']} (add {r['add_vectors_per_s']:,.0f} vec/s) "
                  f"| {e['n']:,} | {r['nprobe']} | {r['queries_per_s']:,.0f} | {r['R@1']:.4f} | {r['R@10']:.4f} | |")


def coarse_quantizers(nlists: list[int], a, anchors_AD) -> list[dict]:
    """Two-level k-means of NLIST lists on 20 x NLIST generated rows, the HNSW graph over the
    centroids, and assignment throughput (one thread) through it against an exact scan."""
    out = []
    for nlist in nlists:
        x = scale_data.rows(anchors_AD, a.seed + 1, 0, 20 * nlist).astype(np.float32)
        t = time.perf_counter()
        cent = train_coarse_quantizer(x, IVFConfig(nlist=nlist), progress=False)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        graph = assigner(cent)
        graph_s = time.perf_counter() - t if nlist >= HNSW_ASSIGN_MIN_NLIST else 0.0
        xq = scale_data.rows(anchors_AD, a.seed + 2, 0, 20_000).astype(np.float32)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            t = time.perf_counter()
            _, I = assign(graph, xq)
            assign_vps = len(xq) / (time.perf_counter() - t)
            t = time.perf_counter()
            _, I_exact = assign(cent, xq[:2000])
            exact_vps = 2000 / (time.perf_counter() - t)
        finally:
            faiss.omp_set_num_threads(threads)
        row = {"nlist": nlist, "train_rows": len(x), "train_s": train_s, "hnsw_build_s": graph_s,
               "assign_vectors_per_s_1thread": assign_vps, "exact_assign_vectors_per_s_1thread": exact_vps,
               "nearest_list_found": float(np.mean(I[:2000, 0] == I_exact[:, 0]))}
        print(f"NLIST {nlist:,}: k-means on {len(x):,} rows {train_s:.0f} s, HNSW build {graph_s:.1f} s, "
              f"assign {assign_vps:,.0f} vec/s (exact {exact_vps:,.0f}), nearest found {row['nearest_list_found']:.4f}",
              flush=True)
        out.append(row)
    return out


CPU_MACHINE_CORES = 32   # the machine the cost model prices: a common cloud CPU instance size


def cost_model(entries: list[dict]) -> dict:
    """Per-unit costs fitted to the measured runs, and what 100M and 1B vectors then need.

    - encode: seconds per vector per worker (one core each), the slope of a least-squares line
      through (vectors, encode seconds x workers) over the runs of each setting (one run: its
      ratio); the fixed part (actor start, model load) is the intercept;
    - bytes per vector in the shards (disk) and in a search actor (codes, id, list id, scale);
    - query cost: actor core-seconds per query against the codes one query scans (nprobe x N /
      NLIST), a line over the nprobe values: its slope per code, its intercept per query (the
      probe, the merge and the QINCo re-rank of the shortlist).
    Everything beyond the largest N measured is an extrapolation, marked so."""
    out: dict = {"encode": {}, "search": [], "extrapolated": []}
    by_setting: dict[str, list] = {}
    for e in entries:
        for r in e.get("encode", []):
            if r.get("encode_s"):
                by_setting.setdefault(f"{r['setting']} (A={r['A']}, B={r['B']})", []).append(
                    (r["vectors"], r["encode_s"] * e["workers"], r["bytes_out"] / r["vectors"]))
    for name, pts in by_setting.items():
        n = np.array([p[0] for p in pts], float)
        t = np.array([p[1] for p in pts], float)
        if len(pts) >= 2 and np.ptp(n) > 0:
            slope, icpt = np.polyfit(n, t, 1)
        else:
            slope, icpt = float(t[0] / n[0]), 0.0
        out["encode"][name] = {"points": len(pts), "max_n": int(n.max()), "s_per_vector_core": float(slope),
                               "vectors_per_s_core": float(1 / slope), "fixed_core_s": float(icpt),
                               "disk_bytes_per_vector": float(np.mean([p[2] for p in pts]))}
    for e in entries:
        rows = [r for r in e.get("search", []) if r["vectors"] == e["n"] and r["setting"] == "fast"]
        if not rows:
            continue
        scanned = np.array([r["nprobe"] * e["n"] / e["nlist"] for r in rows])
        core_s = np.array([e["workers"] / r["queries_per_s"] for r in rows])  # actor core-seconds per query
        if len(rows) >= 2 and np.ptp(scanned) > 0:
            per_code, fixed = np.polyfit(scanned, core_s, 1)
        else:
            per_code, fixed = float(core_s[0] / scanned[0]), 0.0
        out["search"].append({"n": e["n"], "nlist": e["nlist"], "nprobe": [r["nprobe"] for r in rows],
                              "codes_per_query": scanned.tolist(), "ns_per_code_core": 1e9 * float(per_code),
                              "fixed_ms_per_query_core": 1e3 * float(fixed)})
    for name, m in out["encode"].items():
        for n in (100_000_000, 1_000_000_000):
            core_h = n * m["s_per_vector_core"] / 3600
            out["extrapolated"].append({
                "setting": name, "n": n, "core_hours": core_h,
                "machines_x_hours": f"{core_h / CPU_MACHINE_CORES:,.1f} h on 1 machine of {CPU_MACHINE_CORES} cores, "
                                    f"{math.ceil(core_h / CPU_MACHINE_CORES / 24)} machines for 24 h",
                "disk_GB": n * m["disk_bytes_per_vector"] / 1e9, "basis": f"extrapolated from {m['max_n']:,} measured"})
    return out


def print_cost_model(cm: dict) -> None:
    print("\n| encoder setting | runs | vectors/s per core | fixed core-s | disk bytes/vector |")
    print("|---|---:|---:|---:|---:|")
    for name, m in cm["encode"].items():
        print(f"| {name} | {m['points']} | {m['vectors_per_s_core']:,.0f} | {m['fixed_core_s']:,.0f} "
              f"| {m['disk_bytes_per_vector']:.1f} |")
    print("\n| N | NLIST | nprobe | codes scanned/query | core-ns per code | core-ms per query (fixed) |")
    print("|---:|---:|---|---|---:|---:|")
    for r in cm["search"]:
        print(f"| {r['n']:,} | {r['nlist']:,} | {', '.join(map(str, r['nprobe']))} "
              f"| {', '.join(f'{c:,.0f}' for c in r['codes_per_query'])} | {r['ns_per_code_core']:.1f} "
              f"| {r['fixed_ms_per_query_core']:.2f} |")
    print("\n| encoder setting | N | CPU core-hours | machines x hours | shards on disk GB | basis |")
    print("|---|---:|---:|---|---:|---|")
    for r in cm["extrapolated"]:
        print(f"| {r['setting']} | {r['n']:,} | {r['core_hours']:,.0f} | {r['machines_x_hours']} | {r['disk_GB']:,.1f} "
              f"| {r['basis']} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (default: 4 x sqrt(N), a power of two)")
    ap.add_argument("--bytes", type=int, default=8)
    ap.add_argument("--A", type=int, default=16)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--default-encoder-n", type=int, default=0,
                    help="also encode the first this many vectors with the model's own A and B")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-rows", type=int, default=65536)
    ap.add_argument("--train-rows", type=int, default=0,
                    help="training sample (default: 300,000 or 20 per list, whichever is more)")
    ap.add_argument("--train-budget", type=float, default=300.0, help="seconds of `qinco train` (all of it)")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--fresh-index", action="store_true", help="delete an index left by an earlier run first")
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-faiss", action="store_true")
    ap.add_argument("--coarse", type=int, nargs="*", default=None, metavar="NLIST",
                    help="instead of the runs: time the coarse quantizer (k-means, HNSW, assignment) at these NLIST")
    ap.add_argument("--work", default="/tmp/qinco-scale")
    ap.add_argument("--json", default=str(ROOT / "bench" / "out" / "scale.json"))
    a = ap.parse_args(argv)

    out_path = pathlib.Path(a.json)
    if a.coarse:
        rows = coarse_quantizers(a.coarse, a, scale_data.anchors(a.seed)[0])
        _save(out_path, lambda r: r.update(coarse={"rows": rows, "machine": machine_info(), "command": _command(argv),
                                                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))
        return 0
    work = pathlib.Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    server = S3Server(data_dir=str(work / "seaweedfs")).start(timeout_s=120)
    os.environ.update(server.env())
    storage._clear_cache()
    fs, _ = storage.get_fs(f"s3://{BUCKET}")
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    anchors_AD, source = scale_data.anchors(a.seed)
    try:
        for n in a.n:
            t = time.perf_counter()
            entry = run_n(n, a, anchors_AD, work)
            entry.update(anchors=source, seed=a.seed, total_s=time.perf_counter() - t,
                         machine=machine_info(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                         command=_command(argv))
            _save(out_path, lambda r: r.setdefault("runs", {}).__setitem__(str(n), _merged(r["runs"].get(str(n)), entry)))
    finally:
        server.stop()
    results = json.loads(out_path.read_text())
    entries = [results["runs"][k] for k in sorted(results["runs"], key=int)]
    print_tables(entries)
    cm = cost_model(entries)
    _save(out_path, lambda r: r.update(cost_model=cm))
    print_cost_model(cm)
    return 0


def _merged(old: dict | None, new: dict) -> dict:
    """``new``, keeping the rows of an earlier run of the same N that this run did not measure
    (other encoder settings, other nprobe values, the Faiss rows under --no-faiss)."""
    if not old:
        return new
    out = dict(new)
    out["encode"] = new["encode"] + [r for r in old.get("encode", [])
                                     if r["setting"] not in {x["setting"] for x in new["encode"]}]
    done = {(x["setting"], x["nprobe"]) for x in new["search"]}
    out["search"] = new["search"] + [r for r in old.get("search", []) if (r["setting"], r["nprobe"]) not in done]
    if "faiss" not in new and "faiss" in old:
        out["faiss"] = old["faiss"]
    if "train" not in new and "train" in old:
        out["train"] = old["train"]
    if not new.get("data") and old.get("data"):  # the data was made by the earlier run
        out["data"] = old["data"]
    return out


def _command(argv) -> str:
    return "python bench/bench_scale.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))


def _save(path: pathlib.Path, change) -> None:
    """Apply ``change`` to the JSON results file as it is now (runs of other sizes kept)."""
    results = json.loads(path.read_text()) if path.exists() else {}
    change(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
