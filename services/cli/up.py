"""``modelfleet up``: run the whole fleet locally until Ctrl-C/SIGTERM."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from common.settings import Settings
from services.cli.client import print_table
from services.cli.fleet import Fleet


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start all services and workers locally (Ctrl-C stops them)")
    up.set_defaults(handler=_up)


def _up(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with Fleet(settings) as fleet:
        print_table(("endpoint", "address"), fleet.endpoints())
        print("modelfleet is up; Ctrl-C to stop", flush=True)
        while not stop.wait(1.0):
            dead = fleet.check_alive()
            if dead:
                print(f"modelfleet: {dead} exited unexpectedly; stopping the fleet (see .modelfleet/logs)")
                return 1
        print("stopping...", flush=True)
    print("stopped")
    return 0
