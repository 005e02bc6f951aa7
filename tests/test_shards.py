"""Shard files: round trip, CSR offsets, validation, corruption detection."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError, PipelineError
from pipeline.errors import CorruptShardError
from pipeline.index.shards import (
    parse_shard_name, read_shard, shard_name, ShardInfo, verify_shard, write_shard,
)


def _random_shard(rng, N, M, K, nlist, id0=1000):
    list_ids_N = rng.integers(0, nlist, N).astype(np.int32)
    ids_N = (id0 + rng.permutation(N)).astype(np.int64)
    codes_NM = rng.integers(0, K, (N, M))
    return list_ids_N, ids_N, codes_NM


@pytest.mark.parametrize("K,dtype", [(256, np.uint8), (4096, np.uint16)])
def test_round_trip_sorted_with_csr_offsets(tmp_path, K, dtype):
    rng = np.random.default_rng(0)
    N, M, nlist = 700, 6, 40
    list_ids_N, ids_N, codes_NM = _random_shard(rng, N, M, K, nlist)
    list_ids_N[list_ids_N == 7] = 8  # list 7 empty
    list_ids_N[list_ids_N == nlist - 1] = 0  # last list empty
    uri = str(tmp_path / shard_name(0, 1000))
    info = write_shard(uri, list_ids_N, ids_N, codes_NM, K=K, nlist=nlist, model_sha="abc",
                       row_group_rows=128)
    assert info.name == "shard-f00000-r000000001000.parquet"
    assert (info.rows, info.id_min, info.id_max) == (N, 1000, 1000 + N - 1)
    assert info.lists == len(np.unique(list_ids_N))
    assert pq.ParquetFile(uri).metadata.num_row_groups == int(np.ceil(N / 128))

    sh = read_shard(uri, expected=info, nlist=nlist)
    assert sh.codes_NM.dtype == dtype and sh.codes_NM.shape == (N, M)
    assert sh.lut_scale_N is None
    assert sh.meta == {"format_version": 2, "M": M, "K": K, "code_dtype": np.dtype(dtype).name,
                       "nlist": nlist, "model_sha": "abc"}
    assert len(sh.list_offsets) == nlist + 1 and sh.list_offsets[0] == 0 and sh.list_offsets[-1] == N
    assert sh.list_slice(7) == slice(sh.list_offsets[7], sh.list_offsets[7])
    assert sh.list_slice(nlist - 1).stop - sh.list_slice(nlist - 1).start == 0
    by_id = {int(i): (int(l), c.tolist()) for i, l, c in zip(ids_N, list_ids_N, codes_NM)}
    for l in range(nlist):
        sl = sh.list_slice(l)
        assert np.all(sh.list_ids_N[sl] == l)
        assert np.all(np.diff(sh.ids_N[sl]) > 0)  # sorted by id within a list
        assert sl.stop - sl.start == int(np.sum(list_ids_N == l))
        for i, c in zip(sh.ids_N[sl], sh.codes_NM[sl]):
            assert by_id[int(i)] == (l, c.tolist())
    assert verify_shard(uri, info)


def test_write_is_deterministic_and_info_matches_file(tmp_path):
    rng = np.random.default_rng(1)
    args = _random_shard(rng, 50, 4, 16, 5)
    a = write_shard(str(tmp_path / "a.parquet"), *args, K=16, nlist=5, model_sha="m")
    b = write_shard(str(tmp_path / "b.parquet"), *args, K=16, nlist=5, model_sha="m")
    data = (tmp_path / "a.parquet").read_bytes()
    assert len(data) == a.bytes and (a.sha256, a.bytes) == (b.sha256, b.bytes)
    assert ShardInfo.from_json(a.to_json()) == a


@pytest.mark.parametrize("change,match", [
    (lambda l, i, c: (l, i, c[:, :0]), "at least one code"),
    (lambda l, i, c: (l[:-1], i, c), "row counts differ"),
    (lambda l, i, c: (l.astype(np.float32), i, c), "integer dtype"),
    (lambda l, i, c: (np.where(np.arange(len(l)) == 3, 5, l), i, c), r"list_ids_N.*at row 3"),
    (lambda l, i, c: (l, np.where(np.arange(len(i)) == 2, -1, i), c), "ids_N"),
    (lambda l, i, c: (l, np.where(np.arange(len(i)) == 2, i[0], i), c), "duplicate id"),
    (lambda l, i, c: (l, i, np.where(c == c[4, 1], 16, c)), "codes_NM"),
    (lambda l, i, c: (l[:0], i[:0], c[:0]), "at least one row"),
])
def test_bad_input_refused_before_writing(tmp_path, change, match):
    rng = np.random.default_rng(2)
    args = change(*_random_shard(rng, 20, 3, 16, 5))
    uri = tmp_path / "s.parquet"
    with pytest.raises(ConfigError, match=match) as ei:
        write_shard(str(uri), *args, K=16, nlist=5, model_sha="m")
    assert str(uri) in str(ei.value)
    assert not uri.exists() and list(tmp_path.iterdir()) == []


def _rewrite(uri, src, *, version=None, scale=None):
    """Copy shard ``src`` to ``uri`` as parquet with its metadata's format version and its
    ``lut_scale`` column replaced (``scale``: an Arrow array, or "drop")."""
    import pyarrow as pa

    t = pq.read_table(src)
    meta = dict(t.schema.metadata)
    if version is not None:
        meta[b"qinco.format_version"] = str(version).encode()
    if isinstance(scale, str):
        t = t.drop_columns(["lut_scale"])
    elif scale is not None:
        t = t.set_column(t.column_names.index("lut_scale"), "lut_scale", scale)
    pq.write_table(t.replace_schema_metadata(meta), uri)
    return uri


def test_lut_scale_column_round_trip_and_format_versions(tmp_path):
    import pyarrow as pa

    rng = np.random.default_rng(5)
    N, nlist = 300, 12
    list_ids_N, ids_N, codes_NM = _random_shard(rng, N, 4, 256, nlist)
    scale_N = rng.uniform(0.5, 1.5, N)
    uri = str(tmp_path / "s.parquet")
    info = write_shard(uri, list_ids_N, ids_N, codes_NM, K=256, nlist=nlist, model_sha="m", lut_scale_N=scale_N)
    sh = read_shard(uri, expected=info, nlist=nlist)
    assert sh.meta["format_version"] == 2 and sh.lut_scale_N.dtype == np.float16
    # each row keeps its own scale through the (list, id) sort, rounded to float16
    want = dict(zip(ids_N.tolist(), scale_N.astype(np.float16).tolist()))
    assert [want[i] for i in sh.ids_N.tolist()] == sh.lut_scale_N.tolist()
    # the column costs 2 bytes per row, uncompressible
    plain = write_shard(str(tmp_path / "p.parquet"), list_ids_N, ids_N, codes_NM, K=256, nlist=nlist, model_sha="m")
    assert 2 * N <= info.bytes - plain.bytes <= 2 * N + 400

    # a format-1 shard (written before the column existed) still reads, without scales
    v1 = _rewrite(str(tmp_path / "v1.parquet"), uri, version=1, scale="drop")
    old = read_shard(v1, nlist=nlist)
    assert old.lut_scale_N is None and old.meta["format_version"] == 1
    np.testing.assert_array_equal(old.codes_NM, sh.codes_NM)
    # format 1 never had the column; versions above 2 are refused
    with pytest.raises(CorruptShardError, match="schema"):
        read_shard(_rewrite(str(tmp_path / "bad1.parquet"), uri, version=1), nlist=nlist)
    with pytest.raises(CorruptShardError, match="version 3") as ei:
        read_shard(_rewrite(str(tmp_path / "v3.parquet"), uri, version=3))
    assert "v3.parquet" in str(ei.value)
    # a NaN or a wrong type in the column is corruption, named with the row
    bad = sh.lut_scale_N.copy()
    bad[17] = np.nan
    with pytest.raises(CorruptShardError, match="lut_scale is NaN or infinite at row 17"):
        read_shard(_rewrite(str(tmp_path / "nan.parquet"), uri, scale=pa.array(bad, pa.float16())))
    with pytest.raises(CorruptShardError, match="schema"):
        read_shard(_rewrite(str(tmp_path / "f32.parquet"), uri, scale=pa.array(bad.astype(np.float32))))


@pytest.mark.parametrize("scale,match", [
    (lambda N: np.ones(N - 1), r"shape \(20,\)"),
    (lambda N: np.arange(N), "float array"),
    (lambda N: np.where(np.arange(N) == 6, np.nan, 1.0), "at row 6"),
    (lambda N: np.where(np.arange(N) == 2, 1e6, 1.0), "out of float16 range at row 2"),
])
def test_bad_lut_scales_refused_before_writing(tmp_path, scale, match):
    rng = np.random.default_rng(6)
    uri = tmp_path / "s.parquet"
    with pytest.raises(ConfigError, match=match):
        write_shard(str(uri), *_random_shard(rng, 20, 3, 16, 5), K=16, nlist=5, model_sha="m", lut_scale_N=scale(20))
    assert list(tmp_path.iterdir()) == []


def test_corrupt_bytes_detected_and_named(tmp_path):
    rng = np.random.default_rng(3)
    uri = str(tmp_path / shard_name(2, 0))
    info = write_shard(uri, *_random_shard(rng, 100, 8, 256, 10), K=256, nlist=10, model_sha="m")
    data = bytearray(open(uri, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(uri, "wb").write(bytes(data))
    assert not verify_shard(uri, info)
    with pytest.raises(CorruptShardError, match="sha256") as ei:
        read_shard(uri, expected=info)
    assert uri in str(ei.value) and isinstance(ei.value, PipelineError)
    # without a manifest entry, a truncated file is still caught by the parser
    open(uri, "wb").write(bytes(data[: len(data) // 3]))
    with pytest.raises(CorruptShardError, match="unreadable") as ei:
        read_shard(uri)
    assert uri in str(ei.value)
    # a shard missing altogether
    missing = str(tmp_path / shard_name(3, 0))
    assert not verify_shard(missing, info)
    with pytest.raises(CorruptShardError, match="missing") as ei:
        read_shard(missing, expected=info)
    assert missing in str(ei.value)


def test_wrong_manifest_entry_or_nlist_detected(tmp_path):
    rng = np.random.default_rng(4)
    uri = str(tmp_path / "s.parquet")
    info = write_shard(uri, *_random_shard(rng, 30, 2, 300, 4), K=300, nlist=4, model_sha="m")
    with pytest.raises(CorruptShardError, match="size"):
        read_shard(uri, expected=info.replace(bytes=info.bytes + 1))
    with pytest.raises(CorruptShardError, match="rows"):
        read_shard(uri, expected=info.replace(rows=31))
    with pytest.raises(CorruptShardError, match="nlist"):
        read_shard(uri, nlist=8)
    assert not verify_shard(uri, info.replace(sha256="0" * 64))


def test_foreign_parquet_refused(tmp_path):
    import pyarrow as pa

    uri = str(tmp_path / "x.parquet")
    pq.write_table(pa.table({"list_id": pa.array([0], pa.int32())}), uri)
    with pytest.raises(CorruptShardError, match="metadata"):
        read_shard(uri)


def test_shard_names():
    assert shard_name(3, 1_000_000) == "shard-f00003-r000001000000.parquet"
    assert parse_shard_name("shards/" + shard_name(12, 345)) == (12, 345)
    names = [shard_name(f, r) for f in (0, 1, 10) for r in (0, 9, 100)]
    assert names == sorted(names)
    for bad in [(-1, 0), (0, -5), (100_000, 0)]:
        with pytest.raises(ConfigError):
            shard_name(*bad)
    with pytest.raises(ConfigError):
        parse_shard_name("shard-1-2.parquet")
