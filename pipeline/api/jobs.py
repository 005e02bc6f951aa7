"""The pipeline's jobs as Python calls: train, encode, decode, plan, search, serve, re-encode.

Each ``qinco`` sub-command is one call here with the same options as keywords (``--time-budget``
is ``time_budget_s``, ``--bytes`` is ``code_bytes``); the command line only parses and prints.
Every call checks its arguments before any work, and a job that needs Ray starts a local one
when ``RAY_ADDRESS`` is unset (:func:`pipeline.distributed.cluster.ensure_ray`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import signal
import threading
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.api.index import Index, open_index
from pipeline.codec.decoder import decode as _decode
from pipeline.codec.metric import check_metric
from pipeline.codec.model import PRESETS, config_from_preset
from pipeline.codec.model_file import CONFIG_FILE, load_model, model_identity
from pipeline.distributed.cluster import cluster_at_address, cpus_share, default_cpus_per_worker, ensure_ray
from pipeline.distributed.train import DistTrainConfig, run_distributed_training
from pipeline.errors import ConfigError
from pipeline.io import codes as codes_io, storage, vectors
from pipeline.search.params import search_params
from pipeline.stages.baselines import BaselinesConfig, run_baselines_job
from pipeline.stages.demo import run_demo
from pipeline.stages.encode import EncodeJobConfig, encode_file, run_encode
from pipeline.stages.plan import check_plan, format_plan, plan_encode as _plan_encode, plan_search as _plan_search
from pipeline.stages.plan import resources
from pipeline.stages.reencode import ReencodeConfig, run_reencode
from pipeline.stages.search import SearchJobConfig, TuneSpec, evaluate_results, run_search
from pipeline.stages.serve import SearchService, ServeConfig, run_serve
from pipeline.stages.train import run_train
from pipeline.train.config import DEFAULT_EPOCHS, TrainConfig, default_lr
from pipeline.train.recipe import AUTO

__all__ = ["build_index", "train", "encode_files", "decode_file", "plan_encode", "plan_search", "format_plan",
           "check_plan", "search_files", "evaluate", "open_service", "serve", "reencode", "baselines", "demo"]

Echo = Callable[[str], None]


def _uris(data: str | os.PathLike | Sequence[str | os.PathLike], what: str) -> list[str]:
    """``data`` as a list of URIs: one URI or path, or a sequence of them."""
    uris = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not uris or not all(isinstance(u, (str, os.PathLike)) and os.fspath(u) for u in uris):
        raise ConfigError(f"{what} must be a URI or a list of URIs (files, folders or glob patterns)")
    return [os.fspath(u) for u in uris]


def _check_out(uri: str, what: str, files: Sequence[str] = ()) -> None:
    """Refuse an output ending in a file extension the job does not write: ``what`` names what it
    writes there (a folder or prefix), ``files`` the extensions of the files it can write instead
    (``encode --out codes.npy`` would otherwise build an index folder named codes.npy)."""
    ext = vectors.file_extension(uri)
    if ext is None or ext in files:
        return
    also = f", or a file ending in {' / '.join('.' + f for f in files)}" if files else ""
    raise ConfigError(f"{storage.redact(uri)}: this job does not write .{ext} files; "
                      f"give {what} (a folder or prefix without a file extension){also}")


def _cpus(cpus_per_worker: float | None, workers: int) -> float:
    return cpus_per_worker or default_cpus_per_worker(workers)


# --------------------------------------------------------------------------- train
def _code_size(code_bytes: int | None, M: int | None, K: int | None) -> int | None:
    """``code_bytes`` as M (8-bit codes unless ``K`` says otherwise); both must agree."""
    if code_bytes is None:
        return M
    bits = (K or 256).bit_length() - 1
    if code_bytes < 1 or (code_bytes * 8) % bits or (K or 256) != 1 << bits:
        raise ConfigError(f"bytes {code_bytes} is not a whole number of {bits}-bit codes")
    m = code_bytes * 8 // bits
    if M is not None and M != m:
        raise ConfigError(f"bytes {code_bytes} means M {m}, not M {M}")
    return m


def _check_ivf(ivf: int | str) -> bool:
    """True for ``"auto"``; refuses anything but a number of lists >= 0."""
    if ivf == AUTO:
        return True
    if isinstance(ivf, bool) or not isinstance(ivf, int) or ivf < 0:
        raise ConfigError(f"ivf must be 'auto' or a number of lists >= 0, got {ivf!r}")
    return False


def train(data: str | Sequence[str], out: str, *, preset: str = AUTO, code_bytes: int | None = None,
          M: int | None = None, K: int | None = None, L: int | None = None, h: int | None = None,
          de: int | None = None, dh: int | None = None, A: int | None = None, B: int | None = None,
          B_train: int | None = None, ivf: int | str = AUTO, metric: str = "l2", epochs: int | None = None,
          patience: int | None = None, max_train: int | None = None, val_size: int = 2000,
          time_budget_s: float | None = None, batch_size: int | None = None, lr: float | None = None,
          input_noise: float | None = None, seed: int = 0, device: str = "cpu",
          sample_from: Sequence[str] | None = None, sample_size: int | None = 1_000_000,
          vector_column: str | None = None, id_column: str | None = None, workers: int = 0,
          cpus_per_worker: float | None = None, gpus_per_worker: float = 0.0, threads_per_worker: int = 0,
          fresh: bool = False, stop_after_epochs: int | None = None, options=None,
          echo: Echo = print) -> dict[str, Any]:
    """Train a model into ``out`` (a directory or prefix): in this process, or on Ray Train with
    ``workers`` >= 1 (DDP; resumed from its checkpoints when run again, unless ``fresh``).

    ``preset="auto"`` chooses the model size, beam, learning rate and batch from the number and
    dimension of the vectors (the sizes given here win); ``ivf="auto"`` chooses the IVF lists
    from the number of vectors, 0 builds none. Training ends after ``epochs``, at
    ``time_budget_s`` (the learning rate anneals over it) or by early stopping (``patience``).
    ``sample_from`` (in-process only) adds up to ``sample_size`` rows of those files (0 or None:
    all). Returns ``{"model_uri", "history"}`` in-process, Ray Train's summary otherwise."""
    data_uris = _uris(data, "data")
    _check_out(out, "a model directory")
    if preset != AUTO and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join([AUTO, *sorted(PRESETS)])}")
    M = _code_size(code_bytes, M, K)
    ivf_auto = _check_ivf(ivf)
    overrides = dict(M=M, K=K, L=L, h=h, de=de, dh=dh, A=A, B=B, B_train=B_train,
                     nlist=None if ivf_auto else ivf, metric=check_metric(metric))
    # Without epochs a budget alone ends training (or early stopping): a cap of 10 epochs would
    # stop a 30-minute run after minutes, before the rate, annealed over the budget, had come down.
    if epochs is None and not time_budget_s:
        epochs = DEFAULT_EPOCHS
    explicit = frozenset(k for k, v in (("lr", lr), ("batch_size", batch_size), ("input_noise", input_noise))
                         if v is not None)
    extra = {k: v for k, v in (("patience", patience), ("input_noise", input_noise)) if v is not None}
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size or TrainConfig.batch_size, **extra,
                       lr=lr if lr is not None else default_lr(preset), seed=seed, max_train=max_train,
                       val_size=val_size, time_budget_s=time_budget_s,
                       lr_schedule="time" if time_budget_s else "steps")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0 (0: train in this process), got {workers}")
    if workers == 0:
        if stop_after_epochs is not None:
            raise ConfigError("stop_after_epochs pauses a Ray Train run (workers >= 1); in this process "
                              "give epochs instead")
        history = run_train(data_uris, out, overrides, preset, tcfg, device=device, options=options, echo=echo,
                            explicit_train=explicit, sample_from=list(sample_from) if sample_from else None,
                            sample_size=sample_size or None, ivf_auto=ivf_auto,
                            columns=(vector_column, id_column))
        return {"model_uri": storage.redact(out), "history": history}
    if sample_from:
        raise ConfigError("sample_from trains in this process; with workers give those files to data "
                          "(the validation rows are then held out of all of them)")
    if preset == AUTO:
        # the recipe needs the number of training vectors: the job chooses it after planning
        qd = {k: v for k, v in overrides.items() if v is not None}
    else:
        # the dimension comes from the data headers, checked by the job before anything else
        qd = config_from_preset(preset, 1, **overrides).to_dict()
    qd["dim"] = None
    ensure_ray()
    return run_distributed_training(DistTrainConfig(
        data_uris=data_uris, out_uri=out, qinco=qd, train=tcfg.to_dict(), preset=preset,
        explicit_train=sorted(explicit), ivf_auto=ivf_auto, vector_column=vector_column, id_column=id_column,
        workers=workers, cpus_per_worker=_cpus(cpus_per_worker, workers), gpus_per_worker=gpus_per_worker,
        threads_per_worker=threads_per_worker, fresh=fresh, stop_after_epochs=stop_after_epochs), options=options)


