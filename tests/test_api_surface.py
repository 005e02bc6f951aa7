"""The API's surface: every exported name loads, the version calls start without torch or Ray, and
the command line is a wrapper over the API (every option of a command reaches its API call)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import pipeline.api as api
from pipeline.cli import Number, build_parser, main

# command -> the API call it makes
COMMANDS = {"train": "train", "encode": "encode_files", "decode": "decode_file", "search": "search_files",
            "serve": "serve", "reencode": "reencode", "baselines": "baselines", "demo": "demo",
            "eval": "evaluate"}
# options that choose between calls or are mutually exclusive with another one given
SKIPPED = {("reencode", "add")}


def test_every_exported_name_loads():
    assert sorted(api.__all__) == sorted(api._WHERE)
    for name in api.__all__:
        assert getattr(api, name) is not None, name
    with pytest.raises(AttributeError):
        api.no_such_name  # noqa: B018


def test_version_calls_load_without_torch_or_ray():
    code = ("import sys\nfrom pipeline.api import collect_garbage, index_report, rollback, setup_logging, verify\n"
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _values(call) -> list:
    args, kwargs = call
    out = []
    for v in [*args, *kwargs.values()]:
        out.extend(v if isinstance(v, (list, tuple)) else [v])
    return out


def _distinct_argv(cmd: str, parser: argparse.ArgumentParser) -> tuple[list[str], list]:
    """``cmd`` with every option that takes a value set to a value no other option has: the
    argument list and the values the API call must receive."""
    argv, expected, seen = [cmd], [], set()
    actions = [a for a in parser._actions if a.option_strings and a.nargs != 0 and not a.choices
               and (cmd, a.dest) not in SKIPPED]
    for i, a in enumerate(actions):
        if isinstance(a.type, Number):
            lo, hi = float(a.type.lo), float(min(a.type.hi, 10**9))
            v = lo + (hi - lo) * (i + 1) / (len(actions) + 2)
            v = int(v) if a.type.kind is int else v
            if v in seen or v == lo and a.type.lo_open:
                continue
            text = str(v)
        else:
            v = text = f"value-{cmd}-{i}"
        seen.add(v)
        argv += [a.option_strings[-1], text]
        expected.append(v)
    for a in parser._actions:  # positionals
        if not a.option_strings and a.dest != "help":
            argv.append(f"value-{cmd}-{a.dest}")
            expected.append(f"value-{cmd}-{a.dest}")
    return argv, expected


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_option_of_a_command_reaches_its_api_call(cmd, monkeypatch, capsys):
    """Each option is given a value of its own; the API call (recorded in place of the real one)
    must receive every one of them: an option parsed but not passed on fails here."""
    calls = []
    monkeypatch.setattr(api, COMMANDS[cmd], lambda *args, **kwargs: calls.append((args, kwargs)) or {})
    sub = build_parser()._subparsers._group_actions[0].choices[cmd]
    argv, expected = _distinct_argv(cmd, sub)
    assert main(argv) == 0
    assert len(calls) == 1
    got = _values(calls[0])
    missing = [v for v in expected if v not in got]
    assert not missing, (argv, calls[0])
