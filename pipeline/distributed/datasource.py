"""Byte-range Ray Data reads of vector files, and deterministic row sampling.

Ray's built-in readers make one task per file, which serialises a single billion-row file. Here
``plan_inputs`` reads only headers, then ``VectorDatasource`` cuts every file into row ranges
(``rows_per_task`` rows each, never spanning two files) and each read task fetches its range with
one ranged request (``vectors.read_rows``). Every block carries:

- ``id``         int64, global id: the file's ``id_start`` + row (or the parquet ``id`` column)
- ``vector``     (n, d) tensor column
- ``file_index`` int32, position of the file in the input list
- ``row``        int64, row within the file

``RowSample`` selects rows by a hash of (global id, seed), so train/validation splits are
disjoint and identical whatever the task boundaries; ``sample_rows_local`` performs the same
selection on the driver without Ray. ``unwrap_ray_error`` recovers the pipeline exception (with
its file and byte offset) from Ray's task-error wrappers.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from pipeline.io import storage, vectors
from pipeline.config import JsonConfig
from pipeline.errors import ConfigError, PipelineError, VectorFormatError

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

log = logging.getLogger(__name__)

PROVENANCE_BYTES = 65536  # bytes hashed at each end of a file for header_sha256
# CPUs a read task requests: it reads and parses bytes, and must fit beside actors that hold most
# of the CPUs (with Ray's default of one CPU, reads wait forever beside actors of 0.75 CPU on 2 CPUs)
READ_TASK_CPUS = 0.25
_PLAN_THREADS = 16


# ----------------------------------------------------------------------------------------- inputs

@dataclass
class VectorSource(JsonConfig):
    """What a job reads: an ordered list of vector files (ids are numbered in this order)."""

    uris: list[str]
    fmt: str | None = None


@dataclass
class InputFile(JsonConfig):
    """One planned input file: layout from its headers plus its global id range.

    ``header_sha256`` hashes the file size and its first and last ``PROVENANCE_BYTES`` bytes
    (headers, parquet footer), so a replaced or truncated file is detected cheaply.
    """

    uri: str
    fmt: str
    count: int
    dim: int
    dtype: str
    id_start: int
    id_stop: int
    header_sha256: str
    header_bytes: int = 0
    record_bytes: int = 0
    size_bytes: int = 0

    def file_info(self) -> vectors.VectorFileInfo:
        """The ``vectors`` layout, so range reads need no extra header request."""
        return vectors.VectorFileInfo(
            uri=storage.redact(self.uri), fmt=self.fmt, count=self.count, dim=self.dim, dtype=self.dtype,
            header_bytes=self.header_bytes, record_bytes=self.record_bytes, size_bytes=self.size_bytes)


def _provenance_hash(uri: str, size: int, options) -> str:
    h = hashlib.sha256(f"size={size};".encode())
    head = min(size, PROVENANCE_BYTES)
    h.update(storage.read_bytes(uri, options, 0, head))
    if size > head:
        h.update(storage.read_bytes(uri, options, max(head, size - PROVENANCE_BYTES), size))
    return h.hexdigest()


def _plan_one(uri: str, fmt: str | None, options) -> tuple[vectors.VectorFileInfo, str]:
    fi = vectors.info(uri, fmt, options)
    return fi, _provenance_hash(uri, fi.size_bytes, options)


def plan_inputs(uris: Sequence[str] | VectorSource, fmt: str | None = None, options=None) -> list[InputFile]:
    """Read every file's header (in parallel threads) and assign consecutive global id ranges.

    All files must be non-empty and share one dimension; otherwise the error names the file.
    """
    if isinstance(uris, VectorSource):
        fmt = fmt or uris.fmt
        uris = uris.uris
    if isinstance(uris, str):
        uris = [uris]
    uris = list(uris)
    if not uris:
        raise ConfigError("no input vector files given")
    seen: set[str] = set()
    for u in uris:
        if u in seen:
            raise ConfigError(f"input file listed twice: {storage.redact(u)} (its vectors would get two ids)")
        seen.add(u)
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(_PLAN_THREADS, len(uris))) as pool:
        planned = list(pool.map(lambda u: _plan_one(u, fmt, options), uris))
    inputs: list[InputFile] = []
    id_start = 0
    first = planned[0][0]
    for uri, (fi, digest) in zip(uris, planned):
        name = storage.redact(uri)
        if fi.count <= 0:
            raise VectorFormatError(name, "file holds no vectors", offset=0, row=0)
        if fi.dim != first.dim:
            raise ConfigError(f"{name}: vectors have dimension {fi.dim} but {storage.redact(uris[0])} "
                              f"has {first.dim}; all input files must share one dimension")
        inputs.append(InputFile(uri=uri, fmt=fi.fmt, count=fi.count, dim=fi.dim, dtype=fi.dtype,
                                id_start=id_start, id_stop=id_start + fi.count, header_sha256=digest,
                                header_bytes=fi.header_bytes, record_bytes=fi.record_bytes,
                                size_bytes=fi.size_bytes))
        id_start += fi.count
    log.info("planned %d input files: %d vectors of dimension %d (%.1f s)",
             len(inputs), id_start, first.dim, time.time() - t0)
    return inputs


def _common_dtype(inputs: Sequence[InputFile]) -> np.dtype:
    """One vector dtype for the dataset (mixed-dtype inputs are widened, e.g. uint8+float32)."""
    return np.result_type(*[np.dtype(i.dtype) for i in inputs])


# ----------------------------------------------------------------------------------------- sampling

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


# ----------------------------------------------------------------------------------------- read tasks

def _ids_for(inp: InputFile, start: int, stop: int, options, fi) -> np.ndarray:
    ids = vectors.read_ids(inp.uri, start, stop, options=options, file_info=fi) if inp.fmt == "parquet" else None
    if ids is None:
        return np.arange(inp.id_start + start, inp.id_start + stop, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.shape != (stop - start,):
        raise VectorFormatError(fi.uri, f"id column has {ids.shape[0]} values for {stop - start} rows", row=start)
    return ids


def _make_block(ids, x, file_index: int, rows):
    """An Arrow table block; ``vector`` is a fixed-shape tensor column (also when empty)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    return pa.table({
        "id": pa.array(np.ascontiguousarray(ids, dtype=np.int64)),
        "vector": ArrowTensorArray.from_numpy(np.ascontiguousarray(x)),
        "file_index": pa.array(np.full(len(ids), file_index, dtype=np.int32)),
        "row": pa.array(np.ascontiguousarray(rows, dtype=np.int64)),
    })


