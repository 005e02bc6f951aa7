"""The input files of a job, and deterministic row sampling over them.

``plan_inputs`` reads only headers and gives every file a consecutive range of row positions,
which are its vectors' ids unless the files bring their own (:mod:`pipeline.io.ids`). ``RowSample`` selects rows by a hash
of (global id, seed), so train / validation splits are disjoint and identical whatever reads them:
the Ray Data read tasks (:mod:`pipeline.distributed.datasource`) or ``sample_rows_local`` in this
process. Both trainers split their data with it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.config import JsonConfig
from pipeline.errors import ConfigError, VectorFormatError
from pipeline.io import ids as ids_mod, storage, vectors

log = logging.getLogger(__name__)


PROVENANCE_BYTES = 65536  # bytes hashed at each end of a file for header_sha256


_PLAN_THREADS = 16


@dataclass
class VectorSource(JsonConfig):
    """What a job reads: an ordered list of vector files (ids are numbered in this order)."""

    uris: list[str]
    fmt: str | None = None


@dataclass
class InputEntry(JsonConfig):
    """One input vector file as an index manifest records it: its rows hold the positions
    ``[id_start, id_stop)`` among all inputs' rows, which are their ids when ``ids`` is ``rows``;
    with ``column`` or ``file`` the ids are the parquet ``id`` column or the ids file ``ids_uri``.

    ``header_sha256`` hashes the file size and its first and last ``PROVENANCE_BYTES`` bytes
    (headers, parquet footer), so a replaced or truncated file is detected cheaply; ``ids_sha256``
    does the same for an ids file.
    """

    uri: str
    fmt: str
    count: int
    dim: int
    dtype: str
    id_start: int
    id_stop: int
    header_sha256: str
    ids: str = ids_mod.ROWS
    ids_uri: str | None = None
    ids_sha256: str | None = None
    # parquet: the columns the vectors and the ids were read from
    vector_column: str = vectors.PARQUET_VECTOR_COLUMN
    id_column: str = vectors.PARQUET_ID_COLUMN

    def key(self) -> tuple:
        """What must match for two records to describe the same vectors with the same ids."""
        return input_key(self.to_dict())

    @classmethod
    def from_input(cls, inp: "InputEntry") -> "InputEntry":
        """Only the recorded fields of a planned input (an :class:`InputFile`)."""
        return cls(**{f.name: getattr(inp, f.name) for f in dataclasses.fields(cls)})


def input_key(d: dict) -> tuple:
    """``InputEntry.key`` of an input's dict (a manifest's or a planned ``InputFile``'s)."""
    return (d["uri"], d["count"], d["header_sha256"], d["id_start"], d["id_stop"],
            d.get("ids", ids_mod.ROWS), d.get("ids_sha256"),
            d.get("vector_column", vectors.PARQUET_VECTOR_COLUMN), d.get("id_column", vectors.PARQUET_ID_COLUMN))


@dataclass
class InputFile(InputEntry):
    """One planned input file: its manifest record plus the layout read from its headers (what
    a byte-range read needs)."""

    header_bytes: int = 0
    record_bytes: int = 0
    size_bytes: int = 0

    def file_info(self) -> vectors.VectorFileInfo:
        """The ``vectors`` layout, so range reads need no extra header request."""
        return vectors.VectorFileInfo(
            uri=storage.redact(self.uri), fmt=self.fmt, count=self.count, dim=self.dim, dtype=self.dtype,
            header_bytes=self.header_bytes, record_bytes=self.record_bytes, size_bytes=self.size_bytes,
            vector_column=self.vector_column, id_column=self.id_column)


def _provenance_hash(uri: str, size: int, options) -> str:
    h = hashlib.sha256(f"size={size};".encode())
    head = min(size, PROVENANCE_BYTES)
    h.update(storage.read_bytes(uri, options, 0, head))
    if size > head:
        h.update(storage.read_bytes(uri, options, max(head, size - PROVENANCE_BYTES), size))
    return h.hexdigest()


def _plan_one(uri: str, fmt: str | None, options, columns: tuple[str, str]):
    fi = vectors.info(uri, fmt, options, columns)
    source, ids_uri = ids_mod.detect(uri, fi.fmt, fi.count, options, columns[1])
    ids_sha = None if ids_uri is None else _provenance_hash(ids_uri, storage.file_size(ids_uri, options), options)
    return fi, _provenance_hash(uri, fi.size_bytes, options), (source, ids_uri, ids_sha)


