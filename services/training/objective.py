"""Losses and evaluation metrics for a TrainingSpec's task.

Evaluation returns *sums* (loss, correct predictions or squared error, rows)
so DDP ranks can all_reduce them and every rank derives identical metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.api.modelfleet.training.v1 import training_spec_pb2 as ts
from services.training.sharding import iter_batches

LossFn = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
EVAL_BATCH = 4096


def loss_fn(loss: int) -> LossFn:
    """``fn(output, labels, reduction)`` for a (bound) spec's loss."""
    if loss == ts.LOSS_CROSS_ENTROPY:
        return lambda out, y, reduction: F.cross_entropy(out, y.long(), reduction=reduction)
    regression: dict[int, Callable[..., torch.Tensor]] = {
        ts.LOSS_MSE: F.mse_loss,
        ts.LOSS_MAE: F.l1_loss,
        ts.LOSS_HUBER: F.huber_loss,
    }
    fn = regression[loss]
    return lambda out, y, reduction: fn(out.squeeze(-1), y.float(), reduction=reduction)


def l1_term(model: nn.Module) -> torch.Tensor:
    """Sum of absolute weights of the Linear layers (biases are not penalised)."""
    return torch.stack([m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.Linear)]).sum()


def evaluate_sums(
    layers: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    task: int,
    fn: LossFn,
    device: torch.device,
) -> torch.Tensor:
    """``[loss_sum, metric_sum, rows]`` over ``indices``: metric is correct
    predictions for classification, squared error for regression."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    was_training = layers.training
    layers.eval()
    with torch.no_grad():
        for x, y in iter_batches(features, labels, indices, EVAL_BATCH, device):
            out = layers(x)
            sums[0] += fn(out, y, "sum").double()
            if task == ts.TASK_CLASSIFICATION:
                sums[1] += (out.argmax(dim=1) == y).sum()
            else:
                sums[1] += ((out.squeeze(-1) - y.float()) ** 2).sum().double()
            sums[2] += len(y)
    layers.train(was_training)
    return sums


def metrics_from_sums(sums: torch.Tensor, task: int, prefix: str) -> dict[str, float]:
    """``<prefix>_loss`` and ``<prefix>_accuracy`` or ``<prefix>_mse``."""
    loss_sum, metric_sum, rows = (float(v) for v in sums.cpu())
    if rows == 0:
        return {}
    metric = "accuracy" if task == ts.TASK_CLASSIFICATION else "mse"
    return {f"{prefix}_loss": loss_sum / rows, f"{prefix}_{metric}": metric_sum / rows}
