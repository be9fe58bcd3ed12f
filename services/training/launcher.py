"""Parent side of a DDP job: spawn ``world_size`` rank processes, forward their
reports, relay cancellation, and make sure no rank outlives the attempt.

Ranks are started with the *spawn* context (forking after CUDA or gloo
initialisation is unsafe). They talk back on a spawn-context queue; the parent
polls it together with ``cancelled()`` and the ranks' exit codes, so every
wait is bounded and a crashed rank ends the attempt instead of hanging it.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from services.training.trainer import RankJob, run_rank

log = logging.getLogger(__name__)

POLL_S = 0.1
# After the ranks were told to stop (cancel, failure), how long they get to exit.
EXIT_GRACE_S = 30.0


class RankFailedError(RuntimeError):
    """A rank died or reported an error; retried unless ``permanent`` (the rank's
    error would recur on any attempt: bad input, an allocation that cannot fit)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class TrainingCancelledError(RuntimeError):
    """The ranks stopped because the job was cancelled."""


@dataclass
class TrainSummary:
    metrics: dict[str, float] = field(default_factory=dict)
    epochs_run: int = 0
    best_epoch: int = 0
    stopped_early: bool = False
    resumed_from_epoch: int = 0


OnEpoch = Callable[[int, dict[str, float]], None]


def launch(
    job: RankJob,
    world_size: int,
    *,
    on_epoch: OnEpoch,
    on_log: Callable[[str], None],
    cancelled: Callable[[], bool],
) -> TrainSummary:
    """Run the ranks to completion; raises TrainingCancelledError or RankFailedError."""
    ctx = mp.get_context("spawn")
    events: Any = ctx.Queue()
    stop = ctx.Event()
    rendezvous = Path(tempfile.mkdtemp(prefix="mf-ddp-"))
    job = replace(job, rendezvous_file=str(rendezvous / "store"), parent_pid=os.getpid())
    procs = [
        ctx.Process(target=run_rank, args=(rank, job, events, stop), daemon=True)
        for rank in range(world_size)
    ]
    summary: TrainSummary | None = None
    failure = ""
    permanent = False
    was_cancelled = False
    try:
        for proc in procs:
            proc.start()
        while any(p.is_alive() for p in procs) or not events.empty():
            try:
                kind, payload = events.get(timeout=POLL_S)
            except queue.Empty:
                kind, payload = "", {}
            if kind == "epoch":
                on_epoch(int(payload["epoch"]), dict(payload["metrics"]))
            elif kind == "resumed":
                on_log(f"resumed from the checkpoint of epoch {payload['epoch']}")
            elif kind == "done":
                summary = TrainSummary(**payload)
            elif kind == "cancelled":
                was_cancelled = True
            elif kind == "error" and not failure:
                failure = f"rank {payload['rank']}: {payload['message']}"
                permanent = bool(payload.get("permanent"))
            if not stop.is_set() and cancelled():
                log.info("cancel requested; stopping ranks")
                was_cancelled = True
                stop.set()
            crashed = [p for p in procs if p.exitcode not in (None, 0)]
            if crashed and not stop.is_set():
                failure = failure or f"rank {procs.index(crashed[0])} exited with code {crashed[0].exitcode}"
                stop.set()
                # Peers may be blocked in a collective with the dead rank.
                _terminate(procs)
    finally:
        _terminate(procs)
        events.close()
        shutil.rmtree(rendezvous, ignore_errors=True)
    if was_cancelled:
        raise TrainingCancelledError("training cancelled")
    if failure or summary is None:
        raise RankFailedError(failure or "ranks exited without a result", permanent)
    return summary


def _terminate(procs: list[Any]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(EXIT_GRACE_S)
        if proc.is_alive():
            proc.kill()
            proc.join()
