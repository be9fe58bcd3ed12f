"""Device selection: every model path takes its device from settings or the
job's spec, never assumes CPU."""

from __future__ import annotations

import torch

from common.api.modelfleet.common.v1 import model_pb2
from common.errors import FailedPrecondition

_BY_ENUM: dict[int, str] = {
    model_pb2.DEVICE_AUTO: "auto",
    model_pb2.DEVICE_CPU: "cpu",
    model_pb2.DEVICE_CUDA: "cuda",
}


def resolve_device(default: str, requested: int = model_pb2.DEVICE_UNSPECIFIED) -> torch.device:
    """The torch device for a request: the spec's choice, else the setting.

    ``auto`` means CUDA when available; asking for CUDA on a node without it is
    FAILED_PRECONDITION rather than a silent fallback.
    """
    choice = _BY_ENUM.get(int(requested), default)
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition("device cuda was requested but CUDA is not available on this node")
    return torch.device(choice)
