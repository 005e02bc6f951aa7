"""Index versions: the manifest that commits a version and the ``CURRENT`` pointer.

Layout under an index URI (see ``docs/index-format.md``)::

    CURRENT                               {"version", "manifest", "updated"}; replaced atomically
    versions/<v>/manifest.json            written last: the commit point of version <v>
    versions/<v>/shards/shard-f…-r….parquet

A version exists for readers only once its ``manifest.json`` is written; shards not named in a
committed manifest are never read. ``CURRENT`` names the version readers use by default and is
switched only after the manifest is in place, so a reader following it always finds a complete
version. Several jobs may write to one index: a version directory is claimed, and a manifest
created, only if absent (S3 ``If-None-Match: *``, locally an exclusive create), and ``CURRENT``
is replaced by compare-and-swap (S3 ``If-Match``, locally under a lock) and never moves back
to an older version except by rollback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from typing import Any

from pipeline.codec.codes import code_dtype
from pipeline.config import JsonConfig, code_version
from pipeline.errors import ConcurrentWriterError, ConfigError, ManifestError
from pipeline.index.shards import parse_shard_name, shard_file_uri, shard_name, ShardInfo
from pipeline.io import ids as ids_mod, storage
from pipeline.io.inputs import InputEntry
from pipeline.io.storage import StorageOptions

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: inputs may bring their own ids (InputEntry.ids); version 1 is still read
READABLE_FORMAT_VERSIONS = (1, 2)
CURRENT_FILE = "CURRENT"
MANIFEST_FILE = "manifest.json"
VERSIONS_DIR = "versions"
_VERSION_RE = re.compile(r"^v(\d{6,})$")
UNFINISHED_IDLE_S = 3600.0  # garbage collection spares an uncommitted version written to this recently


@dataclasses.dataclass
class ShardEntry(JsonConfig):
    """One shard of a version; ``name`` is relative to the version directory."""

    name: str
    rows: int
    bytes: int
    sha256: str
    file_index: int
    first_row: int
    id_min: int
    id_max: int
    lists: int

    @classmethod
    def from_info(cls, info: ShardInfo, file_index: int, first_row: int) -> "ShardEntry":
        """Entry for a shard written by ``write_shard`` under ``shards/``."""
        return cls(name=f"shards/{info.name}", rows=info.rows, bytes=info.bytes, sha256=info.sha256,
                   file_index=int(file_index), first_row=int(first_row), id_min=info.id_min,
                   id_max=info.id_max, lists=info.lists)

    def info(self) -> ShardInfo:
        """The :class:`ShardInfo` ``read_shard``/``verify_shard`` check the file against."""
        return ShardInfo(name=self.name.rsplit("/", 1)[-1], rows=self.rows, bytes=self.bytes,
                         sha256=self.sha256, id_min=self.id_min, id_max=self.id_max, lists=self.lists)


@dataclasses.dataclass
class Manifest(JsonConfig):
    """Everything needed to read and trust one index version."""

    format_version: int
    version: str
    created: str  # ISO 8601 UTC
    model: dict  # uri, sha256, config
    code: dict  # M, K, code_dtype, nlist, code_bytes
    inputs: list[InputEntry]
    shards: list[ShardEntry]
    total_rows: int
    job_config: dict
    code_version: dict
    parent_version: str | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        d = dict(d)
        fv = d.get("format_version")
        if not isinstance(fv, int) or isinstance(fv, bool) or fv not in READABLE_FORMAT_VERSIONS:
            raise ConfigError(f"manifest format_version {fv!r} is not supported "
                              f"(this code reads {', '.join(map(str, READABLE_FORMAT_VERSIONS))})")
        d["inputs"] = [InputEntry.from_dict(e) for e in d.get("inputs", [])]
        d["shards"] = [ShardEntry.from_dict(e) for e in d.get("shards", [])]
        return super().from_dict(d)

    @classmethod
    def create(cls, version: str, *, model: dict, code: dict, inputs: list[InputEntry],
               shards: list[ShardEntry], job_config: dict,
               parent_version: str | None = None) -> "Manifest":
        """A manifest stamped with the current time, code version and summed row count."""
        return cls(format_version=FORMAT_VERSION, version=version, created=utc_now(), model=model,
                   code=code, inputs=list(inputs), shards=list(shards),
                   total_rows=sum(s.rows for s in shards), job_config=job_config,
                   code_version=code_version(), parent_version=parent_version)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def code_params(M: int, K: int, nlist: int) -> dict[str, Any]:
    """The manifest's ``code`` dict for ``M`` codes of ``K`` entries and ``nlist`` lists."""
    dtype = code_dtype(K)
    return {"M": int(M), "K": int(K), "code_dtype": dtype.name, "nlist": int(nlist),
            "code_bytes": int(M) * dtype.itemsize}


