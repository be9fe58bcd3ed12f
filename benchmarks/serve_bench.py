"""Load generator for the inference service.

Starts a real ``modelfleet serve inference`` subprocess (own Redis prefix and
artifact root), registers the ``tiny`` (Linear 1000->100->1) and ``medium``
(1024-4096-4096-10) MLPs, drives each with batch-1 raw FP32 requests from N
concurrent grpc.aio callers, and prints requests/s, p50/p99 latency and the
ratio to the in-process torch ceiling measured in the same run at the batch size
the batcher reached (from ModelStatistics).

It also reads the server's CPU time per request (Linux /proc) and, in the same
run, drives a bare grpc.aio server whose ModelInfer answers a canned response:
that server's CPU per request is the floor a Python gRPC front end pays, and
under closed-loop load it bounds the ratio (see README, Performance).

    python benchmarks/serve_bench.py [--seconds 10] [--concurrency 1 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactStore
from common.models.loading import save_weights
from common.models.mlp import build_model
from common.redis import connect
from common.registry import ModelRegistry
from common.settings import Settings
from services.cli.serve import run_loop

MODELS = {"tiny": (1000, (100,), 1), "medium": (1024, (4096, 4096), 10)}


@dataclass
class Server:
    stub: pb_grpc.GRPCInferenceServiceStub
    pid: int


@dataclass
class Run:
    model: str
    concurrency: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    server_cpu_ms: float  # server process CPU per request (forward passes included); nan off Linux


CANNED = pb.ModelInferResponse(
    model_name="medium",
    model_version="1",
    outputs=[pb.ModelInferResponse.InferOutputTensor(name="output", datatype="FP32", shape=[1, 10])],
    raw_output_contents=[bytes(40)],
)


async def serve_canned(port: int) -> None:
    """The floor: a bare grpc.aio server (same uvloop, no interceptor) whose
    ModelInfer answers a fixed medium-sized response without reading the request."""

    async def infer(
        request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return CANNED

    async def ready(
        request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    def unary(handler: Any, message: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            handler,
            request_deserializer=message.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService",
                {
                    "ModelInfer": unary(infer, pb.ModelInferRequest),
                    "ServerReady": unary(ready, pb.ServerReadyRequest),
                },
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all threads); nan where /proc is absent."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        ref = save_weights(model, store)
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


@contextlib.asynccontextmanager
async def running(command: list[str], port: int, env: dict[str, str]) -> AsyncIterator[Server]:
    """A server subprocess, ready, with a channel to it; terminated on exit."""
    process = subprocess.Popen(command, env=env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await wait_ready(stub, process)
            yield Server(stub, process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


async def drive(server: Server, name: str, width: int, concurrency: int, seconds: float) -> Run:
    """``name`` served by ``server``; the mean batch comes from ModelStatistics when
    ``name`` is one of MODELS (the canned server has no statistics: 0)."""
    stub = server.stub
    x = np.random.default_rng(0).standard_normal((1, width)).astype("<f4")
    request = pb.ModelInferRequest(
        model_name=name,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, width])],
        raw_input_contents=[x.tobytes()],
    )
    for _ in range(20):  # warm the channel and the server's paths
        await stub.ModelInfer(request)
    before = await _counts(stub, name)
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < end:
            start = time.perf_counter()
            await stub.ModelInfer(request)
            latencies.append(time.perf_counter() - start)

    cpu_before = cpu_seconds(server.pid)
    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    cpu_used = cpu_seconds(server.pid) - cpu_before
    after = await _counts(stub, name)
    executions = after[0] - before[0]
    rows = after[1] - before[1]
    ms = np.array(latencies) * 1000
    return Run(
        name,
        concurrency,
        len(latencies),
        elapsed,
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        rows / executions if executions else 0.0,
        cpu_used * 1000 / len(latencies),
    )


async def _counts(stub: pb_grpc.GRPCInferenceServiceStub, name: str) -> tuple[int, int]:
    """(executions, rows) so far; (0, 0) for the canned server's model, which has none."""
    if name not in MODELS:
        return 0, 0
    stats = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name=name))).model_stats[0]
    return stats.execution_count, stats.inference_count


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
    parser.add_argument("--canned-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.canned_server:
        await serve_canned(args.canned_server)
        return

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
    runs: list[Run] = []
    floors: list[Run] = []
    try:
        modelfleet = [sys.executable, "-m", "services.cli.main", "serve", "inference"]
        async with running(modelfleet, settings.inference_port, env) as server:
            for name, (width, _, _) in MODELS.items():
                for concurrency in args.concurrency:
                    runs.append(await drive(server, name, width, concurrency, args.seconds))
        port = free_port()
        async with running([sys.executable, __file__, "--canned-server", str(port)], port, env) as server:
            for concurrency in args.concurrency:
                floors.append(await drive(server, "canned", MODELS["medium"][0], concurrency, args.seconds))
    finally:
        keys = list(client.scan_iter(match=f"{settings.redis_prefix}:*"))
        if keys:
            client.delete(*keys)
        shutil.rmtree(root, ignore_errors=True)

    floor_ms = {run.concurrency: run.server_cpu_ms for run in floors}
    print(
        f"torch {torch.__version__}, torch threads {settings.torch_threads}, "
        f"max_batch_size {settings.max_batch_size}"
    )
    header = f"{'model':<7} {'conc':>4} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'batch':>6} "
    print(
        header + f"{'ceiling/s':>10} {'ratio':>6} {'fwd ms':>7} {'p50 overhead ms':>16} "
        f"{'CPU/req ms':>11} {'w/o fwd':>8} {'bound':>6}"
    )
    for run in runs:
        batch = max(1, round(run.mean_batch))
        ceiling_rate, forward_ms = ceiling(
            modules[run.model], MODELS[run.model][0], batch, min(args.seconds, 5.0)
        )
        rate = run.requests / run.seconds
        # Closed loop: every caller waits on the batch in flight, so between two
        # forward passes the server answers and takes in a whole batch at about
        # the floor's CPU per request (an estimate: see README, Performance).
        bound = forward_ms / (forward_ms + run.mean_batch * floor_ms[run.concurrency])
        print(
            f"{run.model:<7} {run.concurrency:>4} {rate:>8.0f} {run.p50_ms:>7.2f} {run.p99_ms:>7.2f} "
            f"{run.mean_batch:>6.1f} {ceiling_rate:>10.0f} {rate / ceiling_rate:>6.2f} {forward_ms:>7.3f} "
            f"{run.p50_ms - forward_ms:>16.3f} {run.server_cpu_ms:>11.3f} "
            f"{run.server_cpu_ms - forward_ms / run.mean_batch:>8.3f} {bound:>6.2f}"
        )
    for run in floors:
        print(
            f"gRPC floor (bare grpc.aio, canned response), c={run.concurrency}: "
            f"{run.requests / run.seconds:,.0f} req/s, p50 {run.p50_ms:.2f} ms, "
            f"server CPU {run.server_cpu_ms:.3f} ms/request"
        )


if __name__ == "__main__":
    run_loop(main())  # the load generator gets the same lean event loop as the server