# --------------------------------------------------------------------------- encode, decode
def _is_codes_file(out: str) -> bool:
    return out.lower().endswith(".parquet")


def encode_files(model: str, data: str | Sequence[str], out: str, *, workers: int = 2,
                 cpus_per_worker: float | None = None, gpus_per_worker: float = 0.0, shard_rows: int = 65536,
                 batch_size: int | None = None, fmt: str | None = None, vector_column: str | None = None,
                 id_column: str | None = None, overwrite: bool = False, skip_bad_ranges: bool = False,
                 B: int | None = None, A: int | None = None, lut_weight: float = 0.0,
                 precision: str | None = None, block_rows: int = 65536, device: str = "cpu", options=None,
                 echo: Echo = print) -> dict[str, Any]:
    """Encode vector files (URIs, folders, globs) with the model at ``model``.

    ``out`` an index URI: the Ray encode job (byte-range reads, ``workers`` encoder actors) writes
    IVF shards and commits a new version; run again, it resumes. Returns the job's report.
    ``out`` a ``.parquet`` file: one input is encoded in this process into a codes file
    (``block_rows`` at a time); returns ``{"out", "vectors"}``."""
    data_uris = _uris(data, "data")
    _check_out(out, "an index", files=("parquet",))
    if _is_codes_file(out):
        if len(data_uris) != 1:
            raise ConfigError("a codes file holds one input; give one data file or an index URI as out")
        n = encode_file(model, data_uris[0], out, B=B, A=A, block_rows=block_rows, device=device, echo=echo,
                        lut_weight=lut_weight, precision=precision, fmt=fmt)
        return {"out": storage.redact(out), "vectors": n}
    ensure_ray()
    return run_encode(EncodeJobConfig(
        model_uri=model, data_uris=data_uris, index_uri=out, fmt=fmt, workers=workers,
        cpus_per_worker=_cpus(cpus_per_worker, workers), gpus_per_worker=gpus_per_worker, shard_rows=shard_rows,
        batch_size=batch_size or 0, overwrite=overwrite, skip_bad_ranges=skip_bad_ranges, lut_weight=lut_weight,
        precision=precision, A=A, B=B, vector_column=vector_column, id_column=id_column), options=options)


