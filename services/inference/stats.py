"""Triton-style statistics per model version, mirrored as Prometheus metrics.

Updated once per batch by the batcher thread (plus failures from either side),
under one lock, so reading them for ModelStatistics is consistent and cheap.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from prometheus_client import Counter

from common.api.inference import grpc_predict_v2_pb2 as pb

_LABELS = ["model", "version"]
SUCCESS = Counter("modelfleet_inference_request_success", "Successful inference requests", _LABELS)
FAILURE = Counter("modelfleet_inference_request_failure", "Failed inference requests", _LABELS)
INFERENCES = Counter(
    "modelfleet_inference_count", "Inferences performed (rows; a batch of n counts n)", _LABELS
)
EXECUTIONS = Counter("modelfleet_inference_exec_count", "Model executions (batches)", _LABELS)
REQUEST_US = Counter("modelfleet_inference_request_duration_us", "Cumulative request duration", _LABELS)
QUEUE_US = Counter(
    "modelfleet_inference_queue_duration_us", "Cumulative time requests waited in queue", _LABELS
)
INPUT_US = Counter(
    "modelfleet_inference_compute_input_duration_us", "Cumulative input preparation time", _LABELS
)
INFER_US = Counter("modelfleet_inference_compute_infer_duration_us", "Cumulative forward-pass time", _LABELS)
OUTPUT_US = Counter(
    "modelfleet_inference_compute_output_duration_us", "Cumulative output preparation time", _LABELS
)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, count: int, ns: int) -> None:
        self.count += count
        self.ns += ns

    def proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class _BatchSize:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(frozen=True)
class BatchTiming:
    """One executed batch: its requests' end-to-end and queue times, and the phase times."""

    rows: int
    request_ns: list[int]
    queue_ns: list[int]
    input_ns: int
    infer_ns: int
    output_ns: int


class VersionStats:
    def __init__(self, model: str, version: str) -> None:
        self.model = model
        self.version = version
        self._lock = threading.Lock()
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.batches: dict[int, _BatchSize] = {}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        labels = (model, version)
        # Labelled children resolved once: .labels() is too slow for the hot path.
        self._m = [m.labels(*labels) for m in (SUCCESS, FAILURE, INFERENCES, EXECUTIONS)]
        self._us = [m.labels(*labels) for m in (REQUEST_US, QUEUE_US, INPUT_US, INFER_US, OUTPUT_US)]

    def record_batch(self, t: BatchTiming) -> None:
        n = len(t.request_ns)
        request_total = sum(t.request_ns)
        queue_total = sum(t.queue_ns)
        with self._lock:
            self.success.add(n, request_total)
            self.queue.add(n, queue_total)
            self.compute_input.add(n, t.input_ns * n)
            self.compute_infer.add(n, t.infer_ns * n)
            self.compute_output.add(n, t.output_ns * n)
            per_size = self.batches.setdefault(t.rows, _BatchSize())
            per_size.compute_input.add(1, t.input_ns)
            per_size.compute_infer.add(1, t.infer_ns)
            per_size.compute_output.add(1, t.output_ns)
            self.inference_count += t.rows
            self.execution_count += 1
            self.last_inference_ms = time.time_ns() // 1_000_000
        success, _, inferences, executions = self._m
        request_us, queue_us, input_us, infer_us, output_us = self._us
        success.inc(n)
        inferences.inc(t.rows)
        executions.inc()
        request_us.inc(request_total / 1000)
        queue_us.inc(queue_total / 1000)
        input_us.inc(t.input_ns * n / 1000)
        infer_us.inc(t.infer_ns * n / 1000)
        output_us.inc(t.output_ns * n / 1000)

    def record_failure(self, ns: int) -> None:
        with self._lock:
            self.fail.add(1, ns)
        self._m[1].inc()

    def proto(self) -> pb.ModelStatistics:
        with self._lock:
            return pb.ModelStatistics(
                name=self.model,
                version=self.version,
                last_inference=self.last_inference_ms,
                inference_count=self.inference_count,
                execution_count=self.execution_count,
                inference_stats=pb.InferStatistics(
                    success=self.success.proto(),
                    fail=self.fail.proto(),
                    queue=self.queue.proto(),
                    compute_input=self.compute_input.proto(),
                    compute_infer=self.compute_infer.proto(),
                    compute_output=self.compute_output.proto(),
                ),
                batch_stats=[
                    pb.InferBatchStatistics(
                        batch_size=size,
                        compute_input=s.compute_input.proto(),
                        compute_infer=s.compute_infer.proto(),
                        compute_output=s.compute_output.proto(),
                    )
                    for size, s in sorted(self.batches.items())
                ],
            )
