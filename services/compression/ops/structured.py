"""Structured pruning: drop whole hidden neurons with the smallest incoming
weight norm and physically shrink the Linear layers (the neuron's row in its
layer and its column in the next), so the model really computes less."""

from __future__ import annotations

import torch

from common.api.modelfleet.common.v1 import model_pb2
from common.models.mlp import MLP


def neurons_to_keep(weight: torch.Tensor, sparsity: float, norm: int) -> torch.Tensor:
    """Sorted indices of the rows (neurons) kept: the largest-norm
    ``n - round(sparsity * n)`` rows (at least one); ties go to the lower index."""
    rows = weight.shape[0]
    keep = max(1, rows - round(sparsity * rows))
    scores = torch.linalg.vector_norm(weight.detach(), ord=norm, dim=1)
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:keep]).values


@torch.no_grad()
def prune_neurons(model: MLP, sparsity: float, norm: int) -> tuple[MLP, dict[int, torch.Tensor]]:
    """A smaller copy of ``model`` with each hidden layer's weakest neurons removed.

    Returns the new model and, per index in ``model.layers`` of every Linear
    whose outputs shrank, the kept output indices (to carry masks across)."""
    source = model.linears()
    kept: list[torch.Tensor] = [neurons_to_keep(layer.weight, sparsity, norm) for layer in source[:-1]]
    arch = model_pb2.MlpArchitecture()
    arch.CopyFrom(model.arch)
    del arch.hidden_sizes[:]
    arch.hidden_sizes.extend(int(k.numel()) for k in kept)
    smaller = MLP(arch, normalized=not isinstance(model.norm, torch.nn.Identity))
    smaller.norm.load_state_dict(model.norm.state_dict())
    for i, (old, new) in enumerate(zip(source, smaller.linears(), strict=True)):
        weight: torch.Tensor = old.weight
        bias: torch.Tensor = old.bias
        if i < len(kept):
            weight, bias = weight[kept[i]], bias[kept[i]]
        if i > 0:
            weight = weight[:, kept[i - 1]]
        new.weight.copy_(weight)
        new.bias.copy_(bias)
    linear_indices = [i for i, m in enumerate(model.layers) if isinstance(m, torch.nn.Linear)]
    return smaller.to(source[0].weight.device), dict(zip(linear_indices, kept, strict=False))
