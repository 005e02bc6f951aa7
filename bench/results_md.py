"""Shared by the benchmark scripts: each owns one marked section of bench/RESULTS.md."""

from __future__ import annotations

import pathlib

from pipeline.io import storage


def update_section(path: pathlib.Path, begin: str, end: str, section: str) -> None:
    """Replace (or append) the block between the ``begin``/``end`` markers, leaving the rest alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    storage.write_bytes_atomic(str(path), text.encode())
