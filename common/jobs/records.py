"""Helpers shared by every job-record transition: the checked read-modify-write
on a job hash, timestamps, and the events written beside each change."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import redis
from google.protobuf.timestamp_pb2 import Timestamp
from redis.client import Pipeline

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.errors import Unavailable
from common.jobs.keys import JobKeys

T = TypeVar("T")

TERMINAL = frozenset({jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED})
# Watchers need recent history only; a finished job's events expire after a week.
EVENTS_MAXLEN = 1000
EVENTS_TTL_S = 7 * 24 * 3600
DEAD_MAXLEN = 100_000
_WATCH_TRIES = 200

Fields = Mapping[bytes, bytes]


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp


def state_name(state: int) -> str:
    name: str = jobs_pb2.JobState.Name(state)  # type: ignore[arg-type]
    return name.removeprefix("JOB_STATE_")


def decode(fields: Fields) -> jobs_pb2.Job:
    job = jobs_pb2.Job()
    job.ParseFromString(fields[b"pb"])
    return job


def atomic(client: redis.Redis, key: str, change: Callable[[Pipeline, Fields], T]) -> T:
    """WATCH ``key``, read its hash, let ``change`` queue commands after MULTI, EXEC.

    ``change`` decides from the fields it is given; if anyone wrote the hash in
    between, EXEC aborts and the whole step reruns on fresh fields, so every
    transition is checked against the state it actually applies to.
    """
    for _ in range(_WATCH_TRIES):
        with client.pipeline() as pipe:
            try:
                pipe.watch(key)
                fields: Fields = pipe.hgetall(key)  # type: ignore[assignment]
                pipe.multi()
                result = change(pipe, fields)
                pipe.execute()
                return result
            except redis.WatchError:
                continue
    raise Unavailable(f"job record {key} changed {_WATCH_TRIES} times during one update; try again")


def save(pipe: Pipeline, keys: JobKeys, job: jobs_pb2.Job, **extra: str | float) -> None:
    fields: dict[str, bytes | str | float] = {"pb": job.SerializeToString(), "state": str(job.state), **extra}
    pipe.hset(keys.job(job.id), mapping=fields)  # type: ignore[arg-type]


def emit(
    pipe: Pipeline,
    keys: JobKeys,
    job: jobs_pb2.Job,
    kind: int = jobs_pb2.JOB_EVENT_TYPE_STATE,
    message: str = "",
    epoch: int = 0,
    metrics: Mapping[str, float] | None = None,
) -> None:
    """Queue a JobEvent describing ``job`` as it now is; a terminal state starts the events' TTL."""
    event = jobs_pb2.JobEvent(
        job_id=job.id,
        type=kind,  # type: ignore[arg-type]
        state=job.state,
        progress=job.progress,
        epoch=epoch,
        metrics=dict(metrics or {}),
        message=message,
    )
    event.time.CopyFrom(job.updated_at)
    events = keys.events(job.id)
    pipe.xadd(events, {"event": event.SerializeToString()}, maxlen=EVENTS_MAXLEN, approximate=True)
    if job.state in TERMINAL:
        pipe.expire(events, EVENTS_TTL_S)


def dead_letter(pipe: Pipeline, keys: JobKeys, job: jobs_pb2.Job, reason: str) -> None:
    fields = {"job": job.id, "kind": str(job.kind), "attempts": str(job.attempts), "reason": reason}
    pipe.xadd(keys.dead, fields, maxlen=DEAD_MAXLEN, approximate=True)  # type: ignore[arg-type]
