"""Batches of one split in a seeded order, resumable from a row offset.

The order is a pure function of (rows, shuffle, seed), so a consumer that
reconnects with ``start_offset`` continues exactly where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from common.api.modelfleet.data.v1 import data_pb2
from common.errors import InvalidArgument

DEFAULT_BATCH = 256
MAX_BATCH = 65536
SPLIT_NAMES = {
    data_pb2.SPLIT_UNSPECIFIED: "all",
    data_pb2.SPLIT_TRAIN: "train",
    data_pb2.SPLIT_VAL: "val",
    data_pb2.SPLIT_TEST: "test",
}


@dataclass(frozen=True)
class BatchPlan:
    order: np.ndarray  # row indices in streaming order
    batch_size: int
    start: int
    example_shape: tuple[int, ...]  # of one row, as the dataset version records it


def plan(
    rows: int,
    example_shape: tuple[int, ...],
    request: data_pb2.StreamBatchesRequest,
    max_message_bytes: int,
) -> BatchPlan:
    num_features = math.prod(example_shape)
    size = request.batch_size or DEFAULT_BATCH
    if not 0 < size <= MAX_BATCH:
        raise InvalidArgument(f"batch_size must be in 1..{MAX_BATCH}, not {request.batch_size}")
    # Leave room for labels and framing in the message limit.
    if size * (num_features * 4 + 8) + 1024 > max_message_bytes:
        raise InvalidArgument(
            f"batch_size {size} x {num_features} features exceeds the message limit "
            f"of {max_message_bytes} bytes"
        )
    if not 0 <= request.start_offset <= rows:
        raise InvalidArgument(f"start_offset must be in 0..{rows}, not {request.start_offset}")
    if request.seed < 0:
        raise InvalidArgument(f"seed must be >= 0, not {request.seed}")
    order = np.random.default_rng(request.seed).permutation(rows) if request.shuffle else np.arange(rows)
    return BatchPlan(
        order=order, batch_size=size, start=int(request.start_offset), example_shape=example_shape
    )


def offsets(batch_plan: BatchPlan) -> Iterator[int]:
    return iter(range(batch_plan.start, len(batch_plan.order), batch_plan.batch_size))


def make_batch(
    batch_plan: BatchPlan, offset: int, features: np.ndarray, labels: np.ndarray | None
) -> data_pb2.StreamBatchesResponse:
    """One batch starting at ``offset`` of the order (reads only those rows of the memmap)."""
    rows = batch_plan.order[offset : offset + batch_plan.batch_size]
    x = np.ascontiguousarray(features[rows], dtype="<f4")
    out = data_pb2.StreamBatchesResponse(
        offset=offset,
        rows=len(rows),
        num_features=int(features.shape[1]),
        features=x.tobytes(),
        example_shape=batch_plan.example_shape,
    )
    if labels is not None:
        dtype = "<i8" if labels.dtype.kind in "iu" else "<f4"
        out.labels = np.ascontiguousarray(labels[rows], dtype=dtype).tobytes()
        out.label_dtype = "int64" if dtype == "<i8" else "float32"
    return out
