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
from pipeline.search.evaluation import k_recall_at_k, recall_at
from pipeline.search.params import SearchParams
from pipeline.search.tuning import RERANK_LADDER, check_measure, tune
from pipeline.progress import Progress
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
    vector_column: str | None = None  # parquet queries: the column holding them (None: "vector")

    def __post_init__(self) -> None:
        if isinstance(self.tune, dict):
            self.tune = TuneSpec.from_dict(self.tune)
        if isinstance(self.params, dict):  # from JSON
            self.params = SearchParams.from_dict(self.params)
        if self.mmap_dir is not None and "://" in self.mmap_dir:
            raise ConfigError(f"mmap_dir must be a local directory on every node, got {self.mmap_dir!r}")


PARTS_SUFFIX = ".parts"  # OUT.parts/: the job's state and one results part per query block
STATE_FILE = "job.json"


def parts_dir(out_uri: str) -> str:
    """Where the query job for ``out_uri`` keeps its state and results parts until it completes."""
    return out_uri + PARTS_SUFFIX


def _part_uri(out_uri: str, block: int) -> str:
    return storage.join(parts_dir(out_uri), f"block-{block:09d}.npz")


def _job_identity(cfg: SearchJobConfig, queries: int) -> dict[str, Any]:
    """What makes a re-run the same job (the resources do not change results)."""
    d = cfg.to_dict()
    for name in ("workers", "cpus_per_worker", "memory_per_actor", "mmap_dir", "out_uri"):
        d.pop(name)
    if d["vector_column"] is None:  # as jobs written before the field had it
        d.pop("vector_column")
    d["queries"] = queries
    return d


def _resume_state(cfg: SearchJobConfig, ident: dict, options) -> dict | None:
    """The state of an interrupted run of this same job at ``cfg.out_uri``, or None. The parts of
    another job there (other parameters, queries or index) are removed."""
    uri = storage.join(parts_dir(cfg.out_uri), STATE_FILE)
    if not storage.exists(uri, options):
        return None
    try:
        state = json.loads(storage.read_bytes(uri, options))
    except ValueError:
        state = {}
    if state.get("identity") == ident:
        return state
    log.info("%s holds the parts of another query job: starting over", storage.redact(parts_dir(cfg.out_uri)))
    storage.remove(parts_dir(cfg.out_uri), options, recursive=True)
    return None


