"""The ids of an input file's vectors: row numbers, or the user's own.

A vector's id is what search returns for it. Three sources, chosen per file when a job is planned
and recorded in the manifest (``InputEntry.ids``):

- ``rows``:   the file's ``id_start`` + the row number (files are numbered one after the other);
- ``column``: a parquet file's ``id`` column;
- ``file``:   an ids file beside the vector file, named ``<vector file>.ids.npy``: a 1-D ``.npy``
  array of integers, one per vector.

User ids (``column`` or ``file``) are any unique integers in ``[0, 2**63)``: -1 marks a missing
result in search output, as in Faiss. ``check_unique`` reads every id of a job's inputs before any
encoding and names the file and row of the first non-integer, negative or repeated id.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from pipeline.errors import ConfigError, VectorFormatError
from pipeline.io import storage, vectors

log = logging.getLogger(__name__)

ROWS, COLUMN, FILE = "rows", "column", "file"
SOURCES = (ROWS, COLUMN, FILE)
IDS_FILE_SUFFIX = ".ids.npy"
_CHECK_BLOCK = 1 << 20  # ids read per request by check_unique


def ids_file_uri(vector_uri: str) -> str:
    """Where the ids of a non-parquet vector file are looked for."""
    return str(vector_uri) + IDS_FILE_SUFFIX


def detect(uri: str, fmt: str, count: int, options=None,
           id_column: str = vectors.PARQUET_ID_COLUMN) -> tuple[str, str | None]:
    """``(source, ids file URI or None)`` for one vector file of ``count`` vectors (a parquet
    file's ids are its column ``id_column`` when it has one)."""
    if fmt == "parquet":
        return (COLUMN, None) if vectors.parquet_has_ids(uri, options, id_column) else (ROWS, None)
    side = ids_file_uri(uri)
    if not storage.exists(side, options):
        return ROWS, None
    fi = vectors.id_file_info(side, options)
    if fi.count != count:
        raise VectorFormatError(storage.redact(side), f"holds {fi.count} ids but {storage.redact(uri)} holds "
                                f"{count} vectors", offset=0)
    return FILE, side


def _checked(values: np.ndarray, name: str, start: int) -> np.ndarray:
    """``values`` as int64 after checking they are integers in [0, 2**63)."""
    if values.dtype.kind not in "iu":
        bad = np.flatnonzero(values != np.floor(values)) if values.dtype.kind == "f" else np.zeros(1, np.int64)
        row = start + int(bad[0]) if len(bad) else start
        raise VectorFormatError(name, f"ids must be integers, the id column has type {values.dtype.name}"
                                + (f" (value {values[row - start].item()!r})" if len(values) else ""), row=row)
    if values.dtype == np.uint64:
        big = np.flatnonzero(values > np.uint64(np.iinfo(np.int64).max))
        if len(big):
            raise VectorFormatError(name, f"id {int(values[big[0]])} does not fit in int64", row=start + int(big[0]))
    ids = values.astype(np.int64, copy=False)
    neg = np.flatnonzero(ids < 0)
    if len(neg):
        raise VectorFormatError(name, f"negative id {int(ids[neg[0]])} (ids must be >= 0; -1 marks a missing "
                                f"search result)", row=start + int(neg[0]))
    return ids


def read(inp, start: int, stop: int, options=None, file_info=None) -> np.ndarray:
    """The int64 ids of rows ``[start, stop)`` of a planned input (an ``InputEntry``)."""
    source = getattr(inp, "ids", ROWS)
    if source == ROWS:
        return np.arange(inp.id_start + start, inp.id_start + stop, dtype=np.int64)
    if source == COLUMN:
        raw = vectors.read_ids(inp.uri, start, stop, options=options, file_info=file_info)
        if raw is None:
            raise VectorFormatError(storage.redact(inp.uri), "the manifest records an id column but the "
                                    "file has none (was it replaced?)", offset=0)
        name = storage.redact(inp.uri)
    elif source == FILE:
        raw = vectors.read_id_file(inp.ids_uri, start, stop, options=options)
        name = storage.redact(inp.ids_uri)
    else:
        raise ConfigError(f"{storage.redact(inp.uri)}: unknown id source {source!r} (expected {SOURCES})")
    if raw.shape != (stop - start,):
        raise VectorFormatError(name, f"{raw.shape[0]} ids for {stop - start} rows", row=start)
    return _checked(raw, name, start)


def check_same_kind(inputs: Sequence) -> None:
    """Either every input brings its own ids or none does (row numbers could collide with them)."""
    own = [i for i in inputs if i.ids != ROWS]
    if own and len(own) != len(inputs):
        plain = next(i for i in inputs if i.ids == ROWS)
        raise ConfigError(
            f"{storage.redact(own[0].uri)} brings its own ids but {storage.redact(plain.uri)} does not "
            f"(no parquet 'id' column, no {IDS_FILE_SUFFIX} file beside it): give every input ids, or none")


def check_unique(inputs: Sequence, options=None) -> int:
    """Read every user id of ``inputs`` and refuse a non-integer, negative or repeated one, naming
    the file and row; returns the number of ids checked (0 when the inputs use row numbers).

    Files whose ids increase are checked as they stream (memory per file, not per id); otherwise
    all ids are sorted in memory (8 bytes per vector).
    """
    if not inputs or all(i.ids == ROWS for i in inputs):
        return 0
    t0 = time.time()
    spans: list[tuple[int, int, int]] = []  # (first id, last id, input) of files with increasing ids
    unsorted: list[int] = []
    for k, inp in enumerate(inputs):
        fi = inp.file_info() if hasattr(inp, "file_info") else None
        prev, first = None, None
        increasing = True
        for s in range(0, inp.count, _CHECK_BLOCK):
            ids = read(inp, s, min(inp.count, s + _CHECK_BLOCK), options, fi)
            if first is None:
                first = int(ids[0])
            steps = np.diff(ids)
            if (prev is not None and ids[0] <= prev) or (steps <= 0).any():
                increasing = False
            prev = int(ids[-1])
        if increasing:
            spans.append((first, prev, k))
        else:
            unsorted.append(k)
    spans.sort()
    for (a0, a1, ka), (b0, b1, kb) in zip(spans, spans[1:]):
        if b0 <= a1:  # ranges overlap: find the repeated id the slow way
            unsorted += [ka, kb]
    if unsorted:
        _find_repeat(inputs, sorted(set(unsorted)), spans, options)
    n = sum(i.count for i in inputs)
    log.info("checked %d user ids of %d files: integers, >= 0, unique (%.1f s)", n, len(inputs), time.time() - t0)
    return n


def _find_repeat(inputs: Sequence, suspects: list[int], spans, options) -> None:
    """Sort the ids of the ``suspects`` inputs (plus any span overlapping them) and raise on the
    first id that occurs twice, naming both places."""
    ids, where_file, where_row = [], [], []
    for k in suspects:
        inp = inputs[k]
        fi = inp.file_info() if hasattr(inp, "file_info") else None
        for s in range(0, inp.count, _CHECK_BLOCK):
            e = min(inp.count, s + _CHECK_BLOCK)
            ids.append(read(inp, s, e, options, fi))
            where_file.append(np.full(e - s, k, np.int32))
            where_row.append(np.arange(s, e, dtype=np.int64))
    if len(suspects) < len(inputs):
        log.info("ids of %d of %d files are not increasing: checking them in memory", len(suspects), len(inputs))
    lo_hi = [(int(x.min()), int(x.max())) for x in ids]
    lo, hi = min(a for a, _ in lo_hi), max(b for _, b in lo_hi)
    all_ids = np.concatenate(ids)
    files = np.concatenate(where_file)
    rows = np.concatenate(where_row)
    order = np.argsort(all_ids, kind="stable")
    sorted_ids = all_ids[order]
    rep = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if len(rep):
        a, b = order[rep[0]], order[rep[0] + 1]
        _raise_repeat(inputs, int(sorted_ids[rep[0]]), int(files[a]), int(rows[a]), int(files[b]), int(rows[b]))
    # the increasing files outside the suspects can still hold one of these ids
    suspect_set = set(suspects)
    for first, last, k in spans:
        if k in suspect_set or last < lo or first > hi:
            continue
        inp = inputs[k]
        fi = inp.file_info() if hasattr(inp, "file_info") else None
        for s in range(0, inp.count, _CHECK_BLOCK):
            other = read(inp, s, min(inp.count, s + _CHECK_BLOCK), options, fi)
            pos = np.clip(np.searchsorted(sorted_ids, other), 0, len(sorted_ids) - 1)
            hit = np.flatnonzero(sorted_ids[pos] == other)
            if len(hit):
                j = order[pos[hit[0]]]
                _raise_repeat(inputs, int(other[hit[0]]), int(files[j]), int(rows[j]), k, s + int(hit[0]))


def _raise_repeat(inputs, value: int, fa: int, ra: int, fb: int, rb: int) -> None:
    (fa, ra), (fb, rb) = sorted([(fa, ra), (fb, rb)])
    def name(k):
        inp = inputs[k]
        return storage.redact(inp.ids_uri if inp.ids == FILE else inp.uri)
    first = f"row {ra}" + ("" if fa == fb else f" of {name(fa)}")
    raise VectorFormatError(name(fb), f"id {value} is repeated (first at {first}); ids must be unique", row=rb)
