"""Open Inference Protocol tensors <-> numpy/torch, checked against a model's specs.

The hot path is kept allocation-light: raw inputs are viewed with
``np.frombuffer`` (no copy), the batcher concatenates once per batch, and
outputs leave as ``tobytes`` of row slices of one numpy view of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.modelfleet.common.v1 import model_pb2
from common.datatypes import NUMPY
from common.errors import FailedPrecondition, InvalidArgument
from common.models.signature import TORCH


@dataclass(frozen=True)
class DType:
    name: str
    # How the bytes are held in numpy (BF16 has no numpy type: held as uint16).
    numpy: np.dtype[Any]
    torch: torch.dtype
    # The InferTensorContents field for typed contents; None = raw only.
    field: str | None


# The InferTensorContents field of each datatype; BF16 travels raw only.
_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BF16": None,
}
DTYPES: dict[str, DType] = {
    name: DType(name, NUMPY[name], TORCH[name], field) for name, field in _CONTENTS.items()
}
_BY_TORCH = {d.torch: d for d in DTYPES.values()}
_FLOATS = frozenset({"FP16", "FP32", "FP64", "BF16"})


@dataclass(frozen=True)
class _Input:
    index: int
    name: str
    dtype: DType
    shape: tuple[int, ...]


class Signature:
    """A model's inputs/outputs, prepared once per loaded version for fast checks."""

    def __init__(
        self,
        model: str,
        inputs: Sequence[model_pb2.TensorSpec],
        outputs: Sequence[model_pb2.TensorSpec],
        accepts_missing: bool = False,
    ) -> None:
        self.model = model
        # The model fills NaN inputs itself (its dataset was imputed); Inf is still refused.
        self.accepts_missing = accepts_missing
        self.inputs: list[_Input] = []
        for i, spec in enumerate(inputs):
            dtype = DTYPES.get(spec.datatype)
            if dtype is None:
                raise InvalidArgument(
                    f"model {model!r}: input {spec.name!r} has unsupported datatype {spec.datatype!r}"
                )
            self.inputs.append(_Input(i, spec.name, dtype, tuple(spec.shape)))
        self._by_name = {t.name: t for t in self.inputs}
        self.outputs = [spec.name for spec in outputs]
        self.output_index = {name: i for i, name in enumerate(self.outputs)}
        # Requests concatenate along dim 0 only when every input has a variable first dim.
        self.batchable = bool(self.inputs) and all(t.shape and t.shape[0] == -1 for t in self.inputs)
        # Whether zeros of the declared shapes are a real input: a variable dim past
        # the batch (an image's height) has no size to probe with.
        self.probe_ready = all(d > 0 for t in self.inputs for d in t.shape[1:])

    def decode(self, request: pb.ModelInferRequest, reject_nan: bool) -> tuple[list[np.ndarray], int]:
        """The request's inputs in model order, and its row count (batch dim)."""
        tensors = request.inputs
        raw = request.raw_input_contents
        if raw and len(raw) != len(tensors):
            raise InvalidArgument(
                f"raw_input_contents has {len(raw)} entries but the request has {len(tensors)} inputs"
            )
        arrays: list[np.ndarray | None] = [None] * len(self.inputs)
        for position, tensor in enumerate(tensors):
            spec = self._by_name.get(tensor.name)
            if spec is None:
                expected = ", ".join(repr(t.name) for t in self.inputs)
                raise InvalidArgument(
                    f"input {tensor.name!r} is not an input of model {self.model!r} (expected {expected})"
                )
            if arrays[spec.index] is not None:
                raise InvalidArgument(f"input {tensor.name!r} is given more than once")
            arrays[spec.index] = self._decode_one(tensor, spec, raw[position] if raw else None, reject_nan)
        for spec, array in zip(self.inputs, arrays, strict=True):
            if array is None:
                raise InvalidArgument(f"input {spec.name!r} of model {self.model!r} is missing")
        decoded: list[np.ndarray] = arrays  # type: ignore[assignment]  # all filled, checked above
        rows = 1
        if self.batchable:
            rows = decoded[0].shape[0]
            for spec, array in zip(self.inputs, decoded, strict=True):
                if array.shape[0] != rows:
                    raise InvalidArgument(
                        f"input {spec.name!r} has {array.shape[0]} rows "
                        f"but input {self.inputs[0].name!r} has {rows}"
                    )
        return decoded, rows

    def _decode_one(
        self, tensor: pb.ModelInferRequest.InferInputTensor, spec: _Input, raw: bytes | None, reject_nan: bool
    ) -> np.ndarray:
        name = tensor.name
        if tensor.datatype != spec.dtype.name:
            raise InvalidArgument(
                f"input {name!r} has datatype {tensor.datatype!r} "
                f"but model {self.model!r} expects {spec.dtype.name}"
            )
        shape = tuple(tensor.shape)
        _check_shape(name, shape, spec.shape)
        count = math.prod(shape)
        dtype = spec.dtype
        if raw is not None:
            if tensor.HasField("contents"):
                raise InvalidArgument(f"input {name!r} mixes raw_input_contents with typed contents")
            expected = count * dtype.numpy.itemsize
            if len(raw) != expected:
                raise InvalidArgument(
                    f"input {name!r} has {len(raw)} raw bytes "
                    f"but shape {list(shape)} of {dtype.name} needs {expected}"
                )
            array = np.frombuffer(raw, dtype=dtype.numpy).reshape(shape)
        else:
            if dtype.field is None:
                raise InvalidArgument(f"input {name!r}: {dtype.name} must be sent in raw_input_contents")
            values = getattr(tensor.contents, dtype.field)
            if len(values) != count:
                raise InvalidArgument(
                    f"input {name!r} has {len(values)} values in contents.{dtype.field} "
                    f"but shape {list(shape)} needs {count}"
                )
            try:
                array = np.asarray(values, dtype=dtype.numpy).reshape(shape)
            except OverflowError:
                raise InvalidArgument(f"input {name!r} has values out of range for {dtype.name}") from None
        if reject_nan and dtype.name in _FLOATS and not _all_finite(array, dtype, self.accepts_missing):
            if self.accepts_missing:
                raise InvalidArgument(f"input {name!r} contains Inf values, which this server rejects")
            raise InvalidArgument(f"input {name!r} contains NaN or Inf values, which this server rejects")
        return array

    def requested_outputs(self, request: pb.ModelInferRequest) -> list[int] | None:
        """Indices of the outputs to return, or None for all of them."""
        if not request.outputs:
            return None
        chosen = []
        for wanted in request.outputs:
            index = self.output_index.get(wanted.name)
            if index is None:
                raise InvalidArgument(
                    f"requested output {wanted.name!r} is not an output of model {self.model!r} "
                    f"(outputs: {', '.join(self.outputs)})"
                )
            chosen.append(index)
        return chosen


