"""Fixtures for the inference tests: a registry on the per-test Redis prefix,
model registration helpers, and a real server on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import torch

from common.api.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactStore
from common.grpcserver import ServiceHost
from common.models.loading import save_weights
from common.models.mlp import build_model
from common.registry import ModelRegistry
from common.settings import Settings
from services.inference.server import build

torch.set_num_threads(1)


@pytest.fixture
def registry(redis_client: redis.Redis, settings: Settings) -> ModelRegistry:
    return ModelRegistry(redis_client, settings.redis_prefix)


def mlp_arch(inputs: int = 4, hidden: tuple[int, ...] = (8,), outputs: int = 3) -> model_pb2.Architecture:
    return model_pb2.Architecture(
        mlp=model_pb2.MlpArchitecture(input_size=inputs, hidden_sizes=list(hidden), output_size=outputs)
    )


def register_mlp(
    registry: ModelRegistry,
    store: ArtifactStore,
    name: str,
    seed: int = 0,
    arch: model_pb2.Architecture | None = None,
    class_names: Sequence[str] = (),
) -> tuple[registry_pb2.ModelVersion, torch.nn.Module]:
    """A randomly initialised MLP registered as SAFETENSORS (with ``class_names``,
    if given); returns the version and the module."""
    arch = arch or mlp_arch()
    torch.manual_seed(seed)
    model = build_model(arch).eval()
    ref = save_weights(model, store)
    version = registry.register(
        registry_pb2.ModelVersion(
            model_name=name,
            format=registry_pb2.MODEL_FORMAT_SAFETENSORS,
            architecture=arch,
            artifact_digest=ref.digest,
            artifact_size_bytes=ref.size,
            class_names=class_names,
        )
    )
    return version, model


def register_file(
    registry: ModelRegistry,
    store: ArtifactStore,
    name: str,
    path: Path,
    fmt: int,
    inputs: list[model_pb2.TensorSpec],
    outputs: list[model_pb2.TensorSpec],
) -> registry_pb2.ModelVersion:
    ref = store.put_file(path)
    return registry.register(
        registry_pb2.ModelVersion(
            model_name=name,
            format=fmt,  # type: ignore[arg-type]
            artifact_digest=ref.digest,
            artifact_size_bytes=ref.size,
            inputs=inputs,
            outputs=outputs,
        )
    )


@dataclass
class Running:
    host: ServiceHost
    channel: grpc.aio.Channel
    stub: pb_grpc.GRPCInferenceServiceStub
    address: str


@asynccontextmanager
async def running(settings: Settings, metadata_token: str = "") -> AsyncIterator[Running]:
    """A started, serving inference server with an async channel to it."""
    host = await build(settings, poll_s=0.5)
    port = await host.start()
    await host.ready()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield Running(host, channel, pb_grpc.GRPCInferenceServiceStub(channel), address)
    finally:
        await channel.close()
        await host.stop(grace=2.0)


@pytest.fixture
def serve(settings: Settings) -> Iterator[Callable[..., object]]:
    """``async with serve(**overrides) as srv`` starts a server with changed settings."""

    def start(**overrides: object) -> object:
        return running(settings.replace(**overrides))

    yield start
