"""The codes file written by ``qinco encode`` and read by ``qinco decode``.

Layout: one Parquet file, written atomically, with columns

- ``id``: int64, the row number of the vector in the input file (or caller-given ids)
- ``list_id``: int32, the IVF list of the vector, ``-1`` for a model without IVF
- ``codes``: ``fixed_size_list<uint8>[M]`` (K <= 256) or ``fixed_size_list<uint16>[M]``

and schema key-value metadata under key ``qinco.codes``: a JSON object
``{"format": "qinco-codes", "format_version": 1, "M", "K", "count", "model": <model_identity>,
"code_version": {...}, ...caller's extra keys (e.g. "source")}``.

Public API:

- ``write_codes(uri, codes_NM, K, list_ids_N=None, ids_N=None, model=None, extra=None,
  options=None, row_group_rows=65536) -> dict`` (the metadata written)
- ``read_codes(uri, options=None) -> CodesData`` (``ids``, ``list_ids`` or None, ``codes``,
  ``meta``); a malformed file raises ``VectorFormatError`` naming it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.codec.codes import code_dtype
from pipeline.config import code_version
from pipeline.errors import ConfigError, VectorFormatError
from pipeline.io import storage

FORMAT = "qinco-codes"
FORMAT_VERSION = 1
META_KEY = b"qinco.codes"


@dataclass
class CodesData:
    """Contents of a codes file."""

    ids: np.ndarray               # int64 (N,)
    list_ids: np.ndarray | None   # int64 (N,), None without IVF
    codes: np.ndarray             # uint8/uint16 (N, M)
    meta: dict[str, Any]


def write_codes(uri: str, codes_NM: np.ndarray, K: int, list_ids_N: np.ndarray | None = None,
                ids_N: np.ndarray | None = None, model: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None, options: storage.StorageOptions | None = None,
                row_group_rows: int = 65536) -> dict[str, Any]:
    """Write codes (and list ids / ids) to a Parquet file at ``uri`` atomically."""
    codes = np.asarray(codes_NM)
    if codes.ndim != 2:
        raise ConfigError(f"codes must be a 2-d array, got shape {codes.shape}")
    N, M = codes.shape
    dtype = code_dtype(K)
    if codes.size and (codes.min() < 0 or codes.max() >= K):
        raise ConfigError(f"code values must be in [0, {K})")
    codes = np.ascontiguousarray(codes, dtype=dtype)
    ids = np.arange(N, dtype=np.int64) if ids_N is None else np.asarray(ids_N, dtype=np.int64)
    lids = np.full(N, -1, dtype=np.int32) if list_ids_N is None else np.asarray(list_ids_N, dtype=np.int32)
    if ids.shape != (N,) or lids.shape != (N,):
        raise ConfigError(f"ids/list ids must have shape ({N},)")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "M": int(M), "K": int(K), "count": int(N),
            "model": model or {}, "code_version": code_version()}
    meta.update(extra or {})
    codes_arr = pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1)), M)
    table = pa.table({"id": pa.array(ids), "list_id": pa.array(lids), "codes": codes_arr})
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    with storage.open_atomic(uri, "wb", options) as f:
        pq.write_table(table, f, row_group_size=row_group_rows)
    return meta


def read_codes(uri: str, options: storage.StorageOptions | None = None) -> CodesData:
    """Read a codes file written by :func:`write_codes`."""
    name = storage.redact(uri)
    data = storage.read_bytes(uri, options)
    try:
        pf = pq.ParquetFile(io.BytesIO(data))
        table = pf.read()
    except (pa.ArrowException, OSError) as e:
        raise VectorFormatError(name, f"not a readable Parquet codes file ({e})") from e
    raw_meta = (table.schema.metadata or {}).get(META_KEY)
    if raw_meta is None:
        raise VectorFormatError(name, "missing qinco.codes metadata (not written by qinco encode?)")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as e:
        raise VectorFormatError(name, f"corrupt qinco.codes metadata ({e})") from e
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise VectorFormatError(name, f"unsupported codes format {meta.get('format')!r} "
                                      f"version {meta.get('format_version')!r}")
    for col in ("id", "list_id", "codes"):
        if col not in table.column_names:
            raise VectorFormatError(name, f"missing column {col!r}")
    M, K, N = int(meta["M"]), int(meta["K"]), table.num_rows
    col = table.column("codes").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type) or col.type.list_size != M:
        raise VectorFormatError(name, f"column 'codes' has type {col.type}, expected fixed_size_list[{M}]")
    codes = col.flatten().to_numpy(zero_copy_only=False).reshape(N, M)
    if codes.size and int(codes.max()) >= K:
        row = int(np.argmax((codes >= K).any(1)))
        raise VectorFormatError(name, f"code value out of range for K={K}", row=row)
    ids = table.column("id").to_numpy().astype(np.int64)
    lids = table.column("list_id").to_numpy().astype(np.int64)
    list_ids = None if (N == 0 or (lids < 0).all()) else lids
    if list_ids is not None and (lids < 0).any():
        raise VectorFormatError(name, "negative list id mixed with valid ones",
                                row=int(np.argmax(lids < 0)))
    return CodesData(ids=ids, list_ids=list_ids, codes=codes, meta=meta)
