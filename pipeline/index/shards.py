"""IVF index shards: one parquet file per encoded row range.

A shard holds, for a contiguous range of database rows, each vector's inverted-list id, its global
id and its QINCo codes. Rows are sorted by ``(list_id, id)`` so each inverted list is one
contiguous run of rows; a reader rebuilds CSR offsets (``list_offsets``) with one
``searchsorted`` and serves list ``l`` as rows ``[off[l], off[l+1])``.

Columns (see ``docs/index-format.md``):

- ``list_id``: int32, in ``[0, nlist)``
- ``id``: int64, ``>= 0``, unique within the shard
- ``codes``: ``fixed_size_binary(M * itemsize)``; the ``M`` codes of a row as little-endian
  ``uint8`` (``K <= 256``) or ``uint16`` (``K <= 65536``) packed back to back
- ``lut_scale`` (optional, format version 2): float16, the row's scale of the lookup-table
  stage (``pipeline.codec.decoder.model_row_scales``), finite. A function of the row's codes and list,
  stored so a search need not decode every row when it loads the shard.

Readers accept format versions 1 (no ``lut_scale``) and 2.

A shard is serialised in memory, hashed (SHA-256 of the exact file bytes) and written with
``storage.open_atomic``: a reader sees either no object or the complete file. The hash and size go
into the manifest, so a reader can detect any later change and a resumed job can trust a shard
left by an earlier run only when both match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import posixpath
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.codec.codes import code_dtype
from pipeline.config import JsonConfig
from pipeline.errors import ConfigError, CorruptShardError, PipelineError, StorageError
from pipeline.io import storage
from pipeline.io.storage import StorageOptions

log = logging.getLogger(__name__)

SHARD_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
DEFAULT_ROW_GROUP_ROWS = 65536
MAX_FILE_INDEX = 99_999
MAX_FIRST_ROW = 999_999_999_999

_META_PREFIX = "qinco."
_NAME_RE = re.compile(r"^shard-f(\d{5})-r(\d{12})\.parquet$")
SHARDS_DIR = "shards"  # shards live in this folder of their version directory


@dataclasses.dataclass
class ShardInfo(JsonConfig):
    """What a writer learns about a shard it wrote: enough to check it later without parsing it."""

    name: str
    rows: int
    bytes: int
    sha256: str
    id_min: int
    id_max: int
    lists: int  # number of non-empty inverted lists


def shard_name(file_index: int, first_row: int) -> str:
    """Deterministic name of the shard holding rows from ``first_row`` of input file ``file_index``.

    Fixed-width numbers make lexicographic order equal numeric order.
    """
    if not 0 <= int(file_index) <= MAX_FILE_INDEX:
        raise ConfigError(f"file index {file_index} out of range [0, {MAX_FILE_INDEX}]")
    if not 0 <= int(first_row) <= MAX_FIRST_ROW:
        raise ConfigError(f"first row {first_row} out of range [0, {MAX_FIRST_ROW}]")
    return f"shard-f{int(file_index):05d}-r{int(first_row):012d}.parquet"


def parse_shard_name(name: str) -> tuple[int, int]:
    """Inverse of :func:`shard_name` (accepts a path; uses its last component)."""
    m = _NAME_RE.match(posixpath.basename(name))
    if not m:
        raise ConfigError(f"not a shard file name: {name!r}")
    return int(m.group(1)), int(m.group(2))


def shard_file_uri(version_uri: str, name: str) -> str:
    """URI of the shard a manifest names ``name`` under ``version_uri``. Only the form the format
    allows (``shards/`` + :func:`shard_name`) is accepted, so a damaged or hostile manifest can
    never make a reader open a file outside the version directory."""
    if not isinstance(name, str) or not name.startswith(SHARDS_DIR + "/") \
            or not _NAME_RE.fullmatch(name[len(SHARDS_DIR) + 1:]):
        raise CorruptShardError(storage.redact(version_uri),
                                f"manifest names shard {name!r}, not of the form {SHARDS_DIR}/shard-fNNNNN-rNNNNNNNNNNNN.parquet")
    return storage.join(version_uri, name)


def listed_shards(version_uri: str, options: StorageOptions | None = None) -> set[str]:
    """Every file under the version's ``shards/`` (as ``shards/NAME``, the form a manifest names
    them), with one listing request: an index of a billion vectors has tens of thousands."""
    return {f"{SHARDS_DIR}/" + posixpath.basename(u)
            for u in storage.list_files(storage.join(version_uri, SHARDS_DIR), options)}


def _require_int_array(name: str, a: Any, ndim: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != ndim:
        raise ConfigError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ConfigError(f"{name} must have an integer dtype, got {a.dtype}")
    return a


def _check_range(name: str, a: np.ndarray, lo: int, hi: int | None) -> None:
    """Raise ConfigError unless ``lo <= a < hi`` (``hi`` None: no upper bound)."""
    if a.size == 0:
        return
    bad = (a < lo) if hi is None else ((a < lo) | (a >= hi))
    if bad.any():
        bound = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        row = int(np.flatnonzero(bad.reshape(len(a), -1).any(axis=1))[0])
        raise ConfigError(f"{name} values must be in {bound}, got {a[row].tolist()} at row {row}")


def encode_shard(list_ids_N, ids_N, codes_NM, *, K: int, nlist: int, model_sha: str,
                 row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
                 lut_scale_N=None) -> tuple[bytes, dict[str, Any]]:
    """Validate, sort and serialise one shard; returns the parquet bytes and a summary dict.

    ``lut_scale_N`` (optional, ``(N,)``, finite, stored as float16) is written as the
    ``lut_scale`` column. Pure function (no I/O) so the format can be produced and tested
    without storage.
    """
    dtype = code_dtype(K)
    if not isinstance(nlist, (int, np.integer)) or nlist < 1:
        raise ConfigError(f"nlist must be a positive integer, got {nlist!r}")
    if not isinstance(model_sha, str) or not model_sha:
        raise ConfigError("model_sha must be a non-empty string identifying the model")
    if row_group_rows < 1:
        raise ConfigError(f"row_group_rows must be >= 1, got {row_group_rows}")
    list_ids_N = _require_int_array("list_ids_N", list_ids_N, 1)
    ids_N = _require_int_array("ids_N", ids_N, 1)
    codes_NM = _require_int_array("codes_NM", codes_NM, 2)
    N = len(ids_N)
    if N == 0:
        raise ConfigError("a shard must hold at least one row")
    if len(list_ids_N) != N or codes_NM.shape[0] != N:
        raise ConfigError(
            f"row counts differ: list_ids_N {list_ids_N.shape}, ids_N {ids_N.shape}, "
            f"codes_NM {codes_NM.shape}")
    M = codes_NM.shape[1]
    if M < 1:
        raise ConfigError("codes_NM must have at least one code per row")
    _check_range("list_ids_N", list_ids_N, 0, int(nlist))
    _check_range("ids_N", ids_N, 0, None)
    _check_range("codes_NM", codes_NM, 0, int(K))
    if lut_scale_N is not None:
        lut_scale_N = np.asarray(lut_scale_N)
        if lut_scale_N.shape != (N,) or not np.issubdtype(lut_scale_N.dtype, np.floating):
            raise ConfigError(f"lut_scale_N must be a float array of shape ({N},), got "
                              f"{lut_scale_N.dtype} {lut_scale_N.shape}")
        with np.errstate(over="ignore"):  # out of range becomes inf, refused just below
            lut_scale_N = lut_scale_N.astype(np.float16)
        bad = ~np.isfinite(lut_scale_N)
        if bad.any():
            raise ConfigError(f"lut_scale_N is NaN or out of float16 range at row {int(np.flatnonzero(bad)[0])}")

    order = np.lexsort((ids_N, list_ids_N))
    list_ids_N = list_ids_N[order].astype(np.int32)
    ids_N = ids_N[order].astype(np.int64)
    codes_NM = np.ascontiguousarray(codes_NM[order].astype(dtype.newbyteorder("<")))
    same_list = np.diff(list_ids_N) == 0
    dup = same_list & (np.diff(ids_N) == 0)
    if dup.any():
        raise ConfigError(f"ids_N holds duplicate id {int(ids_N[np.flatnonzero(dup)[0]])}")
    # ids must be unique across lists too
    ids_sorted = np.sort(ids_N)
    dup_any = np.diff(ids_sorted) == 0
    if dup_any.any():
        raise ConfigError(f"ids_N holds duplicate id {int(ids_sorted[np.flatnonzero(dup_any)[0]])}")

    width = M * dtype.itemsize
    codes_arr = pa.Array.from_buffers(pa.binary(width), N, [None, pa.py_buffer(codes_NM.tobytes())])
    meta = {
        "format_version": SHARD_FORMAT_VERSION,
        "M": int(M),
        "K": int(K),
        "code_dtype": dtype.name,
        "nlist": int(nlist),
        "model_sha": model_sha,
    }
    fields = [pa.field("list_id", pa.int32(), nullable=False),
              pa.field("id", pa.int64(), nullable=False),
              pa.field("codes", pa.binary(width), nullable=False)]
    arrays = [pa.array(list_ids_N, pa.int32()), pa.array(ids_N, pa.int64()), codes_arr]
    encoding = {"id": "DELTA_BINARY_PACKED", "codes": "PLAIN"}
    compression = {"list_id": "zstd", "id": "zstd", "codes": "none"}
    if lut_scale_N is not None:
        fields.append(pa.field("lut_scale", pa.float16(), nullable=False))
        arrays.append(pa.array(lut_scale_N[order], pa.float16()))
        encoding["lut_scale"] = "PLAIN"
        compression["lut_scale"] = "zstd"
    schema = pa.schema(fields, metadata={f"{_META_PREFIX}{k}": str(v) for k, v in meta.items()})
    table = pa.Table.from_arrays(arrays, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(
        table, sink,
        row_group_size=int(row_group_rows),
        use_dictionary=["list_id"],
        column_encoding=encoding,
        compression=compression,
        write_statistics=["list_id", "id"],
        sorting_columns=[pq.SortingColumn(0), pq.SortingColumn(1)],
    )
    data = sink.getvalue().to_pybytes()
    summary = {
        "rows": int(N),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "id_min": int(ids_sorted[0]),
        "id_max": int(ids_sorted[-1]),
        "lists": int(np.count_nonzero(np.diff(list_ids_N)) + 1),
    }
    return data, summary


def write_shard(uri: str, list_ids_N, ids_N, codes_NM, *, K: int, nlist: int, model_sha: str,
                options: StorageOptions | None = None,
                row_group_rows: int = DEFAULT_ROW_GROUP_ROWS, lut_scale_N=None) -> ShardInfo:
    """Write one shard atomically at ``uri`` and return its :class:`ShardInfo`.

    Rows are sorted by ``(list_id, id)``. Bad shapes, dtypes or out-of-range values raise
    ``ConfigError`` before anything is written.
    """
    try:
        data, summary = encode_shard(list_ids_N, ids_N, codes_NM, K=K, nlist=nlist,
                                     model_sha=model_sha, row_group_rows=row_group_rows,
                                     lut_scale_N=lut_scale_N)
    except ConfigError as e:
        raise ConfigError(f"{storage.redact(uri)}: {e}") from None
    with storage.open_atomic(uri, "wb", options=options) as f:
        f.write(data)
    info = ShardInfo(name=posixpath.basename(uri.rstrip("/")), **summary)
    log.debug("wrote shard %s: %d rows, %d bytes, %d lists", uri, info.rows, info.bytes, info.lists)
    return info


@dataclasses.dataclass
class Shard:
    """A shard loaded in memory, sorted by ``(list_id, id)``, with CSR offsets per inverted list."""

    list_ids_N: np.ndarray  # int32
    ids_N: np.ndarray  # int64
    codes_NM: np.ndarray  # uint8 or uint16
    list_offsets: np.ndarray  # int64, nlist + 1
    meta: dict
    lut_scale_N: np.ndarray | None = None  # float16; None when the shard has no lut_scale column

    def __len__(self) -> int:
        return len(self.ids_N)

    @property
    def nlist(self) -> int:
        return len(self.list_offsets) - 1

    def list_slice(self, l: int) -> slice:
        """Rows of inverted list ``l``."""
        if not 0 <= l < self.nlist:
            raise IndexError(f"list id {l} out of range [0, {self.nlist})")
        return slice(int(self.list_offsets[l]), int(self.list_offsets[l + 1]))

    def list_sizes(self) -> np.ndarray:
        return np.diff(self.list_offsets)


def decode_shard(uri: str, data: bytes, expected: ShardInfo | None = None,
                 nlist: int | None = None) -> Shard:
    """Parse shard bytes read from ``uri``; any inconsistency raises CorruptShardError."""
    if expected is not None:
        if len(data) != expected.bytes:
            raise CorruptShardError(storage.redact(uri), f"size {len(data)} bytes, manifest says {expected.bytes}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected.sha256:
            raise CorruptShardError(storage.redact(uri), f"sha256 {digest} differs from manifest {expected.sha256}")
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        raw = pf.schema_arrow.metadata or {}
        table = pf.read()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CorruptShardError(storage.redact(uri), f"unreadable parquet: {e}") from None
    try:
        meta_s = {k.decode()[len(_META_PREFIX):]: v.decode() for k, v in raw.items()
                  if k.startswith(_META_PREFIX.encode())}
        meta: dict[str, Any] = {
            "format_version": int(meta_s["format_version"]),
            "M": int(meta_s["M"]),
            "K": int(meta_s["K"]),
            "code_dtype": meta_s["code_dtype"],
            "nlist": int(meta_s["nlist"]),
            "model_sha": meta_s["model_sha"],
        }
    except (KeyError, ValueError) as e:
        raise CorruptShardError(storage.redact(uri), f"missing or bad key-value metadata ({e})") from None
    if meta["M"] < 1 or meta["nlist"] < 1:
        raise CorruptShardError(storage.redact(uri), f"bad metadata M={meta['M']}, nlist={meta['nlist']}")
    if meta["format_version"] not in READABLE_FORMAT_VERSIONS:
        raise CorruptShardError(storage.redact(uri), f"shard format version {meta['format_version']} is not "
                                     f"supported (this code reads "
                                     f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))})")
    try:
        dtype = code_dtype(meta["K"])
    except ConfigError as e:
        raise CorruptShardError(storage.redact(uri), str(e)) from None
    if meta["code_dtype"] != dtype.name:
        raise CorruptShardError(storage.redact(uri), f"code dtype {meta['code_dtype']} does not match K={meta['K']}")
    if nlist is not None and meta["nlist"] != nlist:
        raise CorruptShardError(storage.redact(uri), f"built for nlist={meta['nlist']}, expected {nlist}")
    width = meta["M"] * dtype.itemsize
    want = pa.schema([("list_id", pa.int32()), ("id", pa.int64()), ("codes", pa.binary(width))])
    got = pa.schema([(f.name, f.type) for f in table.schema])
    has_scale = meta["format_version"] >= 2 and "lut_scale" in table.column_names
    if has_scale:
        want = want.append(pa.field("lut_scale", pa.float16()))
    if not got.equals(want):
        raise CorruptShardError(storage.redact(uri), f"schema {got} differs from expected {want}")
    if table.num_rows == 0 or any(table.column(c).null_count for c in table.column_names):
        raise CorruptShardError(storage.redact(uri), "empty shard or null values")
    if expected is not None and table.num_rows != expected.rows:
        raise CorruptShardError(storage.redact(uri), f"{table.num_rows} rows, manifest says {expected.rows}")

    N = table.num_rows
    list_ids_N = table.column("list_id").to_numpy().astype(np.int32, copy=False)
    ids_N = table.column("id").to_numpy().astype(np.int64, copy=False)
    codes = table.column("codes").combine_chunks()
    buf = codes.buffers()[1]
    codes_NM = np.frombuffer(buf, dtype=dtype.newbyteorder("<"), count=N * meta["M"],
                             offset=codes.offset * width).reshape(N, meta["M"])
    codes_NM = codes_NM.astype(dtype, copy=True)  # native order, writable, owns its memory

    d_list = np.diff(list_ids_N.astype(np.int64))
    d_id = np.diff(ids_N)
    if ((d_list < 0) | ((d_list == 0) & (d_id <= 0))).any():
        bad = int(np.flatnonzero((d_list < 0) | ((d_list == 0) & (d_id <= 0)))[0]) + 1
        raise CorruptShardError(storage.redact(uri), f"rows not sorted by (list_id, id) at row {bad}")
    if list_ids_N[0] < 0 or list_ids_N[-1] >= meta["nlist"]:
        raise CorruptShardError(storage.redact(uri), f"list ids outside [0, {meta['nlist']})")
    if int(codes_NM.max()) >= meta["K"]:
        raise CorruptShardError(storage.redact(uri), f"code values >= K={meta['K']}")
    lut_scale_N = None
    if has_scale:
        lut_scale_N = table.column("lut_scale").to_numpy().astype(np.float16)
        bad = ~np.isfinite(lut_scale_N)
        if bad.any():
            raise CorruptShardError(storage.redact(uri), f"lut_scale is NaN or infinite at row {int(np.flatnonzero(bad)[0])}")
    offsets = np.searchsorted(list_ids_N, np.arange(meta["nlist"] + 1), side="left").astype(np.int64)
    return Shard(list_ids_N=list_ids_N, ids_N=ids_N, codes_NM=codes_NM, list_offsets=offsets,
                 meta=meta, lut_scale_N=lut_scale_N)


def read_shard(uri: str, expected: ShardInfo | None = None, options: StorageOptions | None = None,
               nlist: int | None = None) -> Shard:
    """Load a whole shard into memory.

    With ``expected`` (the manifest entry) the size, SHA-256 and row count are checked first;
    with ``nlist`` the shard must have been built for that many lists. Any mismatch, a missing
    object or an unparsable file raises :class:`CorruptShardError` naming ``uri``.
    """
    return decode_shard(uri, _fetch(uri, options), expected=expected, nlist=nlist)


def _fetch(uri: str, options) -> bytes:
    """A shard file's bytes; a missing one is a ``CorruptShardError`` (the manifest names it)."""
    try:
        return storage.read_bytes(uri, options=options)
    except StorageError:
        if not storage.exists(uri, options=options):
            raise CorruptShardError(storage.redact(uri), "file is missing") from None
        raise