def run_search(cfg: SearchJobConfig, options=None) -> dict[str, Any]:
    """Run the query job; writes results (big-ann format + parquet) and a report beside them.

    Queries are read and searched ``query_batch`` at a time; each block's results go to a part
    under ``OUT.parts/`` as soon as they are known, and the result files are assembled from the
    parts at the end (then the parts are removed). Memory holds one block, whatever the number of
    queries. A run that was interrupted resumes when the same command runs again: the version it
    searched and the parameters it chose (``--target-recall``) are kept in ``OUT.parts/job.json``,
    and only the blocks without a part are searched."""
    t0 = time.perf_counter()
    params = cfg.params.validate()
    if cfg.rerank_precision not in ("float32", "bfloat16"):
        raise ConfigError(f"rerank_precision must be float32 or bfloat16, got {cfg.rerank_precision!r}")
    qinfo = vectors.info(cfg.queries_uri, options=options, columns=vectors.parquet_columns(cfg.vector_column))
    Q = qinfo.count if cfg.max_queries is None else min(qinfo.count, cfg.max_queries)
    if Q < 1:
        raise ConfigError(f"{storage.redact(cfg.queries_uri)}: no queries to search")
    ident = _job_identity(cfg, Q)
    state = _resume_state(cfg, ident, options)
    pool = ShardPool(cfg.index_uri, state["version"] if state else cfg.version, cfg.workers, cfg.cpus_per_worker,
                     cfg.allow_partial, options, cfg.lut_scales, cfg.memory_per_actor, cfg.mmap_dir)
    load_s = time.perf_counter() - t0
    batch = cfg.query_batch
    blocks = -(-Q // batch)
    try:
        if qinfo.dim != pool.dim:
            raise ConfigError(f"{storage.redact(cfg.queries_uri)}: queries have dimension {qinfo.dim}, "
                              f"the index version {pool.manifest.version} expects {pool.dim}")
        check_params_for(pool, params)
        stages: dict[str, float] = {"load_s": load_s}
        if state is None:
            tuning = None
            if cfg.tune is not None:
                t1 = time.perf_counter()
                tuning = _tune(cfg, pool, qinfo, params.k, options)
                params = SearchParams.from_dict(tuning["chosen"])
                stages["tune_s"] = time.perf_counter() - t1
                log.info("tuned on %d queries in %.1f s: nprobe %d, shortlist %d, rerank %d (%s %.4f at %.0f "
                         "queries/s)", tuning["queries"], stages["tune_s"], params.nprobe, params.shortlist,
                         params.reranked, tuning["measure"], tuning["recall"], tuning["queries_per_s"])
            state = {"identity": ident, "version": pool.manifest.version, "search_params": params.to_dict(),
                     "tuning": tuning}
            storage.write_bytes_atomic(storage.join(parts_dir(cfg.out_uri), STATE_FILE),
                                       json.dumps(state, indent=2).encode(), options)
        else:
            params, tuning = SearchParams.from_dict(state["search_params"]), state["tuning"]
        present = set(storage.list_files(parts_dir(cfg.out_uri), options))
        todo = [b for b in range(blocks) if _part_uri(cfg.out_uri, b) not in present]
        if len(todo) < blocks:
            log.info("resuming the query job of %s: %d of %d blocks already searched",
                     storage.redact(cfg.out_uri), blocks - len(todo), blocks)
        t1 = time.perf_counter()
        searched = 0
        done_before = Q - sum(min(Q, (b + 1) * batch) - b * batch for b in todo)
        with Progress(Q, "queries", "search", initial=done_before) as bar:
            for b in todo:
                b0, b1 = b * batch, min(Q, (b + 1) * batch)
                q = vectors.read_rows(cfg.queries_uri, b0, b1, options=options, file_info=qinfo).astype(np.float32)
                D, I = pool.search_batch(q, params, stages, cfg.rerank_precision)
                results.write_part(_part_uri(cfg.out_uri, b), b0, I, D, options)
                searched += b1 - b0
                bar.update(b1 - b0)
        search_s = time.perf_counter() - t1
        failed = pool.failed_shards()
        failures = pool.failures()
        actors = pool.actor_memory()
        version = pool.manifest.version
        n_shards = len(pool.manifest.shards)
    finally:
        pool.close()
    written = results.assemble_results(cfg.out_uri, [_part_uri(cfg.out_uri, b) for b in range(blocks)], options)
    storage.remove(parts_dir(cfg.out_uri), options, recursive=True)
    report = {
        "job": "search",
        "index_uri": storage.redact(cfg.index_uri),
        "version": version,
        "queries": Q,
        "queries_searched_this_run": searched,
        "blocks": blocks,
        "blocks_resumed": blocks - len(todo),
        "params": cfg.to_dict(),
        "search_params": params.to_dict(),
        "tuning": tuning,
        "wall_s": time.perf_counter() - t0,
        "search_s": search_s,
        "queries_per_s": searched / max(search_s, 1e-9),
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


def _search_all(pool: ShardPool, q: np.ndarray, params: SearchParams, batch: int,
                precision: str) -> tuple[np.ndarray, np.ndarray]:
    """Every query of ``q`` through the pool, ``batch`` at a time: ``(D, I)`` (the tuning queries)."""
    Q = len(q)
    D_all = np.full((Q, params.k), np.inf, np.float32)
    I_all = np.full((Q, params.k), -1, np.int64)
    for b0 in range(0, Q, batch):
        qb = q[b0:b0 + batch]
        D_all[b0:b0 + len(qb)], I_all[b0:b0 + len(qb)] = pool.search_batch(qb, params, None, precision)
    return D_all, I_all


def _tune(cfg: SearchJobConfig, pool: ShardPool, qinfo, k: int, options) -> dict[str, Any]:
    """``cfg.tune``'s choice through the job's own actors (:func:`pipeline.search.tuning.tune`)."""
    spec = cfg.tune
    check_measure(spec.measure, k)
    if spec.sample < 1:
        raise ConfigError(f"the tuning sample must hold at least 1 query, got {spec.sample}")
    tq = vectors.read_rows(cfg.queries_uri, 0, min(spec.sample, qinfo.count), options=options,
                           file_info=qinfo).astype(np.float32) if spec.queries_uri is None else vectors.read_vectors(
        spec.queries_uri, options=options, max_rows=spec.sample,
        columns=vectors.parquet_columns(cfg.vector_column)).astype(np.float32)
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