# ----------------------------------------------------------------------------------------- paths

def version_name(number: int) -> str:
    if number < 1:
        raise ConfigError(f"version numbers start at 1, got {number}")
    return f"v{number:06d}"


def version_number(version: str) -> int:
    m = _VERSION_RE.match(version or "")
    if not m:
        raise ConfigError(f"not a version name (expected v000001, v000002, ...): {version!r}")
    return int(m.group(1))


def version_dir(index_uri: str, version: str) -> str:
    """URI of ``versions/<version>`` under the index."""
    version_number(version)
    return storage.join(index_uri, VERSIONS_DIR, version)


def manifest_uri(index_uri: str, version: str) -> str:
    return storage.join(version_dir(index_uri, version), MANIFEST_FILE)


def shard_uri(index_uri: str, version: str, entry: ShardEntry) -> str:
    """URI of a shard named in a manifest (never outside the version directory)."""
    return shard_file_uri(version_dir(index_uri, version), entry.name)


def _listing_prefix(uri: str) -> str:
    """``uri`` spelled the way ``storage.list_files`` spells the files under it, plus ``/``."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" not in uri:
        uri = os.path.abspath(uri)
    return uri.rstrip("/") + "/"


def _relative_files(prefix_uri: str, options: StorageOptions | None) -> list[str]:
    """Paths (relative to ``prefix_uri``) of every file under it."""
    prefix = _listing_prefix(prefix_uri)
    return [u[len(prefix):] for u in storage.list_files(prefix_uri, options) if u.startswith(prefix)]


def _version_dirs(index_uri: str, options: StorageOptions | None) -> dict[str, set[str]]:
    """Every version directory holding at least one file -> its files' relative paths."""
    out: dict[str, set[str]] = {}
    for rel in _relative_files(storage.join(index_uri, VERSIONS_DIR), options):
        v, _, rest = rel.partition("/")
        if _VERSION_RE.match(v) and rest:
            out.setdefault(v, set()).add(rest)
    return out


def list_versions(index_uri: str, options: StorageOptions | None = None) -> list[str]:
    """Committed versions (those with a ``manifest.json``), oldest first."""
    dirs = _version_dirs(index_uri, options)
    return sorted((v for v, files in dirs.items() if MANIFEST_FILE in files), key=version_number)


def next_version(index_uri: str, options: StorageOptions | None = None) -> str:
    """The first version number above every existing version directory, committed or not."""
    nums = [version_number(v) for v in _version_dirs(index_uri, options)]
    return version_name(max(nums, default=0) + 1)


# ----------------------------------------------------------------------------------------- validation

def _fail(msg: str) -> None:
    raise ConfigError(f"invalid manifest: {msg}")


