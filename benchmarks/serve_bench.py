"""Load generator for the inference service.

Starts a real ``modelfleet serve inference`` subprocess (own Redis prefix and
artifact root), registers the ``tiny`` (Linear 1000->100->1) and ``medium``
(1024-4096-4096-10) MLPs, drives each with batch-1 raw FP32 requests from N
concurrent grpc.aio callers, and prints requests/s, p50/p99 latency and the
ratio to the in-process torch ceiling measured in the same run at the batch size
the batcher reached (from ModelStatistics).

    python benchmarks/serve_bench.py [--seconds 10] [--concurrency 1 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactStore
from common.models.loading import save_mlp
from common.models.mlp import build_model
from common.redis import connect
from common.registry import ModelRegistry
from common.settings import Settings
from services.cli.serve import run_loop

MODELS = {"tiny": (1000, (100,), 1), "medium": (1024, (4096, 4096), 10)}


@dataclass
class Run:
    model: str
    concurrency: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_batch: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def register(registry: ModelRegistry, store: ArtifactStore) -> dict[str, torch.nn.Module]:
    modules: dict[str, torch.nn.Module] = {}
    for name, (inputs, hidden, outputs) in MODELS.items():
        arch = model_pb2.Architecture(
            mlp=model_pb2.MlpArchitecture(input_size=inputs, hidden_sizes=list(hidden), output_size=outputs)
        )
        model = build_model(arch).eval()
        ref = save_mlp(model, store)
        registry.register(
            registry_pb2.ModelVersion(
                model_name=name,
                format=registry_pb2.MODEL_FORMAT_SAFETENSORS,
                architecture=arch,
                artifact_digest=ref.digest,
                artifact_size_bytes=ref.size,
            )
        )
        modules[name] = model
    return modules


async def wait_ready(stub: pb_grpc.GRPCInferenceServiceStub, server: subprocess.Popen[bytes]) -> None:
    for _ in range(600):  # bounded: 120 s
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}")
        try:
            if (await stub.ServerReady(pb.ServerReadyRequest(), timeout=1)).ready:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("server did not become ready")


async def drive(
    stub: pb_grpc.GRPCInferenceServiceStub, name: str, width: int, concurrency: int, seconds: float
) -> Run:
    x = np.random.default_rng(0).standard_normal((1, width)).astype("<f4")
    request = pb.ModelInferRequest(
        model_name=name,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, width])],
        raw_input_contents=[x.tobytes()],
    )
    for _ in range(20):  # warm the channel and the server's paths
        await stub.ModelInfer(request)
    before = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name=name))).model_stats[0]
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < end:
            start = time.perf_counter()
            await stub.ModelInfer(request)
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    after = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name=name))).model_stats[0]
    executions = after.execution_count - before.execution_count
    rows = after.inference_count - before.inference_count
    ms = np.array(latencies) * 1000
    return Run(
        name,
        concurrency,
        len(latencies),
        elapsed,
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        rows / executions if executions else 0.0,
    )


def ceiling(
    model: torch.nn.Module, width: int, batch: int, seconds: float, tries: int = 3
) -> tuple[float, float]:
    """In-process forward passes at ``batch``: (samples/s, ms per pass), the best
    of ``tries`` runs: the ceiling should not sink with a noisy neighbour."""
    x = torch.randn(batch, width)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        for _ in range(tries):
            passes = 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / tries:
                model(x)
                passes += 1
            best = min(best, (time.perf_counter() - start) / passes)
    return batch / best, best * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration per model and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--redis-url", default=os.environ.get("MODELFLEET_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    settings = Settings.from_env(
        {},
        redis_url=args.redis_url,
        redis_prefix=f"bench{uuid.uuid4().hex[:8]}",
        artifact_root=root / "artifacts",
        host="127.0.0.1",
        inference_port=free_port(),
        metrics_port=0,
        device="cpu",
        log_level="WARNING",
    )
    torch.set_num_threads(settings.torch_threads)
    client = connect(settings.redis_url)
    registry = ModelRegistry(client, settings.redis_prefix)
    modules = register(registry, ArtifactStore(settings.artifact_root))
    env = {**os.environ, **settings.env()}
    server = subprocess.Popen([sys.executable, "-m", "services.cli.main", "serve", "inference"], env=env)
    runs: list[Run] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.inference_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await wait_ready(stub, server)
            for name in MODELS:
                for concurrency in args.concurrency:
                    runs.append(await drive(stub, name, MODELS[name][0], concurrency, args.seconds))
    finally:
        server.terminate()
        server.wait(timeout=30)
        keys = list(client.scan_iter(match=f"{settings.redis_prefix}:*"))
        if keys:
            client.delete(*keys)
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"torch {torch.__version__}, torch threads {settings.torch_threads}, "
        f"max_batch_size {settings.max_batch_size}"
    )
    header = f"{'model':<7} {'conc':>4} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'batch':>6} "
    print(header + f"{'ceiling/s':>10} {'ratio':>6} {'fwd ms':>7} {'p50 overhead ms':>16}")
    for run in runs:
        batch = max(1, round(run.mean_batch))
        ceiling_rate, forward_ms = ceiling(
            modules[run.model], MODELS[run.model][0], batch, min(args.seconds, 5.0)
        )
        rate = run.requests / run.seconds
        print(
            f"{run.model:<7} {run.concurrency:>4} {rate:>8.0f} {run.p50_ms:>7.2f} {run.p99_ms:>7.2f} "
            f"{run.mean_batch:>6.1f} {ceiling_rate:>10.0f} {rate / ceiling_rate:>6.2f} {forward_ms:>7.3f} "
            f"{run.p50_ms - forward_ms:>16.3f}"
        )


if __name__ == "__main__":
    run_loop(main())  # the load generator gets the same lean event loop as the server
