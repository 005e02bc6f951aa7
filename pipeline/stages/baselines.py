"""Faiss quantizer baselines (PQ, OPQ, RQ, LSQ) measured the way QINCo is measured.

Each quantizer is trained on the learn set, encodes the base, the codes are decoded, and the
queries are searched exhaustively over the decoded base; the table reports the reconstruction
MSE and R@1/10/100 against the exact ground truth. Training parameters are Faiss's defaults
(as in the QINCo papers) except two settings: the residual quantizer's beam size is fixed at 5,
and the polysemous re-ordering that ``index_factory`` enables for PQ is turned off. That
re-ordering only permutes the centroid ids of each sub-quantizer (for Hamming-distance
filtering), so it changes neither the decoded vectors nor any figure reported here, but it costs
seconds per training.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import faiss
import numpy as np

from pipeline.codec.decoder import reconstruction_mse
from pipeline.codec.metric import prepare, ranks_by_ip
from pipeline.config import JsonConfig, code_version
from pipeline.errors import ConfigError
from pipeline.io import storage, vectors
from pipeline.search.evaluation import recall_at, search_decoded
from pipeline.search.evaluation import knn_ground_truth
from pipeline.stages.datasets import resolve_dataset
from pipeline.sysinfo import machine_info

log = logging.getLogger(__name__)

METHODS = ("PQ", "OPQ", "RQ", "LSQ")
RQ_BEAM_SIZE = 5
TABLE_COLUMNS = ("method", "factory", "bytes", "mse", "R@1", "R@10", "R@100",
                 "train_s", "encode_vps", "threads")
_ENCODE_BLOCK = 65536


def _padded_dim(d: int, M: int) -> int:
    return -(-d // M) * M


def factory_string(method: str, code_bytes: int, d: int | None = None) -> str:
    """Faiss factory string of ``method`` with ``code_bytes`` 8-bit codebooks.

    PQ and OPQ split the vector into ``code_bytes`` equal sub-vectors; when the dimension ``d``
    is not a multiple of it, the vector is first zero-padded to the next multiple (written
    ``Pad<d'>,PQ..`` here, a uniform ``RemapDimensionsTransform``) or, for OPQ, rotated into
    that larger dimension (``OPQ<M>_<d'>``).
    """
    M = int(code_bytes)
    if method not in METHODS:
        raise ConfigError(f"unknown baseline method {method!r}; expected one of {METHODS}")
    if M < 1:
        raise ConfigError(f"code size must be >= 1 byte, got {code_bytes}")
    pad = d is not None and d % M != 0
    if method == "PQ":
        return f"Pad{_padded_dim(d, M)},PQ{M}x8" if pad else f"PQ{M}x8"
    if method == "OPQ":
        return f"OPQ{M}_{_padded_dim(d, M)},PQ{M}x8" if pad else f"OPQ{M},PQ{M}x8"
    return f"{method}{M}x8"


def make_quantizer(method: str, code_bytes: int, d: int, seed: int = 1234):
    """An untrained Faiss index whose ``sa_encode``/``sa_decode`` implement the quantizer."""
    fs = factory_string(method, code_bytes, d)
    if fs.startswith("Pad"):
        d_pad = _padded_dim(d, code_bytes)
        inner = faiss.IndexPQ(d_pad, int(code_bytes), 8)
        index = faiss.IndexPreTransform(faiss.RemapDimensionsTransform(d, d_pad, True), inner)
    else:
        index = faiss.index_factory(d, fs)
    if method == "PQ":
        pq_index = faiss.downcast_index(index.index) if fs.startswith("Pad") else index
        pq_index.do_polysemous_training = False
        pq_index.pq.cp.seed = seed
    elif method == "OPQ":
        inner = faiss.downcast_index(index.index)
        inner.do_polysemous_training = False
        inner.pq.cp.seed = seed
    elif method == "RQ":
        index.rq.max_beam_size = RQ_BEAM_SIZE
        index.rq.cp.seed = seed
    elif method == "LSQ":
        index.lsq.random_seed = seed
    return index


def _as_float32(x, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ConfigError(f"{name} must be a non-empty 2-D array, got shape {x.shape}")
    return x


def evaluate_quantizer(index, base: np.ndarray, queries: np.ndarray, gt: np.ndarray,
                       k: int, metric: str = "l2") -> dict:
    """Encode + decode ``base`` with a trained quantizer, measure MSE and recall, searching the
    decoded vectors by ``metric`` as an index of that metric ranks them (inner products with the
    reconstructions for ``ip`` and ``cosine``, whose inputs are already unit rows)."""
    n = base.shape[0]
    decoded = np.empty_like(base)
    t0 = time.perf_counter()
    for i0 in range(0, n, _ENCODE_BLOCK):
        codes = index.sa_encode(base[i0:i0 + _ENCODE_BLOCK])
        decoded[i0:i0 + _ENCODE_BLOCK] = index.sa_decode(codes)
        done = min(n, i0 + _ENCODE_BLOCK)
        log.info("encoded %d/%d vectors (%.0f vectors/s)", done, n,
                 done / max(time.perf_counter() - t0, 1e-9))
    encode_s = time.perf_counter() - t0
    _, I = search_decoded(queries, decoded, k, "ip" if ranks_by_ip(metric) else "l2")
    ks = [kk for kk in (1, 10, 100) if kk <= k]
    out = {"mse": reconstruction_mse(base, decoded), **recall_at(I, gt, ks)}
    out["encode_vps"] = n / max(encode_s, 1e-9)
    return out


def run_baselines(learn, base, queries, gt, code_bytes: Sequence[int] = (8, 16),
                  methods: Sequence[str] = METHODS, k: int = 100, seed: int = 1234,
                  metric: str = "l2") -> list[dict]:
    """Train, encode, decode and search with each Faiss quantizer; one result row per method.

    ``gt`` holds the exact neighbours of ``queries`` in ``base`` by ``metric`` (at least one
    column). Inputs of any dtype are converted to float32 copies; for ``cosine`` to unit rows, on
    which the quantizers are trained and measured, as a cosine index is.
    """
    learn = prepare(_as_float32(learn, "learn"), metric, "learn")
    base = prepare(_as_float32(base, "base"), metric, "base")
    queries = prepare(_as_float32(queries, "queries"), metric, "queries")
    gt = np.asarray(gt)
    d = learn.shape[1]
    if base.shape[1] != d or queries.shape[1] != d:
        raise ConfigError(f"dimensions differ: learn {d}, base {base.shape[1]}, queries {queries.shape[1]}")
    if gt.ndim != 2 or gt.shape[0] != queries.shape[0]:
        raise ConfigError(f"ground truth shape {gt.shape} does not match {queries.shape[0]} queries")
    if gt.size and (gt.min() < 0 or gt.max() >= base.shape[0]):
        raise ConfigError(f"ground-truth ids outside [0, {base.shape[0]}): is it for another base?")
    for m in methods:
        factory_string(m, 8, d)
    k = min(k, base.shape[0])
    rows = []
    for nbytes in code_bytes:
        for method in methods:
            fs = factory_string(method, nbytes, d)
            index = make_quantizer(method, nbytes, d, seed=seed)
            log.info("training %s on %d vectors", fs, learn.shape[0])
            t0 = time.perf_counter()
            index.train(learn)
            train_s = time.perf_counter() - t0
            log.info("trained %s in %.1f s", fs, train_s)
            res = evaluate_quantizer(index, base, queries, gt, k, metric)
            row = {"method": method, "factory": fs, "bytes": int(nbytes), "metric": metric, **res,
                   "train_s": train_s, "n_learn": learn.shape[0], "n_base": base.shape[0],
                   "n_query": queries.shape[0]}
            if method == "RQ":
                row["beam_size"] = RQ_BEAM_SIZE
            log.info("%s: mse %.4g R@1 %.4f", fs, row["mse"], row["R@1"])
            rows.append(row)
    return rows


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key == "mse":
        return f"{v:,.6g}" if abs(v) < 100 else f"{v:,.0f}"
    if key.startswith("R@"):
        return f"{v:.3f}"
    if key == "train_s":
        return f"{v:.1f}"
    if key == "encode_vps":
        return f"{v:,.0f}"
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table of result rows (also readable as aligned plain text)."""
    if columns is None:
        columns = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
        extra = ["dataset"] if any("dataset" in r for r in rows) else []
        columns = extra + columns
    cells = [[_fmt(c, r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[j]) for row in cells]) for j, c in enumerate(columns)]
    numeric = [c not in ("dataset", "method", "factory") for c in columns]

    def line(vals):
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(vals, widths, numeric)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else (":" + "-" * (w + 1))
                         for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(columns), sep] + [line(r) for r in cells])


