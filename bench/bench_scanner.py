"""Lookup-table shortlist scanners of one IVF shard: ours (one table per query) vs Faiss IVF-RQ.

Both scanners rank the same codes with the same additive codebooks (Faiss's
``IndexIVFResidualQuantizer`` is built here over the shard's codes, codebooks and norms, and fed
the same probed lists); this measures their speed on a shard shaped like the dwsift index (224k
codes of 16 bytes, IVF1024, D=128). Faiss's scanner builds an M x K table per (query, probed
list); ours (the "table scanner") one per query. The
table scanner is also timed with row scales (``ShardSearcher(scale_N=...)``, the search's
default), which cost one gather and multiply per code; Faiss has no per-row factor.

    python bench/bench_scanner.py [--n 223825] [--threads 1 2] [--nprobe 4 16 64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shlex
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_md import update_section  # noqa: E402
sys.path.insert(0, str(HERE.parent))

from pipeline.io import storage  # noqa: E402
from pipeline.sysinfo import machine_info  # noqa: E402
from pipeline.search.scan import ShardSearcher  # noqa: E402

BEGIN = "<!-- section: lut-scanner (bench/bench_scanner.py) -->"
END = "<!-- end section: lut-scanner -->"


def synthetic_shard(n: int, nlist: int, M: int, K: int, D: int, seed: int = 0) -> dict:
    """Rows sorted by list with random codes: the scan cost does not depend on the values."""
    rng = np.random.default_rng(seed)
    lists = np.sort(rng.integers(0, nlist, n)).astype(np.int32)
    offsets = np.zeros(nlist + 1, np.int64)
    offsets[1:] = np.cumsum(np.bincount(lists, minlength=nlist))
    return dict(list_ids_N=lists, ids_N=np.arange(n, dtype=np.int64),
                codes_NM=rng.integers(0, K, (n, M)).astype(np.uint8), list_offsets=offsets,
                centroids_LD=rng.normal(0, 10, (nlist, D)).astype(np.float32),
                codebooks_MKD=rng.normal(0, 1, (M, K, D)).astype(np.float32))


def faiss_ivf_rq(s: ShardSearcher):
    """A Faiss IVF-RQ index whose codebooks, inverted lists and norms are the shard's (labels are
    shard rows), so that its scan ranks exactly the codes ours does."""
    import faiss

    nbits = int(s.K).bit_length() - 1
    quantizer = faiss.IndexFlatL2(s.D)
    quantizer.add(s.centroids_LD)
    index = faiss.IndexIVFResidualQuantizer(quantizer, s.D, s.nlist, s.M, nbits, faiss.METRIC_L2,
                                            faiss.AdditiveQuantizer.ST_norm_float)
    index.own_fields = False
    index.quantizer_ref = quantizer  # keep alive: the index does not own it
    rq = index.rq
    faiss.copy_array_to_vector(s.codebooks_MKD.ravel(), rq.codebooks)
    rq.is_trained = index.is_trained = index.by_residual = True
    for lst in range(s.nlist):
        a, b = int(s.list_offsets[lst]), int(s.list_offsets[lst + 1])
        if b == a:
            continue
        codes32 = np.ascontiguousarray(s.codes_NM[a:b], dtype=np.int32)
        norms = np.ascontiguousarray(s.norms_N[a:b])
        packed = np.empty((b - a, index.code_size), np.uint8)
        rq.pack_codes(b - a, faiss.swig_ptr(codes32), faiss.swig_ptr(packed), -1, faiss.swig_ptr(norms), None)
        rows = np.arange(a, b, dtype=np.int64)
        index.invlists.add_entries(lst, b - a, faiss.swig_ptr(rows), faiss.swig_ptr(packed))
    index.ntotal = s.N
    return index


def best_time(fn, repeats: int) -> float:
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=223_825)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--shortlist", type=int, default=50)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "out" / "scanner.json"))
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    a = ap.parse_args(argv)
    import faiss
    import torch

    shard = synthetic_shard(a.n, a.nlist, a.M, 256, a.dim)
    q = np.random.default_rng(1).normal(0, 10, (a.queries, a.dim)).astype(np.float32)
    rows = []
    for T in a.threads:
        faiss.omp_set_num_threads(T)
        torch.set_num_threads(T)  # the table scanner's gather-add runs on torch threads
        scale_N = np.random.default_rng(2).uniform(0.5, 1.5, a.n).astype(np.float16)
        plain = ShardSearcher(**shard, num_threads=T)
        ivf_rq = faiss_ivf_rq(plain)
        searchers = {"table scanner": plain,
                     "table scanner, row scales": ShardSearcher(**shard, num_threads=T, scale_N=scale_N)}
        for P in a.nprobe:
            Dc, lists = plain.probe(q, P)
            ivf_rq.nprobe = P
            scans = {"Faiss IVF-RQ scanner": lambda: ivf_rq.search_preassigned(q, a.shortlist, lists, Dc)}
            scans.update({name: (lambda s=s: s.lut_search(q, lists, a.shortlist)) for name, s in searchers.items()})
            for name, fn in scans.items():
                dt = best_time(fn, a.repeats)
                rows.append({"scanner": name, "threads": T, "nprobe": P, "queries_per_s": a.queries / dt})
                print(f"{name:22s} threads {T} nprobe {P:3d}: {a.queries / dt:9,.0f} queries/s", flush=True)
    report = {"command": "python bench/bench_scanner.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
              "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine_info(), "loadavg_end": "/".join(f"{v:.1f}" for v in os.getloadavg()),
              "args": vars(a), "rows": rows}
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(a.out, json.dumps(report, indent=2).encode())
    m = report["machine"]
    lines = ["## Lookup-table shortlist scanners (bench/bench_scanner.py)", "",
             f"- machine: {m['cpu_model']}, {m['cpu_count']} cores; load average at the end {report['loadavg_end']}",
             f"- date: {report['started']}", f"- command: `{report['command'].strip()}`",
             f"- shard: {a.n:,} random codes of {a.M} bytes (K=256), IVF{a.nlist}, D={a.dim}; {a.queries:,}"
             f" queries in one batch, shortlist {a.shortlist}; queries/s = best of {a.repeats}", "",
             "| threads | nprobe | Faiss IVF-RQ scanner q/s | table scanner q/s | speed-up | "
             "table scanner with row scales q/s |", "|--:|--:|--:|--:|--:|--:|"]
    for T in a.threads:
        for P in a.nprobe:
            qps = {r["scanner"]: r["queries_per_s"] for r in rows if r["threads"] == T and r["nprobe"] == P}
            f, n = qps["Faiss IVF-RQ scanner"], qps["table scanner"]
            lines.append(f"| {T} | {P} | {f:,.0f} | {n:,.0f} | {n / f:.1f} | "
                         f"{qps['table scanner, row scales']:,.0f} |")
    update_section(pathlib.Path(a.results_md), BEGIN, END, "\n".join(lines))
    print(f"wrote {a.out} and {a.results_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
