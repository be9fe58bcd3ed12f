"""Composition root of the compression service: CompressionService and the
shared JobService on ``compression_port``. Jobs run in separate worker
processes (``modelfleet worker compression``), never on this event loop."""

from __future__ import annotations

from common.api.modelfleet.compression.v1 import compression_pb2_grpc
from common.datasets import DatasetCatalog
from common.grpcserver import ServiceHost
from common.jobs import JobQueue
from common.redis import connect, wait_for_redis
from common.registry import ModelRegistry
from common.settings import Settings
from services.compression.servicer import CompressionServicer
from services.compression.submit import CompressionSubmitter
from services.jobs.servicer import add_job_service

COMPRESSION_SERVICE = "modelfleet.compression.v1.CompressionService"


async def build(settings: Settings) -> ServiceHost:
    client = connect(settings.redis_url, settings.redis_timeout_s)
    wait_for_redis(client)
    queue = JobQueue(client, settings)
    submitter = CompressionSubmitter(
        queue, ModelRegistry(client, settings.redis_prefix), DatasetCatalog(client, settings.redis_prefix)
    )
    host = ServiceHost(settings, "compression", settings.compression_port, settings.control_max_message_bytes)
    # Nothing this service answers works without Redis: NOT_SERVING while it is down.
    host.depends_on("redis", client.ping)
    host.add(
        compression_pb2_grpc.add_CompressionServiceServicer_to_server,
        CompressionServicer(submitter),
        COMPRESSION_SERVICE,
    )
    add_job_service(host, queue)

    async def close() -> None:
        client.close()

    host.on_shutdown(close)
    return host


async def serve(settings: Settings) -> None:
    await (await build(settings)).serve()
