"""One server interceptor: authentication and role checks, request ids in contextvars, Prometheus metrics,
request logging, and the mapping of domain errors to gRPC status codes."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Histogram

from common.auth import ANONYMOUS, Authenticator, principal_var
from common.errors import InvalidArgument, ModelfleetError
from common.grpcserver.drain import Drain
from common.grpcserver.enums import check_enums
from common.grpcserver.errors import dependency_failure, status_for
from common.logging import method_var, request_id_var

log = logging.getLogger(__name__)

REQUESTS = Counter("modelfleet_grpc_requests_total", "gRPC calls handled", ["method", "code"])
LATENCY = Histogram(
    "modelfleet_grpc_request_seconds",
    "gRPC call duration",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


# Request ids for callers that send no x-request-id: unique per process, cheap on the hot path.
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)
# Longest status message sent; longer ones are cut (see cut_message).
MAX_MESSAGE_CHARS = 1024


class _MethodMetrics:
    """The labelled metric children of one method, looked up once."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.latency = LATENCY.labels(method)
        self._counts: dict[grpc.StatusCode, Any] = {}

    def count(self, code: grpc.StatusCode) -> None:
        child = self._counts.get(code)
        if child is None:
            child = self._counts[code] = REQUESTS.labels(self.method, code.name)
        child.inc()


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator, drain: Drain) -> None:
        self._auth = authenticator
        self._drain = drain
        # Wrapped handlers per method: grpc asks on every call, the answer never changes.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return None
            public = self._auth.is_public(method)
            if public and not self._auth.enabled:
                return handler
            wrapped = self._wrapped[method] = _wrap(handler, method, self._auth, public, self._drain)
        if self._drain.draining and not self._auth.is_public(method):
            return _refusal(wrapped, self._drain.refusal(), _MethodMetrics(method), read_first=True)
        if self._auth.enabled and not self._auth.is_public(method):
            # Refuse from the headers alone, before the body is read: an unauthenticated
            # 200 MB request must not cost 200 MB (gRPC reads a unary request whole
            # before calling its handler).
            try:
                self._auth.authorize(method, self._auth.authenticate(details.invocation_metadata))
            except ModelfleetError as exc:
                return _refusal(wrapped, exc, _MethodMetrics(method))
        return wrapped


def _refusal(
    handler: grpc.RpcMethodHandler, exc: ModelfleetError, metrics: _MethodMetrics, read_first: bool = False
) -> grpc.RpcMethodHandler:
    """A handler that answers ``exc``. Unless ``read_first``, it does not read the
    request: a streaming-request handler, so gRPC does not receive a unary request's
    message first. A unary caller that is still sending when the answer comes may see
    CANCELLED instead, so a refusal that is not about the body's cost (draining)
    reads a unary request first."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if read_first and not handler.request_streaming:

        async def refuse_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await _fail(exc, metrics, context)

        if handler.response_streaming:

            async def refuse_unary_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                await _fail(exc, metrics, context)
                yield  # pragma: no cover - never reached: _fail aborts

            return grpc.unary_stream_rpc_method_handler(refuse_unary_stream, **kwargs)
        return grpc.unary_unary_rpc_method_handler(refuse_unary, **kwargs)
    if not handler.response_streaming:

        async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await _fail(exc, metrics, context)

        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)

    async def refuse_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _fail(exc, metrics, context)
        yield  # pragma: no cover - never reached: _fail aborts

    return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)


def _begin(method: str, auth: Authenticator, public: bool, context: grpc.aio.ServicerContext) -> float:
    metadata = context.invocation_metadata()
    request_id = ""
    for key, value in metadata or ():
        if key == "x-request-id":
            request_id = value if isinstance(value, str) else value.decode()
    request_id_var.set(request_id or f"{_ID_PREFIX}{next(_ID_COUNTER):x}")
    method_var.set(method)
    if public:
        principal_var.set(ANONYMOUS if not auth.enabled else None)
    else:
        principal = auth.authenticate(metadata)
        auth.authorize(method, principal)
        principal_var.set(principal)
    return time.perf_counter()


async def _fail(exc: BaseException, metrics: _MethodMetrics, context: grpc.aio.ServicerContext) -> None:
    method = metrics.method
    code = status_for(exc)
    if isinstance(exc, ModelfleetError):
        message = cut_message(exc.message)
        log.info("request rejected", extra={"code": code.name, "reason": message})
    elif isinstance(exc, NotImplementedError):
        # Generated servicer base classes raise it for RPCs a service does not implement.
        code, message = grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server"
    elif (failure := dependency_failure(exc)) is not None:
        code, message = failure
        log.warning("dependency failed", extra={"code": code.name, "reason": f"{type(exc).__name__}: {exc}"})
    else:
        message = "internal error; see server logs"
        log.exception("unhandled error in %s", method)
    metrics.count(code)
    await context.abort(code, message)


def cut_message(message: str) -> str:
    """A status message short enough for any client: messages echo client values
    (names, versions), and a status line past the peer's metadata limit (8 KiB by
    default) reaches the client as RESOURCE_EXHAUSTED instead of the real error."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 15] + "... (truncated)"


def _done(metrics: _MethodMetrics, start: float, context: grpc.aio.ServicerContext) -> None:
    metrics.count(context.code() or grpc.StatusCode.OK)
    metrics.latency.observe(time.perf_counter() - start)


class _Undecodable:
    """A request message that did not parse. grpc answers a deserializer's exception
    with UNKNOWN and the exception's text, so the deserializer hands this over instead
    and the handler wrapper turns it into INVALID_ARGUMENT."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return parse


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"request message is not valid protobuf: {request.reason}")
    check_enums(request)
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


def _wrap(
    handler: grpc.RpcMethodHandler, method: str, auth: Authenticator, public: bool, drain: Drain
) -> grpc.RpcMethodHandler:
    kwargs = {
        "request_deserializer": _lenient(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    streaming_in = handler.request_streaming
    metrics = _MethodMetrics(method)

    def checked(request: Any) -> Any:
        return _decoded_stream(request) if streaming_in else _decoded(request)

    if not handler.response_streaming:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            drain.enter()
            try:
                start = _begin(method, auth, public, context)
                response = await inner(checked(request), context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _fail(exc, metrics, context)
            finally:
                drain.leave()
            _done(metrics, start, context)
            return response

        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)

    inner_stream = handler.unary_stream or handler.stream_stream

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        drain.enter()
        try:
            start = _begin(method, auth, public, context)
            async for item in inner_stream(checked(request), context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(exc, metrics, context)
        finally:
            drain.leave()
        _done(metrics, start, context)

    if handler.request_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
    return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