def decode_file(model: str, codes: str, out: str, *, prefix: int | None = None, device: str = "cpu",
                options=None, echo: Echo = print) -> int:
    """Decode a codes file (written by :func:`encode_files`) into the vector file ``out`` (format
    from its extension); ``prefix`` m decodes with the first m codes. Returns the vectors written."""
    vectors.detect_format(out)  # an out the writer cannot write fails before the decode
    mdl = load_model(model, device=device, options=options)
    data = codes_io.read_codes(codes, options)
    written_by = data.meta.get("model", {}).get("weights_sha256")
    if written_by and written_by != model_identity(model, options)["weights_sha256"]:
        raise ConfigError(f"{storage.redact(codes)} was written by another model "
                          f"({data.meta['model'].get('model_uri')}), not {storage.redact(model)}")
    if (data.meta["M"], data.meta["K"]) != (mdl.config.M, mdl.config.K):
        raise ConfigError(f"{storage.redact(codes)} holds M={data.meta['M']}, K={data.meta['K']} codes; "
                          f"the model has M={mdl.config.M}, K={mdl.config.K}")
    x = _decode(mdl, data.codes, data.list_ids, prefix=prefix, device=device)
    vectors.write_vectors(out, x, options=options)
    echo(f"wrote {len(x)} vectors to {storage.redact(out)}")
    return len(x)


# --------------------------------------------------------------------------- plans
def _resources(out: str | None) -> dict[str, Any]:
    """What a plan is checked against: the Ray cluster at ``RAY_ADDRESS``, or this machine (where
    a local Ray would run), plus the free disk under ``out``."""
    return resources(out, cluster_at_address())


