"""``modelfleet worker training``: take training jobs off the queue until SIGTERM."""

from __future__ import annotations

import torch

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.artifacts import ArtifactStore
from common.jobs import JobQueue, Worker
from common.redis import connect, wait_for_redis
from common.settings import Settings
from services.training.handler import TrainingHandler


def run_worker(settings: Settings) -> int:
    torch.set_num_threads(settings.torch_threads)
    client = connect(settings.redis_url)
    try:
        wait_for_redis(client)
        queue = JobQueue(client, settings)
        handler = TrainingHandler(settings, client, ArtifactStore(settings.artifact_root))
        Worker(queue, jobs_pb2.JOB_KIND_TRAINING, handler).run()
    finally:
        client.close()
    return 0
