"""Fine-tuning on a dataset's (normalized) train split, optionally distilled
from a teacher, with a hook after every optimizer step (re-apply pruning
masks, project onto the L1 ball) and one after every epoch (progress, cancel).

Shards hold normalized features, so both student and teacher run ``.layers``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TrainData:
    features: torch.Tensor  # float32 [rows, features], normalized
    targets: torch.Tensor  # int64 [rows] (classification) or float32 [rows] / [rows, outputs]
    classification: bool


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int
    learning_rate: float
    batch_size: int
    # Projected gradient descent needs plain gradient steps; otherwise Adam.
    sgd: bool = False
    distillation_weight: float = 0.0
    temperature: float = 2.0
    seed: int = 0


def task_loss(outputs: torch.Tensor, targets: torch.Tensor, classification: bool) -> torch.Tensor:
    if classification:
        return F.cross_entropy(outputs, targets)
    return F.mse_loss(outputs, targets.reshape(outputs.shape))


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, classification: bool
) -> torch.Tensor:
    """Hinton et al.: KL between softened distributions, scaled by T^2 so its
    gradient size does not depend on T; regression distils the outputs by MSE."""
    if not classification:
        return F.mse_loss(student, teacher)
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, dim=1),
        F.log_softmax(teacher / t, dim=1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)


def finetune(
    layers: nn.Module,
    data: TrainData,
    config: FinetuneConfig,
    *,
    teacher: nn.Module | None = None,
    after_step: Callable[[], None] = lambda: None,
    after_epoch: Callable[[int, float], None] = lambda epoch, loss: None,
) -> float:
    """Train ``layers`` in place; returns the last epoch's mean loss."""
    device = next(layers.parameters()).device
    x = data.features.to(device)
    y = data.targets.to(device)
    params = [p for p in layers.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=config.learning_rate)
        if config.sgd
        else torch.optim.Adam(params, lr=config.learning_rate)
    )
    generator = torch.Generator().manual_seed(config.seed)
    use_teacher = teacher is not None and config.distillation_weight > 0
    mean_loss = float("nan")
    layers.train()
    try:
        for epoch in range(1, config.epochs + 1):
            order = torch.randperm(x.shape[0], generator=generator).to(device)
            total, seen = 0.0, 0
            for start in range(0, x.shape[0], config.batch_size):
                batch = order[start : start + config.batch_size]
                outputs = layers(x[batch])
                loss = task_loss(outputs, y[batch], data.classification)
                if use_teacher and teacher is not None:
                    with torch.no_grad():
                        soft = teacher(x[batch])
                    w = config.distillation_weight
                    loss = (1 - w) * loss + w * distillation_loss(
                        outputs, soft, config.temperature, data.classification
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                after_step()
                total += float(loss.detach()) * batch.numel()
                seen += batch.numel()
            mean_loss = total / max(seen, 1)
            after_epoch(epoch, mean_loss)
    finally:
        layers.eval()
    return mean_loss
