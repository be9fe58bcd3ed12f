"""Worker: the loop that takes jobs of one kind off the queue and runs a handler on them."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.jobs.attempts import Attempt, AttemptStore
from common.jobs.context import JobContext, JobOutcome
from common.jobs.errors import JobCancelledError, PermanentJobError, is_deterministic
from common.jobs.keys import GROUP, kind_name
from common.jobs.monitor import AttemptMonitor
from common.jobs.queue import JobQueue
from common.logging import job_id_var

log = logging.getLogger(__name__)

T = TypeVar("T")
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
_BACKOFF_CAP_S = 5.0
# Retries scheduled by other workers are noticed within this long.
_DELAYED_SCAN_S = 0.5
# A finished job's outcome is retried this long through a Redis outage before the
# worker gives up and leaves the job to be reclaimed and rerun.
_SETTLE_TIMEOUT_S = 120.0

Handler = Callable[[JobContext], JobOutcome]


class Worker:
    def __init__(self, queue: JobQueue, kind: int, handler: Handler, worker_id: str | None = None) -> None:
        self.kind = kind
        self.kind_name = kind_name(kind)
        self.handler = handler
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.client = queue.client
        self.settings = queue.settings
        self.streams = queue.keys.streams(kind)
        self.store = AttemptStore(queue, self.worker_id)
        self._monitor = AttemptMonitor(self.store, self.settings.job_heartbeat_s)
        # Entries delivered to us beyond the one we run now (one XREADGROUP may return one per
        # stream): (stream, entry, job id, the record the entry carries).
        self._backlog: deque[tuple[str, str, str, bytes | None]] = deque()
        self._groups_ready = False
        self._next_reclaim = 0.0
        self._next_due = 0.0
        self._stop = threading.Event()

    def run(self, stop: threading.Event | None = None) -> None:
        """Take jobs until ``stop`` is set or SIGTERM/SIGINT arrives; the current job is
        finished first (warm shutdown). Redis outages are waited out with backoff."""
        stop = stop or self._stop
        restore = _on_signals(stop)
        log.info("worker started", extra={"worker_id": self.worker_id, "kind": self.kind_name})
        delay = 0.1
        try:
            while not stop.is_set():
                try:
                    self.run_once(block_ms=500)
                    delay = 0.1
                except _REDIS_DOWN as exc:
                    log.warning("redis unavailable, retrying in %.1fs: %s", delay, exc)
                    stop.wait(delay)
                    delay = min(delay * 2, _BACKOFF_CAP_S)
        finally:
            restore()
            self._monitor.close()
        log.info("worker stopped", extra={"worker_id": self.worker_id})

    def run_once(self, block_ms: int = 1000) -> bool:
        """Process at most one job; True if a handler ran."""
        self._ensure_groups()
        self._housekeeping()
        item = self._next_delivery(block_ms)
        if item is None:
            return False
        stream, entry, job_id, pb = item
        attempt = self.store.claim(stream, entry, job_id, pb)
        if attempt is None:
            return False
        self._execute(attempt)
        return True

    def _ensure_groups(self) -> None:
        if self._groups_ready:
            return
        for stream in self.streams:
            try:
                self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_ready = True

    def _housekeeping(self) -> None:
        now = time.time()
        if self._next_due <= now:
            due = self.store.promote_due(self.kind)
            self._next_due = min(due if due is not None else now + _DELAYED_SCAN_S, now + _DELAYED_SCAN_S)
        if self._next_reclaim <= now:
            self._next_reclaim = now + min(max(self.store.lease_s / 4, 0.05), 5.0)
            for stream in self.streams:
                for entry, job_id, pb in self.store.reclaim(stream, count=16):
                    log.info("reclaimed idle delivery", extra={"job_id": job_id, "entry": entry})
                    self._backlog.append((stream, entry, job_id, pb))

    def _next_delivery(self, block_ms: int) -> tuple[str, str, str, bytes | None] | None:
        if self._backlog:
            return self._backlog.popleft()
        # Wake up in time for the next retry or reclaim check.
        wake = min(self._next_reclaim, self._next_due)
        block = max(1, min(block_ms, int((wake - time.time()) * 1000)))
        reply: Any = self.client.xreadgroup(
            GROUP, self.worker_id, dict.fromkeys(self.streams, ">"), count=1, block=block
        )
        if not reply:
            return None
        by_stream = {name.decode(): entries for name, entries in reply}
        for stream in self.streams:  # highest priority first
            for entry, values in by_stream.get(stream, []):
                self._backlog.append((stream, entry.decode(), values[b"job"].decode(), values.get(b"pb")))
        return self._backlog.popleft() if self._backlog else None

    def _execute(self, attempt: Attempt) -> None:
        ctx = JobContext(self.store, attempt)
        token = job_id_var.set(attempt.job.id)
        self._monitor.watch(ctx, attempt)
        try:
            log.info("job started", extra={"attempt": attempt.job.attempts})
            try:
                outcome = self.handler(ctx)
            except JobCancelledError as exc:
                reason = str(exc) or "cancelled"
                self._settle(lambda: self.store.cancelled_by_handler(attempt, reason))
                log.info("job cancelled by handler")
            except PermanentJobError as exc:
                error = str(exc)
                self._settle(lambda: self.store.fail(attempt, error, permanent=True))
                log.warning("job failed permanently: %s", exc)
            except Exception as exc:
                log.exception("job attempt failed")
                error = f"{type(exc).__name__}: {exc}"
                permanent = is_deterministic(exc)
                if (
                    self._settle(lambda: self.store.fail(attempt, error, permanent=permanent))
                    and not permanent
                ):
                    self._next_due = 0.0  # its backoff may be shorter than our next wake-up
            else:
                recorded = self._settle(
                    lambda: self.store.succeed(
                        attempt, outcome.result, outcome.metrics, outcome.compression_report
                    )
                )
                log.info("job succeeded" if recorded else "job outcome discarded (cancelled or reclaimed)")
        finally:
            self._monitor.release()
            job_id_var.reset(token)

    def _settle(self, step: Callable[[], T]) -> T:
        """Record an attempt's end, riding out a Redis restart; if Redis stays away, the
        delivery stays pending and another worker reruns the job after the timeout."""
        deadline = time.monotonic() + _SETTLE_TIMEOUT_S
        delay = 0.1
        while True:
            try:
                return step()
            except _REDIS_DOWN as exc:
                if time.monotonic() >= deadline:
                    raise
                log.warning("cannot record job outcome yet, retrying in %.1fs: %s", delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, _BACKOFF_CAP_S)


def _on_signals(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM/SIGINT set ``stop``; returns a function restoring the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: finishing the current job, then stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
