"""Training end to end: a real training server, real worker subprocesses that
spawn real DDP ranks, real Redis and a real artifact store."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import numpy as np
import pytest
import redis
import torch

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.api.modelfleet.training.v1 import training_pb2
from common.api.modelfleet.training.v1 import training_spec_pb2 as ts
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog, load_split
from common.models.loading import load_model
from common.models.mlp import MLP
from common.registry import ModelRegistry
from common.settings import Settings
from services.training.checkpoint import checkpoint_dir
from tests.training.conftest import Dataset, SpawnWorker, Stubs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

# Stated bar for the 2-process DDP job on digits.
DIGITS_VAL_ACCURACY_BAR = 0.9
WAIT_S = 90.0
TERMINAL = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)


async def submit(stubs: Stubs, spec: ts.TrainingSpec) -> jobs_pb2.Job:
    response = await stubs.training.SubmitTrainingJob(training_pb2.SubmitTrainingJobRequest(spec=spec))
    return response.job


async def wait_for(stubs: Stubs, job_id: str, done: set[int] | tuple[int, ...] = TERMINAL) -> jobs_pb2.Job:
    """Poll GetJob until the job is in one of ``done`` (bounded by WAIT_S)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        job = (await stubs.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id))).job
        if job.state in done:
            return job
        assert loop.time() < deadline, f"job still {jobs_pb2.JobState.Name(job.state)}: {job}"
        await asyncio.sleep(0.05)


async def test_submit_rejects_bad_specs_naming_the_field(stubs: Stubs, digits: Dataset) -> None:
    bad = ts.TrainingSpec(dataset_name="digits", model_name="m", learning_rate=-1.0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await submit(stubs, bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.learning_rate must be > 0" in (err.value.details() or "")

    missing = ts.TrainingSpec(dataset_name="nope", model_name="m")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await submit(stubs, missing)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    wrong_size = ts.TrainingSpec(dataset_name="digits", model_name="m")
    wrong_size.architecture.mlp.input_size = 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await submit(stubs, wrong_size)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.architecture.mlp.input_size" in (err.value.details() or "")


async def test_ddp_job_trains_digits_and_registers_a_servable_model(
    stubs: Stubs,
    digits: Dataset,
    spawn_worker: SpawnWorker,
    redis_client: redis.Redis,
    fast_settings: Settings,
    store: ArtifactStore,
) -> None:
    spec = ts.TrainingSpec(
        dataset_name="digits",
        model_name="digits-mlp",
        epochs=8,
        batch_size=32,
        world_size=2,
        learning_rate=3e-3,
        weight_decay=1e-4,
        l1_penalty=1e-6,
        seed=3,
    )
    spec.architecture.mlp.hidden_sizes.append(32)
    spec.architecture.mlp.dropout = 0.1
    queued = await submit(stubs, spec)
    assert queued.state == jobs_pb2.JOB_STATE_QUEUED
    assert queued.training.dataset_version == digits.meta.version  # pinned at submit
    assert queued.training.architecture.mlp.input_size == 64
    spawn_worker()

    job = await wait_for(stubs, queued.id)
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.last_error
    assert job.metrics["val_accuracy"] >= DIGITS_VAL_ACCURACY_BAR
    assert job.metrics["samples_per_second"] > 0

    registry = ModelRegistry(redis_client, fast_settings.redis_prefix)
    version = registry.get_version("digits-mlp", job.result.model_version)
    assert version.format == registry_pb2.MODEL_FORMAT_SAFETENSORS
    assert list(version.normalization.shift) == list(digits.meta.normalization.shift)
    assert {"train_loss", "val_loss", "val_accuracy", "test_accuracy"} <= set(version.metrics)
    assert version.lineage.dataset_name == "digits"
    assert version.lineage.dataset_version == digits.meta.version
    assert version.lineage.job_id == job.id
    assert '"worldSize": 2' in version.lineage.spec_json
    assert list(version.class_names) == [str(c) for c in range(10)]
    assert [t.name for t in version.inputs] == ["input"] and list(version.inputs[0].shape) == [-1, 64]
    assert not checkpoint_dir(fast_settings.artifact_root, job.id).exists()

    # The served model takes raw features (normalization baked in): it gives the
    # trained layers' outputs on the normalized test shard, and the test metrics
    # the trainer measured (up to float rounding flipping a borderline argmax).
    loaded = load_model(version, store, torch.device("cpu"))
    assert isinstance(loaded.module, MLP)
    record = DatasetCatalog(redis_client, fast_settings.redis_prefix).get("digits", digits.meta.version)
    shard, _ = load_split(store, record, "test")
    with torch.no_grad():
        served = loaded.module(torch.from_numpy(digits.raw_test_features))
        trained = loaded.module.layers(torch.from_numpy(np.array(shard)))
    assert torch.allclose(served, trained, atol=1e-4)
    labels = torch.from_numpy(digits.test_labels)
    accuracy = float((served.argmax(dim=1) == labels).float().mean())
    assert accuracy == pytest.approx(version.metrics["test_accuracy"], abs=1.5 / len(labels))
    loss = float(torch.nn.functional.cross_entropy(served, labels))
    assert loss == pytest.approx(version.metrics["test_loss"], rel=1e-3)

    events = [
        e.event
        async for e in stubs.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id, from_beginning=True))
    ]
    epochs = [e.epoch for e in events if e.type == jobs_pb2.JOB_EVENT_TYPE_PROGRESS and e.epoch]
    assert epochs == list(range(1, 9))
    assert all(
        "val_loss" in e.metrics for e in events if e.type == jobs_pb2.JOB_EVENT_TYPE_PROGRESS and e.epoch
    )


