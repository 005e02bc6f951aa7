"""`ray job submit` of the encode job to a separate local Ray head with the job server.

The head runs on its own ports and temp dir, beside the session Ray of the test run. It is shut
down by terminating exactly the processes whose command line names its temp dir (and their
children), never with `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

RAY = str(pathlib.Path(sys.executable).with_name("ray"))
START_ATTEMPTS = 3  # tries of `ray start` when Ray's own choice of a port clashes with ours


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can see."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = pathlib.Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = pathlib.Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        out[int(d)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    return out


def _head_processes(tag: str) -> list[int]:
    """Processes naming ``tag`` (the head's temp dir) and all their descendants."""
    procs = _processes()
    found = {p for p, (_, cmd) in procs.items() if tag in cmd and p != os.getpid()}
    grew = True
    while grew:
        kids = {p for p, (pp, _) in procs.items() if pp in found and p not in found}
        found |= kids
        grew = bool(kids)
    return sorted(found)


def _stop_head(tag: str) -> list[int]:
    """SIGTERM, then SIGKILL after a grace period; returns what is still alive (should be empty)."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        pids = _head_processes(tag)
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and _head_processes(tag):
            time.sleep(0.2)
    return _head_processes(tag)


@pytest.fixture
def ray_head():
    """A Ray head with the dashboard / job server on free ports; yields the job server address.

    Two logical CPUs: the encode actor and Ray Data's read tasks each need a slot.
    """
    tmp = tempfile.mkdtemp(prefix="qinco-rayhead-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    try:
        # Ports are chosen free here but bound later by Ray, which also picks some of its own at
        # random: when one of those lands on a chosen port, Ray refuses to start before binding
        # anything. Start again with other ports then.
        for attempt in range(START_ATTEMPTS):
            ports = {name: _free_port() for name in (
                "port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
                "node-manager-port", "object-manager-port")}
            cmd = [RAY, "start", "--head", "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                   f"--temp-dir={tmp}", "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
            if r.returncode == 0:
                break
            clash = "that is used by other components" in r.stdout + r.stderr
            if not clash or attempt == START_ATTEMPTS - 1:
                pytest.fail(f"ray start failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
            assert not _stop_head(tmp)
        yield f"http://127.0.0.1:{ports['dashboard-port']}", env
    finally:
        left = _stop_head(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray head processes still running: {left}"


def _submit(address: str, env: dict, submission_id: str, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", address, "--submission-id", submission_id, "--no-wait",
           "--working-dir", str(ROOT), "--", sys.executable, "jobs/encode.py", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=str(ROOT))


def _wait(client, submission_id: str, timeout_s: float = 300.0):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.get_job_status(submission_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1.0)
    client.stop_job(submission_id)
    return client.get_job_status(submission_id)


def test_encode_job_submitted_to_ray_job_server(ray_head, tiny_index_inputs, tmp_path):
    from pipeline.index.manifest import current_version, load_manifest

    address, env = ray_head
    inp = tiny_index_inputs
    index = str(tmp_path / "index")
    args = ["--model", inp["model"], "--data", inp["base"], "--out", index, "--workers", "1",
            "--cpus-per-worker", "0.5", "--shard-rows", "2000"]
    sid = f"encode-test-{os.getpid()}"
    r = _submit(address, env, sid, args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    status = _wait(client, sid)
    logs = client.get_job_logs(sid)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert '"status": "committed"' in logs
    m = load_manifest(index)
    assert current_version(index) == "v000001" and m.total_rows == len(inp["x"]) and len(m.shards) == 2
    report = json.loads(pathlib.Path(index, "versions", "v000001", "report.json").read_text())
    assert report["vectors"] == 4000

    # the same submission id again is refused, and nothing runs
    again = _submit(address, env, sid, args)
    assert again.returncode != 0
    assert "already" in (again.stdout + again.stderr).lower()
    assert [j.submission_id for j in client.list_jobs()].count(sid) == 1
    assert np.array_equal(sorted(os.listdir(os.path.join(index, "versions"))), ["v000001"])
