"""Worker and attempt transitions in-process on real Redis: priorities, kinds, retries with
backoff, dead letters, permanent failures, cancellation, and checked completion."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis
import torch

from common.api.modelfleet.compression.v1 import compression_spec_pb2
from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.errors import DataLoss, InvalidArgument, NotFound
from common.jobs import JobCancelledError, JobContext, JobOutcome, JobQueue, PermanentJobError, Worker
from common.jobs.attempts import AttemptStore
from common.jobs.errors import is_deterministic
from common.jobs.keys import GROUP
from common.logging import job_id_var
from tests.jobs.helpers import ok_handler, outcome, training_job, wait_for

TRAINING = jobs_pb2.JOB_KIND_TRAINING
S = jobs_pb2


def events_of(client: redis.Redis, queue: JobQueue, job_id: str) -> list[jobs_pb2.JobEvent]:
    out = []
    entries: Any = client.xrange(queue.keys.events(job_id))
    for _, values in entries:
        event = jobs_pb2.JobEvent()
        event.ParseFromString(values[b"event"])
        out.append(event)
    return out


def drain(worker: Worker, queue: JobQueue, job_id: str, rounds: int = 100) -> jobs_pb2.Job:
    """Run the worker until the job is terminal (bounded)."""
    for _ in range(rounds):
        worker.run_once(block_ms=200)
        job = queue.get(job_id)
        if job.state in (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED):
            return job
    raise AssertionError(f"job {job_id} did not finish")


def test_success_walks_the_state_machine(queue: JobQueue, redis_client: redis.Redis) -> None:
    seen: dict[str, Any] = {}

    def handler(ctx: JobContext) -> JobOutcome:
        seen["job_id_var"] = job_id_var.get()
        assert queue.get(ctx.job.id).state == S.JOB_STATE_RUNNING
        ctx.progress(0.5, epoch=1, metrics={"train_loss": 1.5}, message="epoch 1")
        ctx.log("hello")
        ctx.heartbeat()
        return outcome("7")

    job = queue.submit(training_job())
    worker = Worker(queue, TRAINING, handler, worker_id="w1")
    assert worker.run_once(block_ms=1000)
    done = queue.get(job.id)
    assert seen["job_id_var"] == job.id
    assert done.state == S.JOB_STATE_SUCCEEDED and done.attempts == 1 and done.worker_id == "w1"
    assert done.result.model_version == "7" and done.progress == 1.0
    assert dict(done.metrics) == {"train_loss": 1.5, "loss": 0.5}
    assert done.started_at.seconds > 0 and done.finished_at.seconds > 0
    kinds = [(e.type, e.state) for e in events_of(redis_client, queue, job.id)]
    assert kinds == [
        (S.JOB_EVENT_TYPE_STATE, S.JOB_STATE_QUEUED),
        (S.JOB_EVENT_TYPE_STATE, S.JOB_STATE_RUNNING),
        (S.JOB_EVENT_TYPE_PROGRESS, S.JOB_STATE_RUNNING),
        (S.JOB_EVENT_TYPE_LOG, S.JOB_STATE_RUNNING),
        (S.JOB_EVENT_TYPE_STATE, S.JOB_STATE_SUCCEEDED),
    ]
    assert redis_client.ttl(queue.keys.events(job.id)) > 0
    # the delivery is acknowledged and deleted: nothing pending, nothing to redeliver
    assert redis_client.xlen(queue.keys.stream(TRAINING, 0)) == 0
    assert not worker.run_once(block_ms=50)


def test_higher_priority_runs_first_and_kinds_are_separate(queue: JobQueue) -> None:
    order: list[str] = []

    def handler(ctx: JobContext) -> JobOutcome:
        order.append(ctx.job.training.description)
        return outcome()

    queue.submit(
        jobs_pb2.Job(kind=S.JOB_KIND_COMPRESSION, compression=compression_spec_pb2.CompressionSpec())
    )
    for name, priority in (("low", S.PRIORITY_LOW), ("normal", S.PRIORITY_NORMAL), ("high", S.PRIORITY_HIGH)):
        queue.submit(training_job(name, priority=priority))
    worker = Worker(queue, TRAINING, handler)
    for _ in range(10):
        if not worker.run_once(block_ms=100) and len(order) == 3:
            break
    assert order == ["high", "normal", "low"]
    compression, _ = queue.list(kind=S.JOB_KIND_COMPRESSION)
    assert compression[0].state == S.JOB_STATE_QUEUED


def test_retries_with_exponential_backoff_then_dead_letter(
    queue: JobQueue, redis_client: redis.Redis
) -> None:
    def handler(ctx: JobContext) -> JobOutcome:
        raise RuntimeError(f"boom {ctx.attempt}")

    job = queue.submit(training_job(max_attempts=3))
    done = drain(Worker(queue, TRAINING, handler), queue, job.id)
    assert done.state == S.JOB_STATE_FAILED and done.attempts == 3
    assert "boom 3" in done.last_error and "attempt 3 of 3" in done.last_error
    retries = [e.message for e in events_of(redis_client, queue, job.id) if e.state == S.JOB_STATE_QUEUED][1:]
    # backoff = job_retry_backoff_s (0.05) * 2^(attempt-1)
    assert [m.split(" after")[0] for m in retries] == ["retry in 0.05s", "retry in 0.1s"]
    dead: Any = redis_client.xrange(queue.keys.dead)
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"job"].decode() == job.id and b"boom 3" in fields[b"reason"]


def test_a_retry_can_succeed(queue: JobQueue) -> None:
    def handler(ctx: JobContext) -> JobOutcome:
        if ctx.attempt == 1:
            raise ValueError("flaky")
        return outcome()

    job = queue.submit(training_job())
    done = drain(Worker(queue, TRAINING, handler), queue, job.id)
    assert done.state == S.JOB_STATE_SUCCEEDED and done.attempts == 2 and "flaky" in done.last_error


def test_permanent_error_fails_without_retry(queue: JobQueue, redis_client: redis.Redis) -> None:
    def handler(ctx: JobContext) -> JobOutcome:
        raise PermanentJobError("dataset 'd' not found")

    job = queue.submit(training_job(max_attempts=5))
    done = drain(Worker(queue, TRAINING, handler), queue, job.id)
    assert done.state == S.JOB_STATE_FAILED and done.attempts == 1
    assert done.last_error == "dataset 'd' not found"
    assert redis_client.xlen(queue.keys.dead) == 1


@pytest.mark.parametrize(
    "error",
    [
        InvalidArgument("spec.x is bad"),
        NotFound("dataset 'd' not found"),
        DataLoss("shard corrupt"),
        MemoryError(),
    ],
    ids=["invalid", "not-found", "data-loss", "memory"],
)
def test_deterministic_errors_fail_without_retry(queue: JobQueue, error: Exception) -> None:
    """What would recur on every attempt is final, whichever code raised it."""

    def handler(ctx: JobContext) -> JobOutcome:
        raise error

    job = queue.submit(training_job(max_attempts=5))
    done = drain(Worker(queue, TRAINING, handler), queue, job.id)
    assert done.state == S.JOB_STATE_FAILED and done.attempts == 1
    assert done.last_error.startswith(type(error).__name__)


def test_torch_out_of_memory_is_deterministic() -> None:
    assert is_deterministic(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_deterministic(RuntimeError("NCCL timeout")) and not is_deterministic(ConnectionError())


def test_cancelled_queued_job_never_runs(queue: JobQueue) -> None:
    ran: list[str] = []
    job = queue.submit(training_job())
    queue.cancel(job.id)
    worker = Worker(queue, TRAINING, lambda ctx: ran.append(ctx.job.id) or outcome())  # type: ignore[func-returns-value]
    assert not worker.run_once(block_ms=100)
    assert ran == [] and queue.get(job.id).state == S.JOB_STATE_CANCELLED


@pytest.mark.parametrize("finish_anyway", [False, True])
def test_cancel_running_job(queue: JobQueue, redis_client: redis.Redis, finish_anyway: bool) -> None:
    started = threading.Event()
    saw_cancel = threading.Event()

    def handler(ctx: JobContext) -> JobOutcome:
        started.set()
        wait_for(ctx.cancelled, timeout_s=20, what="ctx.cancelled()")
        saw_cancel.set()
        if finish_anyway:
            return outcome()
        raise JobCancelledError("stopped at step 3")

    job = queue.submit(training_job())
    worker = Worker(queue, TRAINING, handler)
    thread = threading.Thread(target=worker.run_once, kwargs={"block_ms": 2000})
    thread.start()
    assert started.wait(20)
    assert queue.cancel(job.id, "user asked").state == S.JOB_STATE_CANCELLED
    thread.join(timeout=30)
    assert saw_cancel.is_set() and not thread.is_alive()
    done = queue.get(job.id)
    assert done.state == S.JOB_STATE_CANCELLED and done.last_error == "user asked"
    assert not done.HasField("result")
    stream = queue.keys.stream(TRAINING, 0)
    pending: Any = redis_client.xpending(stream, GROUP)
    assert pending["pending"] == 0


def test_a_reclaimed_attempt_cannot_complete_and_nothing_completes_twice(
    queue: JobQueue, redis_client: redis.Redis
) -> None:
    job = queue.submit(training_job())
    stream = queue.keys.stream(TRAINING, 0)
    reply: Any = redis_client.xreadgroup(GROUP, "a", {stream: ">"}, count=1)
    entry = reply[0][1][0][0].decode()
    a, b = AttemptStore(queue, "a"), AttemptStore(queue, "b")
    first = a.claim(stream, entry, job.id)
    assert first is not None
    assert b.claim(stream, entry, job.id) is None  # a's lease is live: not stolen
    redis_client.hset(queue.keys.job(job.id), "lease", 0)  # a stops heartbeating past the timeout
    second = b.claim(stream, entry, job.id)
    assert second is not None and second.job.attempts == 2
    assert "lost during attempt 1" in second.job.last_error
    assert not a.heartbeat(first)
    assert not a.poll(first)
    assert not a.succeed(first, outcome().result, {}, None)
    assert a.fail(first, "late", permanent=False) == 0
    assert b.heartbeat(second)
    assert b.succeed(second, outcome("2").result, {}, None)
    assert not b.succeed(second, outcome("3").result, {}, None)
    done = queue.get(job.id)
    assert done.state == S.JOB_STATE_SUCCEEDED and done.result.model_version == "2"


def test_worker_stops_when_asked(queue: JobQueue) -> None:
    stop = threading.Event()
    worker = Worker(queue, TRAINING, ok_handler)
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    job = queue.submit(training_job())
    wait_for(lambda: queue.get(job.id).state == S.JOB_STATE_SUCCEEDED, what="job to finish")
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
