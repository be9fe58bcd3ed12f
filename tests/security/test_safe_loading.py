"""Uploads that carry a pickle payload are refused without running it; names
that try to leave their directory are refused; uploads and messages are size
limited. Everything goes through the real RPCs as admin."""

from __future__ import annotations

import io
import pickle
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.data.v1 import data_pb2, data_pb2_grpc
from common.api.modelfleet.registry.v1 import registry_pb2, registry_pb2_grpc
from common.settings import Settings
from tests.registry.helpers import ARCH, mlp_bytes
from tests.security.conftest import bearer

ADMIN = bearer("admin")
TENSOR = [model_pb2.TensorSpec(name="input", datatype="FP32", shape=[-1, 4])]
OUT = [model_pb2.TensorSpec(name="output", datatype="FP32", shape=[-1, 3])]


class Payload:
    """Unpickling this creates ``marker``: proof that the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def torch_saved(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "evil": Payload(marker)}, buffer)
    return buffer.getvalue()


def raw_pickle(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def npy_object_array(marker: Path) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([[Payload(marker), 1.0]], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def npz_object_array(marker: Path) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([[Payload(marker), 1.0]], dtype=object), y=np.zeros(1))
    return buffer.getvalue()


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a pickle payload was executed"


@pytest.fixture
async def registry(fleet: dict[str, str]) -> AsyncIterator[registry_pb2_grpc.ModelRegistryServiceStub]:
    async with grpc.aio.insecure_channel(fleet["modelfleet.registry.v1.ModelRegistryService"]) as channel:
        yield registry_pb2_grpc.ModelRegistryServiceStub(channel)


@pytest.fixture
async def data(fleet: dict[str, str]) -> AsyncIterator[data_pb2_grpc.DataServiceStub]:
    async with grpc.aio.insecure_channel(fleet["modelfleet.data.v1.DataService"]) as channel:
        yield data_pb2_grpc.DataServiceStub(channel)


async def _messages(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


def model_upload(
    header: registry_pb2.UploadModelHeader, body: bytes
) -> list[registry_pb2.UploadModelRequest]:
    parts = [body[i : i + 64 * 1024] for i in range(0, len(body), 64 * 1024)]
    return [
        registry_pb2.UploadModelRequest(header=header),
        *(registry_pb2.UploadModelRequest(chunk=p) for p in parts),
    ]


def dataset_upload(header: data_pb2.UploadDatasetHeader, body: bytes) -> list[data_pb2.UploadDatasetRequest]:
    return [data_pb2.UploadDatasetRequest(header=header), data_pb2.UploadDatasetRequest(chunk=body)]


async def upload_model_status(
    stub: registry_pb2_grpc.ModelRegistryServiceStub, messages: list[Any]
) -> grpc.StatusCode:
    try:
        await stub.UploadModel(_messages(messages), metadata=ADMIN, timeout=30)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def upload_dataset_status(stub: data_pb2_grpc.DataServiceStub, messages: list[Any]) -> grpc.StatusCode:
    try:
        await stub.UploadDataset(_messages(messages), metadata=ADMIN, timeout=30)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


FORMATS: dict[str, dict[str, Any]] = {
    "safetensors": dict(format=registry_pb2.MODEL_FORMAT_SAFETENSORS, architecture=ARCH),
    "torchscript": dict(format=registry_pb2.MODEL_FORMAT_TORCHSCRIPT, inputs=TENSOR, outputs=OUT),
    "torch_export": dict(format=registry_pb2.MODEL_FORMAT_TORCH_EXPORT, inputs=TENSOR, outputs=OUT),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("make", [torch_saved, raw_pickle], ids=["torch.save", "pickle"])
async def test_model_with_pickle_payload_is_refused(
    registry: registry_pb2_grpc.ModelRegistryServiceStub, marker: Path, fmt: str, make: Any
) -> None:
    header = registry_pb2.UploadModelHeader(name="evil", **FORMATS[fmt])
    assert (
        await upload_model_status(registry, model_upload(header, make(marker)))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.GetModel(registry_pb2.GetModelRequest(name="evil"), metadata=ADMIN, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("fmt", "make"),
    [(data_pb2.DATA_FORMAT_NPY, npy_object_array), (data_pb2.DATA_FORMAT_NPZ, npz_object_array)],
    ids=["npy", "npz"],
)
async def test_dataset_with_object_array_is_refused(
    data: data_pb2_grpc.DataServiceStub, marker: Path, fmt: int, make: Any
) -> None:
    header = data_pb2.UploadDatasetHeader(name="evil", format=fmt)  # type: ignore[arg-type]
    assert (
        await upload_dataset_status(data, dataset_upload(header, make(marker)))
        == grpc.StatusCode.INVALID_ARGUMENT
    )


TRAVERSAL = ["../escape", "..", "a/../../b", "/etc/passwd", "a\\..\\b", "x\x00y", "./x"]


@pytest.mark.parametrize("name", TRAVERSAL)
async def test_traversal_in_names_is_refused(
    registry: registry_pb2_grpc.ModelRegistryServiceStub, data: data_pb2_grpc.DataServiceStub, name: str
) -> None:
    header = registry_pb2.UploadModelHeader(
        name=name, format=registry_pb2.MODEL_FORMAT_SAFETENSORS, architecture=ARCH
    )
    assert (
        await upload_model_status(registry, model_upload(header, mlp_bytes()))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    dataset = data_pb2.UploadDatasetHeader(name=name, format=data_pb2.DATA_FORMAT_CSV, csv_has_header=True)
    assert (
        await upload_dataset_status(data, dataset_upload(dataset, b"a,b\n1,2\n"))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    # A real model, so alias and version names are checked rather than the model found missing.
    good = registry_pb2.UploadModelHeader(
        name="m", format=registry_pb2.MODEL_FORMAT_SAFETENSORS, architecture=ARCH
    )
    assert await upload_model_status(registry, model_upload(good, mlp_bytes())) == grpc.StatusCode.OK
    calls = [
        registry.GetModel(registry_pb2.GetModelRequest(name=name), metadata=ADMIN, timeout=10),
        registry.SetAlias(
            registry_pb2.SetAliasRequest(name="m", alias=name, version="1"), metadata=ADMIN, timeout=10
        ),
        registry.GetModelVersion(
            registry_pb2.GetModelVersionRequest(name="m", version=name), metadata=ADMIN, timeout=10
        ),
        data.GetDataset(data_pb2.GetDatasetRequest(name=name), metadata=ADMIN, timeout=10),
        data.DeleteDataset(data_pb2.DeleteDatasetRequest(name=name), metadata=ADMIN, timeout=10),
    ]
    for pending in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pending
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())


async def test_artifact_digest_must_be_hex(registry: registry_pb2_grpc.ModelRegistryServiceStub) -> None:
    header = registry_pb2.UploadModelHeader(
        name="m", format=registry_pb2.MODEL_FORMAT_SAFETENSORS, architecture=ARCH, sha256="../../etc/passwd"
    )
    assert (
        await upload_model_status(registry, model_upload(header, mlp_bytes()))
        == grpc.StatusCode.INVALID_ARGUMENT
    )


async def test_uploads_over_the_limit_are_refused(
    registry: registry_pb2_grpc.ModelRegistryServiceStub,
    data: data_pb2_grpc.DataServiceStub,
    auth_settings: Settings,
) -> None:
    big = b"0" * (auth_settings.max_upload_bytes + 1)
    header = registry_pb2.UploadModelHeader(
        name="big", format=registry_pb2.MODEL_FORMAT_SAFETENSORS, architecture=ARCH
    )
    assert (
        await upload_model_status(registry, model_upload(header, big)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    dataset = data_pb2.UploadDatasetHeader(name="big", format=data_pb2.DATA_FORMAT_CSV)
    parts = [big[i : i + 64 * 1024] for i in range(0, len(big), 64 * 1024)]
    messages = [
        data_pb2.UploadDatasetRequest(header=dataset),
        *(data_pb2.UploadDatasetRequest(chunk=p) for p in parts),
    ]
    assert await upload_dataset_status(data, messages) == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_messages_over_max_message_bytes_are_refused(
    auth_settings: Settings, redis_client: object, tmp_path: Path
) -> None:
    from services.data import server as data_server

    small = auth_settings.replace(max_message_bytes=64 * 1024, control_max_message_bytes=32 * 1024)
    host = await data_server.build(small)
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = data_pb2_grpc.DataServiceStub(channel)
            request = data_pb2.GetDatasetRequest(name="x" * (small.control_max_message_bytes + 1))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetDataset(request, metadata=ADMIN, timeout=10)
    finally:
        await host.stop(0)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_control_plane_servers_take_small_messages_and_inference_large(
    fleet: dict[str, str], auth_settings: Settings
) -> None:
    """Data, training and compression take specs and upload chunks, never tensors:
    a message over MODELFLEET_CONTROL_MAX_MESSAGE_BYTES (16 MiB) is refused before
    their servicers run; inference still takes MODELFLEET_MAX_MESSAGE_BYTES."""
    from common.api.inference import grpc_predict_v2_pb2 as pb
    from common.api.inference import grpc_predict_v2_pb2_grpc as pb_grpc
    from common.api.modelfleet.jobs.v1 import jobs_pb2, jobs_pb2_grpc

    big = "x" * (auth_settings.control_max_message_bytes + 1)
    calls = {
        "modelfleet.data.v1.DataService": lambda ch: data_pb2_grpc.DataServiceStub(ch).GetDataset(
            data_pb2.GetDatasetRequest(name=big), metadata=ADMIN, timeout=30
        ),
        "modelfleet.jobs.v1.JobService": lambda ch: jobs_pb2_grpc.JobServiceStub(ch).GetJob(
            jobs_pb2.GetJobRequest(job_id=big), metadata=ADMIN, timeout=30
        ),
        "inference.GRPCInferenceService": lambda ch: pb_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(
            pb.ModelMetadataRequest(name=big), metadata=ADMIN, timeout=30
        ),
    }
    codes = {}
    for service, call in calls.items():
        async with grpc.aio.insecure_channel(
            fleet[service], options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(channel)
            codes[service] = err.value.code()
    assert codes == {
        "modelfleet.data.v1.DataService": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "modelfleet.jobs.v1.JobService": grpc.StatusCode.RESOURCE_EXHAUSTED,
        # Received whole, then answered for what it says: no such model.
        "inference.GRPCInferenceService": grpc.StatusCode.NOT_FOUND,
    }
