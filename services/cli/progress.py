"""Follow a job over JobService.WatchJob and draw a progress bar."""

from __future__ import annotations

from typing import TextIO

from common.api.modelfleet.jobs.v1 import jobs_pb2, jobs_pb2_grpc

TERMINAL = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)
BAR_WIDTH = 30
# Metrics worth a place on the bar line, in order.
SHOWN = ("train_loss", "val_loss", "val_accuracy", "val_mse", "samples_per_second")


def render(job: jobs_pb2.Job, event: jobs_pb2.JobEvent) -> str:
    fraction = min(max(job.progress, 0.0), 1.0)
    filled = round(fraction * BAR_WIDTH)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    state = jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
    parts = [f"[{bar}] {fraction * 100:5.1f}% {state}"]
    if event.epoch:
        parts.append(f"epoch {event.epoch}")
    metrics = dict(event.metrics) or dict(job.metrics)
    parts.extend(f"{name}={metrics[name]:.4g}" for name in SHOWN if name in metrics)
    if event.message:
        parts.append(event.message)
    return "  ".join(parts)


def watch_job(
    stub: jobs_pb2_grpc.JobServiceStub,
    job_id: str,
    metadata: list[tuple[str, str]],
    out: TextIO,
    timeout_s: float | None = None,
) -> jobs_pb2.Job:
    """Stream a job's events until it is terminal; returns the final record.
    On a terminal stream the line is redrawn in place (\\r)."""
    job = jobs_pb2.Job()
    interactive = out.isatty()
    request = jobs_pb2.WatchJobRequest(job_id=job_id)
    for response in stub.WatchJob(request, metadata=metadata, timeout=timeout_s):
        job = response.job
        line = render(job, response.event)
        out.write(("\r\033[K" + line) if interactive else (line + "\n"))
        out.flush()
        if job.state in TERMINAL:
            break
    if interactive:
        out.write("\n")
    if job.state not in TERMINAL:
        job = stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=metadata).job
    return job
