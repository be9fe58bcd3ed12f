"""A training worker that hangs (SIGSTOP on its whole process group) is detected
once its lease runs out; another worker finishes the job, and the hung worker,
resumed afterwards, cannot complete it a second time."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import redis

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.jobs import JobQueue
from common.registry import ModelRegistry
from common.settings import Settings
from tests.faults.conftest import Fleet, kill_group, make_dataset, submit_tiny, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

WAIT_S = 90.0


def state_events(client: redis.Redis, settings: Settings, job_id: str) -> list[jobs_pb2.JobEvent]:
    raw: Any = client.xrange(f"{settings.redis_prefix}:job:{job_id}:events")
    events = []
    for _, values in raw:
        event = jobs_pb2.JobEvent()
        event.ParseFromString(values[b"event"])
        if event.type == jobs_pb2.JOB_EVENT_TYPE_STATE:
            events.append(event)
    return events


def test_hung_worker_is_detected_and_cannot_finish_the_job_again(
    fleet: Fleet, fault_settings: Settings, redis_client: redis.Redis
) -> None:
    make_dataset(redis_client, fault_settings)
    queue = JobQueue(redis_client, fault_settings)
    workers = [fleet.worker(), fleet.worker()]
    started = lambda: all(b"worker started" in fleet.log(n) for n in range(len(workers)))  # noqa: E731
    wait_until(started, WAIT_S, "both workers to start")
    job_id = submit_tiny(redis_client, fault_settings, "hung", epochs=60).id
    wait_until(lambda: queue.get(job_id).progress > 0, WAIT_S, "a worker to finish an epoch")
    hung, rescuer = sorted(workers, key=lambda w: f"-{w.pid}-" not in queue.get(job_id).worker_id)
    kill_group(hung, signal.SIGSTOP)
    stopped_at = time.monotonic()
    wait_until(lambda: queue.get(job_id).attempts == 2, WAIT_S, "the hung worker's job to be reclaimed")
    detect_s = time.monotonic() - stopped_at
    wait_until(lambda: queue.get(job_id).state == jobs_pb2.JOB_STATE_SUCCEEDED, WAIT_S, "the rescue")

    # Wake the hung worker, then ask it to stop once its (stale) attempt is over.
    kill_group(hung, signal.SIGCONT)
    hung.send_signal(signal.SIGTERM)
    hung_exit = hung.wait(timeout=WAIT_S)

    job = queue.get(job_id)
    versions, _ = ModelRegistry(redis_client, fault_settings.redis_prefix).list_versions("hung")
    succeeded = [e for e in state_events(redis_client, fault_settings, job_id) if e.state == job.state]
    print(
        f"\n[hung worker] visibility timeout={fault_settings.job_visibility_timeout_s}s "
        f"detected and reclaimed after {detect_s:.1f}s | attempts={job.attempts} "
        f"model versions={len(versions)} SUCCEEDED events={len(succeeded)} hung worker exit={hung_exit}"
    )
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert job.attempts == 2
    assert f"-{rescuer.pid}-" in job.worker_id
    assert f"-{hung.pid}-" in job.last_error  # "worker <id> was lost during attempt 1"
    assert [v.lineage.job_id for v in versions] == [job_id]
    assert job.result.model_version == "1"
    assert len(succeeded) == 1
    assert hung_exit == 0
