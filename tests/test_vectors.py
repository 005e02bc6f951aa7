"""Vector file formats: round trips (local and S3), ranged reads, and every malformed-input error."""

from __future__ import annotations

import numpy as np
import pytest
import pyarrow as pa

from pipeline.io import results
from pipeline.io import storage, vectors
from pipeline.errors import ConfigError, StorageError, VectorFormatError

N, D = 37, 5


def _data(fmt: str, rng: np.random.Generator) -> np.ndarray:
    if fmt in ("bvecs", "u8bin"):
        return rng.integers(0, 256, (N, D)).astype(np.uint8)
    if fmt == "i8bin":
        return rng.integers(-128, 128, (N, D)).astype(np.int8)
    if fmt in ("ivecs", "ibin"):
        return rng.integers(-(2**31), 2**31 - 1, (N, D)).astype(np.int32)
    return rng.standard_normal((N, D)).astype(np.float32)


class _CountingReads:
    """Records the byte ranges fetched through storage.read_bytes and fs.open reads."""

    def __init__(self, monkeypatch):
        self.ranges: list[tuple[int | None, int | None, int]] = []
        orig = storage.read_bytes

        def counted(uri, options=None, start=None, end=None):
            out = orig(uri, options, start, end)
            self.ranges.append((start, end, len(out)))
            return out

        monkeypatch.setattr(storage, "read_bytes", counted)

    @property
    def total(self) -> int:
        return sum(n for _, _, n in self.ranges)


def _roundtrip(base: str, fmt: str, options=None) -> None:
    rng = np.random.default_rng(hash(fmt) % 1000)
    x = _data(fmt, rng)
    ids = np.arange(1000, 1000 + N, dtype=np.int64) if fmt == "parquet" else None
    uri = storage.join(base, f"rt.{fmt}")
    fi = vectors.write_vectors(uri, x, options=options, ids=ids, parquet_row_group_rows=8)
    assert (fi.fmt, fi.count, fi.dim) == (fmt, N, D)
    assert np.dtype(fi.dtype) == x.dtype
    assert fi.size_bytes == storage.file_size(uri, options)
    full = vectors.read_vectors(uri, options=options)
    assert full.dtype == x.dtype
    np.testing.assert_array_equal(full, x)
    for a, b in [(0, 1), (3, 4), (7, 19), (13, N), (N, N)]:  # odd offsets, crossing row groups
        part = vectors.read_rows(uri, a, b, options=options, file_info=fi)
        np.testing.assert_array_equal(part, full[a:b])
        assert part.shape == (b - a, D)
    blocks = list(vectors.iter_blocks(uri, 10, options=options, start=2))
    assert [s for s, _ in blocks] == [2, 12, 22, 32]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), x[2:])
    if fmt == "parquet":
        np.testing.assert_array_equal(vectors.read_ids(uri, 5, 21, options=options), ids[5:21])
    else:
        assert vectors.read_ids(uri, 5, 21, options=options) is None


@pytest.mark.parametrize("fmt", vectors.FORMATS)
def test_roundtrip_local(tmp_path, fmt):
    _roundtrip(str(tmp_path), fmt)


@pytest.mark.s3
def test_roundtrip_s3_all_formats(s3):
    base = s3.bucket("vecs-rt") + "/dir"
    for fmt in vectors.FORMATS:
        _roundtrip(base, fmt)
    # explicit options (not env) work too
    _roundtrip(base + "/opts", "fvecs", s3.options())


def test_detect_format_and_explicit_fmt(tmp_path):
    assert vectors.detect_format("s3://b/x/base.u8bin") == "u8bin"
    assert vectors.detect_format("/a/b.FVECS") == "fvecs"
    with pytest.raises(ConfigError, match="fmt="):
        vectors.detect_format("/a/b.dat")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    uri = str(tmp_path / "noext.dat")
    vectors.write_vectors(uri, x, fmt="fbin")
    np.testing.assert_array_equal(vectors.read_vectors(uri, fmt="fbin"), x)


