"""Plans before work (`--dry-run`): what the encode and query jobs need, and refusals of jobs the
given resources cannot hold, before anything is written."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.codec.model import config_from_preset
from pipeline.errors import ConfigError
from pipeline.io import vectors
from pipeline.search.params import SearchParams
from pipeline.stages.encode import EncodeJobConfig, run_encode
from pipeline.stages.plan import (REFERENCE_ENCODER, REFERENCE_VECTORS_PER_CORE_S, check_plan,
                                  encode_rate_per_core, plan_encode, plan_search)

ROOMY = {"where": "the test cluster", "cpus": 64.0, "memory_bytes": 256 << 30, "disk_free_bytes": 1 << 40}


def test_encode_plan_counts_the_job_and_fits(tiny_index_inputs, tmp_path, capsys):
    out = tmp_path / "index"
    rc = main(["encode", "--model", tiny_index_inputs["model"], "--data", tiny_index_inputs["base"],
               "--out", str(out), "--workers", "1", "--shard-rows", "1500", "--dry-run"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "4,000 in 1 files, dimension 16" in text and "shards       3," in text and "fits" in text
    assert not out.exists(), "a dry run writes nothing"
    plan = plan_encode(tiny_index_inputs["model"], [tiny_index_inputs["base"]], str(out), workers=2,
                       cpus_per_worker=1, shard_rows=1500, res=ROOMY)
    assert (plan["vectors"], plan["shards"], plan["code_bytes"], plan["problems"]) == (4000, 3, 2.0, [])
    assert plan["disk_bytes"] >= 4000 * 2 and plan["encode_s"] > 0


def test_encode_plan_refuses_what_the_resources_cannot_hold(tiny_index_inputs, tmp_path, capsys):
    out = tmp_path / "index"
    # more CPUs than this machine has: refused in one line, before any work
    rc = main(["encode", "--model", tiny_index_inputs["model"], "--data", tiny_index_inputs["base"],
               "--out", str(out), "--workers", "4096", "--cpus-per-worker", "1", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot run" in err and "4096 actors of 1 CPUs need 4096 CPUs" in err
    assert not out.exists()
    small = {"where": "a small node", "cpus": 2.0, "memory_bytes": 1 << 30, "disk_free_bytes": 10_000}
    plan = plan_encode(tiny_index_inputs["model"], [tiny_index_inputs["base"]], str(out), workers=2,
                       cpus_per_worker=1, res=small)
    problems = " | ".join(plan["problems"])
    assert "GiB free" in problems and "disk with" in problems and len(plan["problems"]) == 2
    with pytest.raises(ConfigError, match="cannot run.*disk"):
        check_plan(plan)
    other = str(tmp_path / "eight.fvecs")
    vectors.write_vectors(other, np.zeros((10, 8), np.float32))
    wrong = plan_encode(tiny_index_inputs["model"], [other], str(out), workers=1, cpus_per_worker=1, res=ROOMY)
    assert wrong["problems"] == ["the vectors have dimension 8, the model 16"]


def test_encode_time_scales_with_the_encoders_work():
    assert encode_rate_per_core(REFERENCE_ENCODER) == pytest.approx(REFERENCE_VECTORS_PER_CORE_S)
    wider = encode_rate_per_core(REFERENCE_ENCODER, A=16, B=16)
    assert wider < REFERENCE_VECTORS_PER_CORE_S / 2
    bigger = config_from_preset("qinco2-L", 128, M=8, K=256, nlist=4096)
    assert encode_rate_per_core(bigger) < REFERENCE_VECTORS_PER_CORE_S


@pytest.mark.ray
def test_search_plan_places_the_shards_and_refuses_small_actors(ray_session, tiny_index_inputs, tmp_path, capsys,
                                                                monkeypatch):
    uri = str(tmp_path / "index")
    run_encode(EncodeJobConfig(model_uri=tiny_index_inputs["model"], data_uris=[tiny_index_inputs["base"]],
                               index_uri=uri, workers=1, cpus_per_worker=0.5, shard_rows=1000), progress=False)
    params = SearchParams(k=10, nprobe=2, shortlist=40)
    plan = plan_search(uri, tiny_index_inputs["query"], params, workers=2, cpus_per_worker=1, res=ROOMY)
    assert (plan["vectors"], plan["shards"], plan["queries"], plan["actors"]) == (4000, 4, 50, 2)
    assert sorted(plan["actor_rows"]) == [2000, 2000] and plan["problems"] == []
    assert plan["codes_scanned_per_query"] == pytest.approx(4000 * 2 / 8)
    tight = plan_search(uri, tiny_index_inputs["query"], params, workers=2, cpus_per_worker=1,
                        memory_per_actor=64 << 20, res=ROOMY)
    assert any("cannot hold them" in p for p in tight["problems"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = main(["search", "--index", uri, "--queries", tiny_index_inputs["query"], "--out", str(tmp_path / "r.bin"),
               "--memory-per-actor", "64M", "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 2 and "cannot hold them" in captured.err and "CANNOT RUN" in captured.out
    assert not (tmp_path / "r.bin").exists()
