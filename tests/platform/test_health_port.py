"""The plaintext health-only port (MODELFLEET_HEALTH_PORT) next to a TLS main port:
Kubernetes' native gRPC probes cannot speak TLS, so they probe this port."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.api.modelfleet.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from common.errors import InvalidArgument, Unavailable
from common.grpcserver import ServiceHost
from common.settings import Settings
from tests.security.certs import CertificateAuthority

SERVICE = "modelfleet.jobs.v1.JobService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Jobs:
    """GetJob only (a generic handler, so no abstract servicer to fill in);
    GetJob("block") holds the call until the test releases it, so a drain is observable."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def get_job(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetJobResponse:
        if request.job_id == "block":
            self.started.set()
            await asyncio.wait_for(self.release.wait(), timeout=10)
        return jobs_pb2.GetJobResponse(job=jobs_pb2.Job(id=request.job_id))


def register(jobs: Jobs, server: grpc.aio.Server) -> None:
    get_job = grpc.unary_unary_rpc_method_handler(
        jobs.get_job,
        request_deserializer=jobs_pb2.GetJobRequest.FromString,
        response_serializer=jobs_pb2.GetJobResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"GetJob": get_job}),))


@dataclass
class Fleet:
    host: ServiceHost
    jobs: Jobs
    main: str
    health: str
    ca: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def fleet(settings: Settings, tmp_path: Path) -> AsyncIterator[Fleet]:
    ca = CertificateAuthority(tmp_path / "pki", "test-ca")
    issued = ca.issue("server", server=True)
    tls = settings.replace(
        host="127.0.0.1",
        tls_cert_file=str(issued.cert),
        tls_key_file=str(issued.key),
        health_port=free_port(),
    )
    host = ServiceHost(tls, "test", 0)
    jobs = Jobs()
    host.add(register, jobs, SERVICE)
    port = await host.start()
    try:
        yield Fleet(host, jobs, f"127.0.0.1:{port}", f"127.0.0.1:{tls.health_port}", ca.files.cert)
    finally:
        jobs.release.set()
        await host.stop(0)


def tls_channel(fleet: Fleet) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=fleet.ca.read_bytes())
    return grpc.aio.secure_channel(
        fleet.main, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )


async def check(channel: grpc.aio.Channel, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return int((await health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)).status)


async def test_plaintext_health_port_follows_readiness_of_the_tls_server(fleet: Fleet) -> None:
    async with grpc.aio.insecure_channel(fleet.health) as plain, tls_channel(fleet) as tls:
        assert await check(plain) == NOT_SERVING
        await fleet.host.set_serving(True)
        assert await check(plain) == SERVING
        assert await check(plain, SERVICE) == SERVING
        assert await check(tls) == SERVING
        reply = await jobs_pb2_grpc.JobServiceStub(tls).GetJob(jobs_pb2.GetJobRequest(job_id="j"), timeout=5)
        assert reply.job.id == "j"


async def test_health_port_serves_nothing_but_health(fleet: Fleet) -> None:
    async with grpc.aio.insecure_channel(fleet.health) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await jobs_pb2_grpc.JobServiceStub(plain).GetJob(jobs_pb2.GetJobRequest(job_id="j"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_main_port_stays_tls_only(fleet: Fleet) -> None:
    async with grpc.aio.insecure_channel(fleet.main) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await check(plain)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_port_reports_not_serving_through_the_drain(fleet: Fleet) -> None:
    await fleet.host.set_serving(True)
    async with grpc.aio.insecure_channel(fleet.health) as plain, tls_channel(fleet) as tls:
        call = asyncio.ensure_future(
            jobs_pb2_grpc.JobServiceStub(tls).GetJob(jobs_pb2.GetJobRequest(job_id="block"), timeout=10)
        )
        await asyncio.wait_for(fleet.jobs.started.wait(), timeout=10)
        stopping = asyncio.ensure_future(fleet.host.stop(10))
        # The in-flight call holds the drain open, so the health port must still answer.
        for _ in range(100):
            if await check(plain) == NOT_SERVING:
                break
            await asyncio.sleep(0.05)
        assert await check(plain) == NOT_SERVING
        fleet.jobs.release.set()
        assert (await call).job.id == "block"
        await asyncio.wait_for(stopping, timeout=15)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await check(plain)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_port_off_by_default_and_a_taken_port_is_refused(settings: Settings) -> None:
    assert Settings().health_port == 0
    assert ServiceHost(settings, "test", 0).health_server is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        host = ServiceHost(settings.replace(host="127.0.0.1", health_port=port), "test", 0)
        with pytest.raises(Unavailable, match=f"127.0.0.1:{port}"):
            await host.start()


def test_health_port_setting_is_read_and_checked() -> None:
    assert Settings.from_env({"MODELFLEET_HEALTH_PORT": "8090"}).health_port == 8090
    with pytest.raises(InvalidArgument, match="MODELFLEET_HEALTH_PORT"):
        Settings.from_env({"MODELFLEET_HEALTH_PORT": "70000"})
