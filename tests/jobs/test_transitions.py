"""The compare-and-apply under every job transition, on real Redis: a guess is checked, a
wrong or incomplete guess is decided again on the real record, a changed record is never
written from a stale decision."""

from __future__ import annotations

import redis

from common.jobs.records import Batch, Fields, Guess, Transitions
from common.settings import Settings


def _key(settings: Settings) -> str:
    return f"{settings.redis_prefix}:job:t"


def test_a_right_guess_applies_without_reading(redis_client: redis.Redis, settings: Settings) -> None:
    key = _key(settings)
    redis_client.hset(key, mapping={"state": "1", "pb": "a"})
    seen: list[bytes] = []

    def change(batch: Batch, fields: Fields) -> None:
        seen.append(fields[b"pb"])
        batch.hset(key, {"pb": "b"})

    Transitions(redis_client).apply(key, change, Guess({b"state": b"1", b"pb": b"a"}))
    assert seen == [b"a"]
    assert redis_client.hget(key, "pb") == b"b"


def test_a_wrong_guess_is_decided_again_on_the_record(redis_client: redis.Redis, settings: Settings) -> None:
    key = _key(settings)
    redis_client.hset(key, mapping={"state": "2", "pb": "real"})
    seen: list[bytes] = []

    def change(batch: Batch, fields: Fields) -> None:
        seen.append(fields[b"state"])
        batch.hset(key, {"pb": b"from-" + fields[b"pb"]})
        batch.xadd(f"{key}:events", {"event": fields[b"state"]}, maxlen=10)

    Transitions(redis_client).apply(key, change, Guess({b"state": b"1", b"pb": b"stale"}))
    assert seen == [b"1", b"2"]
    assert redis_client.hget(key, "pb") == b"from-real"
    assert redis_client.xlen(f"{key}:events") == 1  # the stale decision wrote nothing


def test_a_guess_lacking_a_field_the_change_reads_falls_back_to_reading(
    redis_client: redis.Redis, settings: Settings
) -> None:
    key = _key(settings)
    redis_client.hset(key, mapping={"state": "2", "lease": "7"})

    def change(batch: Batch, fields: Fields) -> bytes:
        return fields.get(b"lease", b"0")

    assert Transitions(redis_client).apply(key, change, Guess({b"state": b"2"})) == b"7"


def test_a_missing_record_is_seen_as_empty(redis_client: redis.Redis, settings: Settings) -> None:
    key = _key(settings)

    def change(batch: Batch, fields: Fields) -> bool:
        if not fields:
            batch.hset(key, {"state": "1", "lease": 1.5})
        return not fields

    transitions = Transitions(redis_client)
    assert transitions.apply(key, change)
    assert not transitions.apply(key, change)
    assert redis_client.hgetall(key) == {b"state": b"1", b"lease": b"1.5"}
