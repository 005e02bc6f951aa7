"""Lookup-table shortlist scanners of one IVF shard: ours (one table per query) vs Faiss IVF-RQ.

All scanners rank the same codes with the same additive codebooks (Faiss's
``IndexIVFResidualQuantizer`` is built here over the shard's codes, codebooks and norms, and fed
the same probed lists); this measures their speed on a shard shaped like the dwsift index (224k
codes of 16 bytes, IVF1024, D=128). Each call is a whole lookup-table stage for a batch of
queries: the tables, the scan of every code of the probed lists and the top-S. Faiss's scanner
(``search_preassigned``) builds its tables per query and scans list by list; ours build one table
per query and scan either with the compiled loop (``ShardSearcher(scanner="native")``, the
search's default: ``pipeline/search/kernels.py``) or with NumPy/torch array passes
(``scanner="numpy"``, the reference). The native scanner is also timed with row scales
(``scale_N``, the search's default), one more table read and multiply per code; Faiss has no
per-row factor. Speeds are queries/s and codes scanned per second per core (threads).

    python bench/bench_scanner.py [--n 223825] [--M 16] [--dim 128] [--threads 1 2] [--nprobe 1 4 16 64]
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
    index.referenced_objects = [quantizer]  # keep alive: the index does not own it
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
        searchers = {"numpy": ShardSearcher(**shard, num_threads=T, scanner="numpy"), "native": plain,
                     "native, row scales": ShardSearcher(**shard, num_threads=T, scale_N=scale_N)}
        plain.lut_search(q[:2], plain.probe(q[:2], 1)[1], a.shortlist)  # compiles (or loads) the kernel
        for P in a.nprobe:
            Dc, lists = plain.probe(q, P)
            codes = int(plain.list_sizes_L[lists].sum())
            ivf_rq.nprobe = P
            scans = {"Faiss IVF-RQ": lambda: ivf_rq.search_preassigned(q, a.shortlist, lists, Dc)}
            scans.update({name: (lambda s=s: s.lut_search(q, lists, a.shortlist)) for name, s in searchers.items()})
            for name, fn in scans.items():
                dt = best_time(fn, a.repeats)
                rows.append({"scanner": name, "threads": T, "nprobe": P, "queries_per_s": a.queries / dt,
                             "codes_per_query": codes / a.queries, "codes_per_s_per_core": codes / dt / T})
                print(f"{name:20s} threads {T} nprobe {P:3d}: {a.queries / dt:9,.0f} queries/s "
                      f"{codes / dt / T / 1e6:8.1f} M codes/s/core", flush=True)
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
             f" queries in one batch, shortlist {a.shortlist}; queries/s = best of {a.repeats}",
             "- cells: queries/s (in brackets: millions of codes scanned per second per core)", "",
             "| threads | nprobe | codes/query | Faiss IVF-RQ | NumPy scanner | native scanner | native / Faiss | "
             "native, row scales |", "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for T in a.threads:
        for P in a.nprobe:
            r = {x["scanner"]: x for x in rows if x["threads"] == T and x["nprobe"] == P}

            def cell(name):
                return f"{r[name]['queries_per_s']:,.0f} ({r[name]['codes_per_s_per_core'] / 1e6:,.1f})"

            lines.append(f"| {T} | {P} | {r['native']['codes_per_query']:,.0f} | {cell('Faiss IVF-RQ')} | "
                         f"{cell('numpy')} | {cell('native')} | "
                         f"{r['native']['queries_per_s'] / r['Faiss IVF-RQ']['queries_per_s']:.1f} | "
                         f"{cell('native, row scales')} |")
    update_section(pathlib.Path(a.results_md), BEGIN, END, "\n".join(lines))
    print(f"wrote {a.out} and {a.results_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
