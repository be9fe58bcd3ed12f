"""Unstructured magnitude pruning: argmin ||w - W||_F^2 s.t. ||w||_0 <= k is
solved exactly by keeping the k largest |W|; k = round((1 - sparsity) * n)."""

from __future__ import annotations

import torch
from torch import nn

from common.models.pruning import weight_layers


def keep_count(numel: int, sparsity: float) -> int:
    return round((1.0 - sparsity) * numel)


def topk_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest entries; ties go to the lower
    flat index (a stable sort), so the result never depends on chance."""
    flat = magnitudes.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order[:k]] = True
    return mask.reshape(magnitudes.shape)


def magnitude_masks(weights: list[torch.Tensor], sparsity: float, global_scope: bool) -> list[torch.Tensor]:
    """Masks of surviving weights, per tensor or over all tensors at once."""
    if not global_scope:
        return [topk_mask(w.detach().abs(), keep_count(w.numel(), sparsity)) for w in weights]
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights])
    mask = topk_mask(flat, keep_count(flat.numel(), sparsity))
    return [
        part.reshape(w.shape)
        for part, w in zip(mask.split([w.numel() for w in weights]), weights, strict=True)
    ]


@torch.no_grad()
def prune_magnitude(model: nn.Module, sparsity: float, global_scope: bool) -> dict[str, torch.Tensor]:
    """Zero all but the largest weights of every Linear and Conv2d layer in place
    (biases are kept). Returns the masks keyed by the weight's state-dict name."""
    layers = weight_layers(model)
    weights = [m.weight for m in layers.values()]
    masks = magnitude_masks(weights, sparsity, global_scope)
    for weight, mask in zip(weights, masks, strict=True):
        weight.mul_(mask)
    return {f"{name}.weight": mask for name, mask in zip(layers, masks, strict=True)}
