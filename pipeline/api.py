"""The Python API: search an index from your own code, build one in one call, encode and decode arrays.

>>> from pipeline.api import open_index, build_index, encode, decode
>>> index = open_index("s3://bucket/my-index")            # CURRENT, or version="v000003"
>>> D, I = index.search(queries, k=10, nprobe=16)         # float32 (Q, k) distances, int64 ids
>>> index.info()["ntotal"]

:func:`open_index` loads every shard of a committed version into this process once (verified as
the query job verifies them) and answers any number of searches with the search pipeline the
shard actors run (:mod:`pipeline.search.pipeline`), so it returns the query job's results. An
index larger than one process's memory is searched by the query job (``qinco search``) or the
warm service (``qinco serve``), which spread the shards over actors.

:func:`build_index` goes from files or an array to a committed index: it trains a model when the
index has none (in this process, the recipe chosen from the data), encodes with the Ray encode
job and commits. Re-running it resumes: a trained model is reused, encoded shards are kept.
"""

from __future__ import annotations

import hashlib
import io as _io
import logging
import time
from typing import Any, Sequence

import numpy as np

from pipeline.codec.decoder import Decoder, decode as _decode
from pipeline.codec.encoder import encode as _encode
from pipeline.codec.metric import check_metric
from pipeline.codec.model import QINCo
from pipeline.codec.model_file import CONFIG_FILE, check_model_unchanged, load_model
from pipeline.distributed.cluster import default_cpus_per_worker, ensure_ray
from pipeline.errors import ConfigError
from pipeline.index.manifest import load_manifest, version_dir
from pipeline.index.shards import load_shard_rows
from pipeline.io import storage
from pipeline.search.params import search_params
from pipeline.search.scan import build_searcher
from pipeline.stages.encode import EncodeJobConfig, run_encode
from pipeline.stages.train import run_train
from pipeline.train.config import DEFAULT_EPOCHS, TrainConfig, default_lr
from pipeline.train.recipe import AUTO

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # where build_index keeps the model it trains, under the index prefix
ARRAYS_DIR = "arrays"  # where build_index stores arrays it is given, under the index prefix


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
        inf, or -inf, scores) where fewer than ``k`` candidates were found. ``params`` are :class:`~pipeline.search.params.SearchParams`
        fields: ``nprobe``, ``shortlist``, ``rerank``, ``pairwise``, ``prefix_steps``,
        ``prefix_shortlist``, ``probe_ratio`` (the ``qinco search`` options of the same names)."""
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


def _model(model: QINCo | str, device: str, options) -> QINCo:
    if isinstance(model, QINCo):
        return model
    if isinstance(model, str):
        return load_model(model, device=device, options=options)
    raise ConfigError(f"model must be a QINCo model or a model URI, got {type(model).__name__}")


def encode(model: QINCo | str, x: np.ndarray, *, device: str = "cpu", B: int | None = None,
           A: int | None = None, batch_size: int | None = None,
           options=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Codes of the rows of ``x``: ``(codes_NM, list_ids_N)``; ``codes_NM`` uint8 (uint16 past
    256 codewords), ``list_ids_N`` the IVF list of each row (None for a model without IVF).
    ``model`` is a loaded model or its URI; ``B``/``A``: the beam search's width (default the
    model's)."""
    return _encode(_model(model, device, options), np.asarray(x), device=device, B=B, A=A,
                   batch_size=batch_size, source="encode(x)")


def decode(model: QINCo | str, codes: np.ndarray, list_ids: np.ndarray | None = None, *,
           prefix: int | None = None, device: str = "cpu", options=None) -> np.ndarray:
    """float32 vectors of ``codes`` (and their IVF lists, as :func:`encode` returns them);
    ``prefix`` m decodes with the first m codes only."""
    mdl = _model(model, device, options)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != mdl.config.M:
        raise ConfigError(f"codes must have shape (N, {mdl.config.M}) for this model, got {codes.shape}")
    if mdl.ivf and list_ids is None:
        raise ConfigError("this model has IVF lists: decode needs the list ids encode returned")
    return _decode(mdl, codes, list_ids, prefix=prefix, device=device)