def _read_range(inp: InputFile, file_index: int, start: int, stop: int, options, sample: RowSample | None,
                check_finite: bool, on_error: str, out_dtype: str) -> list:
    """Body of one read task: rows [start, stop) of one file as one block."""
    fi = inp.file_info()
    try:
        x = vectors.read_rows(inp.uri, start, stop, options=options, file_info=fi, check_finite=check_finite)
        if x.shape != (stop - start, inp.dim):
            raise VectorFormatError(fi.uri, f"read {x.shape} for rows [{start}, {stop}), expected "
                                    f"({stop - start}, {inp.dim})", row=start)
        ids = _ids_for(inp, start, stop, options, fi)
    except PipelineError as exc:
        if on_error != "skip":
            raise
        log.warning("skipping rows [%d, %d) of %s: %s", start, stop, fi.uri, exc)
        return [_make_block(np.empty(0, np.int64), np.empty((0, inp.dim), out_dtype), file_index,
                            np.empty(0, np.int64))]
    rows = np.arange(start, stop, dtype=np.int64)
    if sample is not None:
        keep = sample.select(ids)
        ids, x, rows = ids[keep], x[keep], rows[keep]
    return [_make_block(ids, x.astype(out_dtype, copy=False), file_index, rows)]


def split_ranges(inputs: Sequence[InputFile], rows_per_task: int) -> list[tuple[int, int, int]]:
    """(file_index, start, stop) ranges of at most ``rows_per_task`` rows, in file then row order."""
    if rows_per_task <= 0:
        raise ConfigError(f"rows_per_task must be positive, got {rows_per_task}")
    return [(fi, s, min(inp.count, s + rows_per_task))
            for fi, inp in enumerate(inputs) for s in range(0, inp.count, rows_per_task)]


try:
    from ray.data import Datasource as _Datasource
except ImportError:  # pragma: no cover - ray is a hard dependency
    _Datasource = object  # type: ignore[misc,assignment]


