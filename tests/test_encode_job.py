"""The Ray Data encode job: byte-range reads -> actor pool -> IVF shards -> atomic manifest."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from pipeline import encoder, storage, vecs_io
from pipeline.encode_job import EncodeActor, EncodeJobConfig, plan_ranges, run_encode
from pipeline.errors import ConfigError, PipelineError, VectorFormatError
from pipeline.manifest import current_version, load_manifest, version_dir
from pipeline.shard_format import read_shard

pytestmark = pytest.mark.ray


def _job(inp, index_uri, **kw):
    base = dict(model_uri=inp["model"], data_uris=[inp["base"]], index_uri=index_uri,
                workers=2, cpus_per_worker=0.5, shard_rows=500, batch_size=256)
    base.update(kw)
    return EncodeJobConfig(**base)


def _read_index(index_uri, options=None):
    m = load_manifest(index_uri, options=options)
    vuri = version_dir(index_uri, m.version)
    ids, codes, lists = [], [], []
    for s in m.shards:
        sh = read_shard(storage.join(vuri, s.name), expected=s.info(), options=options, nlist=m.code["nlist"] or 1)
        ids.append(sh.ids_N)
        codes.append(sh.codes_NM)
        lists.append(sh.list_ids_N)
    ids = np.concatenate(ids)
    order = np.argsort(ids)
    return m, ids[order], np.concatenate(codes)[order], np.concatenate(lists)[order]


def _snapshot(root):
    out = {}
    for dp, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dp, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def test_one_file_many_tasks_ids_and_codes_match_single_process(ray_session, tiny_index_inputs, tmp_path):
    inp = tiny_index_inputs
    index = str(tmp_path / "index")
    report = run_encode(_job(inp, index))
    assert report["status"] == "committed"
    m, ids, codes, lists = _read_index(index)
    assert len(m.shards) >= 8  # one 4,000-row file split into 8 byte-range read tasks
    n = len(inp["x"])
    np.testing.assert_array_equal(ids, np.arange(n))  # ids exactly 0..N-1, each once
    ref_codes, ref_lists = encoder.encode(inp["model_obj"], inp["x"])
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(lists, ref_lists)
    assert m.total_rows == n and m.inputs[0].id_start == 0 and m.inputs[0].id_stop == n
    saved = json.loads(storage.read_bytes(storage.join(version_dir(index, m.version), "report.json")))
    assert saved["vectors"] == n and saved["vectors_per_s"] > 0


def test_rerun_of_finished_job_writes_nothing(ray_session, tiny_index_inputs, tmp_path):
    inp = tiny_index_inputs
    index = str(tmp_path / "index")
    run_encode(_job(inp, index, shard_rows=1000))
    before = _snapshot(index)
    again = run_encode(_job(inp, index, shard_rows=1000, workers=1))
    assert again["status"] == "up-to-date"
    assert _snapshot(index) == before


def test_interrupted_job_resumes_to_same_index(ray_session, tiny_index_inputs, tmp_path):
    """A job that died after writing some shards (no manifest) completes on re-run, encoding only
    the missing ranges, and yields the same manifest and shards as an uninterrupted run."""
    inp = tiny_index_inputs
    full, partial = str(tmp_path / "full"), str(tmp_path / "partial")
    run_encode(_job(inp, full, shard_rows=800))

    # Reproduce the state a killed job leaves: job.json + a subset of shards, no manifest.
    cfg = _job(inp, partial, shard_rows=800)
    from pipeline.ray_datasource import plan_inputs
    inputs = plan_inputs(cfg.data_uris)
    vuri = version_dir(partial, "v000001")
    storage.write_bytes_atomic(storage.join(vuri, "job.json"), json.dumps(
        {"identity": cfg.identity(), "config": cfg.to_dict()}).encode())
    actor = EncodeActor(cfg.model_uri, vuri, inputs, batch_size=256, threads=1)
    tasks = plan_ranges(inputs, cfg.shard_rows)
    for tk in tasks[:2]:
        x = vecs_io.read_rows(inp["base"], tk.start, tk.stop)
        actor({"id": np.arange(tk.start, tk.stop), "file_index": np.zeros(tk.stop - tk.start, np.int32),
               "row": np.arange(tk.start, tk.stop), "vector": x})
    assert current_version(partial) is None  # not visible to readers yet

    report = run_encode(cfg)
    assert report["shards_encoded_this_run"] == len(tasks) - 2
    m_full, ids_f, codes_f, lists_f = _read_index(full)
    m_part, ids_p, codes_p, lists_p = _read_index(partial)
    assert [s.to_dict() for s in m_full.shards] == [s.to_dict() for s in m_part.shards]
    np.testing.assert_array_equal(codes_f, codes_p)
    np.testing.assert_array_equal(ids_f, ids_p)


def test_corrupt_range_fails_with_offset_and_commits_nothing(ray_session, tiny_index_inputs, tmp_path):
    inp = tiny_index_inputs
    bad = tmp_path / "bad.fvecs"
    shutil.copy(inp["base"], bad)
    rec = 4 + 16 * 4
    row = 2345
    with open(bad, "r+b") as f:  # break the dimension header of one record mid-file
        f.seek(row * rec)
        f.write(np.int32(17).tobytes())
    index = str(tmp_path / "index")
    with pytest.raises(VectorFormatError) as ei:
        run_encode(_job(inp, index, data_uris=[str(bad)]))
    assert str(bad) in str(ei.value) and str(row * rec) in str(ei.value)
    assert current_version(index) is None
    assert not storage.exists(storage.join(index, "CURRENT"))


def test_skip_bad_ranges_reports_them(ray_session, tiny_index_inputs, tmp_path):
    inp = tiny_index_inputs
    bad = tmp_path / "bad.fvecs"
    shutil.copy(inp["base"], bad)
    with open(bad, "r+b") as f:
        f.seek(1200 * (4 + 64))
        f.write(np.int32(99).tobytes())
    index = str(tmp_path / "index")
    report = run_encode(_job(inp, index, data_uris=[str(bad)], skip_bad_ranges=True))
    assert len(report["bad_ranges"]) == 1
    br = report["bad_ranges"][0]
    assert (br["start"], br["stop"]) == (1000, 1500) and str(1200 * 68) in br["error"]
    m, ids, _, _ = _read_index(index)
    assert len(ids) == 4000 - 500 and not np.isin(np.arange(1000, 1500), ids).any()


def test_dimension_mismatch_rejected_before_work(ray_session, tiny_index_inputs, tmp_path):
    other = tmp_path / "d8.fvecs"
    vecs_io.write_vectors(str(other), np.zeros((10, 8), np.float32))
    index = str(tmp_path / "index")
    with pytest.raises(ConfigError, match="dimension 8"):
        run_encode(_job(tiny_index_inputs, index, data_uris=[str(other)]))
    assert not os.path.exists(index)


def test_prefix_with_other_index_refused_unless_overwrite(ray_session, tiny_index_inputs, tmp_path):
    inp = tiny_index_inputs
    index = str(tmp_path / "index")
    run_encode(_job(inp, index, shard_rows=2000))
    other = tmp_path / "other.fvecs"
    vecs_io.write_vectors(str(other), inp["x"][:1000])
    with pytest.raises(ConfigError, match="different index"):
        run_encode(_job(inp, index, data_uris=[str(other)], shard_rows=2000))
    rep = run_encode(_job(inp, index, data_uris=[str(other)], shard_rows=2000, overwrite=True))
    assert rep["version"] == "v000002" and current_version(index) == "v000002"
    assert load_manifest(index).total_rows == 1000


@pytest.mark.s3
def test_encode_from_and_to_s3(ray_session, tiny_index_inputs, s3):
    inp = tiny_index_inputs
    opts = s3.options()
    bucket = s3.bucket("encode-job")
    data = f"{bucket}/data/base.fvecs"
    model = f"{bucket}/models/tiny"
    storage.write_bytes_atomic(data, open(inp["base"], "rb").read(), opts)
    from pipeline.checkpoint import save_model
    save_model(inp["model_obj"], model, options=opts)
    index = f"{bucket}/index"
    run_encode(_job(inp, index, data_uris=[data], model_uri=model, shard_rows=1000), options=opts)
    _, ids, codes, _ = _read_index(index, options=opts)
    np.testing.assert_array_equal(ids, np.arange(4000))
    np.testing.assert_array_equal(codes, encoder.encode(inp["model_obj"], inp["x"])[0])


def test_error_messages_do_not_leak(tiny_index_inputs, tmp_path):
    with pytest.raises(PipelineError):
        run_encode(_job(tiny_index_inputs, str(tmp_path / "i"), shard_rows=0))
