"""``modelfleet datasets ...``: list, show, versions, create, upload, preprocess, delete."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.data.v1 import data_pb2, data_pb2_grpc
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

SOURCES = {
    "synthetic": data_pb2.BUILTIN_SOURCE_SYNTHETIC_REGRESSION,
    "digits": data_pb2.BUILTIN_SOURCE_DIGITS,
    "iris": data_pb2.BUILTIN_SOURCE_IRIS,
    "breast-cancer": data_pb2.BUILTIN_SOURCE_BREAST_CANCER,
}
FORMATS = {
    ".csv": data_pb2.DATA_FORMAT_CSV,
    ".npy": data_pb2.DATA_FORMAT_NPY,
    ".npz": data_pb2.DATA_FORMAT_NPZ,
    ".parquet": data_pb2.DATA_FORMAT_PARQUET,
}
TASKS = {
    "auto": data_pb2.DATASET_TASK_UNSPECIFIED,
    "classification": data_pb2.DATASET_TASK_CLASSIFICATION,
    "regression": data_pb2.DATASET_TASK_REGRESSION,
}
NORMALIZATIONS = {
    "none": model_pb2.NORMALIZATION_KIND_NONE,
    "zscore": model_pb2.NORMALIZATION_KIND_ZSCORE,
    "minmax": model_pb2.NORMALIZATION_KIND_MINMAX,
}
IMPUTATIONS = {
    "mean": data_pb2.IMPUTE_STRATEGY_MEAN,
    "median": data_pb2.IMPUTE_STRATEGY_MEDIAN,
    "most_frequent": data_pb2.IMPUTE_STRATEGY_MOST_FREQUENT,
    "constant": data_pb2.IMPUTE_STRATEGY_CONSTANT,
}
CASTS = {
    "float32": data_pb2.CAST_TYPE_FLOAT32,
    "float64": data_pb2.CAST_TYPE_FLOAT64,
    "int64": data_pb2.CAST_TYPE_INT64,
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("datasets", help="manage datasets on the data service")
    commands = parser.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help_text)
        add_target(p, "data_port")
        add_output(p)
        return p

    def handle(p: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], int]) -> None:
        p.set_defaults(handler=lambda args: _rpc(handler, args))

    p = command("list", "list datasets")
    p.add_argument("--prefix", default="", help="only names starting with this")
    handle(p, _list)

    p = command("show", "show one dataset version")
    p.add_argument("name")
    p.add_argument("version", nargs="?", default="", help="default: latest")
    handle(p, _show)

    p = command("versions", "list the versions of a dataset")
    p.add_argument("name")
    handle(p, _versions)

    p = command("create", "create a dataset from a built-in source")
    p.add_argument("name")
    p.add_argument("--source", required=True, choices=sorted(SOURCES))
    p.add_argument("--images", action="store_true", help="the source as images (digits: 1x8x8)")
    p.add_argument("--samples", type=int, default=0, help="synthetic: rows (default 10000)")
    p.add_argument("--features", type=int, default=0, help="synthetic: features (default 1000)")
    p.add_argument("--noise", type=float, default=0.0, help="synthetic: noise std (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--description", default="")
    handle(p, _create)

    p = command("upload", "upload a CSV, .npy, .npz or .parquet file")
    p.add_argument("file", type=Path)
    p.add_argument("--name", help="dataset name (default: the file's stem)")
    p.add_argument("--label", default="", help="label column (name; an index for .npy)")
    p.add_argument("--no-header", action="store_true", help="CSV: the first line is data")
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="NPY/NPZ images are N x H x W x C (default N x C x H x W)",
    )
    p.add_argument(
        "--missing",
        action="append",
        default=[],
        metavar="TOKEN",
        help="CSV: a cell value meaning missing (repeatable; default NA, N/A, NaN, null, None, ...)",
    )
    p.add_argument("--task", choices=sorted(TASKS), default="auto")
    p.add_argument("--description", default="")
    handle(p, _upload)

    p = command("preprocess", "clean, transform, normalize and split into a new version")
    p.add_argument("name")
    p.add_argument("--version", default="", help="source version (default: latest)")
    p.add_argument("--target-name", default="", help="store the result under this name")
    p.add_argument("--drop-invalid", action="store_true", help="drop rows with NaN/Inf or no label")
    p.add_argument("--dedupe", action="store_true", help="drop exact duplicate rows")
    p.add_argument("--one-hot", action="append", default=[], metavar="COLUMN")
    p.add_argument("--drop-column", action="append", default=[], metavar="COLUMN")
    p.add_argument(
        "--cast", action="append", default=[], metavar="COLUMN:TYPE", help="TYPE: float32|float64|int64"
    )
    p.add_argument(
        "--impute",
        default="",
        metavar="STRATEGY",
        help="fill missing features, fitted on the train split: mean|median|most_frequent|constant:VALUE",
    )
    p.add_argument("--normalize", choices=sorted(NORMALIZATIONS), default="none")
    p.add_argument("--val", type=float, default=0.0, help="validation fraction")
    p.add_argument("--test", type=float, default=0.0, help="test fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stratify", action="store_true")
    p.add_argument("--description", default="")
    handle(p, _preprocess)

    p = command("delete", "delete a dataset version and its shards")
    p.add_argument("name")
    p.add_argument("version")
    handle(p, _delete)


def _rpc(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Server errors become one line on stderr and exit code 1, not a traceback."""
    try:
        return handler(args)
    except grpc.RpcError as exc:
        print(f"modelfleet: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def _stub(args: argparse.Namespace) -> tuple[data_pb2_grpc.DataServiceStub, list[tuple[str, str]]]:
    settings = Settings.from_env()
    return data_pb2_grpc.DataServiceStub(open_channel(args, settings)), call_metadata(settings)


def _show_version(args: argparse.Namespace, v: data_pb2.DatasetVersion) -> int:
    if args.output == "json":
        print_json(to_dict(v))
        return 0
    splits = ", ".join(f"{k}={n}" for k, n in sorted(v.split_rows.items())) or "unsplit"
    rows = [
        ("name", v.name),
        ("version", v.version),
        ("task", data_pb2.DatasetTask.Name(v.task)),
        ("rows", v.num_rows),
        ("features", v.num_features),
        ("example shape", "x".join(map(str, v.example_shape)) or "-"),
        ("classes", ", ".join(v.class_names) or "-"),
        ("splits", splits),
        ("normalization", model_pb2.NormalizationKind.Name(v.normalization.kind)),
        ("imputation", f"fill for {len(v.normalization.fill)} features" if v.normalization.fill else "-"),
        ("parent", f"{v.parent_name}:{v.parent_version}" if v.parent_name else "-"),
        ("operations", "; ".join(v.operations)),
        *_cleaning_rows(v.cleaning),
        ("size_bytes", v.size_bytes),
    ]
    print_table(["field", "value"], rows)
    return 0


def _cleaning_rows(report: data_pb2.CleaningReport) -> list[tuple[str, object]]:
    """What cleaning removed, when it ran (rows_in is 0 for uploads and sources)."""
    if not report.rows_in:
        return []
    return [
        ("rows in -> out", f"{report.rows_in} -> {report.rows_out}"),
        ("dropped invalid (NaN/Inf)", report.dropped_invalid),
        ("dropped missing label", report.dropped_missing_label),
        ("dropped duplicates", report.dropped_duplicates),
    ]


def _list(args: argparse.Namespace) -> int:
    stub, md = _stub(args)

    def page(token: str) -> tuple[list[data_pb2.Dataset], str]:
        request = data_pb2.ListDatasetsRequest(name_prefix=args.prefix, page_token=token)
        reply = stub.ListDatasets(request, metadata=md)
        return list(reply.datasets), reply.next_page_token

    items = all_pages(page)
    if args.output == "json":
        print_json([to_dict(d) for d in items])
    else:
        print_table(
            ["name", "latest", "versions"], [(d.name, d.latest_version, d.version_count) for d in items]
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    reply = stub.GetDataset(data_pb2.GetDatasetRequest(name=args.name, version=args.version), metadata=md)
    return _show_version(args, reply.dataset)


def _versions(args: argparse.Namespace) -> int:
    stub, md = _stub(args)

    def page(token: str) -> tuple[list[data_pb2.DatasetVersion], str]:
        reply = stub.ListDatasetVersions(
            data_pb2.ListDatasetVersionsRequest(name=args.name, page_token=token), metadata=md
        )
        return list(reply.versions), reply.next_page_token

    items = all_pages(page)
    if args.output == "json":
        print_json([to_dict(v) for v in items])
    else:
        print_table(
            ["version", "rows", "features", "parent", "operations"],
            [
                (
                    v.version,
                    v.num_rows,
                    v.num_features,
                    f"{v.parent_name}:{v.parent_version}".strip(":") or "-",
                    "; ".join(v.operations),
                )
                for v in items
            ],
        )
    return 0


def _create(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    request = data_pb2.CreateDatasetFromSourceRequest(
        name=args.name,
        source=SOURCES[args.source],
        images=args.images,
        synthetic=data_pb2.SyntheticRegression(
            n_samples=args.samples, n_features=args.features, noise=args.noise, seed=args.seed
        ),
        description=args.description,
    )
    return _show_version(args, stub.CreateDatasetFromSource(request, metadata=md).dataset)


def _upload_messages(
    path: Path, header: data_pb2.UploadDatasetHeader
) -> Iterator[data_pb2.UploadDatasetRequest]:
    yield data_pb2.UploadDatasetRequest(header=header)
    for chunk in file_chunks(path):
        yield data_pb2.UploadDatasetRequest(chunk=chunk)


def _upload(args: argparse.Namespace) -> int:
    path: Path = args.file
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InvalidArgument(f"{path}: unknown file type {path.suffix!r} (use {', '.join(FORMATS)})")
    if not path.is_file():
        raise InvalidArgument(f"{path}: no such file")
    header = data_pb2.UploadDatasetHeader(
        name=args.name or path.stem,
        format=fmt,
        label_column=args.label,
        csv_has_header=not args.no_header,
        csv_missing_values=args.missing,
        channels_last=args.channels_last,
        task=TASKS[args.task],
        description=args.description,
        total_size_bytes=os.path.getsize(path),
    )
    stub, md = _stub(args)
    return _show_version(args, stub.UploadDataset(_upload_messages(path, header), metadata=md).dataset)


def _preprocess(args: argparse.Namespace) -> int:
    transforms = [data_pb2.Transform(cast=_cast(spec)) for spec in args.cast]
    transforms += [data_pb2.Transform(one_hot=data_pb2.OneHotColumn(column=c)) for c in args.one_hot]
    transforms += [data_pb2.Transform(drop_column=c) for c in args.drop_column]
    request = data_pb2.PreprocessDatasetRequest(
        name=args.name,
        version=args.version,
        target_name=args.target_name,
        cleaning=data_pb2.Cleaning(drop_invalid=args.drop_invalid, dedupe=args.dedupe),
        transforms=transforms,
        normalization=NORMALIZATIONS[args.normalize],
        imputation=_imputation(args.impute),
        split=data_pb2.SplitSpec(
            val_fraction=args.val, test_fraction=args.test, seed=args.seed, stratify=args.stratify
        ),
        description=args.description,
    )
    stub, md = _stub(args)
    return _show_version(args, stub.PreprocessDataset(request, metadata=md).dataset)


def _imputation(spec: str) -> data_pb2.Imputation:
    if not spec:
        return data_pb2.Imputation()
    name, _, value = spec.partition(":")
    strategy = IMPUTATIONS.get(name)
    if strategy is None or (value and name != "constant") or (name == "constant" and not value):
        raise InvalidArgument(f"--impute {spec!r}: use mean, median, most_frequent or constant:VALUE")
    try:
        constant = float(value) if value else 0.0
    except ValueError:
        raise InvalidArgument(f"--impute {spec!r}: {value!r} is not a number") from None
    return data_pb2.Imputation(strategy=strategy, constant=constant)


def _cast(spec: str) -> data_pb2.CastColumn:
    column, _, kind = spec.rpartition(":")
    if not column or kind not in CASTS:
        raise InvalidArgument(f"--cast {spec!r}: use COLUMN:TYPE with TYPE one of {', '.join(CASTS)}")
    return data_pb2.CastColumn(column=column, to=CASTS[kind])


def _delete(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    stub.DeleteDataset(data_pb2.DeleteDatasetRequest(name=args.name, version=args.version), metadata=md)
    if args.output == "json":
        print_json({"deleted": {"name": args.name, "version": args.version}})
    else:
        print(f"deleted {args.name}:{args.version}")
    return 0
