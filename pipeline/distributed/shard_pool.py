"""The query job's shard actors: each holds some shards of one index version and runs the
shortlist and re-rank stages of :mod:`pipeline.search.pipeline` over them; the driver-side
``ShardPool`` probes, fans the shortlists out, merges them exactly and sends the re-rank back.

Shard actors load only shards named in the committed manifest and verify their checksums. An
actor lost with its node is restarted by Ray, or started again by the pool, and the call is
repeated (the calls are pure functions of their arguments, so the results do not change). With
``allow_partial``, shards whose actor fails for good are skipped and listed; otherwise the job
fails naming them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time

import numpy as np
import ray

from pipeline.codec.decoder import Decoder, model_centroids
from pipeline.codec.model_file import check_model_unchanged, load_model
from pipeline.codec.threads import use_threads
from pipeline.errors import ConfigError, PipelineError
from pipeline.index.manifest import load_manifest, version_dir
from pipeline.index.shards import listed_shards, load_shard_rows, shard_file_uri
from pipeline.io import storage
from pipeline.search.params import SearchParams
from pipeline.search.pipeline import finish, merge, shortlist
from pipeline.search.probe import check_queries, coarse_probe, probe_lists
from pipeline.search.scan import build_searcher
from pipeline.sysinfo import peak_rss_bytes

log = logging.getLogger(__name__)

CALL_ATTEMPTS = 4   # tries of one actor call when its actor or node is lost
RETRY_WAIT_S = 2.0  # first wait before a retry; doubles each time
RELEASE_WAIT_S = 30.0  # how long closing waits for actors to remove their memory-mapped files


class ShardActor:
    """Holds one or more shards in memory (or memory-mapped from local disk with ``mmap_dir``);
    answers shortlist and re-rank requests.

    With ``allow_partial`` a shard that fails to load (missing, corrupt) is left out and reported
    by :meth:`bad_shards`; otherwise the actor fails to start, naming it.
    """

    def __init__(self, index_uri: str, version: str, shard_entries: list[dict], model_uri: str,
                 threads: int = 1, options=None, allow_partial: bool = False, lut_scales: bool = True,
                 mmap_dir: str | None = None):
        use_threads(threads)
        self.model = load_model(model_uri, options=options)
        self.decoders = {}  # decoder.Decoder by re-rank precision, built on first use
        nlist = max(1, self.model.config.nlist)
        self.bad: dict[str, str] = {}
        self.mmap_dir = _private_dir(mmap_dir) if mmap_dir else None
        list_ids, ids_N, codes_NM, offsets, scale_N = load_shard_rows(
            version_dir(index_uri, version), shard_entries, nlist, self.model.config.M, options,
            errors=self.bad if allow_partial else None, mmap_dir=self.mmap_dir)
        self.searcher = build_searcher(self.model, list_ids, ids_N, codes_NM, offsets, scale_N=scale_N,
                                       lut_scales=lut_scales, source=", ".join(e["name"] for e in shard_entries))
        self.names = [e["name"] for e in shard_entries]

    def shortlist(self, q_QD: np.ndarray, lists_QP: np.ndarray, params: SearchParams):
        """Stage 2 over this actor's shards (:func:`pipeline.search.pipeline.shortlist`), and its seconds."""
        t = time.perf_counter()
        return shortlist(self.searcher, q_QD, lists_QP, params) + (time.perf_counter() - t,)

    def finish(self, q_QD: np.ndarray, merged: tuple, params: SearchParams, precision: str = "float32"):
        """Stage 4 for some queries of the merged shortlist (:func:`pipeline.search.pipeline.finish`)
        with the pairwise decoder and the QINCo decoder in ``precision``, and its seconds."""
        t = time.perf_counter()
        if precision not in self.decoders:
            self.decoders[precision] = Decoder(self.model, precision)
        D, I = finish(self.decoders[precision], q_QD, merged, params, self.searcher.pairwise_fn,
                      self.searcher.metric)
        return D, I, time.perf_counter() - t

    def bad_shards(self) -> dict[str, str]:
        """Shards left out at load time (``allow_partial``), with their errors."""
        return dict(self.bad)

    def release(self) -> None:
        """Drop the shard arrays and remove their files from ``mmap_dir`` (before the actor is killed)."""
        self.searcher = None
        if self.mmap_dir:
            shutil.rmtree(self.mmap_dir, ignore_errors=True)

    def memory(self) -> dict:
        """What this actor holds: rows, the bytes of its shard arrays, its process's peak resident
        memory."""
        sr = self.searcher
        if sr is None:  # released
            return {"shards": 0, "rows": 0, "shard_bytes": 0, "peak_rss_bytes": peak_rss_bytes(),
                    "memory_mapped": self.mmap_dir is not None}
        arrays = sum(a.nbytes for a in (sr.codes_NM, sr.ids_N, sr.list_ids_N, sr.list_offsets)
                     if a is not None) + (sr.scale_N.nbytes if sr.scale_N is not None else 0)
        return {"shards": len(self.names), "rows": int(sr.N), "shard_bytes": int(arrays),
                "peak_rss_bytes": peak_rss_bytes(),
                "memory_mapped": self.mmap_dir is not None}


