"""Follow a job over JobService.WatchJob, one progress-bar line per event."""

from __future__ import annotations

from typing import TextIO

from common.api.modelfleet.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from services.cli.client import print_json, to_dict

TERMINAL = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)
BAR_WIDTH = 30


def state_name(state: int) -> str:
    return str(jobs_pb2.JobState.Name(state)).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def progress_line(event: jobs_pb2.JobEvent) -> str:
    """``[#########.....]  60% RUNNING  epoch 3  train_loss=0.12  message``."""
    filled = round(min(max(event.progress, 0.0), 1.0) * BAR_WIDTH)
    parts = [f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {event.progress:4.0%}", state_name(event.state)]
    if event.epoch:
        parts.append(f"epoch {event.epoch}")
    parts += [f"{k}={v:.4g}" for k, v in sorted(event.metrics.items())]
    if event.message:
        parts.append(event.message)
    return "  ".join(parts)


def watch_job(
    stub: jobs_pb2_grpc.JobServiceStub,
    request: jobs_pb2.WatchJobRequest,
    metadata: list[tuple[str, str]],
    out: TextIO,
    as_json: bool = False,
) -> jobs_pb2.Job:
    """Stream a job's events until it is terminal and return the last record
    seen (state UNSPECIFIED if the stream ended before any event). On a
    terminal, the bar is redrawn in place; elsewhere it prints a line per event.
    gRPC errors propagate."""
    job = jobs_pb2.Job()
    in_place = out.isatty() and not as_json
    for response in stub.WatchJob(request, metadata=metadata):
        job = response.job
        if as_json:
            print_json(to_dict(response))
        else:
            line = progress_line(response.event)
            out.write(("\r\033[K" + line) if in_place else (line + "\n"))
            out.flush()
        if response.event.state in TERMINAL:  # `job` is the live record, even on replayed events
            break
    if in_place:
        out.write("\n")
    return job
