"""Open Inference Protocol tensor datatypes and how their bytes are held in numpy.

Kept free of torch so the command line can encode requests without importing it
(BF16 has no numpy type: it is held as its 16-bit pattern)."""

from __future__ import annotations

from typing import Any

import numpy as np

NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
}


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """BF16 values held as their 16-bit patterns, as float32 (exact: bf16 is a float32's top half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
