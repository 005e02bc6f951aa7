"""Search results: the big-ann k-NN binary format (``read_knn_results`` / ``write_knn_results``)
and, beside it, the same results as Parquet, assembled from the query job's parts
(``assemble_results``)."""

from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import VectorFormatError
from pipeline.io import storage
from pipeline.io.storage import StorageOptions

log = logging.getLogger(__name__)


def read_knn_results(uri: str, options: StorageOptions | None = None) -> tuple[np.ndarray, np.ndarray]:
    """big-ann-benchmarks results: uint32 n, uint32 k, n*k int32 ids, n*k float32 distances."""
    name = storage.redact(uri)
    data = storage.read_bytes(uri, options)
    if len(data) < 8:
        raise VectorFormatError(name, f"file of {len(data)} bytes is too small for the 8-byte header", offset=0)
    n, k = (int(v) for v in np.frombuffer(data[:8], "<u4"))
    expected = 8 + 8 * n * k
    if len(data) != expected:
        raise VectorFormatError(name, f"header says {n} x {k} results ({expected} bytes) but file size is "
                                f"{len(data)}", offset=min(len(data), expected))
    ids = np.frombuffer(data, "<i4", n * k, 8).reshape(n, k).astype(np.int64)
    dist = np.frombuffer(data, "<f4", n * k, 8 + 4 * n * k).reshape(n, k).astype(np.float32)
    return ids, dist


def write_knn_results(uri: str, I: np.ndarray, D: np.ndarray, options: StorageOptions | None = None) -> None:  # noqa: E741
    """Write k-NN results atomically in the big-ann-benchmarks layout (ids must fit int32)."""
    I = np.asarray(I)  # noqa: E741
    D = np.asarray(D)
    if I.ndim != 2 or I.shape != D.shape:
        raise ValueError(f"I and D must be 2-D with equal shapes, got {I.shape} and {D.shape}")
    if I.size and (I.min() < -(2**31) or I.max() > 2**31 - 1):
        raise ValueError("result ids do not fit in int32")
    n, k = I.shape
    storage.write_bytes_atomic(
        uri, np.array([n, k], "<u4").tobytes() + I.astype("<i4").tobytes() + D.astype("<f4").tobytes(), options)


def _fits_int32(I: np.ndarray) -> bool:
    return not I.size or (int(I.min()) >= -(2**31) and int(I.max()) <= 2**31 - 1)


def read_results(uri: str, options=None) -> tuple[np.ndarray, np.ndarray]:
    """Results written by ``assemble_results``: the big-ann file, or its parquet copy where only that
    exists (ids beyond int32) or ``uri`` names it."""
    if not uri.endswith(".parquet") and storage.exists(uri, options):
        return read_knn_results(uri, options)
    pq_uri = uri if uri.endswith(".parquet") else uri + ".parquet"
    if not storage.exists(pq_uri, options):
        raise VectorFormatError(storage.redact(uri), "no such results file", offset=0)
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(pq_uri, options)))
        n, ids, dist = table.num_rows, table.column("ids").combine_chunks(), table.column("distances").combine_chunks()
        k = ids.type.list_size
        I = ids.flatten().to_numpy().astype(np.int64).reshape(n, k)  # noqa: E741
        D = dist.flatten().to_numpy().astype(np.float32).reshape(n, k)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise VectorFormatError(storage.redact(pq_uri), f"unreadable results file ({exc})", offset=0) from None
    return I, D


# ----------------------------------------------------------------------------- results in blocks
# A long query job writes each block of queries' results as one part file as soon as it has them,
# and assembles the result files from the parts at the end: a restarted job skips the blocks whose
# parts exist, and no step holds more than one block's results.

def write_part(uri: str, first_query: int, I: np.ndarray, D: np.ndarray, options=None) -> None:  # noqa: E741
    """One block's results (queries ``first_query ...``), written atomically."""
    buf = io.BytesIO()
    np.savez(buf, first_query=np.int64(first_query), ids=np.asarray(I, np.int64), distances=np.asarray(D, np.float32))
    storage.write_bytes_atomic(uri, buf.getvalue(), options)


def read_part(uri: str, options=None) -> tuple[int, np.ndarray, np.ndarray]:
    """``(first_query, I, D)`` of a part written by :func:`write_part`."""
    try:
        with np.load(io.BytesIO(storage.read_bytes(uri, options)), allow_pickle=False) as z:
            first, I, D = int(z["first_query"]), z["ids"], z["distances"]  # noqa: E741
    except (OSError, ValueError, KeyError) as exc:
        raise VectorFormatError(storage.redact(uri), f"unreadable results part ({exc})", offset=0) from None
    if I.ndim != 2 or I.shape != D.shape:
        raise VectorFormatError(storage.redact(uri), f"results part of shapes {I.shape} and {D.shape}", offset=0)
    return first, I, D


def assemble_results(out_uri: str, part_uris: list[str], options=None) -> list[str]:
    """The results at ``out_uri`` (big-ann k-NN format) and ``out_uri + '.parquet'``, from parts
    holding consecutive queries (in order), read one at a time; returns the URIs written. Ids
    beyond int32 (user ids) do not fit the big-ann layout: then only the parquet file is written
    (``read_results`` finds it)."""
    n, k, fits, expect = 0, None, True, 0
    for u in part_uris:  # shapes, order and the id range first: the big-ann file needs all three
        first, I, _ = read_part(u, options)  # noqa: E741
        if first != expect or (k is not None and I.shape[1] != k):
            raise VectorFormatError(storage.redact(u), f"results part for queries from {first} with {I.shape[1]} "
                                                       f"results each; expected queries from {expect}, {k} each",
                                    offset=0)
        k, n, expect = I.shape[1], n + len(I), expect + len(I)
        fits = fits and _fits_int32(I)
    k = k or 0
    written = []
    if fits:
        with storage.open_atomic(out_uri, "wb", options) as f:
            f.write(np.array([n, k], "<u4").tobytes())
            for u in part_uris:
                f.write(read_part(u, options)[1].astype("<i4").tobytes())
            for u in part_uris:
                f.write(read_part(u, options)[2].astype("<f4").tobytes())
        written.append(out_uri)
    else:
        log.warning("result ids exceed int32, which the big-ann results format holds: results are in %s only",
                    storage.redact(out_uri + ".parquet"))
    schema = pa.schema([("query", pa.int64()), ("ids", pa.list_(pa.int64(), k)),
                        ("distances", pa.list_(pa.float32(), k))])
    with storage.open_atomic(out_uri + ".parquet", "wb", options) as f:
        with pq.ParquetWriter(f, schema) as w:
            for u in part_uris:
                first, I, D = read_part(u, options)  # noqa: E741
                w.write_table(pa.table({
                    "query": pa.array(np.arange(first, first + len(I), dtype=np.int64)),
                    "ids": pa.FixedSizeListArray.from_arrays(pa.array(I.ravel().astype(np.int64)), k),
                    "distances": pa.FixedSizeListArray.from_arrays(pa.array(D.ravel().astype(np.float32)), k),
                }, schema=schema))
    return written + [out_uri + ".parquet"]