def plan_encode(model: str, data: str | Sequence[str], out: str, *, workers: int = 2,
                cpus_per_worker: float | None = None, gpus_per_worker: float = 0.0, shard_rows: int = 65536,
                A: int | None = None, B: int | None = None, fmt: str | None = None,
                vector_column: str | None = None, id_column: str | None = None, options=None) -> dict[str, Any]:
    """What :func:`encode_files` into an index would need: vectors, shards, disk, actors and their
    memory, time from the cost model, and the ``problems`` that make it impossible on the cluster
    (or this machine). Reads only headers and the model's config. :func:`format_plan` prints it,
    :func:`check_plan` raises on its problems."""
    data_uris = _uris(data, "data")
    _check_out(out, "an index", files=("parquet",))
    res = _resources(out)
    return _plan_encode(model, data_uris, out, workers=workers,
                        cpus_per_worker=cpus_per_worker or cpus_share(res["cpus"], workers),
                        gpus_per_worker=gpus_per_worker, shard_rows=shard_rows, A=A, B=B, fmt=fmt,
                        columns=(vector_column, id_column), res=res, options=options)


def plan_search(index: str, queries: str, *, k: int = 10, workers: int = 2, cpus_per_worker: float | None = None,
                memory_per_actor: int | None = None, version: str | None = None, max_queries: int | None = None,
                vector_column: str | None = None, options=None, **params: Any) -> dict[str, Any]:
    """What :func:`search_files` would need (vectors, queries, actors and their memory, time), and
    the ``problems`` that make it impossible; ``params`` as :func:`search_files`."""
    res = _resources(None)
    return _plan_search(index, queries, search_params({**params, "k": k}), workers=workers,
                        cpus_per_worker=cpus_per_worker or cpus_share(res["cpus"], workers),
                        memory_per_actor=memory_per_actor, version=version, max_queries=max_queries,
                        vector_column=vector_column, res=res, options=options)


# --------------------------------------------------------------------------- search
def search_files(index: str, queries: str, out: str, *, k: int = 10, workers: int = 2,
                 cpus_per_worker: float | None = None, query_batch: int = 2048, max_queries: int | None = None,
                 version: str | None = None, allow_partial: bool = False, memory_per_actor: int | None = None,
                 mmap_dir: str | None = None, rerank_precision: str = "float32", lut_scales: bool = True,
                 target_recall: float | None = None, tune_groundtruth: str | None = None,
                 tune_queries: str | None = None, tune_measure: str = "R@10", tune_sample: int = 1000,
                 vector_column: str | None = None, options=None, **params: Any) -> dict[str, Any]:
    """The query job: the ``k`` nearest neighbours of every row of the file ``queries``, searched
    by shard actors, written to ``out`` (big-ann format, ``OUT.parquet``, ``OUT.report.json``).
    Queries go ``query_batch`` at a time and each block's results are kept as it completes, so a
    re-run resumes. ``params``: ``nprobe``, ``shortlist``, ``rerank``, ``pairwise``,
    ``prefix_steps``, ``prefix_shortlist``, ``probe_ratio``; or ``target_recall`` with
    ``tune_groundtruth`` chooses nprobe, shortlist and rerank first. ``vector_column``: the column
    of parquet queries (default ``vector``). Returns the report."""
    if (target_recall is None) != (tune_groundtruth is None):
        raise ConfigError("target_recall and tune_groundtruth go together: the tuning measures recall "
                          "against the ground truth of its queries")
    tune = None if target_recall is None else TuneSpec(
        target_recall=target_recall, groundtruth_uri=tune_groundtruth, queries_uri=tune_queries,
        measure=tune_measure, sample=tune_sample)
    p = search_params({**params, "k": k})
    ensure_ray()
    return run_search(SearchJobConfig(
        index_uri=index, queries_uri=queries, out_uri=out, params=p, rerank_precision=rerank_precision,
        workers=workers, cpus_per_worker=_cpus(cpus_per_worker, workers), query_batch=query_batch,
        allow_partial=allow_partial, lut_scales=lut_scales, max_queries=max_queries, version=version,
        memory_per_actor=memory_per_actor, mmap_dir=mmap_dir, tune=tune, vector_column=vector_column),
        options=options)


def evaluate(results: str, groundtruth: str, options=None) -> dict[str, float]:
    """Recall (R@1/10/100 and more) of a results file against ground truth."""
    return evaluate_results(results, groundtruth, options)