async def test_sigkilled_worker_job_resumes_from_checkpoint_on_another(
    stubs: Stubs,
    digits: Dataset,
    spawn_worker: SpawnWorker,
    redis_client: redis.Redis,
    fast_settings: Settings,
) -> None:
    # Small batches make epochs long enough that the kill lands mid-job.
    spec = ts.TrainingSpec(dataset_name="digits", model_name="resumed", epochs=8, batch_size=8, seed=1)
    queued = await submit(stubs, spec)
    first = spawn_worker()
    ckpt = checkpoint_dir(fast_settings.artifact_root, queued.id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not (ckpt.is_dir() and any(p.name.startswith("state-") for p in ckpt.iterdir())):
        assert loop.time() < deadline, "no checkpoint was written"
        assert first.poll() is None, "the worker exited before checkpointing"
        await asyncio.sleep(0.01)
    # Only the worker: its ranks must notice their parent is gone and stop.
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    spawn_worker()

    job = await wait_for(stubs, queued.id)
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.last_error
    assert job.attempts == 2
    assert 1 <= job.metrics["resumed_from_epoch"] < 8
    assert job.metrics["epochs_run"] == 8
    registry = ModelRegistry(redis_client, fast_settings.redis_prefix)
    versions, _ = registry.list_versions("resumed")
    assert [v.version for v in versions] == ["1"]  # finished (and registered) exactly once
    events = [
        e.event
        async for e in stubs.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id, from_beginning=True))
    ]
    succeeded = [
        e
        for e in events
        if e.type == jobs_pb2.JOB_EVENT_TYPE_STATE and e.state == jobs_pb2.JOB_STATE_SUCCEEDED
    ]
    assert len(succeeded) == 1
    assert any("resumed from the checkpoint" in e.message for e in events)


async def test_cancel_stops_a_running_job(
    stubs: Stubs,
    digits: Dataset,
    spawn_worker: SpawnWorker,
    redis_client: redis.Redis,
    fast_settings: Settings,
) -> None:
    spec = ts.TrainingSpec(
        dataset_name="digits", model_name="cancelled", epochs=10_000, batch_size=16, world_size=2
    )
    queued = await submit(stubs, spec)
    worker = spawn_worker()
    stream = stubs.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=queued.id, from_beginning=True))
    async with asyncio.timeout(WAIT_S):
        async for response in stream:
            if response.event.type == jobs_pb2.JOB_EVENT_TYPE_PROGRESS and response.event.epoch >= 1:
                break
    stream.cancel()
    await stubs.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=queued.id, reason="test"))

    job = await wait_for(stubs, queued.id)
    assert job.state == jobs_pb2.JOB_STATE_CANCELLED
    assert job.progress < 1.0
    registry = ModelRegistry(redis_client, fast_settings.redis_prefix)
    assert registry.list_models()[0] == []
    # The worker dropped the job's checkpoints once its ranks stopped, and lives on.
    ckpt = checkpoint_dir(fast_settings.artifact_root, queued.id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while ckpt.exists():
        assert loop.time() < deadline, "checkpoints of the cancelled job were left behind"
        await asyncio.sleep(0.05)
    assert worker.poll() is None
    assert np.isfinite(job.metrics["train_loss"])


async def test_submit_refuses_a_model_above_the_parameter_budget(stubs: Stubs, digits: Dataset) -> None:
    """A model that can never fit is refused at submit (it used to be queued and
    fail, attempt after attempt, allocating each time)."""
    huge = ts.TrainingSpec(dataset_name="digits", model_name="m")
    huge.architecture.mlp.hidden_sizes.extend([50_000, 50_000])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await submit(stubs, huge)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert "2,503,800,010 parameters" in details and "MODELFLEET_MAX_MODEL_PARAMETERS" in details, details
    listed = await stubs.jobs.ListJobs(jobs_pb2.ListJobsRequest())
    assert not listed.jobs  # nothing was queued
