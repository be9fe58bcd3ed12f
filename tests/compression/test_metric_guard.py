"""The compression report's guard and notes: a job whose metric falls more than
spec.max_metric_drop (default 0.05) fails with both figures, and the notes say
what was measured instead of promising a speed-up."""

from __future__ import annotations

import math

import pytest

from common.api.modelfleet.compression.v1 import compression_spec_pb2 as S
from common.errors import InvalidArgument
from services.compression.report import DEFAULT_MAX_METRIC_DROP, check_metric_drop, measured_notes
from services.compression.spec import validate_fields


def _report(
    metric: str, before: float, after: float, b1: tuple[float, float] = (1.0, 1.0)
) -> S.CompressionReport:
    return S.CompressionReport(
        source=S.ModelMeasurements(
            metric_name=metric,
            metric_value=before,
            bytes_on_disk=400,
            latency_batch1_ms=b1[0],
            latency_batch32_ms=2.0,
        ),
        compressed=S.ModelMeasurements(
            metric_name=metric,
            metric_value=after,
            bytes_on_disk=100,
            latency_batch1_ms=b1[1],
            latency_batch32_ms=1.0,
        ),
    )


def _spec(max_metric_drop: float | None = None) -> S.CompressionSpec:
    spec = S.CompressionSpec(
        source_model="m", steps=[S.CompressionStep(magnitude_pruning=S.MagnitudePruning(sparsity=0.8))]
    )
    if max_metric_drop is not None:
        spec.max_metric_drop = max_metric_drop
    return spec


def test_an_accuracy_collapse_fails_with_both_figures() -> None:
    # What was seen: 80% pruning + int8 took accuracy from 0.95 to 0.375 and the job SUCCEEDED.
    reason = check_metric_drop(_report("accuracy", 0.95, 0.375), _spec())
    assert reason is not None
    assert (
        "0.9500" in reason
        and "0.3750" in reason
        and "0.5750" in reason
        and "nothing was registered" in reason
    )


def test_within_the_default_bound_passes_and_the_bound_is_settable() -> None:
    assert check_metric_drop(_report("accuracy", 0.95, 0.95 - DEFAULT_MAX_METRIC_DROP / 2), _spec()) is None
    assert check_metric_drop(_report("accuracy", 0.95, 0.375), _spec(max_metric_drop=0.6)) is None
    assert check_metric_drop(_report("accuracy", 0.95, 0.94), _spec(max_metric_drop=0.0)) is not None


def test_for_mse_a_rise_is_the_drop() -> None:
    assert check_metric_drop(_report("mse", 0.10, 0.50), _spec()) is not None
    assert check_metric_drop(_report("mse", 0.50, 0.10), _spec()) is None


def test_no_metric_measured_means_nothing_to_guard() -> None:
    assert check_metric_drop(_report("", 0.0, 0.0), _spec()) is None


@pytest.mark.parametrize("bound", [-0.1, math.nan])
def test_a_negative_or_nan_bound_is_refused_at_submit(bound: float) -> None:
    with pytest.raises(InvalidArgument, match="max_metric_drop"):
        validate_fields(_spec(max_metric_drop=bound))


def test_notes_report_a_measured_slowdown_as_a_slowdown() -> None:
    # int8 on a tiny model: 3.7x slower at batch 1 was once reported as "fast".
    notes = measured_notes(_report("accuracy", 0.95, 0.95, b1=(0.10, 0.37)))
    assert "measured: 3.70x slower at batch 1 (0.100 -> 0.370 ms)" in notes
    assert "measured: 2.00x faster at batch 32 (2.000 -> 1.000 ms)" in notes
    assert "measured: 4.00x smaller on disk (400 -> 100 bytes)" in notes
    assert any("accuracy 0.9500 -> 0.9500" in n for n in notes)
