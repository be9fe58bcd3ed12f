"""JobQueue: submit, read, list and cancel jobs (the client side of the queue)."""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Sequence
from typing import Any

import redis

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.auth import current_principal
from common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from common.jobs.keys import GROUP, JobKeys, effective_priority, kind_name
from common.jobs.records import TERMINAL, Batch, Fields, Transitions, decode, emit, now, save, state_name
from common.settings import Settings

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_CURSOR = re.compile(r"^[0-9]{20}:[0-9a-f]{32}$")
_MAX_REQUEST_ID = 256
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
_SERVER_FIELDS: tuple[Any, ...] = (
    "attempts",
    "last_error",
    "progress",
    "result",
    "metrics",
    "worker_id",
    "started_at",
    "finished_at",
    "compression_report",
)
_SPEC_OF_KIND = {jobs_pb2.JOB_KIND_TRAINING: "training", jobs_pb2.JOB_KIND_COMPRESSION: "compression"}

# Idempotent submit: the request key, record, stream entry, indexes and first event are
# written together, or the job the request id already created is returned.
_SUBMIT = """
if ARGV[1] == '1' then
  local existing = redis.call('GET', KEYS[1])
  if existing then return existing end
  redis.call('SET', KEYS[1], ARGV[2] .. ' ' .. ARGV[9])
end
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[3], ARGV[7], '0', 'MKSTREAM')
local entry = redis.call('XADD', KEYS[3], '*', 'job', ARGV[2], 'pb', ARGV[3])
redis.call('HSET', KEYS[2], 'pb', ARGV[3], 'state', ARGV[4], 'stream', KEYS[3], 'entry', entry,
           'token', '', 'lease', '0')
redis.call('ZADD', KEYS[4], 0, ARGV[5])
redis.call('ZADD', KEYS[5], 0, ARGV[5])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[8], '*', 'event', ARGV[6])
return ARGV[2]
"""


def _fingerprint(job: jobs_pb2.Job) -> str:
    """What a retry with the same request_id must repeat: the spec and the submit options."""
    submitted = jobs_pb2.Job(kind=job.kind, priority=job.priority, max_attempts=job.max_attempts)
    spec = job.WhichOneof("spec")
    if spec is not None:
        getattr(submitted, spec).CopyFrom(getattr(job, spec))
    return hashlib.sha256(submitted.SerializeToString(deterministic=True)).hexdigest()


def check_job_id(job_id: str) -> str:
    if not job_id:
        raise InvalidArgument("job_id is required")
    if not _JOB_ID.match(job_id):
        raise NotFound(f"job {job_id!r} not found")
    return job_id


