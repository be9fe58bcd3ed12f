"""A version that cannot load is not retried on every registry poll: the
replica backs off (doubling) and says why in RepositoryIndex; ModelReady is
false; an explicit RepositoryModelLoad still tries at once."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactStore
from common.registry import ModelRegistry
from common.settings import Settings
from tests.inference.conftest import mlp_arch, running

POLLS = 8  # registry polls (0.5 s each in `running`) watched for retries


def _register_broken(registry: ModelRegistry, store: ArtifactStore, name: str) -> None:
    ref = store.put_bytes(b"not safetensors at all" * 10)
    registry.register(
        registry_pb2.ModelVersion(
            model_name=name,
            format=registry_pb2.MODEL_FORMAT_SAFETENSORS,
            architecture=mlp_arch(),
            artifact_digest=ref.digest,
            artifact_size_bytes=ref.size,
        )
    )


async def test_failing_version_backs_off_and_reports_why(
    registry: ModelRegistry, store: ArtifactStore, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    _register_broken(registry, store, "broken")
    caplog.set_level(logging.WARNING, logger="services.inference.repository")
    async with running(settings) as server:
        await asyncio.sleep(POLLS * 0.5)
        failures = [r for r in caplog.records if r.getMessage() == "model load failed"]
        # Without backoff every poll retried (one failure per poll); the first
        # backoff (5 s) outlasts the window, so at most one retry can fit.
        assert 1 <= len(failures) <= 2, len(failures)
        index = await server.stub.RepositoryIndex(pb.RepositoryIndexRequest())
        entry = next(m for m in index.models if m.name == "broken")
        assert entry.state == "UNAVAILABLE"
        assert entry.version == "1"
        assert "not a loadable" in entry.reason, entry.reason
        ready = await server.stub.ModelReady(pb.ModelReadyRequest(name="broken"))
        assert not ready.ready
        before = len([r for r in caplog.records if r.getMessage() == "model load failed"])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await server.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        after = len([r for r in caplog.records if r.getMessage() == "model load failed"])
        assert after == before + 1  # tried at once, despite the backoff
