"""``modelfleet submit FILE.yaml``: validate a job file, submit its jobs, optionally wait.

The whole file is validated before anything is submitted (errors as
``FILE:LINE: message``, see :mod:`services.cli.jobfile`). ``--check`` also asks
the servers to check every job without queueing it (``validate_only``: dataset
and model existence, budgets), unless they are unreachable, which it says.
Exit codes: 0 every job was submitted (with ``--wait``: every job SUCCEEDED;
with ``--check``: every job is valid); 1 a server refused a job, or (``--wait``)
a job FAILED or was CANCELLED; 2 the file is invalid (with ``--check``: a server
would refuse a job); 3 (``--wait``) a watch broke off before its job finished.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

import grpc

from common.api.modelfleet.compression.v1 import compression_pb2_grpc
from common.api.modelfleet.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from common.api.modelfleet.training.v1 import training_pb2, training_pb2_grpc
from common.settings import Settings
from services.cli import jobfile
from services.cli.client import add_output, call_metadata, connect, print_json, print_table, to_dict
from services.cli.progress import state_name, watch_job
from services.cli.report import print_compression_report

EXIT_REFUSED_OR_FAILED = 1
EXIT_INVALID = 2
EXIT_BROKEN = 3
SUBMIT_TIMEOUT_S = 30.0


def register(sub: argparse._SubParsersAction) -> None:
    submit = sub.add_parser(
        "submit",
        help="validate and submit the training/compression jobs of a YAML file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("file", type=Path, help="a job, a list of jobs, or several YAML documents")
    submit.add_argument("--wait", action="store_true", help="watch every job; exit 0 only if all succeeded")
    submit.add_argument("--check", action="store_true", help="only validate the file; submit nothing")
    submit.add_argument(
        "--training-target",
        default=None,
        help="training service (default 127.0.0.1:$MODELFLEET_TRAINING_PORT)",
    )
    submit.add_argument(
        "--compression-target",
        default=None,
        help="compression service (default 127.0.0.1:$MODELFLEET_COMPRESSION_PORT)",
    )
    add_output(submit)
    submit.set_defaults(handler=_submit)


def _submit(args: argparse.Namespace) -> int:
    try:
        jobs = jobfile.load(args.file)
    except jobfile.JobFileInvalid as exc:
        for error in exc.errors:
            print(f"modelfleet: {error}", file=sys.stderr)
        return EXIT_INVALID
    settings = Settings.from_env()
    metadata = call_metadata(settings)
    targets = {
        "training": args.training_target or f"127.0.0.1:{settings.training_port}",
        "compression": args.compression_target or f"127.0.0.1:{settings.compression_port}",
    }
    channels = {kind: connect(target, settings) for kind, target in targets.items()}
    try:
        if args.check:
            return _check_all(args.file, jobs, channels, metadata, args.output == "json")
        submitted = _submit_all(jobs, channels, metadata)
        if submitted is None:
            return EXIT_REFUSED_OR_FAILED
        if not args.wait:
            _print_jobs(submitted, jobs, args.output)
            return 0
        finals, code = _wait_all(submitted, jobs, channels, metadata, args.output == "json")
        _print_jobs(finals, jobs, args.output)
        return code
    finally:
        for channel in channels.values():
            channel.close()


def _send(
    job: jobfile.Job, channels: dict[str, grpc.Channel], metadata: list[tuple[str, str]]
) -> jobs_pb2.Job:
    if isinstance(job.request, training_pb2.SubmitTrainingJobRequest):
        stub = training_pb2_grpc.TrainingServiceStub(channels["training"])
        return stub.SubmitTrainingJob(job.request, metadata=metadata, timeout=SUBMIT_TIMEOUT_S).job
    cstub = compression_pb2_grpc.CompressionServiceStub(channels["compression"])
    return cstub.SubmitCompressionJob(job.request, metadata=metadata, timeout=SUBMIT_TIMEOUT_S).job


def _check_all(
    path: Path,
    jobs: list[jobfile.Job],
    channels: dict[str, grpc.Channel],
    metadata: list[tuple[str, str]],
    as_json: bool,
) -> int:
    """Have the servers check every job (queueing nothing); report per line."""
    errors: list[str] = []
    unchecked: list[str] = []
    for job in jobs:
        job.request.validate_only = True
        try:
            _send(job, channels, metadata)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                unchecked.append(
                    f"{path}:{job.line}: not checked by the {job.kind} service: {exc.code().name}"
                )
            else:
                errors.append(f"{path}:{job.line}: {exc.code().name}: {exc.details()}")
    if as_json:
        print_json(
            {
                "file": str(path),
                "valid": not errors,
                "jobs": len(jobs),
                "errors": errors,
                "unchecked": unchecked,
            }
        )
    else:
        for line in [*errors, *unchecked]:
            print(f"modelfleet: {line}", file=sys.stderr)
        verdict = (
            f"{len(jobs) - len(errors)} of {len(jobs)} job(s) valid"
            if errors
            else f"{len(jobs)} valid job(s)"
        )
        scope = " (file only for the unchecked ones)" if unchecked else ""
        print(f"{path}: {verdict}{scope}")
    return EXIT_INVALID if errors else 0


def _submit_all(
    jobs: list[jobfile.Job], channels: dict[str, grpc.Channel], metadata: list[tuple[str, str]]
) -> list[jobs_pb2.Job] | None:
    """Submit in file order; on a refusal, say which jobs are already queued and return None."""
    submitted: list[jobs_pb2.Job] = []
    for job in jobs:
        if not job.request.request_id:
            job.request.request_id = uuid.uuid4().hex
        try:
            queued = _send(job, channels, metadata)
        except grpc.RpcError as exc:
            print(
                f"modelfleet: job at line {job.line} refused: {exc.code().name}: {exc.details()}",
                file=sys.stderr,
            )
            if submitted:
                print(f"modelfleet: already queued: {' '.join(j.id for j in submitted)}", file=sys.stderr)
            return None
        submitted.append(queued)
    return submitted


def _wait_all(
    submitted: list[jobs_pb2.Job],
    jobs: list[jobfile.Job],
    channels: dict[str, grpc.Channel],
    metadata: list[tuple[str, str]],
    as_json: bool,
) -> tuple[list[jobs_pb2.Job], int]:
    """Watch the jobs one after another (they run concurrently on the workers;
    a job that already finished answers with its final state at once)."""
    # With --output json, stdout carries only the final document; progress goes to stderr.
    out = sys.stderr if as_json else sys.stdout
    finals: list[jobs_pb2.Job] = []
    code = 0
    for job, spec in zip(submitted, jobs, strict=True):
        print(f"{job.id} ({spec.kind}, line {spec.line})", file=out)
        stub = jobs_pb2_grpc.JobServiceStub(channels[spec.kind])
        try:
            final = watch_job(stub, jobs_pb2.WatchJobRequest(job_id=job.id), metadata, out)
        except grpc.RpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
            print(f"modelfleet: watching {job.id} broke off: {reason}", file=sys.stderr)
            finals.append(job)
            code = max(code, EXIT_BROKEN)
            continue
        finals.append(final if final.id else job)
        if final.state in (jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED):
            code = max(code, EXIT_REFUSED_OR_FAILED)
        elif final.state != jobs_pb2.JOB_STATE_SUCCEEDED:  # the stream ended before the job did
            code = max(code, EXIT_BROKEN)
    return finals, code


def _print_jobs(records: list[jobs_pb2.Job], jobs: list[jobfile.Job], output: str) -> None:
    if output == "json":
        print_json({"jobs": [to_dict(j) for j in records]})
        return
    rows = [
        (
            job.id,
            spec.kind,
            spec.line,
            state_name(job.state),
            f"{job.result.model_name}:{job.result.model_version}" if job.HasField("result") else "",
            job.last_error,
        )
        for job, spec in zip(records, jobs, strict=True)
    ]
    print_table(("id", "kind", "line", "state", "result", "error"), rows)
    for job in records:
        if job.HasField("compression_report"):
            print(f"\n{job.id} compression report:")
            print_compression_report(job.compression_report)
