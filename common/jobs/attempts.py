"""The worker side of the job record: claim a delivered job, heartbeat it, report
progress, and settle it. Every step checks that the caller still holds the job
(its attempt token), so a worker whose job was reclaimed cannot complete it and
no job completes twice."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.api.modelfleet.compression.v1 import compression_spec_pb2
from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.jobs.keys import GROUP
from common.jobs.queue import JobQueue
from common.jobs.records import TERMINAL, Batch, Fields, Guess, dead_letter, decode, emit, now, save

log = logging.getLogger(__name__)

_RUNNING = str(jobs_pb2.JOB_STATE_RUNNING)
_QUEUED = str(jobs_pb2.JOB_STATE_QUEUED)
_RUNNING_B = _RUNNING.encode()
_QUEUED_B = _QUEUED.encode()

# Renew the lease and reset the pending entry's idle time, but only while this attempt holds the job:
# XCLAIM by a worker that lost the job would steal the delivery back from its new holder.
_HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= ARGV[6] then
  return 0
end
redis.call('HSET', KEYS[1], 'lease', ARGV[2])
redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[4], 0, ARGV[5], 'JUSTID')
return 1
"""

# Move a job whose retry backoff is over from the delayed set back onto its stream.
_PROMOTE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[2], 'state') ~= ARGV[3] then return 0 end
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[3], ARGV[2], '0', 'MKSTREAM')
local entry = redis.call('XADD', KEYS[3], '*', 'job', ARGV[1], 'pb', redis.call('HGET', KEYS[2], 'pb'))
redis.call('HSET', KEYS[2], 'entry', entry)
return 1
"""


@dataclass
class Attempt:
    """One worker's hold on one job: valid while the record's token equals ``token``.
    ``pb`` is the record as this attempt last wrote it: the guess its next step starts from."""

    job: jobs_pb2.Job
    token: str
    stream: str
    entry: str
    pb: bytes

    def guess(self) -> Guess:
        return Guess({b"pb": self.pb, b"state": _RUNNING_B, b"token": self.token.encode()})


class AttemptStore:
    def __init__(self, queue: JobQueue, consumer: str) -> None:
        self.client = queue.client
        self.settings = queue.settings
        self.keys = queue.keys
        self.transitions = queue.transitions
        self.consumer = consumer
        self._heartbeat = self.client.register_script(_HEARTBEAT)
        self._promote = self.client.register_script(_PROMOTE)

    @property
    def lease_s(self) -> float:
        return self.settings.job_visibility_timeout_s

    def claim(self, stream: str, entry: str, job_id: str, pb: bytes | None = None) -> Attempt | None:
        """Start an attempt for a delivered entry, or None if the entry is stale, the job is
        finished or cancelled, or another live worker holds it. ``pb``, the record the entry
        carries, lets a fresh delivery be claimed in one round trip."""
        key = self.keys.job(job_id)
        guess = Guess({b"pb": pb, b"state": _QUEUED_B, b"entry": entry.encode()}) if pb else None

        def change(batch: Batch, fields: Fields) -> Attempt | None:
            if not fields or fields.get(b"entry", b"").decode() != entry:
                _ack(batch, stream, entry)  # a delivery of nothing current
                return None
            job = decode(fields)
            if job.state in TERMINAL:
                _ack(batch, stream, entry)
                return None
            if job.state == jobs_pb2.JOB_STATE_RUNNING:
                if float(fields.get(b"lease", b"0")) > time.time():
                    return None  # alive; its heartbeat will claim the entry back
                if job.attempts >= job.max_attempts:
                    reason = f"worker {job.worker_id} was lost during the last of {job.max_attempts} attempts"
                    _finish(batch, self, job, jobs_pb2.JOB_STATE_FAILED, reason)
                    dead_letter(batch, self.keys, job, reason)
                    _ack(batch, stream, entry)
                    return None
                job.last_error = f"worker {job.worker_id} was lost during attempt {job.attempts}"
            stamp = now()
            job.attempts += 1
            job.state = jobs_pb2.JOB_STATE_RUNNING
            job.worker_id = self.consumer
            job.updated_at.CopyFrom(stamp)
            if not job.HasField("started_at"):
                job.started_at.CopyFrom(stamp)
            token = f"{self.consumer}:{job.attempts}"
            saved = save(batch, self.keys, job, token=token, lease=time.time() + self.lease_s)
            emit(batch, self.keys, job, message=f"attempt {job.attempts} on {self.consumer}")
            return Attempt(job=job, token=token, stream=stream, entry=entry, pb=saved)

        return self.transitions.apply(key, change, guess)

    def heartbeat(self, attempt: Attempt) -> bool:
        """Renew the hold; False if the job is no longer this attempt's (cancelled or reclaimed)."""
        held = self._heartbeat(
            keys=[self.keys.job(attempt.job.id), attempt.stream],
            args=[attempt.token, time.time() + self.lease_s, GROUP, self.consumer, attempt.entry, _RUNNING],
        )
        return bool(held)

    def poll(self, attempt: Attempt) -> bool:
        """True while the attempt still holds a RUNNING job (one cheap HMGET)."""
        state, token = self.client.hmget(self.keys.job(attempt.job.id), ["state", "token"])
        return state == _RUNNING.encode() and token == attempt.token.encode()

    def progress(
        self, attempt: Attempt, fraction: float, epoch: int, metrics: Mapping[str, float], message: str
    ) -> None:
        def change(batch: Batch, fields: Fields) -> bytes | None:
            if not _holds(fields, attempt):
                return None
            job = decode(fields)
            job.progress = min(max(fraction, 0.0), 1.0)
            job.metrics.update(metrics)
            job.updated_at.CopyFrom(now())
            saved = save(batch, self.keys, job)
            emit(batch, self.keys, job, jobs_pb2.JOB_EVENT_TYPE_PROGRESS, message, epoch, metrics)
            return saved

        saved = self.transitions.apply(self.keys.job(attempt.job.id), change, attempt.guess())
        if saved is not None:
            attempt.pb = saved

    def log(self, attempt: Attempt, message: str) -> None:
        def change(batch: Batch, fields: Fields) -> None:
            if _holds(fields, attempt):
                job = decode(fields)
                job.updated_at.CopyFrom(now())
                emit(batch, self.keys, job, jobs_pb2.JOB_EVENT_TYPE_LOG, message)

        self.transitions.apply(self.keys.job(attempt.job.id), change, attempt.guess())

    def succeed(
        self,
        attempt: Attempt,
        result: jobs_pb2.JobResult,
        metrics: Mapping[str, float],
        report: compression_spec_pb2.CompressionReport | None,
    ) -> bool:
        """Record the outcome; False (outcome discarded) if the job was cancelled or reclaimed."""

        def change(batch: Batch, fields: Fields) -> bool:
            if not _holds(fields, attempt):
                _release_if_cancelled(batch, fields, attempt)
                return False
            job = decode(fields)
            job.result.CopyFrom(result)
            job.metrics.update(metrics)
            job.progress = 1.0
            if report is not None:
                job.compression_report.CopyFrom(report)
            _finish(batch, self, job, jobs_pb2.JOB_STATE_SUCCEEDED, "")
            _ack(batch, attempt.stream, attempt.entry)
            return True

        return self.transitions.apply(self.keys.job(attempt.job.id), change, attempt.guess())

    def cancelled_by_handler(self, attempt: Attempt, reason: str) -> None:
        def change(batch: Batch, fields: Fields) -> None:
            if not _holds(fields, attempt):
                _release_if_cancelled(batch, fields, attempt)
                return
            _finish(batch, self, decode(fields), jobs_pb2.JOB_STATE_CANCELLED, reason)
            _ack(batch, attempt.stream, attempt.entry)

        self.transitions.apply(self.keys.job(attempt.job.id), change, attempt.guess())

    def fail(self, attempt: Attempt, error: str, permanent: bool) -> int:
        """Retry after backoff, or FAILED plus a dead letter when permanent or out of attempts.
        Returns the resulting state (0 if the job was no longer this attempt's)."""

        def change(batch: Batch, fields: Fields) -> int:
            if not _holds(fields, attempt):
                _release_if_cancelled(batch, fields, attempt)
                return 0
            job = decode(fields)
            _ack(batch, attempt.stream, attempt.entry)
            if permanent or job.attempts >= job.max_attempts:
                reason = error if permanent else f"attempt {job.attempts} of {job.max_attempts}: {error}"
                _finish(batch, self, job, jobs_pb2.JOB_STATE_FAILED, reason)
                dead_letter(batch, self.keys, job, reason)
                return jobs_pb2.JOB_STATE_FAILED
            delay = self.settings.job_retry_backoff_s * 2 ** (job.attempts - 1)
            job.state = jobs_pb2.JOB_STATE_QUEUED
            job.last_error = error
            job.updated_at.CopyFrom(now())
            save(batch, self.keys, job, token="", entry="")
            batch.zadd(self.keys.delayed(job.kind), job.id, time.time() + delay)
            emit(batch, self.keys, job, message=f"retry in {delay:.3g}s after: {error}")
            return jobs_pb2.JOB_STATE_QUEUED

        return self.transitions.apply(self.keys.job(attempt.job.id), change, attempt.guess())

    def promote_due(self, kind: int) -> float | None:
        """Requeue jobs whose backoff is over; returns when the next one is due (epoch s), if any."""
        delayed = self.keys.delayed(kind)
        due: Any = self.client.zrangebyscore(delayed, "-inf", time.time(), start=0, num=32)
        for raw in due:
            job_id = raw.decode()
            stream = self.client.hget(self.keys.job(job_id), "stream")
            if stream is None:
                self.client.zrem(delayed, job_id)
                continue
            self._promote(keys=[delayed, self.keys.job(job_id), stream], args=[job_id, GROUP, _QUEUED])
        nxt = self.client.zrange(delayed, 0, 0, withscores=True)
        return float(nxt[0][1]) if nxt else None

    def reclaim(self, stream: str, count: int) -> list[tuple[str, str, bytes | None]]:
        """Take over entries idle past the visibility timeout (their worker stopped heartbeating):
        (entry, job id, the record the entry carries)."""
        reply = self.client.xautoclaim(
            stream, GROUP, self.consumer, int(self.lease_s * 1000), start_id="0-0", count=count
        )
        return [
            (entry.decode(), values[b"job"].decode(), values.get(b"pb"))
            for entry, values in reply[1]
            if values
        ]


def _holds(fields: Fields, attempt: Attempt) -> bool:
    return fields.get(b"state") == _RUNNING_B and fields.get(b"token") == attempt.token.encode()


def _ack(batch: Batch, stream: str, entry: str) -> None:
    batch.xack(stream, GROUP, entry)
    batch.xdel(stream, entry)


def _release_if_cancelled(batch: Batch, fields: Fields, attempt: Attempt) -> None:
    # A cancelled job's delivery is ours to acknowledge; a reclaimed one belongs to its new holder.
    if fields.get(b"state") == str(jobs_pb2.JOB_STATE_CANCELLED).encode():
        _ack(batch, attempt.stream, attempt.entry)


def _finish(batch: Batch, store: AttemptStore, job: jobs_pb2.Job, state: int, error: str) -> None:
    stamp = now()
    job.state = state  # type: ignore[assignment]
    if error:
        job.last_error = error
    job.updated_at.CopyFrom(stamp)
    job.finished_at.CopyFrom(stamp)
    save(batch, store.keys, job, token="", entry="")
    emit(batch, store.keys, job, message=error)
