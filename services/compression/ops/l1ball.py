"""Exact Euclidean projection onto the L1 ball {w : ||w||_1 <= radius}
(Duchi, Shalev-Shwartz, Singer, Chandra 2008, the O(n log n) sort algorithm)."""

from __future__ import annotations

import torch
from torch import nn

from common.models.pruning import weight_layers


def project_l1_ball(v: torch.Tensor, radius: float) -> torch.Tensor:
    """argmin_w ||w - v||_2 s.t. ||w||_1 <= radius: soft-thresholding by the
    unique theta that puts the result on the ball's surface."""
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    flat = v.reshape(-1)
    magnitude = flat.abs()
    if float(magnitude.sum()) <= radius:
        return v.clone()
    u = torch.sort(magnitude.to(torch.float64), descending=True).values
    cumulative = torch.cumsum(u, dim=0)
    ranks = torch.arange(1, u.numel() + 1, dtype=torch.float64, device=u.device)
    # rho = the largest j with u_j > (sum_{i<=j} u_i - radius) / j.
    rho = int(torch.nonzero(u * ranks > cumulative - radius).max()) + 1
    theta = (cumulative[rho - 1] - radius) / rho
    shrunk = (magnitude.to(torch.float64) - theta).clamp_min(0.0).to(v.dtype)
    return (torch.sign(flat) * shrunk).reshape(v.shape)


@torch.no_grad()
def project_model_weights(model: nn.Module, radius: float) -> None:
    """Project the concatenation of all Linear and Conv2d weights (biases excluded)
    onto the L1 ball in place: the constraint is on the model's whole weight vector."""
    weights = [m.weight for m in weight_layers(model).values()]
    flat = torch.cat([w.reshape(-1) for w in weights])
    projected = project_l1_ball(flat, radius)
    for weight, part in zip(weights, projected.split([w.numel() for w in weights]), strict=True):
        weight.copy_(part.reshape(weight.shape))
