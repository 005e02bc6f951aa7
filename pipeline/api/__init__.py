"""The Python API: search an index from your own code, run the pipeline's jobs as calls.

>>> from pipeline.api import open_index, build_index, encode, decode
>>> index = build_index(x, "s3://bucket/my-index", code_bytes=8)   # train if needed, encode, commit
>>> index = open_index("s3://bucket/my-index")            # CURRENT, or version="v000003"
>>> D, I = index.search(queries, k=10, nprobe=16)         # float32 (Q, k) distances, int64 ids
>>> codes, lists = encode("s3://bucket/my-index/model", x)

The jobs, one call each, with the options of the ``qinco`` command of the same name as keywords
(the command line only parses and calls these): :func:`train`, :func:`encode_files`,
:func:`decode_file`, :func:`plan_encode` and :func:`plan_search` (with :func:`format_plan` and
:func:`check_plan`), :func:`search_files`, :func:`evaluate`, :func:`serve` (and :func:`open_service`,
the warm service in your own process), :func:`reencode`,
:func:`baselines`, :func:`demo`; an index's versions: :func:`index_report`, :func:`rollback`,
:func:`collect_garbage`, :func:`verify`.

Names load their module on first use (so that ``rollback`` does not import torch and Ray):
:mod:`~pipeline.api.index` (an index in this process), :mod:`~pipeline.api.arrays` (encode and
decode arrays), :mod:`~pipeline.api.jobs`, :mod:`~pipeline.api.versions`, :mod:`~pipeline.api.logs`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and editors see; at run time each name loads on first use
    from pipeline.api.arrays import decode, encode
    from pipeline.api.index import Index, open_index
    from pipeline.api.jobs import (
        baselines, build_index, check_plan, decode_file, demo, encode_files, evaluate, format_plan, open_service,
        plan_encode, plan_search, reencode, search_files, serve, train)
    from pipeline.api.logs import setup_logging
    from pipeline.api.versions import collect_garbage, format_report, index_report, rollback, verify

_MODULES = {
    "arrays": ("decode", "encode"),
    "index": ("Index", "open_index"),
    "jobs": ("baselines", "build_index", "check_plan", "decode_file", "demo", "encode_files", "evaluate",
             "format_plan", "open_service", "plan_encode", "plan_search", "reencode", "search_files", "serve", "train"),
    "logs": ("setup_logging",),
    "versions": ("collect_garbage", "format_report", "index_report", "rollback", "verify"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}
__all__ = ["Index", "baselines", "build_index", "check_plan", "collect_garbage", "decode", "decode_file", "demo",
           "encode", "encode_files", "evaluate", "format_plan", "format_report", "index_report", "open_index",
           "open_service", "plan_encode", "plan_search", "reencode", "rollback", "search_files", "serve",
           "setup_logging", "train", "verify"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
