"""Training throughput: samples/s of a training job through the service (real
gRPC server, real `modelfleet worker training` subprocess, DDP ranks reading
memory-mapped shards) against a plain single-process torch loop on the same
data and model, in the same run; for world_size 1 and 2. For world_size 2 it
also runs a bare two-process DDP loop (the plain loop under
DistributedDataParallel, nothing else), which separates what the service costs
from what gradient synchronisation costs on the machine.

The dataset is the data service's synthetic regression (x in R^d, y = linear +
noise), z-scored and split by the data service's own preprocessing. Two figures
per job: the trainer's per-epoch samples/s (median over epochs; the training
loop only) and end to end (rows x epochs over the job's RUNNING time, so it
includes spawning ranks, checkpoints, validation and registration).
Needs a Redis at MODELFLEET_REDIS_URL; uses its own key prefix and removes it.

    python benchmarks/train_bench.py [--rows 40000] [--features 64] [--epochs 6] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

# Run as a script from anywhere: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.data.v1 import data_pb2
from common.api.modelfleet.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from common.api.modelfleet.training.v1 import training_pb2, training_pb2_grpc
from common.api.modelfleet.training.v1 import training_spec_pb2 as ts
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog, load_split
from common.models.mlp import MLP
from common.redis import connect
from common.settings import Settings
from services.data.service import DataService
from services.training.server import build
from services.training.spec import resolve_spec

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)
JOB_TIMEOUT_S = 900.0
T = TypeVar("T")


def make_dataset(settings: Settings, rows: int, features: int) -> None:
    client = connect(settings.redis_url)
    service = DataService(
        ArtifactStore(settings.artifact_root),
        DatasetCatalog(client, settings.redis_prefix),
        settings.max_upload_bytes,
    )
    service.create_from_source(
        data_pb2.CreateDatasetFromSourceRequest(
            name="bench-raw",
            source=data_pb2.BUILTIN_SOURCE_SYNTHETIC_REGRESSION,
            synthetic=data_pb2.SyntheticRegression(n_samples=rows, n_features=features, seed=0),
        )
    )
    service.preprocess(
        data_pb2.PreprocessDatasetRequest(
            name="bench-raw",
            target_name="bench",
            normalization=model_pb2.NORMALIZATION_KIND_ZSCORE,
            split=data_pb2.SplitSpec(val_fraction=0.1, test_fraction=0.1, seed=0),
        )
    )
    client.close()


def bench_spec(args: argparse.Namespace, world_size: int) -> ts.TrainingSpec:
    spec = ts.TrainingSpec(
        dataset_name="bench",
        model_name=f"bench-ws{world_size}",
        epochs=args.epochs,
        batch_size=args.batch_size,
        world_size=world_size,
        learning_rate=1e-3,
        seed=0,
    )
    spec.architecture.mlp.hidden_sizes.extend([128, 64])
    return spec


def train_split(settings: Settings, spec: ts.TrainingSpec) -> tuple[ts.TrainingSpec, np.ndarray, np.ndarray]:
    """The bound spec and the train split, in memory, as the references use them."""
    client = connect(settings.redis_url)
    bound, record = resolve_spec(DatasetCatalog(client, settings.redis_prefix), spec)
    client.close()
    features, labels = load_split(ArtifactStore(settings.artifact_root), record, "train")
    assert labels is not None
    return bound, np.array(features), np.array(labels)


def plain_loop(
    bound: ts.TrainingSpec, features: np.ndarray, labels: np.ndarray, distributed: bool = False
) -> list[float]:
    """The reference: one process, its rows in memory as a tensor, randperm
    batches, same model, optimizer, loss and batch size. Samples/s per epoch.
    ``distributed``: the model under DDP, as one rank of the bare DDP reference."""
    x = torch.from_numpy(features)
    y = torch.from_numpy(labels)
    torch.manual_seed(0)
    layers = MLP(bound.architecture.mlp).layers
    net = DistributedDataParallel(layers) if distributed else layers
    optimizer = torch.optim.Adam(net.parameters(), lr=bound.learning_rate)
    rates = []
    for _ in range(bound.epochs):
        started = time.perf_counter()
        order = torch.randperm(len(x))
        for i in range(0, len(x), bound.batch_size):
            idx = order[i : i + bound.batch_size]
            loss = torch.nn.functional.mse_loss(net(x[idx]).squeeze(-1), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rates.append(len(x) / (time.perf_counter() - started))
    return rates


def _ddp_rank(
    rank: int,
    world_size: int,
    rendezvous: str,
    spec_bytes: bytes,
    features: np.ndarray,
    labels: np.ndarray,
    threads: int,
    results: Any,
) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        per_rank = ts.TrainingSpec.FromString(spec_bytes)  # messages do not pickle across spawn
        per_rank.batch_size //= world_size
        rates = plain_loop(per_rank, features[rank::world_size], labels[rank::world_size], distributed=True)
        if rank == 0:
            results.put([rate * world_size for rate in rates])
    finally:
        dist.destroy_process_group()


def bare_ddp_loop(
    bound: ts.TrainingSpec,
    features: np.ndarray,
    labels: np.ndarray,
    world_size: int,
    threads: int,
    root: Path,
) -> list[float]:
    """The reference for ``world_size`` > 1: the plain loop in ``world_size``
    spawned processes under DistributedDataParallel (gloo), each on its share of
    the rows with its share of the batch, nothing else. Samples/s per epoch, all ranks."""
    context = mp.get_context("spawn")
    results = context.Queue()
    rendezvous = root / f"ddp-{uuid.uuid4().hex}"
    shared = (str(rendezvous), bound.SerializeToString(), features, labels, threads, results)
    ranks = [context.Process(target=_ddp_rank, args=(r, world_size, *shared)) for r in range(world_size)]
    for process in ranks:
        process.start()
    try:
        rates: list[float] = results.get(timeout=JOB_TIMEOUT_S)
    finally:
        for process in ranks:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return rates


@dataclass
class JobFigures:
    epoch_rates: list[float]  # samples/s of each epoch's training loop, as the trainer reported
    end_to_end: float  # rows x epochs / RUNNING time
    startup_s: float  # RUNNING until the first epoch's report: spawning ranks, rendezvous, mapping data
    finish_s: float  # last epoch's report until SUCCEEDED: final weights, test metrics, registration


async def run_job(channel: grpc.aio.Channel, spec: ts.TrainingSpec, train_rows: int) -> JobFigures:
    training = training_pb2_grpc.TrainingServiceStub(channel)
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    job = (await training.SubmitTrainingJob(training_pb2.SubmitTrainingJobRequest(spec=spec))).job
    rates: list[float] = []
    epoch_times: list[int] = []
    final = job
    async with asyncio.timeout(JOB_TIMEOUT_S):
        async for response in jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id, from_beginning=True)):
            event = response.event
            if event.type == jobs_pb2.JOB_EVENT_TYPE_PROGRESS and "samples_per_second" in event.metrics:
                rates.append(event.metrics["samples_per_second"])
                epoch_times.append(event.time.ToNanoseconds())
            final = response.job
            if final.state in TERMINAL:
                break
    if final.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        raise SystemExit(f"job {job.id} ended {jobs_pb2.JobState.Name(final.state)}: {final.last_error}")
    started, finished = final.started_at.ToNanoseconds(), final.finished_at.ToNanoseconds()
    return JobFigures(
        epoch_rates=rates,
        end_to_end=train_rows * spec.epochs / ((finished - started) / 1e9),
        startup_s=(epoch_times[0] - started) / 1e9,
        finish_s=(finished - epoch_times[-1]) / 1e9,
    )


async def guarded(worker: subprocess.Popen[bytes], job: Coroutine[Any, Any, T]) -> T:
    """``job``'s result, or exit if the worker process dies first (nothing would run the job)."""
    task = asyncio.ensure_future(job)
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if worker.poll() is not None and not task.done():
            task.cancel()
            raise SystemExit(f"the training worker exited with code {worker.returncode}")
    return task.result()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="mf-train-bench-"))
    base = Settings.from_env()
    settings = base.replace(
        redis_prefix=f"mfbench{uuid.uuid4().hex[:8]}",
        artifact_root=root / "artifacts",
        training_port=0,
        metrics_port=0,
        host="127.0.0.1",
        log_format="text",
        log_level="WARNING",
    )
    torch.set_num_threads(settings.torch_threads)
    worker: subprocess.Popen[bytes] | None = None
    host = None
    try:
        make_dataset(settings, args.rows, args.features)
        train_rows = int(
            DatasetCatalog(connect(settings.redis_url), settings.redis_prefix)
            .get("bench")
            .meta.split_rows["train"]
        )
        host = await build(settings)
        port = await host.start()
        await host.ready()
        env = {**os.environ, **settings.env(), "PYTHONPATH": str(ROOT)}
        worker = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "worker", "training"], cwd=ROOT, env=env
        )

        print(
            f"train_bench: {train_rows} train rows x {args.features} features, MLP [128, 64], "
            f"batch {args.batch_size}, {args.epochs} epochs, torch threads/process {settings.torch_threads}, "
            f"device {settings.device}, {os.cpu_count()} CPUs"
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            bound, features, labels = train_split(settings, bench_spec(args, 1))

            def reference(ws: int) -> float:
                if ws == 1:
                    return statistics.median(plain_loop(bound, features, labels))
                rates = bare_ddp_loop(bound, features, labels, ws, settings.torch_threads, root)
                return statistics.median(rates)

            for world_size in (1, 2):
                # The references run right before and after each job and the faster
                # of the two counts, so noisy neighbours cannot flatter the ratio.
                sizes = (1,) if world_size == 1 else (1, world_size)
                before = [reference(ws) for ws in sizes]
                job = await guarded(worker, run_job(channel, bench_spec(args, world_size), train_rows))
                after = [reference(ws) for ws in sizes]
                plain = max(before[0], after[0])
                loop_rate = statistics.median(job.epoch_rates)
                line = (
                    f"world_size={world_size}: plain loop {plain:,.0f} samples/s "
                    f"(runs: {before[0]:,.0f}, {after[0]:,.0f}); "
                    f"service {loop_rate:,.0f} samples/s = {loop_rate / plain:.2f}x"
                )
                if world_size > 1:
                    bare = max(before[-1], after[-1])
                    line += (
                        f" (bare {world_size}-process DDP loop {bare:,.0f} samples/s = {bare / plain:.2f}x; "
                        f"service / bare DDP = {loop_rate / bare:.2f}x)"
                    )
                print(
                    f"{line}; end-to-end {job.end_to_end:,.0f} samples/s = {job.end_to_end / plain:.2f}x "
                    f"(startup {job.startup_s:.1f} s, finish {job.finish_s:.1f} s)"
                )
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)
        if host is not None:
            await host.stop(0)
        client = connect(settings.redis_url)
        keys = list(client.scan_iter(match=f"{settings.redis_prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