def _private_dir(parent: str) -> str:
    """A new directory for this actor's memory-mapped rows under ``parent`` (a node-local disk).
    Directories left by actors that were killed (their process is gone) are removed first."""
    os.makedirs(parent, exist_ok=True)
    for name in os.listdir(parent):
        m = re.fullmatch(r"qinco-shards-(\d+)-\w+", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"qinco-shards-{os.getpid()}-", dir=parent)


# What a shard actor holds per row: codes, the int64 id, the int32 list id, the float16 scale.
ROW_OVERHEAD_BYTES = 8 + 4 + 2
# Loading concatenates and then sorts the shards' rows: at its peak an actor holds about this
# many copies of them (the budget must hold the peak, not only what stays).
LOAD_PEAK_COPIES = 3
ACTOR_BASE_BYTES = 512 << 20  # the process itself: Python, torch, the model


# With memory-mapped rows an actor keeps in memory only a copy of each row's scale, and loads
# one shard at a time.
MMAP_ROW_BYTES = 4


def actor_bytes(rows: int, code_bytes: int, mmap_shard_rows: int | None = None) -> int:
    """Memory an actor needs at its peak to hold ``rows`` rows of ``code_bytes``-byte codes; with
    ``mmap_shard_rows`` (the rows of its largest shard) when the rows are memory-mapped."""
    if mmap_shard_rows is not None:
        return (ACTOR_BASE_BYTES + LOAD_PEAK_COPIES * mmap_shard_rows * (code_bytes + ROW_OVERHEAD_BYTES)
                + MMAP_ROW_BYTES * rows)
    return ACTOR_BASE_BYTES + LOAD_PEAK_COPIES * rows * (code_bytes + ROW_OVERHEAD_BYTES)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def assign_shards(entries: list[dict], workers: int, code_bytes: int = 0,
                   memory_per_actor: int | None = None, mmap: bool = False) -> list[list[dict]]:
    """Greedy balance of shards over actors by row count (largest first).

    With ``memory_per_actor`` (bytes) every actor's shards must fit it (``actor_bytes``; with
    ``mmap`` the rows are on local disk and only the largest shard is in memory while loading);
    otherwise ConfigError says how many actors, or how much memory each, the index needs."""
    groups: list[list[dict]] = [[] for _ in range(max(1, min(workers, len(entries))))]
    load = [0] * len(groups)
    for e in sorted(entries, key=lambda e: (-e["rows"], e["name"])):
        j = int(np.argmin(load))
        groups[j].append(e)
        load[j] += e["rows"]
    if memory_per_actor is not None and mmap:
        need = max(actor_bytes(n, code_bytes, max((e["rows"] for e in g), default=0))
                   for n, g in zip(load, groups))
        if need > memory_per_actor:
            raise ConfigError(
                f"the index holds {sum(load):,} vectors; {len(groups)} shard actors of {_gib(memory_per_actor)} "
                f"cannot search them with memory-mapped rows (the busiest needs {_gib(need)}: its largest "
                f"shard while loading, {MMAP_ROW_BYTES} bytes per row, {_gib(ACTOR_BASE_BYTES)} for the "
                f"process); use more --workers or a larger --memory-per-actor")
    elif memory_per_actor is not None:
        need = max(actor_bytes(n, code_bytes) for n in load)
        if need > memory_per_actor:
            rows = sum(load)
            per_row = LOAD_PEAK_COPIES * (code_bytes + ROW_OVERHEAD_BYTES)
            room = (memory_per_actor - ACTOR_BASE_BYTES) // per_row
            biggest = max(entries, key=lambda e: e["rows"])
            if room < biggest["rows"]:
                hint = (f"its largest shard ({biggest['name']}, {biggest['rows']:,} rows) alone needs "
                        f"{_gib(actor_bytes(biggest['rows'], code_bytes))}: give each actor at least that")
            else:
                hint = (f"use --workers {-(-rows // room)} or more, or a larger --memory-per-actor "
                        f"(at least {_gib(need)} for {len(groups)} actors)")
            raise ConfigError(
                f"the index holds {rows:,} vectors of {code_bytes} bytes; {len(groups)} shard actors of "
                f"{_gib(memory_per_actor)} cannot hold them (the busiest needs {_gib(need)}: codes, ids "
                f"and list ids, {LOAD_PEAK_COPIES}x while loading, plus {_gib(ACTOR_BASE_BYTES)} for the "
                f"process); {hint}")
    return groups


