"""TLS and mutual TLS on a real server (the data service) with certificates
generated here; clients go through the CLI's channel helper."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.api.modelfleet.data.v1 import data_pb2, data_pb2_grpc
from common.errors import InvalidArgument
from common.settings import Settings
from services.cli.client import channel_credentials, connect
from services.data import server as data_server
from tests.security.certs import CertificateAuthority
from tests.security.conftest import bearer

PKI = dict[str, CertificateAuthority]


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return {
        "ca": CertificateAuthority(tmp_path / "pki", "test-ca"),
        "rogue": CertificateAuthority(tmp_path / "pki", "rogue-ca"),
    }


async def _serve(settings: Settings) -> AsyncIterator[str]:
    host = await data_server.build(settings)
    port = await host.start()
    await host.ready()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await host.stop(0)


@pytest.fixture
def server_tls(auth_settings: Settings, pki: PKI) -> Settings:
    issued = pki["ca"].issue("server", server=True)
    return auth_settings.replace(tls_cert_file=str(issued.cert), tls_key_file=str(issued.key))


@pytest.fixture
async def tls_target(server_tls: Settings, redis_client: redis.Redis) -> AsyncIterator[str]:
    async for target in _serve(server_tls):
        yield target


@pytest.fixture
async def mtls_target(server_tls: Settings, pki: PKI, redis_client: redis.Redis) -> AsyncIterator[str]:
    async for target in _serve(server_tls.replace(tls_client_ca_file=str(pki["ca"].files.cert))):
        yield target


async def _status(target: str, client: Settings) -> grpc.StatusCode:
    # The CLI helper is synchronous; keep it off the loop the server runs on.
    return await asyncio.to_thread(_list, target, client)


def _list(target: str, client: Settings) -> grpc.StatusCode:
    """ListDatasets as the reader through the CLI helper; the status it got."""
    with connect(target, client) as channel:
        try:
            stub = data_pb2_grpc.DataServiceStub(channel)
            stub.ListDatasets(data_pb2.ListDatasetsRequest(), metadata=bearer("reader"), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_tls_round_trip(tls_target: str, settings: Settings, pki: PKI) -> None:
    client = settings.replace(tls_ca_file=str(pki["ca"].files.cert))
    assert await _status(tls_target, client) == grpc.StatusCode.OK
    async with grpc.aio.secure_channel(tls_target, channel_credentials(client)) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_tls_still_needs_a_token(tls_target: str, settings: Settings, pki: PKI) -> None:
    client = settings.replace(tls_ca_file=str(pki["ca"].files.cert))
    credentials = channel_credentials(client)
    async with grpc.aio.secure_channel(tls_target, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            stub = data_pb2_grpc.DataServiceStub(channel)
            await stub.ListDatasets(data_pb2.ListDatasetsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_plaintext_client_cannot_talk_to_tls_server(tls_target: str, settings: Settings) -> None:
    assert await _status(tls_target, settings) == grpc.StatusCode.UNAVAILABLE


async def test_server_from_wrong_ca_rejected(tls_target: str, settings: Settings, pki: PKI) -> None:
    client = settings.replace(tls_ca_file=str(pki["rogue"].files.cert))
    assert await _status(tls_target, client) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_round_trip(mtls_target: str, settings: Settings, pki: PKI) -> None:
    issued = pki["ca"].issue("client-a", server=False)
    client = settings.replace(
        tls_ca_file=str(pki["ca"].files.cert),
        tls_client_cert_file=str(issued.cert),
        tls_client_key_file=str(issued.key),
    )
    assert await _status(mtls_target, client) == grpc.StatusCode.OK


async def test_mtls_rejects_client_without_cert(mtls_target: str, settings: Settings, pki: PKI) -> None:
    client = settings.replace(tls_ca_file=str(pki["ca"].files.cert))
    assert await _status(mtls_target, client) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_rejects_client_cert_from_wrong_ca(mtls_target: str, settings: Settings, pki: PKI) -> None:
    issued = pki["rogue"].issue("intruder", server=False)
    client = settings.replace(
        tls_ca_file=str(pki["ca"].files.cert),
        tls_client_cert_file=str(issued.cert),
        tls_client_key_file=str(issued.key),
    )
    assert await _status(mtls_target, client) == grpc.StatusCode.UNAVAILABLE


async def test_rotated_certificate_serves_new_connections(
    server_tls: Settings, settings: Settings, pki: PKI, redis_client: redis.Redis
) -> None:
    """Files replaced in place, as cert-manager or a re-mounted Secret does: new
    connections get the new certificate with no restart; a half-done rotation (new
    certificate, old key) keeps the previous pair serving."""
    cert, key = Path(server_tls.tls_cert_file), Path(server_tls.tls_key_file)
    old_ca = settings.replace(tls_ca_file=str(pki["ca"].files.cert))
    new_ca = settings.replace(tls_ca_file=str(pki["rogue"].files.cert))
    renewed = pki["rogue"].issue("server-renewed", server=True)
    async for target in _serve(server_tls):
        assert await _status(target, old_ca) == grpc.StatusCode.OK
        os.replace(renewed.cert, cert)  # the key is still the old one: a mismatched pair
        assert await _status(target, old_ca) == grpc.StatusCode.OK
        os.replace(renewed.key, key)
        assert await _status(target, new_ca) == grpc.StatusCode.OK
        assert await _status(target, old_ca) == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_are_checked(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="MODELFLEET_TLS_CERT_FILE and MODELFLEET_TLS_KEY_FILE"):
        settings.replace(tls_cert_file=str(tmp_path))
    with pytest.raises(InvalidArgument, match="MODELFLEET_TLS_CLIENT_CA_FILE"):
        settings.replace(tls_client_ca_file=str(tmp_path / "ca.crt"))
    with pytest.raises(InvalidArgument, match="MODELFLEET_AUTH_TOKENS_FILE"):
        settings.replace(auth_tokens_file=str(tmp_path / "missing"))
