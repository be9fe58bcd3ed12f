"""Fault-injection fixtures: real ``modelfleet`` subprocesses (each in its own
process group, so a kill reaches its DDP ranks too and teardown leaves nothing
behind), a tiny dataset, short job timeouts, and bounded waits."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.training.v1 import training_pb2
from common.api.modelfleet.training.v1 import training_spec_pb2 as ts
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog
from common.jobs import JobQueue
from common.settings import Settings
from services.training.submit import TrainingSubmitter
from tests.jobs.test_faults import RedisServer
from tests.training.conftest import add_dataset

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)
DATASET = "blobs"

torch.set_num_threads(1)


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Fleet:
    """The test's ``modelfleet`` processes; ``close()`` SIGKILLs every group still alive."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, *args: str, settings: Settings | None = None) -> subprocess.Popen[bytes]:
        """``modelfleet <args>`` with ``settings`` (default: the fleet's) in MODELFLEET_* env."""
        env = {**os.environ, **(settings or self.settings).env(), "PYTHONPATH": str(ROOT)}
        log_path = self.log_dir / f"{'-'.join(args)}-{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", *args],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        self.logs.append(log_path)
        return proc

    def worker(self, settings: Settings | None = None) -> subprocess.Popen[bytes]:
        return self.start("worker", "training", settings=settings)

    def log(self, n: int) -> bytes:
        """What the ``n``-th started process has logged so far."""
        return self.logs[n].read_bytes()

    def close(self) -> None:
        for proc in self.procs:
            kill_group(proc, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=30)


def kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the process and its children (its session's group); a no-op once it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@pytest.fixture
def fault_settings(settings: Settings) -> Settings:
    """A dead or hung worker's job is reclaimed after 2 s; enough attempts for repeated kills."""
    return settings.replace(
        job_visibility_timeout_s=2.0, job_heartbeat_s=0.3, job_retry_backoff_s=0.05, job_max_attempts=10
    )


@pytest.fixture
def fleet(fault_settings: Settings, tmp_path: Path) -> Iterator[Fleet]:
    group = Fleet(fault_settings, tmp_path)
    try:
        yield group
    finally:
        group.close()


def make_dataset(client: redis.Redis, settings: Settings) -> None:
    """300 rows of 8 features in 2 separable classes, stored the way the data service stores them."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    features = (rng.normal(size=(300, 8)) + labels[:, None] * 2.0).astype(np.float32)
    catalog = DatasetCatalog(client, settings.redis_prefix)
    add_dataset(catalog, ArtifactStore(settings.artifact_root), DATASET, features, labels, classes=2)


def tiny_spec(model_name: str, epochs: int = 3) -> ts.TrainingSpec:
    spec = ts.TrainingSpec(dataset_name=DATASET, model_name=model_name, epochs=epochs, batch_size=16, seed=1)
    spec.architecture.mlp.hidden_sizes.append(8)
    return spec


def submit_tiny(
    client: redis.Redis, settings: Settings, model_name: str, epochs: int = 3, max_attempts: int = 0
) -> jobs_pb2.Job:
    """Through the training service's own submit logic (validated, pinned to the dataset version)."""
    submitter = TrainingSubmitter(JobQueue(client, settings), DatasetCatalog(client, settings.redis_prefix))
    request = training_pb2.SubmitTrainingJobRequest(
        spec=tiny_spec(model_name, epochs), max_attempts=max_attempts
    )
    return submitter.submit(request)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server (AOF on) the test may stop and start."""
    data = tmp_path / "redis"
    data.mkdir()
    server = RedisServer(data)
    server.start()
    try:
        yield server
    finally:
        server.stop()