def verify_shard(uri: str, expected: ShardInfo, options: StorageOptions | None = None) -> bool:
    """True when ``uri`` exists with exactly the size and SHA-256 in ``expected``.

    Used by resumable jobs to skip work already done: the size check needs only a metadata
    request; the file is read and hashed only when the size matches.
    """
    if not storage.exists(uri, options=options):
        return False
    if storage.file_size(uri, options=options) != expected.bytes:
        return False
    return hashlib.sha256(storage.read_bytes(uri, options=options)).hexdigest() == expected.sha256


def _read_entries(version_uri: str, shard_entries: list[dict], nlist: int, options,
                  errors: dict[str, str] | None):
    """``(entry, file bytes, Shard)`` of each shard read and verified; see ``load_shard_rows``."""
    for e in shard_entries:
        info = ShardInfo(name=e["name"], rows=e["rows"], bytes=e["bytes"], sha256=e["sha256"],
                         id_min=e["id_min"], id_max=e["id_max"], lists=e["lists"])
        try:
            uri = shard_file_uri(version_uri, e["name"])  # a hostile name is refused here
            data = _fetch(uri, options)
            sh = decode_shard(uri, data, expected=info, nlist=nlist)
        except PipelineError as exc:
            if errors is None:
                raise
            errors[e["name"]] = storage.redact(str(exc))
            log.warning("skipping shard %s: %s", e["name"], errors[e["name"]])
            continue
        yield e, data, sh