def _is_vector_file(uri: str, fmt: str | None) -> bool:
    """Whether a file found under a folder or by a pattern is an input: not an ids file beside a
    vector file, not hidden or a marker (``.name``, ``_SUCCESS``), and, without ``fmt``, in a
    format its extension names."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if name.startswith((".", "_")) or name.endswith(ids_mod.IDS_FILE_SUFFIX):
        return False
    if fmt is not None:
        return True
    try:
        vectors.detect_format(uri)
    except ConfigError:
        return False
    return True


def expand_inputs(uris: Sequence[str], fmt: str | None = None, options=None) -> list[str]:
    """The input files that ``uris`` name, in a deterministic order: a file stands for itself; a
    glob pattern (``s3://bucket/embeddings/*.parquet``, ``**`` across folders) for the vector files
    it matches; a folder or prefix for every vector file under it (their extensions name their
    format, unless ``fmt`` is given). The files of one pattern or folder come sorted by URI, and
    the arguments' files in the order the arguments are given. A pattern or folder that yields no
    vector file is an error naming it."""
    out: list[str] = []
    for u in uris:
        if storage.is_glob(u):
            found = [f for f in storage.glob_files(u, options) if _is_vector_file(f, fmt)]
            if not found:
                raise ConfigError(f"{storage.redact(u)}: the pattern matches no vector file")
        elif vectors.file_extension(u) is not None and not u.endswith("/"):
            found = [u]  # a file by its name: no listing (one request less per file)
        else:
            listed = storage.list_files(u, options)
            found = [f for f in listed if _is_vector_file(f, fmt)]
            if not listed:
                found = [u]  # neither file nor folder: reading it names the missing file
            elif not found:
                raise ConfigError(f"{storage.redact(u)}: the folder holds no vector file (extensions "
                                  f"{', '.join(vectors.FORMATS)}, or give the format with fmt / --fmt)")
        out.extend(found)
    return out


def plan_inputs(uris: Sequence[str] | VectorSource, fmt: str | None = None, options=None,
                vector_column: str | None = None, id_column: str | None = None) -> list[InputFile]:
    """Read every file's header (in parallel threads) and assign consecutive row positions.
    Parquet vectors are read from ``vector_column`` and ids from ``id_column`` (default
    ``vector`` and ``id``).

    ``uris`` may name files, folders and glob patterns (``expand_inputs``); the files they expand
    to are the inputs, in that order, and their vectors' row positions follow it. All files must
    be non-empty and share one dimension, and either all bring their own ids or none; otherwise
    the error names the file. User ids are read only by ``ids.check_unique``.
    """
    if isinstance(uris, VectorSource):
        fmt = fmt or uris.fmt
        uris = uris.uris
    if isinstance(uris, str):
        uris = [uris]
    uris = list(uris)
    if not uris:
        raise ConfigError("no input vector files given")
    given = len(uris)
    uris = expand_inputs(uris, fmt, options)
    if len(uris) != given:
        log.info("%d input arguments expand to %d files", given, len(uris))
    seen: set[str] = set()
    for u in uris:
        if u in seen:
            raise ConfigError(f"input file listed twice: {storage.redact(u)} (its vectors would get two ids)")
        seen.add(u)
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(_PLAN_THREADS, len(uris))) as pool:
        columns = vectors.parquet_columns(vector_column, id_column)
        planned = list(pool.map(lambda u: _plan_one(u, fmt, options, columns), uris))
    inputs: list[InputFile] = []
    id_start = 0
    first = planned[0][0]
    for uri, (fi, digest, (source, ids_uri, ids_sha)) in zip(uris, planned):
        name = storage.redact(uri)
        if fi.count <= 0:
            raise VectorFormatError(name, "file holds no vectors", offset=0, row=0)
        if fi.dim != first.dim:
            raise ConfigError(f"{name}: vectors have dimension {fi.dim} but {storage.redact(uris[0])} "
                              f"has {first.dim}; all input files must share one dimension")
        inputs.append(InputFile(uri=uri, fmt=fi.fmt, count=fi.count, dim=fi.dim, dtype=fi.dtype,
                                id_start=id_start, id_stop=id_start + fi.count, header_sha256=digest,
                                ids=source, ids_uri=ids_uri, ids_sha256=ids_sha,
                                header_bytes=fi.header_bytes, record_bytes=fi.record_bytes,
                                size_bytes=fi.size_bytes, vector_column=fi.vector_column,
                                id_column=fi.id_column))
        id_start += fi.count
    ids_mod.check_same_kind(inputs)
    log.info("planned %d input files: %d vectors of dimension %d (%.1f s)",
             len(inputs), id_start, first.dim, time.time() - t0)
    return inputs


def common_dtype(inputs: Sequence[InputFile]) -> np.dtype:
    """One vector dtype for the dataset (mixed-dtype inputs are widened, e.g. uint8+float32)."""
    return np.result_type(*[np.dtype(i.dtype) for i in inputs])


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash01(ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform-looking value in [0, 1) per id, a pure function of (id, seed)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        s = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)
        z = _splitmix64(ids * _GOLDEN + s)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass
class RowSample(JsonConfig):
    """Deterministic row selection by ``u = hash01(global id, seed)``.

    ``[0, val_fraction)`` is the validation band. ``split="train"`` keeps
    ``val_fraction <= u < val_fraction + fraction``; ``split="val"`` keeps ``u < fraction`` and
    requires ``fraction <= val_fraction`` when ``val_fraction`` is set. A train sample and a val
    sample with the same seed and ``val_fraction`` are therefore disjoint, whatever the read task
    boundaries. ``split="all"`` keeps ``u < fraction``. Use ``RowSample.pair`` for both at once.
    """

    fraction: float
    seed: int = 0
    split: str = "train"
    val_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.split not in ("train", "val", "all"):
            raise ConfigError(f"RowSample.split must be 'train', 'val' or 'all', got {self.split!r}")
        if not (0.0 <= self.fraction <= 1.0 and 0.0 <= self.val_fraction <= 1.0):
            raise ConfigError(f"RowSample fractions must be in [0, 1], got fraction={self.fraction}, "
                              f"val_fraction={self.val_fraction}")
        if self.split == "train" and self.val_fraction + self.fraction > 1.0 + 1e-12:
            raise ConfigError(f"RowSample: val_fraction {self.val_fraction} + train fraction {self.fraction} > 1")
        if self.split == "val" and self.val_fraction and self.fraction > self.val_fraction:
            raise ConfigError(f"RowSample: val fraction {self.fraction} exceeds the validation band "
                              f"{self.val_fraction} (would overlap the training rows)")

    @classmethod
    def pair(cls, train_fraction: float, val_fraction: float, seed: int = 0) -> tuple["RowSample", "RowSample"]:
        """Matching (train, val) samples: disjoint, together ``train_fraction + val_fraction``."""
        return (cls(train_fraction, seed, "train", val_fraction),
                cls(val_fraction, seed, "val", val_fraction))

    def band(self) -> tuple[float, float]:
        """The [lo, hi) interval of hash values this sample keeps."""
        if self.split == "train":
            return self.val_fraction, self.val_fraction + self.fraction
        return 0.0, self.fraction

    def select(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the ids this sample keeps."""
        lo, hi = self.band()
        u = hash01(ids, self.seed)
        return (u >= lo) & (u < hi)


def sample_rows_local(inputs: Sequence[InputFile], n: int | None = None, seed: int = 0,
                      sample: RowSample | None = None, options=None, block_rows: int = 65536,
                      check_finite: bool = True, return_ids: bool = False):
    """The RowSample selection done on the driver, streaming the files in ``block_rows`` blocks.

    Keeps the rows whose hash lies in the sample's band (default: all rows, hashed with
    ``seed``; ``sample.seed`` wins when a sample is given); with ``n``, only the ``n`` rows with
    the smallest hash in that band, i.e. the same rows as a RowSample with a slightly smaller
    fraction. Rows are returned in global id order, as the common vector dtype.
    """
    if sample is None:
        sample = RowSample(fraction=1.0, seed=seed)
    if n is not None and n < 0:
        raise ConfigError(f"sample size must be >= 0, got {n}")
    lo, hi = sample.band()
    out_dtype = common_dtype(inputs)
    dim = inputs[0].dim
    keep_u: list[np.ndarray] = []
    keep_id: list[np.ndarray] = []
    keep_x: list[np.ndarray] = []
    held = 0
    total = sum(i.count for i in inputs)
    done = 0
    t0 = last = time.time()
    for inp in inputs:
        fi = inp.file_info()
        for s in range(0, inp.count, block_rows):
            e = min(inp.count, s + block_rows)
            x = vectors.read_rows(inp.uri, s, e, options=options, file_info=fi, check_finite=check_finite)
            ids = ids_mod.read(inp, s, e, options, fi)
            u = hash01(ids, sample.seed)
            m = (u >= lo) & (u < hi)
            keep_u.append(u[m])
            keep_id.append(ids[m])
            keep_x.append(x[m].astype(out_dtype, copy=False))
            held += int(m.sum())
            if n is not None and held > 2 * max(n, 1024):
                keep_u, keep_id, keep_x = _smallest(keep_u, keep_id, keep_x, n)
                held = len(keep_u[0])
            done += e - s
            now = time.time()
            if now - last > 10:
                log.info("sampling: %d/%d rows scanned (%.0f rows/s), %d kept", done, total,
                         done / (now - t0), held)
                last = now
    if n is not None:
        keep_u, keep_id, keep_x = _smallest(keep_u, keep_id, keep_x, n)
        if len(keep_id[0]) < n:
            log.warning("sample asked for %d rows but only %d are in the sample band", n, len(keep_id[0]))
    ids_all = np.concatenate(keep_id) if keep_id else np.empty(0, np.int64)
    x_all = np.concatenate(keep_x) if keep_x else np.empty((0, dim), out_dtype)
    order = np.argsort(ids_all, kind="stable")
    ids_all, x_all = ids_all[order], np.ascontiguousarray(x_all[order])
    return (x_all, ids_all) if return_ids else x_all


def _smallest(us, ids, xs, n):
    """Keep the ``n`` entries with the smallest (hash, id)."""
    u = np.concatenate(us) if us else np.empty(0)
    i = np.concatenate(ids) if ids else np.empty(0, np.int64)
    x = np.concatenate(xs) if xs else None
    if len(u) > n:
        order = np.lexsort((i, u))[:n]
        u, i, x = u[order], i[order], x[order]
    return [u], [i], [x] if x is not None else []


def band_fraction(n: int, total: int) -> float:
    """Hash-band width that holds at least ``n`` of ``total`` rows with high probability."""
    return min(1.0, (n + 5.0 * math.sqrt(n) + 16.0) / max(total, 1))