def load_inputs(learn: str, base: str, queries: str, groundtruth: str | None = None, *,
                max_learn: int | None = None, max_base: int | None = None,
                max_queries: int | None = None, k: int = 100, metric: str = "l2"):
    """Read the four inputs of a baseline run, computing the ground truth (by ``metric``) when
    it is absent, when the base is truncated or when the metric is not L2 (the shipped ground
    truth then no longer applies)."""
    xt = vectors.read_vectors(learn, max_rows=max_learn)
    xb = vectors.read_vectors(base, max_rows=max_base)
    xq = vectors.read_vectors(queries, max_rows=max_queries)
    full_base = max_base is None or max_base >= vectors.info(base).count
    if groundtruth and full_base and not ranks_by_ip(metric):
        gt = vectors.read_vectors(groundtruth, max_rows=max_queries)
        if gt.shape[0] != xq.shape[0]:
            raise ConfigError(f"{groundtruth}: {gt.shape[0]} ground-truth rows for {xq.shape[0]} queries")
    else:
        log.info("computing exact ground truth of %d queries over %d base vectors",
                 xq.shape[0], xb.shape[0])
        _, gt = knn_ground_truth(xq, xb, k=min(k, xb.shape[0]), metric=metric)
    return xt, xb, xq, gt


@dataclass
class BaselinesConfig(JsonConfig):
    """``qinco baselines``: the Faiss quantizers on four vector files, or on a named dataset."""

    out: str
    learn: str | None = None
    base: str | None = None
    queries: str | None = None
    groundtruth: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    bytes: list[int] = field(default_factory=lambda: [8, 16])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    max_learn: int | None = None
    max_base: int | None = None
    max_queries: int | None = None
    k: int = 100
    seed: int = 1234
    metric: str = "l2"