def _scale_or_nan(sh: Shard) -> np.ndarray:
    return sh.lut_scale_N if sh.lut_scale_N is not None else np.full(len(sh), np.nan, np.float16)


def load_shard_rows(version_uri: str, shard_entries: list[dict], nlist: int, M: int, options=None,
                    errors: dict[str, str] | None = None, mmap_dir: str | None = None):
    """Read and verify shards (manifest entries) of one index version and merge them.

    Returns ``(list_ids_N int32, ids_N int64, codes_NM, list_offsets, scale_N float16)`` sorted by
    (list, id), the layout ``pipeline.search.scan.ShardSearcher`` takes; ``scale_N`` holds the rows' stored
    ``lut_scale`` and NaN for rows of shards written without that column. A missing or corrupt
    shard raises ``CorruptShardError`` naming it; when ``errors`` is given such shards are skipped
    instead and their messages recorded there by shard name.

    With ``mmap_dir`` (a local directory) the rows are not held in memory: they are written there
    and returned as read-only memory maps (:func:`_merge_to_disk`), so a process can search more
    codes than its RAM holds.
    """
    if mmap_dir is not None:
        return _merge_to_disk(_read_entries(version_uri, shard_entries, nlist, options, errors), nlist, M,
                              mmap_dir)
    lists, ids, codes, scales = [], [], [], []
    for _, _, sh in _read_entries(version_uri, shard_entries, nlist, options, errors):
        lists.append(sh.list_ids_N)
        ids.append(sh.ids_N)
        codes.append(sh.codes_NM)
        scales.append(_scale_or_nan(sh))
    list_ids = np.concatenate(lists).astype(np.int32) if lists else np.zeros(0, np.int32)
    ids_N = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
    codes_NM = np.concatenate(codes) if codes else np.zeros((0, M), np.uint8)
    scale_N = np.concatenate(scales) if scales else np.zeros(0, np.float16)
    order = np.lexsort((ids_N, list_ids))
    list_ids, ids_N, codes_NM, scale_N = list_ids[order], ids_N[order], codes_NM[order], scale_N[order]
    offsets = np.zeros(nlist + 1, np.int64)
    np.cumsum(np.bincount(list_ids, minlength=nlist), out=offsets[1:])
    return list_ids, ids_N, codes_NM, offsets, scale_N


