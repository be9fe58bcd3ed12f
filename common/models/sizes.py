"""Helpers every built-in family shares: sizes taken from a dataset, and the
served tensors of a model with one FP32 input and one FP32 output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.api.modelfleet.common.v1 import model_pb2
from common.errors import InvalidArgument

# A served model's input and output tensors.
Specs = tuple[list[model_pb2.TensorSpec], list[model_pb2.TensorSpec]]


def fit_size(arch: Any, field: str, value: int, where: str, needed: str) -> None:
    """Set ``arch.<field>`` to ``value`` when left at 0; InvalidArgument when it
    was set to something else (``needed`` says what the dataset has)."""
    current = getattr(arch, field)
    if current == 0:
        setattr(arch, field, value)
    elif current != value:
        raise InvalidArgument(f"{where}.{field} is {current} but {needed}")


def io_specs(example_shape: Sequence[int], outputs: int) -> Specs:
    """``input`` FP32 [-1, *example_shape] and ``output`` FP32 [-1, outputs]."""
    inputs = [model_pb2.TensorSpec(name="input", datatype="FP32", shape=[-1, *example_shape])]
    return inputs, [model_pb2.TensorSpec(name="output", datatype="FP32", shape=[-1, outputs])]