class ShardPool:
    """Shard actors over the shards of one committed index version, plus the driver-side probe.

    An actor that dies (its node lost) is restarted by Ray (``max_restarts``), or by the pool once
    Ray gives up on it, and the interrupted call is repeated, ``CALL_ATTEMPTS`` tries in all; a
    restarted actor reloads and re-verifies its shards.
    A shard that is missing or corrupt, or whose actor fails for good, raises ``PipelineError``
    naming it; with ``allow_partial`` it is left out instead and listed by :meth:`failed_shards`.
    """

    def __init__(self, index_uri: str, version: str | None = None, workers: int = 2,
                 cpus_per_worker: float = 1.0, allow_partial: bool = False, options=None,
                 lut_scales: bool = True, memory_per_actor: int | None = None, mmap_dir: str | None = None):
        # the actors run in other directories: relative local paths (the index's, and the model's
        # as the manifest records it) are resolved here, as the driver reads them
        index_uri = storage.absolute(index_uri)
        mmap_dir = os.path.abspath(mmap_dir) if mmap_dir else None
        self.manifest = m = load_manifest(index_uri, version=version, options=options)
        vuri = version_dir(index_uri, m.version)
        self.shard_errors: dict[str, str] = {}
        listed = listed_shards(vuri, options)
        for s in m.shards:
            shard_file_uri(vuri, s.name)  # refuses a name outside the version's shards/
            if s.name not in listed:
                msg = (f"shard {storage.redact(shard_file_uri(vuri, s.name))} named in the manifest of "
                       f"version {m.version} is missing")
                if not allow_partial:
                    raise PipelineError(msg)
                log.warning("%s; searching the other shards", msg)
                self.shard_errors[s.name] = msg
        model_uri = storage.absolute(m.model["uri"])
        check_model_unchanged(m.model, m.version, options)
        self.model = load_model(model_uri, options=options)
        self.dim = self.model.config.dim
        self.nlist = max(1, self.model.config.nlist)
        self.allow_partial = allow_partial
        self.metric = self.model.config.metric
        self.centroids_LD = model_centroids(self.model)
        self.probe_index = coarse_probe(self.centroids_LD, self.metric)  # the in-process searcher's probe
        present = [s.to_dict() for s in m.shards if s.name not in self.shard_errors]
        if not present:
            raise PipelineError(f"no shard of {storage.redact(index_uri)} version {m.version} can be read: "
                                + "; ".join(self.shard_errors.values()))
        self.groups = assign_shards(present, workers, int(m.code["code_bytes"]), memory_per_actor,
                                     mmap=mmap_dir is not None)
        # with a budget, Ray places each actor where that much memory is free
        extra = {} if memory_per_actor is None else {"memory": int(memory_per_actor)}
        actor_cls = ray.remote(ShardActor).options(num_cpus=cpus_per_worker, max_restarts=3, max_task_retries=3,
                                                   **extra)
        self._spawn = lambda g: actor_cls.remote(index_uri, m.version, g, model_uri, max(1, int(cpus_per_worker)),
                                                 options, allow_partial, lut_scales, mmap_dir)
        self.actors = [self._spawn(g) for g in self.groups]
        self.failed: dict[int, str] = {}
        refs = [a.bad_shards.remote() for a in self.actors]
        for j, ref in enumerate(refs):
            try:
                self.shard_errors.update(self._get(j, ref, "bad_shards"))
            except Exception as e:  # noqa: BLE001
                self.failed[j] = _actor_error(e, self.groups[j])
        if self.failed and not allow_partial:
            raise PipelineError("shard actors failed to load: " + "; ".join(self.failed.values()))

    def _get(self, j: int, ref, method: str, *args):
        """``ray.get(ref)`` of a call to actor ``j``; when the actor or its node was lost, the call
        is made again (on the actor Ray restarted, or on a new one) up to ``CALL_ATTEMPTS`` tries."""
        wait = RETRY_WAIT_S
        for attempt in range(1, CALL_ATTEMPTS + 1):
            try:
                return ray.get(ref)
            except ray.exceptions.RayActorError as e:
                if attempt == CALL_ATTEMPTS:
                    raise
                if isinstance(e, ray.exceptions.ActorDiedError):  # Ray gave up on it: start another
                    log.warning("shard actor %d died (%s); starting a new one", j, _first_line(e))
                    self.actors[j] = self._spawn(self.groups[j])
                else:  # restarting, or its node lost: Ray restarts it elsewhere
                    log.warning("shard actor %d is unavailable (%s); retrying in %.0f s", j, _first_line(e), wait)
                    time.sleep(wait)
                    wait *= 2
                ref = getattr(self.actors[j], method).remote(*args)

    def actor_memory(self) -> list[dict]:
        """Per live actor: its shards, rows, bytes of shard arrays and resident memory."""
        out = []
        for j in range(len(self.actors)):
            if j in self.failed:
                continue
            try:
                out.append(self._get(j, self.actors[j].memory.remote(), "memory"))
            except Exception as e:  # noqa: BLE001 - a report, not the search
                out.append({"error": _first_line(e)})
        return out

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

    def search_batch(self, q_QD: np.ndarray, params: SearchParams, stages: dict[str, float] | None = None,
                     precision: str = "float32") -> tuple[np.ndarray, np.ndarray]:
        """The stages of :mod:`pipeline.search.pipeline` over every shard: probe here, shortlists in
        the actors, the exact merge here, the re-rank in the actors (queries split between them);
        returns ``(D_QK, I_QK)``. ``stages`` accumulates seconds per stage."""
        stages = stages if stages is not None else {}
        q_QD = check_queries(q_QD, self.dim, self.metric)
        t = time.perf_counter()
        lists = probe_lists(self.probe_index, self.centroids_LD, q_QD, params, self.metric)
        stages["probe_s"] = stages.get("probe_s", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        qref, lref = ray.put(q_QD), ray.put(lists)
        futs = {j: a.shortlist.remote(qref, lref, params) for j, a in enumerate(self.actors) if j not in self.failed}
        parts = []
        for j, f in futs.items():
            try:
                parts.append(self._get(j, f, "shortlist", qref, lref, params)[:-1])
            except Exception as e:  # noqa: BLE001
                self.failed[j] = _actor_error(e, self.groups[j])
                if not self.allow_partial:
                    raise PipelineError("shard search failed: " + self.failed[j]) from e
        stages["shortlist_s"] = stages.get("shortlist_s", 0.0) + time.perf_counter() - t
        if not parts:
            raise PipelineError("no shard answered: " + "; ".join(self.failed.values()))
        t = time.perf_counter()
        merged = merge(params, parts)
        stages["merge_s"] = stages.get("merge_s", 0.0) + time.perf_counter() - t
        if not params.reranked and params.pairwise is None:
            return finish(None, q_QD, merged, params, metric=self.metric)
        t = time.perf_counter()
        R = params.reranked
        live = [j for j in range(len(self.actors)) if j not in self.failed]
        chunks = [c for c in np.array_split(np.arange(len(q_QD)), len(live)) if len(c)]
        width = merged[0].shape[1] if params.pairwise is not None else max(R, params.k)
        calls = [(j, (q_QD[c], tuple(x[c, :width] for x in merged), params, precision))
                 for j, c in zip(live, chunks)]
        refs = [self.actors[j].finish.remote(*args) for j, args in calls]
        res = [self._get(j, ref, "finish", *args) for (j, args), ref in zip(calls, refs)]
        stages["rerank_s"] = stages.get("rerank_s", 0.0) + time.perf_counter() - t
        return np.concatenate([r[0] for r in res]), np.concatenate([r[1] for r in res])

    def close(self) -> None:
        """Release every actor's rows (removing memory-mapped files), then end the actors."""
        released = [a.release.remote() for a in self.actors]
        ray.wait(released, num_returns=len(released), timeout=RELEASE_WAIT_S)
        for a in self.actors:
            ray.kill(a)
        self.actors = []


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _actor_error(exc: Exception, group: list[dict]) -> str:
    names = ", ".join(e["name"] for e in group)
    cause = getattr(exc, "cause", None) or exc
    return f"shards [{names}]: {storage.redact(str(cause).splitlines()[-1] if str(cause) else type(cause).__name__)}"
