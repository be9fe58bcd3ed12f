"""Redis key layout of the job queue (all under ``Settings.redis_prefix``).

- ``<p>:job:<id>`` hash: ``pb`` (``jobs_pb2.Job`` bytes, the record clients see) plus the
  fields transitions check atomically: ``state``, ``token`` (``<worker>:<attempt>`` of the
  attempt holding the job), ``lease`` (epoch seconds the holder's heartbeat is good until),
  ``stream`` and ``entry`` (the stream entry delivering the job while it is queued/running).
- ``<p>:jobs:stream:<kind>:<priority>`` streams, consumer group ``workers``: one entry per
  queued episode of a job (``job`` id, and ``pb``, the record as it was queued, so a worker can
  claim a fresh delivery without reading the record first), deleted once acknowledged.
- ``<p>:jobs:delayed:<kind>`` sorted set: job ids waiting out a retry backoff, scored by due time.
- ``<p>:jobs:request:<sha256(kind, principal, request_id)>`` string: ``<job id> <fingerprint>``,
  the job an idempotency key created and the sha256 of what was submitted with it. Keys are
  per kind and per caller, so one client's key never returns another's job.
- ``<p>:jobs:index`` and ``<p>:jobs:index:<kind>`` sorted sets (lexicographic, score 0) of
  ``<created_us>:<id>``: listing newest first with a stable cursor.
- ``<p>:job:<id>:events`` stream of ``JobEvent`` bytes for watchers; expires after the job ends.
- ``<p>:jobs:dead`` stream: dead letters (job id, kind, attempts, reason).
"""

from __future__ import annotations

import hashlib

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.errors import InvalidArgument
from common.redis import Keys

GROUP = "workers"
KINDS: dict[int, str] = {jobs_pb2.JOB_KIND_TRAINING: "training", jobs_pb2.JOB_KIND_COMPRESSION: "compression"}
# Highest first: the order a worker reads its streams in.
PRIORITIES = (
    (jobs_pb2.PRIORITY_HIGH, "high"),
    (jobs_pb2.PRIORITY_NORMAL, "normal"),
    (jobs_pb2.PRIORITY_LOW, "low"),
)
_PRIORITY_NAMES: dict[int, str] = dict(PRIORITIES)


def kind_name(kind: int) -> str:
    try:
        return KINDS[kind]
    except KeyError:
        raise InvalidArgument(f"kind must be JOB_KIND_TRAINING or JOB_KIND_COMPRESSION, not {kind}") from None


def effective_priority(priority: int) -> int:
    """UNSPECIFIED means NORMAL."""
    return jobs_pb2.PRIORITY_NORMAL if priority == jobs_pb2.PRIORITY_UNSPECIFIED else priority


class JobKeys:
    def __init__(self, prefix: str) -> None:
        self._k = Keys(prefix)
        self.dead = self._k("jobs", "dead")
        self.index = self._k("jobs", "index")

    def job(self, job_id: str) -> str:
        return self._k("job", job_id)

    def events(self, job_id: str) -> str:
        return self._k("job", job_id, "events")

    def stream(self, kind: int, priority: int) -> str:
        name = _PRIORITY_NAMES.get(effective_priority(priority))
        if name is None:
            raise InvalidArgument(f"priority must be LOW, NORMAL or HIGH, not {priority}")
        return self._k("jobs", "stream", kind_name(kind), name)

    def streams(self, kind: int) -> list[str]:
        """The kind's streams, highest priority first."""
        return [self.stream(kind, priority) for priority, _ in PRIORITIES]

    def delayed(self, kind: int) -> str:
        return self._k("jobs", "delayed", kind_name(kind))

    def request(self, kind: int, principal: str, request_id: str) -> str:
        scope = "\0".join((kind_name(kind), principal, request_id))
        return self._k("jobs", "request", hashlib.sha256(scope.encode()).hexdigest())

    def kind_index(self, kind: int) -> str:
        return self._k("jobs", "index", kind_name(kind))
