"""A compression job end to end: submitted over gRPC, run by a real worker
subprocess, registered with lineage and report, and served by the real
inference server with exactly the stored (int8) weights. A failed job
registers nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from common.api.modelfleet.compression.v1 import compression_pb2
from common.api.modelfleet.compression.v1 import compression_spec_pb2 as S
from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactStore
from common.jobs import JobQueue
from common.models.compressed import load_compressed
from common.models.loading import load_model
from common.registry import ModelRegistry
from common.settings import Settings
from services.inference.server import build as build_inference
from tests.compression.conftest import FEATURES, Source, Stubs

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)

pytestmark = pytest.mark.slow


@pytest.fixture
def worker(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        **settings.env(),
        "MODELFLEET_JOB_HEARTBEAT_S": "1",
        "MODELFLEET_JOB_VISIBILITY_TIMEOUT_S": "10",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "worker", "compression"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    yield proc
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


async def _wait_terminal(stubs: Stubs, job_id: str, timeout_s: float = 90.0) -> jobs_pb2.Job:
    deadline = time.monotonic() + timeout_s
    while True:
        job = (await stubs.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id))).job
        if job.state in TERMINAL:
            return job
        assert time.monotonic() < deadline, f"job stuck in {jobs_pb2.JobState.Name(job.state)}"
        await asyncio.sleep(0.1)


async def test_compression_job_registers_a_version_the_inference_server_serves(
    settings: Settings,
    stubs: Stubs,
    source: Source,
    registry: ModelRegistry,
    store: ArtifactStore,
    worker: subprocess.Popen[bytes],
) -> None:
    steps = [
        S.CompressionStep(structured_pruning=S.StructuredPruning(sparsity=0.5)),
        S.CompressionStep(magnitude_pruning=S.MagnitudePruning(sparsity=0.5, scope=S.PRUNING_SCOPE_GLOBAL)),
        S.CompressionStep(
            finetune=S.Finetune(epochs=6, learning_rate=0.02, batch_size=32, distillation_weight=0.1)
        ),
        S.CompressionStep(quantization=S.Quantization(method=S.QUANTIZATION_METHOD_INT8_DYNAMIC)),
    ]
    spec = S.CompressionSpec(source_model="clf", target_model="clf-small", steps=steps, seed=1)
    submitted = await stubs.compression.SubmitCompressionJob(
        compression_pb2.SubmitCompressionJobRequest(spec=spec)
    )
    job = await _wait_terminal(stubs, submitted.job.id)
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.last_error
    assert job.progress == pytest.approx(1.0)

    version = registry.get_version(job.result.model_name, job.result.model_version)
    assert (version.model_name, version.format) == ("clf-small", registry_pb2.MODEL_FORMAT_COMPRESSED)
    assert list(version.architecture.mlp.hidden_sizes) == [16, 8]
    lineage = version.lineage
    assert (lineage.source_model, lineage.source_version, lineage.job_id) == ("clf", "1", job.id)
    assert len(lineage.steps) == 4 and "structured" in lineage.steps[0]
    assert '"sourceModel": "clf"' in lineage.spec_json or '"sourceModel":"clf"' in lineage.spec_json
    report = version.compression_report
    assert report == job.compression_report
    assert report.source.parameters > report.compressed.parameters > report.compressed.nonzero_parameters
    assert report.compressed.bytes_on_disk == version.artifact_size_bytes < report.source.bytes_on_disk
    assert report.source.metric_name == report.compressed.metric_name == "accuracy"
    # The source is untrained; fine-tuning on separable blobs must beat it.
    assert report.compressed.metric_value > max(report.source.metric_value, 0.8)
    assert report.compressed.latency_batch1_ms > 0 and report.compressed.latency_batch32_ms > 0
    assert any("int8 dynamic" in note for note in report.notes)
    assert version.metrics["test_accuracy"] == report.compressed.metric_value

    # What the inference server answers is what the stored int8 module computes.
    stored = load_compressed(version, store.path(version.artifact_digest), torch.device("cpu"))
    runtime = load_model(version, store, torch.device("cpu")).module  # int8 GEMMs, not fp32 ones
    assert any(isinstance(m, DynamicLinear) for m in runtime.modules())
    x = np.random.default_rng(0).normal(size=(5, FEATURES)).astype(np.float32)
    with torch.no_grad():
        expected = stored(torch.from_numpy(x)).numpy()
        original = source.model(torch.from_numpy(x)).numpy()
    host = await build_inference(settings.replace(inference_models=("clf-small",)), poll_s=0.5)
    port = await host.start()
    await host.ready()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(
                model_name="clf-small",
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[5, FEATURES])
                ],
                raw_input_contents=[x.astype("<f4").tobytes()],
            )
            reply = await stub.ModelInfer(request)
    finally:
        await host.stop(grace=1.0)
    served = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(5, -1)
    np.testing.assert_array_equal(served, expected)
    assert not np.allclose(served, original)


async def test_a_failed_job_registers_nothing(
    settings: Settings,
    stubs: Stubs,
    source: Source,
    registry: ModelRegistry,
    redis_client: redis.Redis,
    worker: subprocess.Popen[bytes],
) -> None:
    # Queued behind the server's back (as if the spec had changed meaning): the
    # worker re-validates and fails it permanently.
    queue = JobQueue(redis_client, settings)
    bad = S.CompressionSpec(
        source_model="clf",
        steps=[S.CompressionStep(magnitude_pruning=S.MagnitudePruning(sparsity=1.5))],
    )
    job = queue.submit(jobs_pb2.Job(kind=jobs_pb2.JOB_KIND_COMPRESSION, compression=bad, max_attempts=1))
    done = await _wait_terminal(stubs, job.id)
    assert done.state == jobs_pb2.JOB_STATE_FAILED
    assert "steps[0].magnitude_pruning.sparsity" in done.last_error
    assert [v.version for v in registry.list_versions("clf")[0]] == ["1"]
