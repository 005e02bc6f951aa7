"""Batch-invariant products (pipeline.codec.rowwise): what they cost, and what plain products break.

For the search's three products (the QINCo decoder's layers, the lookup tables and the coarse
probe) this measures, plain torch products against ``pipeline.codec.rowwise``'s tiled ones:

- time: a re-rank's decode of R rows (``Decoder``, float32 and bfloat16) on 1 and 2 threads, the
  lookup tables of Q queries (``ShardSearcher._luts``), and the probe (``FlatProbe``) beside
  Faiss's ``IndexFlatL2`` search (the baseline probe) over the same centroids;
- invariance: of the decoded rows, how many differ in any bit from the same rows decoded in one
  batch when they are decoded in batches of 1 to 40 rows and on 1, 2 or 4 threads.

    .venv/bin/python bench/bench_rowwise.py [--rows 2000] [--queries 1000] [--out bench/out/rowwise.json]

Run it as well under ``env $(.ci/avx2-env)`` to see the AVX2 kernels' behaviour.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import pipeline.codec.decoder as decoder_mod  # noqa: E402
from pipeline.sysinfo import machine_info  # noqa: E402
from pipeline.codec.model import QINCo, QincoConfig  # noqa: E402
from pipeline.codec.rowwise import TILE_ROWS, matmul_rows  # noqa: E402


def plain_matmul(x, w):
    return x @ w


def best_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * min(ts)


def random_model(dim: int, M: int, nlist: int, seed: int = 0) -> QINCo:
    torch.manual_seed(seed)
    model = QINCo(QincoConfig(dim=dim, M=M, K=256, nlist=nlist, L=2, de=64, dh=128))
    with torch.no_grad():
        for p in model.parameters():  # trained-looking weights: every layer of the network matters
            p.add_(torch.randn_like(p) * 0.05)
        model.set_centroids(torch.randn(nlist, dim))
    return model


def with_products(kind: str):
    """The decoder's products: ``pipeline.codec.rowwise``'s (with the decoder's padding of its rows to
    whole tiles), or plain products on the rows as given, as the decoder computed them before."""
    decoder_mod.matmul_rows = matmul_rows if kind == "rowwise" else plain_matmul
    decoder_mod.TILE_ROWS = TILE_ROWS if kind == "rowwise" else 1


def decode_rows(a, model, codes, lids) -> list[dict]:
    rows = []
    for prec in ("float32", "bfloat16"):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            row = {"stage": "decode", "precision": prec, "threads": threads, "rows": len(codes)}
            for kind in ("plain", "rowwise"):
                with_products(kind)
                dec = decoder_mod.Decoder(model, prec)
                row[f"{kind}_ms"] = best_ms(lambda: dec(codes, lids), a.repeats)
            rows.append(row)
    with_products("rowwise")
    return rows


def invariance_rows(model, codes, lids) -> list[dict]:
    rows = []
    for prec in ("float32", "bfloat16"):
        for kind in ("plain", "rowwise"):
            with_products(kind)
            torch.set_num_threads(2)
            ref = decoder_mod.Decoder(model, prec)(codes, lids)
            n = bad = 0
            for threads in (1, 2, 4):
                torch.set_num_threads(threads)
                dec = decoder_mod.Decoder(model, prec)
                for b in range(1, 41):
                    got = dec(codes[:b], lids[:b])
                    n += b
                    bad += int((got != ref[:b]).any(axis=1).sum())
            rows.append({"stage": "invariance", "precision": prec, "products": kind,
                         "rows_decoded": n, "rows_differing": bad})
    with_products("rowwise")
    torch.set_num_threads(2)
    return rows


def lut_and_probe_rows(a, model) -> list[dict]:
    import faiss

    from pipeline.search.probe import FlatProbe
    from pipeline.search.scan import ShardSearcher

    rng = np.random.default_rng(1)
    D, M, K = model.config.dim, model.config.M, model.config.K
    cent = model.centroids_LD.numpy()
    cb = rng.normal(size=(M, K, D)).astype(np.float32)
    s = ShardSearcher(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros((0, M), np.uint8),
                      np.zeros(len(cent) + 1, np.int64), cent, cb)
    q = rng.normal(size=(a.queries, D)).astype(np.float32)
    cbT = torch.from_numpy(np.ascontiguousarray(cb.reshape(M * K, D).T))
    rows = []
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    qt = torch.from_numpy(q * np.float32(-2))
    rows.append({"stage": "lookup tables", "threads": 1, "queries": a.queries,
                 "plain_ms": best_ms(lambda: qt @ cbT, a.repeats),
                 "rowwise_ms": best_ms(lambda: s._luts(q), a.repeats)})
    probe = FlatProbe(cent)
    flat = faiss.IndexFlatL2(D)
    flat.add(cent)
    cT = probe.cT_DL
    qq = torch.from_numpy(q)
    rows.append({"stage": "probe (nprobe 8)", "threads": 1, "queries": a.queries,
                 "plain_ms": best_ms(lambda: torch.topk(probe.cnorm_L - 2 * (qq @ cT), 8, largest=False), a.repeats),
                 "rowwise_ms": best_ms(lambda: probe.search(q, 8), a.repeats),
                 "faiss_IndexFlatL2_ms": best_ms(lambda: flat.search(q, 8), a.repeats)})
    torch.set_num_threads(2)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--M", type=int, default=8)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=2000, help="rows per re-rank decode")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(HERE / "out" / "rowwise.json"))
    a = ap.parse_args(argv)
    model = random_model(a.dim, a.M, a.nlist)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (a.rows, a.M)).astype(np.uint8)
    lids = rng.integers(0, a.nlist, a.rows)
    rows = decode_rows(a, model, codes, lids) + invariance_rows(model, codes, lids) + lut_and_probe_rows(a, model)
    for r in rows:
        print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "machine": machine_info(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
