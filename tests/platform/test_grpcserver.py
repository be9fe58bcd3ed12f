"""The shared server bootstrap on a real server: health, reflection, auth,
error mapping and graceful drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.api.modelfleet.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from common.errors import NotFound
from common.grpcserver import ServiceHost
from common.settings import Settings

SERVICE = "modelfleet.jobs.v1.JobService"


class Jobs(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetJobResponse:
        if request.job_id == "missing":
            raise NotFound("job 'missing' does not exist")
        if request.job_id == "bug":
            raise RuntimeError("secret internal detail")
        if request.job_id == "slow":
            self.started.set()
            await asyncio.sleep(0.5)
        return jobs_pb2.GetJobResponse(job=jobs_pb2.Job(id=request.job_id))

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        yield jobs_pb2.WatchJobResponse(job=jobs_pb2.Job(id="1"))
        raise NotFound("job stream ended: 'x' vanished")


async def _host(settings: Settings) -> tuple[ServiceHost, Jobs, str]:
    host = ServiceHost(settings, "test", 0)
    servicer = Jobs()  # type: ignore[abstract]  # CancelJob left out on purpose: UNIMPLEMENTED
    host.add(jobs_pb2_grpc.add_JobServiceServicer_to_server, servicer, SERVICE)
    port = await host.start()
    return host, servicer, f"127.0.0.1:{port}"


async def test_health_flips_with_readiness_and_shutdown(settings: Settings) -> None:
    host, _, target = await _host(settings)
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service=SERVICE)
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await host.set_serving(True)
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
        assert (
            await health.Check(health_pb2.HealthCheckRequest())
        ).status == health_pb2.HealthCheckResponse.SERVING
    await host.stop(0.5)


async def test_reflection_lists_services(settings: Settings) -> None:
    host, _, target = await _host(settings)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]
        names = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    await host.stop(0.5)


async def test_errors_map_to_status_codes_without_leaking(settings: Settings) -> None:
    host, _, target = await _host(settings)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetJob(jobs_pb2.GetJobRequest(job_id="missing"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "missing" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetJob(jobs_pb2.GetJobRequest(job_id="bug"))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CancelJob(jobs_pb2.CancelJobRequest(job_id="1"))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        stream = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id="1"))
        assert (await stream.read()).job.id == "1"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream.read()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await host.stop(0.5)


async def test_auth_when_tokens_are_configured(settings: Settings) -> None:
    host, _, target = await _host(settings.replace(auth_tokens=("s3cret",)))
    await host.set_serving(True)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetJob(jobs_pb2.GetJobRequest(job_id="a"), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = await stub.GetJob(
            jobs_pb2.GetJobRequest(job_id="a"), metadata=[("authorization", "Bearer s3cret")]
        )
        assert ok.job.id == "a"
        # Probes need no token.
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            await health.Check(health_pb2.HealthCheckRequest())
        ).status == health_pb2.HealthCheckResponse.SERVING
    await host.stop(0.5)


async def test_drain_finishes_in_flight_calls(settings: Settings) -> None:
    host, servicer, target = await _host(settings)
    await host.set_serving(True)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        call = asyncio.ensure_future(stub.GetJob(jobs_pb2.GetJobRequest(job_id="slow")))
        await asyncio.wait_for(servicer.started.wait(), 5)
        await host.stop(5)
        assert (await call).job.id == "slow"
