"""Vector file formats: cheap metadata, random access by row range, atomic writes.

Supported formats (detected from the extension or passed as ``fmt``):

- ``fvecs`` / ``bvecs`` / ``ivecs`` (TEXMEX): per record int32 ``d`` then ``d`` float32 / uint8 / int32
- ``fbin`` / ``u8bin`` / ``i8bin`` / ``ibin`` (big-ann-benchmarks): uint32 ``n``, uint32 ``d``,
  then ``n*d`` float32 / uint8 / int8 / int32
- ``npy``: a 2-D C-ordered numpy array (header parsed here so row ranges are byte ranges)
- ``parquet``: a vector column (``"vector"``: a fixed-size list, or a list whose rows all have one
  length; float16/32/64 or integer values) plus an optional int64 ``"id"``

``info`` reads only headers and the file size; ``read_rows`` reads a row range with one ranged
request (row groups for parquet), validating record headers and float values on the way. All
multi-byte values are little-endian. Every malformed input raises
:class:`~pipeline.errors.VectorFormatError` naming the file and the byte offset or row.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import JsonConfig
from pipeline.errors import ConfigError, VectorFormatError
from pipeline.io import storage
from pipeline.io.storage import StorageOptions

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("fvecs", "bvecs", "ivecs", "fbin", "u8bin", "i8bin", "ibin", "npy", "parquet")

_VECS_DTYPE = {"fvecs": np.dtype("<f4"), "bvecs": np.dtype("u1"), "ivecs": np.dtype("<i4")}
_BIN_DTYPE = {"fbin": np.dtype("<f4"), "u8bin": np.dtype("u1"), "i8bin": np.dtype("i1"), "ibin": np.dtype("<i4")}
_EXT_ALIASES = {"pq": "parquet", "fvec": "fvecs", "bvec": "bvecs", "ivec": "ivecs"}
# sanity bound on a dimension header: anything larger is almost surely a wrong format/corruption
MAX_DIM = 1 << 20
PARQUET_VECTOR_COLUMN = "vector"
PARQUET_ID_COLUMN = "id"


@dataclass(frozen=True)
class VectorFileInfo(JsonConfig):
    """Shape and layout of one vector file, from its headers and size only."""

    uri: str
    fmt: str
    count: int
    dim: int
    dtype: str
    header_bytes: int
    record_bytes: int
    size_bytes: int
    # parquet: the column of the vectors and the column of the ids (when the file has it)
    vector_column: str = PARQUET_VECTOR_COLUMN
    id_column: str = PARQUET_ID_COLUMN

    def byte_range(self, start: int, stop: int) -> tuple[int, int]:
        """(offset, length) of rows ``[start, stop)``; parquet has no fixed layout -> ValueError."""
        if self.fmt == "parquet":
            raise ValueError(f"{self.uri}: parquet rows have no fixed byte range")
        _check_range(self, start, stop)
        return self.header_bytes + start * self.record_bytes, (stop - start) * self.record_bytes


# Extensions that name a file (vector formats and other common data and model files): an output
# that must be a folder or prefix (an index, a model) is refused when it ends in one.
FILE_EXTENSIONS = frozenset(FORMATS) | frozenset(_EXT_ALIASES) | frozenset(
    "npz json csv tsv txt bin h5 hdf5 pkl pickle pt pth safetensors arrow feather orc avro gz zip "
    "tar zst faiss index".split())


def file_extension(uri: str) -> str | None:
    """The lower-case extension of ``uri``'s last path component when it is one of
    ``FILE_EXTENSIONS``, else None (a folder or prefix such as ``s3://bucket/index.v2``)."""
    name = str(uri).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower()
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    return ext if ext in FILE_EXTENSIONS else None


def detect_format(uri: str) -> str:
    """Format name from the file extension (``.fvecs``, ``.u8bin``, ``.npy``, ``.parquet``, ...)."""
    name = str(uri).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower()
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    if ext in FORMATS:
        return ext
    alias = _EXT_ALIASES.get(ext)
    if alias:
        return alias
    raise ConfigError(f"{storage.redact(str(uri))}: cannot detect vector format from extension "
                      f"{ext!r}; give the format (fmt=, --fmt on the command line) as one of {', '.join(FORMATS)}")


def _fmt(uri: str, fmt: str | None) -> str:
    f = fmt or detect_format(uri)
    if f not in FORMATS:
        raise ConfigError(f"unknown vector format {f!r}; expected one of {', '.join(FORMATS)}")
    return f


def _check_range(fi: VectorFileInfo, start: int, stop: int) -> None:
    if not (0 <= start <= stop <= fi.count):
        raise ValueError(f"{fi.uri}: row range [{start}, {stop}) outside [0, {fi.count})")


# ----------------------------------------------------------------------------------------- info

def info(uri: str, fmt: str | None = None, options: StorageOptions | None = None,
         columns: tuple[str, str] | None = None) -> VectorFileInfo:
    """Count, dim, dtype and layout from headers and the file size (a few small ranged reads).
    ``columns``: the parquet vector and id columns (default ``vector`` and ``id``)."""
    fmt = _fmt(uri, fmt)
    name = storage.redact(str(uri))
    if fmt == "parquet":
        return _parquet_info(uri, name, options, *(columns or (PARQUET_VECTOR_COLUMN, PARQUET_ID_COLUMN)))
    size = storage.file_size(uri, options)
    if fmt in _VECS_DTYPE:
        dt = _VECS_DTYPE[fmt]
        if size < 4:
            raise VectorFormatError(name, f"file of {size} bytes is too small to hold a dimension header",
                                    offset=0, row=0)
        d = int(np.frombuffer(storage.read_bytes(uri, options, 0, 4), "<i4")[0])
        _check_dim(name, d, offset=0)
        rec = 4 + d * dt.itemsize
        if size % rec:
            whole = size // rec
            raise VectorFormatError(
                name, f"file size {size} is not a whole number of {rec}-byte records (dim {d}): "
                f"partial record {whole} starts here (truncated file or inconsistent dimensions)",
                offset=whole * rec, row=whole)
        return VectorFileInfo(name, fmt, size // rec, d, dt.name, 0, rec, size)
    if fmt in _BIN_DTYPE:
        dt = _BIN_DTYPE[fmt]
        if size < 8:
            raise VectorFormatError(name, f"file of {size} bytes is too small to hold the 8-byte header",
                                    offset=0)
        n, d = (int(v) for v in np.frombuffer(storage.read_bytes(uri, options, 0, 8), "<u4"))
        _check_dim(name, d, offset=4)
        rec = d * dt.itemsize
        expected = 8 + n * rec
        if size != expected:
            whole = (size - 8) // rec
            raise VectorFormatError(
                name, f"header says {n} x {d} {dt.name} ({expected} bytes) but file size is {size}"
                + (f"; data ends inside row {whole}" if size < expected else "; trailing bytes after the last row"),
                offset=min(size, expected) if size > expected else 8 + whole * rec,
                row=whole if size < expected else None)
        return VectorFileInfo(name, fmt, n, d, dt.name, 8, rec, size)
    return _npy_info(uri, name, size, options)


def _check_dim(name: str, d: int, offset: int) -> None:
    if d <= 0 or d > MAX_DIM:
        raise VectorFormatError(name, f"invalid dimension {d} in header (expected 1..{MAX_DIM})", offset=offset)


def _npy_header(uri: str, name: str, size: int, options) -> tuple[int, int, np.dtype, tuple, bool]:
    """(header bytes, offset of the header dict, dtype, shape, fortran order) of a ``.npy`` file."""
    head = storage.read_bytes(uri, options, 0, min(size, 4096))
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise VectorFormatError(name, "not a .npy file (bad magic)", offset=0)
    major = head[6]
    if major == 1:
        hlen, pre = int.from_bytes(head[8:10], "little"), 10
    elif major in (2, 3):
        hlen, pre = int.from_bytes(head[8:12], "little"), 12
    else:
        raise VectorFormatError(name, f"unsupported .npy version {major}", offset=6)
    header_bytes = pre + hlen
    if header_bytes > len(head):
        head = storage.read_bytes(uri, options, 0, header_bytes)
    if header_bytes > len(head):
        raise VectorFormatError(name, "truncated .npy header", offset=len(head))
    try:
        meta = ast.literal_eval(head[pre:header_bytes].decode("latin1"))
        dt = np.dtype(meta["descr"])
        shape = tuple(int(v) for v in meta["shape"])
        fortran = bool(meta["fortran_order"])
    except (ValueError, SyntaxError, KeyError, TypeError) as exc:
        raise VectorFormatError(name, f"unreadable .npy header ({exc})", offset=pre) from None
    return header_bytes, pre, dt, shape, fortran


def _npy_info(uri: str, name: str, size: int, options) -> VectorFileInfo:
    header_bytes, pre, dt, shape, fortran = _npy_header(uri, name, size, options)
    if fortran or len(shape) != 2:
        raise VectorFormatError(name, f"expected a 2-D C-ordered array, got shape {shape} "
                                f"{'Fortran' if fortran else 'C'} order", offset=pre)
    if dt.kind not in "fiu" or dt.byteorder == ">":
        raise VectorFormatError(name, f"unsupported dtype {dt.str} (need little-endian int/uint/float)",
                                offset=pre)
    n, d = (int(v) for v in shape)
    _check_dim(name, d, offset=pre)
    rec = d * dt.itemsize
    expected = header_bytes + n * rec
    if size != expected:
        whole = (size - header_bytes) // rec if size > header_bytes else 0
        raise VectorFormatError(name, f"header says {n} x {d} {dt.name} ({expected} bytes) but file size "
                                f"is {size}", offset=min(size, header_bytes + whole * rec),
                                row=whole if size < expected else None)
    return VectorFileInfo(name, "npy", n, d, dt.newbyteorder("=").name, header_bytes, rec, size)


def _parquet_file(uri: str, options):
    fs, path = storage.get_fs(uri, options)
    with storage._errors(uri):
        # no read-ahead cache: every pyarrow read (footer, column chunks) is one exact ranged GET
        f = fs.open(path, "rb", cache_type="none")
    try:
        return pq.ParquetFile(f, pre_buffer=True), f
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for bad files
        f.close()
        raise VectorFormatError(storage.redact(uri), f"unreadable parquet file ({exc})", offset=0) from None


def _parquet_info(uri: str, name: str, options, vector_column: str, id_column: str) -> VectorFileInfo:
    size = storage.file_size(uri, options)
    pf, f = _parquet_file(uri, options)
    try:
        schema = pf.schema_arrow
        if vector_column not in schema.names:
            raise VectorFormatError(name, f"no {vector_column!r} column (columns: {schema.names}); "
                                          "name the vectors' column with --vector-column")
        t = schema.field(vector_column).type
        if pa.types.is_fixed_size_list(t):
            d = t.list_size
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            d = _parquet_list_dim(pf, name, vector_column)
        else:
            raise VectorFormatError(name, f"column {vector_column!r} must be a list or fixed-size list "
                                          f"of numbers, got {t}")
        dt = np.dtype(t.value_type.to_pandas_dtype())
        if dt.kind not in "fiu":
            raise VectorFormatError(name, f"unsupported vector value type {t.value_type}")
        _check_dim(name, d, offset=0)
        return VectorFileInfo(name, "parquet", pf.metadata.num_rows, d, dt.name, 0, 0, size, vector_column, id_column)
    finally:
        f.close()


def _parquet_list_dim(pf, name: str, column: str) -> int:
    """The dimension of a variable-length list vector column, from the footer alone: its values
    over its rows. Every row must hold that many (``_parquet_read`` checks each row it reads)."""
    md = pf.metadata
    if md.num_rows == 0:
        raise VectorFormatError(name, "file holds no vectors", offset=0, row=0)
    values = 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        leaves = [rg.column(j) for j in range(rg.num_columns)
                  if rg.column(j).path_in_schema.split(".")[0] == column]
        values += sum(c.num_values for c in leaves)
    d, rest = divmod(values, md.num_rows)
    if rest or d == 0:
        raise VectorFormatError(name, f"column {column!r} holds {values} values in {md.num_rows} "
                                      "rows: its lists must all have one length (the dimension)", offset=0)
    return d


# ----------------------------------------------------------------------------------------- reading

def read_rows(uri: str, start: int, stop: int, fmt: str | None = None, options: StorageOptions | None = None,
              file_info: VectorFileInfo | None = None, check_finite: bool = True) -> np.ndarray:
    """Rows ``[start, stop)`` as an ``(n, d)`` array of the file's dtype, from one ranged read.

    Each ``*vecs`` record's dimension header must equal the file's; float values must be finite
    (unless ``check_finite=False``). Violations raise VectorFormatError with row and byte offset.
    """
    fi = file_info or info(uri, fmt, options)
    _check_range(fi, start, stop)
    n = stop - start
    if fi.fmt == "parquet":
        x = _parquet_read(uri, fi, start, stop, options, fi.vector_column)
        if check_finite:
            _check_finite(fi, x, start, offset_of=None)
        return x
    if n == 0:
        return np.empty((0, fi.dim), dtype=fi.dtype)
    off, length = fi.byte_range(start, stop)
    buf = storage.read_bytes(uri, options, off, off + length)
    if len(buf) != length:
        raise VectorFormatError(fi.uri, f"truncated: expected {length} bytes for rows [{start}, {stop}), "
                                f"got {len(buf)} (file changed since its header was read?)",
                                offset=off + len(buf))
    raw = np.frombuffer(buf, dtype=np.uint8).reshape(n, fi.record_bytes)
    if fi.fmt in _VECS_DTYPE:
        dt = _VECS_DTYPE[fi.fmt]
        dims = raw[:, :4].copy().view("<i4").ravel()
        bad = np.flatnonzero(dims != fi.dim)
        if bad.size:
            i = int(bad[0])
            raise VectorFormatError(fi.uri, f"record dimension header {int(dims[i])} differs from the "
                                    f"file's dimension {fi.dim}", row=start + i, offset=off + i * fi.record_bytes)
        x = raw[:, 4:].copy().view(dt)
        hdr = 4
    else:
        dt = _BIN_DTYPE.get(fi.fmt) or np.dtype(fi.dtype).newbyteorder("<")
        x = raw.copy().view(dt)
        hdr = 0
    x = x.reshape(n, fi.dim).astype(np.dtype(fi.dtype), copy=False)
    if check_finite:
        _check_finite(fi, x, start, offset_of=lambda i, j: off + i * fi.record_bytes + hdr + j * dt.itemsize)
    return x


def _check_finite(fi: VectorFileInfo, x: np.ndarray, start: int, offset_of) -> None:
    if x.dtype.kind != "f":
        return
    ok = np.isfinite(x)
    if ok.all():
        return
    i, j = (int(v) for v in np.argwhere(~ok)[0])
    raise VectorFormatError(fi.uri, f"non-finite value {x[i, j]} in column {j}", row=start + i,
                            offset=None if offset_of is None else offset_of(i, j))


def _parquet_read(uri: str, fi: VectorFileInfo, start: int, stop: int, options, column: str) -> np.ndarray:
    """Read ``column`` for rows [start, stop) touching only the overlapping row groups."""
    pf, f = _parquet_file(uri, options)
    try:
        md = pf.metadata
        groups, first, row = [], None, 0
        for g in range(md.num_row_groups):
            nr = md.row_group(g).num_rows
            if row < stop and row + nr > start:
                groups.append(g)
                if first is None:
                    first = row
            row += nr
        if column not in pf.schema_arrow.names:
            return None  # type: ignore[return-value]
        if not groups:
            tbl = pf.schema_arrow.empty_table().select([column])
            first = start
        else:
            try:
                tbl = pf.read_row_groups(groups, columns=[column])
            except Exception as exc:  # noqa: BLE001
                raise VectorFormatError(fi.uri, f"unreadable parquet row groups {groups} ({exc})",
                                        row=first) from None
        col = tbl.column(column).combine_chunks().slice(start - first, stop - start)
    finally:
        f.close()
    if column == fi.vector_column:
        if col.null_count:
            i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise VectorFormatError(fi.uri, "null vector", row=start + i)
        if isinstance(col, pa.ChunkedArray):  # pragma: no cover - combine_chunks returns an Array
            col = col.combine_chunks()
        if not pa.types.is_fixed_size_list(col.type):  # variable lists: every one of the file's length
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(lengths != fi.dim)
            if bad.size:
                i = int(bad[0])
                raise VectorFormatError(fi.uri, f"vector of length {int(lengths[i])}, the file's vectors have "
                                                f"{fi.dim} values", row=start + i)
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return np.ascontiguousarray(flat.reshape(stop - start, fi.dim).astype(fi.dtype, copy=False))
    if col.null_count:
        i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise VectorFormatError(fi.uri, f"null {column!r} value", row=start + i)
    return col.to_numpy(zero_copy_only=False)


def read_ids(uri: str, start: int, stop: int, fmt: str | None = None, options: StorageOptions | None = None,
             file_info: VectorFileInfo | None = None) -> np.ndarray | None:
    """The id column (``file_info.id_column``, default ``id``) for rows [start, stop) of a parquet
    file, in its stored type (checking it is :mod:`pipeline.io.ids`' job); None for other formats
    and parquet files without one."""
    fi = file_info or info(uri, fmt, options)
    _check_range(fi, start, stop)
    if fi.fmt != "parquet" or not parquet_has_ids(uri, options, fi.id_column):
        return None
    return _parquet_read(uri, fi, start, stop, options, fi.id_column)


def parquet_has_ids(uri: str, options: StorageOptions | None = None, column: str = PARQUET_ID_COLUMN) -> bool:
    """Whether a parquet vector file has the id column ``column`` (its footer only)."""
    pf, f = _parquet_file(uri, options)
    try:
        return column in pf.schema_arrow.names
    finally:
        f.close()


def id_file_info(uri: str, options: StorageOptions | None = None) -> VectorFileInfo:
    """Layout of an ids file: a 1-D ``.npy`` array of integers, one per vector of the file beside it."""
    name = storage.redact(str(uri))
    size = storage.file_size(uri, options)
    header_bytes, pre, dt, shape, fortran = _npy_header(uri, name, size, options)
    if len(shape) != 1:
        raise VectorFormatError(name, f"an ids file holds a 1-D array, got shape {shape}", offset=pre)
    if dt.kind not in "iu" or dt.byteorder == ">":
        raise VectorFormatError(name, f"ids must be little-endian integers, got dtype {dt.str}", offset=pre, row=0)
    expected = header_bytes + shape[0] * dt.itemsize
    if size != expected:
        raise VectorFormatError(name, f"header says {shape[0]} ids of {dt.name} ({expected} bytes) but the "
                                f"file size is {size}", offset=min(size, expected))
    return VectorFileInfo(name, "npy", shape[0], 1, dt.newbyteorder("=").name, header_bytes, dt.itemsize, size)


def read_id_file(uri: str, start: int, stop: int, options: StorageOptions | None = None,
                 file_info: VectorFileInfo | None = None) -> np.ndarray:
    """Ids ``[start, stop)`` of an ids file (see :func:`id_file_info`), in its stored dtype."""
    fi = file_info or id_file_info(uri, options)
    off, length = fi.byte_range(start, stop)
    data = storage.read_bytes(uri, options, off, off + length)
    if len(data) != length:
        raise VectorFormatError(fi.uri, f"short read: {len(data)} of {length} bytes", offset=off + len(data))
    return np.frombuffer(data, dtype=np.dtype(fi.dtype).newbyteorder("<")).astype(fi.dtype)


def parquet_columns(vector_column: str | None = None, id_column: str | None = None) -> tuple[str, str]:
    """The ``columns`` argument of :func:`info` for the given names (None: ``vector``, ``id``)."""
    return (vector_column or PARQUET_VECTOR_COLUMN, id_column or PARQUET_ID_COLUMN)


def read_vectors(uri: str, fmt: str | None = None, options: StorageOptions | None = None,
                 max_rows: int | None = None, columns: tuple[str, str] | None = None) -> np.ndarray:
    """Rows ``[0, min(count, max_rows))`` of a vector file (``columns`` as :func:`info`)."""
    fi = info(uri, fmt, options, columns)
    n = fi.count if max_rows is None else min(fi.count, max_rows)
    return read_rows(uri, 0, n, options=options, file_info=fi)


def iter_blocks(uri: str, block_rows: int, fmt: str | None = None, options: StorageOptions | None = None,
                start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, block)`` over rows [start, stop) in blocks of ``block_rows`` rows."""
    if block_rows <= 0:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    fi = info(uri, fmt, options)
    stop = fi.count if stop is None else stop
    _check_range(fi, start, stop)
    for i in range(start, stop, block_rows):
        j = min(stop, i + block_rows)
        yield i, read_rows(uri, i, j, options=options, file_info=fi)


# ----------------------------------------------------------------------------------------- writing

_INT_RANGE = {"bvecs": (0, 255), "u8bin": (0, 255), "i8bin": (-128, 127),
              "ivecs": (-(2**31), 2**31 - 1), "ibin": (-(2**31), 2**31 - 1)}


def _coerce(x: np.ndarray, fmt: str) -> np.ndarray:
    """``x`` converted to the format's dtype; ValueError if values would change."""
    if fmt in ("fvecs", "fbin"):
        if x.dtype.kind not in "fiub":
            raise ValueError(f"{fmt} needs numeric data, got dtype {x.dtype}")
        return np.ascontiguousarray(x, dtype="<f4")
    if fmt in _INT_RANGE:
        lo, hi = _INT_RANGE[fmt]
        target = (_VECS_DTYPE.get(fmt) or _BIN_DTYPE[fmt])
        if x.dtype.kind not in "fiub":
            raise ValueError(f"{fmt} needs numeric data, got dtype {x.dtype}")
        if x.size:
            if x.dtype.kind == "f" and not (np.isfinite(x).all() and (x == np.round(x)).all()):
                raise ValueError(f"{fmt} stores integers ({target.name}) but the data has non-integer values")
            if x.min() < lo or x.max() > hi:
                raise ValueError(f"{fmt} stores {target.name} values in [{lo}, {hi}] but data spans "
                                 f"[{x.min()}, {x.max()}]")
        return np.ascontiguousarray(x, dtype=target)
    if fmt in ("npy", "parquet"):
        if x.dtype.kind not in "fiu":
            raise ValueError(f"{fmt} vectors need an int/uint/float dtype, got {x.dtype}")
        return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<"))
    raise ValueError(f"unknown vector format {fmt!r}")


def write_vectors(uri: str, x: np.ndarray, fmt: str | None = None, options: StorageOptions | None = None,
                  ids: np.ndarray | None = None, parquet_row_group_rows: int = 65536) -> VectorFileInfo:
    """Write an ``(n, d)`` array atomically (nothing at ``uri`` unless the whole file is written)."""
    fmt = _fmt(uri, fmt)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"write_vectors needs a 2-D (n, d>0) array, got shape {x.shape}")
    if fmt in _VECS_DTYPE and x.shape[0] == 0:
        raise ValueError(f"{fmt} cannot store 0 rows (the dimension lives in each record)")
    if ids is not None and fmt != "parquet":
        raise ValueError(f"ids can only be stored in parquet files, not {fmt}")
    y = _coerce(x, fmt)
    n, d = y.shape
    chunk = max(1, (16 << 20) // max(1, y.itemsize * d))
    with storage.open_atomic(uri, "wb", options) as f:
        if fmt in _VECS_DTYPE:
            rec = np.dtype([("d", "<i4"), ("v", y.dtype, (d,))])
            for i in range(0, n, chunk):
                part = y[i:i + chunk]
                buf = np.empty(len(part), dtype=rec)
                buf["d"] = d
                buf["v"] = part
                f.write(buf.tobytes())
        elif fmt in _BIN_DTYPE:
            f.write(np.array([n, d], dtype="<u4").tobytes())
            for i in range(0, n, chunk):
                f.write(y[i:i + chunk].tobytes())
        elif fmt == "npy":
            np.lib.format.write_array(f, y, allow_pickle=False)
        else:
            _write_parquet(f, y, ids, parquet_row_group_rows)
    log.debug("wrote %d x %d %s to %s", n, d, fmt, storage.redact(uri))
    return info(uri, fmt, options)


def _write_parquet(f, y: np.ndarray, ids, row_group_rows: int) -> None:
    n, d = y.shape
    vec = pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), d)
    cols = {PARQUET_VECTOR_COLUMN: vec}
    if ids is not None:
        ids = np.asarray(ids)
        if ids.shape != (n,) or ids.dtype.kind not in "iu":
            raise ValueError(f"ids must be an integer array of shape ({n},), got {ids.dtype} {ids.shape}")
        cols[PARQUET_ID_COLUMN] = pa.array(ids.astype(np.int64))
    pq.write_table(pa.table(cols), f, row_group_size=max(1, row_group_rows))



