"""Exceptions a job handler raises to steer the worker, and which failures are final."""

from __future__ import annotations

import sys

from common.errors import DataLoss, InvalidArgument, NotFound


class PermanentJobError(Exception):
    """Retrying cannot help (bad spec, missing dataset or model): fail the job now."""


class JobCancelledError(Exception):
    """The handler saw ``ctx.cancelled()`` and stopped; the job ends CANCELLED."""


def is_deterministic(exc: BaseException) -> bool:
    """Whether ``exc`` would recur on every attempt: bad or missing input, corrupt
    artifacts, an allocation that cannot fit (host or device memory)."""
    if isinstance(exc, InvalidArgument | NotFound | DataLoss | MemoryError):
        return True
    torch = sys.modules.get("torch")  # a torch error can only come from a loaded torch
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)
