"""Errors raised inside Ray tasks and actors reach the user as one line and exit status 2, as
the CLI promises, with the Ray traceback only in the debug log (``-v``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.ray


def _qinco(*argv: str, verbose: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    cmd = [sys.executable, "-m", "pipeline", *(["-v"] if verbose else []), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _one_line_error(out: subprocess.CompletedProcess, command: str, *words: str) -> None:
    lines = out.stderr.splitlines()
    err_lines = [l for l in lines if l.startswith(f"qinco {command}: error:")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "RayTaskError" not in out.stderr, out.stderr[-3000:]
    assert len(err_lines) == 1 and not [l for l in lines if " ERROR " in l], out.stderr[-3000:]
    for w in words:
        assert w in err_lines[0], err_lines[0]


def test_errors_in_read_tasks_and_shard_actors_are_one_line(tiny_index_inputs, tmp_path):
    inp = tiny_index_inputs
    bad = tmp_path / "bad.fvecs"
    shutil.copy(inp["base"], bad)
    rec, row = 4 + 16 * 4, 2345
    with open(bad, "r+b") as f:  # a NaN inside one record, read by a Ray Data read task
        f.seek(row * rec + 4)
        f.write(np.float32("nan").tobytes())
    out = _qinco("encode", "--model", inp["model"], "--data", str(bad), "--out", str(tmp_path / "bad-index"),
                 "--workers", "1", "--shard-rows", "1000")
    _one_line_error(out, "encode", str(bad), f"row {row}")

    index = str(tmp_path / "index")
    out = _qinco("encode", "--model", inp["model"], "--data", inp["base"], "--out", index, "--workers", "1",
                 "--shard-rows", "2000")
    assert out.returncode == 0, out.stderr[-3000:]
    shard = sorted((tmp_path / "index").glob("versions/v000001/shards/*.parquet"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))  # read by a shard actor, which checks the SHA-256
    out = _qinco("search", "--index", index, "--queries", inp["query"], "--out", str(tmp_path / "res"),
                 "--workers", "1")
    _one_line_error(out, "search", shard.name)
    verbose = _qinco("search", "--index", index, "--queries", inp["query"], "--out", str(tmp_path / "res"),
                     "--workers", "1", verbose=True)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr  # the detail is in the debug log
