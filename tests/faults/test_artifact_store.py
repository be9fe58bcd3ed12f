"""The artifact store full (ENOSPC) or read-only (EROFS) under a real training
worker: the job fails with the filesystem's reason, nothing is half-written, and
the next job succeeds once space or write access returns.

The store is a real size-limited tmpfs mounted at the test's artifact root
(chmod cannot make a directory read-only for root, a read-only remount can);
the test is skipped where this sandbox cannot mount."""

from __future__ import annotations

import errno
import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.jobs import JobQueue
from common.registry import ModelRegistry
from common.settings import Settings
from tests.faults.conftest import TERMINAL, Fleet, make_dataset, submit_tiny, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

WAIT_S = 90.0
STORE_SIZE = "8m"
BALLAST = "ballast"


def mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def tmpfs_root(fault_settings: Settings) -> Iterator[Path]:
    root = Path(fault_settings.artifact_root)
    root.mkdir(parents=True, exist_ok=True)
    done = mount("-t", "tmpfs", "-o", f"size={STORE_SIZE}", "tmpfs", str(root))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs artifact store here: {done.stderr.strip()}")
    try:
        yield root
    finally:
        # Lazy: a killed worker's ranks may still hold files open for a moment.
        subprocess.run(["umount", "-l", str(root)], capture_output=True, timeout=30, check=False)


def fill(root: Path) -> int:
    """Write a ballast file until the filesystem reports ENOSPC; returns its size."""
    written = 0
    with open(root / BALLAST, "wb", buffering=0) as handle:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    written += handle.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return written


def half_written(root: Path) -> list[str]:
    """Temp files left behind, or stored artifacts whose bytes do not match their name."""
    bad = [str(p) for p in (root / "tmp").iterdir()]
    bad += [str(p) for p in (root / "checkpoints").rglob(".*")] if (root / "checkpoints").exists() else []
    for path in (root / "sha256").rglob("*"):
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() != path.name:
            bad.append(str(path))
    return bad


def run_job(client: redis.Redis, settings: Settings, model_name: str, max_attempts: int = 0) -> jobs_pb2.Job:
    queue = JobQueue(client, settings)
    job_id = submit_tiny(client, settings, model_name, max_attempts=max_attempts).id
    wait_until(lambda: queue.get(job_id).state in TERMINAL, WAIT_S, f"job for {model_name} to finish")
    return queue.get(job_id)


def test_full_or_read_only_store_fails_jobs_cleanly_and_recovers(
    tmpfs_root: Path, fleet: Fleet, fault_settings: Settings, redis_client: redis.Redis
) -> None:
    make_dataset(redis_client, fault_settings)
    registry = ModelRegistry(redis_client, fault_settings.redis_prefix)
    fleet.worker()

    ballast = fill(tmpfs_root)
    # One attempt: a retry would meet the same full disk.
    full = run_job(redis_client, fault_settings, "on-full-store", max_attempts=1)
    full_leftovers = half_written(tmpfs_root)
    (tmpfs_root / BALLAST).unlink()
    after_full = run_job(redis_client, fault_settings, "after-full-store")

    assert mount("-o", "remount,ro", str(tmpfs_root)).returncode == 0
    read_only = run_job(redis_client, fault_settings, "on-read-only-store", max_attempts=1)
    assert mount("-o", "remount,rw", str(tmpfs_root)).returncode == 0
    ro_leftovers = half_written(tmpfs_root)
    after_ro = run_job(redis_client, fault_settings, "after-read-only-store")

    print(
        f"\n[artifact store] tmpfs {STORE_SIZE}, ballast {ballast} B | full: {full.last_error!r} "
        f"| read-only: {read_only.last_error!r} | half-written files: {len(full_leftovers + ro_leftovers)} "
        f"| recovered: {jobs_pb2.JobState.Name(after_full.state)}, {jobs_pb2.JobState.Name(after_ro.state)}"
    )
    assert full.state == jobs_pb2.JOB_STATE_FAILED
    assert "No space left on device" in full.last_error
    assert read_only.state == jobs_pb2.JOB_STATE_FAILED
    assert "Read-only file system" in read_only.last_error
    assert full_leftovers == [] and ro_leftovers == []
    registered = {m.name for m in registry.list_models()[0]}
    assert registered == {after_full.training.model_name, after_ro.training.model_name}
    for ok in (after_full, after_ro):
        assert ok.state == jobs_pb2.JOB_STATE_SUCCEEDED, ok.last_error
        versions, _ = registry.list_versions(ok.training.model_name)
        assert [v.lineage.job_id for v in versions] == [ok.id]
