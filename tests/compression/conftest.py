"""Fixtures for the compression service tests: a small normalized
classification dataset in the catalog (as the data service stores it), a source
MLP registered with that dataset in its lineage, and a real server on port 0."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import redis
import torch

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.compression.v1 import compression_pb2_grpc
from common.api.modelfleet.data.v1 import data_pb2
from common.api.modelfleet.jobs.v1 import jobs_pb2_grpc
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog, SplitShards
from common.models.families import tensor_specs
from common.models.loading import save_weights
from common.models.mlp import MLP, build_model
from common.registry import ModelRegistry
from common.settings import Settings
from services.compression.server import build

torch.set_num_threads(1)

FEATURES, CLASSES = 8, 3
NORM = model_pb2.Normalization(
    kind=model_pb2.NORMALIZATION_KIND_ZSCORE, shift=[1.0] * FEATURES, scale=[2.0] * FEATURES
)


@pytest.fixture
def registry(redis_client: redis.Redis, settings: Settings) -> ModelRegistry:
    return ModelRegistry(redis_client, settings.redis_prefix)


@pytest.fixture
def catalog(redis_client: redis.Redis, settings: Settings) -> DatasetCatalog:
    return DatasetCatalog(redis_client, settings.redis_prefix)


def _npy(store: ArtifactStore, array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return store.put_bytes(buf.getvalue()).digest


@pytest.fixture
def dataset(catalog: DatasetCatalog, store: ArtifactStore) -> data_pb2.DatasetVersion:
    """Linearly separable blobs; normalized features in the shards."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(CLASSES, FEATURES)) * 3
    shards = {}
    for split, rows in (("train", 240), ("test", 90)):
        labels = np.arange(rows) % CLASSES
        features = (centres[labels] + rng.normal(size=(rows, FEATURES))).astype(np.float32)
        shards[split] = SplitShards(_npy(store, features), _npy(store, labels.astype(np.int64)))
    meta = data_pb2.DatasetVersion(
        name="blobs",
        num_rows=330,
        num_features=FEATURES,
        task=data_pb2.DATASET_TASK_CLASSIFICATION,
        num_classes=CLASSES,
        normalization=NORM,
        split_rows={"train": 240, "test": 90},
    )
    return catalog.create(meta, shards)


@dataclass
class Source:
    version: registry_pb2.ModelVersion
    model: MLP


def register_mlp(
    registry: ModelRegistry,
    store: ArtifactStore,
    name: str,
    hidden: list[int],
    dataset: data_pb2.DatasetVersion | None = None,
) -> Source:
    torch.manual_seed(0)
    arch = model_pb2.Architecture(
        mlp=model_pb2.MlpArchitecture(input_size=FEATURES, hidden_sizes=hidden, output_size=CLASSES)
    )
    model = build_model(arch, NORM).eval()
    ref = save_weights(model, store)
    inputs, outputs = tensor_specs(arch)
    version = registry_pb2.ModelVersion(
        model_name=name,
        format=registry_pb2.MODEL_FORMAT_SAFETENSORS,
        architecture=arch,
        normalization=NORM,
        inputs=inputs,
        outputs=outputs,
        artifact_digest=ref.digest,
        artifact_size_bytes=ref.size,
        class_names=["a", "b", "c"],
    )
    if dataset is not None:
        version.lineage.dataset_name, version.lineage.dataset_version = dataset.name, dataset.version
    return Source(registry.register(version), model)


@pytest.fixture
def source(registry: ModelRegistry, store: ArtifactStore, dataset: data_pb2.DatasetVersion) -> Source:
    return register_mlp(registry, store, "clf", [32, 16], dataset)


@dataclass
class Stubs:
    compression: compression_pb2_grpc.CompressionServiceStub
    jobs: jobs_pb2_grpc.JobServiceStub


@pytest.fixture
async def stubs(settings: Settings, redis_client: redis.Redis) -> AsyncIterator[Stubs]:
    host = await build(settings)
    port = await host.start()
    await host.ready()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Stubs(
            compression_pb2_grpc.CompressionServiceStub(channel), jobs_pb2_grpc.JobServiceStub(channel)
        )
    await host.stop(0)
