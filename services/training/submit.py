"""SubmitTrainingJob without gRPC: validate, resolve the dataset, queue."""

from __future__ import annotations

import logging

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.training.v1 import training_pb2
from common.datasets import DatasetCatalog
from common.errors import InvalidArgument
from common.jobs import JobQueue
from common.models.families import check_parameter_budget
from services.training.spec import resolve_spec

log = logging.getLogger(__name__)


class TrainingSubmitter:
    def __init__(self, queue: JobQueue, catalog: DatasetCatalog) -> None:
        self.queue = queue
        self.catalog = catalog

    def check(self, request: training_pb2.SubmitTrainingJobRequest) -> None:
        """Everything ``submit`` checks, queueing nothing (``validate_only``)."""
        self.queue.check(self._job(request))

    def submit(self, request: training_pb2.SubmitTrainingJobRequest) -> jobs_pb2.Job:
        """Queue a training job whose spec is validated, defaulted and pinned to
        the dataset version that exists now (so a later version cannot change it)."""
        job = self._job(request)
        queued = self.queue.submit(job)
        log.info(
            "training job queued",
            extra={
                "job_id": queued.id,
                "dataset": f"{job.training.dataset_name}:{job.training.dataset_version}",
            },
        )
        return queued

    def _job(self, request: training_pb2.SubmitTrainingJobRequest) -> jobs_pb2.Job:
        """The validated, pinned job a submit would queue."""
        if request.max_attempts < 0:
            raise InvalidArgument(f"max_attempts must be >= 0 (0: the default), got {request.max_attempts}")
        if request.priority not in jobs_pb2.Priority.values():
            raise InvalidArgument(f"priority {request.priority} is unknown")
        spec, _ = resolve_spec(self.catalog, request.spec)
        check_parameter_budget(
            spec.architecture, self.queue.settings.max_model_parameters, "spec.architecture"
        )
        job = jobs_pb2.Job(
            kind=jobs_pb2.JOB_KIND_TRAINING,
            priority=request.priority,
            request_id=request.request_id,
            max_attempts=request.max_attempts,
        )
        job.training.CopyFrom(spec)
        return job
