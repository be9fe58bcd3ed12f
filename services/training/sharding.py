"""Deterministic data sharding for DDP ranks, like torch's DistributedSampler:
every epoch a permutation fixed by (seed, epoch), padded so each rank gets the
same number of rows (and therefore the same number of steps, which DDP needs),
rank r taking every world_size-th row from r. A resumed job sees exactly the
order it would have seen without the crash."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

# Rows gathered from the memory map at once: large enough to amortise the
# fancy-indexing call, small enough to bound a rank's memory on big datasets.
BLOCK_ROWS = 65_536


def epoch_indices(num_rows: int, world_size: int, rank: int, seed: int, epoch: int) -> np.ndarray:
    """Row indices of ``rank``'s shard for ``epoch`` (0-based), shuffled."""
    rng = np.random.default_rng([seed % 2**63, epoch])
    order = rng.permutation(num_rows)
    padded = -(-num_rows // world_size) * world_size
    if padded > num_rows:
        order = np.concatenate([order, order[: padded - num_rows]])
    return order[rank::world_size]


def eval_indices(num_rows: int, world_size: int, rank: int) -> np.ndarray:
    """Unpadded, unshuffled shard for evaluation: every row counted exactly once."""
    return np.arange(rank, num_rows, world_size)


def iter_batches(
    features: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    batch_size: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``indices`` rows, in order, gathered block-wise from the
    (memory-mapped) arrays and moved to ``device``."""
    block = max(batch_size, BLOCK_ROWS // batch_size * batch_size)
    for start in range(0, len(indices), block):
        rows = indices[start : start + block]
        x = torch.from_numpy(np.ascontiguousarray(features[rows])).to(device, non_blocking=True)
        y = torch.from_numpy(np.ascontiguousarray(labels[rows])).to(device, non_blocking=True)
        for offset in range(0, len(rows), batch_size):
            yield x[offset : offset + batch_size], y[offset : offset + batch_size]
