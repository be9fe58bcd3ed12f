"""Jobs record who submitted them; a submitter may cancel only its own jobs,
an admin any. The whole path is real RPCs with each client's token."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.data.v1 import data_pb2, data_pb2_grpc
from common.api.modelfleet.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from common.api.modelfleet.training.v1 import training_pb2, training_pb2_grpc
from common.api.modelfleet.training.v1 import training_spec_pb2 as tspec
from tests.security.conftest import bearer


@pytest.fixture
async def training_channel(fleet: dict[str, str]) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(fleet["modelfleet.training.v1.TrainingService"]) as channel:
        yield channel


async def _submit(fleet: dict[str, str], channel: grpc.aio.Channel, client: str) -> jobs_pb2.Job:
    async with grpc.aio.insecure_channel(fleet["modelfleet.data.v1.DataService"]) as data_channel:
        data = data_pb2_grpc.DataServiceStub(data_channel)
        request = data_pb2.CreateDatasetFromSourceRequest(name="iris", source=data_pb2.BUILTIN_SOURCE_IRIS)
        await data.CreateDatasetFromSource(request, metadata=bearer(client), timeout=30)
        split = data_pb2.PreprocessDatasetRequest(name="iris", split=data_pb2.SplitSpec(val_fraction=0.2))
        dataset = (await data.PreprocessDataset(split, metadata=bearer(client), timeout=30)).dataset
    spec = tspec.TrainingSpec(
        dataset_name=dataset.name,
        dataset_version=dataset.version,
        model_name="iris-mlp",
        architecture=model_pb2.Architecture(mlp=model_pb2.MlpArchitecture(hidden_sizes=[8])),
        epochs=1,
    )
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    reply = await stub.SubmitTrainingJob(
        training_pb2.SubmitTrainingJobRequest(spec=spec), metadata=bearer(client), timeout=30
    )
    return reply.job


async def test_submitter_cancels_only_its_own_jobs(
    fleet: dict[str, str], training_channel: grpc.aio.Channel
) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(training_channel)
    mine = await _submit(fleet, training_channel, "submitter")
    assert mine.submitted_by == "submitter"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=mine.id), metadata=bearer("other-submitter"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'submitter'" in (err.value.details() or "") and mine.id in (err.value.details() or "")
    still = await jobs.GetJob(jobs_pb2.GetJobRequest(job_id=mine.id), metadata=bearer("reader"), timeout=10)
    assert still.job.state == jobs_pb2.JOB_STATE_QUEUED

    cancelled = await jobs.CancelJob(
        jobs_pb2.CancelJobRequest(job_id=mine.id), metadata=bearer("submitter"), timeout=10
    )
    assert cancelled.job.state == jobs_pb2.JOB_STATE_CANCELLED


async def test_admin_cancels_anyones_job(fleet: dict[str, str], training_channel: grpc.aio.Channel) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(training_channel)
    theirs = await _submit(fleet, training_channel, "other-submitter")
    assert theirs.submitted_by == "other-submitter"
    cancelled = await jobs.CancelJob(
        jobs_pb2.CancelJobRequest(job_id=theirs.id), metadata=bearer("admin"), timeout=10
    )
    assert cancelled.job.state == jobs_pb2.JOB_STATE_CANCELLED
