"""modelfleet's one error vocabulary.

Domain code raises these; exactly one place (``common.grpcserver.errors``) maps
them to gRPC status codes. Messages are shown to clients, so they say what was
wrong and where, and never carry internals. Anything else that escapes a
handler becomes INTERNAL with a generic message and a logged traceback.
"""

from __future__ import annotations


class ModelfleetError(Exception):
    """Base of all errors meant for the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ModelfleetError):
    """The request is malformed; retrying it unchanged will fail again."""


class NotFound(ModelfleetError):
    """A named model, version, dataset or job does not exist."""


class AlreadyExists(ModelfleetError):
    """The thing to create exists already."""


class FailedPrecondition(ModelfleetError):
    """The system is not in a state that allows the operation (e.g. cancel a finished job)."""


class ResourceExhausted(ModelfleetError):
    """A queue or size limit is full or exceeded; back off and retry."""


class Unauthenticated(ModelfleetError):
    """No valid credentials."""


class PermissionDenied(ModelfleetError):
    """Valid credentials without the needed role."""


class Unavailable(ModelfleetError):
    """Transient: the model is loading, the server is draining, a dependency is down."""


class DeadlineExceeded(ModelfleetError):
    """The request's deadline or timeout passed before it could run."""


class Cancelled(ModelfleetError):
    """The operation was cancelled."""


class DataLoss(ModelfleetError):
    """Stored data failed an integrity check."""
