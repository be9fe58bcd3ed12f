"""What a job handler gets (JobContext) and returns (JobOutcome)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.api.modelfleet.compression.v1 import compression_spec_pb2
from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.jobs.attempts import Attempt, AttemptStore

log = logging.getLogger(__name__)


@dataclass
class JobOutcome:
    result: jobs_pb2.JobResult
    metrics: dict[str, float] = field(default_factory=dict)
    compression_report: compression_spec_pb2.CompressionReport | None = None


class JobContext:
    """One attempt of one job, as its handler sees it."""

    def __init__(self, store: AttemptStore, attempt: Attempt) -> None:
        self.job = attempt.job
        self.attempt = attempt.job.attempts
        self._store = store
        self._handle = attempt
        self._stop = threading.Event()

    def progress(
        self,
        fraction: float,
        *,
        epoch: int = 0,
        metrics: Mapping[str, float] | None = None,
        message: str = "",
    ) -> None:
        """Record progress (clamped to [0, 1]) and publish a PROGRESS event. Best effort:
        a Redis outage delays watchers, it does not fail the job."""
        try:
            self._store.progress(self._handle, fraction, epoch, dict(metrics or {}), message)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("progress not recorded: %s", exc)

    def log(self, message: str) -> None:
        try:
            self._store.log(self._handle, message)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("job log not recorded: %s", exc)

    def cancelled(self) -> bool:
        """True once the job was cancelled, or this attempt lost the job to another worker."""
        return self._stop.is_set()

    def heartbeat(self) -> None:
        try:
            held = self._store.heartbeat(self._handle)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("heartbeat failed: %s", exc)
            return
        if not held:
            self._stop.set()

    def _stop_work(self) -> None:
        self._stop.set()
