"""Byte-range vector datasource: planning, read tasks, Ray datasets, errors, row sampling."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.io import vectors
from pipeline.errors import ConfigError, VectorFormatError
from pipeline.io.inputs import InputFile, plan_inputs, RowSample, sample_rows_local, VectorSource
from pipeline.distributed.datasource import VectorDatasource, read_source, unwrap_ray_error

D = 8


def read_vectors_dataset(uris, rows_per_task, sample=None, check_finite=True, **read_kwargs):
    """The read the training and encode jobs make: headers planned, byte ranges read by Ray Data."""
    from pipeline.io.inputs import plan_inputs

    return read_source(VectorDatasource(plan_inputs(uris), rows_per_task=rows_per_task, sample=sample,
                                        check_finite=check_finite), **read_kwargs)


def _rand(n, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, size=(n, D), dtype=np.uint8)
    return rng.normal(size=(n, D)).astype(dtype)


def _run_tasks(source: VectorDatasource) -> dict[str, np.ndarray]:
    """Execute every read task in-process and concatenate the blocks (no Ray scheduling)."""
    from ray.data.block import BlockAccessor

    cols: dict[str, list] = {"id": [], "vector": [], "file_index": [], "row": []}
    for task in source.get_read_tasks(1):
        for block in task():
            batch = BlockAccessor.for_block(block).to_batch_format("numpy")
            for k in cols:
                cols[k].append(batch[k])
    return {k: np.concatenate(v) for k, v in cols.items()}


def _ds_columns(ds) -> dict[str, np.ndarray]:
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(out["id"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def test_plan_inputs_validates_and_numbers_ids(tmp_path):
    a, b = _rand(300, 1), _rand(200, 2)
    vectors.write_vectors(str(tmp_path / "a.fvecs"), a)
    vectors.write_vectors(str(tmp_path / "b.fbin"), b)
    inputs = plan_inputs(VectorSource([str(tmp_path / "a.fvecs"), str(tmp_path / "b.fbin")]))
    assert [(i.fmt, i.count, i.id_start, i.id_stop) for i in inputs] == [("fvecs", 300, 0, 300),
                                                                         ("fbin", 200, 300, 500)]
    assert InputFile.from_json(inputs[1].to_json()) == inputs[1]
    # the provenance hash changes when the file does
    h0 = inputs[0].header_sha256
    vectors.write_vectors(str(tmp_path / "a.fvecs"), a + 1)
    assert plan_inputs([str(tmp_path / "a.fvecs")])[0].header_sha256 != h0

    vectors.write_vectors(str(tmp_path / "odd.fvecs"), np.ones((5, D + 1), np.float32))
    with pytest.raises(ConfigError, match=r"odd\.fvecs.*dimension 9"):
        plan_inputs([str(tmp_path / "a.fvecs"), str(tmp_path / "odd.fvecs")])
    vectors.write_vectors(str(tmp_path / "empty.fbin"), np.ones((0, D), np.float32))
    with pytest.raises(VectorFormatError, match=r"empty\.fbin.*no vectors"):
        plan_inputs([str(tmp_path / "a.fvecs"), str(tmp_path / "empty.fbin")])
    with pytest.raises(ConfigError, match="twice"):
        plan_inputs([str(tmp_path / "a.fvecs")] * 2)


def test_read_tasks_cover_each_format(tmp_path):
    """Tasks never span files, cover every row once, and keep each format's dtype and ids."""
    cases = {"fvecs": _rand(130, 3), "bvecs": _rand(130, 4, np.uint8), "fbin": _rand(130, 5),
             "npy": _rand(130, 6), "parquet": _rand(130, 7)}
    pq_ids = np.random.default_rng(0).permutation(10_000)[:130].astype(np.int64) + 5
    for fmt, x in cases.items():
        uri = str(tmp_path / f"x.{fmt}")
        vectors.write_vectors(uri, x, ids=pq_ids if fmt == "parquet" else None,
                              **({"parquet_row_group_rows": 40} if fmt == "parquet" else {}))
        source = VectorDatasource(plan_inputs([uri]), rows_per_task=16)
        tasks = source.get_read_tasks(1)
        assert len(tasks) == 9
        assert all(isinstance(t.metadata.size_bytes, int) for t in tasks)
        assert sum(t.metadata.num_rows for t in tasks) == 130
        assert source.estimate_inmemory_data_size() == sum(t.metadata.size_bytes for t in tasks)
        got = _run_tasks(source)
        assert got["vector"].dtype == x.dtype, fmt
        np.testing.assert_array_equal(got["vector"], x)
        np.testing.assert_array_equal(got["row"], np.arange(130))
        np.testing.assert_array_equal(got["id"], pq_ids if fmt == "parquet" else np.arange(130))