def _serve_config(index: str, *, host: str = "127.0.0.1", port: int = 8000, k: int, workers: int,
                  cpus_per_worker: float | None, version: str | None, poll_s: float, rerank_precision: str,
                  memory_per_actor: int | None, params: dict[str, Any]) -> ServeConfig:
    cfg = ServeConfig(index_uri=index, host=host, port=port, workers=workers, cpus_per_worker=1.0,
                      params=search_params({**params, "k": k}), version=version, poll_s=poll_s,
                      rerank_precision=rerank_precision, memory_per_actor=memory_per_actor)
    ensure_ray()
    # following CURRENT, a swap runs the new version's actors beside the served ones: by default
    # each takes the share of the cluster that lets both pools fit
    cfg.cpus_per_worker = cpus_per_worker or default_cpus_per_worker(workers if version else 2 * workers)
    return cfg


def open_service(index: str, *, k: int = 10, workers: int = 2, cpus_per_worker: float | None = None,
                 version: str | None = None, poll_s: float = 5.0, rerank_precision: str = "float32",
                 memory_per_actor: int | None = None, options=None, **params: Any) -> SearchService:
    """The warm service without HTTP, for a long-lived process of your own: shard actors load the
    index once, ``.search(queries, k=None, **params) -> (D, I, version)`` answers from any thread,
    ``.stats()`` gives latency and queries/s, ``.close()`` (or a ``with`` block) ends the actors.
    Without ``version`` it follows ``CURRENT`` as :func:`serve` does."""
    return SearchService(_serve_config(index, k=k, workers=workers, cpus_per_worker=cpus_per_worker,
                                       version=version, poll_s=poll_s, rerank_precision=rerank_precision,
                                       memory_per_actor=memory_per_actor, params=params), options)


def serve(index: str, *, host: str = "127.0.0.1", port: int = 8000, k: int = 10, workers: int = 2,
          cpus_per_worker: float | None = None, version: str | None = None, poll_s: float = 5.0,
          rerank_precision: str = "float32", memory_per_actor: int | None = None, report_s: float = 60.0,
          stop: threading.Event | None = None, options=None, echo: Echo = print, **params: Any) -> dict[str, Any]:
    """The warm search service over HTTP (``POST /search``, ``GET /stats``, ``GET /health``) until
    ``stop`` is set; without ``stop``, until SIGINT or SIGTERM (handlers installed when called from
    the main thread, restored on return). ``k`` and ``params`` are the defaults of each request.
    Without ``version`` it follows ``CURRENT`` and swaps to each new version; the actors' default
    CPUs then leave room for two pools. Returns the last stats."""
    cfg = _serve_config(index, host=host, port=port, k=k, workers=workers, cpus_per_worker=cpus_per_worker,
                        version=version, poll_s=poll_s, rerank_precision=rerank_precision,
                        memory_per_actor=memory_per_actor, params=params)
    previous = {}
    if stop is None:
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):  # after Ray's start, which sets its own
                previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        return run_serve(cfg, stop, options=options, echo=echo, report_s=report_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- versions, baselines, demo
def reencode(index: str, *, model: str | None = None, add: Sequence[str] | None = None, keep: int | None = None,
             workers: int = 2, cpus_per_worker: float | None = None, gpus_per_worker: float = 0.0,
             batch_size: int | None = None, shard_rows: int | None = None, fmt: str | None = None,
             options=None) -> dict[str, Any]:
    """A new version of ``index``: every input re-encoded with the new ``model``, or the files of
    ``add`` encoded after the existing vectors (the existing shards reused); ``CURRENT`` moves to
    it once it is complete, then ``keep`` N deletes all but the last N versions. Resumes when run
    again. Returns the job's report."""
    cfg = ReencodeConfig(index_uri=index, model_uri=model, add_uris=list(add or []), keep=keep, workers=workers,
                         cpus_per_worker=1.0, gpus_per_worker=gpus_per_worker, batch_size=batch_size or 0,
                         shard_rows=shard_rows, fmt=fmt)
    cfg.validate()
    ensure_ray()
    cfg.cpus_per_worker = _cpus(cpus_per_worker, workers)
    return run_reencode(cfg, options=options)


def baselines(out: str, **fields: Any) -> dict[str, Any]:
    """The Faiss PQ/OPQ/RQ/LSQ baselines measured as QINCo is (reconstruction MSE, recall); the
    keywords are :class:`~pipeline.stages.baselines.BaselinesConfig`'s fields (``dataset`` or
    ``learn``/``base``/``queries``, ``bytes``, ``methods``, ``k``, ``metric``, ...). Writes the JSON
    report to ``out`` and returns it."""
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(BaselinesConfig)})
    if unknown:
        raise ConfigError(f"baselines: unknown option(s) {', '.join(unknown)}")
    return run_baselines_job(BaselinesConfig(out=out, **fields))


