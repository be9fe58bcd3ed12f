"""JobQueue on real Redis: submit, idempotency, list paging, cancel, and the state machine."""

from __future__ import annotations

import threading

import pytest
import redis

from common.api.modelfleet.compression.v1 import compression_spec_pb2
from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.auth import Principal, Role, principal_var
from common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from common.jobs import JobQueue
from common.jobs.keys import JobKeys
from tests.jobs.helpers import training_job

QUEUED, RUNNING, SUCCEEDED, CANCELLED = (
    jobs_pb2.JOB_STATE_QUEUED,
    jobs_pb2.JOB_STATE_RUNNING,
    jobs_pb2.JOB_STATE_SUCCEEDED,
    jobs_pb2.JOB_STATE_CANCELLED,
)


def test_submit_stores_a_queued_job_with_defaults(queue: JobQueue) -> None:
    job = queue.submit(training_job())
    assert job.id and job.state == QUEUED and job.created_at.seconds > 0
    assert job.max_attempts == queue.settings.job_max_attempts
    assert job.priority == jobs_pb2.PRIORITY_NORMAL
    assert queue.get(job.id) == job


def test_submit_ignores_server_fields_from_the_caller(queue: JobQueue) -> None:
    sent = training_job()
    sent.attempts, sent.state, sent.last_error = 7, SUCCEEDED, "forged"
    job = queue.submit(sent)
    assert (job.attempts, job.state, job.last_error) == (0, QUEUED, "")


@pytest.mark.parametrize(
    ("job", "field"),
    [
        (jobs_pb2.Job(kind=jobs_pb2.JOB_KIND_UNSPECIFIED), "kind"),
        (jobs_pb2.Job(kind=jobs_pb2.JOB_KIND_TRAINING), "spec"),
        (
            jobs_pb2.Job(kind=jobs_pb2.JOB_KIND_TRAINING, compression=compression_spec_pb2.CompressionSpec()),
            "spec",
        ),
        (training_job(max_attempts=-1), "max_attempts"),
        (training_job(priority=9), "priority"),
        (training_job(request_id="x" * 300), "request_id"),
    ],
)
def test_submit_rejects_bad_jobs_naming_the_field(queue: JobQueue, job: jobs_pb2.Job, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        queue.submit(job)


def test_same_request_id_returns_the_same_job(queue: JobQueue, redis_client: redis.Redis) -> None:
    first = queue.submit(training_job(request_id="abc"))
    again = queue.submit(training_job(request_id="abc"))
    other = queue.submit(training_job(request_id="def"))
    assert again.id == first.id and other.id != first.id
    assert redis_client.xlen(queue.keys.stream(jobs_pb2.JOB_KIND_TRAINING, 0)) == 2


def test_a_request_id_reused_for_a_different_submit_is_already_exists(queue: JobQueue) -> None:
    first = queue.submit(training_job(request_id="abc"))
    for changed in (
        training_job("other spec", request_id="abc"),
        training_job(priority=jobs_pb2.PRIORITY_HIGH, request_id="abc"),
        training_job(max_attempts=7, request_id="abc"),
    ):
        with pytest.raises(AlreadyExists, match=f"request_id 'abc' already created job {first.id}"):
            queue.submit(changed)
    assert queue.submit(training_job(request_id="abc")).id == first.id


def test_request_ids_are_scoped_to_the_caller_and_the_kind(queue: JobQueue) -> None:
    mine = queue.submit(training_job(request_id="abc"))
    token = principal_var.set(Principal("someone-else", Role.SUBMITTER))
    try:
        theirs = queue.submit(training_job(request_id="abc"))
        assert theirs.id != mine.id and theirs.submitted_by == "someone-else"
        assert queue.submit(training_job(request_id="abc")).id == theirs.id
    finally:
        principal_var.reset(token)
    compression = jobs_pb2.Job(
        kind=jobs_pb2.JOB_KIND_COMPRESSION,
        request_id="abc",
        compression=compression_spec_pb2.CompressionSpec(),
    )
    assert queue.submit(compression).id not in (mine.id, theirs.id)


def test_concurrent_submits_with_one_request_id_create_one_job(
    queue: JobQueue, redis_client: redis.Redis
) -> None:
    ids: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def submit() -> None:
        barrier.wait(timeout=10)
        job = queue.submit(training_job(request_id="race"))
        with lock:
            ids.append(job.id)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(ids) == 8 and len(set(ids)) == 1
    assert redis_client.xlen(queue.keys.stream(jobs_pb2.JOB_KIND_TRAINING, 0)) == 1


def test_get_unknown_job_is_not_found(queue: JobQueue) -> None:
    with pytest.raises(NotFound):
        queue.get("0" * 32)
    with pytest.raises(NotFound):
        queue.get("../etc")
    with pytest.raises(InvalidArgument, match="job_id"):
        queue.get("")


def test_list_newest_first_with_filters_and_paging(queue: JobQueue) -> None:
    jobs = [queue.submit(training_job()) for _ in range(7)]
    compression = queue.submit(
        jobs_pb2.Job(kind=jobs_pb2.JOB_KIND_COMPRESSION, compression=compression_spec_pb2.CompressionSpec())
    )
    queue.cancel(jobs[0].id)
    everything, token = queue.list()
    assert [j.id for j in everything] == [compression.id, *[j.id for j in reversed(jobs)]] and token == ""

    seen: list[str] = []
    token = ""
    for _ in range(10):
        page, token = queue.list(kind=jobs_pb2.JOB_KIND_TRAINING, page_size=3, page_token=token)
        seen += [j.id for j in page]
        if not token:
            break
    assert seen == [j.id for j in reversed(jobs)]

    cancelled, _ = queue.list(states=[CANCELLED])
    assert [j.id for j in cancelled] == [jobs[0].id]
    with pytest.raises(InvalidArgument, match="page_token"):
        queue.list(page_token="bogus")
    with pytest.raises(InvalidArgument, match="page_size"):
        queue.list(page_size=-1)


def test_cancel_queued_job_removes_its_delivery(queue: JobQueue, redis_client: redis.Redis) -> None:
    job = queue.submit(training_job())
    cancelled = queue.cancel(job.id, "not needed")
    assert cancelled.state == CANCELLED and cancelled.last_error == "not needed"
    assert cancelled.finished_at.seconds > 0
    assert redis_client.xlen(queue.keys.stream(jobs_pb2.JOB_KIND_TRAINING, 0)) == 0
    with pytest.raises(FailedPrecondition, match="CANCELLED"):
        queue.cancel(job.id)
    with pytest.raises(NotFound):
        queue.cancel("f" * 32)


def test_keys_live_under_the_prefix(queue: JobQueue, redis_client: redis.Redis) -> None:
    job = queue.submit(training_job(priority=jobs_pb2.PRIORITY_HIGH))
    prefix = queue.settings.redis_prefix
    keys = {k.decode() for k in redis_client.scan_iter(match="*" + job.id + "*")}
    assert keys == {f"{prefix}:job:{job.id}", f"{prefix}:job:{job.id}:events"}
    assert (
        JobKeys(prefix).stream(jobs_pb2.JOB_KIND_TRAINING, jobs_pb2.PRIORITY_HIGH).endswith(":training:high")
    )
