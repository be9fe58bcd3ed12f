"""A compression job's measured report as a table: source, compressed and their ratio."""

from __future__ import annotations

from common.api.modelfleet.compression.v1 import compression_spec_pb2 as spec_pb2
from services.cli.client import print_table

# (row label, ModelMeasurements field, value format)
_MEASURES = (
    ("parameters", "parameters", "{:,}"),
    ("nonzero parameters", "nonzero_parameters", "{:,}"),
    ("bytes on disk", "bytes_on_disk", "{:,}"),
    ("latency batch 1 (ms)", "latency_batch1_ms", "{:.3f}"),
    ("latency batch 32 (ms)", "latency_batch32_ms", "{:.3f}"),
)


def print_compression_report(report: spec_pb2.CompressionReport) -> None:
    source, compressed = report.source, report.compressed
    rows: list[tuple[str, str, str, str]] = []
    for label, field, fmt in _MEASURES:
        before, after = getattr(source, field), getattr(compressed, field)
        rows.append((label, fmt.format(before), fmt.format(after), _ratio(before, after)))
    if source.metric_name:
        drop = source.metric_value - compressed.metric_value
        rows.append(
            (
                source.metric_name,
                f"{source.metric_value:.4f}",
                f"{compressed.metric_value:.4f}",
                f"drop {drop:+.4f}",
            )
        )
    print_table(("measure", "source", "compressed", "source/compressed"), rows)
    for note in report.notes:
        print(f"note: {note}")


def _ratio(before: float, after: float) -> str:
    """How many times smaller (or faster) the compressed model is; '' when unmeasured."""
    return f"{before / after:.2f}x" if before > 0 and after > 0 else ""
