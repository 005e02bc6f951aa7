"""The query job: fan query batches out to shard actors and merge an exact global top-k.

Per query batch, following the QINCo paper's search pipeline:

1. **Probe** (driver): the ``nprobe`` nearest IVF centroids of each query, once for all shards;
   with ``probe_ratio`` only those nearly as near as the nearest (``search_kernels.prune_lists``).
2. **Shortlist** (shard actors, in parallel): every code in the probed lists gets an approximate
   distance from the additive decoder's lookup tables (each row's additive residual scaled
   towards its QINCo reconstruction unless ``lut_scales`` is off; the scales are read from the
   shards' ``lut_scale`` column, which the encode job writes, and an actor computes them only for
   rows of shards written without it, once, when it loads them); each actor returns its best
   ``shortlist`` candidates with their codes.
3. **Merge** (driver): the exact global top-``shortlist`` of the approximate distances, ties broken
   by id, so the shortlist does not depend on how the index is split into shards. With the prefix
   stage (``prefix_steps``, see ``search_kernels.SearchParams``) each actor returns its best
   ``prefix_shortlist`` by prefix distance, each with its full lookup-table distance; the driver
   keeps the global best ``prefix_shortlist`` by prefix distance, then the best ``shortlist`` of
   those by full distance: again what one actor holding every shard would return.
4. **Re-rank** (actors, round robin): the global shortlist (or its best ``rerank_count``) is
   decoded with the QINCo model (in float32, or bfloat16 with ``rerank_precision``) and ranked
   by exact distance; the best ``k`` are the result. When fewer than ``k`` are re-ranked, the
   remaining results follow in lookup-table order.

Shard actors load only shards named in the committed manifest, verify their checksums, and are
restarted by Ray when they die (the batch is retried). The driver first checks that the model at
the manifest's model URI is the one that encoded the version (its weights' SHA-256): a model
retrained into the same URI is refused, naming it, rather than decoding every code wrongly. With
``allow_partial``, shards whose actor fails for good are skipped and listed in the report;
otherwise the job fails naming them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.io import storage
from pipeline.config import JsonConfig, code_version
from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)


@dataclass
class SearchJobConfig(JsonConfig):
    index_uri: str
    queries_uri: str
    out_uri: str
    k: int = 10
    nprobe: int = 16
    shortlist: int = 100
    rerank: bool = True
    rerank_count: int | None = None
    rerank_precision: str = "float32"
    workers: int = 2
    cpus_per_worker: float = 1.0
    query_batch: int = 2048
    allow_partial: bool = False
    lut_scales: bool = True
    prefix_steps: int = 0
    prefix_shortlist: int | None = None
    probe_ratio: float | None = None
    max_queries: int | None = None
    version: str | None = None


def merge_candidates(parts: list[tuple[np.ndarray, ...]], k: int, prefix_k: int | None = None):
    """Exact per-query top-k over several shards' shortlists ``(D_QS, I_QS, codes_QSM, lists_QS)``.

    Ordered by distance then id (``topk.topk_smallest``); codes and list ids travel with their
    candidate. Padding entries have id -1, distance inf and list -1.

    With ``prefix_k`` the parts are prefix-stage results (``ShardSearcher.prefix_search``): a fifth
    array holds each candidate's full lookup-table distance. The best ``prefix_k`` of the union by
    prefix distance are kept (what one shard holding every row would keep), then the best ``k`` of
    those by full distance, which is returned as the distance.
    """
    from pipeline.search.topk import topk_smallest

    D = np.concatenate([p[0] for p in parts], axis=1)
    I = np.concatenate([p[1] for p in parts], axis=1)
    codes = np.concatenate([p[2] for p in parts], axis=1)
    lists = np.concatenate([p[3] for p in parts], axis=1)
    Q, T = D.shape
    pos = np.broadcast_to(np.arange(T, dtype=np.int64), (Q, T))
    if prefix_k is None:
        Dk, Ik, pk = topk_smallest(D, I, k, payload_QC=pos)
    else:
        D_full = np.concatenate([p[4] for p in parts], axis=1)
        _, Ip, pp = topk_smallest(D, I, prefix_k, payload_QC=pos)
        Dp_full = np.where(pp < 0, np.inf, np.take_along_axis(D_full, np.maximum(pp, 0), axis=1))
        Dk, Ik, pk = topk_smallest(Dp_full, Ip, k, payload_QC=pp)
    safe = np.where(pk < 0, 0, pk)
    codes_k = np.take_along_axis(codes, safe[..., None], axis=1)
    lists_k = np.where(pk < 0, -1, np.take_along_axis(lists, safe, axis=1))
    return Dk, Ik, codes_k, lists_k


def load_shards(version_uri: str, shard_entries: list[dict], nlist: int, M: int, options=None,
                errors: dict[str, str] | None = None):
    """Read and verify shards (manifest entries) of one index version and merge them.

    Returns ``(list_ids_N int32, ids_N int64, codes_NM, list_offsets, scale_N float16)`` sorted by
    (list, id), the layout ``ShardSearcher`` takes; ``scale_N`` holds the rows' stored
    ``lut_scale`` and NaN for rows of shards written without that column. A missing or corrupt
    shard raises ``CorruptShardError`` naming it; when ``errors`` is given such shards are skipped
    instead and their messages recorded there by shard name.
    """
    from pipeline.index.shards import ShardInfo, read_shard

    lists, ids, codes, scales = [], [], [], []
    for e in shard_entries:
        info = ShardInfo(name=e["name"], rows=e["rows"], bytes=e["bytes"], sha256=e["sha256"],
                         id_min=e["id_min"], id_max=e["id_max"], lists=e["lists"])
        try:
            sh = read_shard(storage.join(version_uri, e["name"]), expected=info, options=options, nlist=nlist)
        except PipelineError as exc:
            if errors is None:
                raise
            errors[e["name"]] = storage.redact(str(exc))
            log.warning("skipping shard %s: %s", e["name"], errors[e["name"]])
            continue
        lists.append(sh.list_ids_N)
        ids.append(sh.ids_N)
        codes.append(sh.codes_NM)
        scales.append(sh.lut_scale_N if sh.lut_scale_N is not None else np.full(len(sh), np.nan, np.float16))
    list_ids = np.concatenate(lists).astype(np.int32) if lists else np.zeros(0, np.int32)
    ids_N = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
    codes_NM = np.concatenate(codes) if codes else np.zeros((0, M), np.uint8)
    scale_N = np.concatenate(scales) if scales else np.zeros(0, np.float16)
    order = np.lexsort((ids_N, list_ids))
    list_ids, ids_N, codes_NM, scale_N = list_ids[order], ids_N[order], codes_NM[order], scale_N[order]
    offsets = np.zeros(nlist + 1, np.int64)
    np.cumsum(np.bincount(list_ids, minlength=nlist), out=offsets[1:])
    return list_ids, ids_N, codes_NM, offsets, scale_N


class ShardActor:
    """Holds one or more shards in memory; answers shortlist and re-rank requests.

    With ``allow_partial`` a shard that fails to load (missing, corrupt) is left out and reported
    by :meth:`bad_shards`; otherwise the actor fails to start, naming it.
    """

    def __init__(self, index_uri: str, version: str, shard_entries: list[dict], model_uri: str,
                 threads: int = 1, options=None, allow_partial: bool = False, lut_scales: bool = True):
        import torch

        from pipeline.codec.model_file import load_model
        from pipeline.index.manifest import version_dir

        torch.set_num_threads(max(1, threads))
        self.model = load_model(model_uri, options=options)
        self.decoders = {}  # decoder.Decoder by re-rank precision, built on first use
        nlist = max(1, self.model.config.nlist)
        self.bad: dict[str, str] = {}
        list_ids, ids_N, codes_NM, offsets, scale_N = load_shards(
            version_dir(index_uri, version), shard_entries, nlist, self.model.config.M, options,
            errors=self.bad if allow_partial else None)
        self.list_ids, self.ids, self.codes = list_ids, ids_N, codes_NM
        self.searcher = build_searcher(self.model, list_ids, ids_N, codes_NM, offsets, scale_N=scale_N,
                                       lut_scales=lut_scales, source=", ".join(e["name"] for e in shard_entries))
        self.names = [e["name"] for e in shard_entries]

    def rows(self) -> int:
        return int(len(self.ids))

    def shortlist(self, q_QD: np.ndarray, lists_QP: np.ndarray, S: int, prefix: tuple[int, int] | None = None):
        """The best ``S`` candidates by lookup-table distance ``(D, I, codes, lists, seconds)``; with
        ``prefix`` ``(P, S1)`` the prefix stage's best S1 ``(D_prefix, I, codes, lists, D_full,
        seconds)`` (see ``merge_candidates``)."""
        t = time.perf_counter()
        if prefix is None:
            D, I, rows = self.searcher.lut_search(q_QD, lists_QP, S)
            extra = ()
        else:
            D, I, rows, D_full = self.searcher.prefix_search(q_QD, lists_QP, *prefix)
            extra = (D_full,)
        safe = np.where(rows < 0, 0, rows)
        codes = self.codes[safe]
        lists = np.where(rows < 0, -1, self.list_ids[safe]).astype(np.int64)
        return (D, I, codes, lists) + extra + (time.perf_counter() - t,)

    def rerank(self, q_QD: np.ndarray, I_QS: np.ndarray, codes_QSM: np.ndarray, lists_QS: np.ndarray, k: int,
               precision: str = "float32"):
        t = time.perf_counter()
        if precision not in self.decoders:
            from pipeline.codec.decoder import Decoder

            self.decoders[precision] = Decoder(self.model, precision)
        D, I = rerank_exact(self.decoders[precision], q_QD, I_QS, codes_QSM, lists_QS, k)
        return D, I, time.perf_counter() - t

    def ping(self) -> bool:
        return True

    def bad_shards(self) -> dict[str, str]:
        """Shards left out at load time (``allow_partial``), with their errors."""
        return dict(self.bad)


def check_model_unchanged(manifest, options=None) -> None:
    """Refuse to search a version whose model was replaced at its URI since it was encoded.

    The codes (and the shards' row scales) mean something only with the model that wrote them;
    the manifest records its weights' SHA-256 (and its config.json's, for manifests without it).
    A model retrained into the same URI would decode every code wrongly and silently.
    """
    from pipeline.codec.model_file import model_identity

    uri = manifest.model["uri"]
    ident = model_identity(uri, options)
    if manifest.model.get("weights_sha256") is not None:
        what, have, want = "weights", ident["weights_sha256"], manifest.model["weights_sha256"]
    else:
        what, have, want = "config.json", ident["config_sha256"], str(manifest.model.get("sha256"))
    if have != want:
        raise ConfigError(
            f"the model at {storage.redact(uri)} has changed since index version {manifest.version} was encoded "
            f"({what} sha256 {have[:12]}..., the manifest says {want[:12]}...); re-encode the index with it "
            f"(qinco reencode --index INDEX --model {storage.redact(uri)}) or restore the model")


def build_searcher(model, list_ids_N, ids_N, codes_NM, list_offsets, *, scale_N=None, lut_scales: bool = True,
                   decode_fn=None, source: str = "<shard>", num_threads: int = 1):
    """``ShardSearcher`` over loaded shard rows of an index built with ``model`` (its centroids and
    additive codebooks), with the row scales of the lookup-table stage unless ``lut_scales`` is off.

    ``scale_N`` holds the rows' stored scales (``load_shards``; NaN where a shard has none); the
    scales of rows without one are computed here from the model (``model_row_scales``)."""
    from pipeline.codec.additive import model_centroids, model_codebooks, model_row_scales
    from pipeline.search.scan import ShardSearcher

    if not lut_scales:
        scale_N = None
    elif len(ids_N):
        scale_N = np.full(len(ids_N), np.nan, np.float16) if scale_N is None else np.array(scale_N, np.float16)
        if scale_N.shape != (len(ids_N),):
            raise ConfigError(f"{source}: row scales have shape {scale_N.shape}, expected ({len(ids_N)},)")
        todo = np.flatnonzero(np.isnan(scale_N))
        if todo.size:
            t = time.perf_counter()
            scale_N[todo] = model_row_scales(model, codes_NM[todo], list_ids_N[todo])
            log.info("%s: row scales of %d rows (shards without a lut_scale column) in %.1f s", source,
                     todo.size, time.perf_counter() - t)
    return ShardSearcher(list_ids_N, ids_N, codes_NM, list_offsets, model_centroids(model), model_codebooks(model),
                         decode_fn=decode_fn, source=source, num_threads=num_threads, scale_N=scale_N)


def rerank_exact(decoder, q_QD, I_QS, codes_QSM, lists_QS, k):
    """Decode candidates with ``decoder`` (a ``decoder.Decoder`` of the QINCo model, in float32
    or bfloat16) and keep the k nearest by exact squared L2.

    Distances come from ``search_kernels.sqdist_rows`` (float64 differences), so a candidate's
    distance does not depend on the batch or the actor that computed it.
    """
    from pipeline.search.scan import sqdist_rows
    from pipeline.search.topk import topk_smallest

    Q, S = I_QS.shape
    valid = I_QS >= 0
    xhat = np.zeros((Q, S, q_QD.shape[1]), np.float32)
    if valid.any():
        lists = lists_QS[valid] if decoder.model.config.nlist > 0 else None
        xhat[valid] = decoder(codes_QSM[valid], lists)
    d = sqdist_rows(q_QD, xhat)
    d = np.where(valid, d, np.inf).astype(np.float32)
    return topk_smallest(d, np.where(valid, I_QS, -1), k)


def _assign_shards(entries: list[dict], workers: int) -> list[list[dict]]:
    """Greedy balance of shards over actors by row count (largest first)."""
    groups: list[list[dict]] = [[] for _ in range(max(1, min(workers, len(entries))))]
    load = [0] * len(groups)
    for e in sorted(entries, key=lambda e: (-e["rows"], e["name"])):
        j = int(np.argmin(load))
        groups[j].append(e)
        load[j] += e["rows"]
    return groups


class ShardPool:
    """Shard actors over the shards of one committed index version, plus the driver-side probe.

    Actors are restarted by Ray when they die (``max_restarts``) and the interrupted call is
    retried (``max_task_retries``); a restarted actor reloads and re-verifies its shards.
    A shard that is missing or corrupt, or whose actor fails for good, raises ``PipelineError``
    naming it; with ``allow_partial`` it is left out instead and listed by :meth:`failed_shards`.
    """

    def __init__(self, index_uri: str, version: str | None = None, workers: int = 2,
                 cpus_per_worker: float = 1.0, allow_partial: bool = False, options=None,
                 lut_scales: bool = True):
        import ray

        from pipeline.codec.additive import model_centroids
        from pipeline.codec.model_file import load_model
        from pipeline.index.manifest import load_manifest, version_dir
        from pipeline.search.scan import FlatProbe

        self.manifest = m = load_manifest(index_uri, version=version, options=options)
        vuri = version_dir(index_uri, m.version)
        self.shard_errors: dict[str, str] = {}
        for s in m.shards:
            if not storage.exists(storage.join(vuri, s.name), options):
                msg = (f"shard {storage.redact(storage.join(vuri, s.name))} named in the manifest of "
                       f"version {m.version} is missing")
                if not allow_partial:
                    raise PipelineError(msg)
                log.warning("%s; searching the other shards", msg)
                self.shard_errors[s.name] = msg
        check_model_unchanged(m, options)
        self.model = load_model(m.model["uri"], options=options)
        self.dim = self.model.config.dim
        self.nlist = max(1, self.model.config.nlist)
        self.allow_partial = allow_partial
        self.centroids_LD = model_centroids(self.model)
        self.probe_index = FlatProbe(self.centroids_LD)  # the in-process searcher's probe
        present = [s.to_dict() for s in m.shards if s.name not in self.shard_errors]
        if not present:
            raise PipelineError(f"no shard of {storage.redact(index_uri)} version {m.version} can be read: "
                                + "; ".join(self.shard_errors.values()))
        self.groups = _assign_shards(present, workers)
        Actor = ray.remote(ShardActor).options(num_cpus=cpus_per_worker, max_restarts=3, max_task_retries=3)
        self.actors = [Actor.remote(index_uri, m.version, g, m.model["uri"], max(1, int(cpus_per_worker)),
                                    options, allow_partial, lut_scales) for g in self.groups]
        self.failed: dict[int, str] = {}
        for j, a in enumerate(self.actors):
            try:
                self.shard_errors.update(ray.get(a.bad_shards.remote()))
            except Exception as e:  # noqa: BLE001
                self.failed[j] = _actor_error(e, self.groups[j])
        if self.failed and not allow_partial:
            raise PipelineError("shard actors failed to load: " + "; ".join(self.failed.values()))

    def failed_shards(self) -> list[str]:
        """Names of the shards whose vectors are not searched (only with ``allow_partial``)."""
        names = set(self.shard_errors)
        names.update(e["name"] for j in self.failed for e in self.groups[j])
        return sorted(names)

    def failures(self) -> dict[str, str]:
        """Error per failed shard (shard name -> message)."""
        out = dict(self.shard_errors)
        for j, msg in self.failed.items():
            out.update({e["name"]: msg for e in self.groups[j]})
        return out

    def search_batch(self, q_QD: np.ndarray, k: int, nprobe: int, shortlist: int, rerank: bool = True,
                     stages: dict[str, float] | None = None, precision: str = "float32",
                     rerank_count: int | None = None,
                     prefix: tuple[int, int] | None = None,
                     probe_ratio: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Probe, fan out the shortlist stage, merge exactly, re-rank; returns ``(D_QK, I_QK)``.

        ``rerank_count`` R: only the best R of the merged shortlist are decoded (default all);
        with R < k the results after the first R keep lookup-table order and distances.
        ``prefix`` ``(P, S1)``: the lookup-table stage's prefix stage (``SearchParams.prefix``).
        ``probe_ratio``: visit only the probed lists nearly as near as the nearest (``SearchParams``).
        """
        import ray

        from pipeline.search.scan import append_lut_tail, prune_lists

        stages = stages if stages is not None else {}
        q_QD = np.ascontiguousarray(q_QD, dtype=np.float32)
        t = time.perf_counter()
        _, lists = self.probe_index.search(q_QD, min(nprobe, self.nlist))
        lists = prune_lists(q_QD, lists, self.centroids_LD, probe_ratio)
        stages["probe_s"] = stages.get("probe_s", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        qref, lref = ray.put(q_QD), ray.put(lists)
        futs = {j: a.shortlist.remote(qref, lref, shortlist, prefix) for j, a in enumerate(self.actors)
                if j not in self.failed}
        parts = []
        for j, f in futs.items():
            try:
                parts.append(ray.get(f)[:-1])
            except Exception as e:  # noqa: BLE001
                self.failed[j] = _actor_error(e, self.groups[j])
                if not self.allow_partial:
                    raise PipelineError("shard search failed: " + self.failed[j]) from None
        stages["shortlist_s"] = stages.get("shortlist_s", 0.0) + time.perf_counter() - t
        if not parts:
            raise PipelineError("no shard answered: " + "; ".join(self.failed.values()))
        t = time.perf_counter()
        Ds, Is, codes, lst = merge_candidates(parts, shortlist, None if prefix is None else prefix[1])
        stages["merge_s"] = stages.get("merge_s", 0.0) + time.perf_counter() - t
        if not rerank:
            return Ds[:, :k], Is[:, :k]
        t = time.perf_counter()
        R = shortlist if rerank_count is None else min(int(rerank_count), shortlist)
        live = [a for j, a in enumerate(self.actors) if j not in self.failed]
        chunks = [c for c in np.array_split(np.arange(len(q_QD)), len(live)) if len(c)]
        res = ray.get([a.rerank.remote(q_QD[c], Is[c, :R], codes[c, :R], lst[c, :R], min(k, R), precision)
                       for a, c in zip(live, chunks)])
        stages["rerank_s"] = stages.get("rerank_s", 0.0) + time.perf_counter() - t
        D, I = np.concatenate([r[0] for r in res]), np.concatenate([r[1] for r in res])
        if R < k:
            D, I = append_lut_tail(D, I, Ds, Is, k)
        return D, I

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def run_search(cfg: SearchJobConfig, options=None) -> dict[str, Any]:
    """Run the query job; writes results (big-ann format + parquet) and a report beside them."""
    from pipeline.io import vectors
    from pipeline.search.scan import SearchParams

    t0 = time.perf_counter()
    # k, nprobe, shortlist and the prefix stage are checked by SearchParams, as for in-process searches
    params = SearchParams(k=cfg.k, nprobe=cfg.nprobe, shortlist=cfg.shortlist,
                          prefix_steps=cfg.prefix_steps, prefix_shortlist=cfg.prefix_shortlist,
                          probe_ratio=cfg.probe_ratio).validate()
    if cfg.rerank_count is not None and not 1 <= cfg.rerank_count <= cfg.shortlist:
        raise ConfigError(f"rerank_count must be between 1 and shortlist ({cfg.shortlist}), got {cfg.rerank_count}")
    if cfg.rerank_precision not in ("float32", "bfloat16"):
        raise ConfigError(f"rerank_precision must be float32 or bfloat16, got {cfg.rerank_precision!r}")
    q = vectors.read_vectors(cfg.queries_uri, options=options, max_rows=cfg.max_queries).astype(np.float32)
    pool = ShardPool(cfg.index_uri, cfg.version, cfg.workers, cfg.cpus_per_worker, cfg.allow_partial, options,
                     cfg.lut_scales)
    load_s = time.perf_counter() - t0
    try:
        if q.shape[1] != pool.dim:
            raise ConfigError(f"{storage.redact(cfg.queries_uri)}: queries have dimension {q.shape[1]}, "
                              f"the index version {pool.manifest.version} expects {pool.dim}")
        if cfg.prefix_steps >= pool.model.config.M:
            raise ConfigError(f"prefix_steps must be below the model's M = {pool.model.config.M} codebooks, "
                              f"got {cfg.prefix_steps}")
        stages: dict[str, float] = {"load_s": load_s}
        Q = len(q)
        D_all = np.full((Q, cfg.k), np.inf, np.float32)
        I_all = np.full((Q, cfg.k), -1, np.int64)
        t1 = time.perf_counter()
        for b0 in range(0, Q, cfg.query_batch):
            qb = q[b0:b0 + cfg.query_batch]
            D_all[b0:b0 + len(qb)], I_all[b0:b0 + len(qb)] = pool.search_batch(
                qb, cfg.k, cfg.nprobe, cfg.shortlist, cfg.rerank, stages, cfg.rerank_precision, cfg.rerank_count,
                params.prefix, params.probe_ratio)
            log.info("searched %d/%d queries (%.0f queries/s)", b0 + len(qb), Q,
                     (b0 + len(qb)) / max(time.perf_counter() - t1, 1e-9))
        search_s = time.perf_counter() - t1
        failed = pool.failed_shards()
        failures = pool.failures()
        version = pool.manifest.version
        n_shards = len(pool.manifest.shards)
    finally:
        pool.close()
    write_results(cfg.out_uri, I_all, D_all, options)
    report = {
        "job": "search",
        "index_uri": storage.redact(cfg.index_uri),
        "version": version,
        "queries": Q,
        "params": cfg.to_dict(),
        "wall_s": time.perf_counter() - t0,
        "search_s": search_s,
        "queries_per_s": Q / max(search_s, 1e-9),
        "stages": stages,
        "shards": n_shards,
        "failed_shards": failed,
        "failures": failures,
        "code_version": code_version(),
    }
    storage.write_bytes_atomic(cfg.out_uri + ".report.json",
                               json.dumps(report, indent=2, sort_keys=True).encode(), options)
    from pipeline.index.history import record_event

    record_event(cfg.index_uri, "search", {k: v for k, v in report.items() if k != "params"} | {
        "out_uri": storage.redact(cfg.out_uri), "k": cfg.k, "nprobe": cfg.nprobe, "shortlist": cfg.shortlist},
        version=version, options=options, best_effort=True)
    return report


def _actor_error(exc: Exception, group: list[dict]) -> str:
    names = ", ".join(e["name"] for e in group)
    cause = getattr(exc, "cause", None) or exc
    return f"shards [{names}]: {storage.redact(str(cause).splitlines()[-1] if str(cause) else type(cause).__name__)}"


def write_results(out_uri: str, I: np.ndarray, D: np.ndarray, options=None) -> None:
    """Write results in the big-ann k-NN format at ``out_uri`` and as parquet at ``out_uri + '.parquet'``."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.io import vectors

    vectors.write_knn_results(out_uri, I, D, options=options)
    k = I.shape[1]
    table = pa.table({
        "query": pa.array(np.arange(len(I), dtype=np.int64)),
        "ids": pa.FixedSizeListArray.from_arrays(pa.array(I.ravel().astype(np.int64)), k),
        "distances": pa.FixedSizeListArray.from_arrays(pa.array(D.ravel().astype(np.float32)), k),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(out_uri + ".parquet", buf.getvalue(), options)


def evaluate_results(results_uri: str, groundtruth_uri: str, options=None) -> dict[str, float]:
    """Recall@1/10/100 (QINCo definition) and k-recall@k of a results file against ground truth."""
    from pipeline.io import vectors
    from pipeline.search.evaluation import k_recall_at_k, recall_at

    I, _ = vectors.read_knn_results(results_uri, options=options)
    if vectors.detect_format(groundtruth_uri) == "ivecs":
        gt = vectors.read_vectors(groundtruth_uri, options=options).astype(np.int64)
    else:
        gt, _ = vectors.read_knn_results(groundtruth_uri, options=options)
    if len(gt) < len(I):
        raise ConfigError(f"{storage.redact(groundtruth_uri)} has {len(gt)} rows, results have {len(I)} queries")
    gt = gt[:len(I)]
    k = I.shape[1]
    ks = tuple(x for x in (1, 10, 100) if x <= k)
    out = dict(recall_at(I, gt, ks=ks))
    kk = min(k, gt.shape[1], 10)
    out[f"{kk}-recall@{kk}"] = float(k_recall_at_k(I, gt, kk))
    from pipeline.index.history import link_evaluation

    link_evaluation(results_uri, groundtruth_uri, out, options=options)  # into the index's history
    return out
