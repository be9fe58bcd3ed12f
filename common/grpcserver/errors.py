"""The one mapping from modelfleet errors to gRPC status codes."""

from __future__ import annotations

import grpc
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common import errors

STATUS_CODES: dict[type[errors.ModelfleetError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
}


# Failures of the Redis every service keeps its state in: transient (UNAVAILABLE,
# retry) or full (RESOURCE_EXHAUSTED: maxmemory with noeviction refuses writes).
DEPENDENCY_ERRORS: dict[type[BaseException], tuple[grpc.StatusCode, str]] = {
    RedisConnectionError: (grpc.StatusCode.UNAVAILABLE, "Redis is unreachable; retry later"),
    RedisTimeoutError: (grpc.StatusCode.UNAVAILABLE, "Redis did not answer in time; retry later"),
    RedisOutOfMemoryError: (grpc.StatusCode.RESOURCE_EXHAUSTED, "Redis is out of memory; writes are refused"),
}


def dependency_failure(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(code, message) when ``exc`` is a dependency's failure, not a bug."""
    for kind in type(exc).__mro__:
        found = DEPENDENCY_ERRORS.get(kind)
        if found is not None:
            return found
    return None


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind in type(exc).__mro__:
        code = STATUS_CODES.get(kind)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