class VectorDatasource(_Datasource):
    """Ray Data source with one byte-range read task per row range of each input file.

    ``ranges`` (list of (file_index, start, stop)) restricts the read to given ranges, each one
    task; otherwise each file is cut into ``rows_per_task``-row ranges (``rows_per_task=None``:
    sized from Ray's requested parallelism). ``on_error="skip"`` turns a bad range into an empty
    block and a warning (callers must report it); the default re-raises the VectorFormatError.
    """

    def __init__(self, inputs: list[InputFile], rows_per_task: int | None = 65536, options=None,
                 sample: RowSample | None = None, check_finite: bool = True,
                 ranges: Iterable[tuple[int, int, int]] | None = None, on_error: str = "raise"):
        super().__init__()
        if not inputs:
            raise ConfigError("VectorDatasource needs at least one input file")
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if rows_per_task is not None and rows_per_task <= 0:
            raise ConfigError(f"rows_per_task must be positive, got {rows_per_task}")
        self.inputs = list(inputs)
        self.rows_per_task = rows_per_task
        self.options = options
        self.sample = sample
        self.check_finite = check_finite
        self.on_error = on_error
        self.out_dtype = _common_dtype(self.inputs).name
        self.ranges = None
        if ranges is not None:
            self.ranges = [tuple(int(v) for v in r) for r in ranges]
            for fi, s, e in self.ranges:
                if not (0 <= fi < len(self.inputs) and 0 <= s < e <= self.inputs[fi].count):
                    raise ConfigError(f"range (file {fi}, rows [{s}, {e})) is outside the inputs")

    def _row_bytes(self, inp: InputFile) -> int:
        return inp.dim * np.dtype(self.out_dtype).itemsize + 8 + 4 + 8

    def _ranges(self, parallelism: int) -> list[tuple[int, int, int]]:
        if self.ranges is not None:
            return list(self.ranges)
        rows = self.rows_per_task
        if rows is None:
            total = sum(i.count for i in self.inputs)
            rows = max(1, math.ceil(total / max(1, parallelism)))
        return split_ranges(self.inputs, rows)

    def estimate_inmemory_data_size(self) -> int | None:
        if self.ranges is not None:
            n = {fi: 0 for fi in range(len(self.inputs))}
            for fi, s, e in self.ranges:
                n[fi] += e - s
            total = sum(n[fi] * self._row_bytes(inp) for fi, inp in enumerate(self.inputs))
        else:
            total = sum(inp.count * self._row_bytes(inp) for inp in self.inputs)
        frac = 1.0 if self.sample is None else self.sample.band()[1] - self.sample.band()[0]
        return int(total * frac)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        frac = 1.0 if self.sample is None else self.sample.band()[1] - self.sample.band()[0]
        tasks = []
        for fi, s, e in self._ranges(parallelism):
            inp = self.inputs[fi]
            n = e - s
            meta = BlockMetadata(
                num_rows=n if self.sample is None else None,
                size_bytes=int(n * frac * self._row_bytes(inp)),
                input_files=[storage.redact(inp.uri)],
                exec_stats=None,
            )
            fn = _ReadFn(inp, fi, s, e, self.options, self.sample, self.check_finite, self.on_error,
                         self.out_dtype)
            tasks.append(ReadTask(fn, meta, per_task_row_limit=per_task_row_limit))
        return tasks


class _ReadFn:
    """Picklable read-task body (a plain object, so no closure over the datasource)."""

    def __init__(self, *args):
        self.args = args

    def __call__(self) -> list:
        return _read_range(*self.args)


def read_source(source: "VectorDatasource", **read_kwargs) -> "ray.data.Dataset":
    """``ray.data.read_datasource`` whose read tasks ask for ``READ_TASK_CPUS`` unless told
    (``read_kwargs``: num_cpus, override_num_blocks, ...)."""
    import ray.data

    read_kwargs.setdefault("num_cpus", READ_TASK_CPUS)
    return ray.data.read_datasource(source, **read_kwargs)


def read_vectors_dataset(uris: Sequence[str] | VectorSource, fmt: str | None = None, rows_per_task: int = 65536,
                         options=None, sample: RowSample | None = None, override_num_blocks: int | None = None,
                         check_finite: bool = True, inputs: list[InputFile] | None = None,
                         **read_kwargs) -> "ray.data.Dataset":
    """A Ray Dataset of the vectors of ``uris`` (columns id, vector, file_index, row).

    ``override_num_blocks`` sets ``rows_per_task`` so the read makes about that many tasks
    (at least one per file). ``read_kwargs`` go to :func:`read_source` (num_cpus, ...).
    """
    if inputs is None:
        inputs = plan_inputs(uris, fmt=fmt, options=options)
    if override_num_blocks:
        total = sum(i.count for i in inputs)
        rows_per_task = max(1, math.ceil(total / override_num_blocks))
    source = VectorDatasource(inputs, rows_per_task=rows_per_task, options=options, sample=sample,
                              check_finite=check_finite)
    return read_source(source, **read_kwargs)


# ----------------------------------------------------------------------------------------- driver-side sample

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
    out_dtype = _common_dtype(inputs)
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
            ids = _ids_for(inp, s, e, options, fi)
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


# ----------------------------------------------------------------------------------------- errors

def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The pipeline exception inside Ray's wrappers (``RayTaskError(...)``, ``cause``,
    ``__cause__`` chains), so callers can raise/catch the original type and message; ``exc``
    itself when none is found."""
    try:
        from ray.exceptions import RayError
    except ImportError:  # pragma: no cover
        RayError = ()  # type: ignore[assignment]
    stack: list[BaseException] = [exc]
    seen: set[int] = set()
    while stack:
        e = stack.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PipelineError) and not isinstance(e, RayError):
            return e
        stack.extend(c for c in (getattr(e, "cause", None), e.__cause__, e.__context__)
                     if isinstance(c, BaseException))
    return exc


__all__ = [
    "InputFile", "RowSample", "VectorDatasource", "VectorSource", "hash01", "plan_inputs",
    "read_source", "read_vectors_dataset", "sample_rows_local", "split_ranges", "unwrap_ray_error",
]
