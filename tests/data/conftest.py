"""Data-service fixtures: the domain service on real Redis and a real
DataService gRPC server on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import redis
import torch

from common.api.modelfleet.data.v1 import data_pb2_grpc
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog
from common.settings import Settings
from services.data import server
from services.data.service import DataService

torch.set_num_threads(1)


@pytest.fixture
def catalog(settings: Settings, redis_client: redis.Redis) -> DatasetCatalog:
    return DatasetCatalog(redis_client, settings.redis_prefix)


@pytest.fixture
def service(store: ArtifactStore, catalog: DatasetCatalog, settings: Settings) -> DataService:
    return DataService(store, catalog, settings.max_upload_bytes)


@pytest.fixture
def small_settings(settings: Settings) -> Settings:
    return settings.replace(max_upload_bytes=4096)


@pytest.fixture
async def data_target(small_settings: Settings, redis_client: redis.Redis) -> AsyncIterator[str]:
    host = await server.build(small_settings)
    port = await host.start()
    await host.ready()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await host.stop(0)


@pytest.fixture
async def stub(data_target: str) -> AsyncIterator[data_pb2_grpc.DataServiceStub]:
    channel = grpc.aio.insecure_channel(data_target)
    try:
        yield data_pb2_grpc.DataServiceStub(channel)
    finally:
        await channel.close()
