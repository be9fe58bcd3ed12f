"""Moving the production alias (and a canary) while clients hammer the model:
every request succeeds; a failed load keeps the old version serving."""

from __future__ import annotations

import asyncio
from collections import Counter, deque

import grpc
import numpy as np
import pytest

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactStore
from common.registry import ModelRegistry
from tests.inference.conftest import register_mlp

pytestmark = pytest.mark.timeout(90)

Tensor = pb.ModelInferRequest.InferInputTensor
REQUEST = pb.ModelInferRequest(
    model_name="m",
    inputs=[Tensor(name="input", datatype="FP32", shape=[1, 4])],
    raw_input_contents=[np.ones((1, 4), "<f4").tobytes()],
)


async def test_swap_under_load_fails_nothing(serve, registry: ModelRegistry, store: ArtifactStore) -> None:
    register_mlp(registry, store, "m", seed=1)
    async with serve(max_batch_size=4) as srv:
        seen: Counter[str] = Counter()
        failures: list[BaseException] = []
        recent: deque[str] = deque(maxlen=100)
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                try:
                    version = (await srv.stub.ModelInfer(REQUEST)).model_version
                    seen[version] += 1
                    recent.append(version)
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc)

        async def wait_for(predicate, what: str) -> None:
            for _ in range(600):  # bounded: 60 s at most
                if predicate():
                    return
                await asyncio.sleep(0.1)
            raise AssertionError(f"timed out waiting for {what}")

        clients = [asyncio.create_task(client()) for _ in range(6)]
        await wait_for(lambda: seen["1"] > 20, "traffic on version 1")
        register_mlp(registry, store, "m", seed=2)  # v2 becomes latest: the default moves
        await wait_for(lambda: seen["2"] > 20, "the swap to version 2")
        register_mlp(registry, store, "m", seed=3)
        registry.set_alias("m", "production", "2")  # pin production to v2, then canary v3
        registry.set_canary("m", "3", 0.5)
        await wait_for(lambda: seen["3"] > 20, "canary traffic on version 3")
        registry.end_canary("m", promote=True)
        await wait_for(lambda: len(recent) == 100 and set(recent) == {"3"}, "the promotion to version 3")
        stop.set()
        await asyncio.gather(*clients)
        assert failures == []
        stats = (await srv.stub.ModelStatistics(pb.ModelStatisticsRequest(name="m"))).model_stats
        assert [s.version for s in stats] == ["3"]


async def test_failed_reload_keeps_old_version(serve, registry: ModelRegistry, store: ArtifactStore) -> None:
    good, _ = register_mlp(registry, store, "m")
    async with serve() as srv:
        broken = registry_pb2.ModelVersion()
        broken.CopyFrom(good)
        ref = store.put_bytes(b"not safetensors at all" * 10)
        broken.artifact_digest, broken.artifact_size_bytes = ref.digest, ref.size
        registry.register(broken)
        registry.set_alias("m", "production", "2")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await srv.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "version '2'" in (info.value.details() or "")
        assert (await srv.stub.ModelInfer(REQUEST)).model_version == "1"
        index = await srv.stub.RepositoryIndex(pb.RepositoryIndexRequest())
        # Version 1 serves; version 2 is listed with why it is not.
        assert [(m.name, m.version, m.state) for m in index.models] == [
            ("m", "1", "READY"),
            ("m", "2", "UNAVAILABLE"),
        ]
        assert "not a loadable" in index.models[1].reason
