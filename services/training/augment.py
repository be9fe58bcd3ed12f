"""Train-split image augmentation in the training loader: random crop with zero
padding and horizontal flip, on a batch of flattened [C, H, W] examples, on the
batch's device, from the rank's own generator (so a resumed run is seeded)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from common.api.modelfleet.training.v1 import training_spec_pb2 as ts


def enabled(spec: ts.Augmentation) -> bool:
    return spec.random_crop_padding > 0 or spec.horizontal_flip


def augment(
    x: torch.Tensor, example_shape: Sequence[int], spec: ts.Augmentation, generator: torch.Generator
) -> torch.Tensor:
    """``x`` [B, C*H*W] with each image flipped and/or shifted by a random crop."""
    channels, height, width = example_shape
    images = x.reshape(len(x), channels, height, width)
    n, where = len(x), generator.device
    if spec.horizontal_flip:
        flip = (torch.rand(n, generator=generator, device=where) < 0.5).to(x.device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    pad = spec.random_crop_padding
    if pad:
        padded = F.pad(images, (pad, pad, pad, pad))
        top = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=where).to(x.device)
        left = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=where).to(x.device)
        rows = (top[:, None] + torch.arange(height, device=x.device))[:, None, :, None]
        cols = (left[:, None] + torch.arange(width, device=x.device))[:, None, None, :]
        batch = torch.arange(len(x), device=x.device)[:, None, None, None]
        channel = torch.arange(channels, device=x.device)[None, :, None, None]
        images = padded[batch, channel, rows, cols]
    return images.reshape(len(x), -1)
