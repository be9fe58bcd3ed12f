"""Sharding and checkpoints, without processes or Redis."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from services.training.checkpoint import CheckpointDir, TrainState
from services.training.sharding import epoch_indices, eval_indices, iter_batches


def test_shards_cover_every_row_with_equal_lengths() -> None:
    shards = [epoch_indices(103, 4, rank, seed=7, epoch=2) for rank in range(4)]
    assert {len(s) for s in shards} == {26}  # padded: every rank takes the same number of steps
    assert set(np.concatenate(shards)) == set(range(103))
    again = epoch_indices(103, 4, 1, seed=7, epoch=2)
    assert np.array_equal(shards[1], again)
    assert not np.array_equal(shards[1], epoch_indices(103, 4, 1, seed=7, epoch=3))


def test_eval_shards_count_each_row_once() -> None:
    parts = [eval_indices(10, 3, rank) for rank in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))


def test_batches_follow_the_index_order() -> None:
    features = np.arange(20, dtype=np.float32).reshape(10, 2)
    labels = np.arange(10)
    order = np.array([9, 3, 5, 0, 1])
    batches = list(iter_batches(features, labels, order, 2, torch.device("cpu")))
    assert [b[1].tolist() for b in batches] == [[9, 3], [5, 0], [1]]
    assert batches[0][0].tolist() == [[18.0, 19.0], [6.0, 7.0]]


def test_checkpoint_round_trip_restores_weights_and_rng(tmp_path: Path) -> None:
    ckpt = CheckpointDir(tmp_path / "ckpt")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    state = TrainState(
        epoch=2,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        best_model=model.state_dict(),
        best_epoch=2,
        best_val_loss=0.25,
        best_metrics={"val_loss": 0.25},
    )
    ckpt.save_rng(2, 0, torch.device("cpu"))
    ckpt.save(state)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])

    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    assert ckpt.latest_epoch() == 2
    loaded = ckpt.load(2, 0, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]
    assert loaded.best_val_loss == 0.25 and loaded.best_metrics == {"val_loss": 0.25}
    assert torch.equal(loaded.model["weight"], model.weight)
    fresh = torch.optim.Adam(model.parameters())
    fresh.load_state_dict(loaded.optimizer)

    ckpt.save_rng(3, 0, torch.device("cpu"))
    ckpt.save(TrainState(epoch=3, model=state.model, optimizer=state.optimizer, best_model=state.model))
    assert sorted(p.name for p in ckpt.path.iterdir()) == ["rng-000003-0.pt", "state-000003.pt"]
    ckpt.clear()
    assert ckpt.latest_epoch() == 0
