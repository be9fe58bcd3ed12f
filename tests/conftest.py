"""Shared fixtures: real Redis isolated by a per-test key prefix, a private
artifact root, and settings that bind servers to free loopback ports."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from common.artifacts import ArtifactStore
from common.redis import connect
from common.settings import Settings

REDIS_URL = os.environ.get("MODELFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _purge(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


def loopback_settings(prefix: str, artifact_root: Path, **overrides: Any) -> Settings:
    """Settings for servers on free loopback ports, under a fresh Redis key prefix."""
    return Settings.from_env(
        {},
        redis_url=REDIS_URL,
        redis_prefix=f"{prefix}{uuid.uuid4().hex[:10]}",
        artifact_root=artifact_root,
        host="127.0.0.1",
        inference_port=0,
        data_port=0,
        training_port=0,
        compression_port=0,
        metrics_port=0,
        log_format="text",
        device="cpu",
        shutdown_grace_s=2.0,
        **overrides,
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return loopback_settings("mft", tmp_path / "artifacts")


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    client = connect(settings.redis_url)
    _purge(client, settings.redis_prefix)
    yield client
    _purge(client, settings.redis_prefix)
    client.close()


@pytest.fixture
def store(settings: Settings) -> ArtifactStore:
    return ArtifactStore(settings.artifact_root)
