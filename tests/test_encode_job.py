"""The Ray Data encode job: byte-range reads -> actor pool -> IVF shards -> atomic manifest."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from pipeline.codec import encoder

from pipeline.io import storage, vectors
from pipeline.stages.encode import EncodeJobConfig, plan_ranges, run_encode, STALE_TEMP_S
from pipeline.distributed.encode import EncodeActor
from pipeline.errors import ConfigError, PipelineError, VectorFormatError
from pipeline.index.manifest import current_version, load_manifest, version_dir
from pipeline.index.shards import read_shard
from pipeline.codec.model_file import load_model, model_identity, save_model

pytestmark = pytest.mark.ray


def _job(inp, index_uri, **kw):
    base = dict(model_uri=inp["model"], data_uris=[inp["base"]], index_uri=index_uri,
                workers=2, cpus_per_worker=0.5, shard_rows=500, batch_size=256)
    base.update(kw)
    return EncodeJobConfig(**base)


def _read_index(index_uri, options=None, with_scales=False):
    m = load_manifest(index_uri, options=options)
    vuri = version_dir(index_uri, m.version)
    ids, codes, lists, scales = [], [], [], []
    for s in m.shards:
        sh = read_shard(storage.join(vuri, s.name), expected=s.info(), options=options, nlist=m.code["nlist"] or 1)
        ids.append(sh.ids_N)
        codes.append(sh.codes_NM)
        lists.append(sh.list_ids_N)
        scales.append(sh.lut_scale_N)
    ids = np.concatenate(ids)
    order = np.argsort(ids)
    if with_scales:
        return m, ids[order], np.concatenate(scales)[order]
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
    # every shard stores its rows' lookup-table scales: those a search would compute from the codes
    from pipeline.codec.decoder import model_row_scales

    scales = _read_index(index, with_scales=True)[2]
    ref_scales = model_row_scales(inp["model_obj"], ref_codes, ref_lists)
    assert scales.dtype == np.float16 and np.abs(ref_scales.astype(np.float64) - 1).max() > 0.01
    np.testing.assert_allclose(scales, ref_scales, rtol=1e-3)  # decoded in other batches: an ulp at most
    assert (scales == ref_scales).mean() > 0.99
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
    from pipeline.io.inputs import plan_inputs
    inputs = plan_inputs(cfg.data_uris)
    vuri = version_dir(partial, "v000001")
    storage.write_bytes_atomic(storage.join(vuri, "job.json"), json.dumps(
        {"identity": cfg.identity(), "model_sha256": model_identity(cfg.model_uri)["config_sha256"],
         "config": cfg.to_dict()}).encode())
    actor = EncodeActor(cfg.model_uri, vuri, inputs, batch_size=256, threads=1)
    tasks = plan_ranges(inputs, cfg.shard_rows)
    for tk in tasks[:2]:
        x = vectors.read_rows(inp["base"], tk.start, tk.stop)
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
    vectors.write_vectors(str(other), np.zeros((10, 8), np.float32))
    index = str(tmp_path / "index")
    with pytest.raises(ConfigError, match="dimension 8"):
        run_encode(_job(tiny_index_inputs, index, data_uris=[str(other)]))
    assert not os.path.exists(index)


def test_prefix_with_other_index_refused_unless_overwrite(ray_session, tiny_index_inputs, tmp_path):
    inp = tiny_index_inputs
    index = str(tmp_path / "index")
    run_encode(_job(inp, index, shard_rows=2000))
    other = tmp_path / "other.fvecs"
    vectors.write_vectors(str(other), inp["x"][:1000])
    with pytest.raises(ConfigError, match="different index"):
        run_encode(_job(inp, index, data_uris=[str(other)], shard_rows=2000))
    rep = run_encode(_job(inp, index, data_uris=[str(other)], shard_rows=2000, overwrite=True))
    assert rep["version"] == "v000002" and current_version(index) == "v000002"
    assert load_manifest(index).total_rows == 1000


def test_lut_weight_reaches_the_codes_and_is_part_of_the_job(ray_session, tiny_index_inputs, tmp_path):
    inp = tiny_index_inputs
    index = str(tmp_path / "index")
    run_encode(_job(inp, index, shard_rows=2000, lut_weight=5.0))
    m, ids, codes, lists = _read_index(index)
    ref_codes, ref_lists = encoder.encode(inp["model_obj"], inp["x"], lut_weight=5.0)
    np.testing.assert_array_equal(codes, ref_codes)
    plain, _ = encoder.encode(inp["model_obj"], inp["x"])
    assert (codes != plain).any(1).sum() > 0  # the choice changed some vectors' codes
    assert m.job_config["lut_weight"] == 5.0
    # the same prefix with the neural-best codes is a different index, not an up-to-date one
    with pytest.raises(ConfigError, match="different index"):
        run_encode(_job(inp, index, shard_rows=2000))
    assert run_encode(_job(inp, index, shard_rows=2000, lut_weight=5.0))["status"] == "up-to-date"
    with pytest.raises(ConfigError, match="lut_weight must be >= 0"):  # refused before any work
        run_encode(_job(inp, str(tmp_path / "other"), lut_weight=-1.0))
    assert not os.path.exists(tmp_path / "other")


def test_encoder_A_and_B_reach_the_codes_and_are_part_of_the_job(ray_session, tiny_index_inputs, tmp_path):
    inp = tiny_index_inputs
    index = str(tmp_path / "index")
    run_encode(_job(inp, index, shard_rows=2000, A=1, B=1))
    m, ids, codes, lists = _read_index(index)
    np.testing.assert_array_equal(codes, encoder.encode(inp["model_obj"], inp["x"], A=1, B=1)[0])
    assert (codes != encoder.encode(inp["model_obj"], inp["x"])[0]).any(1).sum() > 0  # not the model's A, B
    assert (m.job_config["A"], m.job_config["B"]) == (1, 1)
    with pytest.raises(ConfigError, match="different index"):  # the model's own A and B: another index
        run_encode(_job(inp, index, shard_rows=2000))
    assert run_encode(_job(inp, index, shard_rows=2000, A=1, B=1))["status"] == "up-to-date"
    for bad, msg in ((dict(A=0), "A .* must be in"), (dict(A=10**4), "A .* must be in"), (dict(B=0), "B .* >= 1")):
        with pytest.raises(ConfigError, match=msg):  # refused before any work
            run_encode(_job(inp, str(tmp_path / "other"), **bad))
    assert not os.path.exists(tmp_path / "other")


def test_default_cpus_leave_room_for_the_read_tasks(ray_session, tiny_index_inputs, tmp_path):
    """With the CLI's default CPUs per actor the job runs on a 2-CPU cluster: the actors leave a
    reserve and the read tasks ask for less than it (with Ray's default of one CPU per read task,
    reads waited forever beside two actors of 0.75 CPU)."""
    import threading

    from pipeline.distributed.cluster import cpus_share, default_cpus_per_worker
    from pipeline.distributed.datasource import READ_TASK_CPUS

    assert [cpus_share(t, w) for t, w in ((2, 2), (4, 4), (16, 2), (1, 4))] == [0.75, 0.75, 1.0, 0.25]
    cpus = default_cpus_per_worker(2)
    assert ray_session.cluster_resources()["CPU"] == 2 and 2 * cpus + READ_TASK_CPUS <= 2
    out: dict = {}
    job = _job(tiny_index_inputs, str(tmp_path / "index"), cpus_per_worker=cpus, shard_rows=1000)
    t = threading.Thread(target=lambda: out.update(rep=run_encode(job)), daemon=True)
    t.start()
    t.join(timeout=180)
    assert not t.is_alive(), "the encode job did not finish: its read tasks found no CPU"
    assert out["rep"]["status"] == "committed" and out["rep"]["vectors"] == 4000


def test_precision_reaches_the_codes_and_is_part_of_the_job(ray_session, tiny_index_inputs, tmp_path):
    import torch

    inp = tiny_index_inputs
    model = load_model(inp["model"])
    with torch.no_grad():  # the tiny model has no trained network: give it one that matters
        g = torch.Generator().manual_seed(0)
        for step in model.steps[1:]:
            for prm in (step.out_proj.weight, step.concat_x.weight, step.concat_c.weight):
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
    save_model(model, str(tmp_path / "model"))
    index = str(tmp_path / "index")
    job = dict(model_uri=str(tmp_path / "model"), shard_rows=2000)
    run_encode(_job(inp, index, precision="bfloat16", **job))
    m, ids, codes, lists = _read_index(index)
    np.testing.assert_array_equal(codes, encoder.encode(model, inp["x"], precision="bfloat16")[0])
    assert (codes != encoder.encode(model, inp["x"])[0]).any(1).sum() > 0  # not float32's codes
    assert m.job_config["precision"] == "bfloat16"
    with pytest.raises(ConfigError, match="different index"):  # float32 codes are another index
        run_encode(_job(inp, index, **job))
    assert run_encode(_job(inp, index, precision="bfloat16", **job))["status"] == "up-to-date"
    for bad, msg in (("float16", "needs a CUDA device"), ("int8", "precision must be one of")):
        with pytest.raises(ConfigError, match=msg):  # refused before any work
            run_encode(_job(inp, str(tmp_path / "other"), precision=bad, **job))
    assert not os.path.exists(tmp_path / "other")


@pytest.mark.s3
def test_encode_from_and_to_s3(ray_session, tiny_index_inputs, s3):
    inp = tiny_index_inputs
    opts = s3.options()
    bucket = s3.bucket("encode-job")
    data = f"{bucket}/data/base.fvecs"
    model = f"{bucket}/models/tiny"
    storage.write_bytes_atomic(data, open(inp["base"], "rb").read(), opts)
    from pipeline.codec.model_file import save_model
    save_model(inp["model_obj"], model, options=opts)
    index = f"{bucket}/index"
    run_encode(_job(inp, index, data_uris=[data], model_uri=model, shard_rows=1000), options=opts)
    _, ids, codes, _ = _read_index(index, options=opts)
    np.testing.assert_array_equal(ids, np.arange(4000))
    np.testing.assert_array_equal(codes, encoder.encode(inp["model_obj"], inp["x"])[0])


def test_error_messages_do_not_leak(tiny_index_inputs, tmp_path):
    with pytest.raises(PipelineError):
        run_encode(_job(tiny_index_inputs, str(tmp_path / "i"), shard_rows=0))


def _comparable(m):
    """A manifest as a dict, without what legitimately differs between two runs of one job."""
    d = m.to_dict()
    for k in ("created", "code_version"):
        d.pop(k)
    d["job_config"] = {k: v for k, v in d["job_config"].items() if k != "index_uri"}
    return d


def test_sigkilled_job_resumes_to_same_index(ray_session, tiny_index_inputs, tmp_path):
    """A real kill: `python -m pipeline encode` attached to the session's Ray is SIGKILLed once its
    first shard is written; the same job re-run here completes to the same manifest and bytes."""
    import glob
    import signal
    import subprocess
    import sys
    import time

    import ray

    from conftest import ROOT, clustered_vectors

    inp = tiny_index_inputs
    base = str(tmp_path / "base.fvecs")
    vectors.write_vectors(base, clustered_vectors(12000, 16, seed=7))
    killed, full = str(tmp_path / "killed"), str(tmp_path / "full")
    job = dict(data_uris=[base], workers=1, cpus_per_worker=0.5, shard_rows=500, batch_size=256)
    cmd = [sys.executable, "-m", "pipeline", "encode", "--model", inp["model"], "--data", base, "--out", killed,
           "--workers", "1", "--cpus-per-worker", "0.5", "--shard-rows", "500", "--batch-size", "256"]
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=str(ROOT))
    log_path = tmp_path / "killed.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=logf, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            pattern = os.path.join(killed, "versions", "*", "shards", "*.parquet.json")
            while proc.poll() is None and not glob.glob(pattern) and time.monotonic() < deadline:
                time.sleep(0.01)
            exited_by_itself = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert not exited_by_itself, f"encode subprocess ended before the kill:\n{log_path.read_text()[-3000:]}"
    assert glob.glob(pattern), f"no shard written within 120 s:\n{log_path.read_text()[-3000:]}"
    assert current_version(killed) is None  # killed before the commit: readers see no index
    # temporary files of killed writers: an old one is cleaned up, a recent one (maybe a live
    # writer's) is left alone
    shard_dir = os.path.dirname(glob.glob(pattern)[0])
    stale, fresh = os.path.join(shard_dir, ".x.parquet.a1.tmp"), os.path.join(shard_dir, ".y.parquet.b2.tmp")
    for path in (stale, fresh):
        with open(path, "wb") as f:
            f.write(b"partial")
    old = time.time() - 2 * STALE_TEMP_S
    os.utime(stale, (old, old))

    resumed = run_encode(_job(inp, killed, **job))
    assert not os.path.exists(stale) and os.path.exists(fresh)
    os.unlink(fresh)
    reference = run_encode(_job(inp, full, **job))
    assert resumed["version"] == "v000001"  # the killed run's directory was resumed
    assert reference["shards_encoded_this_run"] == reference["shards"] == 24
    assert 0 < resumed["shards_encoded_this_run"] < resumed["shards"]
    m_k, m_f = load_manifest(killed), load_manifest(full)
    assert _comparable(m_k) == _comparable(m_f)
    for s in m_f.shards:
        a = storage.read_bytes(storage.join(version_dir(killed, m_k.version), s.name))
        b = storage.read_bytes(storage.join(version_dir(full, m_f.version), s.name))
        assert a == b, s.name
    assert set(resumed["actor_peak_rss_bytes"].values()) and min(resumed["actor_peak_rss_bytes"].values()) > 0
    private = resumed["actor_private_bytes"]  # without shared pages: at most the whole peak
    assert private.keys() == resumed["actor_peak_rss_bytes"].keys()
    assert all(0 < private[p] <= resumed["actor_peak_rss_bytes"][p] for p in private)


def test_resume_never_reuses_shards_of_a_replaced_model(ray_session, tiny_index_inputs, tmp_path):
    """Shards left by an interrupted run are not reused once the model at the same URI changed."""
    import torch

    inp = tiny_index_inputs
    model_uri = str(tmp_path / "model")
    shutil.copytree(inp["model"], model_uri)
    index = str(tmp_path / "index")
    cfg = _job(inp, index, model_uri=model_uri, shard_rows=1000)
    from pipeline.io.inputs import plan_inputs

    # an interrupted run with the original model: job.json as run_encode writes it + two shards
    inputs = plan_inputs(cfg.data_uris)
    vuri = version_dir(index, "v000001")
    storage.write_bytes_atomic(storage.join(vuri, "job.json"), json.dumps(
        {"identity": cfg.identity(), "model_sha256": model_identity(model_uri)["config_sha256"],
         "config": cfg.to_dict()}).encode())
    actor = EncodeActor(model_uri, vuri, inputs, batch_size=256, threads=1)
    for start in (0, 1000):
        x = vectors.read_rows(inp["base"], start, start + 1000)
        actor({"id": np.arange(start, start + 1000), "file_index": np.zeros(1000, np.int32),
               "row": np.arange(start, start + 1000), "vector": x})

    # the model is retrained in place (same URI, different weights)
    new = load_model(model_uri)
    with torch.no_grad():
        for st in new.steps:
            st.codebook_KD.mul_(-1.0)
    save_model(new, model_uri)
    new_codes = encoder.encode(new, inp["x"])[0]
    old_codes = encoder.encode(inp["model_obj"], inp["x"])[0]
    assert not np.array_equal(new_codes[:2000], old_codes[:2000])

    report = run_encode(cfg)
    assert report["version"] == "v000002" and report["shards_encoded_this_run"] == 4
    _, ids, codes, _ = _read_index(index)
    np.testing.assert_array_equal(ids, np.arange(4000))
    np.testing.assert_array_equal(codes, new_codes)


def _two_jobs_race(inp, index, other_uri, options=None) -> None:
    """Job A claims v000001 and encodes; job B, started later on other data, commits first."""
    from pipeline.errors import ConcurrentWriterError
    from pipeline.stages import encode as stage

    cfg_a = _job(inp, index, shard_rows=2000)
    plan_a = stage._plan(cfg_a, options)
    assert plan_a.version == "v000001"
    rep_b = run_encode(_job(inp, index, data_uris=[other_uri], shard_rows=2000), options=options)
    assert rep_b["version"] == "v000002" and current_version(index, options) == "v000002"
    done_a, _ = stage._encode_pending(cfg_a, plan_a, False, options)
    with pytest.raises(ConcurrentWriterError, match="CURRENT names v000002, newer than this job's v000001"):
        stage._commit(cfg_a, plan_a, done_a, options)
    assert current_version(index, options) == "v000002" and load_manifest(index, options=options).total_rows == 1000
    # B's index is there now: A's re-run must say --overwrite, and then builds after it, from
    # the shards it had finished
    with pytest.raises(ConfigError, match="different index"):
        run_encode(cfg_a, options=options)
    rep = run_encode(_job(inp, index, shard_rows=2000, overwrite=True), options=options)
    assert rep["version"] == "v000003" and current_version(index, options) == "v000003"
    assert rep["shards_encoded_this_run"] == 0 and rep["shards_reused_this_run"] == 2
    assert load_manifest(index, options=options).total_rows == 4000


def test_two_jobs_into_one_index_the_later_commit_wins_cleanly(ray_session, tiny_index_inputs, tmp_path):
    other = tmp_path / "other.fvecs"
    vectors.write_vectors(str(other), tiny_index_inputs["x"][:1000])
    _two_jobs_race(tiny_index_inputs, str(tmp_path / "index"), str(other))


@pytest.mark.s3
def test_two_jobs_into_one_index_on_s3(ray_session, tiny_index_inputs, s3, tmp_path):
    bucket, opts = s3.bucket("two-jobs"), s3.options()
    local_other = tmp_path / "other.fvecs"
    vectors.write_vectors(str(local_other), tiny_index_inputs["x"][:1000])
    uris = {}
    for name, path in (("other", str(local_other)), ("base", tiny_index_inputs["base"])):
        uris[name] = storage.join(bucket, f"{name}.fvecs")
        storage.write_bytes_atomic(uris[name], open(path, "rb").read(), opts)
    _two_jobs_race({**tiny_index_inputs, "base": uris["base"]}, storage.join(bucket, "index"), uris["other"], opts)


def test_what_reaches_the_driver_does_not_grow_with_the_rows(tiny_index_inputs, tmp_path):
    """An encode actor writes its shard itself and returns one small row of metadata per range,
    whatever the range's size: the driver never holds codes or ids."""
    inp = tiny_index_inputs
    from pipeline.io.inputs import plan_inputs

    inputs = plan_inputs([inp["base"]])
    actor = EncodeActor(inp["model"], str(tmp_path / "v"), inputs, batch_size=256, threads=1)
    sizes = {}
    for n in (100, 4000):
        x = vectors.read_rows(inp["base"], 0, n)
        out = actor({"id": np.arange(n), "file_index": np.zeros(n, np.int32), "row": np.arange(n), "vector": x})
        assert all(len(v) == 1 for v in out.values())
        sizes[n] = sum(len(str(v[0])) for v in out.values())
    assert sizes[4000] <= sizes[100] + 16 and sizes[4000] < 1024, sizes  # a few digits more, no rows


