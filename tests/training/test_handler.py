"""The training handler driven by a real common.jobs Worker in the test process
(its ranks are still real spawned processes): regression with early stopping,
and run-time failures that must not be retried."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.training.v1 import training_pb2
from common.api.modelfleet.training.v1 import training_spec_pb2 as ts
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog
from common.jobs import JobQueue, Worker
from common.registry import ModelRegistry
from common.settings import Settings
from services.training.handler import TrainingHandler
from services.training.submit import TrainingSubmitter
from tests.training.conftest import Dataset, add_dataset

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def queue(redis_client: redis.Redis, fast_settings: Settings) -> JobQueue:
    return JobQueue(redis_client, fast_settings)


def run_one(
    queue: JobQueue, client: redis.Redis, fast_settings: Settings, store: ArtifactStore, job_id: str
) -> jobs_pb2.Job:
    handler = TrainingHandler(fast_settings, client, store)
    worker = Worker(queue, jobs_pb2.JOB_KIND_TRAINING, handler)
    for _ in range(20):  # bounded: the queued job is delivered within a few polls
        if worker.run_once(block_ms=200):
            break
    return queue.get(job_id)


def test_regression_with_early_stopping_keeps_the_best_epoch(
    queue: JobQueue,
    catalog: DatasetCatalog,
    store: ArtifactStore,
    fast_settings: Settings,
    redis_client: redis.Redis,
) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 5)).astype(np.float32)
    y = x @ np.array([1.0, -2.0, 0.5, 0.0, 3.0], dtype=np.float32) + 0.05 * rng.standard_normal(600)
    add_dataset(catalog, store, "linear", x, y, classes=0)
    spec = ts.TrainingSpec(
        dataset_name="linear",
        model_name="linear-model",
        epochs=400,
        batch_size=32,
        optimizer=ts.OPTIMIZER_SGD,
        learning_rate=0.05,
        momentum=0.9,
        loss=ts.LOSS_HUBER,
        checkpoint_interval_epochs=2,
    )
    spec.architecture.mlp.hidden_sizes.extend([16])
    spec.early_stopping.patience = 3
    spec.early_stopping.min_delta = 1e-3
    job = TrainingSubmitter(queue, catalog).submit(training_pb2.SubmitTrainingJobRequest(spec=spec))

    done = run_one(queue, redis_client, fast_settings, store, job.id)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.last_error
    assert done.metrics["epochs_run"] < 400  # stopped early
    assert done.metrics["best_epoch"] <= done.metrics["epochs_run"] - 3
    assert done.metrics["val_mse"] < 0.1
    assert "test_mse" in done.metrics
    version = ModelRegistry(redis_client, fast_settings.redis_prefix).get_version("linear-model")
    assert version.metrics["val_loss"] == pytest.approx(done.metrics["val_loss"])
    assert "stopped early" in version.lineage.steps[0]
    assert version.labels["task"] == "regression"


def test_dataset_gone_at_run_time_fails_without_retry(
    queue: JobQueue,
    catalog: DatasetCatalog,
    store: ArtifactStore,
    fast_settings: Settings,
    redis_client: redis.Redis,
    digits: Dataset,
) -> None:
    spec = ts.TrainingSpec(dataset_name="digits", model_name="orphan")
    job = TrainingSubmitter(queue, catalog).submit(
        training_pb2.SubmitTrainingJobRequest(spec=spec, max_attempts=3)
    )
    catalog.delete("digits", digits.meta.version)

    done = run_one(queue, redis_client, fast_settings, store, job.id)
    assert done.state == jobs_pb2.JOB_STATE_FAILED
    assert done.attempts == 1
    assert "digits" in done.last_error
