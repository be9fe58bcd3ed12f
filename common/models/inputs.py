"""The input transform a dataset's preprocessing bakes into every model trained
on it: missing-value fill, then shift and scale, per feature (any family)."""

from __future__ import annotations

import torch
from torch import nn

from common.api.modelfleet.common.v1 import model_pb2


class Normalize(nn.Module):
    """y = (x - shift) / scale, per feature, after missing (NaN) inputs take their
    ``fill`` value when the dataset was imputed; buffers travel with the weights."""

    shift: torch.Tensor
    scale: torch.Tensor
    fill: torch.Tensor | None

    def __init__(self, num_features: int, impute: bool = False) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(num_features))
        self.register_buffer("scale", torch.ones(num_features))
        self.register_buffer("fill", torch.zeros(num_features) if impute else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fill is not None:
            x = torch.where(torch.isnan(x), self.fill, x)
        return (x - self.shift) / self.scale

    @torch.no_grad()
    def load(self, norm: model_pb2.Normalization) -> None:
        """Copy a dataset's normalization into the buffers."""
        if norm.shift:  # kind NONE with only a fill keeps shift 0, scale 1
            self.shift.copy_(torch.tensor(list(norm.shift), dtype=torch.float32))
            self.scale.copy_(torch.tensor(list(norm.scale), dtype=torch.float32))
        if self.fill is not None:
            self.fill.copy_(torch.tensor(list(norm.fill), dtype=torch.float32))


def is_normalized(norm: model_pb2.Normalization) -> bool:
    """Whether ``norm`` transforms inputs: a shift and scale, or a missing-value fill."""
    return norm.kind in (model_pb2.NORMALIZATION_KIND_ZSCORE, model_pb2.NORMALIZATION_KIND_MINMAX) or bool(
        norm.fill
    )


def input_transform(width: int, norm: model_pb2.Normalization | None) -> nn.Module:
    """``norm`` as a module over ``width`` features (its values loaded), or identity."""
    if norm is None or not is_normalized(norm):
        return nn.Identity()
    module = Normalize(width, impute=bool(norm.fill))
    module.load(norm)
    return module
