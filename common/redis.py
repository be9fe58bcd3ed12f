"""Redis connections with retry and backoff, and the key naming scheme.

Every key and channel lives under ``<prefix>:`` (``Settings.redis_prefix``,
default ``mf``) so deployments and tests can share one Redis safely.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from common.errors import Unavailable

log = logging.getLogger(__name__)

_RETRY_ON = (RedisConnectionError, RedisTimeoutError, ConnectionResetError)


def _retry() -> Retry:
    # Roughly 10 s of retries: rides out a Redis restart or failover.
    return Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=12)


def _options(timeout_s: float | None) -> dict[str, Any]:
    """Client options: without ``timeout_s`` (workers, background loops) a client
    rides out a Redis restart (about 10 s of retries). With it (servers answering
    RPCs) every command succeeds or raises within about ``timeout_s``: sockets time
    out after a quarter of it and two quick retries follow, so a caller gets
    UNAVAILABLE in bounded time instead of waiting out a restart."""
    common: dict[str, Any] = {
        "retry_on_error": list(_RETRY_ON),
        "health_check_interval": 15,
        "socket_keepalive": True,
    }
    if timeout_s is None:
        return {**common, "retry": _retry(), "socket_connect_timeout": 5}
    step = timeout_s / 4
    return {
        **common,
        "retry": Retry(ExponentialBackoff(cap=step, base=0.05), retries=2),
        "socket_connect_timeout": step,
        "socket_timeout": step,
    }


def connect(url: str, timeout_s: float | None = None) -> redis.Redis:
    """A synchronous client that retries transient connection errors (see _options)."""
    return redis.Redis.from_url(url, **_options(timeout_s))


def connect_async(url: str) -> aioredis.Redis:
    """An asyncio client that retries transient connection errors."""
    return aioredis.Redis.from_url(url, **_options(None))


def wait_for_redis(client: redis.Redis, timeout_s: float = 10.0) -> None:
    """Block until Redis answers PING, or raise Unavailable naming the URL."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except _RETRY_ON as exc:
            if time.monotonic() >= deadline:
                kwargs = client.connection_pool.connection_kwargs
                where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
                raise Unavailable(f"Redis at {where} is unreachable: {exc}") from exc
            time.sleep(0.2)


class Keys:
    """Key templates under one prefix. Data model (all values JSON or protobuf bytes, never pickle):

    - ``<p>:model:<name>`` hash (aliases, canary, counters), ``<p>:model:<name>:v:<version>`` protobuf bytes
    - ``<p>:dataset:<name>`` hash, ``<p>:dataset:<name>:v:<version>`` protobuf bytes
    - ``<p>:job:<id>`` hash, ``<p>:jobs:stream:<priority>`` stream, ``<p>:job:<id>:events`` stream
    - ``<p>:events:models`` pub/sub channel
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))
