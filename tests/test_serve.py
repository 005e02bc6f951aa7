"""The warm search service (`qinco serve`), driven as a user drives it: a separate process with its
own Ray, queried over HTTP, swapped to a new version under load, stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import ROOT, clustered_vectors
from pipeline.api import open_index, open_service
from pipeline.index.manifest import current_version
from pipeline.io import vectors
from pipeline.stages.encode import EncodeJobConfig, run_encode

pytestmark = pytest.mark.ray

PARAMS = {"k": 10, "nprobe": 3, "shortlist": 40}


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(p)
        except OSError:
            pass
    return alive


def _post(url: str, body, timeout: float = 60.0) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/search", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return json.loads(r.read())


def _start(index_uri: str) -> tuple[subprocess.Popen, str, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--index", index_uri, "--port", "0", "--workers", "1",
         "--cpus-per-worker", "0.5", "--poll-s", "0.3", "--report-s", "1", "--nprobe", "3", "--shortlist", "40"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(ROOT))
    lines: list[str] = []
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"at (http://[\d.]+:\d+)", line)
        if m:
            reader = threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True)
            reader.start()
            return proc, m.group(1), lines
    proc.kill()
    raise AssertionError("the service did not start:\n" + "".join(lines))


def test_serve_answers_swaps_under_load_and_stops_cleanly(ray_session, tiny_index_inputs, tmp_path):
    inp = tiny_index_inputs
    index_uri = str(tmp_path / "index")
    run_encode(EncodeJobConfig(model_uri=inp["model"], data_uris=[inp["base"]], index_uri=index_uri, workers=1,
                               cpus_per_worker=0.5, shard_rows=2000), progress=False)
    proc, url, lines = _start(index_uri)
    try:
        children = _descendants(proc.pid)
        assert children, "the service runs its own Ray"
        # the HTTP answer is the in-process searcher's (the same stages)
        status, body = _post(url, {"queries": inp["q"].tolist(), **PARAMS})
        assert status == 200, body
        D_ref, I_ref = open_index(index_uri).search(inp["q"], **PARAMS)
        assert body["version"] == "v000001"
        np.testing.assert_array_equal(np.array(body["ids"]), I_ref)
        np.testing.assert_allclose(np.array(body["distances"]), D_ref, rtol=1e-5)
        # bad requests are refused with a reason, and the service goes on
        status, body = _post(url, {"queries": inp["q"][:2].tolist(), "nprobes": 3})
        assert status == 400 and "nprobes" in body["error"]
        status, body = _post(url, b"not json")
        assert status == 400 and "JSON" in body["error"]
        status, body = _post(url, {"queries": [[1.0, 2.0]]})
        assert status == 400 and "16" in body["error"]
        status, body = _post(url, {"queries": [[float("nan")] * 16]})
        assert status == 400 and "NaN" in body["error"]

        # load from a client thread while a new version is committed
        answers: list[tuple[int, str | None]] = []
        stop = threading.Event()

        def load():
            i = 0
            while not stop.is_set():
                q = inp["q"][i % 50: i % 50 + 5]
                s, b = _post(url, {"queries": q.tolist(), "k": 5})
                answers.append((s, b.get("version") if s == 200 else b.get("error")))
                i += 5

        client = threading.Thread(target=load)
        client.start()
        extra = clustered_vectors(300, 16, seed=21)
        vectors.write_vectors(str(tmp_path / "extra.fvecs"), extra)
        run_encode(EncodeJobConfig(model_uri=inp["model"], data_uris=[inp["base"], str(tmp_path / "extra.fvecs")],
                                   index_uri=index_uri, workers=1, cpus_per_worker=0.5, shard_rows=2000,
                                   overwrite=True), progress=False)
        assert current_version(index_uri) == "v000002"
        deadline = time.time() + 180
        while _get(url, "/health")["version"] != "v000002":
            assert time.time() < deadline, "the service did not swap:\n" + "".join(lines)
            time.sleep(0.2)
        n_at_swap = len(answers)
        while len(answers) < n_at_swap + 5:
            time.sleep(0.1)
        stop.set()
        client.join()
        assert all(s == 200 for s, _ in answers), [a for a in answers if a[0] != 200][:3]
        versions = [v for _, v in answers]
        assert "v000001" in versions and versions[-1] == "v000002"
        assert versions == sorted(versions), "an answer from the old version came after the new one's"
        # the new version's vectors are found
        status, body = _post(url, {"queries": extra[:20].tolist(), "k": 1})
        assert status == 200 and body["version"] == "v000002"
        assert np.mean(np.array(body["ids"])[:, 0] == 4000 + np.arange(20)) >= 0.8

        stats = _get(url, "/stats")
        assert stats["swaps"] == 1 and stats["errors"] == 0 and stats["bad_requests"] == 3
        assert stats["requests"] == len(answers) + 2
        assert 0 < stats["latency_p50_ms"] <= stats["latency_p99_ms"] and stats["queries_per_s"] > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    time.sleep(1)  # the last lines
    assert rc == 0, f"rc {rc}:\n" + "".join(lines[-30:])
    assert any(line.startswith("stopped:") for line in lines)
    deadline = time.time() + 60
    while _alive(children) and time.time() < deadline:
        time.sleep(0.5)
    assert not _alive(children), f"processes left behind: {_alive(children)}"


def test_a_swap_the_cluster_cannot_place_is_refused_and_the_old_version_serves(ray_session, tiny_index_inputs,
                                                                             tmp_path):
    """The new version's actors start beside the served ones: where the free CPUs cannot hold them
    (Ray would leave them pending, the swap waiting for good) the swap is refused at once, saying
    what is short, and the served version goes on answering."""
    inp = tiny_index_inputs
    index_uri = str(tmp_path / "index")
    run_encode(EncodeJobConfig(model_uri=inp["model"], data_uris=[inp["base"]], index_uri=index_uri, workers=1,
                               cpus_per_worker=0.25, shard_rows=2000), progress=False)
    # two actors taking three quarters of the free CPUs: a second pair cannot be placed
    free = ray_session.available_resources()["CPU"]
    with open_service(index_uri, workers=2, cpus_per_worker=0.375 * free, poll_s=3600.0, **PARAMS) as service:
        vectors.write_vectors(str(tmp_path / "extra.fvecs"), clustered_vectors(300, 16, seed=22))
        run_encode(EncodeJobConfig(model_uri=inp["model"], data_uris=[inp["base"], str(tmp_path / "extra.fvecs")],
                                   index_uri=index_uri, workers=1, cpus_per_worker=0.25, shard_rows=2000,
                                   overwrite=True), progress=False)
        assert current_version(index_uri) == "v000002"
        assert service.swap_to_current() is False
        assert service.version == "v000001"
        assert "v000002" in service.swap_error and "CPUs" in service.swap_error and "free" in service.swap_error
        D, I, v = service.search(inp["q"][:5])
        assert v == "v000001" and I.shape == (5, PARAMS["k"])
        assert service.stats()["swap_error"] == service.swap_error
    # the actors have ended: their CPUs come free again (Ray's view is updated asynchronously)
    deadline = time.time() + 60
    while ray_session.available_resources().get("CPU", 0.0) < free - 1e-6:
        assert time.time() < deadline, ray_session.available_resources()
        time.sleep(0.2)
