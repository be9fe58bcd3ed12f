"""Tensor signatures read from a program: Open Inference Protocol datatypes of torch
dtypes, and the inputs/outputs a torch.export program was traced with."""

from __future__ import annotations

from typing import Any

import torch

from common.api.modelfleet.common.v1 import model_pb2
from common.errors import InvalidArgument

# Protocol datatype -> torch dtype (BF16 included: torch has it, numpy does not).
TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
}
_NAMES = {dtype: name for name, dtype in TORCH.items()}


def export_signature(
    program: torch.export.ExportedProgram,
) -> tuple[list[model_pb2.TensorSpec], list[model_pb2.TensorSpec]]:
    """The program's user inputs (named as traced) and outputs (``output``, or
    ``output_<i>`` for several), with dims traced as symbols as -1."""
    signature = program.graph_signature
    by_name = {node.name: node for node in program.graph.nodes}
    inputs = [_spec(name, by_name[name].meta.get("val"), "input") for name in signature.user_inputs]
    (returned,) = next(n for n in program.graph.nodes if n.op == "output").args
    values = [getattr(node, "meta", {}).get("val") for node in returned]
    names = ["output"] if len(values) == 1 else [f"output_{i}" for i in range(len(values))]
    outputs = [_spec(name, value, "output") for name, value in zip(names, values, strict=True)]
    return inputs, outputs


def _spec(name: str, value: Any, role: str) -> model_pb2.TensorSpec:
    if not isinstance(value, torch.Tensor):
        raise InvalidArgument(
            f"the program's {role} {name!r} is not a tensor; declare header.inputs and header.outputs"
        )
    datatype = _NAMES.get(value.dtype)
    if datatype is None:
        raise InvalidArgument(
            f"the program's {role} {name!r} has dtype {value.dtype}, which the protocol cannot carry"
        )
    shape = [dim if isinstance(dim, int) else -1 for dim in value.shape]
    return model_pb2.TensorSpec(name=name, datatype=datatype, shape=shape)
