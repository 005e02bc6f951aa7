"""Index versions in operation: adding files, re-encoding with a new model, resuming, GC, history."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import build_tiny_model, clustered_vectors
from pipeline.codec import encoder
from pipeline.io import results
from pipeline.io import storage, vectors
from pipeline.stages.encode import EncodeJobConfig, run_encode
from pipeline.errors import ConfigError
from pipeline.index.history import index_report, read_history
from pipeline.index.manifest import current_version, list_versions, load_manifest, version_dir
from pipeline.stages.reencode import ReencodeConfig, run_reencode
from pipeline.search.params import SearchParams
from pipeline.stages.search import SearchJobConfig, evaluate_results, run_search
from pipeline.index.shards import read_shard

pytestmark = pytest.mark.ray

RES = dict(workers=2, cpus_per_worker=0.5, batch_size=256)
ADD = dict(RES, workers=1)  # an added file is one shard: one actor is enough


@pytest.fixture(scope="module")
def template_index(ray_session, tiny_index_inputs, tmp_path_factory):
    """Version v000001 of an index over the 4,000-row tiny base, in 4 shards."""
    inp = tiny_index_inputs
    index = str(tmp_path_factory.mktemp("reencode") / "index")
    run_encode(EncodeJobConfig(model_uri=inp["model"], data_uris=[inp["base"]], index_uri=index,
                               shard_rows=1000, **RES))
    return index


@pytest.fixture
def index(template_index, tmp_path):
    dst = str(tmp_path / "index")
    shutil.copytree(template_index, dst)
    return dst


def _far_vectors(n, seed):
    """A cluster far from the base, so its nearest neighbours are its own vectors."""
    return clustered_vectors(n, 16, n_clusters=2, seed=seed) + 40.0


def _ids_and_codes(index_uri, version=None):
    m = load_manifest(index_uri, version=version)
    ids, codes = [], []
    for s in m.shards:
        sh = read_shard(storage.join(version_dir(index_uri, m.version), s.name), expected=s.info(),
                        nlist=max(1, m.code["nlist"]))
        ids.append(sh.ids_N)
        codes.append(sh.codes_NM)
    ids = np.concatenate(ids)
    order = np.argsort(ids)
    return ids[order], np.concatenate(codes)[order]


def _search(index_uri, queries_uri, out_uri, version=None):
    rep = run_search(SearchJobConfig(index_uri=index_uri, queries_uri=queries_uri, out_uri=out_uri,
                                     params=SearchParams(k=10, nprobe=8, shortlist=40), workers=1,
                                     cpus_per_worker=0.5, version=version))
    I, _ = results.read_knn_results(out_uri)
    return rep, I


def test_added_file_gets_next_ids_and_is_searchable(index, tiny_index_inputs, tmp_path):
    inp = tiny_index_inputs
    new = _far_vectors(300, seed=7)
    new_uri = str(tmp_path / "new.fvecs")
    vectors.write_vectors(new_uri, new)
    rep = run_reencode(ReencodeConfig(index_uri=index, add_uris=[new_uri], **ADD))
    assert (rep["status"], rep["parent_version"], rep["version"]) == ("committed", "v000001", "v000002")
    assert rep["shards_reused_this_run"] == 4 and rep["shards_encoded_this_run"] == 1
    m = load_manifest(index)
    assert current_version(index) == "v000002" and m.parent_version == "v000001"
    assert (m.inputs[1].id_start, m.inputs[1].id_stop, m.total_rows) == (4000, 4300, 4300)
    ids, codes = _ids_and_codes(index)
    np.testing.assert_array_equal(ids, np.arange(4300))
    np.testing.assert_array_equal(codes[4000:], encoder.encode(inp["model_obj"], new)[0])
    np.testing.assert_array_equal(codes[:4000], _ids_and_codes(index, "v000001")[1])

    # queries from the new cluster find only new ids; the old queries find only old ones
    q_uri = str(tmp_path / "q.fvecs")
    vectors.write_vectors(q_uri, np.concatenate([new[:20], inp["q"][:20]]))
    srep, I = _search(index, q_uri, str(tmp_path / "res.bin"))
    assert srep["version"] == "v000002"
    assert ((I[:20] >= 4000) & (I[:20] < 4300)).all()
    assert ((I[20:] >= 0) & (I[20:] < 4000)).all()

    # recall against exact ground truth is linked into the index's history
    from pipeline.search.evaluation import knn_ground_truth

    _, gt = knn_ground_truth(np.concatenate([new[:20], inp["q"][:20]]), np.concatenate([inp["x"], new]), k=10)
    vectors.write_vectors(str(tmp_path / "gt.ivecs"), gt.astype(np.int32))
    recall = evaluate_results(str(tmp_path / "res.bin"), str(tmp_path / "gt.ivecs"))
    hist = index_report(index)
    row = {r["version"]: r for r in hist["versions"]}["v000002"]
    assert row["state"] == "current" and row["recall"] == recall and row["searches"] == 1
    assert row["vectors"] == 4300 and row["parent"] == "v000001"

    # the same add again is a no-op; a file already in the index is refused
    again = run_reencode(ReencodeConfig(index_uri=index, add_uris=[new_uri], **ADD))
    assert again["status"] == "up-to-date" and list_versions(index) == ["v000001", "v000002"]
    with pytest.raises(ConfigError, match="already an input"):
        run_reencode(ReencodeConfig(index_uri=index, add_uris=[inp["base"]], **RES))


def test_added_file_keeps_the_index_lut_weight(ray_session, tiny_index_inputs, tmp_path):
    """An index encoded with a lookup-table weight and a precision keeps them when files are added:
    the old shards are reused (same model, same choice) and the new file's codes are chosen the
    same way."""
    inp = tiny_index_inputs
    index = str(tmp_path / "index")
    run_encode(EncodeJobConfig(model_uri=inp["model"], data_uris=[inp["base"]], index_uri=index,
                               shard_rows=2000, lut_weight=5.0, precision="bfloat16", **RES))
    new = _far_vectors(300, seed=9)
    new_uri = str(tmp_path / "new.fvecs")
    vectors.write_vectors(new_uri, new)
    rep = run_reencode(ReencodeConfig(index_uri=index, add_uris=[new_uri], **ADD))
    assert rep["shards_reused_this_run"] == 2 and rep["shards_encoded_this_run"] == 1
    job = load_manifest(index).job_config
    assert job["lut_weight"] == 5.0 and job["precision"] == "bfloat16"
    _, codes = _ids_and_codes(index)
    np.testing.assert_array_equal(codes[4000:], encoder.encode(inp["model_obj"], new, lut_weight=5.0)[0])
    np.testing.assert_array_equal(codes[:4000], encoder.encode(inp["model_obj"], inp["x"], lut_weight=5.0)[0])


def test_model_change_interrupted_keeps_serving_old_version_then_resumes(index, tiny_index_inputs, tmp_path,
                                                                        monkeypatch):
    inp = tiny_index_inputs
    model2 = str(tmp_path / "model2")
    m2 = build_tiny_model(model2, clustered_vectors(3000, 16, seed=11), nlist=4)
    q_uri = inp["query"]

    import pipeline.stages.encode as encode_stage

    def die(*a, **k):
        raise RuntimeError("killed before commit")

    monkeypatch.setattr(encode_stage, "commit_manifest", die)
    with pytest.raises(RuntimeError, match="killed"):
        run_reencode(ReencodeConfig(index_uri=index, model_uri=model2, keep=2, **RES))
    monkeypatch.undo()
    assert current_version(index) == "v000001" and list_versions(index) == ["v000001"]
    before, I_before = _search(index, q_uri, str(tmp_path / "before.bin"))
    assert before["version"] == "v000001" and (I_before >= 0).all()

    rep = run_reencode(ReencodeConfig(index_uri=index, model_uri=model2, keep=2, **RES))
    assert (rep["status"], rep["version"]) == ("committed", "v000002")
    assert rep["shards_encoded_this_run"] == 0  # every shard survived the interruption
    assert current_version(index) == "v000002"
    m = load_manifest(index)
    assert m.model["uri"] == model2 and m.code["nlist"] == 4 and m.parent_version == "v000001"
    ids, codes = _ids_and_codes(index)
    np.testing.assert_array_equal(ids, np.arange(4000))
    np.testing.assert_array_equal(codes, encoder.encode(m2, inp["x"])[0])
    saved = json.loads(storage.read_bytes(storage.join(version_dir(index, "v000002"), "reencode.json")))
    assert saved["mode"] == "model" and saved["parent_version"] == "v000001"

    old, I_old = _search(index, q_uri, str(tmp_path / "old.bin"), version="v000001")  # kept by keep=2
    assert old["version"] == "v000001"
    np.testing.assert_array_equal(I_old, I_before)


def test_add_interrupted_mid_copy_then_before_switch_resumes(index, tmp_path, monkeypatch):
    new_uri = str(tmp_path / "new.fvecs")
    vectors.write_vectors(new_uri, _far_vectors(200, seed=8))
    real_copy, calls = storage.copy_file, []

    def copy_then_die(src, dst, options=None):
        if len(calls) == 2:
            raise OSError("killed mid-copy")
        calls.append(dst)
        real_copy(src, dst, options)

    monkeypatch.setattr(storage, "copy_file", copy_then_die)
    with pytest.raises(OSError, match="mid-copy"):
        run_reencode(ReencodeConfig(index_uri=index, add_uris=[new_uri], **ADD))
    monkeypatch.undo()
    assert current_version(index) == "v000001" and list_versions(index) == ["v000001"]
    import pipeline.index.manifest as manifest_mod

    def no_switch(*a, **k):
        raise OSError("killed before the switch")

    copied = []
    monkeypatch.setattr(storage, "copy_file", lambda src, dst, options=None: (copied.append(dst),
                                                                              real_copy(src, dst, options)))
    monkeypatch.setattr(manifest_mod, "set_current", no_switch)
    with pytest.raises(OSError, match="before the switch"):  # the resumed run copies only what is missing
        run_reencode(ReencodeConfig(index_uri=index, add_uris=[new_uri], **ADD))
    monkeypatch.undo()
    assert len(copied) == 2 and not set(copied) & set(calls)
    assert current_version(index) == "v000001" and list_versions(index) == ["v000001", "v000002"]
    events = read_history(index)
    assert [e["version"] for e in events if e["kind"] == "encode"] == ["v000001"]

    rep = run_reencode(ReencodeConfig(index_uri=index, add_uris=[new_uri], **ADD))
    assert (rep["status"], rep["version"]) == ("committed", "v000002")
    assert current_version(index) == "v000002" and list_versions(index) == ["v000001", "v000002"]
    m = load_manifest(index)
    assert m.parent_version == "v000001" and m.total_rows == 4200
    ids, _ = _ids_and_codes(index)
    np.testing.assert_array_equal(ids, np.arange(4200))
    assert [e["version"] for e in read_history(index) if e["kind"] == "encode"] == ["v000001", "v000002"]


def test_gc_keeps_exactly_n_versions_and_report_shows_history(index, tmp_path, capsys):
    from pipeline.cli import main

    for i in range(2):
        uri = str(tmp_path / f"add{i}.fvecs")
        vectors.write_vectors(uri, _far_vectors(100, seed=20 + i))
        run_reencode(ReencodeConfig(index_uri=index, add_uris=[uri], keep=2, **ADD))
    assert list_versions(index) == ["v000002", "v000003"] and current_version(index) == "v000003"
    assert sorted(os.listdir(os.path.join(index, "versions"))) == ["v000002", "v000003"]
    ids, _ = _ids_and_codes(index)  # shards copied from the deleted v000001 still verify
    np.testing.assert_array_equal(ids, np.arange(4200))
    assert [e["kind"] for e in read_history(index)].count("gc") == 1

    assert main(["report", index]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("v0")}
    assert set(lines) == {"v000001", "v000002", "v000003"}
    assert " deleted " in lines["v000001"] and " kept " in lines["v000002"]
    assert " current " in lines["v000003"] and " 4200 " in lines["v000003"]


def test_changed_input_and_bad_arguments_are_refused(ray_session, tiny_index_inputs, tmp_path):
    inp = tiny_index_inputs
    base = str(tmp_path / "base.fvecs")
    vectors.write_vectors(base, inp["x"][:600])
    index = str(tmp_path / "index")
    run_encode(EncodeJobConfig(model_uri=inp["model"], data_uris=[base], index_uri=index, shard_rows=600, **RES))
    with pytest.raises(ConfigError, match="exactly one"):
        run_reencode(ReencodeConfig(index_uri=index))
    with pytest.raises(ConfigError, match="keep"):
        run_reencode(ReencodeConfig(index_uri=index, model_uri=inp["model"], keep=0))
    vectors.write_vectors(base, inp["x"][:700])  # the file the index was built from changed
    with pytest.raises(ConfigError) as ei:
        run_reencode(ReencodeConfig(index_uri=index, model_uri=inp["model"], **RES))
    assert base in str(ei.value) and "changed" in str(ei.value)
    assert list_versions(index) == ["v000001"]
    with pytest.raises(ConfigError, match="no committed version"):
        run_reencode(ReencodeConfig(index_uri=str(tmp_path / "empty"), add_uris=[base]))


@pytest.mark.s3
def test_copy_file_links_locally_and_copies_on_s3(tmp_path, s3):
    from pipeline.errors import StorageError

    src, dst = str(tmp_path / "a" / "x.bin"), str(tmp_path / "b" / "x.bin")
    storage.write_bytes_atomic(src, b"shard-bytes")
    storage.copy_file(src, dst)
    assert os.stat(src).st_ino == os.stat(dst).st_ino  # a hard link, no bytes copied
    storage.write_bytes_atomic(src, b"replaced")  # atomic replace gives the source a new inode
    assert open(dst, "rb").read() == b"shard-bytes"
    with pytest.raises(StorageError, match="missing.bin"):
        storage.copy_file(str(tmp_path / "missing.bin"), str(tmp_path / "c.bin"))

    opts = s3.options()
    bucket = s3.bucket("copy-file")
    storage.write_bytes_atomic(f"{bucket}/v1/s.parquet", b"0123456789" * 1000, opts)
    storage.copy_file(f"{bucket}/v1/s.parquet", f"{bucket}/v2/s.parquet", opts)
    assert storage.read_bytes(f"{bucket}/v2/s.parquet", opts) == b"0123456789" * 1000
    with pytest.raises(StorageError, match="nope"):
        storage.copy_file(f"{bucket}/v1/nope", f"{bucket}/v2/nope", opts)
