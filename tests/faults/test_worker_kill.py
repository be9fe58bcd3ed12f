"""SIGKILL training workers at random points of 20 real training jobs: every job
ends SUCCEEDED and registers exactly one model version."""

from __future__ import annotations

import random
import signal
import subprocess
import time

import pytest
import redis

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.jobs import JobQueue
from common.registry import ModelRegistry
from common.settings import Settings
from tests.faults.conftest import TERMINAL, Fleet, kill_group, make_dataset, submit_tiny, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

JOBS = 20
WORKERS = 2
MAX_KILLS = 6
# The loop gives up only when no job has moved for this long (a hang, not a slow machine);
# what it asserts is the outcome, never how long it took.
STALL_S = 240.0
# Jobs tried until one SIGKILL lands between registration and the recorded success.
WINDOW_TRIES = 3


def held_by(jobs: list[jobs_pb2.Job], proc: subprocess.Popen[bytes]) -> list[str]:
    """Ids of the RUNNING jobs whose holder is ``proc`` (worker ids are host-pid-suffix)."""
    return [j.id for j in jobs if j.state == jobs_pb2.JOB_STATE_RUNNING and f"-{proc.pid}-" in j.worker_id]


def test_sigkilled_workers_lose_no_job_and_finish_none_twice(
    fleet: Fleet, fault_settings: Settings, redis_client: redis.Redis
) -> None:
    rng = random.Random(6)
    make_dataset(redis_client, fault_settings)
    queue = JobQueue(redis_client, fault_settings)
    ids = [submit_tiny(redis_client, fault_settings, f"kill-{i}").id for i in range(JOBS)]
    workers = [fleet.worker() for _ in range(WORKERS)]

    kills = whole_groups = jobs_hit = 0
    next_kill = time.monotonic() + rng.uniform(2.0, 6.0)
    seen: list[tuple[int, int]] = []
    moved = time.monotonic()
    while True:
        jobs = [queue.get(i) for i in ids]
        if all(j.state in TERMINAL for j in jobs):
            break
        progress = [(int(j.state), j.attempts) for j in jobs]
        if progress != seen:
            seen, moved = progress, time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            break  # the outcome assertions below name the jobs that never finished
        busy = [w for w in workers if held_by(jobs, w)]
        if kills < MAX_KILLS and busy and time.monotonic() >= next_kill:
            victim = rng.choice(busy)
            jobs_hit += len(held_by(jobs, victim))
            # A crashed container (whole group) or only the worker process, whose
            # DDP ranks must notice their parent is gone.
            if rng.random() < 0.5:
                kill_group(victim, signal.SIGKILL)
                whole_groups += 1
            else:
                victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            kills += 1
            workers[workers.index(victim)] = fleet.worker()  # the supervisor restarts it
            next_kill = time.monotonic() + rng.uniform(0.5, 5.0)
        time.sleep(0.1)

    registry = ModelRegistry(redis_client, fault_settings.redis_prefix)
    versions_per_job = {}
    for job in jobs:
        versions, _ = registry.list_versions(job.training.model_name)
        versions_per_job[job.id] = [v.lineage.job_id for v in versions]
    extra_attempts = sum(j.attempts - 1 for j in jobs)
    succeeded = sum(j.state == jobs_pb2.JOB_STATE_SUCCEEDED for j in jobs)
    duplicated = sum(len(v) > 1 for v in versions_per_job.values())
    print(
        f"\n[worker kill] jobs submitted={JOBS} succeeded={succeeded} lost={JOBS - succeeded} "
        f"duplicated={duplicated} | kills={kills} (whole group {whole_groups}) jobs hit={jobs_hit} "
        f"extra attempts={extra_attempts}"
    )
    for job in jobs:
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, (job.id, job.last_error)
        assert versions_per_job[job.id] == [job.id], f"job {job.id} registered {versions_per_job[job.id]}"
        assert job.result.model_version == "1"
    # Every kill of a busy worker lost that attempt, and a lost attempt is recorded.
    assert kills > 0 and extra_attempts >= 1
    assert extra_attempts <= jobs_hit
    assert all("was lost during attempt" in j.last_error for j in jobs if j.attempts > 1)


def test_worker_killed_between_registering_and_recording_success_registers_once(
    fleet: Fleet, fault_settings: Settings, redis_client: redis.Redis
) -> None:
    """The narrowest window: SIGKILL the worker the moment its model version is announced,
    before it records the job's success; the rerun must not register a second version."""
    make_dataset(redis_client, fault_settings)
    queue = JobQueue(redis_client, fault_settings)
    registry = ModelRegistry(redis_client, fault_settings.redis_prefix)
    events = redis_client.pubsub()
    events.subscribe(registry.channel)
    landed = tries = 0
    try:
        while tries < WINDOW_TRIES and not landed:
            tries += 1
            worker = fleet.worker()
            job_id = submit_tiny(redis_client, fault_settings, f"window-{tries}").id
            wait_until(lambda: announced(events), STALL_S, "the model version to be registered")
            kill_group(worker, signal.SIGKILL)
            worker.wait(timeout=30)
            landed = int(queue.get(job_id).state == jobs_pb2.JOB_STATE_RUNNING)
            fleet.worker()
            wait_until(lambda: queue.get(job_id).state in TERMINAL, STALL_S, "the rerun")  # noqa: B023
            job = queue.get(job_id)
            versions, _ = registry.list_versions(job.training.model_name)
            print(
                f"\n[kill after register] try {tries}: kill landed before success={bool(landed)} "
                f"attempts={job.attempts} versions={[v.version for v in versions]}"
            )
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.last_error
            assert [v.lineage.job_id for v in versions] == [job_id]
            assert job.result.model_version == versions[0].version
            for proc in fleet.procs:
                kill_group(proc, signal.SIGKILL)
    finally:
        events.close()


def announced(events: redis.client.PubSub) -> bool:
    message = events.get_message(timeout=0.05)
    return bool(message and message["type"] == "message" and b"version_registered" in message["data"])
