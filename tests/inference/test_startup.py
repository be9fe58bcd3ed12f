"""Start-up order: the port opens first (live, not ready, health NOT_SERVING),
then models load and warm, then the server reports ready."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from common.artifacts import ArtifactStore
from common.registry import ModelRegistry
from common.settings import Settings
from services.inference.server import build
from tests.inference.conftest import register_mlp
from tests.inference.test_protocol import raw_request

pytestmark = pytest.mark.timeout(60)


async def test_live_before_ready_and_models_load_on_ready(
    settings: Settings, registry: ModelRegistry, store: ArtifactStore
) -> None:
    register_mlp(registry, store, "m")
    host = await build(settings, poll_s=0.5)
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            assert (await stub.ServerLive(pb.ServerLiveRequest())).live
            assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
            check = await health.Check(health_pb2.HealthCheckRequest())
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not (await stub.ModelReady(pb.ModelReadyRequest(name="m"))).ready

            await host.ready()

            assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
            check = await health.Check(health_pb2.HealthCheckRequest())
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="m"))).ready
            reply = await stub.ModelInfer(raw_request("m", np.zeros((1, 4), np.float32)))
            assert reply.model_version == "1"
    finally:
        await host.stop(1.0)
