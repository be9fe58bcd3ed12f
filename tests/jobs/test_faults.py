"""Fault injection with real worker subprocesses: SIGKILL, slow live jobs, SIGTERM, Redis restart."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.jobs import JobQueue, Worker
from common.redis import connect
from common.settings import Settings
from tests.jobs.conftest import SpawnWorker
from tests.jobs.helpers import ok_handler, training_job, wait_for

pytestmark = pytest.mark.slow
S = jobs_pb2


def marks(client: redis.Redis, prefix: str, which: str) -> list[str]:
    return [m.decode() for m in client.lrange(f"{prefix}:test:{which}", 0, -1)]  # type: ignore[union-attr]


def test_sigkilled_worker_job_is_reclaimed_and_finished_exactly_once(
    queue: JobQueue, redis_client: redis.Redis, spawn_worker: SpawnWorker
) -> None:
    prefix = queue.settings.redis_prefix
    victim = spawn_worker("victim")
    job = queue.submit(training_job("sleep-first:60"))
    wait_for(lambda: queue.get(job.id).state == S.JOB_STATE_RUNNING, what="victim to start the job")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    spawn_worker("rescuer")
    wait_for(lambda: queue.get(job.id).state == S.JOB_STATE_SUCCEEDED, timeout_s=30, what="rescue")
    done = queue.get(job.id)
    assert done.attempts == 2 and done.worker_id == "rescuer"
    assert "victim was lost during attempt 1" in done.last_error
    assert marks(redis_client, prefix, "started") == [f"{job.id}:1:victim", f"{job.id}:2:rescuer"]
    assert marks(redis_client, prefix, "finished") == [f"{job.id}:2:rescuer"]


def test_heartbeat_keeps_a_slow_live_job_from_being_stolen(
    queue: JobQueue, redis_client: redis.Redis, spawn_worker: SpawnWorker
) -> None:
    prefix = queue.settings.redis_prefix
    spawn_worker("slow")
    # Runs for 3x the visibility timeout while another worker looks for idle deliveries.
    job = queue.submit(training_job("sleep:3"))
    wait_for(lambda: queue.get(job.id).state == S.JOB_STATE_RUNNING, what="slow worker to start")
    stop = threading.Event()
    thief = threading.Thread(target=Worker(queue, S.JOB_KIND_TRAINING, ok_handler, "thief").run, args=(stop,))
    thief.start()
    try:
        wait_for(lambda: queue.get(job.id).state == S.JOB_STATE_SUCCEEDED, timeout_s=30, what="job to finish")
    finally:
        stop.set()
        thief.join(timeout=10)
    done = queue.get(job.id)
    assert done.attempts == 1 and done.worker_id == "slow"
    assert marks(redis_client, prefix, "started") == [f"{job.id}:1:slow"]


def test_sigterm_finishes_the_current_job_then_exits(queue: JobQueue, spawn_worker: SpawnWorker) -> None:
    proc = spawn_worker("warm")
    job = queue.submit(training_job("sleep:1"))
    wait_for(lambda: queue.get(job.id).state == S.JOB_STATE_RUNNING, what="job to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert queue.get(job.id).state == S.JOB_STATE_SUCCEEDED
    # it took nothing more after the signal
    later = queue.submit(training_job())
    assert queue.get(later.id).state == S.JOB_STATE_QUEUED


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server with AOF on, restartable on the same port and data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.port = _free_port()
        self.dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        wait_for(lambda: _pings(client), timeout_s=20, what="redis-server to start")
        client.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # shutdown flushes the AOF
            self.proc.wait(timeout=20)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_jobs_survive_a_redis_restart(
    own_redis: RedisServer, fast_settings: Settings, spawn_worker: SpawnWorker
) -> None:
    settings = fast_settings.replace(
        redis_url=own_redis.url, job_visibility_timeout_s=3.0, job_heartbeat_s=0.3
    )
    client = connect(settings.redis_url)
    queue = JobQueue(client, settings)
    worker = spawn_worker("survivor", settings)
    jobs = [queue.submit(training_job("sleep:0.3")) for _ in range(6)]
    wait_for(lambda: queue.get(jobs[0].id).state == S.JOB_STATE_RUNNING, what="first job to start")
    own_redis.stop()
    time.sleep(0.5)  # the worker meets a dead Redis (not a timing assertion)
    own_redis.start()
    assert worker.poll() is None

    def all_done() -> bool:
        return all(queue.get(j.id).state == S.JOB_STATE_SUCCEEDED for j in jobs)

    wait_for(all_done, timeout_s=45, what="every job to succeed after the restart")
    finished = marks(client, settings.redis_prefix, "finished")
    assert {m.split(":")[0] for m in finished} == {j.id for j in jobs}
    client.close()
