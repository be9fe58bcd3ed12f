"""Composition root of the training service: TrainingService and JobService on
settings.training_port."""

from __future__ import annotations

import asyncio

from common.api.modelfleet.jobs.v1 import jobs_pb2_grpc
from common.api.modelfleet.training.v1 import training_pb2_grpc
from common.datasets import DatasetCatalog
from common.grpcserver import ServiceHost
from common.jobs import JobQueue
from common.redis import connect, connect_async, wait_for_redis
from common.settings import Settings
from services.jobs.servicer import SERVICE_NAME as JOB_SERVICE_NAME
from services.jobs.servicer import JobServicer
from services.training.servicer import TrainingServicer
from services.training.submit import TrainingSubmitter

SERVICE_NAME = "modelfleet.training.v1.TrainingService"


async def build(settings: Settings) -> ServiceHost:
    client = connect(settings.redis_url)
    await asyncio.to_thread(wait_for_redis, client)
    async_client = connect_async(settings.redis_url)
    queue = JobQueue(client, settings)
    submitter = TrainingSubmitter(queue, DatasetCatalog(client, settings.redis_prefix))
    host = ServiceHost(settings, "training", settings.training_port, settings.metrics_port or None)
    host.add(
        training_pb2_grpc.add_TrainingServiceServicer_to_server, TrainingServicer(submitter), SERVICE_NAME
    )
    host.add(
        jobs_pb2_grpc.add_JobServiceServicer_to_server,
        JobServicer(queue, async_client, settings),
        JOB_SERVICE_NAME,
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
