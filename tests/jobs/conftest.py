"""Job-test fixtures: a queue on the per-test prefix with short timeouts, and worker subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from common.jobs import JobQueue
from common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fast_settings(settings: Settings) -> Settings:
    """Timeouts short enough for tests: reclaim after 1 s, heartbeat every 0.2 s, 50 ms backoff."""
    return settings.replace(job_visibility_timeout_s=1.0, job_heartbeat_s=0.2, job_retry_backoff_s=0.05)


@pytest.fixture
def queue(redis_client: redis.Redis, fast_settings: Settings) -> JobQueue:
    return JobQueue(redis_client, fast_settings)


SpawnWorker = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def spawn_worker(fast_settings: Settings) -> Iterator[SpawnWorker]:
    """Start ``tests.jobs.worker_main`` processes; all are killed at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def spawn(worker_id: str, settings: Settings | None = None) -> subprocess.Popen[str]:
        env = {**os.environ, **(settings or fast_settings).env(), "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.jobs.worker_main", worker_id],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
