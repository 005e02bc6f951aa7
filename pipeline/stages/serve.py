"""The warm search service: shard actors loaded once, many query batches over HTTP, hot-swapped to
each new ``CURRENT`` version.

:class:`SearchService` holds one :class:`~pipeline.distributed.shard_pool.ShardPool` (the query
job's actors and stages) and answers :meth:`SearchService.search` calls from any thread. A watcher
reads the index's ``CURRENT`` every ``poll_s`` seconds; when it names another version, a second
pool loads that version beside the first (the old one answers meanwhile), new requests go to the
new pool, and the old one is closed once its requests in flight have finished: no request fails
or waits for a load. A version that fails to load is logged and the old one keeps serving.
During a swap both versions' shards are held, and both pools' actors: a swap whose new actors the
cluster's free CPUs (or memory, with ``memory_per_actor``) cannot place is refused the same way,
saying what is short; the default CPUs per actor of :func:`pipeline.api.serve` leave room for it.

:func:`make_server` puts the service behind a threaded HTTP server (stdlib):

- ``POST /search`` with a JSON body ``{"queries": [[...], ...], "k": 10, "nprobe": 16, ...}``
  (any :class:`~pipeline.search.params.SearchParams` field; the service's defaults otherwise)
  answers ``{"version", "ids", "distances", "latency_ms"}``; bad input is a 400 with ``{"error"}``.
- ``GET /health``: ``{"status": "ok", "version"}``.
- ``GET /stats``: requests answered, queries, bad requests, failed searches, swaps, latency p50/p99 over the last requests,
  queries/s since the start.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from pipeline.config import JsonConfig
from pipeline.distributed.cluster import room_for
from pipeline.distributed.shard_pool import ShardPool
from pipeline.errors import ConfigError, PipelineError, VectorFormatError
from pipeline.index.manifest import current_version, load_manifest
from pipeline.io import storage
from pipeline.search.params import SearchParams, search_params
from pipeline.stages.search import check_params_for

log = logging.getLogger(__name__)

LATENCY_WINDOW = 10_000  # requests whose latencies make the p50/p99
MAX_BODY_BYTES = 256 << 20
BAD_INPUT = (ConfigError, VectorFormatError)  # the request's fault: answered 400, counted apart


@dataclass
class ServeConfig(JsonConfig):
    """What ``qinco serve`` runs."""

    index_uri: str
    host: str = "127.0.0.1"
    port: int = 8000  # 0: a free port (printed)
    workers: int = 2
    cpus_per_worker: float = 1.0
    params: SearchParams = field(default_factory=SearchParams)  # defaults of each request
    version: str | None = None  # a fixed version (no swaps); None: follow CURRENT
    poll_s: float = 5.0  # how often CURRENT is read
    rerank_precision: str = "float32"
    lut_scales: bool = True
    memory_per_actor: int | None = None
    max_queries: int = 65536  # per request

    def __post_init__(self) -> None:
        if isinstance(self.params, dict):  # from JSON
            self.params = SearchParams.from_dict(self.params)


def _percentile(values, q: float) -> float | None:
    return float(np.percentile(np.fromiter(values, float), q)) if values else None


class SearchService:
    """One index served by a shard pool, swapped to each new version (module docstring)."""

    def __init__(self, cfg: ServeConfig, options=None):
        cfg.params.validate()
        self.cfg, self.options = cfg, options
        self._cond = threading.Condition()
        self._inflight: dict[int, int] = {}
        self._pool = self._load(cfg.version)
        self._stop = threading.Event()
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.started = time.time()
        self.counts = {"requests": 0, "queries": 0, "bad_requests": 0, "errors": 0, "swaps": 0}
        self.swap_error: str | None = None
        self._watcher = None
        if cfg.version is None:
            self._watcher = threading.Thread(target=self._watch, name="current-watcher", daemon=True)
            self._watcher.start()

    def _load(self, version: str | None) -> ShardPool:
        t = time.perf_counter()
        c = self.cfg
        pool = ShardPool(c.index_uri, version, c.workers, c.cpus_per_worker, options=self.options,
                         lut_scales=c.lut_scales, memory_per_actor=c.memory_per_actor)
        try:
            check_params_for(pool, c.params)
        except Exception:
            pool.close()
            raise
        log.info("%s: version %s loaded in %.1f s (%d shards, %d vectors, %d actors)",
                 storage.redact(c.index_uri), pool.manifest.version, time.perf_counter() - t,
                 len(pool.manifest.shards), pool.manifest.total_rows, len(pool.actors))
        return pool

    @property
    def version(self) -> str:
        return self._pool.manifest.version

    # ----------------------------------------------------------------- requests
    def search(self, queries, k: int | None = None, **params: Any) -> tuple[np.ndarray, np.ndarray, str]:
        """``(D, I, version)`` of the queries with the service's parameters, overridden by
        ``k`` and ``params`` (SearchParams fields)."""
        t = time.perf_counter()
        try:
            p = search_params(params if k is None else {**params, "k": k}, self.cfg.params)
            q = np.asarray(queries, dtype=np.float32)
            if q.ndim != 2 or not 1 <= len(q) <= self.cfg.max_queries:
                raise ConfigError(f"queries must be a list of 1 to {self.cfg.max_queries} vectors, "
                                  f"got shape {q.shape}")
            with self._cond:
                pool = self._pool
                self._inflight[id(pool)] = self._inflight.get(id(pool), 0) + 1
            try:
                check_params_for(pool, p)
                D, I = pool.search_batch(q, p, precision=self.cfg.rerank_precision)
            finally:
                with self._cond:
                    self._inflight[id(pool)] -= 1
                    self._cond.notify_all()
        except Exception as e:
            with self._cond:
                self.counts["bad_requests" if isinstance(e, BAD_INPUT) else "errors"] += 1
            raise
        with self._cond:
            self._latencies.append(time.perf_counter() - t)
            self.counts["requests"] += 1
            self.counts["queries"] += len(q)
        return D, I, pool.manifest.version

    def stats(self) -> dict[str, Any]:
        with self._cond:
            lat = list(self._latencies)
            counts = dict(self.counts)
        up = time.time() - self.started
        p50, p99 = _percentile(lat, 50), _percentile(lat, 99)
        return {"index_uri": storage.redact(self.cfg.index_uri), "version": self.version, **counts,
                "uptime_s": round(up, 3), "queries_per_s": counts["queries"] / max(up, 1e-9),
                "latency_p50_ms": None if p50 is None else 1e3 * p50,
                "latency_p99_ms": None if p99 is None else 1e3 * p99, "swap_error": self.swap_error}

    # ----------------------------------------------------------------- versions
    def swap_to_current(self) -> bool:
        """Load the version ``CURRENT`` names if it is not the one served, then serve it; True if
        it swapped."""
        target = current_version(self.cfg.index_uri, self.options)
        if target is None or target == self.version:
            return False
        try:
            # the new actors load beside the served ones: where they cannot be placed now, Ray
            # would leave them pending (and this swap waiting) for good
            shards = len(load_manifest(self.cfg.index_uri, version=target, options=self.options).shards)
            actors = max(1, min(self.cfg.workers, shards))
            short = room_for(actors, self.cfg.cpus_per_worker, self.cfg.memory_per_actor)
            if short:
                raise PipelineError(f"its {actors} shard actors cannot start beside the served ones: they need "
                                    f"{short} (free resources, or restart the service)")
            new = self._load(target)
        except Exception as e:  # noqa: BLE001 - the old version keeps serving
            msg = f"version {target} could not be loaded, still serving {self.version}: {e}"
            if msg != self.swap_error:
                log.error("%s", msg)
            self.swap_error = msg
            return False
        with self._cond:
            old, self._pool = self._pool, new
            self.counts["swaps"] += 1
            self.swap_error = None
            self._cond.wait_for(lambda: self._inflight.get(id(old), 0) == 0)
            self._inflight.pop(id(old), None)
        old.close()
        log.info("%s: now serving version %s (was %s)", storage.redact(self.cfg.index_uri), target,
                 old.manifest.version)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.cfg.poll_s):
            try:
                self.swap_to_current()
            except Exception as e:  # noqa: BLE001 - reading CURRENT failed: try again at the next poll
                log.warning("reading CURRENT of %s failed: %s", storage.redact(self.cfg.index_uri), e)

    def __enter__(self) -> "SearchService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop watching, wait for the requests in flight, end the actors."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        with self._cond:
            pool = self._pool
            self._cond.wait_for(lambda: self._inflight.get(id(pool), 0) == 0)
        pool.close()


class _Handler(BaseHTTPRequestHandler):
    service: SearchService  # set by make_server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # requests are counted in /stats, not logged one by one
        log.debug("%s " + fmt, self.address_string(), *args)

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - the stdlib's name
        if self.path == "/health":
            self._reply(200, {"status": "ok", "version": self.service.version})
        elif self.path == "/stats":
            self._reply(200, self.service.stats())
        else:
            self._reply(404, {"error": f"no such path {self.path}; GET /health, /stats; POST /search"})

    def do_POST(self):  # noqa: N802
        if self.path != "/search":
            self._reply(404, {"error": f"no such path {self.path}; POST /search"})
            return
        t = time.perf_counter()
        try:
            n = int(self.headers.get("Content-Length") or 0)
            if not 0 < n <= MAX_BODY_BYTES:
                raise ConfigError(f"a request body of 1 to {MAX_BODY_BYTES} bytes is needed, got {n}")
            try:
                body = json.loads(self.rfile.read(n))
            except ValueError as e:
                raise ConfigError(f"the body is not JSON: {e}") from e
            if not isinstance(body, dict) or "queries" not in body:
                raise ConfigError('the body must be a JSON object with "queries" (a list of vectors)')
            queries = body.pop("queries")
            try:
                queries = np.asarray(queries, dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise ConfigError(f'"queries" must be a list of equal-length lists of numbers: {e}') from e
            D, I, version = self.service.search(queries, **body)
        except BAD_INPUT as e:
            self._reply(400, {"error": str(e)})
            return
        except Exception as e:  # noqa: BLE001 - the client gets the error, the service goes on
            log.exception("search failed")
            self._reply(500, {"error": f"{type(e).__name__}: {e}"})
            return
        self._reply(200, {"version": version, "ids": I.tolist(),
                          "distances": np.where(np.isfinite(D), D, -1.0).tolist(),
                          "latency_ms": 1e3 * (time.perf_counter() - t)})


def make_server(service: SearchService, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) in front of ``service``; ``port`` 0 picks a free one."""
    handler = type("Handler", (_Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def run_serve(cfg: ServeConfig, stop: threading.Event, options=None, echo=print,
              report_s: float = 60.0) -> dict[str, Any]:
    """Serve until ``stop`` is set (the CLI sets it on SIGINT/SIGTERM); returns the last stats.
    A line of stats is printed every ``report_s`` seconds while requests come."""
    service = SearchService(cfg, options)
    try:
        server = make_server(service, cfg.host, cfg.port)
    except OSError as e:
        service.close()
        raise PipelineError(f"cannot listen on {cfg.host}:{cfg.port}: {e}") from e
    host, port = server.server_address[:2]
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    echo(f"serving {storage.redact(cfg.index_uri)} version {service.version} at http://{host}:{port} "
         f"(POST /search, GET /stats, GET /health)")
    last = -1
    try:
        while not stop.wait(report_s):
            s = service.stats()
            if s["requests"] != last:
                last = s["requests"]
                echo(f"{s['version']}: {s['requests']} requests, {s['queries']} queries, "
                     f"{s['queries_per_s']:.1f} queries/s, p50 {s['latency_p50_ms'] or 0:.1f} ms, "
                     f"p99 {s['latency_p99_ms'] or 0:.1f} ms, {s['errors']} errors")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        stats = service.stats()
        service.close()
    echo(f"stopped: {json.dumps(stats)}")
    return stats
