"""AttemptMonitor: one thread per worker that heartbeats the running attempt and polls it
for cancellation, so starting a job costs no thread, no wake-up and, for a job shorter than
POLL_S, no Redis traffic."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.jobs.attempts import Attempt, AttemptStore
from common.jobs.context import JobContext

log = logging.getLogger(__name__)

# How often a running job is checked for cancellation (the ~0.2 s promise of cancelled()).
POLL_S = 0.1


@dataclass
class _Watched:
    ctx: JobContext
    attempt: Attempt
    next_poll: float
    next_beat: float


class AttemptMonitor:
    def __init__(self, store: AttemptStore, heartbeat_s: float) -> None:
        self._store = store
        self._heartbeat_s = heartbeat_s
        self._cond = threading.Condition()
        self._current: _Watched | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

    def watch(self, ctx: JobContext, attempt: Attempt) -> None:
        """Start heartbeating and polling ``attempt`` (the first check comes after POLL_S)."""
        start = time.monotonic()
        with self._cond:
            self._current = _Watched(ctx, attempt, start + POLL_S, start + self._heartbeat_s)
            if self._thread is None:
                self._closing = False
                self._thread = threading.Thread(target=self._run, name="job-monitor", daemon=True)
                self._thread.start()
            # No notify: an idle monitor wakes every POLL_S anyway, before the first check is due.

    def release(self) -> None:
        """Stop watching the current attempt. A check already in flight may still finish; on
        a settled attempt it only flags that attempt's (finished) context."""
        with self._cond:
            self._current = None

    def close(self) -> None:
        """End the thread (a later ``watch`` starts a new one)."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._closing = True
            self._cond.notify()
        if thread is not None:
            thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing:
                    watched = self._current
                    if watched is None:
                        self._cond.wait(POLL_S)
                        continue
                    delay = min(watched.next_poll, watched.next_beat) - time.monotonic()
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                if self._closing:
                    return
                assert watched is not None
                beat = time.monotonic() >= watched.next_beat
                if beat:
                    watched.next_beat = time.monotonic() + self._heartbeat_s
                watched.next_poll = time.monotonic() + POLL_S
            self._check(watched, beat)  # Redis I/O outside the lock

    def _check(self, watched: _Watched, beat: bool) -> None:
        try:
            if beat:
                watched.ctx.heartbeat()
            if not watched.ctx.cancelled() and not self._store.poll(watched.attempt):
                log.info("job cancelled or reclaimed; asking the handler to stop")
                watched.ctx._stop_work()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("job monitor cannot reach redis: %s", exc)
