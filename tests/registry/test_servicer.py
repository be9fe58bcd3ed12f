"""ModelRegistryService on a real ServiceHost bound to port 0."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable

import grpc
import pytest

from common.api.modelfleet.registry.v1 import registry_pb2, registry_pb2_grpc
from common.artifacts import ArtifactStore
from tests.registry.conftest import UPLOAD_LIMIT
from tests.registry.helpers import mlp_bytes, mlp_header


@pytest.fixture
async def stub(registry_port: int) -> AsyncIterator[registry_pb2_grpc.ModelRegistryServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry_port}") as channel:
        yield registry_pb2_grpc.ModelRegistryServiceStub(channel)


async def stream(
    messages: Iterable[registry_pb2.UploadModelRequest],
) -> AsyncIterator[registry_pb2.UploadModelRequest]:
    for message in messages:
        yield message


def chunks(data: bytes, size: int = 256) -> list[registry_pb2.UploadModelRequest]:
    return [registry_pb2.UploadModelRequest(chunk=data[i : i + size]) for i in range(0, len(data), size)]


def header_msg(header: registry_pb2.UploadModelHeader) -> registry_pb2.UploadModelRequest:
    return registry_pb2.UploadModelRequest(header=header)


async def upload_error(
    stub: registry_pb2_grpc.ModelRegistryServiceStub, messages: list[registry_pb2.UploadModelRequest]
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.UploadModel(stream(messages), timeout=30)
    return info.value


async def test_upload_in_chunks_then_read_back(stub: registry_pb2_grpc.ModelRegistryServiceStub) -> None:
    data = mlp_bytes()
    header = mlp_header(sha256=hashlib.sha256(data).hexdigest())
    response = await stub.UploadModel(stream([header_msg(header), *chunks(data)]), timeout=30)
    assert response.version.version == "1"
    got = await stub.GetModelVersion(registry_pb2.GetModelVersionRequest(name="iris"), timeout=10)
    assert got.version.artifact_digest == hashlib.sha256(data).hexdigest()
    assert got.version.artifact_size_bytes == len(data)
    assert got.version.inputs[0].shape == [-1, 4]

    await stub.UploadModel(stream([header_msg(header), *chunks(data, 1000)]), timeout=30)
    listed = await stub.ListModelVersions(registry_pb2.ListModelVersionsRequest(name="iris", page_size=1))
    assert [v.version for v in listed.versions] == ["2"] and listed.next_page_token
    models = await stub.ListModels(registry_pb2.ListModelsRequest())
    assert [(m.name, m.version_count) for m in models.models] == [("iris", 2)]


async def test_garbage_is_invalid_and_registers_nothing(
    stub: registry_pb2_grpc.ModelRegistryServiceStub, store: ArtifactStore
) -> None:
    error = await upload_error(stub, [header_msg(mlp_header()), *chunks(b"\x00garbage" * 100)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "MODEL_FORMAT_SAFETENSORS" in (error.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetModel(registry_pb2.GetModelRequest(name="iris"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert list((store.root / "sha256").glob("*/*")) == []


async def test_header_must_come_first(stub: registry_pb2_grpc.ModelRegistryServiceStub) -> None:
    for messages in ([], chunks(mlp_bytes())):
        error = await upload_error(stub, messages)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "header" in (error.details() or "")
    twice = [header_msg(mlp_header()), header_msg(mlp_header())]
    error = await upload_error(stub, twice)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_over_the_size_limit(
    stub: registry_pb2_grpc.ModelRegistryServiceStub, store: ArtifactStore
) -> None:
    error = await upload_error(stub, [header_msg(mlp_header()), *chunks(b"x" * (UPLOAD_LIMIT + 1), 4096)])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert list((store.root / "sha256").glob("*/*")) == []


async def test_alias_canary_and_errors_map_to_status(
    stub: registry_pb2_grpc.ModelRegistryServiceStub,
) -> None:
    data = mlp_bytes()
    for accuracy in (0.9, 0.5):
        header = mlp_header()
        header.metrics["test_accuracy"] = accuracy
        await stub.UploadModel(stream([header_msg(header), *chunks(data)]), timeout=30)
    model = (
        await stub.SetAlias(registry_pb2.SetAliasRequest(name="iris", alias="production", version="1"))
    ).model
    assert model.aliases["production"] == "1"
    guarded = registry_pb2.SetAliasRequest(
        name="iris",
        alias="production",
        version="2",
        guard=registry_pb2.PromotionGuard(metric="test_accuracy", max_drop=0.1),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SetAlias(guarded, timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "0.9" in (info.value.details() or "") and "0.5" in (info.value.details() or "")

    canary = await stub.SetCanary(registry_pb2.SetCanaryRequest(name="iris", version="2", fraction=0.2))
    assert canary.model.canary.version == "2"
    ended = await stub.EndCanary(registry_pb2.EndCanaryRequest(name="iris", promote=True))
    assert ended.model.aliases["production"] == "2" and not ended.model.canary.version
    back = await stub.RollbackAlias(registry_pb2.RollbackAliasRequest(name="iris", alias="production"))
    assert back.model.aliases["production"] == "1"
    await stub.DeleteModelVersion(registry_pb2.DeleteModelVersionRequest(name="iris", version="2"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetModelVersion(registry_pb2.GetModelVersionRequest(name="iris", version="2"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SetCanary(
            registry_pb2.SetCanaryRequest(name="iris", version="1", fraction=2.0), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
