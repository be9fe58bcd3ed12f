"""``modelfleet worker compression``: runs compression jobs from the shared queue."""

from __future__ import annotations

import logging

import torch

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog
from common.jobs import JobQueue, Worker
from common.redis import connect
from common.registry import ModelRegistry
from common.settings import Settings
from services.compression.handler import CompressionHandler

log = logging.getLogger(__name__)


def build_worker(settings: Settings) -> Worker:
    client = connect(settings.redis_url)
    handler = CompressionHandler(
        settings,
        ModelRegistry(client, settings.redis_prefix),
        DatasetCatalog(client, settings.redis_prefix),
        ArtifactStore(settings.artifact_root),
    )
    return Worker(JobQueue(client, settings), jobs_pb2.JOB_KIND_COMPRESSION, handler)


def run_worker(settings: Settings) -> int:
    torch.set_num_threads(settings.torch_threads)
    build_worker(settings).run()
    return 0
