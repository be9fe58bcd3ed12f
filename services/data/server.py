"""Composition root of the data service (DataService on settings.data_port)."""

from __future__ import annotations

import asyncio

from common.api.modelfleet.data.v1 import data_pb2_grpc
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog
from common.grpcserver import ServiceHost
from common.redis import connect, wait_for_redis
from common.settings import Settings
from services.data.service import DataService
from services.data.servicer import DataServicer

SERVICE_NAME = "modelfleet.data.v1.DataService"


async def build(settings: Settings) -> ServiceHost:
    client = connect(settings.redis_url, settings.redis_timeout_s)
    await asyncio.to_thread(wait_for_redis, client)
    service = DataService(
        ArtifactStore(settings.artifact_root),
        DatasetCatalog(client, settings.redis_prefix),
        settings.max_upload_bytes,
    )
    host = ServiceHost(settings, "data", settings.data_port, settings.control_max_message_bytes)
    # Nothing this service answers works without Redis: NOT_SERVING while it is down.
    host.depends_on("redis", client.ping)
    host.add(
        data_pb2_grpc.add_DataServiceServicer_to_server,
        DataServicer(service, settings.max_message_bytes),
        SERVICE_NAME,
    )

    async def close() -> None:
        client.close()

    host.on_shutdown(close)
    return host


async def serve(settings: Settings) -> None:
    await (await build(settings)).serve()
