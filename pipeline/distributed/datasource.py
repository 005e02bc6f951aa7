"""Byte-range Ray Data reads of vector files.

Ray's built-in readers make one task per file, which serialises a single billion-row file. Here
``pipeline.io.inputs.plan_inputs`` reads only headers, then ``VectorDatasource`` cuts every file into row ranges
(``rows_per_task`` rows each, never spanning two files) and each read task fetches its range with
one ranged request (``vectors.read_rows``). Every block carries:

- ``id``         int64, the vector's id (:mod:`pipeline.io.ids`)
- ``vector``     (n, d) tensor column
- ``file_index`` int32, position of the file in the input list
- ``row``        int64, row within the file

A ``RowSample`` (``pipeline.io.inputs``) given to the datasource keeps only its rows, the same
rows whatever the task boundaries. ``unwrap_ray_error`` recovers the pipeline exception (with
its file and byte offset) from Ray's task-error wrappers.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import ray.data
from ray.data import Datasource as _Datasource
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask
from ray.data.extensions import ArrowTensorArray

from pipeline.errors import ConfigError, find_pipeline_error, PipelineError, VectorFormatError
from pipeline.io import storage, vectors
from pipeline.io import ids as ids_mod
from pipeline.io.inputs import InputFile, RowSample, common_dtype

log = logging.getLogger(__name__)

# CPUs a read task requests: it reads and parses bytes, and must fit beside actors that hold most
# of the CPUs (with Ray's default of one CPU, reads wait forever beside actors of 0.75 CPU on 2 CPUs)
READ_TASK_CPUS = 0.25



def _make_block(ids, x, file_index: int, rows):
    """An Arrow table block; ``vector`` is a fixed-shape tensor column (also when empty)."""
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
        ids = ids_mod.read(inp, start, stop, options, fi)
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
        self.out_dtype = common_dtype(self.inputs).name
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
    read_kwargs.setdefault("num_cpus", READ_TASK_CPUS)
    return ray.data.read_datasource(source, **read_kwargs)


# ----------------------------------------------------------------------------------------- errors

def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The pipeline exception inside Ray's wrappers (see :func:`find_pipeline_error`), so
    callers can raise/catch the original type and message; ``exc`` itself when none is found."""
    return find_pipeline_error(exc) or exc


