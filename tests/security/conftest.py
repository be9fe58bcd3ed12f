"""Security fixtures: a tokens file with one client per role, and the four
real servers (inference+registry, data, training+jobs, compression+jobs)
built from their composition roots on free ports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import torch

from common.auth import hash_token
from common.grpcserver import ServiceHost
from common.settings import Settings
from services.compression import server as compression_server
from services.data import server as data_server
from services.inference import server as inference_server
from services.training import server as training_server

torch.set_num_threads(1)

TOKENS = {
    "reader": "tok-reader-1f0c",
    "submitter": "tok-submitter-9a7e",
    "other-submitter": "tok-submitter-b-77d2",
    "admin": "tok-admin-3b5d",
}
ROLE_OF = {"reader": "reader", "submitter": "submitter", "other-submitter": "submitter", "admin": "admin"}


def bearer(client: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[client]}")]


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    lines = ["# client tokens, hashed", *(f"{hash_token(t)} {ROLE_OF[c]} {c}" for c, t in TOKENS.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def auth_settings(settings: Settings, tokens_file: Path) -> Settings:
    return settings.replace(auth_tokens_file=str(tokens_file), max_upload_bytes=1024 * 1024)


@pytest.fixture
async def fleet(auth_settings: Settings, redis_client: redis.Redis) -> AsyncIterator[dict[str, str]]:
    """Full service name -> target of the server hosting it."""
    hosts: list[tuple[ServiceHost, tuple[str, ...]]] = [
        (
            await inference_server.build(auth_settings, poll_s=60.0),
            ("inference.GRPCInferenceService", "modelfleet.registry.v1.ModelRegistryService"),
        ),
        (await data_server.build(auth_settings), ("modelfleet.data.v1.DataService",)),
        (
            await training_server.build(auth_settings),
            ("modelfleet.training.v1.TrainingService", "modelfleet.jobs.v1.JobService"),
        ),
        (await compression_server.build(auth_settings), ("modelfleet.compression.v1.CompressionService",)),
    ]
    targets: dict[str, str] = {}
    try:
        for host, services in hosts:
            port = await host.start()
            await host.ready()
            targets.update({name: f"127.0.0.1:{port}" for name in services})
        yield targets
    finally:
        for host, _ in hosts:
            await host.stop(0)