def test_file_layout_matches_texmex_and_bigann(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    vectors.write_vectors(str(tmp_path / "a.fvecs"), x)
    raw = (tmp_path / "a.fvecs").read_bytes()
    assert np.frombuffer(raw, "<i4")[[0, 4]].tolist() == [3, 3]
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(2, 4)[:, 1:], x)
    fi = vectors.write_vectors(str(tmp_path / "a.fbin"), x)
    raw = (tmp_path / "a.fbin").read_bytes()
    assert np.frombuffer(raw[:8], "<u4").tolist() == [2, 3] and fi.header_bytes == 8
    np.testing.assert_array_equal(np.frombuffer(raw[8:], "<f4").reshape(2, 3), x)
    fi = vectors.write_vectors(str(tmp_path / "a.npy"), x)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), x)
    assert fi.byte_range(1, 2) == (fi.header_bytes + 12, 12)


def test_read_rows_is_one_small_ranged_read(tmp_path, monkeypatch):
    x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    uri = str(tmp_path / "big.fvecs")
    fi = vectors.write_vectors(uri, x)
    reads = _CountingReads(monkeypatch)
    part = vectors.read_rows(uri, 1001, 1004, file_info=fi)
    np.testing.assert_array_equal(part, x[1001:1004])
    assert reads.ranges == [(1001 * 68, 1004 * 68, 3 * 68)]
    reads.ranges.clear()
    vectors.info(uri)
    assert reads.total <= 4 < fi.size_bytes


@pytest.mark.s3
def test_read_rows_s3_fetches_only_the_range(s3, monkeypatch):
    base = s3.bucket("vecs-range")
    x = np.random.default_rng(1).integers(0, 256, (3000, 32)).astype(np.uint8)
    uri = base + "/big.bvecs"
    fi = vectors.write_vectors(uri, x)
    fs, _ = storage.get_fs(uri)
    got: list[tuple[int, int, int]] = []
    orig = fs.cat_file

    def counting_cat(path, start=None, end=None, **kw):
        out = orig(path, start=start, end=end, **kw)
        got.append((start, end, len(out)))
        return out

    monkeypatch.setattr(fs, "cat_file", counting_cat)
    np.testing.assert_array_equal(vectors.read_rows(uri, 777, 781, file_info=fi), x[777:781])
    assert got == [(777 * 36, 781 * 36, 4 * 36)]
    # parquet: reading a few rows must not fetch the whole file
    pq_uri = base + "/big.parquet"
    xf = np.random.default_rng(2).standard_normal((16000, 32)).astype(np.float32)
    pfi = vectors.write_vectors(pq_uri, xf, parquet_row_group_rows=1000)
    import s3fs.core

    sizes: list[int] = []
    real_fetch = s3fs.core._fetch_range

    def counting_fetch(*args, **kw):
        out = real_fetch(*args, **kw)
        sizes.append(len(out))
        return out

    monkeypatch.setattr(s3fs.core, "_fetch_range", counting_fetch)
    np.testing.assert_array_equal(vectors.read_rows(pq_uri, 1500, 1510, file_info=pfi), xf[1500:1510])
    assert 0 < sum(sizes) < pfi.size_bytes / 5


def test_truncated_vecs_names_partial_record(tmp_path):
    uri = str(tmp_path / "t.fvecs")
    vectors.write_vectors(uri, np.ones((4, 3), np.float32))
    with open(uri, "ab") as f:
        f.write(b"\x03\x00\x00\x00\x00\x00")  # a header and 2 bytes of the next record
    with pytest.raises(VectorFormatError, match=r"row 4, byte offset 64.*not a whole number") as ei:
        vectors.info(uri)
    assert ei.value.offset == 64 and uri in str(ei.value)


def test_record_dim_mismatch_names_row_and_offset(tmp_path):
    uri = str(tmp_path / "m.ivecs")
    vectors.write_vectors(uri, np.arange(20, dtype=np.int32).reshape(5, 4))
    raw = bytearray(open(uri, "rb").read())
    raw[3 * 20:3 * 20 + 4] = np.array([7], "<i4").tobytes()
    open(uri, "wb").write(bytes(raw))
    np.testing.assert_array_equal(vectors.read_rows(uri, 0, 3), np.arange(12).reshape(3, 4))
    with pytest.raises(VectorFormatError, match=r"row 3, byte offset 60.*dimension header 7") as ei:
        vectors.read_rows(uri, 1, 5)
    assert (ei.value.row, ei.value.offset) == (3, 60)


