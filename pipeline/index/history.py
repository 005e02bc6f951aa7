"""The history of an index: one immutable event object per job, and the report built from them.

Every job that changes or measures an index leaves an event under ``INDEX_URI/history/``::

    history/20261124T055210.123456Z-encode-v000002-1a2b3c.json   {"kind", "version", "time", "body"}

``encode`` (a committed version, with the job's report), ``gc`` (versions deleted), ``search``
(a query run against a version), ``eval`` (recall of a search's results against ground
truth) and ``rollback`` (``CURRENT`` moved by hand). Events are separate objects written once, never appended to, because object stores
cannot append; names sort by time. They outlive garbage collection, so ``qinco report`` can
show versions that no longer exist next to the live ones read from their manifests.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import uuid
from typing import Any

from pipeline.errors import ManifestError, PipelineError
from pipeline.index.manifest import current_version, list_versions, load_manifest, version_dir, version_number
from pipeline.io import storage

log = logging.getLogger(__name__)

HISTORY_DIR = "history"
KINDS = ("encode", "gc", "search", "eval", "rollback")


def record_event(index_uri: str, kind: str, body: dict, *, version: str | None = None, options=None,
                 best_effort: bool = False) -> str | None:
    """Write one event object under ``INDEX_URI/history/``; returns its URI.

    ``best_effort`` (readers such as search may lack write access to the index) logs a warning
    instead of raising when the write fails, and returns None.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown history event kind {kind!r} (known: {', '.join(KINDS)})")
    now = datetime.datetime.now(datetime.timezone.utc)
    name = f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{kind}-{version or 'none'}-{uuid.uuid4().hex[:6]}.json"
    uri = storage.join(index_uri, HISTORY_DIR, name)
    event = {"kind": kind, "version": version, "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "body": body}
    try:
        storage.write_bytes_atomic(uri, json.dumps(event, indent=2, sort_keys=True, default=str).encode(), options)
    except PipelineError as e:
        if not best_effort:
            raise
        log.warning("could not record the %s event in the history of %s: %s", kind,
                    storage.redact(index_uri), e)
        return None
    return uri


def read_history(index_uri: str, options=None) -> list[dict]:
    """Every event of an index, oldest first (unparsable objects are skipped with a warning)."""
    events = []
    for uri in storage.list_files(storage.join(index_uri, HISTORY_DIR), options):
        if not uri.endswith(".json") or os.path.basename(uri).startswith("."):
            continue
        try:
            ev = json.loads(storage.read_bytes(uri, options))
        except ValueError as e:
            log.warning("%s: skipping unreadable history event (%s)", storage.redact(uri), e)
            continue
        if isinstance(ev, dict) and ev.get("kind") in KINDS:
            ev["uri"] = uri
            events.append(ev)
    return events  # list_files sorts, and names start with the time


def link_evaluation(results_uri: str, groundtruth_uri: str, recall: dict, options=None) -> str | None:
    """Record the recall of a search's results in the history of the index it searched.

    The search job leaves ``RESULTS.report.json`` naming the index and version; without it (results
    from elsewhere) nothing is recorded. Never raises for storage problems.
    """
    rep_uri = results_uri + ".report.json"
    try:
        if not storage.exists(rep_uri, options):
            return None
        rep = json.loads(storage.read_bytes(rep_uri, options))
    except (PipelineError, ValueError):
        return None
    index_uri = (rep.get("params") or {}).get("index_uri")
    if not index_uri:
        return None
    body = {"results": storage.redact(results_uri), "groundtruth": storage.redact(groundtruth_uri),
            "recall": recall, "queries": rep.get("queries"), "params": _search_params(rep.get("params") or {})}
    return record_event(index_uri, "eval", body, version=rep.get("version"), options=options, best_effort=True)


def _search_params(params: dict) -> dict:
    params = params.get("params", params)  # a query job's config holds its SearchParams
    return {k: params[k] for k in ("k", "nprobe", "shortlist", "rerank") if k in params}


def _dir_bytes(index_uri: str, version: str, options) -> int | None:
    try:
        return sum(storage.file_size(u, options) for u in
                   storage.list_files(version_dir(index_uri, version), options))
    except PipelineError:
        return None


def index_report(index_uri: str, options=None) -> dict[str, Any]:
    """Versions of an index (live and deleted) with model, size, creation time and recall.

    Live versions come from their manifests; versions known only from history events are marked
    ``deleted``. Each version carries its last evaluated recall (``eval`` events) and the number
    of recorded searches.
    """
    try:
        current = current_version(index_uri, options)
    except ManifestError as e:
        current, current_error = None, str(e)
    else:
        current_error = None
    events = read_history(index_uri, options)
    versions_found = list_versions(index_uri, options)
    if current is None and current_error is None and not versions_found and not events:
        raise ManifestError(f"{storage.redact(index_uri)}: no index there (no CURRENT, no version, "
                            f"no history)")
    rows: dict[str, dict] = {}
    for v in versions_found:
        try:
            m = load_manifest(index_uri, version=v, options=options)
        except ManifestError as e:  # shown, so that the user can roll back past it
            rows[v] = {"version": v, "state": "damaged", "problem": str(e)}
            continue
        rows[v] = {
            "version": v, "state": "current" if v == current else "kept", "created": m.created,
            "parent": m.parent_version, "model": storage.redact(m.model.get("uri", "")),
            "model_sha256": (m.model.get("sha256") or "")[:12], "vectors": m.total_rows,
            "shards": len(m.shards), "inputs": len(m.inputs),
            "shard_bytes": sum(s.bytes for s in m.shards),
        }
    deleted_by: dict[str, str] = {}
    for ev in events:
        v, body = ev.get("version"), ev.get("body") or {}
        if ev["kind"] == "gc":
            for d in body.get("deleted", []):
                deleted_by[d] = ev["time"]
            continue
        if not v:
            continue
        row = rows.get(v)
        if row is None and ev["kind"] == "encode":
            cfg = body.get("config") or {}
            row = rows[v] = {"version": v, "state": "deleted", "created": ev["time"],
                             "parent": body.get("parent_version"),
                             "model": storage.redact(body.get("model_uri") or cfg.get("model_uri", "")),
                             "model_sha256": "", "vectors": body.get("vectors"), "shards": body.get("shards"),
                             "inputs": len(cfg.get("data_uris", [])), "shard_bytes": body.get("bytes_out")}
        if row is None:
            continue
        if ev["kind"] == "encode":
            row["encode_wall_s"] = body.get("wall_s")
            row["vectors_encoded"] = body.get("vectors_encoded_this_run")
            row["shards_reused"] = body.get("shards_reused_this_run", 0)
        elif ev["kind"] == "search":
            row["searches"] = row.get("searches", 0) + 1
            row["queries_per_s"] = body.get("queries_per_s")
        elif ev["kind"] == "eval":
            row["recall"] = body.get("recall")
            row["recall_params"] = body.get("params")
    for v, when in deleted_by.items():
        if v in rows and rows[v]["state"] == "deleted":
            rows[v]["deleted"] = when
    versions = [rows[v] for v in sorted(rows, key=version_number)]
    for r in versions:
        if r["state"] != "deleted":
            r["stored_bytes"] = _dir_bytes(index_uri, r["version"], options)
    out = {"index": storage.redact(index_uri), "current": current, "versions": versions,
           "events": len(events)}
    if current_error:
        out["current_error"] = current_error
    return out


def format_report(rep: dict) -> str:
    """A text table of :func:`index_report`."""
    lines = [f"index {rep['index']}: CURRENT = {rep['current'] or '(none)'}, "
             f"{sum(r['state'] != 'deleted' for r in rep['versions'])} live versions, {rep['events']} events"]
    head = ("version", "state", "created", "parent", "vectors", "shards", "MB", "model", "recall")
    table = []
    for r in rep["versions"]:
        rec = r.get("recall") or {}
        rec_s = ", ".join(f"{k}={v:.3f}" for k, v in rec.items() if isinstance(v, (int, float))) or "-"
        mb = r.get("shard_bytes")
        table.append((r["version"], r["state"], r.get("created") or "-", r.get("parent") or "-",
                      str(r.get("vectors", "-")), str(r.get("shards", "-")),
                      f"{mb / 1e6:.2f}" if isinstance(mb, (int, float)) else "-", r.get("model") or "-", rec_s))
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(head)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(t, widths)) for t in table)
    lines.extend(f"{r['version']} is damaged: {r['problem']}" for r in rep["versions"] if r.get("problem"))
    if rep.get("current_error"):
        lines.append(f"CURRENT is damaged: {rep['current_error']}")
    return "\n".join(lines)
