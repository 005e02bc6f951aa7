"""The ``qinco`` command line (also ``python -m pipeline``).

This module only parses arguments and calls into ``pipeline``. Each sub-command has one
``_add_<name>`` function that declares its arguments and a handler that imports what it needs
lazily, so ``qinco --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from pipeline import __version__
from pipeline.errors import PipelineError

_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(fn: Callable[[argparse._SubParsersAction], None]):
    """Register a function that adds one sub-command parser."""
    _COMMANDS.append(fn)
    return fn


# --------------------------------------------------------------------------- demo
@command
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo job on the embedded default")
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $QINCO_DATA_DIR or ../shared/data)")
    p.add_argument("--out", default="demo-out", help="output folder or URI (default: ./demo-out)")
    p.add_argument("--quick", action="store_true", help="smallest sizes (used by the tests)")

    def run(a: argparse.Namespace) -> int:
        from pipeline.demo import run_demo

        run_demo(data_dir=a.data_dir, out=a.out, quick=a.quick)
        return 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qinco",
        description="QINCo neural vector compression pipeline: train, encode, search.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PipelineError as e:
        print(f"qinco {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qinco {args.command}: interrupted", file=sys.stderr)
        return 130
