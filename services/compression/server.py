"""Composition root of the compression service: CompressionService and the
shared JobService on ``compression_port``. Jobs run in separate worker
processes (``modelfleet worker compression``), never on this event loop."""

from __future__ import annotations

from common.api.modelfleet.compression.v1 import compression_pb2_grpc
from common.api.modelfleet.jobs.v1 import jobs_pb2_grpc
from common.datasets import DatasetCatalog
from common.grpcserver import ServiceHost
from common.jobs import JobQueue
from common.redis import connect, connect_async, wait_for_redis
from common.registry import ModelRegistry
from common.settings import Settings
from services.compression.servicer import CompressionServicer
from services.compression.submit import CompressionSubmitter
from services.jobs.servicer import JobServicer

COMPRESSION_SERVICE = "modelfleet.compression.v1.CompressionService"
JOB_SERVICE = "modelfleet.jobs.v1.JobService"


async def build(settings: Settings) -> ServiceHost:
    client = connect(settings.redis_url)
    wait_for_redis(client)
    async_client = connect_async(settings.redis_url)
    queue = JobQueue(client, settings)
    submitter = CompressionSubmitter(
        queue, ModelRegistry(client, settings.redis_prefix), DatasetCatalog(client, settings.redis_prefix)
    )
    host = ServiceHost(settings, "compression", settings.compression_port)
    host.add(
        compression_pb2_grpc.add_CompressionServiceServicer_to_server,
        CompressionServicer(submitter),
        COMPRESSION_SERVICE,
    )
    host.add(
        jobs_pb2_grpc.add_JobServiceServicer_to_server,
        JobServicer(queue, async_client, settings),
        JOB_SERVICE,
    )

    async def close() -> None:
        await async_client.aclose()
        client.close()

    host.on_shutdown(close)
    return host


async def serve(settings: Settings) -> None:
    host = await build(settings)
    await host.start()
    await host.set_serving(True)
    await host.run_until_signal()
