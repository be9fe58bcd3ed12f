"""Dynamic batching: batches form under concurrency (checked on the statistics),
priority order, timeouts and cancellation drop work before it runs, bounded queue."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
import torch

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactStore
from common.errors import DeadlineExceeded, ResourceExhausted
from common.models.loading import LoadedModel
from common.registry import ModelRegistry
from services.inference.batcher import Batcher
from services.inference.codec import Signature
from services.inference.stats import VersionStats
from tests.inference.conftest import register_file, register_mlp

pytestmark = pytest.mark.timeout(60)

Tensor = pb.ModelInferRequest.InferInputTensor


def one_row(value: float, **params: pb.InferParameter) -> pb.ModelInferRequest:
    x = np.full((1, 4), value, dtype="<f4")
    return pb.ModelInferRequest(
        model_name="m",
        inputs=[Tensor(name="input", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[x.tobytes()],
        parameters=params,
    )


async def test_concurrent_requests_form_one_batch(
    serve, registry: ModelRegistry, store: ArtifactStore
) -> None:
    register_mlp(registry, store, "m")
    # A long delay makes the idle model wait until the batch is full: the batch
    # size is then fixed by the count of requests, not by timing.
    async with serve(max_batch_size=8, max_queue_delay_us=60_000_000) as srv:
        responses = await asyncio.gather(*(srv.stub.ModelInfer(one_row(i)) for i in range(8)))
        assert len(responses) == 8
        stats = (
            await srv.stub.ModelStatistics(pb.ModelStatisticsRequest(name="m", version="1"))
        ).model_stats[0]
        assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(8, 1)]
        assert stats.execution_count == 1 and stats.inference_count == 8
        assert stats.inference_stats.success.count == 8
        assert stats.inference_stats.compute_infer.count == 8


async def test_queue_full_is_resource_exhausted(serve, registry: ModelRegistry, store: ArtifactStore) -> None:
    register_mlp(registry, store, "m")
    async with serve(max_batch_size=16, max_queue_delay_us=60_000_000, max_queue_size=3) as srv:
        # Five at once into a queue of three: exactly two bounce, three wait for the batch.
        calls = [asyncio.ensure_future(srv.stub.ModelInfer(one_row(i))) for i in range(5)]
        done: set[asyncio.Future] = set()
        pending = set(calls)
        while len(done) < 2:
            finished, pending = await asyncio.wait(pending, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            assert finished, "rejections did not arrive"
            done |= finished
        assert len(done) == 2
        for call in done:
            exc = call.exception()
            assert isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "full" in (exc.details() or "")
        for call in pending:
            call.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _recording_batcher(
    loop: asyncio.AbstractEventLoop, seen: list[float], *, delay_us: int = 0, pass_s: float = 0.0
) -> Batcher:
    class Record(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.extend(x[:, 0].tolist())
            if pass_s:
                time.sleep(pass_s)
            return x

    spec = model_pb2.TensorSpec(name="input", datatype="FP32", shape=[-1, 4])
    out = model_pb2.TensorSpec(name="output", datatype="FP32", shape=[-1, 4])
    model = LoadedModel(Record(), [spec], [out], torch.device("cpu"))
    return Batcher(
        "rec",
        "1",
        model,
        Signature("rec", [spec], [out]),
        VersionStats("rec", "1"),
        max_batch_size=1,
        max_queue_delay_us=delay_us,
        max_queue_size=100,
        loop=loop,
    )


async def test_priority_timeout_and_cancellation() -> None:
    seen: list[float] = []
    batcher = _recording_batcher(asyncio.get_running_loop(), seen)

    def submit(value: float, priority: int = 0, deadline_ns: int = 0) -> asyncio.Future:
        return batcher.submit([np.full((1, 4), value, np.float32)], 1, None, priority, deadline_ns)

    # Queued before the thread starts, so the order below is decided by the queue alone.
    low = submit(1.0, priority=0)
    high = submit(2.0, priority=5)
    expired = submit(3.0, deadline_ns=time.perf_counter_ns())
    cancelled = submit(4.0, priority=9)
    cancelled.cancel()
    mid = submit(5.0, priority=1)
    batcher.start()
    await asyncio.wait_for(asyncio.gather(low, high, mid), timeout=30)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(expired, timeout=30)
    assert seen == [2.0, 5.0, 1.0]  # highest priority first; expired and cancelled never ran
    stats = batcher.stats.proto()
    assert stats.inference_stats.success.count == 3
    assert stats.inference_stats.fail.count == 2
    batcher.close()
    await batcher.join(10)
    with pytest.raises(Exception, match="unloading"):
        submit(6.0)


async def _answered_in_submit(batcher: Batcher, value: float, tries: int = 50) -> bool:
    """Whether, once the model has gone idle, a request is answered before submit returns."""
    for _ in range(tries):
        future = batcher.submit([np.full((1, 4), value, np.float32)], 1, None, 0, 0)
        if future.done():
            return True
        await asyncio.wait_for(future, timeout=30)
        await asyncio.sleep(0.01)  # let the model thread finish its bookkeeping
    return False


@pytest.mark.parametrize(
    ("delay_us", "pass_s", "inline"),
    [(0, 0.0, True), (0, 0.002, False), (1_000, 0.0, False)],
    ids=["fast-idle-model", "slow-model", "batching-delay"],
)
async def test_fast_idle_model_runs_on_the_event_loop(delay_us: int, pass_s: float, inline: bool) -> None:
    seen: list[float] = []
    batcher = _recording_batcher(asyncio.get_running_loop(), seen, delay_us=delay_us, pass_s=pass_s)
    batcher.start()
    try:
        # The first pass goes to the model thread: its duration is not known yet.
        first = batcher.submit([np.full((1, 4), 1.0, np.float32)], 1, None, 0, 0)
        assert not first.done()
        await asyncio.wait_for(first, timeout=30)
        assert await _answered_in_submit(batcher, 2.0, tries=50 if inline else 5) is inline
        assert seen[0] == 1.0 and seen[-1] == 2.0
        stats = batcher.stats.proto()
        assert stats.inference_stats.success.count == len(seen)
        # More rows than the last pass had: its duration is not known, so the model thread runs it.
        wide = batcher.submit([np.full((3, 4), 3.0, np.float32)], 3, None, 0, 0)
        assert not wide.done()
        await asyncio.wait_for(wide, timeout=30)
    finally:
        batcher.close()
        await batcher.join(10)


async def test_model_thread_survives_an_error_outside_the_forward_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[float] = []
    batcher = _recording_batcher(asyncio.get_running_loop(), seen, pass_s=0.002)
    record = batcher.stats.record_batch
    calls = 0

    def flaky(timing: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("statistics bug")
        record(timing)  # type: ignore[arg-type]

    monkeypatch.setattr(batcher.stats, "record_batch", flaky)
    batcher.start()
    try:
        for value in (1.0, 2.0):  # the first pass's bookkeeping fails; the second still runs
            future = batcher.submit([np.full((1, 4), value, np.float32)], 1, None, 0, 0)
            await asyncio.wait_for(future, timeout=30)
        assert seen == [1.0, 2.0]  # the model thread ran the second pass
    finally:
        batcher.close()
        await batcher.join(10)


async def test_bounded_queue_in_process() -> None:
    batcher = _recording_batcher(asyncio.get_running_loop(), [])
    futures = [batcher.submit([np.zeros((1, 4), np.float32)], 1, None, 0, 0) for _ in range(100)]
    with pytest.raises(ResourceExhausted):
        batcher.submit([np.zeros((1, 4), np.float32)], 1, None, 0, 0)
    batcher.start()
    await asyncio.wait_for(asyncio.gather(*futures), timeout=30)
    batcher.close()
    await batcher.join(10)


async def test_timeout_parameter_over_grpc(serve, registry: ModelRegistry, store: ArtifactStore) -> None:
    register_mlp(registry, store, "m")
    async with serve(max_batch_size=4, max_queue_delay_us=60_000_000) as srv:
        # One microsecond: expired by the time the four queued rows are taken as a batch.
        call = srv.stub.ModelInfer(one_row(1.0, timeout=pb.InferParameter(int64_param=1)))
        fill = [srv.stub.ModelInfer(one_row(float(i))) for i in range(3)]
        results = await asyncio.gather(call, *fill, return_exceptions=True)
        assert isinstance(results[0], grpc.aio.AioRpcError)
        assert results[0].code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert all(isinstance(r, pb.ModelInferResponse) for r in results[1:])


async def test_a_request_the_model_rejects_fails_alone(
    serve, registry: ModelRegistry, store: ArtifactStore, tmp_path
) -> None:
    """A poison request batched with good ones: the good ones are answered, the
    bad one gets INVALID_ARGUMENT naming the model's error (was INTERNAL for all)."""
    torch.manual_seed(0)
    embed = torch.nn.Embedding(10, 4).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(
        embed, (torch.zeros(2, 3, dtype=torch.int64),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(tmp_path / "embed.pt2"))
    register_file(
        registry,
        store,
        "m",
        tmp_path / "embed.pt2",
        registry_pb2.MODEL_FORMAT_TORCH_EXPORT,
        [model_pb2.TensorSpec(name="tokens", datatype="INT64", shape=[-1, 3])],
        [model_pb2.TensorSpec(name="vectors", datatype="FP32", shape=[-1, 3, 4])],
    )

    def tokens(ids: list[int]) -> pb.ModelInferRequest:
        return pb.ModelInferRequest(
            model_name="m",
            inputs=[Tensor(name="tokens", datatype="INT64", shape=[1, 3])],
            raw_input_contents=[np.array([ids], dtype="<i8").tobytes()],
        )

    good = [[1, 2, 3], [0, 0, 9], [4, 5, 6]]
    async with serve(max_batch_size=4, max_queue_delay_us=60_000_000) as srv:
        calls = [srv.stub.ModelInfer(tokens(ids)) for ids in good[:2]]
        calls.append(srv.stub.ModelInfer(tokens([1, 99, 2])))  # 99 is past the vocabulary
        calls.append(srv.stub.ModelInfer(tokens(good[2])))
        results = await asyncio.gather(*calls, return_exceptions=True)
        stats = (
            await srv.stub.ModelStatistics(pb.ModelStatisticsRequest(name="m", version="1"))
        ).model_stats[0]
    poison = results.pop(2)
    assert isinstance(poison, grpc.aio.AioRpcError)
    assert poison.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot run this input" in (poison.details() or "") and "index" in (poison.details() or "")
    for ids, response in zip(good, results, strict=True):
        assert isinstance(response, pb.ModelInferResponse), response
        got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(1, 3, 4)
        with torch.no_grad():
            np.testing.assert_array_equal(got, embed(torch.tensor([ids])).numpy())
    # The four arrived as one batch; it failed and was rerun request by request.
    assert stats.inference_stats.success.count == 3 and stats.inference_stats.fail.count == 1
