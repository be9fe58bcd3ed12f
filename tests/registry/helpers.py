"""Small real models for upload tests."""

from __future__ import annotations

import io

import torch
from safetensors.torch import save

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.models.mlp import build_model

torch.set_num_threads(1)

ARCH = model_pb2.Architecture(mlp=model_pb2.MlpArchitecture(input_size=4, hidden_sizes=[8], output_size=3))


def mlp_bytes(arch: model_pb2.Architecture = ARCH) -> bytes:
    """A freshly initialised MLP's state dict as safetensors bytes."""
    state = {k: v.contiguous() for k, v in build_model(arch).state_dict().items()}
    return save(state)


def torchscript_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), buffer)
    return buffer.getvalue()


def mlp_header(name: str = "iris", **fields: object) -> registry_pb2.UploadModelHeader:
    header = registry_pb2.UploadModelHeader(
        name=name,
        format=registry_pb2.MODEL_FORMAT_SAFETENSORS,
        architecture=ARCH,
        metrics={"test_accuracy": 0.9},
        description="uploaded in a test",
    )
    for key, value in fields.items():
        setattr(header, key, value)
    return header
