"""One inference request, end to end: route, decode, queue, await, encode.

Everything up to the queueing runs synchronously in one event-loop step, so a
hot swap (which also runs on the loop) can never retire a version between a
request's routing and its queueing.
"""

from __future__ import annotations

import time

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.errors import InvalidArgument
from services.inference import classification, codec
from services.inference.repository import ModelRepository


class InferenceEngine:
    def __init__(self, repository: ModelRepository, reject_nan: bool) -> None:
        self.repository = repository
        self._reject_nan = reject_nan

    async def infer(
        self, request: pb.ModelInferRequest, time_remaining_s: float | None
    ) -> pb.ModelInferResponse:
        served = self.repository.route(request.model_name, request.model_version)
        signature = served.signature
        arrays, rows = signature.decode(request, self._reject_nan)
        outputs = signature.requested_outputs(request)
        counts = classification.requested_counts(request)
        priority, deadline_ns = _scheduling(request, time_remaining_s)
        if rows == 0 and signature.batchable:
            # Nothing to compute, and nothing a batch could wait on: empty outputs now.
            outs = codec.empty_outputs(served.model.outputs, outputs)
        else:
            outs = await served.batcher.submit(arrays, rows, outputs, priority, deadline_ns)
        if counts:
            outs = classification.classify(outs, counts, served.record.class_names)
        return codec.response(request, served.name, served.version, outs)


def _scheduling(request: pb.ModelInferRequest, time_remaining_s: float | None) -> tuple[int, int]:
    """(priority, deadline in perf_counter_ns or 0) from the ``priority`` and
    ``timeout`` (µs) parameters and the gRPC deadline, whichever is sooner."""
    priority = 0
    budget_ns = int(time_remaining_s * 1e9) if time_remaining_s is not None else 0
    params = request.parameters
    if params:
        if "priority" in params:
            priority = _int_param(params["priority"], "priority")
        if "timeout" in params:
            timeout_us = _int_param(params["timeout"], "timeout")
            if timeout_us < 0:
                raise InvalidArgument(f"parameter 'timeout' must be >= 0 microseconds, got {timeout_us}")
            if timeout_us and (not budget_ns or timeout_us * 1000 < budget_ns):
                budget_ns = timeout_us * 1000
    return priority, (time.perf_counter_ns() + budget_ns if budget_ns else 0)


def _int_param(param: pb.InferParameter, name: str) -> int:
    kind = param.WhichOneof("parameter_choice")
    if kind == "int64_param":
        return int(param.int64_param)
    if kind == "uint64_param":
        return int(param.uint64_param)
    raise InvalidArgument(f"parameter {name!r} must be an integer, got {kind or 'nothing'}")
