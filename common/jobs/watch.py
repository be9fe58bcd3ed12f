"""Following one job's events without blocking the event loop (redis.asyncio XREAD BLOCK)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.errors import NotFound
from common.jobs.keys import JobKeys
from common.jobs.queue import check_job_id
from common.jobs.records import TERMINAL

_BATCH = 100


async def watch_job(
    client: aioredis.Redis, keys: JobKeys, job_id: str, from_beginning: bool = False, block_ms: int = 1000
) -> AsyncIterator[tuple[jobs_pb2.JobEvent, jobs_pb2.Job]]:
    """Yield (event, job record) pairs until the job is terminal.

    Without ``from_beginning`` the first pair is a snapshot of the current state; with it,
    every stored event is replayed first. Each blocking read lasts at most ``block_ms``;
    after an idle read the record is checked, so a terminal state whose event was trimmed
    or expired still ends the watch. Cancelling the consuming task stops it at once.
    """
    check_job_id(job_id)
    events = keys.events(job_id)
    last: Any = "0-0"
    if not from_beginning:
        # Read the position before the record so no event between the two is missed.
        latest: Any = await client.xrevrange(events, "+", "-", count=1)
        if latest:
            last = latest[0][0]
        job = await _read(client, keys, job_id)
        yield _snapshot(job), job
        if job.state in TERMINAL:
            return
    while True:
        reply: Any = await client.xread({events: last}, count=_BATCH, block=block_ms)
        if not reply:
            job = await _read(client, keys, job_id)
            if job.state in TERMINAL:
                yield _snapshot(job), job
                return
            continue
        for entry, values in reply[0][1]:
            last = entry
            event = jobs_pb2.JobEvent()
            event.ParseFromString(values[b"event"])
            yield event, await _read(client, keys, job_id)
            if event.state in TERMINAL:
                return


async def _read(client: aioredis.Redis, keys: JobKeys, job_id: str) -> jobs_pb2.Job:
    raw: Any = await client.hget(keys.job(job_id), "pb")
    if raw is None:
        raise NotFound(f"job {job_id!r} not found")
    job = jobs_pb2.Job()
    job.ParseFromString(raw)
    return job


def _snapshot(job: jobs_pb2.Job) -> jobs_pb2.JobEvent:
    event = jobs_pb2.JobEvent(
        job_id=job.id,
        type=jobs_pb2.JOB_EVENT_TYPE_STATE,
        state=job.state,
        progress=job.progress,
        metrics=dict(job.metrics),
        message=job.last_error if job.state in TERMINAL else "",
    )
    event.time.CopyFrom(job.updated_at)
    return event
