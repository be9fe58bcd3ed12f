"""The ``modelfleet`` command line.

Each command group lives in its own module of this package exposing
``register(subparsers)``; a command's handler gets the parsed args and returns
the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from common.errors import ModelfleetError

# Command-group modules, in help order.
MODULES = ("up", "demo", "serve", "datasets", "models", "infer", "jobs", "submit", "auth")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelfleet",
        description="Model-as-a-service for PyTorch: data, training, compression and inference over gRPC.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in MODULES:
        importlib.import_module(f"services.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except ModelfleetError as exc:
        print(f"modelfleet: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _broken_pipe()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return _broken_pipe()
    return code


def _broken_pipe() -> int:
    """The reader (``| head``) went away: exit quietly, as a killed-by-SIGPIPE tool would."""
    # Python flushes stdout again at exit; point it at devnull so that flush cannot raise.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


if __name__ == "__main__":
    sys.exit(main())