def _check_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if len(shape) != len(expected):
        raise InvalidArgument(
            f"input {name!r} has shape {list(shape)} but the model expects {list(expected)}"
        )
    for got, want in zip(shape, expected, strict=True):
        if got < 0 or (want >= 0 and got != want):
            raise InvalidArgument(
                f"input {name!r} has shape {list(shape)} but the model expects {list(expected)}"
            )


def _all_finite(array: np.ndarray, dtype: DType, nan_ok: bool = False) -> bool:
    values = torch.from_numpy(array.copy()).view(torch.bfloat16) if dtype.name == "BF16" else array
    lib: Any = torch if dtype.name == "BF16" else np
    if nan_ok:
        return not bool(lib.isinf(values).any())
    return bool(lib.isfinite(values).all())


def batch_tensor(arrays: Sequence[np.ndarray], dtype: DType, device: torch.device) -> torch.Tensor:
    """One input of a batch: the requests' arrays concatenated along dim 0 (a copy,
    so read-only request buffers are never handed to torch)."""
    joined = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0].copy()
    tensor = torch.from_numpy(joined)
    if dtype.torch is torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.to(device, non_blocking=True)


def output_array(name: str, tensor: torch.Tensor) -> tuple[str, np.ndarray]:
    """A model output as (protocol datatype, numpy view of its little-endian bytes)."""
    dtype = _BY_TORCH.get(tensor.dtype)
    if dtype is None:
        raise FailedPrecondition(
            f"model output {name!r} has dtype {tensor.dtype}, which the protocol cannot carry"
        )
    tensor = tensor.detach().to("cpu").contiguous()
    if dtype.torch is torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return dtype.name, tensor.numpy()


def outputs_of(result: Any, names: Sequence[str]) -> list[torch.Tensor]:
    """A module's return value as tensors in spec order (tensor, tuple/list, or dict)."""
    if isinstance(result, torch.Tensor):
        values: list[Any] = [result]
    elif isinstance(result, dict):
        missing = [n for n in names if n not in result]
        if missing:
            raise FailedPrecondition(f"model returned no output named {missing[0]!r}")
        values = [result[n] for n in names]
    elif isinstance(result, list | tuple):
        values = list(result)
    else:
        raise FailedPrecondition(f"model returned {type(result).__name__}, not tensors")
    if len(values) != len(names):
        raise FailedPrecondition(f"model returned {len(values)} outputs but declares {len(names)}")
    for name, value in zip(names, values, strict=True):
        if not isinstance(value, torch.Tensor):
            raise FailedPrecondition(f"model output {name!r} is {type(value).__name__}, not a tensor")
    return values


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes


def response(
    request: pb.ModelInferRequest, model: str, version: str, outputs: Sequence[OutputTensor]
) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(
        model_name=model,
        model_version=version,
        id=request.id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name=o.name, datatype=o.datatype, shape=o.shape)
            for o in outputs
        ],
        raw_output_contents=[o.data for o in outputs],
    )


def empty_outputs(specs: Sequence[model_pb2.TensorSpec], wanted: list[int] | None) -> list[OutputTensor]:
    """The answer to a request with 0 rows: every requested output with 0 rows.
    A model that declares an output dimension as variable beyond the batch cannot
    say its shape without running, so such a request is refused."""
    chosen = range(len(specs)) if wanted is None else wanted
    outs = []
    for index in chosen:
        spec = specs[index]
        rest = list(spec.shape[1:])
        if any(dim < 0 for dim in rest):
            raise InvalidArgument(
                f"a request with 0 rows cannot be answered: output {spec.name!r} has shape "
                f"{list(spec.shape)}, whose other dimensions are known only from data"
            )
        outs.append(OutputTensor(spec.name, spec.datatype, (0, *rest), b""))
    return outs


def zero_inputs(signature: Signature, rows: int, device: torch.device) -> list[torch.Tensor]:
    """Warm-up and upload-probe inputs on ``device``: zeros, a variable first dim
    set to ``rows`` (callers check ``signature.probe_ready`` for the others)."""
    tensors = []
    for spec in signature.inputs:
        shape = [(rows if i == 0 else 1) if d < 0 else d for i, d in enumerate(spec.shape)]
        tensors.append(batch_tensor([np.zeros(shape, dtype=spec.dtype.numpy)], spec.dtype, device))
    return tensors
