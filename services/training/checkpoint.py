"""Training checkpoints under ``<artifact_root>/checkpoints/<job_id>/``.

A checkpoint for epoch e is ``rng-<e>-<rank>.pt`` (one per rank: each rank's
torch/CUDA/numpy/python RNG state) plus ``state-<e>.pt`` (model, optimizer,
early-stopping bookkeeping), written by rank 0 only after every rank's RNG file
exists, so the presence of ``state-<e>.pt`` means the whole checkpoint is
there. Every file is written to a temp name and renamed. Everything is
tensors, numbers and strings, loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

_STATE = re.compile(r"^state-(\d{6})\.pt$")
FINAL_WEIGHTS = "final.safetensors"


@dataclass
class TrainState:
    """What a rank needs to continue after ``epoch`` completed epochs."""

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    best_model: dict[str, torch.Tensor]
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    stale_epochs: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)


def checkpoint_dir(artifact_root: Path, job_id: str) -> Path:
    return Path(artifact_root) / "checkpoints" / job_id


def _atomic_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _rng_state(device: torch.device) -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python_version": version,
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_bit_generator": numpy_state["bit_generator"],
        "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(numpy_state["state"]["pos"]),
        "numpy_has_gauss": int(numpy_state["has_gauss"]),
        "numpy_gauss": float(numpy_state["gauss"]),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python_mt"].tolist()), state["python_gauss"]))
    np.random.set_state(
        {
            "bit_generator": state["numpy_bit_generator"],
            "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
            "has_gauss": state["numpy_has_gauss"],
            "gauss": state["numpy_gauss"],
        }
    )
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class CheckpointDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def final_weights(self) -> Path:
        return self.path / FINAL_WEIGHTS

    def save_rng(self, epoch: int, rank: int, device: torch.device) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_save(_rng_state(device), self.path / f"rng-{epoch:06d}-{rank}.pt")

    def save(self, state: TrainState) -> None:
        """Publish epoch ``state.epoch`` (after every rank's save_rng) and drop older epochs."""
        self.path.mkdir(parents=True, exist_ok=True)
        payload = {
            "epoch": state.epoch,
            "model": state.model,
            "optimizer": state.optimizer,
            "best_model": state.best_model,
            "best_epoch": state.best_epoch,
            "best_val_loss": state.best_val_loss,
            "stale_epochs": state.stale_epochs,
            "best_metrics": state.best_metrics,
        }
        _atomic_save(payload, self.path / f"state-{state.epoch:06d}.pt")
        for old in self.path.iterdir():
            match = re.match(r"^(?:state|rng)-(\d{6})", old.name)
            if match and int(match.group(1)) < state.epoch:
                old.unlink(missing_ok=True)
        log.info("checkpoint written", extra={"epoch": state.epoch, "path": str(self.path)})

    def latest_epoch(self) -> int:
        """The newest complete checkpoint's epoch, 0 if there is none."""
        if not self.path.is_dir():
            return 0
        epochs = [int(m.group(1)) for p in self.path.iterdir() if (m := _STATE.match(p.name))]
        return max(epochs, default=0)

    def load(self, epoch: int, rank: int, device: torch.device) -> TrainState:
        """Epoch ``epoch``'s state, and restore ``rank``'s RNG state from it."""
        raw = torch.load(self.path / f"state-{epoch:06d}.pt", map_location=device, weights_only=True)
        rng = torch.load(self.path / f"rng-{epoch:06d}-{rank}.pt", map_location="cpu", weights_only=True)
        _set_rng_state(rng, device)
        return TrainState(
            epoch=int(raw["epoch"]),
            model=raw["model"],
            optimizer=raw["optimizer"],
            best_model=raw["best_model"],
            best_epoch=int(raw["best_epoch"]),
            best_val_loss=float(raw["best_val_loss"]),
            stale_epochs=int(raw["stale_epochs"]),
            best_metrics={k: float(v) for k, v in raw["best_metrics"].items()},
        )

    def save_final(self, weights: dict[str, torch.Tensor]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{FINAL_WEIGHTS}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp))
        os.replace(tmp, self.final_weights)

    def load_final(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.final_weights))

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