# rows per step when checking the merged order on disk
_CHECK_ROWS = 1 << 22


def _merge_to_disk(shards, nlist: int, M: int, mmap_dir: str):
    """``load_shard_rows``'s arrays merged in ``mmap_dir`` with one shard in memory at a time.

    First pass: each verified shard's file is copied to ``mmap_dir`` and its list sizes counted.
    Second pass: each shard's rows (sorted by (list, id) within the shard) are written to their
    list's next free rows of ``.npy`` files. Rows of a list then follow shard order; the few lists
    whose ids are not increasing (shards with interleaved ids) are sorted in place."""
    os.makedirs(mmap_dir, exist_ok=True)
    counts = np.zeros(nlist, np.int64)
    local: list[str] = []
    code_dt = np.dtype(np.uint8)
    for i, (_, data, sh) in enumerate(shards):
        counts += np.bincount(sh.list_ids_N, minlength=nlist)
        code_dt = sh.codes_NM.dtype
        path = os.path.join(mmap_dir, f"shard{i:06d}.parquet")
        with open(path, "wb") as f:
            f.write(data)
        local.append(path)
    N = int(counts.sum())
    offsets = np.zeros(nlist + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    specs = {"list_ids": (np.int32, (N,)), "ids": (np.int64, (N,)), "codes": (code_dt, (N, M)),
             "scale": (np.float16, (N,))}
    out = {k: np.lib.format.open_memmap(os.path.join(mmap_dir, k + ".npy"), mode="w+", dtype=dt, shape=shape)
           for k, (dt, shape) in specs.items()}
    cursor = offsets[:-1].copy()
    for path in local:
        with open(path, "rb") as f:
            sh = decode_shard(path, f.read(), nlist=nlist)
        os.remove(path)
        lists = sh.list_ids_N.astype(np.int64)
        first = np.searchsorted(lists, lists, side="left")  # the shard's first row of each row's list
        dest = cursor[lists] + (np.arange(len(lists)) - first)
        cursor += np.bincount(lists, minlength=nlist)
        out["list_ids"][dest] = sh.list_ids_N
        out["ids"][dest] = sh.ids_N
        out["codes"][dest] = sh.codes_NM
        out["scale"][dest] = _scale_or_nan(sh)
    ids, lists = out["ids"], out["list_ids"]
    unsorted: set[int] = set()
    for a in range(0, max(N - 1, 0), _CHECK_ROWS):
        b = min(N, a + _CHECK_ROWS + 1)
        step = np.flatnonzero((np.diff(ids[a:b]) < 0) & (np.diff(lists[a:b]) == 0))
        unsorted.update(int(x) for x in np.unique(lists[a:b][step]))
    for lst in sorted(unsorted):
        a, b = int(offsets[lst]), int(offsets[lst + 1])
        perm = np.argsort(ids[a:b], kind="stable")
        for arr in out.values():
            arr[a:b] = arr[a:b][perm]
    for arr in out.values():
        arr.flush()
    del out
    loaded = {k: np.load(os.path.join(mmap_dir, k + ".npy"), mmap_mode="r") for k in specs}
    return loaded["list_ids"], loaded["ids"], loaded["codes"], offsets, loaded["scale"]