def _store_array(x: np.ndarray, index_uri: str, options) -> str:
    """``x`` as an ``.npy`` file under the index prefix, named by its content (the same array is
    the same file, so a re-run resumes; another array is another input)."""
    x = np.ascontiguousarray(x)
    if x.ndim != 2 or x.dtype.kind not in "fiu":
        raise ConfigError(f"build_index: vectors must be a 2-d numeric array, got shape {x.shape} {x.dtype}")
    buf = _io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    data = buf.getvalue()
    uri = storage.join(index_uri, ARRAYS_DIR, f"vectors-{hashlib.sha256(data).hexdigest()[:16]}.npy")
    if not storage.exists(uri, options):
        storage.write_bytes_atomic(uri, data, options)
    return uri


def build_index(data: str | Sequence[str] | np.ndarray, index_uri: str, *, model: str | None = None,
                code_bytes: int = 8, ivf: int | str = "auto", metric: str = "l2", preset: str = AUTO,
                train_epochs: int | None = None, train_time_s: float | None = None,
                workers: int = 2, cpus_per_worker: float | None = None, shard_rows: int = 65536,
                seed: int = 0, options=None, echo=print) -> Index:
    """Files (URIs, folders, globs) or an array in, a committed index out; returns it opened.

    The model is ``model`` when given (trained elsewhere), else ``INDEX/model``: trained here when
    it is not there yet (``code_bytes`` per vector, IVF lists from the number of vectors with
    ``ivf="auto"`` or the given count, ``preset`` as ``qinco train --preset``, at most
    ``train_epochs`` epochs or ``train_time_s`` seconds, searched by ``metric``: l2, ip or
    cosine). The vectors are then encoded by the Ray encode job (``workers`` actors; a local Ray
    is started without ``RAY_ADDRESS``) and committed as a new version of ``index_uri``. An array is stored under ``INDEX/arrays`` first."""
    index_uri = storage.absolute(index_uri)
    if isinstance(data, np.ndarray):
        data_uris = [_store_array(data, index_uri, options)]
    elif isinstance(data, str):
        data_uris = [data]
    else:
        data_uris = list(data)
        if not data_uris or not all(isinstance(u, str) for u in data_uris):
            raise ConfigError("build_index: data must be an array, a URI or a list of URIs")
    if model is None:
        model = storage.join(index_uri, MODEL_DIR)
        if storage.exists(storage.join(model, CONFIG_FILE), options):
            echo(f"using the model at {storage.redact(model)}")
        else:
            if code_bytes < 1 or int(code_bytes) != code_bytes:
                raise ConfigError(f"build_index: code_bytes must be a whole number >= 1, got {code_bytes}")
            auto = ivf == "auto"
            if not auto and (isinstance(ivf, bool) or not isinstance(ivf, int) or ivf < 0):
                raise ConfigError(f"build_index: ivf must be 'auto' or a number of lists >= 0, got {ivf!r}")
            epochs = train_epochs if train_epochs is not None else (None if train_time_s else DEFAULT_EPOCHS)
            tcfg = TrainConfig(epochs=epochs, lr=default_lr(preset), seed=seed, time_budget_s=train_time_s,
                               lr_schedule="time" if train_time_s else "steps")
            run_train(data_uris, model, {"M": int(code_bytes), "nlist": None if auto else ivf,
                                         "metric": check_metric(metric)}, preset, tcfg,
                      options=options, echo=echo, ivf_auto=auto)
    ensure_ray()
    report = run_encode(EncodeJobConfig(
        model_uri=model, data_uris=data_uris, index_uri=index_uri, workers=workers,
        cpus_per_worker=cpus_per_worker or default_cpus_per_worker(workers), shard_rows=shard_rows),
        options=options)
    echo(f"{storage.redact(index_uri)}: {report['status']} {report['version']}"
         + (f", {report['vectors']} vectors in {report['shards']} shards" if "vectors" in report else ""))
    return open_index(index_uri, options=options)
