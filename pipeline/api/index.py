"""An index version loaded into this process: :func:`open_index` and the :class:`Index` it returns.

Every shard of the version is loaded once (verified as the query job verifies them) and any number
of searches run the search pipeline the shard actors run (:mod:`pipeline.search.pipeline`), so the
results are the query job's. An index larger than one process's memory is searched by the query
job (:func:`pipeline.api.search_files`) or the warm service (:func:`pipeline.api.serve`), which
spread the shards over actors.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from pipeline.codec.decoder import Decoder
from pipeline.codec.model_file import check_model_unchanged, load_model
from pipeline.index.manifest import load_manifest, version_dir
from pipeline.index.shards import load_shard_rows
from pipeline.io import storage
from pipeline.search.params import search_params
from pipeline.search.scan import build_searcher

log = logging.getLogger(__name__)


class Index:
    """One committed version of an index, loaded into this process. Made by :func:`open_index`."""

    def __init__(self, uri: str, version: str | None = None, *, threads: int = 1,
                 precision: str = "float32", lut_scales: bool = True, options=None):
        t0 = time.perf_counter()
        self.uri = storage.absolute(uri)
        self.manifest = m = load_manifest(self.uri, version=version, options=options)
        check_model_unchanged(m.model, m.version, options)
        self.model = load_model(storage.absolute(m.model["uri"]), options=options)
        cfg = self.model.config
        rows = load_shard_rows(version_dir(self.uri, m.version), [s.to_dict() for s in m.shards],
                               max(1, cfg.nlist), cfg.M, options)
        list_ids, ids_N, codes_NM, offsets, scale_N = rows
        self._searcher = build_searcher(self.model, list_ids, ids_N, codes_NM, offsets, scale_N=scale_N,
                                        lut_scales=lut_scales, decode_fn=Decoder(self.model, precision),
                                        source=f"{storage.redact(self.uri)} {m.version}", num_threads=threads)
        self.load_s = time.perf_counter() - t0

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def ntotal(self) -> int:
        """Vectors in this version."""
        return int(self.manifest.total_rows)

    @property
    def d(self) -> int:
        """Dimension of the vectors (and of the queries)."""
        return int(self.model.config.dim)

    def search(self, queries: np.ndarray, k: int = 10, **params: Any) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest neighbours of each query row: ``(D, I)``, float32 scores and int64 ids,
        both ``(Q, k)``, best first: squared L2 distances (ascending) for an ``l2`` index, inner
        products or cosine similarities (descending) for ``ip`` and ``cosine``; -1 ids (with
        inf, or -inf, scores) where fewer than ``k`` candidates were found. ``params`` are
        :class:`~pipeline.search.params.SearchParams` fields: ``nprobe``, ``shortlist``,
        ``rerank``, ``pairwise``, ``prefix_steps``, ``prefix_shortlist``, ``probe_ratio`` (the
        ``qinco search`` options of the same names)."""
        p = search_params({**params, "k": k})
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        return self._searcher.search(q, p)

    def info(self) -> dict[str, Any]:
        """What this version holds: its uri, version, vectors, dimension, code, model, shards."""
        m = self.manifest
        return {"uri": storage.redact(self.uri), "version": m.version, "ntotal": self.ntotal, "d": self.d,
                "metric": self.model.config.metric, "code": dict(m.code), "model_uri": storage.redact(m.model["uri"]),
                "shards": len(m.shards), "inputs": [storage.redact(i.uri) for i in m.inputs],
                "created": m.created, "load_s": round(self.load_s, 3)}

    def __repr__(self) -> str:
        return f"Index({storage.redact(self.uri)!r}, version={self.version!r}, ntotal={self.ntotal}, d={self.d})"


def open_index(uri: str, version: str | None = None, *, threads: int = 1, precision: str = "float32",
               lut_scales: bool = True, options=None) -> Index:
    """Load a committed index version (``CURRENT`` by default) for searching in this process.

    ``threads``: threads of each search (query parts, as ``ShardSearcher``); ``precision``: the
    re-rank decoder's arithmetic (``float32`` or ``bfloat16``); ``lut_scales``: rank the shortlist
    with the row-scaled additive decoder (as the query job does by default)."""
    return Index(uri, version, threads=threads, precision=precision, lut_scales=lut_scales, options=options)
