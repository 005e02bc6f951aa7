"""The query job in blocks: a job killed part-way resumes from its last written block and writes the
same results as a run that was never interrupted, on the version it started with."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, clustered_vectors
from pipeline.distributed.shard_pool import ShardPool
from pipeline.index.manifest import current_version
from pipeline.io import results, storage, vectors
from pipeline.search.params import SearchParams
from pipeline.stages.encode import EncodeJobConfig, run_encode
from pipeline.stages.search import STATE_FILE, SearchJobConfig, parts_dir, run_search

pytestmark = pytest.mark.ray

PARAMS = SearchParams(k=10, nprobe=3, shortlist=40)


@pytest.fixture(scope="module")
def index(ray_session, tiny_index_inputs, tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    uri = str(d / "index")
    run_encode(EncodeJobConfig(model_uri=tiny_index_inputs["model"], data_uris=[tiny_index_inputs["base"]],
                               index_uri=uri, workers=1, cpus_per_worker=0.5, shard_rows=2000), progress=False)
    queries = str(d / "queries.fvecs")
    vectors.write_vectors(queries, clustered_vectors(12_000, 16, seed=5))
    return {"uri": uri, "queries": queries, "dir": d}


def _job(index, out, **kw):
    return SearchJobConfig(index_uri=index["uri"], queries_uri=index["queries"], out_uri=out, workers=1,
                           cpus_per_worker=0.5, **{"params": PARAMS, "query_batch": 40, **kw})


def _parts(out):
    return sorted(u for u in storage.list_files(parts_dir(out)) if u.endswith(".npz"))


def test_a_killed_query_job_resumes_and_writes_the_same_results(index, tiny_index_inputs, tmp_path):
    whole = str(tmp_path / "whole.bin")
    rep = run_search(_job(index, whole))
    assert rep["blocks"] == 300 and rep["blocks_resumed"] == 0 and rep["queries_searched_this_run"] == 12_000
    assert not os.path.exists(parts_dir(whole)), "the parts are removed once the results are written"

    # the same job as a command, killed (SIGKILL) once some blocks are written
    out = str(tmp_path / "killed.bin")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "search", "--index", index["uri"], "--queries",
                             index["queries"], "--out", out, "--k", "10", "--nprobe", "3", "--shortlist", "40",
                             "--workers", "1", "--cpus-per-worker", "0.5", "--query-batch", "40"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=str(ROOT))
    deadline = time.time() + 240
    while len(_parts(out)) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = len(_parts(out))
    assert 5 <= done < 300, f"{done} blocks written before the kill"
    assert not os.path.exists(out), "no results file before every block is searched"

    # a new version is committed meanwhile: the resumed job stays on the version it started with
    run_encode(EncodeJobConfig(model_uri=tiny_index_inputs["model"], data_uris=[tiny_index_inputs["base"]],
                               index_uri=index["uri"], workers=1, cpus_per_worker=0.5, shard_rows=1000,
                               overwrite=True), progress=False)
    assert current_version(index["uri"]) == "v000002"
    rep = run_search(_job(index, out))
    assert rep["version"] == "v000001"
    assert rep["blocks_resumed"] >= done and rep["queries_searched_this_run"] == 12_000 - 40 * rep["blocks_resumed"]
    with open(whole, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()
    for x, y in zip(results.read_results(whole + ".parquet"), results.read_results(out + ".parquet")):
        np.testing.assert_array_equal(x, y)
    assert not os.path.exists(parts_dir(out))


def test_parts_of_another_job_are_not_reused(index, tmp_path, monkeypatch):
    out = str(tmp_path / "r.bin")
    calls = {"n": 0}
    search_batch = ShardPool.search_batch

    def dies_after_three(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return search_batch(self, *a, **kw)

    monkeypatch.setattr(ShardPool, "search_batch", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_search(_job(index, out, max_queries=400))
    monkeypatch.setattr(ShardPool, "search_batch", search_batch)
    assert len(_parts(out)) == 3 and storage.exists(storage.join(parts_dir(out), STATE_FILE))
    # other parameters into the same out: nothing of the first job is used
    rep = run_search(_job(index, out, max_queries=400, params=SearchParams(k=5, nprobe=2, shortlist=20)))
    assert rep["blocks_resumed"] == 0 and rep["queries_searched_this_run"] == 400
    I, D = results.read_results(out)
    assert I.shape == (400, 5)
    ref = str(tmp_path / "ref.bin")
    run_search(_job(index, ref, max_queries=400, query_batch=400, params=SearchParams(k=5, nprobe=2, shortlist=20)))
    np.testing.assert_array_equal(results.read_results(ref)[0], I)
