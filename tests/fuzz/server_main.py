"""All four services in one process, each from its composition root
(``services.<svc>.server.build``) on a free port, for the fuzz tests: a crash
shows as the process exiting, and its RSS is the server's own.

Run as ``python -m tests.fuzz.server_main`` with MODELFLEET_* settings in the
environment; prints one JSON line ``{full service name: port}`` when serving,
and stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from common.grpcserver import ServiceHost
from common.logging import setup_logging
from common.settings import Settings
from services.compression import server as compression_server
from services.data import server as data_server
from services.inference import server as inference_server
from services.training import server as training_server


async def main() -> int:
    settings = Settings.from_env()
    setup_logging(settings.log_level, settings.log_format)
    hosts: list[tuple[ServiceHost, tuple[str, ...]]] = [
        (
            await inference_server.build(settings, poll_s=1.0),
            ("inference.GRPCInferenceService", "modelfleet.registry.v1.ModelRegistryService"),
        ),
        (await data_server.build(settings), ("modelfleet.data.v1.DataService",)),
        (
            await training_server.build(settings),
            ("modelfleet.training.v1.TrainingService", "modelfleet.jobs.v1.JobService"),
        ),
        (await compression_server.build(settings), ("modelfleet.compression.v1.CompressionService",)),
    ]
    ports: dict[str, int] = {}
    for host, services in hosts:
        port = await host.start()
        await host.ready()
        ports.update({name: port for name in services})
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(json.dumps(ports), flush=True)
    await stop.wait()
    for host, _ in hosts:
        await host.stop(settings.shutdown_grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
