"""``modelfleet jobs list|show|watch|cancel``: the JobService from the command line.

``jobs watch`` prints one progress line per event (JSON lines with ``--output json``) and
exits with the job's outcome: 0 SUCCEEDED, 1 FAILED, 2 CANCELLED, 3 if the stream broke
off before the job finished (server gone, network error), 4 if the server refused the
watch (unknown job, bad id, no permission): retrying a 4 cannot help.
The other actions exit 1 on a server error. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from common.api.modelfleet.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from common.settings import Settings
from services.cli.client import (
    add_output,
    add_target,
    call_metadata,
    open_channel,
    print_json,
    print_table,
    to_dict,
)
from services.cli.progress import state_name, watch_job
from services.cli.report import print_compression_report

EXIT_CODES = {jobs_pb2.JOB_STATE_SUCCEEDED: 0, jobs_pb2.JOB_STATE_FAILED: 1, jobs_pb2.JOB_STATE_CANCELLED: 2}
EXIT_BROKEN = 3
EXIT_REFUSED = 4
_REFUSALS = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
_KINDS = {"training": jobs_pb2.JOB_KIND_TRAINING, "compression": jobs_pb2.JOB_KIND_COMPRESSION}
_STATES = {
    name.removeprefix("JOB_STATE_").lower(): value for name, value in jobs_pb2.JobState.items() if value
}


def register(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="list, show, watch and cancel training/compression jobs")
    commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")

    listing = commands.add_parser("list", help="jobs, newest first")
    listing.add_argument("--kind", choices=sorted(_KINDS))
    listing.add_argument("--state", action="append", choices=sorted(_STATES), help="repeatable")
    listing.add_argument("--page-size", type=int, default=50)
    listing.add_argument("--page-token", default="")
    listing.set_defaults(handler=_list)

    show = commands.add_parser("show", help="one job in full")
    show.add_argument("job_id")
    show.set_defaults(handler=_show)

    watch = commands.add_parser(
        "watch",
        help="follow a job; exit 0 SUCCEEDED, 1 FAILED, 2 CANCELLED, 3 stream broke off, 4 unknown job",
    )
    watch.add_argument("job_id")
    watch.add_argument("--from-beginning", action="store_true", help="replay past events first")
    watch.set_defaults(handler=_watch)

    cancel = commands.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.add_argument("--reason", default="")
    cancel.set_defaults(handler=_cancel)

    for parser in (listing, show, watch, cancel):
        add_target(parser, "training_port")
        add_output(parser)
        parser.set_defaults(handler=_errors_exit_1(parser.get_default("handler")))


def _errors_exit_1(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except grpc.RpcError as exc:
            _report(exc)
            return 1

    return run


def _report(exc: grpc.RpcError) -> None:
    print(f"modelfleet: {exc.code().name}: {exc.details()}", file=sys.stderr)


def _stub(args: argparse.Namespace) -> tuple[jobs_pb2_grpc.JobServiceStub, grpc.Channel, Settings]:
    settings = Settings.from_env()
    channel = open_channel(args, settings)
    return jobs_pb2_grpc.JobServiceStub(channel), channel, settings


def _list(args: argparse.Namespace) -> int:
    stub, channel, settings = _stub(args)
    with channel:
        request = jobs_pb2.ListJobsRequest(
            kind=_KINDS.get(args.kind or "", 0),  # type: ignore[arg-type]
            states=[_STATES[s] for s in args.state or ()],
            page_size=args.page_size,
            page_token=args.page_token,
        )
        reply = stub.ListJobs(request, metadata=call_metadata(settings))
    if args.output == "json":
        print_json(to_dict(reply))
        return 0
    rows = [
        (j.id, _kind(j.kind), state_name(j.state), f"{j.progress:.0%}", j.attempts, _time(j.created_at))
        for j in reply.jobs
    ]
    print_table(("id", "kind", "state", "progress", "attempts", "created"), rows)
    if reply.next_page_token:
        print(f"next page: --page-token {reply.next_page_token}")
    return 0


def _show(args: argparse.Namespace) -> int:
    stub, channel, settings = _stub(args)
    with channel:
        job = stub.GetJob(jobs_pb2.GetJobRequest(job_id=args.job_id), metadata=call_metadata(settings)).job
    if args.output == "json":
        print_json(to_dict(job))
        return 0
    rows = [
        ("id", job.id),
        ("kind", _kind(job.kind)),
        ("state", state_name(job.state)),
        ("progress", f"{job.progress:.0%}"),
        ("attempts", f"{job.attempts}/{job.max_attempts}"),
        ("worker", job.worker_id),
        ("last_error", job.last_error),
        ("result", f"{job.result.model_name}:{job.result.model_version}" if job.HasField("result") else ""),
        *((f"metric {k}", f"{v:.6g}") for k, v in sorted(job.metrics.items())),
    ]
    print_table(("field", "value"), rows)
    if job.HasField("compression_report"):
        print()
        print_compression_report(job.compression_report)
    return 0


def _watch(args: argparse.Namespace) -> int:
    stub, channel, settings = _stub(args)
    request = jobs_pb2.WatchJobRequest(job_id=args.job_id, from_beginning=args.from_beginning)
    with channel:
        try:
            job = watch_job(stub, request, call_metadata(settings), sys.stdout, as_json=args.output == "json")
        except grpc.RpcError as exc:
            _report(exc)
            return EXIT_REFUSED if exc.code() in _REFUSALS else EXIT_BROKEN
    return EXIT_CODES.get(job.state, EXIT_BROKEN)


def _cancel(args: argparse.Namespace) -> int:
    stub, channel, settings = _stub(args)
    with channel:
        request = jobs_pb2.CancelJobRequest(job_id=args.job_id, reason=args.reason)
        job = stub.CancelJob(request, metadata=call_metadata(settings)).job
    if args.output == "json":
        print_json(to_dict(job))
    else:
        print(f"{job.id} {state_name(job.state)}")
    return 0


def _time(stamp: Timestamp) -> str:
    return stamp.ToJsonString()


def _kind(kind: int) -> str:
    return str(jobs_pb2.JobKind.Name(kind)).removeprefix("JOB_KIND_").lower()  # type: ignore[arg-type]
