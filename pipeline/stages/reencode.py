"""Re-encoding an index: a new model over the same inputs, or new input files under the same model.

Both build a new index version with the encode job (``pipeline.stages.encode.run_encode``) whose
``parent_version`` is the version ``CURRENT`` names when the job starts:

- ``model_uri``: every input listed in the parent's manifest is read again and encoded with the
  new model. Inputs must be unchanged (same count and header hash), otherwise their ids would
  silently shift; the job refuses to run and names the file.
- ``add_uris``: the new files get ids after the existing ones (they are appended to the parent's
  input list), only they are encoded, and the parent's shards are copied into the new version
  (hard links locally, server-side copies on S3). Each version directory is self-contained, so
  garbage collection can delete any version without looking at the others.

The new version becomes visible only when its manifest is committed, and ``CURRENT`` switches
only after that; until then searches keep using the parent. A run that dies at any point is
resumed by running the same command again (the unfinished version directory is found by the
job's identity, finished shards are kept). After the switch, ``keep`` applies
``manifest.garbage_collect``. A JSON report goes beside the new manifest (``reencode.json``) and
into the index's history.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.codec.model_file import model_identity
from pipeline.config import JsonConfig, code_version
from pipeline.errors import ConfigError
from pipeline.index.history import record_event
from pipeline.index.manifest import (
    current_version, garbage_collect, list_versions, load_manifest, version_dir, version_number,
)
from pipeline.index.manifest import set_current
from pipeline.io import storage
from pipeline.io.inputs import plan_inputs
from pipeline.stages.encode import EncodeJobConfig, job_code_choice, run_encode

log = logging.getLogger(__name__)

REPORT_FILE = "reencode.json"


@dataclass
class ReencodeConfig(JsonConfig):
    """One re-encode: exactly one of ``model_uri`` (new model) or ``add_uris`` (new files)."""

    index_uri: str
    model_uri: str | None = None
    add_uris: list[str] = field(default_factory=list)
    keep: int | None = None  # committed versions kept after the switch; None = no GC
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    batch_size: int = 0
    shard_rows: int | None = None  # None = the parent's (always the parent's when adding files)
    fmt: str | None = None  # format of the added files when their extension does not tell

    def validate(self) -> None:
        if bool(self.model_uri) == bool(self.add_uris):
            raise ConfigError("re-encode needs exactly one of a new model (--model) or files to add (--add)")
        if self.keep is not None and (not isinstance(self.keep, int) or self.keep < 1):
            raise ConfigError(f"--keep must be an integer >= 1, got {self.keep!r}")
        if self.add_uris and self.shard_rows is not None:
            raise ConfigError("--shard-rows cannot change when adding files: the existing shards are reused "
                              "and the new files are cut like the old ones")


def _check_inputs_unchanged(parent, options) -> None:
    """The files a version was built from must still hold the same vectors (ids depend on it)."""
    planned = plan_inputs([i.uri for i in parent.inputs], fmt=parent.job_config.get("fmt"), options=options,
                          vector_column=parent.job_config.get("vector_column"),
                          id_column=parent.job_config.get("id_column"))
    for old, new in zip(parent.inputs, planned):
        if old.ids != new.ids or old.ids_sha256 != new.ids_sha256:
            raise ConfigError(
                f"{storage.redact(old.uri)}: its ids changed since version {parent.version} was built "
                f"({old.ids} -> {new.ids}{'' if new.ids_uri is None else ' ' + storage.redact(new.ids_uri)}); "
                f"build a fresh index instead")
        if (old.count, old.header_sha256, old.dim) != (new.count, new.header_sha256, new.dim):
            raise ConfigError(
                f"{storage.redact(old.uri)} changed since version {parent.version} was built "
                f"({old.count} -> {new.count} vectors, header hash {old.header_sha256[:12]} -> "
                f"{new.header_sha256[:12]}); its vectors' ids would change. Build a fresh index instead")


def _finished_add(parent, add_uris: list[str]) -> bool:
    """True when ``parent`` is the version an earlier run of this very add committed."""
    n = len(add_uris)
    return len(parent.inputs) > n and [i.uri for i in parent.inputs[-n:]] == list(add_uris)


def _committed_not_current(cfg, enc, parent_v: str, options) -> str | None:
    """A version this job already committed whose ``CURRENT`` switch was interrupted, if any."""
    model_sha = None
    for v in reversed(list_versions(cfg.index_uri, options)):
        if version_number(v) <= version_number(parent_v):
            break
        m = load_manifest(cfg.index_uri, version=v, options=options)
        try:
            same_job = (m.parent_version == parent_v
                        and EncodeJobConfig.from_dict(m.job_config).identity() == enc.identity())
        except (ConfigError, TypeError):
            continue
        if same_job:
            model_sha = model_sha or model_identity(enc.model_uri, options)["config_sha256"]
            if m.model.get("sha256") == model_sha:
                return v
    return None


def run_reencode(cfg: ReencodeConfig, options=None, progress: bool = True) -> dict[str, Any]:
    """Build (or resume) the new version, switch ``CURRENT``, collect garbage; returns the report."""
    cfg.validate()
    t0 = time.perf_counter()
    parent_v = current_version(cfg.index_uri, options)
    if parent_v is None:
        raise ConfigError(f"{storage.redact(cfg.index_uri)} has no committed version to re-encode; "
                          f"build it first with `qinco encode`")
    parent = load_manifest(cfg.index_uri, version=parent_v, options=options)
    mode = "model" if cfg.model_uri else "add"
    old_uris = [i.uri for i in parent.inputs]

    result = None
    if mode == "add":
        overlap = [u for u in cfg.add_uris if u in old_uris]
        if overlap and _finished_add(parent, cfg.add_uris):
            log.info("%s: version %s already holds %s: nothing to do", storage.redact(cfg.index_uri),
                     parent_v, ", ".join(storage.redact(u) for u in cfg.add_uris))
            result = {"status": "up-to-date", "version": parent_v}
        elif overlap:
            raise ConfigError(f"{storage.redact(overlap[0])} is already an input of version {parent_v} "
                              f"of {storage.redact(cfg.index_uri)}")
        data_uris = old_uris + list(cfg.add_uris)
        model_uri = parent.model["uri"]
        shard_rows = parent.job_config.get("shard_rows")
        fmt = cfg.fmt or parent.job_config.get("fmt")
    else:
        data_uris = old_uris
        model_uri = cfg.model_uri
        shard_rows = cfg.shard_rows or parent.job_config.get("shard_rows")
        fmt = parent.job_config.get("fmt")

    if result is None:
        _check_inputs_unchanged(parent, options)
        lut_weight, precision, A, B = job_code_choice(parent.job_config)  # codes chosen as the parent's were
        enc = EncodeJobConfig(
            model_uri=model_uri, data_uris=data_uris, index_uri=cfg.index_uri, fmt=fmt,
            workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker, gpus_per_worker=cfg.gpus_per_worker,
            shard_rows=int(shard_rows or 65536), batch_size=cfg.batch_size, overwrite=True,
            parent_version=parent_v, lut_weight=lut_weight, precision=precision, A=A, B=B,
            vector_column=parent.job_config.get("vector_column"), id_column=parent.job_config.get("id_column"))
        done = _committed_not_current(cfg, enc, parent_v, options)
        if done is not None:
            m = load_manifest(cfg.index_uri, version=done, options=options)
            log.info("%s: version %s was committed by an earlier run; switching CURRENT to it",
                     storage.redact(cfg.index_uri), done)
            set_current(cfg.index_uri, done, options)
            result = {"status": "committed", "version": done, "vectors": m.total_rows, "shards": len(m.shards)}
            record_event(cfg.index_uri, "encode", {**result, "parent_version": parent_v, "model_uri":
                                                   storage.redact(model_uri), "bytes_out": sum(x.bytes for x in m.shards),
                                                   "config": enc.to_dict()}, version=done, options=options)
        else:
            log.info("re-encode %s (%s): parent %s, %d input files", storage.redact(cfg.index_uri), mode,
                     parent_v, len(data_uris))
            result = run_encode(enc, options=options, progress=progress)
    report = _finish(cfg, mode, parent, result, t0, options)
    if result.get("status") == "committed":
        storage.write_bytes_atomic(storage.join(version_dir(cfg.index_uri, result["version"]), REPORT_FILE),
                                   json.dumps(report, indent=2, sort_keys=True, default=str).encode(), options)
    if cfg.keep is not None:
        deleted = garbage_collect(cfg.index_uri, cfg.keep, options=options)
        report["deleted_versions"] = deleted
        if deleted:
            record_event(cfg.index_uri, "gc", {"keep": cfg.keep, "deleted": deleted},
                         version=current_version(cfg.index_uri, options), options=options)
    return report


def _finish(cfg: ReencodeConfig, mode: str, parent, result: dict, t0: float, options) -> dict[str, Any]:
    return {
        "job": "reencode",
        "mode": mode,
        "status": result.get("status"),
        "index_uri": storage.redact(cfg.index_uri),
        "parent_version": parent.version,
        "version": result.get("version"),
        "model_uri": storage.redact(cfg.model_uri or parent.model["uri"]),
        "added": [storage.redact(u) for u in cfg.add_uris],
        "vectors": result.get("vectors", parent.total_rows),
        "shards": result.get("shards", len(parent.shards)),
        "shards_encoded_this_run": result.get("shards_encoded_this_run", 0),
        "shards_reused_this_run": result.get("shards_reused_this_run", 0),
        "vectors_encoded_this_run": result.get("vectors_encoded_this_run", 0),
        "vectors_per_s": result.get("vectors_per_s"),
        "wall_s": time.perf_counter() - t0,
        "config": cfg.to_dict(),
        "code_version": code_version(),
    }
