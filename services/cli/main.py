"""The ``modelfleet`` command line.

Each command group lives in its own module of this package exposing
``register(subparsers)``; a command's handler gets the parsed args and returns
the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
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
    return code


if __name__ == "__main__":
    sys.exit(main())
