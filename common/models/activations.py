"""The ``Activation`` enum as torch modules, for every family that takes one."""

from __future__ import annotations

from torch import nn

from common.api.modelfleet.common.v1 import model_pb2

ACTIVATIONS: dict[int, type[nn.Module]] = {
    model_pb2.ACTIVATION_UNSPECIFIED: nn.ReLU,
    model_pb2.ACTIVATION_RELU: nn.ReLU,
    model_pb2.ACTIVATION_GELU: nn.GELU,
    model_pb2.ACTIVATION_TANH: nn.Tanh,
    model_pb2.ACTIVATION_SIGMOID: nn.Sigmoid,
    model_pb2.ACTIVATION_SILU: nn.SiLU,
}
