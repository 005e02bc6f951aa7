"""Shortlist decoder quality: how well the additive (lookup-table) decoder approximates QINCo.

The search's lookup-table stage ranks candidates with the least-squares additive decoder fitted
to the QINCo codes; only its shortlist reaches the neural decoder. This measures, for an index
built by ``bench_search.py`` (its ``--work`` directory):

- reconstruction MSE on held-out base vectors of the neural decoder, of the model's additive
  decoder and of additive decoders refitted on more base rows (``--refit-rows``);
- LUT-only R@1 / R@10 at each ``--nprobe`` for each of those additive decoders;
- beside them, Faiss IVF-RQ (beam 5) on the same coarse quantizer, trained on the same set
  (``--train-set``): its reconstruction MSE and R@1 / R@10 at the same nprobe.

Writes ``<work>/shortlist_decoder.json`` and the "Shortlist decoder" section of RESULTS.md.

    .venv/bin/python bench/bench_shortlist_decoder.py --dataset glove50 --bytes 16 \
        --work bench/out/search_glove16_lb --train-set learn+base
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shlex
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_search import DEFAULT_RQ_BEAM, faiss_ivf, qinco_searcher, recalls  # noqa: E402
from results_md import update_section  # noqa: E402

BEGIN = "<!-- section: shortlist-decoder (bench/bench_shortlist_decoder.py) -->"
END = "<!-- end section: shortlist-decoder -->"


def mse(x_ND: np.ndarray, xhat_ND: np.ndarray) -> float:
    return float(np.mean(np.sum((np.asarray(xhat_ND, np.float64) - x_ND) ** 2, axis=1)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="glove50")
    ap.add_argument("--bytes", type=int, default=16)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--work", required=True, help="a bench_search.py --work directory (model and index)")
    ap.add_argument("--train-set", choices=["learn", "learn+base"], default="learn",
                    help="training set of the Faiss IVF-RQ baseline (as in bench_search.py)")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--refit-rows", type=int, nargs="*", default=[240000])
    ap.add_argument("--holdout", type=int, default=20000, help="base rows kept out of every refit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    a = ap.parse_args(argv)

    import faiss
    import torch

    from pipeline import vecs_io
    from pipeline.additive_decoder import decode_additive, fit_additive_decoder
    from pipeline.baselines import machine_info
    from pipeline.datasets import resolve_dataset
    from pipeline.decoder import decode
    from pipeline.search_kernels import SearchParams, ShardSearcher

    faiss.omp_set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    work = pathlib.Path(a.work)
    ds = resolve_dataset(a.dataset, a.data_dir)
    xt = vecs_io.read_vectors(ds.learn).astype(np.float32)
    xb = vecs_io.read_vectors(ds.base).astype(np.float32)
    xq = vecs_io.read_vectors(ds.query, max_rows=a.queries).astype(np.float32)
    gt = vecs_io.read_vectors(ds.groundtruth, max_rows=a.queries)[:, 0].astype(np.int64)
    centroids = np.load(work / f"{a.dataset}_ivf{a.nlist}_learn{len(xt)}.npy")
    searcher, model = qinco_searcher(str(work / f"{a.dataset}_{a.bytes}B" / "index"), a.threads)
    x_N = xb[searcher.ids_N]  # base vectors in shard row order
    hold = np.arange(searcher.N - a.holdout, searcher.N)  # the last rows: never refitted on
    rng = np.random.default_rng(0)

    def lut_recalls(codebooks_MKD: np.ndarray) -> dict:
        s = ShardSearcher(searcher.list_ids_N, searcher.ids_N, searcher.codes_NM, searcher.list_offsets,
                          centroids, codebooks_MKD, num_threads=a.threads)
        out = {}
        for p in a.nprobe:
            _, I = s.search(xq, SearchParams(k=10, nprobe=p, shortlist=10))
            out[p] = recalls(I, gt)
        return out

    def additive_row(name: str, codebooks_MKD: np.ndarray) -> dict:
        xh = decode_additive(codebooks_MKD, searcher.codes_NM[hold], searcher.list_ids_N[hold], centroids)
        return {"decoder": name, "mse": mse(x_N[hold], xh), "recalls": lut_recalls(codebooks_MKD)}

    rows = []
    t = time.perf_counter()
    xh = decode(model, searcher.codes_NM[hold], searcher.list_ids_N[hold])
    rows.append({"decoder": "QINCo (neural)", "mse": mse(x_N[hold], xh), "recalls": {}})
    rows.append(additive_row("additive, the model's", searcher.codebooks_MKD))
    for n in a.refit_rows:
        sel = rng.choice(searcher.N - a.holdout, min(n, searcher.N - a.holdout), replace=False)
        cb = fit_additive_decoder(searcher.codes_NM[sel], x_N[sel], searcher.K, searcher.list_ids_N[sel],
                                  centroids)
        rows.append(additive_row(f"additive, refitted on {len(sel):,} base rows", cb))
    xtrain = xt if a.train_set == "learn" else np.concatenate([xt, xb])
    index, train_s, add_s = faiss_ivf("IVF-RQ", centroids, xtrain, xb, a.bytes)
    del xtrain
    index.make_direct_map()
    rq_rows = np.asarray(searcher.ids_N[hold], dtype=np.int64)
    xh_rq = index.reconstruct_batch(rq_rows)
    rq = {"decoder": f"Faiss IVF-RQ (beam {DEFAULT_RQ_BEAM}, trained on {a.train_set})",
          "mse": mse(xb[rq_rows], xh_rq), "recalls": {}}
    for p in a.nprobe:
        index.nprobe = p
        rq["recalls"][p] = recalls(index.search(xq, 10)[1], gt)
    rows.append(rq)
    elapsed = time.perf_counter() - t

    command = "python bench/bench_shortlist_decoder.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    m = machine_info()
    head = "| decoder | MSE (held-out base) | " + " | ".join(f"R@1 / R@10 nprobe {p}" for p in a.nprobe) + " |"
    table = [head, "|:--|--:|" + "--:|" * len(a.nprobe)]
    for r in rows:
        cells = [f"{r['recalls'][p][0]:.3f} / {r['recalls'][p][1]:.3f}" if p in r["recalls"] else "-"
                 for p in a.nprobe]
        table.append(f"| {r['decoder']} | {r['mse']:.4g} | " + " | ".join(cells) + " |")
    section = "\n".join([
        "## Shortlist decoder: additive (lookup-table) decoder against QINCo and Faiss IVF-RQ", "",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} cores; date: "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; {elapsed:.0f} s",
        f"- command: `{command.strip()}`",
        f"- protocol: {a.dataset} {a.bytes} B, the IVF-QINCo model and index of `{a.work}`; MSE = mean squared "
        f"L2 error of the reconstruction of the last {a.holdout:,} base rows of the index (kept out of every "
        f"refit); R@1 / R@10 of the lookup-table ranking alone (no re-rank), {a.queries} queries, shortlist 10; "
        f"Faiss IVF-RQ on the same coarse quantizer, trained in this run (train {train_s:.0f} s, add {add_s:.0f} s).",
        "", *table, ""])
    update_section(pathlib.Path(a.results_md), BEGIN, END, section)
    (work / "shortlist_decoder.json").write_text(json.dumps(
        {"command": command, "rows": rows, "machine": m}, indent=2, default=float))
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
