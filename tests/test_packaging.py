"""Packaging: the version in one place, dependency ranges (exact pins only in the lock), types."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re

import pytest

import pipeline

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_version_has_one_home():
    project = _project()
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("qinco-pipeline") == pipeline.__version__


def test_dependencies_are_ranges_and_the_lock_pins_them():
    project = _project()
    deps = project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]
    pinned = [d for d in deps if "==" in d]
    assert not pinned, f"exact pins belong in requirements.lock, not pyproject.toml: {pinned}"
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            lock[name.strip().lower().replace("_", "-")] = version.strip()
    for d in deps:
        name = re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0].lower().replace("_", "-")
        assert name in lock, f"{name} is a dependency but requirements.lock does not pin it"


def test_the_package_says_it_is_typed():
    """``py.typed`` is in the package and the wheel takes it (package data)."""
    assert (pathlib.Path(pipeline.__file__).parent / "py.typed").exists()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["pipeline"]