def validate_manifest(m: Manifest, *, require_complete: bool = True) -> None:
    """Check a manifest's internal consistency; raise ConfigError naming the first problem.

    Inputs' row ranges ``[id_start, id_stop)`` must match their counts and not overlap; a shard
    holds the rows ``[first_row, first_row + rows)`` of one input and shards of an input do not
    overlap; where the input's ids are its row positions a shard's ids are exactly
    ``id_start + first_row ...``, otherwise ``[id_min, id_max]`` only bounds them (uniqueness of
    user ids is checked before encoding). ``total_rows`` must equal the shards' rows. With
    ``require_complete`` the shards must also cover every input's rows with no gap.
    """
    if m.format_version not in READABLE_FORMAT_VERSIONS:
        _fail(f"format_version {m.format_version} is not one of {READABLE_FORMAT_VERSIONS}")
    user_ids = [inp.ids != ids_mod.ROWS for inp in m.inputs]
    for i, inp in enumerate(m.inputs):
        if inp.ids not in ids_mod.SOURCES or (inp.ids == ids_mod.FILE) != bool(inp.ids_uri):
            _fail(f"input {i} ({storage.redact(inp.uri)}): bad id source {inp.ids!r} (ids_uri {inp.ids_uri!r})")
        if user_ids[i] and m.format_version < 2:
            _fail(f"input {i}: user ids need manifest format_version 2")
    if any(user_ids) and not all(user_ids):
        _fail("some inputs bring their own ids and others use row numbers")
    version_number(m.version)
    if m.parent_version is not None:
        version_number(m.parent_version)
    for key in ("M", "K", "code_dtype", "nlist", "code_bytes"):
        if key not in m.code:
            _fail(f"code dict lacks {key!r}")
    try:
        want = code_params(m.code["M"], m.code["K"], max(1, int(m.code["nlist"])))
    except (ConfigError, TypeError, ValueError) as e:
        _fail(f"bad code parameters {m.code}: {e}")
    if m.code["M"] < 1 or m.code["nlist"] < 0:
        _fail(f"bad code parameters {m.code}")
    if m.code["code_dtype"] != want["code_dtype"] or m.code["code_bytes"] != want["code_bytes"]:
        _fail(f"code dict {m.code} inconsistent: K={m.code['K']} needs {want['code_dtype']}, "
              f"code_bytes {want['code_bytes']}")

    for i, inp in enumerate(m.inputs):
        if inp.count < 0 or inp.id_stop - inp.id_start != inp.count or inp.id_start < 0:
            _fail(f"input {i} ({storage.redact(inp.uri)}): id range [{inp.id_start}, {inp.id_stop}) "
                  f"does not hold count {inp.count}")
    by_start = sorted(range(len(m.inputs)), key=lambda i: m.inputs[i].id_start)
    for a, b in zip(by_start, by_start[1:]):
        if m.inputs[b].id_start < m.inputs[a].id_stop:
            _fail(f"inputs {a} and {b} have overlapping id ranges "
                  f"[{m.inputs[a].id_start}, {m.inputs[a].id_stop}) and "
                  f"[{m.inputs[b].id_start}, {m.inputs[b].id_stop})")

    names = set()
    for s in m.shards:
        if s.name in names:
            _fail(f"shard {s.name} listed twice")
        names.add(s.name)
        if not 0 <= s.file_index < len(m.inputs):
            _fail(f"shard {s.name}: file_index {s.file_index} but {len(m.inputs)} inputs")
        want_name = f"shards/{shard_name(s.file_index, s.first_row)}"
        if s.name != want_name:
            _fail(f"shard {s.name!r}: the name must be {want_name} (from its file_index "
                  f"{s.file_index} and first_row {s.first_row})")
        parse_shard_name(s.name)
        inp = m.inputs[s.file_index]
        if s.rows < 1 or s.first_row < 0 or s.first_row + s.rows > inp.count:
            _fail(f"shard {s.name}: rows [{s.first_row}, {s.first_row + s.rows}) outside input "
                  f"{s.file_index}'s {inp.count} rows")
        if not 1 <= s.lists <= s.rows:
            _fail(f"shard {s.name}: {s.lists} non-empty lists for {s.rows} rows")
        if user_ids[s.file_index]:
            if not 0 <= s.id_min <= s.id_max or s.id_max - s.id_min + 1 < s.rows:
                _fail(f"shard {s.name}: {s.rows} distinct ids cannot lie in [{s.id_min}, {s.id_max}]")
        elif (s.id_min, s.id_max) != (inp.id_start + s.first_row, inp.id_start + s.first_row + s.rows - 1):
            _fail(f"shard {s.name}: ids [{s.id_min}, {s.id_max}] != input id_start {inp.id_start} "
                  f"+ rows [{s.first_row}, {s.first_row + s.rows}) (a shard holds one contiguous id range)")
    ordered = sorted(m.shards, key=lambda s: (s.file_index, s.first_row))
    for a, b in zip(ordered, ordered[1:]):
        if a.file_index == b.file_index and b.first_row < a.first_row + a.rows:
            _fail(f"shards {a.name} and {b.name} overlap: rows [{a.first_row}, {a.first_row + a.rows}) "
                  f"and [{b.first_row}, {b.first_row + b.rows}) of input {a.file_index}")
    rows = sum(s.rows for s in m.shards)
    if m.total_rows != rows:
        _fail(f"total_rows {m.total_rows} != sum of shard rows {rows}")
    if require_complete:
        for i, inp in enumerate(m.inputs):
            covered = sum(s.rows for s in m.shards if s.file_index == i)
            if covered != inp.count:
                nxt = 0
                for s in ordered:
                    if s.file_index == i:
                        if s.first_row != nxt:
                            break
                        nxt = s.first_row + s.rows
                _fail(f"input {i} ({storage.redact(inp.uri)}): shards cover {covered} of "
                      f"{inp.count} rows; first missing row {nxt}")


# ----------------------------------------------------------------------------------------- read / commit

