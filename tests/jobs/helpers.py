"""Small builders and bounded waits shared by the job tests."""

from __future__ import annotations

import time
from collections.abc import Callable

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.training.v1 import training_spec_pb2
from common.jobs import JobContext, JobOutcome


def training_job(
    command: str = "ok", priority: int = 0, request_id: str = "", max_attempts: int = 0
) -> jobs_pb2.Job:
    """A training job whose spec.description tells the test handlers what to do."""
    return jobs_pb2.Job(
        kind=jobs_pb2.JOB_KIND_TRAINING,
        priority=priority,  # type: ignore[arg-type]
        request_id=request_id,
        max_attempts=max_attempts,
        training=training_spec_pb2.TrainingSpec(dataset_name="d", model_name="m", description=command),
    )


def outcome(version: str = "1") -> JobOutcome:
    return JobOutcome(result=jobs_pb2.JobResult(model_name="m", model_version=version), metrics={"loss": 0.5})


def wait_for(check: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def ok_handler(ctx: JobContext) -> JobOutcome:
    return outcome()
