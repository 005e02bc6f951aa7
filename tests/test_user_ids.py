"""User ids: a parquet ``id`` column or an ``.ids.npy`` file beside the vectors, checked before any
encoding, stored in the shards and returned by search."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError, VectorFormatError
from pipeline.index.manifest import (code_params, InputEntry, load_manifest, Manifest, ShardEntry,
                                     validate_manifest)
from pipeline.index.manifest import shard_uri
from pipeline.index.shards import read_shard, shard_name
from pipeline.io import ids, results, vectors
from pipeline.io.inputs import plan_inputs
from pipeline.search.params import SearchParams
from pipeline.stages.encode import EncodeJobConfig, run_encode
from pipeline.stages.reencode import ReencodeConfig, run_reencode
from pipeline.stages.search import run_search, SearchJobConfig


def _parquet(path, x, id_values):
    """A parquet vector file whose ``id`` column holds ``id_values`` in their own arrow type."""
    vec = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    pq.write_table(pa.table({"vector": vec, "id": pa.array(id_values)}), str(path))
    return str(path)


def _npy_with_ids(path, x, id_values):
    np.save(str(path), x)
    np.save(str(path) + ".ids.npy", id_values)
    return str(path)


def test_sources_are_detected_and_recorded(tmp_path):
    x = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    a = _parquet(tmp_path / "a.parquet", x, np.arange(100, 130, dtype=np.int64))
    b = _npy_with_ids(tmp_path / "b.npy", x, np.arange(200, 230, dtype=np.uint32))
    planned = plan_inputs([a, b])
    assert [(p.ids, p.ids_uri) for p in planned] == [("column", None), ("file", b + ".ids.npy")]
    assert planned[0].ids_sha256 is None and len(planned[1].ids_sha256) == 64
    np.testing.assert_array_equal(ids.read(planned[0], 5, 9), [105, 106, 107, 108])
    got = ids.read(planned[1], 28, 30)
    assert got.dtype == np.int64 and list(got) == [228, 229]
    assert ids.check_unique(planned) == 60
    vectors.write_vectors(str(tmp_path / "c.fvecs"), x)
    plain = plan_inputs([str(tmp_path / "c.fvecs")])[0]
    assert plain.ids == "rows" and ids.check_unique([plain]) == 0
    with pytest.raises(ConfigError, match=r"a.parquet brings its own ids but .*c.fvecs does not"):
        plan_inputs([a, str(tmp_path / "c.fvecs")])


@pytest.mark.parametrize("case, message", [
    ("float", r"a.parquet at row 0: ids must be integers, the id column has type float64 \(value 0.5\)"),
    ("negative", r"a.parquet at row 3: negative id -7"),
    ("null", r"a.parquet at row 2: null 'id' value"),
    ("repeat_in_file", r"a.parquet at row 9: id 39 is repeated \(first at row 0\)"),
    ("repeat_across_files", r"b.npy.ids.npy at row 1: id 1005 is repeated \(first at row 5 of .*a.parquet\)"),
    ("too_big", r"b.npy.ids.npy at row 0: id 18446744073709551615 does not fit in int64"),
    ("short_ids_file", r"b.npy.ids.npy.*holds 29 ids but .*b.npy holds 30 vectors"),
    ("float_ids_file", r"b.npy.ids.npy.*ids must be little-endian integers"),
])
def test_bad_ids_are_refused_naming_file_and_row(tmp_path, case, message):
    x = np.random.default_rng(1).standard_normal((30, 4)).astype(np.float32)
    good = np.arange(1000, 1030, dtype=np.int64)
    files = []
    if case == "float":
        files.append(_parquet(tmp_path / "a.parquet", x, np.arange(30) + 0.5))
    elif case == "negative":
        files.append(_parquet(tmp_path / "a.parquet", x, np.r_[0, 1, 2, -7, np.arange(4, 30)]))
    elif case == "null":
        files.append(_parquet(tmp_path / "a.parquet", x, [0, 1, None] + list(range(3, 30))))
    elif case == "repeat_in_file":
        v = np.arange(30)[::-1] + 10  # decreasing: checked by sorting
        v[9] = v[0]
        files.append(_parquet(tmp_path / "a.parquet", x, v))
    elif case == "repeat_across_files":
        files.append(_parquet(tmp_path / "a.parquet", x, good))
        files.append(_npy_with_ids(tmp_path / "b.npy", x, np.r_[2000, 1005, np.arange(2002, 2030)]))
    elif case == "too_big":
        files.append(_npy_with_ids(tmp_path / "b.npy", x, np.full(30, 2**64 - 1, np.uint64)))
    elif case == "short_ids_file":
        files.append(_npy_with_ids(tmp_path / "b.npy", x, good[:29]))
    elif case == "float_ids_file":
        files.append(_npy_with_ids(tmp_path / "b.npy", x, good.astype(np.float64)))
    with pytest.raises(VectorFormatError, match=message):
        ids.check_unique(plan_inputs(files))


def test_repeats_found_between_increasing_files_that_are_not_neighbours(tmp_path):
    """Three files with increasing ids: the first spans the others, the repeat is in the third."""
    x = np.zeros((10, 2), np.float32)
    a = _parquet(tmp_path / "a.parquet", x, np.arange(0, 1000, 100))
    b = _parquet(tmp_path / "b.parquet", x, np.arange(1, 11))
    c = _parquet(tmp_path / "c.parquet", x, np.arange(401, 411) - np.r_[np.zeros(9, int), 10])
    with pytest.raises(VectorFormatError, match=r"c.parquet at row 9: id 400 is repeated \(first at row 4 of .*a.parquet"):
        ids.check_unique(plan_inputs([a, b, c]))
    ok = _parquet(tmp_path / "d.parquet", x, np.arange(501, 511))
    assert ids.check_unique(plan_inputs([a, b, ok])) == 30


def _user_manifest(id_ranges, fmt_version=2):
    inputs = [InputEntry("a", "parquet", 20, 4, "float32", 0, 20, "0", ids="column")]
    shards = [ShardEntry(f"shards/{shard_name(0, fr)}", rows, 100, "0" * 64, 0, fr, lo, hi, 1)
              for fr, rows, lo, hi in id_ranges]
    m = Manifest.create("v000001", model={}, code=code_params(4, 256, 8), inputs=inputs, shards=shards,
                        job_config={})
    return m.replace(format_version=fmt_version)


def test_manifest_rules_for_user_ids():
    # ids of shards bound, not equal, their rows; ranges of two shards may interleave
    validate_manifest(_user_manifest([(0, 10, 5, 900), (10, 10, 7, 10**12)]))
    with pytest.raises(ConfigError, match="10 distinct ids cannot lie in"):
        validate_manifest(_user_manifest([(0, 10, 5, 10), (10, 10, 20, 40)]))
    with pytest.raises(ConfigError, match="user ids need manifest format_version 2"):
        validate_manifest(_user_manifest([(0, 10, 5, 900), (10, 10, 7, 900)], fmt_version=1))
    with pytest.raises(ConfigError, match="overlap: rows"):
        validate_manifest(_user_manifest([(0, 10, 5, 900), (5, 15, 7, 900)]))
    m = _user_manifest([(0, 20, 0, 900)])
    m.inputs[0].ids = "file"  # a file source names its file
    with pytest.raises(ConfigError, match="bad id source"):
        validate_manifest(m)


# ----------------------------------------------------------------------------------------- Ray jobs

@pytest.fixture(scope="module")
def user_id_indexes(ray_session, tiny_index_inputs, tmp_path_factory):
    """The tiny base encoded three times: with row ids (fvecs); with shuffled 62-bit ids in a
    parquet ``id`` column; with increasing 62-bit ids in an ids file beside an npy copy."""
    inp = tiny_index_inputs
    d = tmp_path_factory.mktemp("user_ids")
    x = inp["x"]
    shuffled = np.random.default_rng(5).choice(2**62, size=len(x), replace=False).astype(np.int64)
    increasing = np.sort(shuffled)
    out = {"shuffled": shuffled, "increasing": increasing, "dir": d}
    out["pq_file"] = _parquet(d / "base.parquet", x, shuffled)
    npy_file = _npy_with_ids(d / "base.npy", x, increasing)
    for name, data in (("rows", inp["base"]), ("column", out["pq_file"]), ("file", npy_file)):
        out[name] = str(d / f"index-{name}")
        report = run_encode(EncodeJobConfig(model_uri=inp["model"], data_uris=[data], index_uri=out[name],
                                            workers=2, cpus_per_worker=0.5, shard_rows=1400, batch_size=256))
        assert report["status"] == "committed"
    return out


def _search(index, inp, out):
    run_search(SearchJobConfig(index_uri=index, queries_uri=inp["query"], out_uri=out,
                               params=SearchParams(k=10, nprobe=3, shortlist=40), workers=2, cpus_per_worker=0.5))
    return results.read_results(out)


def _rows_by_id(index):
    """(ids, list ids, codes) of every row of an index, sorted by id."""
    m = load_manifest(index)
    ids_N, lists_N, codes = [], [], []
    for s in m.shards:
        sh = read_shard(shard_uri(index, m.version, s), expected=s.info(), nlist=m.code["nlist"])
        assert (s.id_min, s.id_max) == (sh.ids_N.min(), sh.ids_N.max())
        ids_N.append(sh.ids_N)
        lists_N.append(sh.list_ids_N)
        codes.append(sh.codes_NM)
    ids_N = np.concatenate(ids_N)
    order = np.argsort(ids_N)
    return m, ids_N[order], np.concatenate(lists_N)[order], np.concatenate(codes)[order]


@pytest.mark.ray
def test_user_ids_are_stored_with_their_rows_codes(user_id_indexes):
    idx = user_id_indexes
    _, row_ids, row_lists, row_codes = _rows_by_id(idx["rows"])
    np.testing.assert_array_equal(row_ids, np.arange(len(row_ids)))
    m, ids_N, lists_N, codes = _rows_by_id(idx["column"])
    assert m.format_version == 2 and m.inputs[0].ids == "column" and len(m.shards) == 3
    shuffled = idx["shuffled"]
    np.testing.assert_array_equal(ids_N, np.sort(shuffled))
    at = np.searchsorted(ids_N, shuffled)  # row r of the file is stored under shuffled[r]
    np.testing.assert_array_equal(codes[at], row_codes)
    np.testing.assert_array_equal(lists_N[at], row_lists)


@pytest.mark.ray
def test_search_returns_the_users_ids(user_id_indexes, tiny_index_inputs, tmp_path):
    idx = user_id_indexes
    I_rows, D_rows = _search(idx["rows"], tiny_index_inputs, str(tmp_path / "rows"))
    assert (I_rows >= 0).all()
    m = load_manifest(idx["file"])
    assert m.inputs[0].ids == "file" and m.inputs[0].ids_uri.endswith("base.npy.ids.npy")
    I, D = _search(idx["file"], tiny_index_inputs, str(tmp_path / "file"))
    # increasing ids keep the row order, so ties break alike: the same neighbours under the user's ids
    np.testing.assert_array_equal(I, idx["increasing"][I_rows])
    np.testing.assert_allclose(D, D_rows, rtol=1e-5, atol=1e-5)
    # ids beyond int32 do not fit the big-ann file: the results are in the parquet copy only
    assert not os.path.exists(tmp_path / "file") and os.path.exists(tmp_path / "file.parquet")
    I_col, _ = _search(idx["column"], tiny_index_inputs, str(tmp_path / "column"))
    assert np.isin(I_col, idx["shuffled"]).all()


@pytest.mark.ray
def test_bad_or_colliding_ids_stop_the_job_before_any_encoding(user_id_indexes, tiny_index_inputs, tmp_path):
    inp = tiny_index_inputs
    x = inp["x"]
    bad = _parquet(tmp_path / "bad.parquet", x, np.arange(len(x)) + 0.5)
    index = str(tmp_path / "index")
    with pytest.raises(VectorFormatError, match=r"bad.parquet at row 0: ids must be integers"):
        run_encode(EncodeJobConfig(model_uri=inp["model"], data_uris=[bad], index_uri=index, workers=2,
                                   cpus_per_worker=0.5, shard_rows=1400))
    assert not os.path.exists(index)  # no version claimed, nothing written
    # adding a file whose ids collide with the index's: refused before the new version is claimed
    more = _parquet(tmp_path / "more.parquet", x[:50], np.r_[np.arange(49) + 2**62, user_id_indexes["shuffled"][7]])
    before = sorted(os.listdir(os.path.join(user_id_indexes["column"], "versions")))
    with pytest.raises(VectorFormatError, match=r"more.parquet at row 49: id \d+ is repeated \(first at row 7 of .*base.parquet"):
        run_reencode(ReencodeConfig(index_uri=user_id_indexes["column"], add_uris=[more]))
    assert sorted(os.listdir(os.path.join(user_id_indexes["column"], "versions"))) == before