def test_finding_done_shards_costs_one_listing_for_a_new_version(tiny_index_inputs, tmp_path, monkeypatch):
    """Planning (and resuming) looks for finished shards with one listing; only shards found
    there are read, so 20,000 ranges of a new version cost one request, not 20,000."""
    from pipeline.distributed import encode as dist
    from pipeline.index.shards import shard_name
    from pipeline.io.inputs import plan_inputs
    from pipeline.stages.encode import RangeTask

    calls = {"exists": 0, "read_bytes": 0, "list_files": 0}
    for name in calls:
        real = getattr(storage, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(storage, name, counted)
    tasks = [RangeTask(0, i * 10, i * 10 + 10, f"shards/{shard_name(0, i * 10)}") for i in range(20000)]
    vuri = str(tmp_path / "versions" / "v000001")
    assert dist.shards_done(vuri, tasks) == {}
    assert calls == {"exists": 0, "read_bytes": 0, "list_files": 1}
    # a shard written earlier is found and verified; the others still cost nothing
    inputs = plan_inputs([tiny_index_inputs["base"]])
    actor = EncodeActor(tiny_index_inputs["model"], vuri, inputs, batch_size=256, threads=1)
    x = vectors.read_rows(tiny_index_inputs["base"], 10, 20)
    actor({"id": np.arange(10, 20), "file_index": np.zeros(10, np.int32), "row": np.arange(10, 20), "vector": x})
    calls.update({k: 0 for k in calls})
    done = dist.shards_done(vuri, tasks)
    assert list(done) == [tasks[1].shard] and done[tasks[1].shard]["rows"] == 10  # with its sidecar record
    assert calls["list_files"] == 1 and calls["exists"] <= 3 and calls["read_bytes"] <= 3
