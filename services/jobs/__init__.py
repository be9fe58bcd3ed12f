"""JobService (Get/List/Watch/Cancel), hosted by the training and compression servers."""

from services.jobs.servicer import JobServicer

__all__ = ["JobServicer"]
