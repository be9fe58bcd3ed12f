"""Every RPC of every service, called with no token, a bad token, and each
role's token against the real servers: UNAUTHENTICATED, PERMISSION_DENIED,
or an answer that is not an auth error (the empty request is then rejected
or answered by the service itself)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor

import common.api
from common.auth import METHOD_ROLES, Role
from tests.security.conftest import ROLE_OF, bearer

AUTH_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
# An allowed call must reach the service: any answer but these.
NOT_REACHED = AUTH_CODES | {grpc.StatusCode.UNIMPLEMENTED}


def all_methods() -> Iterator[MethodDescriptor]:
    for info in pkgutil.walk_packages(common.api.__path__, "common.api."):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(info.name)
        for service in module.DESCRIPTOR.services_by_name.values():
            yield from service.methods


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def test_every_rpc_has_a_role() -> None:
    paths = {path(m) for m in all_methods()}
    assert len(paths) >= 30  # the walk found the services
    assert sorted(paths - METHOD_ROLES.keys()) == []
    # No stale entries either: a renamed RPC must not keep a role the table thinks it has.
    assert sorted(METHOD_ROLES.keys() - paths) == []


async def call(
    channel: grpc.aio.Channel, method: MethodDescriptor, metadata: list[tuple[str, str]]
) -> grpc.StatusCode:
    """Send one empty message; return the status (OK if the server answered)."""
    name = path(method)
    timeout = 10.0
    try:
        if method.client_streaming and method.server_streaming:
            bidi = channel.stream_stream(name)
            async for _ in bidi(_one_empty(), metadata=metadata, timeout=timeout):
                break
        elif method.client_streaming:
            await channel.stream_unary(name)(_one_empty(), metadata=metadata, timeout=timeout)
        elif method.server_streaming:
            async for _ in channel.unary_stream(name)(b"", metadata=metadata, timeout=timeout):
                break
        else:
            await channel.unary_unary(name)(b"", metadata=metadata, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _one_empty() -> AsyncIterator[bytes]:
    yield b""


async def test_every_rpc_enforces_roles(fleet: dict[str, str]) -> None:
    channels = {target: grpc.aio.insecure_channel(target) for target in set(fleet.values())}
    seen: dict[str, dict[str, str]] = {}
    try:
        for method in all_methods():
            channel = channels[fleet[method.containing_service.full_name]]
            needed = METHOD_ROLES[path(method)]
            row = seen.setdefault(path(method), {})
            code = await call(channel, method, [])
            assert code == grpc.StatusCode.UNAUTHENTICATED, (path(method), "no token", code)
            code = await call(channel, method, [("authorization", "Bearer not-a-token")])
            assert code == grpc.StatusCode.UNAUTHENTICATED, (path(method), "bad token", code)
            for client in ("reader", "submitter", "admin"):
                code = await call(channel, method, bearer(client))
                row[client] = code.name
                if Role.parse(ROLE_OF[client]) < needed:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (path(method), client, code)
                else:
                    assert code not in NOT_REACHED, (path(method), client, code)
    finally:
        for channel in channels.values():
            await channel.close()
    print(f"\n{len(seen)} RPCs x (none, bad, reader, submitter, admin) checked")


async def test_permission_denied_names_method_and_role(fleet: dict[str, str]) -> None:
    method = "/modelfleet.registry.v1.ModelRegistryService/DeleteModelVersion"
    async with grpc.aio.insecure_channel(fleet["modelfleet.registry.v1.ModelRegistryService"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(method)(b"", metadata=bearer("submitter"), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert method in (err.value.details() or "")
    assert "needs role admin" in (err.value.details() or "")


async def test_health_needs_no_token(fleet: dict[str, str]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(fleet["modelfleet.data.v1.DataService"]) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
