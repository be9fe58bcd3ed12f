"""Composition root of the training service: TrainingService and JobService on
settings.training_port."""

from __future__ import annotations

import asyncio

from common.api.modelfleet.training.v1 import training_pb2_grpc
from common.datasets import DatasetCatalog
from common.grpcserver import ServiceHost
from common.jobs import JobQueue
from common.redis import connect, wait_for_redis
from common.settings import Settings
from services.jobs.servicer import add_job_service
from services.training.servicer import TrainingServicer
from services.training.submit import TrainingSubmitter

SERVICE_NAME = "modelfleet.training.v1.TrainingService"


async def build(settings: Settings) -> ServiceHost:
    client = connect(settings.redis_url, settings.redis_timeout_s)
    await asyncio.to_thread(wait_for_redis, client)
    queue = JobQueue(client, settings)
    submitter = TrainingSubmitter(queue, DatasetCatalog(client, settings.redis_prefix))
    host = ServiceHost(settings, "training", settings.training_port, settings.control_max_message_bytes)
    # Nothing this service answers works without Redis: NOT_SERVING while it is down.
    host.depends_on("redis", client.ping)
    host.add(
        training_pb2_grpc.add_TrainingServiceServicer_to_server, TrainingServicer(submitter), SERVICE_NAME
    )
    add_job_service(host, queue)

    async def close() -> None:
        client.close()

    host.on_shutdown(close)
    return host


async def serve(settings: Settings) -> None:
    await (await build(settings)).serve()
