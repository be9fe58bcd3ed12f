"""The model registry in Redis: models, immutable versions, aliases and canaries.

Data model (under ``<p>`` = the Redis prefix; see docs/internals.md):

- ``<p>:model:<name>`` hash: ``latest`` (version counter, HINCRBY), ``created_at``,
  ``updated_at`` (RFC 3339), ``alias:<alias>`` -> version, ``canary_version``,
  ``canary_fraction``.
- ``<p>:model:<name>:v:<n>`` string: ``registry_pb2.ModelVersion`` bytes.
- ``<p>:model:<name>:versions`` sorted set of live version numbers (score = number),
  so listing and "latest" skip deleted versions.
- ``<p>:model:<name>:alias_history:<alias>`` list, newest first, of the versions
  an alias pointed at before each move (for rollback).
- ``<p>:model:<name>:jobs`` hash: job id -> the version that job registered
  (a job registers at most one version, however often it is retried).
- ``<p>:models`` sorted set of names (all scores 0, ordered by name).
- ``<p>:events:models`` pub/sub channel, one JSON event per change, published in
  the same MULTI as the change so no change goes unannounced.

Version numbers come from HINCRBY, so concurrent registrations never collide;
alias, canary and delete operations are check-and-set under WATCH.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from google.protobuf.timestamp_pb2 import Timestamp

from common.api.modelfleet.registry.v1 import registry_pb2
from common.errors import FailedPrecondition, InvalidArgument, NotFound
from common.names import validate_alias, validate_name
from common.redis import Keys

log = logging.getLogger(__name__)

PRODUCTION = "production"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Rollback depth kept per alias.
HISTORY_LIMIT = 100

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_NUMBER = re.compile(r"^[0-9]{1,18}$")  # fits int64; longer digit runs are not version numbers
_ALIAS_FIELD = "alias:"
# Metrics where lower is better: a rise counts as a drop (see PromotionGuard).
_LOWER_IS_BETTER = ("loss", "mse", "mae")


@dataclass(frozen=True)
class Routing:
    """What an inference replica needs to route default-version requests."""

    default_version: str  # production alias if set, else latest ("" if the model has no versions)
    canary_version: str  # "" when no canary
    canary_fraction: float  # 0.0 when no canary


class ModelRegistry:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._r = client
        self._keys = Keys(prefix)
        self.channel = self._keys("events", "models")

    # --- keys

    def _model_key(self, name: str) -> str:
        return self._keys("model", name)

    def _version_key(self, name: str, version: str) -> str:
        return self._keys("model", name, "v", version)

    def _versions_key(self, name: str) -> str:
        return self._keys("model", name, "versions")

    def _jobs_key(self, name: str) -> str:
        return self._keys("model", name, "jobs")

    def _history_key(self, name: str, alias: str) -> str:
        return self._keys("model", name, "alias_history", alias)

    # --- writes

    def register(self, version: registry_pb2.ModelVersion) -> registry_pb2.ModelVersion:
        """Store a new version; the registry assigns ``version`` and ``created_at``."""
        name = validate_name(version.model_name, "model_name")
        if version.format == registry_pb2.MODEL_FORMAT_UNSPECIFIED:
            raise InvalidArgument(f"format of model {name!r} is required")
        if not _DIGEST.match(version.artifact_digest):
            raise InvalidArgument(f"artifact_digest {version.artifact_digest!r} is not a sha256 hex digest")
        job_id = version.lineage.job_id
        registered: list[str] = []

        def change(pipe: Any) -> None:
            # A job registers at most one version: an attempt rerun after its worker was lost
            # between registering and recording success (or a hung worker that wakes up after
            # the rerun) gets the version already there. WATCH on the job index makes the
            # check and the write one step; commands before multi() run at once.
            if job_id:
                existing = pipe.hget(self._jobs_key(name), job_id)
                if existing is not None and pipe.exists(self._version_key(name, _text(existing))):
                    registered.append(_text(existing))
                    return
            # Readers use the versions set, so a reserved number becomes visible only together
            # with its bytes (a number reserved by an aborted try stays unused).
            number = int(pipe.hincrby(self._model_key(name), "latest", 1))
            stored.version = str(number)
            stored.created_at.GetCurrentTime()
            now = stored.created_at.ToJsonString()
            pipe.multi()
            pipe.set(self._version_key(name, stored.version), stored.SerializeToString())
            pipe.zadd(self._versions_key(name), {stored.version: number})
            pipe.zadd(self._keys("models"), {name: 0})
            pipe.hsetnx(self._model_key(name), "created_at", now)
            pipe.hset(self._model_key(name), "updated_at", now)
            if job_id:
                pipe.hset(self._jobs_key(name), job_id, stored.version)
            self._publish(pipe, "version_registered", name, stored.version)

        stored = registry_pb2.ModelVersion()
        stored.CopyFrom(version)
        del stored.aliases[:]  # derived from the model hash on every read
        self._r.transaction(change, self._jobs_key(name))
        if registered:
            log.info(
                "job already registered a version of this model",
                extra={"model": name, "version": registered[0], "job_id": job_id},
            )
            return self.get_version(name, registered[0])
        log.info("model version registered", extra={"model": name, "version": stored.version})
        return stored

    def set_alias(
        self, name: str, alias: str, version: str, guard: registry_pb2.PromotionGuard | None = None
    ) -> registry_pb2.Model:
        validate_name(name, "model name")
        validate_alias(alias)
        number = _version_number(version)

        def change(pipe: Any) -> None:
            self._require_model(pipe, name)
            fields = _decode_hash(pipe.hgetall(self._model_key(name)))
            candidate = self._version_in(pipe, name, number)
            current = fields.get(_ALIAS_FIELD + alias, "")
            if guard is not None:
                _check_guard(guard, alias, candidate, self._target_in(pipe, name, current, number))
            pipe.multi()
            self._write_alias(pipe, name, alias, number, current)

        self._transact(change, name)
        log.info("alias set", extra={"model": name, "alias": alias, "version": number})
        return self.get_model(name)

    def rollback_alias(self, name: str, alias: str) -> registry_pb2.Model:
        """Point ``alias`` at the version it had before its last move (skipping
        versions deleted since); repeated rollbacks walk further back."""
        validate_name(name, "model name")
        validate_alias(alias)
        history = self._history_key(name, alias)
        target: list[str] = []

        def change(pipe: Any) -> None:
            self._require_model(pipe, name)
            if not pipe.hexists(self._model_key(name), _ALIAS_FIELD + alias):
                raise NotFound(f"alias {alias!r} of model {name!r} is not set")
            previous = [_text(v) for v in pipe.lrange(history, 0, -1)]
            versions = self._versions_key(name)
            used = next((i for i, v in enumerate(previous) if pipe.zscore(versions, v) is not None), None)
            if used is None:
                raise FailedPrecondition(
                    f"alias {alias!r} of model {name!r} has no earlier version to roll back to"
                )
            target[:] = [previous[used]]
            pipe.multi()
            pipe.ltrim(history, used + 1, -1)
            pipe.hset(
                self._model_key(name), mapping={_ALIAS_FIELD + alias: previous[used], "updated_at": _now()}
            )
            self._publish(pipe, "alias_rolled_back", name, previous[used], alias)

        self._transact(change, name, history)
        log.info("alias rolled back", extra={"model": name, "alias": alias, "version": target[0]})
        return self.get_model(name)

    def set_canary(self, name: str, version: str, fraction: float) -> registry_pb2.Model:
        validate_name(name, "model name")
        number = _version_number(version)
        if not (math.isfinite(fraction) and 0.0 < fraction < 1.0):
            raise InvalidArgument(f"canary fraction must be in (0, 1), got {fraction}")

        def change(pipe: Any) -> None:
            self._require_model(pipe, name)
            self._version_in(pipe, name, number)
            default = self._routing_in(pipe, name).default_version
            if number == default:
                raise InvalidArgument(
                    f"canary version {number} of model {name!r} is already its default version"
                )
            pipe.multi()
            pipe.hset(
                self._model_key(name),
                mapping={"canary_version": number, "canary_fraction": repr(fraction), "updated_at": _now()},
            )
            self._publish(pipe, "canary_set", name, number)

        self._transact(change, name)
        log.info("canary set", extra={"model": name, "version": number, "fraction": fraction})
        return self.get_model(name)

    def end_canary(
        self, name: str, promote: bool = False, guard: registry_pb2.PromotionGuard | None = None
    ) -> registry_pb2.Model:
        """Stop the canary; with ``promote`` its version first becomes production
        (subject to ``guard``), in the same transaction."""
        validate_name(name, "model name")

        def change(pipe: Any) -> None:
            self._require_model(pipe, name)
            fields = _decode_hash(pipe.hgetall(self._model_key(name)))
            canary = fields.get("canary_version", "")
            if not canary:
                raise FailedPrecondition(f"model {name!r} has no canary")
            current = fields.get(_ALIAS_FIELD + PRODUCTION, "")
            if promote:
                candidate = self._version_in(pipe, name, canary)
                if guard is not None:
                    _check_guard(guard, PRODUCTION, candidate, self._target_in(pipe, name, current, canary))
            pipe.multi()
            if promote:
                self._write_alias(pipe, name, PRODUCTION, canary, current)
            pipe.hdel(self._model_key(name), "canary_version", "canary_fraction")
            pipe.hset(self._model_key(name), "updated_at", _now())
            self._publish(pipe, "canary_ended", name, canary)

        self._transact(change, name)
        log.info("canary ended", extra={"model": name, "promoted": promote})
        return self.get_model(name)

    def delete_version(self, name: str, version: str) -> None:
        """Delete a version no alias or canary points at. Its artifact stays in
        the store (other versions or datasets may share the bytes)."""
        validate_name(name, "model name")
        number = _version_number(version)

        def change(pipe: Any) -> None:
            self._require_model(pipe, name)
            self._version_in(pipe, name, number)
            fields = _decode_hash(pipe.hgetall(self._model_key(name)))
            for key, value in fields.items():
                if key.startswith(_ALIAS_FIELD) and value == number:
                    raise FailedPrecondition(
                        f"version {number} of model {name!r} is the target of alias "
                        f"{key[len(_ALIAS_FIELD) :]!r}; move the alias first"
                    )
            if fields.get("canary_version") == number:
                raise FailedPrecondition(
                    f"version {number} of model {name!r} is its canary; end the canary first"
                )
            pipe.multi()
            pipe.delete(self._version_key(name, number))
            pipe.zrem(self._versions_key(name), number)
            pipe.hset(self._model_key(name), "updated_at", _now())
            self._publish(pipe, "version_deleted", name, number)

        self._transact(change, name, self._version_key(name, number))
        log.info("model version deleted", extra={"model": name, "version": number})

    # --- reads

    def get_model(self, name: str) -> registry_pb2.Model:
        validate_name(name, "model name")
        pipe = self._r.pipeline(transaction=True)
        pipe.hgetall(self._model_key(name))
        pipe.zrevrange(self._versions_key(name), 0, 0)
        pipe.zcard(self._versions_key(name))
        fields, newest, count = pipe.execute()
        if not fields:
            raise NotFound(f"model {name!r} not found")
        return _model(name, _decode_hash(fields), newest, count)

    def list_models(
        self, name_prefix: str = "", page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> tuple[list[registry_pb2.Model], str]:
        """Models ordered by name; ``next_page_token`` is "" on the last page."""
        size = _page_size(page_size)
        low = "[" + name_prefix if name_prefix else "-"
        after = _decode_token(page_token, "models")
        if after is not None and after >= name_prefix:
            low = "(" + after
        high = "[" + name_prefix + "\xff" if name_prefix else "+"
        found = self._r.zrangebylex(self._keys("models"), low, high, start=0, num=size + 1)
        names = [_text(n) for n in found]
        page, more = names[:size], len(names) > size
        pipe = self._r.pipeline(transaction=True)
        for name in page:
            pipe.hgetall(self._model_key(name))
            pipe.zrevrange(self._versions_key(name), 0, 0)
            pipe.zcard(self._versions_key(name))
        results = pipe.execute()
        models = [
            _model(name, _decode_hash(results[3 * i]), results[3 * i + 1], results[3 * i + 2])
            for i, name in enumerate(page)
        ]
        return models, _encode_token("models", page[-1]) if more else ""

    def resolve(self, name: str, ref: str = "") -> str:
        """A version number for ``ref``: "" -> production alias, else latest;
        digits -> that version; anything else -> that alias."""
        validate_name(name, "model name")
        pipe = self._r.pipeline(transaction=True)
        pipe.hgetall(self._model_key(name))
        pipe.zrevrange(self._versions_key(name), 0, 0)
        fields_raw, newest = pipe.execute()
        if not fields_raw:
            raise NotFound(f"model {name!r} not found")
        fields = _decode_hash(fields_raw)
        if not ref:
            default = _routing(fields, newest).default_version
            if not default:
                raise NotFound(f"model {name!r} has no versions")
            return default
        if _NUMBER.match(ref):
            number = str(int(ref))
            if self._r.zscore(self._versions_key(name), number) is None:
                raise NotFound(f"version {ref} of model {name!r} not found")
            return number
        validate_alias(ref, "version or alias")
        target = fields.get(_ALIAS_FIELD + ref)
        if target is None:
            raise NotFound(f"alias {ref!r} of model {name!r} is not set")
        return target

    def get_version(self, name: str, ref: str = "") -> registry_pb2.ModelVersion:
        """A version by number or alias, with ``aliases`` filled in."""
        number = self.resolve(name, ref)
        pipe = self._r.pipeline(transaction=True)
        pipe.get(self._version_key(name, number))
        pipe.hgetall(self._model_key(name))
        data, fields = pipe.execute()
        if data is None:  # deleted between resolve and read
            raise NotFound(f"version {number} of model {name!r} not found")
        return _version(data, _aliases_by_version(_decode_hash(fields)))

    def list_versions(
        self, name: str, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> tuple[list[registry_pb2.ModelVersion], str]:
        """Versions newest first; ``next_page_token`` is "" on the last page."""
        validate_name(name, "model name")
        size = _page_size(page_size)
        after = _decode_token(page_token, "versions")
        if after is not None and not _NUMBER.match(after):
            raise InvalidArgument("page_token is invalid")
        high = f"({after}" if after is not None else "+inf"
        if not self._r.exists(self._model_key(name)):
            raise NotFound(f"model {name!r} not found")
        found = self._r.zrevrangebyscore(self._versions_key(name), high, "-inf", start=0, num=size + 1)
        numbers = [_text(n) for n in found]
        page, more = numbers[:size], len(numbers) > size
        pipe = self._r.pipeline(transaction=True)
        for number in page:
            pipe.get(self._version_key(name, number))
        pipe.hgetall(self._model_key(name))
        *blobs, fields = pipe.execute()
        aliases = _aliases_by_version(_decode_hash(fields))
        versions = [_version(data, aliases) for data in blobs if data is not None]
        return versions, _encode_token("versions", page[-1]) if more else ""

    def routing(self, name: str) -> Routing:
        validate_name(name, "model name")
        pipe = self._r.pipeline(transaction=True)
        pipe.hgetall(self._model_key(name))
        pipe.zrevrange(self._versions_key(name), 0, 0)
        fields, newest = pipe.execute()
        if not fields:
            raise NotFound(f"model {name!r} not found")
        return _routing(_decode_hash(fields), newest)

    # --- helpers

    def _transact(self, change: Callable[[Any], None], name: str, *more_keys: str) -> None:
        """Run ``change`` under WATCH of the model hash, its version set and
        ``more_keys``; redis-py retries it when a watched key changes."""
        self._r.transaction(change, self._model_key(name), self._versions_key(name), *more_keys)

    def _require_model(self, pipe: Any, name: str) -> None:
        if not pipe.exists(self._model_key(name)):
            raise NotFound(f"model {name!r} not found")

    def _version_in(self, pipe: Any, name: str, number: str) -> registry_pb2.ModelVersion:
        data = pipe.get(self._version_key(name, number))
        if data is None:
            raise NotFound(f"version {number} of model {name!r} not found")
        version = registry_pb2.ModelVersion()
        version.ParseFromString(data)
        return version

    def _target_in(
        self, pipe: Any, name: str, current: str, candidate: str
    ) -> registry_pb2.ModelVersion | None:
        """The alias's current target to guard against; None when the alias is
        unset or already on the candidate (nothing to compare with)."""
        if not current or current == candidate:
            return None
        return self._version_in(pipe, name, current)

    def _routing_in(self, pipe: Any, name: str) -> Routing:
        fields = _decode_hash(pipe.hgetall(self._model_key(name)))
        return _routing(fields, pipe.zrevrange(self._versions_key(name), 0, 0))

    def _write_alias(self, pipe: Any, name: str, alias: str, number: str, current: str) -> None:
        """Queue the alias move (inside MULTI), remembering the old target for rollback."""
        if current and current != number:
            history = self._history_key(name, alias)
            pipe.lpush(history, current)
            pipe.ltrim(history, 0, HISTORY_LIMIT - 1)
        pipe.hset(self._model_key(name), mapping={_ALIAS_FIELD + alias: number, "updated_at": _now()})
        self._publish(pipe, "alias_set", name, number, alias)

    def _publish(self, pipe: Any, kind: str, name: str, version: str, alias: str = "") -> None:
        event = {"type": kind, "name": name, "version": version, "alias": alias}
        pipe.publish(self.channel, json.dumps(event))


def _now() -> str:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts.ToJsonString()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode_hash(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _version_number(version: str) -> str:
    if not _NUMBER.match(version) or int(version) == 0:
        raise InvalidArgument(f"version {version!r} is not a version number (1, 2, ...)")
    return str(int(version))


def _page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument(f"page_size must not be negative, got {page_size}")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _encode_token(kind: str, last: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"k": kind, "after": last}).encode()).decode()


def _decode_token(token: str, kind: str) -> str | None:
    """The last item of the previous page, or None for the first page."""
    if not token:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (binascii.Error, ValueError, UnicodeError):
        raise InvalidArgument("page_token is invalid") from None
    if not isinstance(payload, dict) or payload.get("k") != kind or not isinstance(payload.get("after"), str):
        raise InvalidArgument("page_token is invalid")
    after: str = payload["after"]
    return after


def _routing(fields: dict[str, str], newest: list[bytes]) -> Routing:
    default = fields.get(_ALIAS_FIELD + PRODUCTION) or (_text(newest[0]) if newest else "")
    canary = fields.get("canary_version", "")
    # A canary that became the default (e.g. production moved onto it) routes nothing extra.
    if not canary or canary == default:
        return Routing(default, "", 0.0)
    return Routing(default, canary, float(fields.get("canary_fraction", "0")))


def _model(name: str, fields: dict[str, str], newest: list[bytes], count: int) -> registry_pb2.Model:
    model = registry_pb2.Model(name=name, version_count=count)
    model.latest_version = _text(newest[0]) if newest else ""
    for key, value in fields.items():
        if key.startswith(_ALIAS_FIELD):
            model.aliases[key[len(_ALIAS_FIELD) :]] = value
    if fields.get("canary_version"):
        model.canary.version = fields["canary_version"]
        model.canary.fraction = float(fields.get("canary_fraction", "0"))
    if "created_at" in fields:
        model.created_at.FromJsonString(fields["created_at"])
    if "updated_at" in fields:
        model.updated_at.FromJsonString(fields["updated_at"])
    return model


def _aliases_by_version(fields: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in sorted(fields.items()):
        if key.startswith(_ALIAS_FIELD):
            out.setdefault(value, []).append(key[len(_ALIAS_FIELD) :])
    return out


def _version(data: bytes, aliases: dict[str, list[str]]) -> registry_pb2.ModelVersion:
    version = registry_pb2.ModelVersion()
    version.ParseFromString(data)
    version.aliases.extend(aliases.get(version.version, []))
    return version


def _validate_guard(guard: registry_pb2.PromotionGuard) -> None:
    if not guard.metric:
        raise InvalidArgument("guard.metric is required")
    if not math.isfinite(guard.max_drop):
        raise InvalidArgument(f"guard.max_drop must be a finite number, got {guard.max_drop}")


def _check_guard(
    guard: registry_pb2.PromotionGuard,
    alias: str,
    candidate: registry_pb2.ModelVersion,
    current: registry_pb2.ModelVersion | None,
) -> None:
    """FAILED_PRECONDITION unless the candidate has the metric and it is within
    ``max_drop`` of the alias's current target (if any); both values go into the message."""
    _validate_guard(guard)
    metric = guard.metric
    new = candidate.metrics.get(metric)
    if current is None:
        if new is None:
            raise FailedPrecondition(
                f"promoting version {candidate.version} to {alias!r}: metric {metric!r} is missing"
            )
        return
    old = current.metrics.get(metric)
    subject = f"promoting version {candidate.version} to {alias!r} (now version {current.version})"
    if new is None or old is None:
        raise FailedPrecondition(
            f"{subject}: metric {metric!r} is missing "
            f"(candidate: {_show(new)}, current: {_show(old)}); the guard cannot compare"
        )
    drop = new - old if metric.lower().endswith(_LOWER_IS_BETTER) else old - new
    if drop > guard.max_drop:
        raise FailedPrecondition(
            f"{subject}: {metric} would go from {old:g} to {new:g}, "
            f"a drop of {drop:g} above the allowed {guard.max_drop:g}"
        )


def _show(value: float | None) -> str:
    return "missing" if value is None else f"{value:g}"


__all__ = ["PRODUCTION", "ModelRegistry", "Routing"]
