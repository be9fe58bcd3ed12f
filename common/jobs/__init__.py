"""The Redis Streams job queue: submit/get/list/cancel (JobQueue), the worker loop
(Worker), what handlers see (JobContext, JobOutcome), and watching (watch_job).
See common/jobs/keys.py for the Redis data model."""

from common.jobs.context import JobContext, JobOutcome
from common.jobs.errors import JobCancelledError, PermanentJobError
from common.jobs.queue import JobQueue
from common.jobs.watch import watch_job
from common.jobs.worker import Worker

__all__ = [
    "JobCancelledError",
    "JobContext",
    "JobOutcome",
    "JobQueue",
    "PermanentJobError",
    "Worker",
    "watch_job",
]