def _read_json(uri: str, options: StorageOptions | None) -> dict:
    data = storage.read_bytes(uri, options)
    try:
        out = json.loads(data)
    except ValueError as e:
        raise ManifestError(f"{storage.redact(uri)}: not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ManifestError(f"{storage.redact(uri)}: expected a JSON object")
    return out


def _parse_manifest(uri: str, d: dict) -> Manifest:
    try:
        return Manifest.from_dict(d)
    except (ConfigError, TypeError, ValueError) as e:
        raise ManifestError(f"{storage.redact(uri)}: bad manifest ({e})") from None


def _current(index_uri: str, options: StorageOptions | None) -> dict | None:
    uri = storage.join(index_uri, CURRENT_FILE)
    if not storage.exists(uri, options):
        return None
    d = _read_json(uri, options)
    if not isinstance(d.get("version"), str) or not _VERSION_RE.match(d["version"]):
        raise ManifestError(f"{storage.redact(uri)}: no valid 'version' field")
    return d


def current_version(index_uri: str, options: StorageOptions | None = None) -> str | None:
    """The version ``CURRENT`` names, or None when nothing was committed yet."""
    d = _current(index_uri, options)
    return None if d is None else d["version"]


def load_manifest(index_uri: str, version: str | None = None,
                  options: StorageOptions | None = None) -> Manifest:
    """The committed manifest of ``version`` (default: the one ``CURRENT`` names)."""
    if version is None:
        version = current_version(index_uri, options)
        if version is None:
            raise ManifestError(f"{storage.redact(index_uri)}: no committed index version "
                                f"({CURRENT_FILE} not found)")
    uri = manifest_uri(index_uri, version)
    if not storage.exists(uri, options):
        raise ManifestError(f"{storage.redact(index_uri)}: version {version} is not committed "
                            f"({storage.redact(uri)} not found)")
    m = _parse_manifest(uri, _read_json(uri, options))
    if m.version != version:
        raise ManifestError(f"{storage.redact(uri)}: manifest says version {m.version}, "
                            f"stored as {version}")
    try:  # every read, not only the commit: readers build paths from the shard names
        validate_manifest(m, require_complete=False)
    except ConfigError as e:
        raise ManifestError(f"{storage.redact(uri)}: {e}") from None
    return m


def _comparable(d: dict) -> dict:
    """Manifest content without the fields that differ between re-runs of the same commit."""
    return {k: v for k, v in d.items() if k not in ("created", "code_version")}


def _check_shards_present(index_uri: str, m: Manifest, options: StorageOptions | None) -> None:
    vdir = version_dir(index_uri, m.version)
    present = set(_relative_files(vdir, options))
    for s in m.shards:
        uri = shard_uri(index_uri, m.version, s)
        if s.name not in present:
            raise ConfigError(f"cannot commit {m.version}: shard {storage.redact(uri)} is missing")


def set_current(index_uri: str, version: str, options: StorageOptions | None = None, *,
                allow_older: bool = False) -> None:
    """Point ``CURRENT`` at an already committed version.

    A compare-and-swap (S3 ``If-Match`` on the ETag; locally a lock and a content compare), so
    two writers never both think they moved it. It never moves to an older version than the one
    it names unless ``allow_older`` (``qinco rollback``): a job that committed ``v3`` after
    another job's ``v4`` raises :class:`ConcurrentWriterError` and leaves ``CURRENT`` at ``v4``.
    A ``CURRENT`` that cannot be parsed is replaced.
    """
    muri = manifest_uri(index_uri, version)
    if not storage.exists(muri, options):
        raise ConfigError(f"{storage.redact(index_uri)}: cannot switch to {version}: not committed")
    uri = storage.join(index_uri, CURRENT_FILE)
    body = {"version": version, "manifest": f"{VERSIONS_DIR}/{version}/{MANIFEST_FILE}"}
    for _attempt in range(100):
        data, tag = _refuse_if_current_is_newer(index_uri, version, options, allow_older)
        if _version_named(data) == version:
            return
        text = json.dumps({**body, "updated": utc_now()}, indent=2, sort_keys=True) + "\n"
        if storage.replace_if_unchanged(uri, text.encode(), tag, options):
            log.info("%s: CURRENT -> %s", storage.redact(index_uri), version)
            return
        time.sleep(0.05)  # another writer moved it between our read and write: decide again
    raise ConcurrentWriterError(f"{storage.redact(uri)}: kept changing while switching to {version}")


def _refuse_if_current_is_newer(index_uri: str, version: str, options: StorageOptions | None,
                                allow_older: bool = False) -> tuple[bytes | None, str | None]:
    """``CURRENT``'s bytes and tag; :class:`ConcurrentWriterError` when it names a version newer
    than ``version`` (unless ``allow_older``)."""
    data, tag = storage.read_tagged(storage.join(index_uri, CURRENT_FILE), options)
    named = _version_named(data)
    if named is not None and version_number(named) > version_number(version) and not allow_older:
        raise ConcurrentWriterError(
            f"{storage.redact(index_uri)}: CURRENT names {named}, newer than this job's {version}: another "
            f"job committed to this index meanwhile. CURRENT stays at {named}; re-run the command "
            f"(with --overwrite to replace that index) to build a version after it")
    return data, tag


def _version_named(data: bytes | None) -> str | None:
    """The version a ``CURRENT`` object's bytes name; None when absent or unparsable."""
    if data is None:
        return None
    try:
        v = json.loads(data).get("version")
    except (ValueError, AttributeError):
        return None
    return v if isinstance(v, str) and _VERSION_RE.match(v) else None


def commit_manifest(index_uri: str, manifest: Manifest, *, switch_current: bool = True,
                    options: StorageOptions | None = None, check_shards: bool = True) -> str:
    """Commit a version: write its manifest atomically, then (optionally) switch ``CURRENT``.

    The manifest is checked with :func:`validate_manifest` (gaps allowed: a job may commit with
    ranges it reported as bad) and, with ``check_shards``, every shard must exist (one
    listing; contents are checked by readers against the recorded size and SHA-256). Re-committing the same content is a no-op for the manifest (the stored one,
    with its original ``created`` time, is kept); different content for an already committed
    version raises ConfigError. Returns the manifest URI.
    """
    validate_manifest(manifest, require_complete=False)
    if switch_current:  # a version CURRENT can never name is not committed at all
        _refuse_if_current_is_newer(index_uri, manifest.version, options)
    uri = manifest_uri(index_uri, manifest.version)
    new = manifest.to_dict()
    if storage.exists(uri, options):
        old = _read_json(uri, options)
        if _comparable(old) != _comparable(json.loads(json.dumps(new))):
            raise ConfigError(f"{storage.redact(uri)}: version {manifest.version} is already "
                              f"committed with different content; commit a new version instead")
        log.info("%s: version %s already committed", storage.redact(index_uri), manifest.version)
    else:
        if check_shards:
            _check_shards_present(index_uri, manifest, options)
        if not storage.create_exclusive(uri, (manifest.to_json() + "\n").encode(), options):
            old = _read_json(uri, options)  # another writer committed this version just now
            if _comparable(old) != _comparable(json.loads(json.dumps(new))):
                raise ConcurrentWriterError(f"{storage.redact(uri)}: version {manifest.version} was committed "
                                            f"by another job with different content")
        log.info("%s: committed version %s (%d shards, %d rows)", storage.redact(index_uri),
                 manifest.version, len(manifest.shards), manifest.total_rows)
    if switch_current:
        set_current(index_uri, manifest.version, options)
    return uri


# ----------------------------------------------------------------------------------------- GC

def garbage_collect(index_uri: str, keep: int, options: StorageOptions | None = None,
                    idle_s: float = UNFINISHED_IDLE_S) -> list[str]:
    """Delete old versions, keeping ``keep`` committed versions including ``CURRENT``.

    Kept: the version ``CURRENT`` names plus the newest other committed versions up to ``keep``
    in all. Deleted: every other committed version, and the uncommitted version directories of
    abandoned runs: numbered below the newest committed version and untouched for ``idle_s``
    seconds (a job that lost the race to another writer may still be writing there, and its
    re-run reuses those shards). Newer uncommitted directories may belong to a running or
    resumable job and are left alone. A committed version loses its manifest first, so a
    concurrent reader never sees a manifest whose shards are half deleted. Returns the deleted
    versions, oldest first.
    """
    if not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"garbage_collect: keep must be an integer >= 1, got {keep!r}")
    dirs = _version_dirs(index_uri, options)
    committed = list_versions(index_uri, options)
    current = current_version(index_uri, options)
    kept = {current} if current in committed else set()
    for v in reversed(committed):
        if len(kept) >= keep:
            break
        kept.add(v)
    newest = max((version_number(v) for v in committed), default=0)
    doomed = [v for v in committed if v not in kept]
    now = time.time()
    for v in dirs:
        if v in committed or version_number(v) >= newest:
            continue
        changed = storage.newest_change(version_dir(index_uri, v), options)
        if changed is not None and now - changed < idle_s:
            log.info("%s: version %s is not committed but was written %.0f s ago: left alone",
                     storage.redact(index_uri), v, now - changed)
            continue
        doomed.append(v)
    doomed.sort(key=version_number)
    for v in doomed:
        if v in committed:
            storage.remove(manifest_uri(index_uri, v), options)
        storage.remove(version_dir(index_uri, v), options, recursive=True)
        log.info("%s: deleted version %s", storage.redact(index_uri), v)
    return doomed