class JobQueue:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.keys = JobKeys(settings.redis_prefix)
        self.transitions = Transitions(client)
        self._submit = client.register_script(_SUBMIT)

    def check(self, job: jobs_pb2.Job) -> None:
        """What ``submit`` refuses before storing anything (InvalidArgument naming the field)."""
        kind_name(job.kind)
        spec = job.WhichOneof("spec")
        if spec != _SPEC_OF_KIND[job.kind]:
            raise InvalidArgument(
                f"spec: a {kind_name(job.kind)} job needs the {_SPEC_OF_KIND[job.kind]} spec"
            )
        if job.max_attempts < 0:
            raise InvalidArgument(f"max_attempts must be >= 0, not {job.max_attempts}")
        if len(job.request_id) > _MAX_REQUEST_ID:
            raise InvalidArgument(f"request_id is longer than {_MAX_REQUEST_ID} characters")
        self.keys.stream(job.kind, job.priority)  # refuses an unknown priority

    def submit(self, job: jobs_pb2.Job) -> jobs_pb2.Job:
        """Store ``job`` as QUEUED and enqueue it. A request_id this caller already used for
        this kind returns that job when the spec and options match, else AlreadyExists."""
        self.check(job)
        stream = self.keys.stream(job.kind, job.priority)
        fingerprint = _fingerprint(job)
        record = jobs_pb2.Job()
        record.CopyFrom(job)
        stamp = now()
        record.id = uuid.uuid4().hex
        record.state = jobs_pb2.JOB_STATE_QUEUED
        record.priority = effective_priority(job.priority)  # type: ignore[assignment]
        record.max_attempts = job.max_attempts or self.settings.job_max_attempts
        # Only the spec and the submit options come from the caller.
        for name in _SERVER_FIELDS:
            record.ClearField(name)
        # Set by the gRPC interceptor for this call; CancelJob checks it.
        principal = current_principal().name
        record.submitted_by = principal
        record.created_at.CopyFrom(stamp)
        record.updated_at.CopyFrom(stamp)
        event = jobs_pb2.JobEvent(job_id=record.id, type=jobs_pb2.JOB_EVENT_TYPE_STATE, state=record.state)
        event.time.CopyFrom(stamp)
        created: Any = self._submit(
            keys=[
                self.keys.request(job.kind, principal, job.request_id),
                self.keys.job(record.id),
                stream,
                self.keys.index,
                self.keys.kind_index(job.kind),
                self.keys.events(record.id),
            ],
            args=[
                "1" if job.request_id else "0",
                record.id,
                record.SerializeToString(),
                str(record.state),
                _index_member(record),
                event.SerializeToString(),
                GROUP,
                1000,
                fingerprint,
            ],
        )
        job_id, _, seen = created.decode().partition(" ")
        if job_id != record.id:
            if seen != fingerprint:
                raise AlreadyExists(
                    f"request_id {job.request_id!r} already created job {job_id} with a different "
                    "spec, priority or max_attempts; use a new request_id for a new job"
                )
            log.info("submit deduplicated", extra={"job_id": job_id, "request_id": job.request_id})
            return self.get(job_id)
        log.info("job queued", extra={"job_id": record.id, "kind": kind_name(record.kind)})
        return record

    def get(self, job_id: str) -> jobs_pb2.Job:
        raw = self.client.hget(self.keys.job(check_job_id(job_id)), "pb")
        if raw is None:
            raise NotFound(f"job {job_id!r} not found")
        job = jobs_pb2.Job()
        job.ParseFromString(raw)  # type: ignore[arg-type]
        return job

    def list(
        self, kind: int = 0, states: Sequence[int] = (), page_size: int = 50, page_token: str = ""
    ) -> tuple[list[jobs_pb2.Job], str]:
        """Jobs newest first; ``page_token`` is the previous page's last job cursor."""
        if page_size < 0:
            raise InvalidArgument(f"page_size must be >= 0, not {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if page_token and not _CURSOR.match(page_token):
            raise InvalidArgument("page_token is not one this server issued")
        index = self.keys.kind_index(kind) if kind else self.keys.index
        wanted = set(states)
        page: list[tuple[str, jobs_pb2.Job]] = []
        upper = "(" + page_token if page_token else "+"
        chunk = max(size * 2, 100)
        while len(page) <= size:
            raw_members: Any = self.client.zrevrangebylex(index, upper, "-", start=0, num=chunk)
            members = [m.decode() for m in raw_members]
            if not members:
                break
            with self.client.pipeline(transaction=False) as pipe:
                for member in members:
                    pipe.hget(self.keys.job(member.split(":", 1)[1]), "pb")
                raws = pipe.execute()
            for member, raw in zip(members, raws, strict=True):
                if raw is None:
                    continue
                job = jobs_pb2.Job()
                job.ParseFromString(raw)
                if not wanted or job.state in wanted:
                    page.append((member, job))
            upper = "(" + members[-1]
        token = page[size - 1][0] if len(page) > size else ""
        return [job for _, job in page[:size]], token

    def cancel(self, job_id: str, reason: str = "") -> jobs_pb2.Job:
        """QUEUED: it will never run. RUNNING: CANCELLED now; the worker sees it within
        a fraction of a second and discards whatever the handler still returns."""
        key = self.keys.job(check_job_id(job_id))

        def change(batch: Batch, fields: Fields) -> jobs_pb2.Job:
            if not fields:
                raise NotFound(f"job {job_id!r} not found")
            job = decode(fields)
            if job.state in TERMINAL:
                raise FailedPrecondition(f"job {job_id} is already {state_name(job.state)}")
            was_queued = job.state == jobs_pb2.JOB_STATE_QUEUED
            stamp = now()
            job.state = jobs_pb2.JOB_STATE_CANCELLED
            job.last_error = reason or "cancelled"
            job.updated_at.CopyFrom(stamp)
            job.finished_at.CopyFrom(stamp)
            save(batch, self.keys, job)
            if was_queued:
                # Nobody runs it: drop its delivery now. A running job's entry is
                # acknowledged by its worker (or, if that died, by whoever reclaims it).
                batch.zrem(self.keys.delayed(job.kind), job.id)
                entry = fields.get(b"entry", b"")
                if entry:
                    stream = fields[b"stream"].decode()
                    batch.xack(stream, GROUP, entry)
                    batch.xdel(stream, entry)
            emit(batch, self.keys, job, message=job.last_error)
            return job

        job = self.transitions.apply(key, change)
        log.info("job cancelled", extra={"job_id": job_id})
        return job


def _index_member(job: jobs_pb2.Job) -> str:
    micros = job.created_at.ToNanoseconds() // 1000
    return f"{micros:020d}:{job.id}"
