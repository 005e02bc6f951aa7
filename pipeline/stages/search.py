"""The query job: query batches through the shard actors, results and a report written.

The stages (probe, shortlist, exact merge, re-rank) are :mod:`pipeline.search.pipeline`'s, run
by :class:`pipeline.distributed.shard_pool.ShardPool`; the parameters are one
:class:`~pipeline.search.params.SearchParams`. Before any actor starts, the driver checks that
the model at the manifest's model URI is the one that encoded the version (its weights' SHA-256):
a model retrained into the same URI is refused, naming it, rather than decoding every code wrongly.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import JsonConfig, code_version
from pipeline.distributed.shard_pool import ShardPool
from pipeline.errors import ConfigError
from pipeline.index.history import link_evaluation, record_event
from pipeline.io import results
from pipeline.io import storage, vectors
from pipeline.io.results import write_results
from pipeline.search.evaluation import k_recall_at_k, recall_at
from pipeline.search.params import SearchParams
from pipeline.search.tuning import RERANK_LADDER, check_measure, tune
from pipeline.sysinfo import peak_rss_bytes

log = logging.getLogger(__name__)


@dataclass
class TuneSpec(JsonConfig):
    """``qinco search --target-recall``: before the search, choose nprobe, shortlist and re-rank as
    the fastest setting whose ``measure`` reaches ``target_recall`` on ``sample`` tuning queries
    (``queries_uri``, default the job's own) with their ground truth (:mod:`pipeline.search.tuning`)."""

    target_recall: float
    groundtruth_uri: str
    queries_uri: str | None = None
    measure: str = "R@10"
    sample: int = 1000
    max_rerank: int = RERANK_LADDER[-1]  # the longest re-rank tried


@dataclass
class SearchJobConfig(JsonConfig):
    """One query job: what to search, with which ``params``, on how many actors.

    ``rerank_precision``: the QINCo decoder's arithmetic in the re-rank (float32 or bfloat16);
    ``lut_scales``: rank the shortlist with the rows' stored scales (off: the plain additive
    decoder)."""

    index_uri: str
    queries_uri: str
    out_uri: str
    params: SearchParams = field(default_factory=SearchParams)
    rerank_precision: str = "float32"
    workers: int = 2
    cpus_per_worker: float = 1.0
    query_batch: int = 2048
    allow_partial: bool = False
    lut_scales: bool = True
    max_queries: int | None = None
    version: str | None = None
    memory_per_actor: int | None = None  # bytes; shards are placed so that every actor fits
    # a node-local directory: each actor memory-maps its rows from files there instead of holding them
    mmap_dir: str | None = None
    tune: TuneSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tune, dict):
            self.tune = TuneSpec.from_dict(self.tune)
        if isinstance(self.params, dict):  # from JSON
            self.params = SearchParams.from_dict(self.params)
        if self.mmap_dir is not None and "://" in self.mmap_dir:
            raise ConfigError(f"mmap_dir must be a local directory on every node, got {self.mmap_dir!r}")


def run_search(cfg: SearchJobConfig, options=None) -> dict[str, Any]:
    """Run the query job; writes results (big-ann format + parquet) and a report beside them."""
    t0 = time.perf_counter()
    params = cfg.params.validate()
    if cfg.rerank_precision not in ("float32", "bfloat16"):
        raise ConfigError(f"rerank_precision must be float32 or bfloat16, got {cfg.rerank_precision!r}")
    q = vectors.read_vectors(cfg.queries_uri, options=options, max_rows=cfg.max_queries).astype(np.float32)
    pool = ShardPool(cfg.index_uri, cfg.version, cfg.workers, cfg.cpus_per_worker, cfg.allow_partial, options,
                     cfg.lut_scales, cfg.memory_per_actor, cfg.mmap_dir)
    load_s = time.perf_counter() - t0
    try:
        if q.shape[1] != pool.dim:
            raise ConfigError(f"{storage.redact(cfg.queries_uri)}: queries have dimension {q.shape[1]}, "
                              f"the index version {pool.manifest.version} expects {pool.dim}")
        check_params_for(pool, params)
        stages: dict[str, float] = {"load_s": load_s}
        tuning = None
        if cfg.tune is not None:
            t1 = time.perf_counter()
            tuning = _tune(cfg, pool, q, params.k, options)
            params = SearchParams.from_dict(tuning["chosen"])
            stages["tune_s"] = time.perf_counter() - t1
            log.info("tuned on %d queries in %.1f s: nprobe %d, shortlist %d, rerank %d (%s %.4f at %.0f queries/s)",
                     tuning["queries"], stages["tune_s"], params.nprobe, params.shortlist, params.reranked,
                     tuning["measure"], tuning["recall"], tuning["queries_per_s"])
        Q = len(q)
        t1 = time.perf_counter()
        D_all, I_all = _search_all(pool, q, params, cfg.query_batch, cfg.rerank_precision, stages, progress=True)
        search_s = time.perf_counter() - t1
        failed = pool.failed_shards()
        failures = pool.failures()
        actors = pool.actor_memory()
        version = pool.manifest.version
        n_shards = len(pool.manifest.shards)
    finally:
        pool.close()
    written = write_results(cfg.out_uri, I_all, D_all, options)
    report = {
        "job": "search",
        "index_uri": storage.redact(cfg.index_uri),
        "version": version,
        "queries": Q,
        "params": cfg.to_dict(),
        "search_params": params.to_dict(),
        "tuning": tuning,
        "wall_s": time.perf_counter() - t0,
        "search_s": search_s,
        "queries_per_s": Q / max(search_s, 1e-9),
        "stages": stages,
        "shards": n_shards,
        "failed_shards": failed,
        "failures": failures,
        "actors": actors,
        "driver_peak_rss_bytes": peak_rss_bytes(),
        "code_version": code_version(),
        "files": [storage.redact(u) for u in written],
    }
    storage.write_bytes_atomic(cfg.out_uri + ".report.json",
                               json.dumps(report, indent=2, sort_keys=True).encode(), options)

    record_event(cfg.index_uri, "search", {k: v for k, v in report.items() if k != "params"} | {
        "out_uri": storage.redact(cfg.out_uri), "k": params.k, "nprobe": params.nprobe, "shortlist": params.shortlist},
        version=version, options=options, best_effort=True)
    return report