def test_dataset_many_tasks_and_two_files(ray_session, tmp_path):
    a, b = _rand(1000, 10), _rand(37, 11, np.uint8)
    ua, ub = str(tmp_path / "a.fvecs"), str(tmp_path / "b.bvecs")
    vectors.write_vectors(ua, a)
    vectors.write_vectors(ub, b)
    ds = read_vectors_dataset([ua], rows_per_task=100, num_cpus=0.5).materialize()
    assert ds.num_blocks() >= 8
    got = _ds_columns(ds)
    np.testing.assert_array_equal(got["id"], np.arange(1000))
    np.testing.assert_array_equal(got["vector"], a)
    np.testing.assert_array_equal(got["row"], np.arange(1000))

    got = _ds_columns(read_vectors_dataset([ua, ub], rows_per_task=128, num_cpus=0.5))
    np.testing.assert_array_equal(got["id"], np.arange(1037))
    np.testing.assert_array_equal(got["file_index"], np.r_[np.zeros(1000), np.ones(37)])
    np.testing.assert_array_equal(got["row"], np.r_[np.arange(1000), np.arange(37)])
    assert got["vector"].dtype == np.float32  # uint8 + float32 inputs widen to float32
    np.testing.assert_array_equal(got["vector"], np.concatenate([a, b.astype(np.float32)]))

    sample = RowSample(0.25, seed=3)
    got = _ds_columns(read_vectors_dataset([ua, ub], rows_per_task=64, sample=sample, num_cpus=0.5))
    expected = np.flatnonzero(sample.select(np.arange(1037)))
    assert 0.15 < len(expected) / 1037 < 0.35
    np.testing.assert_array_equal(got["id"], expected)
    np.testing.assert_array_equal(got["vector"][got["file_index"] == 0], a[got["row"][got["file_index"] == 0]])


def _corrupt(tmp_path, n=400, bad_row=237):
    x = _rand(n, 12)
    uri = str(tmp_path / "corrupt.fvecs")
    vectors.write_vectors(uri, x)
    rec = 4 + 4 * D
    with open(uri, "r+b") as f:
        f.seek(bad_row * rec)
        f.write(np.array([D + 3], "<i4").tobytes())
    return uri, bad_row * rec


def test_corrupt_record_names_file_and_offset(ray_session, tmp_path):
    uri, offset = _corrupt(tmp_path)
    ds = read_vectors_dataset([uri], rows_per_task=50, num_cpus=0.5)
    with pytest.raises(Exception) as ei:
        ds.materialize()
    assert "corrupt.fvecs" in str(ei.value) and f"byte offset {offset}" in str(ei.value)
    err = unwrap_ray_error(ei.value)
    assert type(err) is VectorFormatError
    assert err.offset == offset and err.row == 237 and err.uri.endswith("corrupt.fvecs")

    # on_error="skip": only the bad range is dropped (as an empty block), the rest is read
    got = _run_tasks(VectorDatasource(plan_inputs([uri]), rows_per_task=50, on_error="skip"))
    np.testing.assert_array_equal(got["id"], np.r_[np.arange(200), np.arange(250, 400)])


def test_row_sample_deterministic_disjoint(tmp_path):
    n = 6000
    x = _rand(n, 13)
    uri = str(tmp_path / "s.fbin")
    vectors.write_vectors(uri, x)
    inputs = plan_inputs([uri])
    train, val = RowSample.pair(0.3, 0.1, seed=7)
    ids = {}
    for rpt in (7, 1000, n):
        ids[("train", rpt)] = _run_tasks(VectorDatasource(inputs, rows_per_task=rpt, sample=train))["id"]
        ids[("val", rpt)] = _run_tasks(VectorDatasource(inputs, rows_per_task=rpt, sample=val))["id"]
    for split in ("train", "val"):
        np.testing.assert_array_equal(np.sort(ids[(split, 7)]), np.sort(ids[(split, n)]))
        np.testing.assert_array_equal(np.sort(ids[(split, 1000)]), np.sort(ids[(split, n)]))
    tr, va = ids[("train", n)], ids[("val", n)]
    assert not set(tr) & set(va)
    assert abs(len(tr) / n - 0.3) < 0.03 and abs(len(va) / n - 0.1) < 0.02
    # another seed selects other rows
    other = _run_tasks(VectorDatasource(inputs, rows_per_task=n, sample=RowSample(0.3, seed=8)))["id"]
    assert len(set(other) ^ set(tr)) > 0.5 * len(tr)

    # the driver-side selection is the same, and its n-row version takes a prefix of the band
    xs, sid = sample_rows_local(inputs, sample=train, block_rows=500, return_ids=True)
    np.testing.assert_array_equal(sid, np.sort(tr))
    np.testing.assert_array_equal(xs, x[sid])
    x200, id200 = sample_rows_local(inputs, n=200, sample=train, block_rows=333, return_ids=True)
    assert len(id200) == 200 and set(id200) <= set(tr)
    np.testing.assert_array_equal(x200, x[id200])
    np.testing.assert_array_equal(id200, sample_rows_local(inputs, n=200, sample=train, block_rows=5000,
                                                           return_ids=True)[1])
    with pytest.raises(ConfigError):
        RowSample(0.2, split="val", val_fraction=0.1)
    with pytest.raises(ConfigError):
        RowSample(0.95, split="train", val_fraction=0.1)
