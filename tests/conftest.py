"""Shared fixtures: one Ray instance per test session (started lazily), dataset location."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs for the whole session; tests request fractional CPUs."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, namespace="qinco-tests")
        started = True
    yield ray
    if started:
        ray.shutdown()


def data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("QINCO_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def dwsift_dir() -> pathlib.Path:
    d = data_dir() / "dwsift"
    if not (d / "learn.bvecs").exists():
        pytest.skip(f"dwsift dataset not found under {d} (set QINCO_DATA_DIR)")
    return d
