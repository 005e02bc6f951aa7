"""Multi-node faults on a real Ray cluster on this machine (a head and two worker nodes, S3 the
only shared storage): a node lost mid-encode and mid-search, a Ray Train worker killed mid-epoch.
Each case runs in a process of its own (``multinode_faults.py``), beside this session's Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multinode_faults.py")


def _run(case: str, s3, tmp_path) -> dict:
    bucket = s3.bucket(f"multinode-{case}")
    env = {**os.environ, **s3.server.env(), "RAY_DEDUP_LOGS": "0"}
    out = subprocess.run([sys.executable, SCRIPT, case, f"{bucket}/work", str(tmp_path)], capture_output=True,
                         text=True, timeout=900, env=env)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert out.returncode == 0 and lines, (out.stdout[-3000:], out.stderr[-6000:])
    result = json.loads(lines[-1][len("RESULT "):])
    assert "disturb_error" not in result, result  # the fault was injected as planned
    return result


def test_worker_node_lost_mid_encode_commits_the_undisturbed_manifest(s3, tmp_path):
    r = _run("encode", s3, tmp_path)
    assert r["status"] == "committed"
    assert r["shards_at_removal"] < r["total_shards"], r  # the node went while shards were still to do
    assert r["hit"] == r["plain"]  # same shards, bytes (SHA-256), rows and ids as the undisturbed run


def test_worker_node_lost_mid_search_gives_the_same_results(s3, tmp_path):
    r = _run("search", s3, tmp_path)
    assert r["node"] and r["failed_shards"] == [] and r["queries"] == 4000
    assert r["same_ids"] and r["max_dist_diff"] <= 1e-5, r


def test_train_worker_killed_mid_epoch_resumes_from_checkpoint(s3, tmp_path):
    r = _run("train", s3, tmp_path)
    assert r["killed_pid"] and not r["model_written_before_kill"], r
    assert r["new_worker_pids"], r  # the worker group was started again
    assert r["status"] == "trained" and r["epochs_done"] == 12
    # as good as an undisturbed run, within 5 %: two are made, as undisturbed runs differ by up to
    # 2.4 % themselves (Ray Data hands blocks to the workers in no fixed order), and the resumed
    # run, which redoes part of an epoch in another order, was seen 3.0 % from the nearer one
    assert min(abs(r["hit_val_mse"] - p) / p for p in r["plain_val_mse"]) <= 0.05, r