def run_baselines_job(cfg: BaselinesConfig, echo=print) -> dict:
    """Run the baselines, print their table, write the JSON report atomically; returns it."""
    uris = {"learn": cfg.learn, "base": cfg.base, "queries": cfg.queries, "groundtruth": cfg.groundtruth}
    if cfg.dataset:
        ds = resolve_dataset(cfg.dataset, cfg.data_dir)
        defaults = {"learn": ds.learn, "base": ds.base, "queries": ds.query, "groundtruth": ds.groundtruth}
        uris = {key: uris[key] or defaults[key] for key in uris}
    missing = [f"--{key}" for key in ("learn", "base", "queries") if not uris[key]]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (or give --dataset)")
    xt, xb, xq, gt = load_inputs(uris["learn"], uris["base"], uris["queries"], uris["groundtruth"],
                                 max_learn=cfg.max_learn, max_base=cfg.max_base,
                                 max_queries=cfg.max_queries, k=cfg.k, metric=cfg.metric)
    rows = run_baselines(xt, xb, xq, gt, code_bytes=cfg.bytes, methods=cfg.methods, k=cfg.k, seed=cfg.seed,
                         metric=cfg.metric)
    echo(format_table(rows))
    report = {
        "rows": rows,
        "arguments": {key: storage.redact(v) if isinstance(v, str) else v for key, v in cfg.to_dict().items()},
        "inputs": {key: storage.redact(v) if v else v for key, v in uris.items()},
        "code_version": code_version(),
        "machine": machine_info(),
    }
    storage.write_bytes_atomic(cfg.out, json.dumps(report, indent=2, sort_keys=True).encode())
    echo(f"wrote {storage.redact(cfg.out)}")
    return report
