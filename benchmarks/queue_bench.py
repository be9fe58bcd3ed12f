"""Job queue figures: enqueue and completion throughput of no-op jobs and pickup latency
(submit -> handler start), for common.jobs and, with the same harness in the same run, a
minimal reference loop (bare XADD / XREADGROUP / XACK). Needs a Redis at
MODELFLEET_REDIS_URL; uses its own key prefix and deletes it afterwards.

The two are measured in alternating rounds and each figure is the median over rounds, each
ratio the median of the per-round ratios: on a shared machine the load changes between
runs, and a ratio taken within one round compares the two under the same load.

    python benchmarks/queue_bench.py [--jobs 2000] [--pickups 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.training.v1 import training_spec_pb2
from common.jobs import JobContext, JobOutcome, JobQueue, Worker
from common.redis import connect
from common.settings import Settings

NOOP = JobOutcome(result=jobs_pb2.JobResult(model_name="noop", model_version="1"))


@dataclass
class Figures:
    enqueue_per_s: float
    complete_per_s: float
    pickup_p50_ms: float
    pickup_p99_ms: float


class Harness:
    """What a queue must offer the benchmark: enqueue one, process one (blocking), and a hook
    called when a handler starts."""

    def __init__(self, enqueue: Callable[[], object], process: Callable[[], bool]) -> None:
        self.enqueue = enqueue
        self.process = process
        self.started = threading.Event()
        self.started_at = 0.0
        # Set whenever a process() call has returned: the worker is about to wait again.
        self.idle = threading.Event()

    def on_start(self) -> None:
        self.started_at = time.perf_counter()
        self.started.set()


def measure(h: Harness, jobs: int, pickups: int) -> Figures:
    t0 = time.perf_counter()
    for _ in range(jobs):
        h.enqueue()
    enqueue_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    done = 0
    while done < jobs:
        done += h.process()
    complete_s = time.perf_counter() - t0

    # Pickup: a worker thread blocks on the queue; each job is submitted only once the worker
    # has finished the previous one and is back in its blocking read.
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            h.process()
            h.idle.set()

    h.idle.set()
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    latencies = []
    for _ in range(pickups):
        if not h.idle.wait(10):
            raise RuntimeError("the worker did not finish a job within 10 s")
        h.idle.clear()
        h.started.clear()
        time.sleep(0.002)  # let the worker get into its blocking read
        t_submit = time.perf_counter()
        h.enqueue()
        if not h.started.wait(10):
            raise RuntimeError("a job was not picked up within 10 s")
        latencies.append((h.started_at - t_submit) * 1000)
    stop.set()
    h.enqueue()  # wake the worker so it sees stop
    worker.join(timeout=10)
    while h.process():  # leave the queue empty for the next round (ends after one idle read)
        pass
    latencies.sort()
    return Figures(
        enqueue_per_s=jobs / enqueue_s,
        complete_per_s=jobs / complete_s,
        pickup_p50_ms=statistics.median(latencies),
        pickup_p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    )


def modelfleet_harness(client: redis.Redis, settings: Settings) -> Harness:
    queue = JobQueue(client, settings)
    spec = training_spec_pb2.TrainingSpec(dataset_name="d", model_name="m")
    job = jobs_pb2.Job(kind=jobs_pb2.JOB_KIND_TRAINING, training=spec)

    def handler(ctx: JobContext) -> JobOutcome:
        harness.on_start()
        return NOOP

    worker = Worker(queue, jobs_pb2.JOB_KIND_TRAINING, handler, worker_id="bench")
    harness = Harness(lambda: queue.submit(job), lambda: worker.run_once(block_ms=1000))
    return harness


def reference_harness(client: redis.Redis, prefix: str) -> Harness:
    stream, group = f"{prefix}:ref", "workers"
    client.xgroup_create(stream, group, id="0", mkstream=True)

    def process() -> bool:
        reply = client.xreadgroup(group, "ref", {stream: ">"}, count=1, block=1000)
        if not reply:
            return False
        entry: Any = reply[0][1][0][0]  # type: ignore[index]
        harness.on_start()
        client.xack(stream, group, entry)
        return True

    harness = Harness(lambda: client.xadd(stream, {"job": "x"}), process)
    return harness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--pickups", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = Settings.from_env(redis_prefix=f"bench{uuid.uuid4().hex[:8]}")
    client = connect(settings.redis_url)
    rounds: list[tuple[Figures, Figures]] = []
    try:
        ours_h = modelfleet_harness(client, settings)
        ref_h = reference_harness(client, settings.redis_prefix)
        for i in range(args.rounds):
            if i % 2 == 0:
                ours = measure(ours_h, args.jobs, args.pickups)
                ref = measure(ref_h, args.jobs, args.pickups)
            else:
                ref = measure(ref_h, args.jobs, args.pickups)
                ours = measure(ours_h, args.jobs, args.pickups)
            rounds.append((ours, ref))
    finally:
        keys = list(client.scan_iter(match=f"{settings.redis_prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    print(f"{args.jobs} no-op jobs, {args.pickups} pickups, {args.rounds} rounds, Redis {settings.redis_url}")
    print(f"{'median of rounds':24}{'modelfleet':>12}{'reference':>12}{'ratio':>8}   ratio per round")
    for label, attr in (
        ("enqueue jobs/s", "enqueue_per_s"),
        ("completion jobs/s", "complete_per_s"),
        ("pickup p50 ms", "pickup_p50_ms"),
        ("pickup p99 ms", "pickup_p99_ms"),
    ):
        a = statistics.median(getattr(ours, attr) for ours, _ in rounds)
        b = statistics.median(getattr(ref, attr) for _, ref in rounds)
        ratios = [getattr(ours, attr) / getattr(ref, attr) for ours, ref in rounds]
        each = " ".join(f"{r:.2f}" for r in ratios)
        print(f"{label:24}{a:12.2f}{b:12.2f}{statistics.median(ratios):8.2f}   {each}")


if __name__ == "__main__":
    main()