def test_bin_header_size_mismatch(tmp_path):
    uri = str(tmp_path / "b.u8bin")
    vectors.write_vectors(uri, np.zeros((10, 8), np.uint8))
    raw = open(uri, "rb").read()
    open(uri, "wb").write(raw[:-3])
    with pytest.raises(VectorFormatError, match=r"row 9, byte offset 80.*header says 10 x 8"):
        vectors.info(uri)
    open(uri, "wb").write(np.array([1, 0], "<u4").tobytes())
    with pytest.raises(VectorFormatError, match="invalid dimension 0"):
        vectors.info(uri)


def test_zero_or_negative_dim_and_tiny_file(tmp_path):
    uri = str(tmp_path / "z.fvecs")
    open(uri, "wb").write(np.array([-2], "<i4").tobytes())
    with pytest.raises(VectorFormatError, match="byte offset 0.*invalid dimension -2"):
        vectors.info(uri)
    open(uri, "wb").write(b"\x01\x00")
    with pytest.raises(VectorFormatError, match="too small"):
        vectors.info(uri)


@pytest.mark.parametrize("fmt", ["fvecs", "fbin", "npy", "parquet"])
def test_nan_inf_named_by_row(tmp_path, fmt):
    x = np.ones((6, 4), np.float32)
    x[4, 2] = np.inf if fmt != "npy" else np.nan
    uri = str(tmp_path / f"n.{fmt}")
    fi = vectors.write_vectors(uri, x)
    np.testing.assert_array_equal(vectors.read_rows(uri, 0, 4, file_info=fi), x[:4])
    with pytest.raises(VectorFormatError, match="row 4") as ei:
        vectors.read_rows(uri, 2, 6, file_info=fi)
    assert ei.value.row == 4
    if fmt != "parquet":
        assert ei.value.offset == fi.header_bytes + 4 * fi.record_bytes + (4 if fmt == "fvecs" else 0) + 2 * 4
    out = vectors.read_rows(uri, 0, 6, file_info=fi, check_finite=False)
    assert not np.isfinite(out[4, 2])


def test_out_of_range_rows(tmp_path):
    uri = str(tmp_path / "r.fbin")
    vectors.write_vectors(uri, np.zeros((5, 2), np.float32))
    for a, b in [(-1, 2), (3, 2), (0, 6)]:
        with pytest.raises(ValueError, match="outside"):
            vectors.read_rows(uri, a, b)


def test_write_rejects_incompatible_dtype_and_leaves_nothing(tmp_path):
    for fmt, bad in [("bvecs", np.full((2, 3), 256)), ("u8bin", np.full((2, 3), 1.5)),
                     ("i8bin", np.full((2, 3), -129)), ("ivecs", np.full((2, 3), 2.0**40))]:
        uri = str(tmp_path / f"bad.{fmt}")
        with pytest.raises(ValueError, match=fmt):
            vectors.write_vectors(uri, bad)
        assert not storage.exists(uri)
    # integer-valued floats are accepted for byte formats
    fi = vectors.write_vectors(str(tmp_path / "ok.bvecs"), np.full((2, 3), 255.0))
    assert fi.dtype == "uint8"
    with pytest.raises(ValueError, match="ids"):
        vectors.write_vectors(str(tmp_path / "x.fvecs"), np.zeros((2, 3)), ids=np.arange(2))


def test_bad_npy_and_parquet(tmp_path):
    uri = str(tmp_path / "f.npy")
    np.save(uri, np.asfortranarray(np.zeros((3, 4), np.float32)))
    with pytest.raises(VectorFormatError, match="C-ordered"):
        vectors.info(uri)
    np.save(uri, np.zeros((3, 4, 2), np.float32))
    with pytest.raises(VectorFormatError, match="2-D"):
        vectors.info(uri)
    open(uri, "wb").write(b"garbage!!!!!")
    with pytest.raises(VectorFormatError, match="bad magic"):
        vectors.info(uri)
    pq_uri = str(tmp_path / "p.parquet")
    open(pq_uri, "wb").write(b"PAR1 not really")
    with pytest.raises(VectorFormatError, match="parquet"):
        vectors.info(pq_uri)


