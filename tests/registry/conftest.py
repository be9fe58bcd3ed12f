"""A registry service on a real ServiceHost bound to port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis

from common.api.modelfleet.registry.v1 import registry_pb2_grpc
from common.artifacts import ArtifactStore
from common.grpcserver import ServiceHost
from common.registry import ModelRegistry
from common.settings import Settings
from services.registry.servicer import ModelRegistryServicer

# Upload limit of the test server: small, so the over-limit test sends little.
UPLOAD_LIMIT = 64 * 1024


@pytest.fixture
async def registry_port(
    settings: Settings, redis_client: redis.Redis, store: ArtifactStore
) -> AsyncIterator[int]:
    host = ServiceHost(settings, "registry-test", 0)
    servicer = ModelRegistryServicer(ModelRegistry(redis_client, settings.redis_prefix), store, UPLOAD_LIMIT)
    host.add(
        registry_pb2_grpc.add_ModelRegistryServiceServicer_to_server,
        servicer,
        "modelfleet.registry.v1.ModelRegistryService",
    )
    port = await host.start()
    await host.ready()
    yield port
    await host.stop(0)
