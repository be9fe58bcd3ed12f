"""Measurements for the compression report: parameter counts, size on disk,
latency at batch 1 and 32 on this worker, and the task metric on held-out data.

Latency is the median of a bounded number of timed calls after warm-up, on the
module exactly as served (raw inputs in, float32 out)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from common.api.modelfleet.compression.v1 import compression_spec_pb2 as spec_pb2
from services.compression.ops.finetune import TrainData

WARMUP_CALLS = 3
TIMED_CALLS = 20


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the float model (weights, biases,
    BatchNorm affine; not buffers such as normalization or running statistics)."""
    total = nonzero = 0
    for tensor in model.parameters():
        total += tensor.numel()
        nonzero += int(torch.count_nonzero(tensor))
    return total, nonzero


@torch.inference_mode()
def latency_ms(
    module: nn.Module,
    example_shape: Sequence[int],
    batch: int,
    device: torch.device,
    calls: int = TIMED_CALLS,
) -> float:
    x = torch.randn(batch, *example_shape, device=device)
    timings: list[float] = []
    for i in range(WARMUP_CALLS + calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        module(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= WARMUP_CALLS:
            timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)


@torch.inference_mode()
def task_metric(layers: nn.Module, data: TrainData, batch_size: int = 1024) -> tuple[str, float]:
    """Accuracy (classification) or MSE over all outputs (regression) of
    ``layers`` on normalized features."""
    device = _module_device(layers)
    hits = 0.0
    elements = 0
    for start in range(0, data.features.shape[0], batch_size):
        x = data.features[start : start + batch_size].to(device)
        y = data.targets[start : start + batch_size].to(device)
        out = layers(x).float()
        if data.classification:
            hits += float((out.argmax(dim=1) == y).sum())
            elements += y.numel()
        else:
            hits += float(((out - y.reshape(out.shape).float()) ** 2).sum())
            elements += out.numel()
    return ("accuracy" if data.classification else "mse"), hits / max(elements, 1)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    # int8 dynamic layers hold packed weights, not parameters; they run on CPU only.
    return torch.device("cpu")


def measure(
    module: nn.Module,
    body: nn.Module,
    float_model: nn.Module,
    example_shape: Sequence[int],
    bytes_on_disk: int,
    device: torch.device,
    data: TrainData | None,
) -> spec_pb2.ModelMeasurements:
    """``module`` is what serves (raw inputs of ``example_shape``) and ``body``
    its part taking normalized features; ``float_model`` the same weights in
    float32 for counting; ``data`` the normalized evaluation split."""
    parameters, nonzero = count_parameters(float_model)
    out = spec_pb2.ModelMeasurements(
        parameters=parameters,
        nonzero_parameters=nonzero,
        bytes_on_disk=bytes_on_disk,
        latency_batch1_ms=latency_ms(module, example_shape, 1, device),
        latency_batch32_ms=latency_ms(module, example_shape, 32, device),
    )
    if data is not None:
        out.metric_name, out.metric_value = task_metric(body, data)
    return out


# Used when CompressionSpec.max_metric_drop is unset.
DEFAULT_MAX_METRIC_DROP = 0.05


def metric_drop(report: spec_pb2.CompressionReport) -> float:
    """How much worse the compressed model's task metric is (a rise for mse)."""
    before, after = report.source.metric_value, report.compressed.metric_value
    return after - before if report.compressed.metric_name == "mse" else before - after


def check_metric_drop(report: spec_pb2.CompressionReport, spec: spec_pb2.CompressionSpec) -> str | None:
    """Why the job must fail (the metric fell more than the spec allows), or None."""
    if not report.compressed.metric_name:
        return None
    bound = spec.max_metric_drop if spec.HasField("max_metric_drop") else DEFAULT_MAX_METRIC_DROP
    drop = metric_drop(report)
    if drop <= bound:
        return None
    name = report.compressed.metric_name
    return (
        f"test {name} went from {report.source.metric_value:.4f} to {report.compressed.metric_value:.4f} "
        f"(a drop of {drop:.4f}), more than spec.max_metric_drop {bound:g}; nothing was registered"
    )


def measured_notes(report: spec_pb2.CompressionReport) -> list[str]:
    """What the measurements say, so no note claims a speed-up the worker did not see."""
    src, out = report.source, report.compressed
    notes = []
    if src.bytes_on_disk and out.bytes_on_disk:
        notes.append(
            f"measured: {src.bytes_on_disk / out.bytes_on_disk:.2f}x smaller on disk "
            f"({src.bytes_on_disk:,} -> {out.bytes_on_disk:,} bytes)"
        )
    for batch, before, after in (
        (1, src.latency_batch1_ms, out.latency_batch1_ms),
        (32, src.latency_batch32_ms, out.latency_batch32_ms),
    ):
        if before > 0 and after > 0:
            ratio = before / after
            verdict = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
            notes.append(f"measured: {verdict} at batch {batch} ({before:.3f} -> {after:.3f} ms)")
    if out.metric_name:
        notes.append(
            f"measured: test {out.metric_name} {src.metric_value:.4f} -> {out.metric_value:.4f} "
            f"({out.metric_value - src.metric_value:+.4f})"
        )
    return notes