def test_missing_file_is_storage_error(tmp_path):
    with pytest.raises(StorageError, match="missing.fvecs.*not found"):
        vectors.info(str(tmp_path / "missing.fvecs"))


def test_knn_results_roundtrip_and_validation(tmp_path):
    rng = np.random.default_rng(3)
    ids = rng.integers(-1, 10**6, (7, 4))
    dist = rng.random((7, 4)).astype(np.float32)
    uri = str(tmp_path / "res.bin")
    results.write_knn_results(uri, ids, dist)
    I, Dd = results.read_knn_results(uri)
    assert I.dtype == np.int64 and Dd.dtype == np.float32
    np.testing.assert_array_equal(I, ids)
    np.testing.assert_array_equal(Dd, dist)
    assert storage.file_size(uri) == 8 + 7 * 4 * 8
    open(uri, "ab").write(b"\0")
    with pytest.raises(VectorFormatError, match="header says 7 x 4"):
        results.read_knn_results(uri)


@pytest.mark.s3
def test_knn_results_s3(s3):
    uri = s3.bucket("vecs-knn") + "/r/res.bin"
    ids = np.arange(12).reshape(3, 4)
    results.write_knn_results(uri, ids, ids.astype(np.float32) / 2)
    I, Dd = results.read_knn_results(uri)
    np.testing.assert_array_equal(I, ids)
    np.testing.assert_array_equal(Dd, ids / 2)


def test_real_dwsift_rows(dwsift_dir):
    fi = vectors.info(str(dwsift_dir / "learn.bvecs"))
    assert (fi.count, fi.dim, fi.dtype) == (50_000, 128, "uint8")
    head = vectors.read_vectors(str(dwsift_dir / "learn.bvecs"), max_rows=100)
    np.testing.assert_array_equal(vectors.read_rows(str(dwsift_dir / "learn.bvecs"), 41, 57), head[41:57])
    gt = vectors.info(str(dwsift_dir / "groundtruth.ivecs"))
    assert (gt.count, gt.dim) == (10_000, 100)


@pytest.mark.parametrize("list_type, value_type", [(pa.list_, pa.float16()), (pa.list_, pa.float64()),
                                                   (pa.large_list, pa.float32())])
def test_parquet_vectors_as_variable_lists_of_any_float_type(tmp_path, list_type, value_type):
    """Embedding dumps store vectors as plain lists (not fixed-size) of float16/32/64: the
    dimension comes from the footer, rows read as from a fixed-size list, and a row of another
    length is named."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 6)).astype(value_type.to_pandas_dtype())
    uri = str(tmp_path / "v.parquet")
    col = pa.array([list(r) for r in x.tolist()], type=list_type(value_type))
    pq.write_table(pa.table({"vector": col, "id": pa.array(np.arange(50, dtype=np.int64) * 3)}), uri,
                   row_group_size=16)
    fi = vectors.info(uri)
    assert (fi.count, fi.dim, fi.dtype) == (50, 6, np.dtype(value_type.to_pandas_dtype()).name)
    np.testing.assert_array_equal(vectors.read_rows(uri, 10, 40), x[10:40])
    assert vectors.read_ids(uri, 0, 5).tolist() == [0, 3, 6, 9, 12]
    # one row two values short: the footer's count no longer divides, or the row is named
    rows = [list(r) for r in x.tolist()]
    rows[20], rows[21] = rows[20][:4], rows[21] + rows[20][4:]
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"vector": pa.array(rows, type=list_type(value_type))}), bad, row_group_size=16)
    assert vectors.info(bad).dim == 6
    with pytest.raises(VectorFormatError, match=r"row 20.*length 4|length 4.*row 20"):
        vectors.read_rows(bad, 0, 50)
    np.testing.assert_array_equal(vectors.read_rows(bad, 22, 50), x[22:50])
