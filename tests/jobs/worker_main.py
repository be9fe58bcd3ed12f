"""A training-kind Worker in its own process, for fault-injection tests.

Run as ``python -m tests.jobs.worker_main WORKER_ID`` with MODELFLEET_* settings in the
environment. The job's spec.description says what the handler does:

- ``ok``: succeed at once;
- ``sleep:S``: sleep S seconds (ignoring cancellation), then succeed;
- ``sleep-first:S``: sleep S seconds on attempt 1 only, then succeed.

Every attempt appends ``<job_id>:<attempt>:<worker>`` to ``<prefix>:test:started`` and, on
success, to ``<prefix>:test:finished``, so tests can count executions exactly.
"""

from __future__ import annotations

import sys
import time

import redis

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.jobs import JobContext, JobOutcome, JobQueue, Worker
from common.logging import setup_logging
from common.redis import connect
from common.settings import Settings


def make_handler(client: redis.Redis, prefix: str, worker_id: str):
    def handle(ctx: JobContext) -> JobOutcome:
        mark = f"{ctx.job.id}:{ctx.attempt}:{worker_id}"
        client.rpush(f"{prefix}:test:started", mark)
        command, _, arg = ctx.job.training.description.partition(":")
        if command == "sleep" or (command == "sleep-first" and ctx.attempt == 1):
            time.sleep(float(arg))
        client.rpush(f"{prefix}:test:finished", mark)
        return JobOutcome(result=jobs_pb2.JobResult(model_name="m", model_version=str(ctx.attempt)))

    return handle


def main() -> int:
    worker_id = sys.argv[1]
    settings = Settings.from_env()
    setup_logging(settings.log_level, "text")
    client = connect(settings.redis_url)
    queue = JobQueue(client, settings)
    handler = make_handler(client, settings.redis_prefix, worker_id)
    print("ready", flush=True)
    Worker(queue, jobs_pb2.JOB_KIND_TRAINING, handler, worker_id=worker_id).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