def demo(data_dir: str | None = None, out: str = "demo-out", quick: bool = False) -> dict[str, Any]:
    """The end-to-end demo (dataset, baselines, train, encode, search, evaluate) into ``out``."""
    return run_demo(data_dir=data_dir, out=out, quick=quick)


# --------------------------------------------------------------------------- build_index
MODEL_DIR = "model"  # where build_index keeps the model it trains, under the index prefix
ARRAYS_DIR = "arrays"  # where build_index stores arrays it is given, under the index prefix


def _store_array(x: np.ndarray, index_uri: str, options) -> str:
    """``x`` as an ``.npy`` file under the index prefix, named by its content (the same array is
    the same file, so a re-run resumes; another array is another input)."""
    x = np.ascontiguousarray(x)
    if x.ndim != 2 or x.dtype.kind not in "fiu":
        raise ConfigError(f"build_index: vectors must be a 2-d numeric array, got shape {x.shape} {x.dtype}")
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    data = buf.getvalue()
    uri = storage.join(index_uri, ARRAYS_DIR, f"vectors-{hashlib.sha256(data).hexdigest()[:16]}.npy")
    if not storage.exists(uri, options):
        storage.write_bytes_atomic(uri, data, options)
    return uri


def build_index(data: str | Sequence[str] | np.ndarray, index_uri: str, *, model: str | None = None,
                code_bytes: int = 8, ivf: int | str = AUTO, metric: str = "l2", preset: str = AUTO,
                train_epochs: int | None = None, train_time_s: float | None = None, train_workers: int = 0,
                workers: int = 2, cpus_per_worker: float | None = None, shard_rows: int = 65536,
                seed: int = 0, options=None, echo: Echo = print) -> Index:
    """Files (URIs, folders, globs) or an array in, a committed index out; returns it opened.

    The model is ``model`` when given (trained elsewhere), else ``INDEX/model``: trained by
    :func:`train` when it is not there yet (``code_bytes`` per vector, IVF lists from the number
    of vectors with ``ivf="auto"`` or the given count, ``preset`` as ``qinco train --preset``, at
    most ``train_epochs`` epochs or ``train_time_s`` seconds, searched by ``metric``: l2, ip or
    cosine; in this process, or on Ray Train with ``train_workers`` >= 1). The vectors are then
    encoded by the Ray encode job (``workers`` actors) and committed as a new version of
    ``index_uri``. An array is stored under ``INDEX/arrays`` first."""
    index_uri = storage.absolute(index_uri)
    if isinstance(data, np.ndarray):
        data_uris = [_store_array(data, index_uri, options)]
    else:
        data_uris = _uris(data, "build_index: data (an array or URIs)")
    if model is None:
        model = storage.join(index_uri, MODEL_DIR)
        if storage.exists(storage.join(model, CONFIG_FILE), options):
            echo(f"using the model at {storage.redact(model)}")
        else:
            if isinstance(code_bytes, bool) or not isinstance(code_bytes, (int, np.integer)) or code_bytes < 1:
                raise ConfigError(f"build_index: code_bytes must be a whole number >= 1, got {code_bytes!r}")
            train(data_uris, model, preset=preset, code_bytes=int(code_bytes), ivf=ivf, metric=metric,
                  epochs=train_epochs, time_budget_s=train_time_s, seed=seed, workers=train_workers,
                  options=options, echo=echo)
    report = encode_files(model, data_uris, index_uri, workers=workers, cpus_per_worker=cpus_per_worker,
                          shard_rows=shard_rows, options=options, echo=echo)
    echo(f"{storage.redact(index_uri)}: {report['status']} {report['version']}"
         + (f", {report['vectors']} vectors in {report['shards']} shards" if "vectors" in report else ""))
    return open_index(index_uri, options=options)
