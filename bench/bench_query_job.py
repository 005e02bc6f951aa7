"""The query job against the in-process searcher: the same index, queries and settings.

For an index written by ``qinco encode`` and a query file, each ``--params`` setting (JSON of
``SearchParams`` fields) is searched twice:

- in-process: ``ShardSearcher`` over all the index's rows (built as a shard actor builds it), on
  ``--threads`` threads, after a warm-up batch;
- the query job (``run_search``, ``--workers`` shard actors of one CPU each, ``--query-batch``
  queries per batch), whose queries/s exclude the start of its actors (reported as load_s).

Prints queries/s of both, their ratio, the job's seconds per stage, and whether both returned the
same ids; writes ``--out`` (JSON).

    python bench/bench_query_job.py --index /tmp/pw/glove-index --queries <glove50>/query.fvecs
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_search import qinco_searcher  # noqa: E402
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from pipeline.distributed.cluster import ensure_ray  # noqa: E402
from pipeline.io import results  # noqa: E402
from pipeline.io.vectors import read_vectors  # noqa: E402
from pipeline.search.params import SearchParams  # noqa: E402
from pipeline.stages.search import SearchJobConfig, run_search  # noqa: E402

DEFAULT_PARAMS = ['{"nprobe": 2, "shortlist": 10, "rerank": 2}', '{"nprobe": 16, "shortlist": 100, "rerank": 10}',
                  '{"nprobe": 64, "shortlist": 200, "rerank": 50}']


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--params", nargs="+", default=DEFAULT_PARAMS, help="SearchParams fields as JSON, one per setting")
    ap.add_argument("--threads", type=int, default=2, help="in-process threads (= job actors x 1 CPU)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--query-batch", type=int, default=10000)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    q = read_vectors(a.queries).astype(np.float32)
    torch.set_num_threads(a.threads)
    searcher, _ = qinco_searcher(a.index, threads=a.threads)
    ensure_ray()
    rows = []
    for text in a.params:
        params = SearchParams(**{"k": 10, **json.loads(text)}).validate()
        searcher.search(q[:500], params)
        t = time.perf_counter()
        stages: dict = {}
        _, I = searcher.search(q, params, stages)
        inproc = len(q) / (time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as d:
            rep = run_search(SearchJobConfig(index_uri=a.index, queries_uri=a.queries, out_uri=f"{d}/r", params=params,
                                             workers=a.workers, cpus_per_worker=1.0, query_batch=a.query_batch))
            I_job, _ = results.read_knn_results(f"{d}/r")
        rows.append({"params": params.to_dict(), "queries": len(q), "in_process_qps": inproc,
                     "in_process_stages_s": stages, "job_qps": rep["queries_per_s"], "job_stages_s": rep["stages"],
                     "ratio": rep["queries_per_s"] / inproc, "same_ids": bool(np.array_equal(I_job, I))})
    print(f"\n{len(q):,} queries, job: {a.workers} actors, batches of {a.query_batch:,}; in-process: {a.threads} threads\n")
    print("| nprobe | shortlist | rerank | in-process q/s | job q/s | job / in-process | job start (s) | same ids |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        p = r["params"]
        print(f"| {p['nprobe']} | {p['shortlist']} | {p['rerank']} | {r['in_process_qps']:,.0f} | {r['job_qps']:,.0f} | "
              f"{r['ratio']:.2f} | {r['job_stages_s']['load_s']:.1f} | {r['same_ids']} |")
    if a.out:
        pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
