"""Submission of compression jobs: validate and pin the spec, then queue it.
Plain Python so it is testable without gRPC; the servicer only translates."""

from __future__ import annotations

from common.api.modelfleet.compression.v1 import compression_pb2
from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.datasets import DatasetCatalog
from common.errors import InvalidArgument
from common.jobs import JobQueue
from common.registry import ModelRegistry
from services.compression.spec import resolve


class CompressionSubmitter:
    def __init__(self, queue: JobQueue, registry: ModelRegistry, catalog: DatasetCatalog) -> None:
        self.queue = queue
        self.registry = registry
        self.catalog = catalog

    def check(self, request: compression_pb2.SubmitCompressionJobRequest) -> None:
        """Everything ``submit`` checks, queueing nothing (``validate_only``)."""
        self.queue.check(self._job(request))

    def submit(self, request: compression_pb2.SubmitCompressionJobRequest) -> jobs_pb2.Job:
        """Queue a compression job pinned to the versions resolved now."""
        return self.queue.submit(self._job(request))

    def _job(self, request: compression_pb2.SubmitCompressionJobRequest) -> jobs_pb2.Job:
        """The validated, pinned job a submit would queue."""
        if request.max_attempts < 0:
            raise InvalidArgument(f"max_attempts must be >= 0, got {request.max_attempts}")
        if request.priority not in jobs_pb2.Priority.values():
            raise InvalidArgument(f"priority {request.priority} is unknown")
        resolved = resolve(request.spec, self.registry, self.catalog)
        job = jobs_pb2.Job(
            kind=jobs_pb2.JOB_KIND_COMPRESSION,
            priority=request.priority,
            request_id=request.request_id,
            max_attempts=request.max_attempts,
        )
        # The pinned spec: the job compresses exactly the version validated here,
        # even if an alias moves before a worker picks it up.
        job.compression.CopyFrom(resolved.spec)
        return job
