"""Progress of long work: log lines with totals, rate and time left when not on a terminal, a
tqdm bar when forced (or on a terminal), nothing with QINCO_PROGRESS=off; the encode job's own
lines in place of Ray Data's report; the local Ray's dashboard with QINCO_RAY_DASHBOARD=1."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import urllib.request

import pytest

from pipeline.distributed.cluster import dashboard_wanted
from pipeline.errors import ConfigError
from pipeline.progress import Progress
from pipeline.stages.encode import EncodeJobConfig, run_encode


def test_log_lines_give_total_rate_and_time_left(monkeypatch, caplog):
    monkeypatch.setenv("QINCO_PROGRESS", "log")
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    with Progress(1000, "vectors", "encode", initial=200, every_s=0.0) as p:
        p.update(300, shards="1/3")
        p.update(500)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("encode: 500/1,000 vectors (") and "vectors/s" in lines[0]
    assert "left" in lines[0] and lines[0].endswith("shards 1/3")
    assert lines[1].startswith("encode: 1,000/1,000 vectors") and "left" not in lines[1]
    assert p.done == 1000 and p.rate() > 0


def test_bar_on_request_and_silence(monkeypatch, caplog, capsys):
    monkeypatch.setenv("QINCO_PROGRESS", "bar")
    with Progress(10, "queries", "search") as p:
        p.update(10)
    err = capsys.readouterr().err
    assert "search" in err and "100%" in err and "queries/s" in err
    monkeypatch.setenv("QINCO_PROGRESS", "off")
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    with Progress(10, "queries", "search", every_s=0.0) as p:
        p.update(10)
    assert not caplog.records and not capsys.readouterr().err


def test_training_progress_counts_seconds_of_a_budget_else_epochs(monkeypatch):
    from pipeline.progress import training_progress

    monkeypatch.setenv("QINCO_PROGRESS", "log")
    p = training_progress(10, 600.0, epochs_done=3, seconds_used=120.5)
    assert (p.unit, p.total, p.done) == ("s", 600, 120)
    p = training_progress(10, None, epochs_done=3)
    assert (p.unit, p.total, p.done) == ("epochs", 10, 3)
    p.update(1)
    assert p.line().startswith("train: 4/10 epochs (") and "left" in p.line()
    assert training_progress(None, None) is None



DASHBOARD_PROBE = """
import logging, sys
import ray
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from pipeline.distributed.cluster import ensure_ray
ensure_ray(num_cpus=1)
print("READY", flush=True)
sys.stdin.read()
ray.shutdown()
"""


def test_the_local_ray_dashboard_on_request(tmp_path, monkeypatch):
    """QINCO_RAY_DASHBOARD=1: the local Ray starts with its dashboard, whose address is logged and
    answers HTTP; a value that is neither on nor off is refused before Ray starts."""
    script = tmp_path / "probe.py"
    script.write_text(DASHBOARD_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"QINCO_RAY_DASHBOARD": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("READY"):
                break
        urls = [m.group(1) for m in (re.search(r"Ray dashboard: (http://\S+)", x) for x in lines) if m]
        assert urls and urls[0].startswith("http://127.0.0.1:"), lines
        with urllib.request.urlopen(urls[0] + "/api/version", timeout=30) as r:
            assert r.status == 200 and "ray_version" in r.read().decode()
    finally:
        proc.communicate("", timeout=60)
    assert proc.returncode == 0
    monkeypatch.delenv("QINCO_RAY_DASHBOARD", raising=False)
    assert dashboard_wanted() is False
    monkeypatch.setenv("QINCO_RAY_DASHBOARD", "maybe")
    with pytest.raises(ConfigError, match="QINCO_RAY_DASHBOARD"):
        dashboard_wanted()


@pytest.mark.ray
def test_the_encode_job_logs_its_own_progress_and_not_ray_datas(ray_session, tiny_index_inputs, tmp_path,
                                                                 monkeypatch, caplog):
    """Not on a terminal the encode job's log holds its own lines (vectors, rate, time left), not
    Ray Data's operator report, a block of lines every 10 s (shown with debug logging only)."""
    monkeypatch.setenv("QINCO_PROGRESS", "log")
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    ray_data = []  # Ray Data's logger does not propagate to the root's handlers
    handler = logging.Handler()
    handler.emit = lambda record: ray_data.append(record.getMessage())
    logging.getLogger("ray.data").addHandler(handler)
    try:
        job = EncodeJobConfig(model_uri=tiny_index_inputs["model"], data_uris=[tiny_index_inputs["base"]],
                              index_uri=str(tmp_path / "index"), workers=1, cpus_per_worker=0.5, shard_rows=1000)
        report = run_encode(job)
    finally:
        logging.getLogger("ray.data").removeHandler(handler)
    assert report["status"] == "committed"
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]
    assert any(x.startswith("encode: ") and " vectors (" in x for x in lines), lines
    assert not [x for x in ray_data if "Running Dataset" in x], ray_data[:3]
