"""Index maintenance: roll ``CURRENT`` back, delete old versions, verify every shard.

``rollback`` is the only way ``CURRENT`` moves to an older version; it reads nothing of the
version ``CURRENT`` names now, so a damaged current version can be rolled back past. Each
operation leaves an event in the index history (``qinco report`` shows it).
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.errors import ConfigError, ManifestError, PipelineError
from pipeline.index.history import record_event
from pipeline.index.manifest import (
    current_version, garbage_collect, list_versions, load_manifest, set_current, shard_uri,
    version_number,
)
from pipeline.index.shards import read_shard
from pipeline.io import storage

log = logging.getLogger(__name__)


def _require_index(index_uri: str, options) -> list[str]:
    versions = list_versions(index_uri, options)
    if not versions:
        raise ManifestError(f"{storage.redact(index_uri)}: no committed index version there")
    return versions


def _current_or_none(index_uri: str, options) -> str | None:
    """The version ``CURRENT`` names, or None when ``CURRENT`` itself is unreadable."""
    try:
        return current_version(index_uri, options)
    except ManifestError as e:
        log.warning("%s", e)
        return None


def rollback(index_uri: str, to: str, options=None) -> dict[str, Any]:
    """Point ``CURRENT`` at the committed version ``to`` (older or newer) after checking its
    manifest; returns ``{"from", "to"}``."""
    version_number(to)
    versions = _require_index(index_uri, options)
    if to not in versions:
        raise ConfigError(f"{storage.redact(index_uri)}: version {to} is not committed "
                          f"(committed: {', '.join(versions)})")
    m = load_manifest(index_uri, version=to, options=options)  # validated: refuse a damaged target
    before = _current_or_none(index_uri, options)
    set_current(index_uri, to, options, allow_older=True)
    record_event(index_uri, "rollback", {"from": before, "to": to, "vectors": m.total_rows},
                 version=to, options=options)
    return {"from": before, "to": to}


def collect_garbage(index_uri: str, keep: int, options=None) -> dict[str, Any]:
    """Delete all but ``keep`` committed versions (``CURRENT`` always kept); see
    :func:`pipeline.index.manifest.garbage_collect`."""
    _require_index(index_uri, options)
    deleted = garbage_collect(index_uri, keep, options=options)
    if deleted:
        record_event(index_uri, "gc", {"keep": keep, "deleted": deleted},
                     version=_current_or_none(index_uri, options), options=options)
    return {"kept": list_versions(index_uri, options), "deleted": deleted}


def verify(index_uri: str, version: str | None = None, options=None) -> dict[str, Any]:
    """Read every shard of a version (default: ``CURRENT``) and check it against its manifest
    entry: size, SHA-256, row count and layout. Returns the per-shard results and the number of
    damaged shards."""
    _require_index(index_uri, options)
    m = load_manifest(index_uri, version=version, options=options)
    shards, damaged = [], 0
    for s in m.shards:
        uri = shard_uri(index_uri, m.version, s)
        ok, why = True, ""
        try:
            read_shard(uri, expected=s.info(), options=options, nlist=max(1, int(m.code["nlist"])))
        except PipelineError as e:
            ok, why = False, storage.redact(str(e))
        damaged += not ok
        shards.append({"name": s.name, "rows": s.rows, "ok": ok, **({} if ok else {"problem": why})})
    return {"index": storage.redact(index_uri), "version": m.version, "shards": shards,
            "damaged": damaged, "rows": m.total_rows}
