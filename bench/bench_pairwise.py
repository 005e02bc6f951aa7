"""The pairwise decoder beside the additive (lookup-table) and QINCo decoders.

For a trained model (``--model``, e.g. ``qinco train --data <learn> --ivf 1024``) and a dataset:

- the search decoders are fitted as ``qinco train`` fits them (``pipeline.train.setup.fit_decoder``:
  additive, then pairwise, on the first ``--fit-rows`` learn rows);
- the first ``--base`` base vectors are encoded and searched in-process (one shard,
  ``ShardSearcher``) with ``--queries`` queries against their exact ground truth (brute force over
  those rows, computed here);
- reported: the reconstruction MSE of held-out base rows for the QINCo decoder, the additive
  decoder without and with row scales, and the pairwise decoder; and R@1 / R@10 / queries/s for
  the search stages at one nprobe: the lookup-table ranking, the pairwise ranking of the
  shortlist, and the QINCo re-rank of the lookup table's best R against that of the pairwise
  stage's best R (``--rerank``), the Faiss baselines (IVF-RQ, IVF-PQ, same coarse quantizer) beside
  them.

Writes ``--out`` (JSON) and prints a table.

    .venv/bin/python bench/bench_pairwise.py --dataset dwsift --model /tmp/pw/dwsift-8
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_search import DEFAULT_RQ_BEAM, faiss_ivf  # noqa: E402
sys.path.insert(0, str(HERE.parent))

import faiss  # noqa: E402
import torch  # noqa: E402

from pipeline.codec.additive import decode_additive  # noqa: E402
from pipeline.codec.decoder import (Decoder, decode, model_centroids, model_codebooks,  # noqa: E402
                                    model_pairwise, model_row_scales, reconstruction_mse)
from pipeline.codec.encoder import encode  # noqa: E402
from pipeline.codec.model_file import load_model  # noqa: E402
from pipeline.search.params import SearchParams  # noqa: E402
from pipeline.search.scan import build_searcher  # noqa: E402
from pipeline.stages.datasets import resolve_dataset  # noqa: E402
from pipeline.io.vectors import read_vectors  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.setup import fit_decoder  # noqa: E402


def recalls(I_QK: np.ndarray, gt_Q: np.ndarray) -> tuple[float, float]:
    hit = I_QK[:, :10] == gt_Q[:, None]
    return float(hit[:, :1].any(1).mean()), float(hit.any(1).mean())


def timed(fn, repeats: int = 2):
    best, out = np.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--fit-rows", type=int, default=50_000)
    ap.add_argument("--base", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--shortlist", type=int, default=200)
    ap.add_argument("--rerank", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    ds = resolve_dataset(a.dataset, a.data_dir)
    model = load_model(a.model)
    M = model.config.M
    xl = read_vectors(ds.learn).astype(np.float32)[:a.fit_rows]
    xb = read_vectors(ds.base).astype(np.float32)[:a.base]
    xq = read_vectors(ds.query).astype(np.float32)[:a.queries]
    t = time.perf_counter()
    fit_decoder(model, xl, TrainConfig(additive_max_rows=a.fit_rows))
    fit_s = time.perf_counter() - t
    pw = model_pairwise(model)
    n_pairs = 0 if pw is None else pw.pairs
    print(f"decoders fitted on {len(xl):,} learn rows in {fit_s:.0f} s: {n_pairs} pairs "
          f"({model.pairwise_PQD.numel() * 2 / 1e6:.1f} MB)")

    codes, lists = encode(model, xb)
    cent = model_centroids(model)
    scales = model_row_scales(model, codes, lists)
    held = slice(0, min(10_000, len(xb)))  # base rows are never seen by the fits
    xhat = decode(model, codes[held], lists[held])
    add = decode_additive(model_codebooks(model), codes[held], lists[held], cent)
    add_s = cent[lists[held]] + scales[held, None].astype(np.float32) * (add - cent[lists[held]])
    mse = {"QINCo": reconstruction_mse(xb[held], xhat), "additive": reconstruction_mse(xb[held], add),
           "additive + row scales": reconstruction_mse(xb[held], add_s)}
    mse_q = {"additive": reconstruction_mse(xhat, add), "additive + row scales": reconstruction_mse(xhat, add_s)}
    if pw is not None:
        p = pw(codes[held], lists[held])
        mse["pairwise"] = reconstruction_mse(xb[held], p)
        mse_q["pairwise"] = reconstruction_mse(xhat, p)

    gt = faiss.knn(xq, xb, 1)[1][:, 0]
    order = np.lexsort((np.arange(len(lists)), lists))
    offsets = np.searchsorted(lists[order], np.arange(model.config.nlist + 1))
    s = build_searcher(model, lists[order], order, codes[order], offsets, scale_N=scales[order],
                       decode_fn=Decoder(model), num_threads=a.threads)
    rows = []

    def point(name, **kw):
        params = SearchParams(k=10, nprobe=a.nprobe, shortlist=a.shortlist, **kw)
        sec, (_, I) = timed(lambda: s.search(xq, params))
        r1, r10 = recalls(I, gt)
        rows.append({"method": name, "params": params.to_dict(), "R@1": r1, "R@10": r10, "qps": len(xq) / sec})

    point("lookup tables", rerank=0)
    if pw is not None:
        point("pairwise", pairwise=10, rerank=0)
    for R in a.rerank:
        point(f"LUT -> QINCo {R}", rerank=R)
        if pw is not None:
            point(f"LUT -> pairwise {R} -> QINCo {R}", pairwise=max(R, 10), rerank=R)
    point(f"LUT -> QINCo {a.shortlist}", rerank=None)

    xt = read_vectors(ds.learn).astype(np.float32)
    for kind in ("IVF-RQ", "IVF-PQ"):
        index = faiss_ivf(kind, cent, xt, xb, M, DEFAULT_RQ_BEAM)[0]
        faiss.extract_index_ivf(index).nprobe = a.nprobe
        sec, (_, I) = timed(lambda: index.search(xq, 10))
        r1, r10 = recalls(I, gt)
        rows.append({"method": f"Faiss {kind}", "R@1": r1, "R@10": r10, "qps": len(xq) / sec})
        mse[f"Faiss {kind}"] = reconstruction_mse(xb[held], index.sa_decode(index.sa_encode(xb[held])))

    print(f"\n{a.dataset}, {M} bytes, base {len(xb):,}, {len(xq):,} queries, nprobe {a.nprobe}, "
          f"shortlist {a.shortlist}, {a.threads} threads")
    print("\n| decoder | MSE to x (held-out base) | MSE to QINCo's x̂ |\n|---|---:|---:|")
    for k, v in mse.items():
        print(f"| {k} | {v:.5g} | {mse_q.get(k, float('nan')):.5g} |")
    print("\n| search | R@1 | R@10 | queries/s |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['R@1']:.3f} | {r['R@10']:.3f} | {r['qps']:,.0f} |")
    report = {"dataset": a.dataset, "model": a.model, "bytes": M, "args": vars(a), "pairs": n_pairs,
              "pairs_P2": [] if pw is None else pw.pairs_P2.tolist(), "fit_s": fit_s,
              "mse": mse, "mse_to_qinco": mse_q, "search": rows}
    if a.out:
        pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(a.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
