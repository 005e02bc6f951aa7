"""The encode job: vector files in object storage -> IVF shards + manifest, on Ray Data.

Build pattern (as lance-ray's): the model is trained once beforehand; the driver plans the work,
workers build shards, the driver commits a manifest atomically.

1. The driver reads only headers (``plan_inputs``), checks every file's dimension against the
   model before any work starts, and cuts each file into row ranges of ``shard_rows`` rows.
   Every range becomes one shard with a deterministic name (file index, first row).
2. Ranges whose shard already exists and verifies (size + sha256 from its sidecar) are skipped:
   a killed job re-run with the same arguments encodes only what is missing.
3. Ray Data reads the pending ranges with byte-range read tasks (``VectorDatasource``, a quarter
   CPU each, ``pipeline.distributed.datasource.READ_TASK_CPUS``, so they run beside actors holding most CPUs), an actor
   pool (model loaded once per actor, CPU or GPU) assigns IVF lists and computes QINCo codes with
   the same ``encoder.encode`` as single-process ``qinco encode`` (``lut_weight``: the lookup-table-
   aware choice among the final beam, ``pipeline.codec.beam_search.LutChoice``; ``precision``: the network's
   arithmetic, bfloat16 for faster CPU encoding), and the rows' lookup-table
   scales (``pipeline.codec.decoder.model_row_scales``: one float32 decode of the codes, far cheaper
   than the beam search), and writes each range's shard atomically, followed by its sidecar.
4. When every range has a shard, the driver writes the manifest (the commit point), switches the
   index's ``CURRENT`` pointer, and saves a run report beside the manifest (and a copy in the
   index's history, ``pipeline.index.history``).

A job with a ``parent_version`` (``pipeline.stages.reencode``) derives a new version from a committed
one: ranges whose shard in the parent holds the same input rows encoded by the same model are
copied from the parent (``storage.copy_file``: a hard link locally, a server-side copy on S3)
instead of being encoded again, so adding files to an index encodes only the new files.

Nothing reads a shard that is not named in a committed manifest, so a crashed job never exposes
a half-built index. No stage holds the whole collection: each actor holds one range at a time.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.data import ActorPoolStrategy, DataContext

from pipeline.codec.beam_search import LutChoice
from pipeline.codec.encoder import encode
from pipeline.codec.ivf import AUTO_FLAT_BELOW
from pipeline.codec.model import QincoConfig
from pipeline.codec.model_file import load_model, model_identity, read_model_info
from pipeline.codec.precision import resolve_precision
from pipeline.config import JsonConfig, code_version
from pipeline.distributed.datasource import read_source, VectorDatasource
from pipeline.distributed.datasource import unwrap_ray_error
from pipeline.distributed.encode import EncodeActor, shards_done, sidecar
from pipeline.errors import ConcurrentWriterError, ConfigError, ManifestError, PipelineError
from pipeline.index.history import record_event
from pipeline.index.manifest import (
    code_params, commit_manifest, current_version, InputEntry, list_versions, load_manifest,
    Manifest, next_version, shard_uri, ShardEntry, version_dir, version_number,
)
from pipeline.index.manifest import validate_manifest
from pipeline.index.shards import listed_shards, shard_name, ShardInfo
from pipeline.io import storage
from pipeline.io import ids as ids_mod
from pipeline.io import vectors
from pipeline.io.codes import write_codes
from pipeline.io.inputs import input_key, plan_inputs
from pipeline.sysinfo import peak_rss_bytes
from pipeline.progress import Progress

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
# Temporary files of killed shard writers older than this are removed when a job resumes.
STALE_TEMP_S = 3600.0


@dataclass
class EncodeJobConfig(JsonConfig):
    """Parameters of one encode job (stored in the version directory and the manifest)."""

    model_uri: str
    data_uris: list[str]
    index_uri: str
    fmt: str | None = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    shard_rows: int = 65536
    batch_size: int = 0  # encoder batch; 0 = sized from the model's beam and pre-selection
    overwrite: bool = False
    skip_bad_ranges: bool = False
    parent_version: str | None = None  # committed version this one derives from (shards reused)
    # > 0: lookup-table-aware choice of each vector's codes among the final beam (pipeline.codec.beam_search.LutChoice)
    lut_weight: float = 0.0
    # the encoder network's arithmetic (pipeline.codec.precision.PRECISIONS); None: float16 on a GPU, float32 on CPU
    precision: str | None = None
    # the encoder's beam size and pre-selected candidates; None: the model's (e.g. A=16, B=1: a faster encoder)
    A: int | None = None
    B: int | None = None
    # parquet inputs: the columns of the vectors and of the ids (None: "vector" and "id")
    vector_column: str | None = None
    id_column: str | None = None

    def identity(self) -> dict[str, Any]:
        """What makes two runs 'the same job' (resources and batch sizes do not change codes)."""
        ident = {
            "model_uri": self.model_uri,
            "data_uris": list(self.data_uris),
            "fmt": self.fmt,
            "shard_rows": self.shard_rows,
        }
        if self.parent_version is not None:
            ident["parent_version"] = self.parent_version
        if self.lut_weight:  # changes the codes; absent at 0, as in jobs from before the option
            ident["lut_weight"] = self.lut_weight
        if self.precision is not None:  # changes the codes in their last choices; absent by default
            ident["precision"] = self.precision
        for name in ("A", "B"):  # a narrower search finds other codes; absent at the model's
            if getattr(self, name) is not None:
                ident[name] = getattr(self, name)
        for name in ("vector_column", "id_column"):  # other columns are other vectors or ids
            if getattr(self, name) is not None:
                ident[name] = getattr(self, name)
        return ident

    def code_choice(self) -> tuple[float, str | None, int | None, int | None]:
        """What, beside the model, decides which codes a vector gets:
        ``(lut_weight, precision, A, B)``."""
        return float(self.lut_weight), self.precision, self.A, self.B


def job_code_choice(job_config: dict) -> tuple[float, str | None, int | None, int | None]:
    """:meth:`EncodeJobConfig.code_choice` of a committed version's job (for jobs from before the
    options: weight 0, the device's default precision, the model's A and B)."""
    return (float(job_config.get("lut_weight", 0.0)), job_config.get("precision"),
            job_config.get("A"), job_config.get("B"))


@dataclass
class RangeTask(JsonConfig):
    """One row range of one input file, encoded into one shard."""

    file_index: int
    start: int
    stop: int
    shard: str  # path relative to the version directory


def plan_ranges(inputs: list, shard_rows: int) -> list[RangeTask]:
    """Cut every input file into consecutive ranges of at most ``shard_rows`` rows."""
    if shard_rows <= 0:
        raise ConfigError(f"shard_rows must be positive, got {shard_rows}")
    tasks = []
    for fi, inp in enumerate(inputs):
        for start in range(0, inp.count, shard_rows):
            stop = min(inp.count, start + shard_rows)
            tasks.append(RangeTask(fi, start, stop, f"shards/{shard_name(fi, start)}"))
    return tasks


def _reuse_parent_shards(cfg: EncodeJobConfig, vuri: str, inputs_desc: list[dict], model_id: dict,
                         pending: list[RangeTask], options) -> int:
    """Copy the parent version's shards that hold exactly the codes ``pending`` ranges would get.

    A parent shard qualifies when the parent was encoded by the same model (config and weights
    hashes) with the same code choice (``lut_weight``, ``precision``, ``A``, ``B``), its input at that file index is the
    same file (URI, count, header hash, id range, id source) and the shard covers the same rows. Each copy is
    followed by its sidecar, so an interrupted copy is simply redone by the next run. Returns the
    number of shards copied.
    """
    parent = load_manifest(cfg.index_uri, version=cfg.parent_version, options=options)
    if (parent.model.get("sha256"), parent.model.get("weights_sha256")) != (
            model_id["config_sha256"], model_id["weights_sha256"]):
        return 0
    if job_code_choice(parent.job_config) != cfg.code_choice():
        return 0  # the parent's codes were chosen differently

    same_input = {i for i, e in enumerate(parent.inputs)
                  if i < len(inputs_desc) and e.key() == input_key(inputs_desc[i])}
    by_name = {s.name: s for s in parent.shards if s.file_index in same_input}
    copied = 0
    for tk in pending:
        entry = by_name.get(tk.shard)
        if entry is None or entry.rows != tk.stop - tk.start or entry.first_row != tk.start:
            continue
        dst = storage.join(vuri, tk.shard)
        storage.copy_file(shard_uri(cfg.index_uri, parent.version, entry), dst, options)
        storage.write_bytes_atomic(sidecar(dst), entry.info().to_json().encode(), options)
        copied += 1
    if copied:
        log.info("reused %d shards of version %s (same model and inputs)", copied, parent.version)
    return copied


def _existing_index_check(cfg: EncodeJobConfig, model_id: dict, inputs_desc: list[dict], options) -> str | None:
    """Return the committed version when the index already holds exactly this job's result.

    Raise ConfigError if the prefix holds a different index and ``overwrite`` is not set.
    """
    cur = current_version(cfg.index_uri, options)
    if cur is None:
        return None
    try:
        m = load_manifest(cfg.index_uri, options=options)
    except ManifestError as e:
        if cfg.overwrite:
            log.warning("%s; building a new version beside it (--overwrite)", e)
            return None
        raise ManifestError(f"{e}; `qinco rollback {storage.redact(cfg.index_uri)} --to VERSION` returns to "
                            f"an earlier version, --overwrite builds a new one") from None
    same_model = m.model.get("sha256") == model_id["config_sha256"]
    same_inputs = [i.key() for i in m.inputs] == [input_key(d) for d in inputs_desc]
    same_rows = m.job_config.get("shard_rows") == cfg.shard_rows
    same_choice = job_code_choice(m.job_config) == cfg.code_choice()
    if same_model and same_inputs and same_rows and same_choice:
        return cur
    if not cfg.overwrite:
        raise ConfigError(
            f"{storage.redact(cfg.index_uri)} already holds a different index (version {cur}, "
            f"model {m.model.get('uri')}); pass --overwrite to build a new version there")
    return None


def _pick_version(cfg: EncodeJobConfig, options, model_sha: str) -> tuple[str, str | None]:
    """``(version, donor)``: an unfinished version directory of the same job to resume, else a
    newly claimed number.

    The same job means the same identity and the same model content (``model_sha``): shards
    left by a run whose model was since replaced at the same URI are never reused. An unfinished
    directory numbered below the newest committed version could never become ``CURRENT``
    (another job committed past it), so the job claims a new number and copies that
    directory's finished shards (``donor``) instead of re-encoding them.
    """
    committed = set(list_versions(cfg.index_uri, options))
    newest = max((version_number(v) for v in committed), default=0)
    candidates = []
    for uri in storage.list_files(storage.join(cfg.index_uri, "versions"), options):
        if uri.endswith("/" + JOB_FILE):
            v = uri.rstrip("/").split("/")[-2]
            if v not in committed:
                candidates.append(v)
    donor = None
    for v in sorted(candidates, key=version_number, reverse=True):
        try:
            job = json.loads(storage.read_bytes(storage.join(version_dir(cfg.index_uri, v), JOB_FILE), options))
        except (ValueError, PipelineError):
            continue
        if job.get("identity") == cfg.identity() and job.get("model_sha256") == model_sha:
            if version_number(v) > newest:
                return v, None
            donor = v
            break
    # claim a new number: the job file is created only if absent, so of two jobs starting at
    # once one gets vN and the other moves on to vN+1
    body = json.dumps(_job_record(cfg, model_sha), indent=2, sort_keys=True).encode()
    for _attempt in range(1000):
        v = next_version(cfg.index_uri, options)
        if storage.create_exclusive(storage.join(version_dir(cfg.index_uri, v), JOB_FILE), body, options):
            return v, donor
    raise ConcurrentWriterError(f"{storage.redact(cfg.index_uri)}: could not claim a new version number")


def _take_donor_shards(cfg: EncodeJobConfig, donor: str, vuri: str, pending: list[RangeTask], options) -> int:
    """Copy the finished shards (with their sidecars) of an abandoned run of this job."""
    duri = version_dir(cfg.index_uri, donor)
    copied = 0
    finished = shards_done(duri, pending, options)
    for tk in pending:
        if tk.shard in finished:
            dst = storage.join(vuri, tk.shard)
            storage.copy_file(storage.join(duri, tk.shard), dst, options)
            storage.copy_file(sidecar(storage.join(duri, tk.shard)), sidecar(dst), options)
            copied += 1
    if copied:
        log.info("took %d finished shards of the unfinished %s (another job committed past it)", copied, donor)
    return copied


def _job_record(cfg: EncodeJobConfig, model_sha: str) -> dict:
    """What ``job.json`` holds: the identity a resumed run is matched by."""
    return {"identity": cfg.identity(), "model_sha256": model_sha, "config": cfg.to_dict(),
            "code_version": code_version()}


def run_encode(cfg: EncodeJobConfig, options=None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the encode job; returns the run report (also saved beside the manifest)."""
    t_start = time.perf_counter()
    stages: dict[str, float] = {}
    t = time.perf_counter()
    plan = _plan(cfg, options)
    if plan is None or isinstance(plan, dict):
        return plan
    stages["plan_s"] = time.perf_counter() - t
    t = time.perf_counter()
    done_now, actor_peak_rss = _encode_pending(cfg, plan, progress, options) if plan.pending else ([], {})
    stages["encode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    manifest, bad_ranges = _commit(cfg, plan, done_now, options)
    stages["commit_s"] = time.perf_counter() - t
    return _report(cfg, plan, manifest, done_now, actor_peak_rss, bad_ranges, stages,
                   time.perf_counter() - t_start, options)


@dataclass
class _EncodePlan:
    """What the driver settles before any work: the model's identity and config, the inputs,
    the version, its ranges and those still to encode."""

    model_id: dict
    model_config: QincoConfig
    inputs: list
    version: str
    version_uri: str
    tasks: list[RangeTask]
    pending: list[RangeTask]
    reused: int
    done: dict[str, dict]  # the sidecar records of the shards found finished when planned


def _plan(cfg: EncodeJobConfig, options) -> _EncodePlan | dict:
    """Headers only, everything validated; the report of an up-to-date index when nothing is to do.

    The driver reads the model's config file, not its weights: the actors load the model."""
    model_id = model_identity(cfg.model_uri, options)
    info = read_model_info(cfg.model_uri, options)
    mcfg = QincoConfig.from_dict(info["config"])
    LutChoice.check(cfg.lut_weight, bool(info.get("has_additive")))
    if cfg.A is not None and not 1 <= cfg.A <= mcfg.K:
        raise ConfigError(f"A (pre-selected candidates) must be in [1, {mcfg.K}] for this model's K, got {cfg.A}")
    if cfg.B is not None and cfg.B < 1:
        raise ConfigError(f"B (beam size) must be >= 1, got {cfg.B}")
    if cfg.precision is not None:  # checked for the actors' device before any work
        resolve_precision(cfg.precision, "cuda" if cfg.gpus_per_worker else "cpu")
    inputs = plan_inputs(cfg.data_uris, fmt=cfg.fmt, options=options, vector_column=cfg.vector_column,
                         id_column=cfg.id_column)
    for inp in inputs:
        if inp.dim != mcfg.dim:
            raise ConfigError(
                f"{storage.redact(inp.uri)}: vectors have dimension {inp.dim} but the model "
                f"{storage.redact(cfg.model_uri)} expects {mcfg.dim}")
    n_vectors = sum(i.count for i in inputs)
    if not mcfg.nlist and n_vectors >= AUTO_FLAT_BELOW:
        log.warning("%s has no IVF lists: this index of %d vectors is flat, and every search scans all of "
                    "its codes; train the model with --ivf auto (the default) or --ivf NLIST for an IVF index",
                    storage.redact(cfg.model_uri), n_vectors)
    inputs_desc = [i.to_dict() for i in inputs]
    done_version = _existing_index_check(cfg, model_id, inputs_desc, options)
    if done_version is not None:
        log.info("index %s already holds this job's result (version %s): nothing to do",
                 storage.redact(cfg.index_uri), done_version)
        return {"status": "up-to-date", "version": done_version}
    ids_mod.check_unique(inputs, options)  # user ids: every one read and checked before any encoding
    version, donor = _pick_version(cfg, options, model_id["config_sha256"])
    vuri = version_dir(cfg.index_uri, version)
    stale = storage.remove_stale_temporaries(vuri, STALE_TEMP_S)
    if stale:
        log.info("removed %d temporary file(s) left by killed writers in %s", stale, storage.redact(vuri))
    tasks = plan_ranges(inputs, cfg.shard_rows)
    done = shards_done(vuri, tasks, options)
    pending = [tk for tk in tasks if tk.shard not in done]
    reused = 0
    if donor is not None and pending:
        reused = _take_donor_shards(cfg, donor, vuri, pending, options)
        done = shards_done(vuri, tasks, options)
        pending = [tk for tk in tasks if tk.shard not in done]
    if cfg.parent_version is not None and pending:
        reused = _reuse_parent_shards(cfg, vuri, inputs_desc, model_id, pending, options)
        if reused:
            done = shards_done(vuri, tasks, options)
            pending = [tk for tk in tasks if tk.shard not in done]
    log.info("encode %s -> %s (%s): %d vectors in %d shards, %d to do", len(inputs),
             storage.redact(cfg.index_uri), version, sum(i.count for i in inputs), len(tasks), len(pending))
    return _EncodePlan(model_id, mcfg, inputs, version, vuri, tasks, pending, reused, done)


def _encode_pending(cfg: EncodeJobConfig, plan: _EncodePlan, progress: bool, options) -> tuple[list[dict], dict]:
    """The pending ranges through the actor pool; the written shards' infos and each actor's peak RSS."""
    ctx = DataContext.get_current()
    # the job's own progress (pipeline.progress) says how far it is; Ray Data's operator view
    # (read tasks, actors, backpressure: a block of lines every 10 s in a log) only with debug logging
    ctx.enable_progress_bars = logging.getLogger().isEnabledFor(logging.DEBUG)
    rec_bytes = max(i.record_bytes or (i.dim * 4) for i in plan.inputs)
    ctx.target_max_block_size = max(ctx.target_max_block_size or 0, 4 * cfg.shard_rows * rec_bytes)
    ranges = [(tk.file_index, tk.start, tk.stop) for tk in plan.pending]
    source = VectorDatasource(plan.inputs, rows_per_task=cfg.shard_rows, options=options, ranges=ranges,
                              on_error="skip" if cfg.skip_bad_ranges else "raise")
    # one block per range: with fewer tasks than Ray's default parallelism it would split blocks
    ds = read_source(source, override_num_blocks=len(plan.pending))
    ds = ds.map_batches(
        EncodeActor,
        batch_size=None,
        # one range at a time per actor: a range queued behind a busy actor would wait while
        # another actor idles at the end of the job
        compute=ActorPoolStrategy(size=max(1, cfg.workers), max_tasks_in_flight_per_actor=1),
        fn_constructor_kwargs=dict(model_uri=cfg.model_uri, version_uri=plan.version_uri, inputs=plan.inputs,
                                   batch_size=cfg.batch_size,
                                   threads=max(1, int(cfg.cpus_per_worker)), options=options,
                                   lut_weight=cfg.lut_weight, precision=cfg.precision, A=cfg.A, B=cfg.B),
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker or None,
    )
    done_now: list[dict] = []
    actor_peak_rss: dict[int, tuple[int, int]] = {}  # pid -> (peak RSS, peak private memory)
    total = sum(i.count for i in plan.inputs)
    pending = sum(tk.stop - tk.start for tk in plan.pending)
    bar = Progress(total, "vectors", "encode", initial=total - pending) if progress else None
    try:
        for row in ds.iter_rows():
            info = json.loads(row["info"])
            done_now.append(info)
            pid = int(row["pid"])
            was = actor_peak_rss.get(pid, (0, 0))
            actor_peak_rss[pid] = (max(was[0], int(row["peak_rss"])), max(was[1], int(row["peak_private"])))
            if bar is not None:
                bar.update(info["rows"], shards=f"{len(done_now)}/{len(plan.pending)}")
    except Exception as e:  # noqa: BLE001 - surface the original pipeline error
        err = unwrap_ray_error(e)
        if err is e:
            raise
        raise err from None
    finally:
        if bar is not None:
            bar.close()
    return done_now, actor_peak_rss


def _commit(cfg: EncodeJobConfig, plan: _EncodePlan, done_now: list[dict], options) -> tuple[Manifest, list[dict]]:
    """Commit the manifest of every shard: those this run wrote (their records came back from the
    actors) and those found done when the job was planned (verified then); skipped bad ranges are
    reported, never silently dropped. One listing checks that all are in place; no shard or
    sidecar is read."""
    records = plan.done | {"shards/" + d["name"]: d for d in done_now}
    listed = listed_shards(plan.version_uri, options)
    shard_entries, bad_ranges = [], []
    for tk in plan.tasks:
        if tk.shard not in listed or tk.shard not in records:
            if cfg.skip_bad_ranges:
                bad_ranges.append(_describe_bad_range(plan.inputs[tk.file_index], tk, options))
                continue
            uri = storage.join(plan.version_uri, tk.shard)
            raise PipelineError(f"shard {storage.redact(uri)} is missing after encoding; re-run the job")
        info = ShardInfo.from_dict(records[tk.shard])
        shard_entries.append(ShardEntry.from_info(info, tk.file_index, tk.start))
    mcfg = plan.model_config
    manifest = Manifest.create(
        plan.version,
        model={"uri": cfg.model_uri, "sha256": plan.model_id["config_sha256"],
               "weights_sha256": plan.model_id["weights_sha256"], "config": mcfg.to_dict()},
        code=code_params(mcfg.M, mcfg.K, mcfg.nlist),
        inputs=[InputEntry.from_input(i) for i in plan.inputs],
        shards=shard_entries, job_config=cfg.to_dict(), parent_version=cfg.parent_version)
    if not bad_ranges:
        validate_manifest(manifest)
    commit_manifest(cfg.index_uri, manifest, options=options)
    return manifest, bad_ranges


def _report(cfg: EncodeJobConfig, plan: _EncodePlan, manifest: Manifest, done_now: list[dict],
            actor_peak_rss: dict, bad_ranges: list[dict], stages: dict, wall: float, options) -> dict[str, Any]:
    """The run report, written beside the manifest and into the index's history."""
    bytes_in = sum((i.record_bytes or 0) * i.count for i in plan.inputs)
    bytes_out = sum(s.bytes for s in manifest.shards)
    encoded = int(sum(d["rows"] for d in done_now))
    report = {
        "job": "encode",
        "status": "committed",
        "version": plan.version,
        "vectors": manifest.total_rows,
        "shards": len(manifest.shards),
        "shards_encoded_this_run": len(done_now),
        "shards_reused_this_run": plan.reused,
        "parent_version": cfg.parent_version,
        "model_uri": storage.redact(cfg.model_uri),
        "index_uri": storage.redact(cfg.index_uri),
        "vectors_encoded_this_run": encoded,
        "bytes_in": int(bytes_in),
        "bytes_out": int(bytes_out),
        "wall_s": wall,
        "vectors_per_s": (encoded / stages["encode_s"]) if done_now else None,
        "stages": stages,
        "bad_ranges": bad_ranges,
        "actor_peak_rss_bytes": {str(k): v[0] for k, v in sorted(actor_peak_rss.items())},
        # without the shared pages (Ray's object store) each actor's VmHWM also counts
        "actor_private_bytes": {str(k): v[1] for k, v in sorted(actor_peak_rss.items())},
        "driver_peak_rss_bytes": peak_rss_bytes(),
        "manifest_bytes": len(manifest.to_json()) + 1,
        "config": cfg.to_dict(),
        "code_version": code_version(),
    }
    storage.write_bytes_atomic(storage.join(plan.version_uri, "report.json"),
                               json.dumps(report, indent=2, sort_keys=True).encode(), options)
    record_event(cfg.index_uri, "encode", report, version=plan.version, options=options)
    log.info("committed %s version %s: %d vectors, %d shards, %.1f MB out, %.1f s",
             storage.redact(cfg.index_uri), plan.version, manifest.total_rows, len(manifest.shards),
             bytes_out / 1e6, wall)
    return report


def _describe_bad_range(inp, tk: RangeTask, options) -> dict:
    """Re-read a range that produced no shard to name its error in the report."""
    try:
        vectors.read_rows(inp.uri, tk.start, tk.stop, options=options, file_info=inp.file_info())
        err = "range produced no shard"
    except PipelineError as e:
        err = str(e)
    return {"uri": storage.redact(inp.uri), "file_index": tk.file_index, "start": tk.start,
            "stop": tk.stop, "error": storage.redact(err)}


def encode_file(model_uri: str, data_uri: str, out_uri: str, B: int | None = None, A: int | None = None,
                block_rows: int = 65536, device: str = "cpu", options=None,
                echo=print, lut_weight: float = 0.0, precision: str | None = None,
                fmt: str | None = None) -> int:
    """Encode one vector file in this process into a codes file (``qinco encode ... --out X.parquet``).

    Streams the input in blocks; the codes (M bytes per vector) are held until the single atomic
    write. Returns the number of vectors encoded.
    """
    model = load_model(model_uri, device=device, options=options)
    total = vectors.info(data_uri, fmt=fmt, options=options).count
    codes, lids = [], []
    t0 = time.time()
    for start, block in vectors.iter_blocks(data_uri, block_rows, fmt=fmt, options=options):
        c, l = encode(model, block, device=device, B=B, A=A, source=storage.redact(data_uri),
                      lut_weight=lut_weight, precision=precision)
        codes.append(c)
        lids.append(l)
        done = start + len(block)
        echo(f"encoded {done}/{total} vectors ({done / max(time.time() - t0, 1e-9):.0f} vec/s)")
    cfg = model.config
    all_codes = np.concatenate(codes) if codes else np.zeros((0, cfg.M), np.uint8)
    all_lids = np.concatenate(lids) if model.ivf and lids else None
    write_codes(out_uri, all_codes, cfg.K, all_lids, model=model_identity(model_uri, options),
                extra={"source": storage.redact(data_uri), "B": B or cfg.B, "A": cfg.A if A is None else A,
                       "lut_weight": lut_weight, "precision": precision},
                options=options)
    echo(f"wrote {len(all_codes)} codes ({cfg.code_bytes:g} bytes each) to {storage.redact(out_uri)}")
    return len(all_codes)