def check_params_for(pool: ShardPool, params: SearchParams) -> None:
    """Refuse parameters the pool's model cannot honour (the pairwise stage without a pairwise
    decoder, a prefix as long as the code)."""
    if params.pairwise is not None and not pool.model.pairwise_pairs_P2.shape[0]:
        raise ConfigError(f"the pairwise stage (pairwise={params.pairwise}) needs a model with a pairwise "
                          f"decoder; {storage.redact(pool.manifest.model['uri'])} has none (trained before it "
                          f"existed, or no pair of codes helped): search without it, or retrain the model")
    if params.prefix_steps >= pool.model.config.M:
        raise ConfigError(f"prefix_steps must be below the model's M = {pool.model.config.M} codebooks, "
                          f"got {params.prefix_steps}")


def _search_all(pool: ShardPool, q: np.ndarray, params: SearchParams, batch: int, precision: str,
                stages: dict[str, float] | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every query through the pool, ``batch`` at a time: ``(D, I)``."""
    Q = len(q)
    D_all = np.full((Q, params.k), np.inf, np.float32)
    I_all = np.full((Q, params.k), -1, np.int64)
    t1 = time.perf_counter()
    for b0 in range(0, Q, batch):
        qb = q[b0:b0 + batch]
        D_all[b0:b0 + len(qb)], I_all[b0:b0 + len(qb)] = pool.search_batch(qb, params, stages, precision)
        if progress:
            log.info("searched %d/%d queries (%.0f queries/s)", b0 + len(qb), Q,
                     (b0 + len(qb)) / max(time.perf_counter() - t1, 1e-9))
    return D_all, I_all


def _tune(cfg: SearchJobConfig, pool: ShardPool, q: np.ndarray, k: int, options) -> dict[str, Any]:
    """``cfg.tune``'s choice through the job's own actors (:func:`pipeline.search.tuning.tune`)."""
    spec = cfg.tune
    check_measure(spec.measure, k)
    if spec.sample < 1:
        raise ConfigError(f"the tuning sample must hold at least 1 query, got {spec.sample}")
    tq = q[:spec.sample] if spec.queries_uri is None else vectors.read_vectors(
        spec.queries_uri, options=options, max_rows=spec.sample).astype(np.float32)
    if tq.shape[1] != pool.dim:
        raise ConfigError(f"{storage.redact(spec.queries_uri)}: tuning queries have dimension {tq.shape[1]}, "
                          f"the index expects {pool.dim}")
    gt = read_groundtruth(spec.groundtruth_uri, len(tq), options)
    out = tune(lambda p: _search_all(pool, tq, p, cfg.query_batch, cfg.rerank_precision)[1], len(tq), gt,
               spec.target_recall, k, pool.nlist, spec.measure, spec.max_rerank)
    return out | {"queries_uri": storage.redact(spec.queries_uri or cfg.queries_uri),
                  "groundtruth_uri": storage.redact(spec.groundtruth_uri)}


def read_groundtruth(uri: str, rows: int, options=None) -> np.ndarray:
    """The first ``rows`` rows of a ground-truth file (ivecs, or big-ann k-NN results) as int64;
    ConfigError naming the file when it has fewer."""
    if vectors.detect_format(uri) == "ivecs":
        gt = vectors.read_vectors(uri, options=options, max_rows=rows).astype(np.int64)
    else:
        gt, _ = results.read_knn_results(uri, options=options)
    if len(gt) < rows:
        raise ConfigError(f"{storage.redact(uri)} has {len(gt)} ground-truth rows, {rows} queries need one each")
    return gt[:rows]


def evaluate_results(results_uri: str, groundtruth_uri: str, options=None) -> dict[str, float]:
    """Recall@1/10/100 (QINCo definition) and k-recall@k of a results file against ground truth."""
    I, _ = results.read_results(results_uri, options=options)
    gt = read_groundtruth(groundtruth_uri, len(I), options)
    k = I.shape[1]
    ks = tuple(x for x in (1, 10, 100) if x <= k)
    out = dict(recall_at(I, gt, ks=ks))
    kk = min(k, gt.shape[1], 10)
    out[f"{kk}-recall@{kk}"] = float(k_recall_at_k(I, gt, kk))

    link_evaluation(results_uri, groundtruth_uri, out, options=options)  # into the index's history
    return out
