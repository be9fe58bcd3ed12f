"""Exceptions a job handler raises to steer the worker."""

from __future__ import annotations


class PermanentJobError(Exception):
    """Retrying cannot help (bad spec, missing dataset or model): fail the job now."""


class JobCancelledError(Exception):
    """The handler saw ``ctx.cancelled()`` and stopped; the job ends CANCELLED."""
