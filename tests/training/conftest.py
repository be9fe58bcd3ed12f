"""Training-test fixtures: small datasets registered in the catalog the way the
data service stores them (normalized .npy shards in the artifact store), a
fast-timeout settings object, and training worker subprocesses."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
import torch
from sklearn.datasets import load_digits

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.data.v1 import data_pb2
from common.api.modelfleet.jobs.v1 import jobs_pb2_grpc
from common.api.modelfleet.training.v1 import training_pb2_grpc
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog, SplitShards
from common.settings import Settings
from services.training.server import build

ROOT = Path(__file__).resolve().parents[2]

torch.set_num_threads(1)


def _npy(store: ArtifactStore, array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return store.put_bytes(buf.getvalue()).digest


@dataclass
class Dataset:
    meta: data_pb2.DatasetVersion
    raw_test_features: np.ndarray  # before normalization: what clients send
    test_labels: np.ndarray


def add_dataset(
    catalog: DatasetCatalog,
    store: ArtifactStore,
    name: str,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    classes: int,
    splits: tuple[str, ...] = ("train", "val", "test"),
    seed: int = 0,
    example_shape: tuple[int, ...] = (),
) -> Dataset:
    """Z-score the features with train statistics, split 70/15/15 by ``seed``
    and store it as a dataset version (classification if ``classes``)."""
    order = np.random.default_rng(seed).permutation(len(features))
    cut1, cut2 = int(0.7 * len(order)), int(0.85 * len(order))
    parts = {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}
    mean = features[parts["train"]].mean(axis=0)
    std = features[parts["train"]].std(axis=0)
    std[std == 0] = 1.0
    normalized = ((features - mean) / std).astype(np.float32)
    label_dtype = np.int64 if classes else np.float32
    shards = {
        split: SplitShards(
            _npy(store, normalized[parts[split]]), _npy(store, labels[parts[split]].astype(label_dtype))
        )
        for split in splits
    }
    meta = data_pb2.DatasetVersion(
        name=name,
        num_rows=len(features),
        num_features=features.shape[1],
        task=data_pb2.DATASET_TASK_CLASSIFICATION if classes else data_pb2.DATASET_TASK_REGRESSION,
        num_classes=classes,
        class_names=[str(c) for c in range(classes)],
        split_rows={s: len(parts[s]) for s in splits},
        example_shape=list(example_shape) or [features.shape[1]],
        normalization=model_pb2.Normalization(
            kind=model_pb2.NORMALIZATION_KIND_ZSCORE, shift=mean.tolist(), scale=std.tolist()
        ),
    )
    test = parts["test"]
    return Dataset(catalog.create(meta, shards), features[test].astype(np.float32), labels[test])


def add_digits_images(catalog: DatasetCatalog, store: ArtifactStore, name: str = "digits-img") -> Dataset:
    """scikit-learn's bundled digits as 1x8x8 images (per-pixel z-scored)."""
    data = load_digits()
    return add_dataset(
        catalog, store, name, data.data.astype(np.float32), data.target, classes=10, example_shape=(1, 8, 8)
    )


@pytest.fixture
def fast_settings(settings: Settings) -> Settings:
    """Reclaim a dead worker's job after 2 s; heartbeat every 0.3 s."""
    return settings.replace(job_visibility_timeout_s=2.0, job_heartbeat_s=0.3, job_retry_backoff_s=0.05)


@pytest.fixture
def catalog(redis_client: redis.Redis, settings: Settings) -> DatasetCatalog:
    return DatasetCatalog(redis_client, settings.redis_prefix)


@pytest.fixture
def digits(catalog: DatasetCatalog, store: ArtifactStore) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 rows, 64 features, 10 classes)."""
    data = load_digits()
    return add_dataset(catalog, store, "digits", data.data.astype(np.float32), data.target, classes=10)


SpawnWorker = Callable[[], subprocess.Popen[bytes]]


@pytest.fixture
def spawn_worker(fast_settings: Settings) -> Iterator[SpawnWorker]:
    """Start ``modelfleet worker training`` subprocesses; any still running are killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn() -> subprocess.Popen[bytes]:
        env = {**os.environ, **fast_settings.env(), "PYTHONPATH": str(ROOT)}
        # The worker's log stays next to the test's artifacts for post-mortems.
        log_path = fast_settings.artifact_root.parent / f"worker-{len(procs)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", "worker", "training"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@dataclass
class Stubs:
    training: training_pb2_grpc.TrainingServiceStub
    jobs: jobs_pb2_grpc.JobServiceStub


@pytest.fixture
async def stubs(fast_settings: Settings, redis_client: redis.Redis) -> AsyncIterator[Stubs]:
    """A real training server (TrainingService + JobService) on a free port."""
    host = await build(fast_settings)
    port = await host.start()
    await host.ready()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Stubs(training_pb2_grpc.TrainingServiceStub(channel), jobs_pb2_grpc.JobServiceStub(channel))
    await host.stop(0)
