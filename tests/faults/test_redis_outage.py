"""Redis goes away under running servers: every RPC that needs it answers
UNAVAILABLE in bounded time (never INTERNAL, never a long hang), the services
that cannot work without it report NOT_SERVING, inference keeps answering for
its loaded models, and everything recovers by itself when Redis is back."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.modelfleet.data.v1 import data_pb2, data_pb2_grpc
from common.api.modelfleet.registry.v1 import registry_pb2, registry_pb2_grpc
from common.artifacts import ArtifactStore
from common.redis import connect
from common.registry import ModelRegistry
from common.settings import Settings
from services.data.server import build as build_data
from tests.inference.conftest import register_mlp, running
from tests.jobs.test_faults import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# A safety bound, far above the 2 s the settings promise: a hang fails the test
# with DEADLINE_EXCEEDED instead of blocking it.
CALL_TIMEOUT_S = 15.0
WAIT_S = 30.0


async def _status(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S
    )
    return int(reply.status)


async def _until_status(channel: grpc.aio.Channel, service: str, wanted: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while await _status(channel, service) != wanted:
        assert time.monotonic() < deadline, f"{service} never reported {wanted}"
        await asyncio.sleep(0.2)


async def test_data_service_unavailable_not_serving_and_recovering(
    own_redis: RedisServer, settings: Settings
) -> None:
    settings = settings.replace(redis_url=own_redis.url)
    host = await build_data(settings)
    port = await host.start()
    await host.ready()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = data_pb2_grpc.DataServiceStub(channel)
    service = "modelfleet.data.v1.DataService"
    try:
        await stub.CreateDatasetFromSource(
            data_pb2.CreateDatasetFromSourceRequest(name="iris", source=data_pb2.BUILTIN_SOURCE_IRIS),
            timeout=60,
        )
        assert await _status(channel, service) == health_pb2.HealthCheckResponse.SERVING
        own_redis.stop()
        started = time.monotonic()
        codes = []
        for request in (
            stub.GetDataset(data_pb2.GetDatasetRequest(name="iris"), timeout=CALL_TIMEOUT_S),
            stub.ListDatasets(data_pb2.ListDatasetsRequest(), timeout=CALL_TIMEOUT_S),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await request
            codes.append(info.value.code())
            assert "Redis" in (info.value.details() or "")
        assert codes == [grpc.StatusCode.UNAVAILABLE] * 2
        print(f"\n[redis outage] two data RPCs answered UNAVAILABLE in {time.monotonic() - started:.2f} s")
        await _until_status(channel, service, health_pb2.HealthCheckResponse.NOT_SERVING)
        own_redis.start()
        await _until_status(channel, service, health_pb2.HealthCheckResponse.SERVING)
        reply = await stub.GetDataset(data_pb2.GetDatasetRequest(name="iris"), timeout=CALL_TIMEOUT_S)
        assert reply.dataset.num_rows == 150
    finally:
        await channel.close()
        await host.stop(grace=1.0)


async def test_inference_keeps_serving_loaded_models_while_redis_is_down(
    own_redis: RedisServer, settings: Settings
) -> None:
    settings = settings.replace(redis_url=own_redis.url)
    client = connect(settings.redis_url)
    registry = ModelRegistry(client, settings.redis_prefix)
    register_mlp(registry, ArtifactStore(settings.artifact_root), "outage")
    client.close()
    request = pb.ModelInferRequest(
        model_name="outage",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[np.ones((1, 4), np.float32).tobytes()],
    )
    async with running(settings) as server:
        before = await server.stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
        own_redis.stop()
        registry_stub = registry_pb2_grpc.ModelRegistryServiceStub(server.channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await registry_stub.GetModel(registry_pb2.GetModelRequest(name="outage"), timeout=CALL_TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        # Long enough for the registry follower to hit the outage more than once.
        for _ in range(20):
            during = await server.stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
            assert during.raw_output_contents == before.raw_output_contents
            await asyncio.sleep(0.1)
        assert await _status(server.channel, "inference.GRPCInferenceService") == (
            health_pb2.HealthCheckResponse.SERVING
        )
        own_redis.start()
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                reply = await registry_stub.GetModel(
                    registry_pb2.GetModelRequest(name="outage"), timeout=CALL_TIMEOUT_S
                )
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert time.monotonic() < deadline, "the registry never answered again"
                await asyncio.sleep(0.2)
        assert reply.model.name == "outage"
