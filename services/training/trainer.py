"""One DDP rank of a training job (the body of each spawned process).

Each rank memory-maps the dataset's shards from the artifact store, trains on
its deterministic share of every epoch (services.training.sharding), and agrees
with the other ranks once per step whether to stop (cancel or parent gone), so
a cancel reaches every rank within one step and no rank is left waiting in a
collective. Rank 0 reports per-epoch metrics and writes checkpoints and the
final weights; the parent process (services.training.launcher) turns those
into job progress and a registered model.

Messages to the parent are ``(kind, payload)`` tuples on a spawn-context queue:
``resumed``, ``epoch``, ``cancelled``, ``done``, ``error``.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.api.modelfleet.data.v1 import data_pb2
from common.api.modelfleet.training.v1 import training_spec_pb2 as ts
from common.artifacts import ArtifactStore
from common.datasets import DatasetRecord, SplitShards, load_split
from common.jobs.errors import is_deterministic
from common.logging import job_id_var, setup_logging
from common.models.families import family_of
from services.training import augment
from services.training.checkpoint import CheckpointDir, TrainState
from services.training.objective import evaluate_sums, l1_term, loss_fn, metrics_from_sums
from services.training.sharding import epoch_indices, eval_indices, iter_batches

log = logging.getLogger(__name__)

# A rank that waits longer than this in a collective has lost a peer.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


@dataclass(frozen=True)
class RankJob:
    """Everything a rank needs, as plain values (it crosses a spawn boundary)."""

    job_id: str
    spec: bytes  # TrainingSpec bound to the dataset (services.training.spec.bind_to_dataset)
    dataset_meta: bytes  # DatasetVersion
    shards: dict[str, tuple[str, str | None]]  # split -> (features digest, labels digest)
    artifact_root: str
    checkpoint_dir: str
    device: str  # "cpu" or "cuda"
    rendezvous_file: str  # torch.distributed FileStore for this launch
    resume_epoch: int  # 0: fresh start; else the checkpoint to continue from
    parent_pid: int
    torch_threads: int
    log_level: str
    log_format: str


def _optimizer(spec: ts.TrainingSpec, params: Any) -> torch.optim.Optimizer:
    if spec.optimizer == ts.OPTIMIZER_SGD:
        return torch.optim.SGD(
            params, lr=spec.learning_rate, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    if spec.optimizer == ts.OPTIMIZER_ADAMW:
        return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    return torch.optim.Adam(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def run_rank(rank: int, job: RankJob, events: Any, stop: Any) -> None:
    """Process entry point; a failure is reported to the parent and exits non-zero."""
    # Ctrl-C reaches the whole process group; the worker turns it into a warm
    # shutdown that lets this job finish, so the ranks must not die of it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(job.log_level, job.log_format)
    job_id_var.set(job.job_id)
    try:
        _Rank(rank, job, events, stop).run()
    except Exception as exc:
        log.exception("rank %d failed", rank)
        message = f"{type(exc).__name__}: {exc}"
        events.put(("error", {"rank": rank, "message": message, "permanent": is_deterministic(exc)}))
        raise SystemExit(1) from exc


class _Rank:
    def __init__(self, rank: int, job: RankJob, events: Any, stop: Any) -> None:
        self.rank = rank
        self.job = job
        self.events = events
        self.stop = stop
        self.spec = ts.TrainingSpec.FromString(job.spec)
        self.world_size = self.spec.world_size
        self.distributed = self.world_size > 1
        if job.device == "cuda":
            self.device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device(job.device)
        # Control-plane collectives (stop flag, metric sums, barriers) run on CPU
        # tensors; with NCCL they get their own gloo group so they never force a
        # CUDA synchronisation.
        self.control: Any = None
        self._pending: tuple[Any, torch.Tensor] | None = None

    def _put(self, kind: str, payload: dict[str, Any]) -> None:
        if self.rank == 0:
            self.events.put((kind, payload))

    def run(self) -> None:
        torch.set_num_threads(self.job.torch_threads)
        if not self.distributed:
            self._train()
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"file://{self.job.rendezvous_file}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )
        try:
            self.control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
            self._train()
            self._settle_pending()
        finally:
            dist.destroy_process_group()

    def _sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks of a small CPU tensor."""
        values = values.detach().to("cpu", torch.float64)
        if self.distributed:
            dist.all_reduce(values, group=self.control)
        return values

    def _should_stop(self) -> bool:
        """Whether every rank should stop before this step. Each call sends this
        rank's flag and reads the agreement sent one step earlier, so the
        collective overlaps a step of compute instead of stalling every step;
        a cancel still reaches all ranks within one step."""
        local = self.stop.is_set() or os.getppid() != self.job.parent_pid
        if not self.distributed:
            return bool(local)
        previous = self._pending
        flag = torch.tensor([1.0 if local else 0.0])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control, async_op=True)
        self._pending = (work, flag)
        if previous is None:
            return False
        previous[0].wait()
        return bool(previous[1].item() > 0)

    def _settle_pending(self) -> None:
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def _split(self, record: DatasetRecord, split: str) -> tuple[np.ndarray, np.ndarray] | None:
        if split not in record.shards:
            return None
        store = ArtifactStore(self.job.artifact_root)
        features, labels = load_split(store, record, split)
        if labels is None:
            raise ValueError(f"split {split!r} has no labels")
        return features, labels

    def _train(self) -> None:
        spec, rank, ws = self.spec, self.rank, self.world_size
        record = DatasetRecord(
            meta=data_pb2.DatasetVersion.FromString(self.job.dataset_meta),
            shards={k: SplitShards(features=f, labels=lab) for k, (f, lab) in self.job.shards.items()},
        )
        train = self._split(record, "train")
        if train is None:
            raise ValueError("the dataset has no train split")
        val = self._split(record, "val")

        # Same initial weights on every rank (DDP broadcasts rank 0's anyway);
        # different dropout streams per rank.
        torch.manual_seed(spec.seed)
        family, arch = family_of(spec.architecture)
        model = family.build(arch).to(self.device)
        body = family.trainable(model)  # takes the shards' normalized features
        optimizer = _optimizer(spec, model.parameters())
        rank_seed = (spec.seed + 1 + rank) % 2**32
        torch.manual_seed(rank_seed)
        np.random.seed(rank_seed)
        random.seed(rank_seed)

        ckpt = CheckpointDir(Path(self.job.checkpoint_dir))
        state = TrainState(epoch=0, model={}, optimizer={}, best_model={})
        if self.job.resume_epoch:
            state = ckpt.load(self.job.resume_epoch, rank, self.device)
            model.load_state_dict(state.model)
            optimizer.load_state_dict(state.optimizer)
            self._put("resumed", {"epoch": state.epoch})
            log.info("resumed from checkpoint", extra={"epoch": state.epoch, "rank": rank})

        net: nn.Module = model
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = DistributedDataParallel(model, device_ids=ids)
        fn = loss_fn(spec.loss)
        per_rank_batch = spec.batch_size // ws
        features, labels = train
        patience, min_delta = spec.early_stopping.patience, spec.early_stopping.min_delta
        stopped_early = False

        shape = tuple(record.meta.example_shape)
        augmenting = augment.enabled(spec.augmentation)
        for epoch in range(state.epoch, spec.epochs):
            model.train()
            indices = epoch_indices(len(features), ws, rank, spec.seed, epoch)
            # Seeded by rank and epoch, so a resumed run draws what it would have.
            draws = torch.Generator().manual_seed((rank_seed << 20) + epoch)
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            started = time.perf_counter()
            for x, y in iter_batches(features, labels, indices, per_rank_batch, self.device):
                if self._should_stop():
                    self._put("cancelled", {"epoch": epoch})
                    return
                if augmenting:
                    x = augment.augment(x, shape, spec.augmentation, draws)
                out = net(x)
                loss = fn(out, y, "mean")
                objective = loss + spec.l1_penalty * l1_term(model) if spec.l1_penalty else loss
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(y)
            elapsed = time.perf_counter() - started
            train_sums = self._sum(torch.stack([loss_sum.cpu(), torch.tensor(float(len(indices)))]))
            # Each rank timed its own share; the slowest defines the epoch.
            slowest = self._max(elapsed)
            metrics = {
                "train_loss": float(train_sums[0] / train_sums[1]),
                "samples_per_second": float(train_sums[1]) / max(slowest, 1e-9),
            }
            if val is not None:
                sums = evaluate_sums(
                    body, *val, eval_indices(len(val[0]), ws, rank), spec.task, fn, self.device
                )
                metrics.update(metrics_from_sums(self._sum(sums), spec.task, "val"))
            done = epoch + 1
            state.epoch = done
            if val is None or metrics["val_loss"] < state.best_val_loss - min_delta:
                state.best_val_loss = metrics.get("val_loss", float("inf"))
                state.best_epoch = done
                state.best_metrics = dict(metrics)
                state.stale_epochs = 0
                if val is not None:
                    state.best_model = _snapshot(model)
            else:
                state.stale_epochs += 1
            stopped_early = bool(patience) and state.stale_epochs >= patience
            self._put("epoch", {"epoch": done, "metrics": metrics})
            if done % spec.checkpoint_interval_epochs == 0 and done < spec.epochs and not stopped_early:
                self._checkpoint(ckpt, state, model, optimizer)
            if stopped_early:
                break

        if rank == 0:
            if val is not None:
                model.load_state_dict(state.best_model)
            ckpt.save_final(_snapshot(body))
        self._put(
            "done",
            {
                "metrics": state.best_metrics,
                "epochs_run": state.epoch,
                "best_epoch": state.best_epoch,
                "stopped_early": stopped_early,
                "resumed_from_epoch": self.job.resume_epoch,
            },
        )

    def _max(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return float(t.item())

    def _checkpoint(
        self, ckpt: CheckpointDir, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        ckpt.save_rng(state.epoch, self.rank, self.device)
        if self.distributed:
            dist.barrier(group=self.control)
        if self.rank == 0:
            state.model = _snapshot(model)
            state.optimizer = optimizer.state_dict()
            ckpt.save(state)
