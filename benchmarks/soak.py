"""Soak: a real inference server subprocess under constant load while a real
worker subprocess drains a burst of no-op jobs.

Load: ``--concurrency`` (64) clients each sending batch-1 raw FP32 ModelInfer
requests to a small MLP back to back for ``--duration`` seconds (60). Jobs:
``--jobs`` (1,000) no-op training-kind jobs submitted at once when the load
starts, run by a worker subprocess (the real ``common.jobs.Worker`` with a
handler that returns at once). Reports errors by status code, p50/p99/max
latency, throughput, the server's RSS at start and end (and the peak seen),
and jobs completed. Needs a Redis at MODELFLEET_REDIS_URL (default
redis://127.0.0.1:6379/0); uses its own key prefix and deletes it afterwards.

    python benchmarks/soak.py [--duration 60] [--concurrency 64] [--jobs 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.api.inference import grpc_predict_v2_pb2 as oip
from common.api.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.api.modelfleet.training.v1 import training_spec_pb2
from common.artifacts import ArtifactStore
from common.jobs import JobContext, JobOutcome, JobQueue, Worker
from common.models.loading import save_weights
from common.models.mlp import build_model
from common.redis import connect
from common.registry import ModelRegistry
from common.settings import Settings

MODEL = "soak-mlp"
INPUTS, HIDDEN, OUTPUTS = 32, (64,), 10
START_TIMEOUT_S = 120.0
JOBS_TIMEOUT_S = 300.0
TERMINAL = {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED}
NOOP = JobOutcome(result=jobs_pb2.JobResult(model_name="noop", model_version="1"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run_worker() -> int:
    """The worker subprocess: the real Worker loop with a handler that does nothing."""

    def handle(ctx: JobContext) -> JobOutcome:
        return NOOP

    settings = Settings.from_env()
    Worker(JobQueue(connect(settings.redis_url), settings), jobs_pb2.JOB_KIND_TRAINING, handle).run()
    return 0


def _register_model(settings: Settings) -> None:
    torch.manual_seed(0)
    arch = model_pb2.Architecture(
        mlp=model_pb2.MlpArchitecture(input_size=INPUTS, hidden_sizes=list(HIDDEN), output_size=OUTPUTS)
    )
    ref = save_weights(build_model(arch).eval(), ArtifactStore(settings.artifact_root))
    ModelRegistry(connect(settings.redis_url), settings.redis_prefix).register(
        registry_pb2.ModelVersion(
            model_name=MODEL,
            format=registry_pb2.MODEL_FORMAT_SAFETENSORS,
            architecture=arch,
            artifact_digest=ref.digest,
            artifact_size_bytes=ref.size,
        )
    )


def _env(settings: Settings) -> dict[str, str]:
    names = ("redis_url", "redis_prefix", "artifact_root", "host", "inference_port", "device", "log_format")
    env = {f"MODELFLEET_{n.upper()}": str(getattr(settings, n)) for n in names}
    env["MODELFLEET_METRICS_PORT"] = "0"
    env["MODELFLEET_LOG_LEVEL"] = "WARNING"
    return {**os.environ, **env}


async def _wait_serving(target: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"inference server at {target} not SERVING after {START_TIMEOUT_S:.0f}s")


async def _load(target: str, concurrency: int, duration_s: float) -> tuple[list[float], Counter[str]]:
    """``concurrency`` clients on one channel, each sending one request at a time."""
    x = np.random.default_rng(0).standard_normal((1, INPUTS), dtype=np.float32).tobytes()
    request = oip.ModelInferRequest(
        model_name=MODEL,
        inputs=[oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, INPUTS])],
        raw_input_contents=[x],
    )
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    stop_at = time.monotonic() + duration_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)

        async def client() -> None:
            while time.monotonic() < stop_at:
                start = time.perf_counter()
                try:
                    reply = await stub.ModelInfer(request, timeout=30)
                    if len(reply.raw_output_contents[0]) != OUTPUTS * 4:
                        errors["WRONG_OUTPUT"] += 1
                        continue
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    continue
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, errors


async def _sample_rss(pid: int, stop: asyncio.Event, peak: list[float]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], _rss_mib(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


def _submit(queue: JobQueue, count: int) -> list[str]:
    job = jobs_pb2.Job(
        kind=jobs_pb2.JOB_KIND_TRAINING,
        training=training_spec_pb2.TrainingSpec(dataset_name="noop", model_name="noop"),
    )
    return [queue.submit(job).id for _ in range(count)]


def _states(queue: JobQueue, ids: list[str]) -> Counter[jobs_pb2.JobState.ValueType]:
    return Counter(queue.get(i).state for i in ids)


async def _drain(
    queue: JobQueue, ids: list[str], t0: float
) -> tuple[Counter[jobs_pb2.JobState.ValueType], float]:
    """Poll (bounded) until every job is terminal; the states and when that was seen."""
    deadline = time.monotonic() + JOBS_TIMEOUT_S
    while True:
        states = await asyncio.to_thread(_states, queue, ids)
        if sum(states[s] for s in TERMINAL) == len(ids) or time.monotonic() > deadline:
            return states, time.monotonic() - t0
        await asyncio.sleep(0.5)


async def soak(args: argparse.Namespace) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    settings = Settings.from_env(
        redis_prefix=f"soak{uuid.uuid4().hex[:8]}",
        artifact_root=root / "artifacts",
        host="127.0.0.1",
        inference_port=_free_port(),
        device=args.device,
        log_format="text",
    )
    client = connect(settings.redis_url)
    queue = JobQueue(client, settings)
    _register_model(settings)
    env = _env(settings)
    server = subprocess.Popen([sys.executable, "-m", "services.cli.main", "serve", "inference"], env=env)
    worker = subprocess.Popen([sys.executable, __file__, "--worker"], env=env)
    target = f"127.0.0.1:{settings.inference_port}"
    try:
        await _wait_serving(target)
        await _load(target, 8, 2.0)  # warm-up, not counted
        rss_start = _rss_mib(server.pid)
        peak = [rss_start]
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_rss(server.pid, stop, peak))
        t0 = time.monotonic()
        load = asyncio.create_task(_load(target, args.concurrency, args.duration))
        ids = await asyncio.to_thread(_submit, queue, args.jobs)
        submit_s = time.monotonic() - t0
        drain = asyncio.create_task(_drain(queue, ids, t0))
        latencies, errors = await load
        load_s = time.monotonic() - t0
        stop.set()
        await sampler
        rss_end = _rss_mib(server.pid)
        states, jobs_s = await drain
        server_alive = server.poll() is None
    finally:
        for proc in (worker, server):
            proc.terminate()
        for proc in (worker, server):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        keys = list(client.scan_iter(match=f"{settings.redis_prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    ms = np.array(latencies) * 1000
    return {
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "requests_ok": len(latencies),
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "throughput_rps": round(len(latencies) / load_s, 1),
        "latency_ms": {
            "p50": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "p99": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
            "max": round(float(ms.max()), 2) if len(ms) else None,
        },
        "server_rss_mib": {
            "start": round(rss_start, 1),
            "end": round(rss_end, 1),
            "peak": round(peak[0], 1),
            "growth": round(rss_end - rss_start, 1),
        },
        "server_alive": server_alive,
        "jobs_submitted": len(ids),
        "jobs_submit_s": round(submit_s, 2),
        "jobs_states": {jobs_pb2.JobState.Name(s): n for s, n in states.items()},
        "jobs_succeeded": states[jobs_pb2.JOB_STATE_SUCCEEDED],
        # Seen by a 0.5 s poll, from the start of the load.
        "jobs_all_terminal_after_s": round(jobs_s, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--jobs", type=int, default=1000, help="no-op jobs submitted at once (default 1000)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--rss-bound-mib", type=float, default=100.0, help="allowed server RSS growth")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker()
    figures = asyncio.run(soak(args))
    print(json.dumps(figures, indent=2))
    rss = figures["server_rss_mib"]
    assert isinstance(rss, dict)
    ok = (
        figures["error_count"] == 0
        and bool(figures["server_alive"])
        and figures["jobs_succeeded"] == args.jobs
        and rss["growth"] < args.rss_bound_mib
    )
    print("PASS" if ok else "FAIL", f"(RSS growth bound {args.rss_bound_mib:.0f} MiB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
