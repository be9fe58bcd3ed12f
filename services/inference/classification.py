"""The Open Inference Protocol classification extension, as Triton implements it:
a requested output with parameter ``classification: k`` is answered with the top
``k`` classes of each row instead of the scores, as BYTES strings
``"<score>:<index>:<label>"`` (``"<score>:<index>"`` when the model has no class
names), so ``tritonclient``'s ``InferRequestedOutput(name, class_count=k)`` works."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.datatypes import NUMPY, bf16_to_float32
from common.errors import InvalidArgument
from services.inference.codec import OutputTensor

PARAMETER = "classification"


def requested_counts(request: pb.ModelInferRequest) -> dict[str, int]:
    """Output name -> k for the outputs the request wants classified."""
    counts: dict[str, int] = {}
    for wanted in request.outputs:
        if PARAMETER not in wanted.parameters:
            continue
        param = wanted.parameters[PARAMETER]
        kind = param.WhichOneof("parameter_choice")
        if kind not in ("int64_param", "uint64_param"):
            got = kind or "nothing"
            raise InvalidArgument(
                f"output {wanted.name!r}: parameter 'classification' must be an integer, got {got}"
            )
        k = int(getattr(param, kind))
        if k < 1:
            raise InvalidArgument(f"output {wanted.name!r}: parameter 'classification' must be >= 1, got {k}")
        counts[wanted.name] = k
    return counts


def classify(
    outputs: Sequence[OutputTensor], counts: dict[str, int], labels: Sequence[str]
) -> list[OutputTensor]:
    """``outputs`` with each output named in ``counts`` replaced by its top-k classes."""
    return [_top_k(out, counts[out.name], labels) if out.name in counts else out for out in outputs]


def _top_k(out: OutputTensor, k: int, labels: Sequence[str]) -> OutputTensor:
    if out.datatype not in NUMPY or out.datatype == "BOOL":
        raise InvalidArgument(f"output {out.name!r} holds {out.datatype}, which cannot be classified")
    scores = _as_float(np.frombuffer(out.data, dtype=NUMPY[out.datatype]), out.datatype)
    # Triton's rule: the first dim is the batch when there is more than one.
    rows = scores.reshape(out.shape[0], -1) if len(out.shape) > 1 else scores.reshape(1, -1)
    k = min(k, rows.shape[1])
    order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    encoded = bytearray()
    for row, indices in zip(rows, order, strict=True):
        for index in indices:
            text = f"{row[index]:f}:{index}"
            if index < len(labels):
                text += f":{labels[index]}"
            data = text.encode()
            encoded += struct.pack("<I", len(data)) + data
    shape = (rows.shape[0], k) if len(out.shape) > 1 else (k,)
    return OutputTensor(out.name, "BYTES", shape, bytes(encoded))


def _as_float(values: np.ndarray, datatype: str) -> np.ndarray:
    if datatype == "BF16":
        return bf16_to_float32(values)
    return values.astype(np.float64)
