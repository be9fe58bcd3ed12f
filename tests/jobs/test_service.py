"""JobService over a real ServiceHost on port 0, with an in-process worker producing events."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import grpc
import pytest

from common.api.modelfleet.compression.v1 import compression_spec_pb2 as spec_pb2
from common.api.modelfleet.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from common.grpcserver import ServiceHost
from common.jobs import JobContext, JobOutcome, JobQueue, Worker
from common.redis import connect_async
from services.cli.main import main
from services.jobs import JobServicer
from services.jobs.servicer import SERVICE_NAME
from tests.jobs.helpers import outcome, training_job

S = jobs_pb2


@pytest.fixture
async def server(queue: JobQueue) -> AsyncIterator[str]:
    client = connect_async(queue.settings.redis_url)
    host = ServiceHost(queue.settings, "jobs-test", 0)
    servicer = JobServicer(queue, client, queue.settings)
    host.add(jobs_pb2_grpc.add_JobServiceServicer_to_server, servicer, SERVICE_NAME)
    port = await host.start()
    await host.ready()
    yield f"127.0.0.1:{port}"
    await host.stop(0)
    await client.aclose()


@pytest.fixture
async def stub(server: str) -> AsyncIterator[jobs_pb2_grpc.JobServiceStub]:
    async with grpc.aio.insecure_channel(server) as channel:
        yield jobs_pb2_grpc.JobServiceStub(channel)


def _progress_handler(ctx: JobContext) -> JobOutcome:
    for epoch in (1, 2):
        ctx.progress(epoch / 2, epoch=epoch, metrics={"train_loss": 1.0 / epoch})
    return outcome()


async def test_get_list_cancel(stub: jobs_pb2_grpc.JobServiceStub, queue: JobQueue) -> None:
    job = queue.submit(training_job())
    got = await stub.GetJob(S.GetJobRequest(job_id=job.id))
    assert got.job == job
    listed = await stub.ListJobs(S.ListJobsRequest(kind=S.JOB_KIND_TRAINING, states=[S.JOB_STATE_QUEUED]))
    assert [j.id for j in listed.jobs] == [job.id] and listed.next_page_token == ""
    cancelled = await stub.CancelJob(S.CancelJobRequest(job_id=job.id, reason="no"))
    assert cancelled.job.state == S.JOB_STATE_CANCELLED and cancelled.job.last_error == "no"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CancelJob(S.CancelJobRequest(job_id=job.id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetJob(S.GetJobRequest(job_id="0" * 32))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetJob(S.GetJobRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "job_id" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListJobs(S.ListJobsRequest(page_token="nope"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_watch_follows_a_job_to_its_end(stub: jobs_pb2_grpc.JobServiceStub, queue: JobQueue) -> None:
    job = queue.submit(training_job())
    call = stub.WatchJob(S.WatchJobRequest(job_id=job.id))
    responses = [await asyncio.wait_for(call.read(), 10)]  # the snapshot comes first
    assert responses[0].event.state == S.JOB_STATE_QUEUED and responses[0].job.id == job.id
    worker = Worker(queue, S.JOB_KIND_TRAINING, _progress_handler)
    thread = threading.Thread(target=worker.run_once, kwargs={"block_ms": 5000})
    thread.start()
    while (response := await asyncio.wait_for(call.read(), 20)) is not grpc.aio.EOF:
        responses.append(response)
    await asyncio.to_thread(thread.join, 10)
    seen = [(r.event.type, r.event.state, r.event.epoch) for r in responses]
    assert seen == [
        (S.JOB_EVENT_TYPE_STATE, S.JOB_STATE_QUEUED, 0),
        (S.JOB_EVENT_TYPE_STATE, S.JOB_STATE_RUNNING, 0),
        (S.JOB_EVENT_TYPE_PROGRESS, S.JOB_STATE_RUNNING, 1),
        (S.JOB_EVENT_TYPE_PROGRESS, S.JOB_STATE_RUNNING, 2),
        (S.JOB_EVENT_TYPE_STATE, S.JOB_STATE_SUCCEEDED, 0),
    ]
    assert responses[2].event.metrics["train_loss"] == 1.0
    assert responses[-1].job.state == S.JOB_STATE_SUCCEEDED

    # A finished job: a snapshot and the end; from_beginning replays the history.
    snapshot = [r async for r in stub.WatchJob(S.WatchJobRequest(job_id=job.id))]
    assert [r.event.state for r in snapshot] == [S.JOB_STATE_SUCCEEDED]
    replay = [r async for r in stub.WatchJob(S.WatchJobRequest(job_id=job.id, from_beginning=True))]
    assert [(r.event.type, r.event.state, r.event.epoch) for r in replay] == seen


async def test_watch_ends_on_cancel_and_honours_client_cancellation(
    stub: jobs_pb2_grpc.JobServiceStub, queue: JobQueue
) -> None:
    abandoned = stub.WatchJob(S.WatchJobRequest(job_id=queue.submit(training_job()).id))
    await asyncio.wait_for(abandoned.read(), 10)
    abandoned.cancel()

    job = queue.submit(training_job())
    call = stub.WatchJob(S.WatchJobRequest(job_id=job.id))
    await asyncio.wait_for(call.read(), 10)
    await stub.CancelJob(S.CancelJobRequest(job_id=job.id, reason="enough"))
    rest = []
    while (response := await asyncio.wait_for(call.read(), 20)) is not grpc.aio.EOF:
        rest.append(response)
    assert [r.event.state for r in rest] == [S.JOB_STATE_CANCELLED] and rest[0].event.message == "enough"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.WatchJob(S.WatchJobRequest(job_id="0" * 32)):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cli_list_show_cancel_and_watch_exit_codes(
    server: str, queue: JobQueue, capsys: pytest.CaptureFixture[str]
) -> None:
    def cli(*argv: str) -> int:
        return main(["jobs", *argv, "--target", server])

    job = queue.submit(training_job())
    assert await asyncio.to_thread(cli, "list", "--output", "json") == 0
    assert job.id in capsys.readouterr().out
    assert await asyncio.to_thread(cli, "show", job.id) == 0
    assert "QUEUED" in capsys.readouterr().out

    thread = threading.Thread(target=Worker(queue, S.JOB_KIND_TRAINING, _progress_handler).run_once)
    thread.start()
    assert await asyncio.to_thread(cli, "watch", job.id, "--from-beginning") == 0
    await asyncio.to_thread(thread.join, 10)
    lines = capsys.readouterr().out.splitlines()
    assert "epoch 2" in lines[-2] and lines[-1].startswith("[" + "#" * 30 + "] 100%  SUCCEEDED")

    doomed = queue.submit(training_job())
    assert await asyncio.to_thread(cli, "cancel", doomed.id, "--reason", "no") == 0
    assert await asyncio.to_thread(cli, "watch", doomed.id) == 2
    assert await asyncio.to_thread(cli, "cancel", doomed.id) == 1
    assert "FAILED_PRECONDITION: job " in capsys.readouterr().err
    assert await asyncio.to_thread(cli, "watch", "0" * 32) == 4  # refused: retrying cannot help
    assert await asyncio.to_thread(cli, "watch", "not-a-job") == 4


async def test_cli_show_prints_the_compression_report_as_a_table(
    server: str, queue: JobQueue, capsys: pytest.CaptureFixture[str]
) -> None:
    measured = spec_pb2.CompressionReport(
        source=spec_pb2.ModelMeasurements(
            parameters=1000,
            nonzero_parameters=1000,
            bytes_on_disk=4000,
            latency_batch1_ms=0.2,
            latency_batch32_ms=0.8,
            metric_name="accuracy",
            metric_value=0.95,
        ),
        compressed=spec_pb2.ModelMeasurements(
            parameters=1000,
            nonzero_parameters=200,
            bytes_on_disk=1000,
            latency_batch1_ms=0.4,
            latency_batch32_ms=0.4,
            metric_name="accuracy",
            metric_value=0.93,
        ),
        notes=["measured: slower at batch 1 (0.200 -> 0.400 ms)"],
    )

    def handler(ctx: JobContext) -> JobOutcome:
        return JobOutcome(result=outcome().result, compression_report=measured)

    job = queue.submit(
        jobs_pb2.Job(kind=S.JOB_KIND_COMPRESSION, compression=spec_pb2.CompressionSpec(source_model="m"))
    )
    assert await asyncio.to_thread(Worker(queue, S.JOB_KIND_COMPRESSION, handler).run_once)
    assert await asyncio.to_thread(main, ["jobs", "show", job.id, "--target", server]) == 0
    out = capsys.readouterr().out
    assert "bytes on disk" in out and "4.00x" in out and "drop +0.0200" in out
    assert "latency batch 1 (ms)" in out and "0.50x" in out
    assert "note: measured: slower at batch 1" in out
