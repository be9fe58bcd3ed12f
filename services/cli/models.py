"""``modelfleet models ...``: the model registry from the shell (served on the
inference port)."""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from google.protobuf.json_format import Parse, ParseError

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.registry.v1 import registry_pb2, registry_pb2_grpc
from common.errors import InvalidArgument
from common.settings import Settings
from services.cli.client import (
    add_output,
    add_target,
    all_pages,
    call_metadata,
    file_chunks,
    open_channel,
    print_json,
    print_table,
    to_dict,
)

FORMATS = {
    "safetensors": registry_pb2.MODEL_FORMAT_SAFETENSORS,
    "torchscript": registry_pb2.MODEL_FORMAT_TORCHSCRIPT,
    "torch_export": registry_pb2.MODEL_FORMAT_TORCH_EXPORT,
    "compressed": registry_pb2.MODEL_FORMAT_COMPRESSED,
}
ACTIVATIONS = {
    name: getattr(model_pb2, f"ACTIVATION_{name.upper()}")
    for name in ("relu", "gelu", "tanh", "sigmoid", "silu")
}

Stub = registry_pb2_grpc.ModelRegistryServiceStub
Handler = Callable[[argparse.Namespace, Stub, Settings], int]


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="list, upload, promote and roll back registered models")
    commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help)
        add_target(parser, "inference_port")
        add_output(parser)
        parser.set_defaults(handler=lambda args: _run(args, handler))
        return parser

    p = command("list", _list, "models, by name")
    p.add_argument("--prefix", default="", help="only names starting with this")

    p = command("show", _show, "one model: aliases, canary, latest version")
    p.add_argument("name")

    p = command("versions", _versions, "a model's versions, newest first")
    p.add_argument("name")
    p.add_argument("--version", default="", help="show one version (number or alias) in full")

    p = command("upload", _upload, "upload a model file as a new version")
    p.add_argument("name")
    p.add_argument("file", type=Path)
    p.add_argument("--format", choices=sorted(FORMATS), default="safetensors")
    p.add_argument("--mlp", help="MLP widths input,hidden...,output (safetensors/compressed), e.g. 64,128,10")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu")
    p.add_argument(
        "--input", action="append", default=[], metavar="NAME:DTYPE:SHAPE", help="e.g. x:FP32:-1,4"
    )
    p.add_argument("--output-tensor", action="append", default=[], metavar="NAME:DTYPE:SHAPE")
    p.add_argument("--metric", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--description", default="")
    p.add_argument("--class-names", default="", help="comma-separated class labels")
    p.add_argument(
        "--header-json", type=Path, help="an UploadModelHeader as protobuf JSON (e.g. for normalization)"
    )

    p = command("promote", _promote, "point an alias (default production) at a version")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--alias", default="production")
    _add_guard(p)

    p = command("rollback", _rollback, "move an alias back to its previous version")
    p.add_argument("name")
    p.add_argument("--alias", default="production")

    p = command("canary", _canary, "route a fraction of default traffic to a version")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--fraction", type=float, required=True, help="in (0, 1)")

    p = command("end-canary", _end_canary, "stop the canary, optionally promoting it to production")
    p.add_argument("name")
    p.add_argument("--promote", action="store_true")
    _add_guard(p)

    p = command("delete", _delete, "delete a version no alias or canary points at")
    p.add_argument("name")
    p.add_argument("version")


def _add_guard(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-drop", type=float, help="refuse if --metric drops more than this")
    parser.add_argument("--metric", default="test_accuracy", help="metric the guard compares")


def _guard(args: argparse.Namespace) -> registry_pb2.PromotionGuard | None:
    if args.max_drop is None:
        return None
    return registry_pb2.PromotionGuard(metric=args.metric, max_drop=args.max_drop)


def _run(args: argparse.Namespace, handler: Handler) -> int:
    settings = Settings.from_env()
    with open_channel(args, settings) as channel:
        stub = registry_pb2_grpc.ModelRegistryServiceStub(channel)
        try:
            return handler(args, stub, settings)
        except grpc.RpcError as exc:
            print(f"modelfleet: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1


def _print_models(args: argparse.Namespace, models: list[registry_pb2.Model]) -> None:
    if args.output == "json":
        print_json([to_dict(m) for m in models])
        return
    rows = [
        (
            m.name,
            m.latest_version or "-",
            m.version_count,
            ",".join(f"{a}={v}" for a, v in sorted(m.aliases.items())) or "-",
            f"{m.canary.version}@{m.canary.fraction:g}" if m.canary.version else "-",
        )
        for m in models
    ]
    print_table(("name", "latest", "versions", "aliases", "canary"), rows)


def _list(args: argparse.Namespace, stub: Stub, settings: Settings) -> int:
    def page(token: str) -> tuple[list[registry_pb2.Model], str]:
        request = registry_pb2.ListModelsRequest(name_prefix=args.prefix, page_size=200, page_token=token)
        response = stub.ListModels(request, metadata=call_metadata(settings))
        return list(response.models), response.next_page_token

    _print_models(args, all_pages(page))
    return 0


def _show(args: argparse.Namespace, stub: Stub, settings: Settings) -> int:
    response = stub.GetModel(registry_pb2.GetModelRequest(name=args.name), metadata=call_metadata(settings))
    _print_models(args, [response.model])
    return 0


def _versions(args: argparse.Namespace, stub: Stub, settings: Settings) -> int:
    if args.version:
        request = registry_pb2.GetModelVersionRequest(name=args.name, version=args.version)
        version = stub.GetModelVersion(request, metadata=call_metadata(settings)).version
        print_json(to_dict(version))  # one version in full: JSON is the readable form
        return 0

    def page(token: str) -> tuple[list[registry_pb2.ModelVersion], str]:
        request = registry_pb2.ListModelVersionsRequest(name=args.name, page_size=200, page_token=token)
        response = stub.ListModelVersions(request, metadata=call_metadata(settings))
        return list(response.versions), response.next_page_token

    versions = all_pages(page)
    if args.output == "json":
        print_json([to_dict(v) for v in versions])
        return 0
    rows = [
        (
            v.version,
            registry_pb2.ModelFormat.Name(v.format).removeprefix("MODEL_FORMAT_").lower(),
            ",".join(v.aliases) or "-",
            v.artifact_size_bytes,
            " ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items())) or "-",
            v.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
        )
        for v in versions
    ]
    print_table(("version", "format", "aliases", "bytes", "metrics", "created"), rows)
    return 0


def _upload(args: argparse.Namespace, stub: Stub, settings: Settings) -> int:
    header = _upload_header(args)
    if not args.file.is_file():
        raise InvalidArgument(f"file {args.file} does not exist")
    header.sha256 = _sha256(args.file)

    def messages() -> Iterator[registry_pb2.UploadModelRequest]:
        yield registry_pb2.UploadModelRequest(header=header)
        for chunk in file_chunks(args.file):
            yield registry_pb2.UploadModelRequest(chunk=chunk)

    version = stub.UploadModel(messages(), metadata=call_metadata(settings)).version
    if args.output == "json":
        print_json(to_dict(version))
    else:
        print(
            f"registered {version.model_name} version {version.version} ({version.artifact_size_bytes} bytes)"
        )
    return 0


def _upload_header(args: argparse.Namespace) -> registry_pb2.UploadModelHeader:
    header = registry_pb2.UploadModelHeader()
    if args.header_json:
        try:
            Parse(args.header_json.read_text(), header)
        except (OSError, ParseError) as exc:
            raise InvalidArgument(f"--header-json {args.header_json}: {exc}") from None
    header.name = args.name
    header.format = FORMATS[args.format]
    if args.mlp:
        widths = _ints(args.mlp, "--mlp")
        if len(widths) < 2:
            raise InvalidArgument("--mlp needs at least input and output widths, e.g. 4,3")
        header.architecture.mlp.CopyFrom(
            model_pb2.MlpArchitecture(
                input_size=widths[0],
                hidden_sizes=widths[1:-1],
                output_size=widths[-1],
                activation=ACTIVATIONS[args.activation],
            )
        )
    for flag, raw, specs in (
        ("--input", args.input, header.inputs),
        ("--output-tensor", args.output_tensor, header.outputs),
    ):
        for text in raw:
            name, _, rest = text.partition(":")
            datatype, _, shape = rest.partition(":")
            if not (name and datatype and shape):
                raise InvalidArgument(f"{flag} {text!r} must be NAME:DTYPE:SHAPE, e.g. x:FP32:-1,4")
            specs.add(name=name, datatype=datatype.upper(), shape=_ints(shape, flag))
    for text in args.metric:
        key, value = _pair(text, "--metric")
        try:
            header.metrics[key] = float(value)
        except ValueError:
            raise InvalidArgument(f"--metric {text!r}: {value!r} is not a number") from None
    for text in args.label:
        key, value = _pair(text, "--label")
        header.labels[key] = value
    if args.description:
        header.description = args.description
    if args.class_names:
        header.class_names[:] = [c.strip() for c in args.class_names.split(",")]
    return header


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidArgument(f"{flag} {text!r} must be comma-separated integers") from None


def _pair(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not (key and sep):
        raise InvalidArgument(f"{flag} {text!r} must be KEY=VALUE")
    return key, value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in file_chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def _promote(args: argparse.Namespace, stub: Stub, settings: Settings) -> int:
    request = registry_pb2.SetAliasRequest(
        name=args.name, alias=args.alias, version=args.version, guard=_guard(args)
    )
    _print_models(args, [stub.SetAlias(request, metadata=call_metadata(settings)).model])
    return 0


def _rollback(args: argparse.Namespace, stub: Stub, settings: Settings) -> int:
    request = registry_pb2.RollbackAliasRequest(name=args.name, alias=args.alias)
    _print_models(args, [stub.RollbackAlias(request, metadata=call_metadata(settings)).model])
    return 0


def _canary(args: argparse.Namespace, stub: Stub, settings: Settings) -> int:
    request = registry_pb2.SetCanaryRequest(name=args.name, version=args.version, fraction=args.fraction)
    _print_models(args, [stub.SetCanary(request, metadata=call_metadata(settings)).model])
    return 0


def _end_canary(args: argparse.Namespace, stub: Stub, settings: Settings) -> int:
    request = registry_pb2.EndCanaryRequest(name=args.name, promote=args.promote, guard=_guard(args))
    _print_models(args, [stub.EndCanary(request, metadata=call_metadata(settings)).model])
    return 0


def _delete(args: argparse.Namespace, stub: Stub, settings: Settings) -> int:
    request = registry_pb2.DeleteModelVersionRequest(name=args.name, version=args.version)
    stub.DeleteModelVersion(request, metadata=call_metadata(settings))
    if args.output == "json":
        print_json({"name": args.name, "deleted_version": args.version})
    else:
        print(f"deleted {args.name} version {args.version}")
    return 0
