"""Helpers shared by every job-record transition: the checked read-modify-write
on a job hash, timestamps, and the events written beside each change."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import redis
from google.protobuf.timestamp_pb2 import Timestamp

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.errors import Unavailable
from common.jobs.keys import JobKeys

T = TypeVar("T")

TERMINAL = frozenset({jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED})
# Watchers need recent history only; a finished job's events expire after a week.
EVENTS_MAXLEN = 1000
EVENTS_TTL_S = 7 * 24 * 3600
DEAD_MAXLEN = 100_000
_CAS_TRIES = 200

Fields = Mapping[bytes, bytes]

# Compare-and-apply: if the record still holds the expected fields (or, expecting none, does
# not exist), run the queued commands; otherwise change nothing and return the record as it
# now is, so the caller can decide again without another round trip.
# ARGV[1] packs the items (each a 4-byte big-endian length, then the bytes): n, n field/value
# pairs, then per command its argument count, name and arguments (its key is the next of
# KEYS[2..]). One packed argument instead of dozens: redis-py spends more CPU encoding a
# command's arguments than the round trip costs on loopback.
_CAS = """
local blob, pos, a = ARGV[1], 1, {}
while pos <= #blob do
  local len = struct.unpack('>I4', blob, pos)
  a[#a + 1] = string.sub(blob, pos + 4, pos + 3 + len)
  pos = pos + 4 + len
end
local key = KEYS[1]
local n = tonumber(a[1])
local i = 2
if n == 0 then
  if redis.call('EXISTS', key) == 1 then return {0, redis.call('HGETALL', key)} end
end
for _ = 1, n do
  if redis.call('HGET', key, a[i]) ~= a[i + 1] then return {0, redis.call('HGETALL', key)} end
  i = i + 2
end
for k = 2, #KEYS do
  local argc = tonumber(a[i])
  local command = {a[i + 1], KEYS[k]}
  for j = 1, argc do command[j + 2] = a[i + 1 + j] end
  redis.call(unpack(command))
  i = i + 2 + argc
end
return {1}
"""
_LENGTH = struct.Struct(">I")


class Batch:
    """The writes one transition decides on, applied by ``Transitions.apply`` only if the
    record it decided from is still current. Each command's first argument is its key."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, str, list[Any]]] = []

    def hset(self, key: str, mapping: Mapping[str, bytes | str | float]) -> None:
        self.commands.append(("HSET", key, [x for pair in mapping.items() for x in pair]))

    def xadd(self, key: str, fields: Mapping[str, bytes | str], maxlen: int) -> None:
        args: list[Any] = ["MAXLEN", "~", maxlen, "*"]
        self.commands.append(("XADD", key, args + [x for pair in fields.items() for x in pair]))

    def expire(self, key: str, seconds: int) -> None:
        self.commands.append(("EXPIRE", key, [seconds]))

    def xack(self, stream: str, group: str, entry: str | bytes) -> None:
        self.commands.append(("XACK", stream, [group, entry]))

    def xdel(self, stream: str, entry: str | bytes) -> None:
        self.commands.append(("XDEL", stream, [entry]))

    def zadd(self, key: str, member: str, score: float) -> None:
        self.commands.append(("ZADD", key, [score, member]))

    def zrem(self, key: str, member: str) -> None:
        self.commands.append(("ZREM", key, [member]))


class Guess(Mapping[bytes, bytes]):
    """Fields a caller believes a record holds (say, as it last wrote them), to decide a
    transition without reading the record first. The compare-and-apply checks every one of
    them; a decision that needs a field the guess lacks falls back to reading the record."""

    def __init__(self, known: Mapping[bytes, bytes]) -> None:
        self.known = dict(known)

    def __getitem__(self, field: bytes) -> bytes:
        try:
            return self.known[field]
        except KeyError:
            raise _Unknown(field) from None

    def __iter__(self) -> Iterator[bytes]:
        raise _Unknown(b"*")

    def __len__(self) -> int:
        return len(self.known)  # a guess says the record exists


class _Unknown(Exception):
    """A transition read a field its guess does not hold."""


class Transitions:
    """Checked read-modify-write of job hashes: one EVALSHA per step when the record is
    as expected, instead of WATCH + HGETALL + MULTI/EXEC."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._cas = client.register_script(_CAS)

    def apply(self, key: str, change: Callable[[Batch, Fields], T], guess: Guess | None = None) -> T:
        """Let ``change`` decide from the record at ``key`` and queue its writes; apply them
        only if the record has not changed meanwhile, else decide again on the fresh record.

        With ``guess`` the first decision is made without reading the record; a wrong guess
        costs nothing extra, since the failed compare returns the record.
        """
        fields: Fields | None = guess
        for _ in range(_CAS_TRIES):
            if fields is None:
                fields = self._read(key)
            batch = Batch()
            try:
                result = change(batch, fields)
            except _Unknown:
                fields = None
                continue
            expected = fields.known if isinstance(fields, Guess) else fields
            keys = [key]
            items: list[Any] = [len(expected)]
            for field, value in expected.items():
                items += [field, value]
            for name, command_key, command_args in batch.commands:
                keys.append(command_key)
                items += [len(command_args), name, *command_args]
            reply: Any = self._cas(keys=keys, args=[_pack(items)])
            if reply[0] == 1:
                return result
            flat = reply[1]
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
        raise Unavailable(f"job record {key} changed {_CAS_TRIES} times during one update; try again")

    def _read(self, key: str) -> Fields:
        fields: Any = self.client.hgetall(key)
        return dict(fields)


def _pack(items: list[Any]) -> bytes:
    """Length-prefixed items; numbers as redis-py would send them (``repr`` of a float)."""
    raws = [
        item if type(item) is bytes else (item if type(item) is str else repr(item)).encode()
        for item in items
    ]
    return b"".join(_LENGTH.pack(len(raw)) + raw for raw in raws)


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


def save(batch: Batch, keys: JobKeys, job: jobs_pb2.Job, **extra: str | float) -> bytes:
    """Queue the record's write; returns the ``pb`` bytes written."""
    pb = job.SerializeToString()
    batch.hset(keys.job(job.id), {"pb": pb, "state": str(job.state), **extra})
    return pb


def emit(
    batch: Batch,
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
    batch.xadd(events, {"event": event.SerializeToString()}, maxlen=EVENTS_MAXLEN)
    if job.state in TERMINAL:
        batch.expire(events, EVENTS_TTL_S)


def dead_letter(batch: Batch, keys: JobKeys, job: jobs_pb2.Job, reason: str) -> None:
    fields = {"job": job.id, "kind": str(job.kind), "attempts": str(job.attempts), "reason": reason}
    batch.xadd(keys.dead, fields, maxlen=DEAD_MAXLEN)
