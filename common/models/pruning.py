"""What compression needs from any built-in family's module: its weight layers
by state-dict name, and the bookkeeping of structured pruning (which rows and
columns of each weight survived), so pruning masks can follow a shrink."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Layers whose weights are pruned, projected and quantized (biases, BatchNorm and
# normalization buffers are left as they are).
WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)


def weight_layers(model: nn.Module) -> dict[str, nn.Linear | nn.Conv2d]:
    """Linear and Conv2d modules of ``model`` by qualified name, in forward order;
    ``f"{name}.weight"`` is the weight's state-dict key."""
    return {name: m for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}


@dataclass(frozen=True)
class Kept:
    """Indices a structured prune kept along a weight's output (dim 0) and input
    (dim 1) axes; None: that axis is whole."""

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None

    def slice(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            tensor = tensor[self.rows.to(tensor.device)]
        if self.cols is not None:
            tensor = tensor[:, self.cols.to(tensor.device)]
        return tensor


def units_to_keep(weight: torch.Tensor, sparsity: float, norm: int) -> torch.Tensor:
    """Sorted indices of the output units (rows: neurons, filters) kept: the
    largest-norm ``n - round(sparsity * n)`` (at least one); ties go to the lower index."""
    rows = weight.shape[0]
    keep = max(1, rows - round(sparsity * rows))
    scores = torch.linalg.vector_norm(weight.detach().reshape(rows, -1), ord=norm, dim=1)
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:keep]).values
