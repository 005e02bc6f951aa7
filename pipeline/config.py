"""JSON-serialisable configuration dataclasses and code-version stamping.

Every artifact the pipeline writes (model, shards, manifests, results) embeds the config that
produced it and the code version, so any output can be traced back.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import subprocess
from typing import Any, TypeVar

import numpy

from pipeline import __version__
from pipeline.errors import ConfigError

T = TypeVar("T", bound="JsonConfig")


class JsonConfig:
    """Mixin for dataclasses: ``to_dict``/``from_dict``/``to_json``/``from_json``.

    ``from_dict`` raises ``ConfigError`` on unknown or missing keys, so a typo in a stored config
    is an error, not a silent default.
    """

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), indent=kw.pop("indent", 2), sort_keys=True, **kw)

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
        missing = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                   if f.name not in d and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{cls.__name__}: missing config keys {missing}")
        return cls(**d)  # type: ignore[call-arg]

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> dict[str, Any]:
    """Version stamp stored with every artifact."""
    info: dict[str, Any] = {
        "package": "qinco-pipeline",
        "version": __version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
    }
    for dist, key in (("torch", "torch"), ("faiss-cpu", "faiss"), ("ray", "ray")):
        try:  # the installed versions, without importing the packages
            info[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info
