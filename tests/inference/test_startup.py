"""Start-up order: the port opens first (live, not ready, health NOT_SERVING),
then models load and warm, then the server reports ready. Meanwhile a call for a
start-up model is UNAVAILABLE (retryable: a client moves to another replica), never
NOT_FOUND, which clients treat as final."""

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
            for name in ("m", "not-registered"):  # "*": every name may be a start-up model
                assert await infer_code(stub, name) == grpc.StatusCode.UNAVAILABLE

            await host.ready()

            assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
            check = await health.Check(health_pb2.HealthCheckRequest())
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="m"))).ready
            reply = await stub.ModelInfer(raw_request("m", np.zeros((1, 4), np.float32)))
            assert reply.model_version == "1"
            assert await infer_code(stub, "not-registered") == grpc.StatusCode.NOT_FOUND
    finally:
        await host.stop(1.0)


async def infer_code(stub: pb_grpc.GRPCInferenceServiceStub, name: str) -> grpc.StatusCode:
    try:
        await stub.ModelInfer(raw_request(name, np.zeros((1, 4), np.float32)))
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_only_the_named_start_up_models_are_unavailable_while_they_load(
    settings: Settings, registry: ModelRegistry, store: ArtifactStore
) -> None:
    register_mlp(registry, store, "m")
    register_mlp(registry, store, "other")
    host = await build(settings.replace(inference_models=("m", "missing")), poll_s=0.5)
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert await infer_code(stub, "m") == grpc.StatusCode.UNAVAILABLE
            assert await infer_code(stub, "missing") == grpc.StatusCode.UNAVAILABLE
            assert await infer_code(stub, "other") == grpc.StatusCode.NOT_FOUND

            await host.ready()

            assert await infer_code(stub, "m") == grpc.StatusCode.OK
            # Its start-up load failed (not in the registry): final, not retryable forever.
            assert await infer_code(stub, "missing") == grpc.StatusCode.NOT_FOUND
    finally:
        await host.stop(1.0)
