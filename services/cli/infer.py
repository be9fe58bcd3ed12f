"""``modelfleet infer MODEL --input x.npy | --json '[[...]]' [--version V]``:
one Open Inference Protocol request from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
import numpy as np

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from common.api.modelfleet.registry.v1 import registry_pb2, registry_pb2_grpc
from common.datatypes import NUMPY, bf16_to_float32
from common.errors import InvalidArgument
from common.settings import Settings
from services.cli.client import add_output, add_target, call_metadata, open_channel, print_json, print_table


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("infer", help="run one inference request against the inference service")
    parser.add_argument("model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="a .npy file (rows = batch); never unpickled")
    source.add_argument("--json", help="the input as a JSON array, e.g. '[[5.1, 3.5, 1.4, 0.2]]'")
    parser.add_argument("--version", default="", help="version number (default: production, else latest)")
    parser.add_argument("--id", default="", help="request id to echo")
    add_target(parser, "inference_port")
    add_output(parser)
    parser.set_defaults(handler=_infer)


def _load(args: argparse.Namespace) -> np.ndarray:
    if args.input is not None:
        try:
            array: np.ndarray = np.load(args.input, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"--input {args.input}: not a readable .npy file: {exc}") from None
    else:
        try:
            array = np.asarray(json.loads(args.json))
        except (ValueError, TypeError, RecursionError) as exc:
            raise InvalidArgument(f"--json is not a numeric JSON array: {exc}") from None
    if array.dtype.kind not in "biuf":
        source = "--json" if args.input is None else f"--input {args.input}"
        raise InvalidArgument(f"{source} must hold numbers only, not {array.dtype} values")
    return array.reshape(1, -1) if array.ndim == 1 else array


def _infer(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    array = _load(args)
    metadata = call_metadata(settings)
    with open_channel(args, settings) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            meta = stub.ModelMetadata(
                pb.ModelMetadataRequest(name=args.model, version=args.version), metadata=metadata
            )
            if len(meta.inputs) != 1:
                raise InvalidArgument(
                    f"model {args.model!r} has {len(meta.inputs)} inputs; infer sends exactly one"
                )
            spec = meta.inputs[0]
            data = _encode(array, spec.datatype)
            request = pb.ModelInferRequest(
                model_name=args.model,
                model_version=args.version,
                id=args.id,
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(
                        name=spec.name, datatype=spec.datatype, shape=array.shape
                    )
                ],
                raw_input_contents=[data],
            )
            response = stub.ModelInfer(request, metadata=metadata)
            class_names = _class_names(channel, args.model, response.model_version, metadata)
        except grpc.RpcError as exc:
            print(f"modelfleet: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    outputs = {
        o.name: _decode(raw, o.datatype, tuple(o.shape))
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    predicted = _predicted(outputs, class_names)
    if args.output == "json":
        report: dict[str, object] = {
            "model": response.model_name,
            "version": response.model_version,
            "id": response.id,
            "outputs": {name: value.tolist() for name, value in outputs.items()},
        }
        if predicted is not None:
            report["predicted"] = predicted
        print_json(report)
    else:
        print(f"model {response.model_name} version {response.model_version}")
        print_table(
            ("output", "shape", "values"), [(n, list(v.shape), v.tolist()) for n, v in outputs.items()]
        )
        if predicted is not None:
            print(f"predicted: {', '.join(predicted)}")
    return 0


def _class_names(
    channel: grpc.Channel, model: str, version: str, metadata: list[tuple[str, str]]
) -> list[str]:
    """The version's class names from the registry (served with inference), if it has any."""
    stub = registry_pb2_grpc.ModelRegistryServiceStub(channel)
    try:
        reply = stub.GetModelVersion(
            registry_pb2.GetModelVersionRequest(name=model, version=version), metadata=metadata
        )
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED):
            return []  # names are a convenience; the scores are the answer
        raise
    return list(reply.version.class_names)


def _predicted(outputs: dict[str, np.ndarray], class_names: list[str]) -> list[str] | None:
    """Each row's most likely class name, when the one output is [rows, classes] scores."""
    if len(outputs) != 1 or not class_names:
        return None
    (scores,) = outputs.values()
    if scores.ndim != 2 or scores.shape[1] != len(class_names):
        return None
    return [class_names[i] for i in scores.argmax(axis=1)]


def _encode(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BF16":
        # bfloat16 is the top half of a float32 (round to nearest even).
        bits = np.ascontiguousarray(array, np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype("<u2").tobytes()
    dtype = NUMPY.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"model input has datatype {datatype}, which infer cannot send")
    return array.astype(dtype).tobytes()


def _decode(raw: bytes, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    if datatype == "BF16":
        return bf16_to_float32(np.frombuffer(raw, "<u2")).reshape(shape)
    dtype = NUMPY.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"the server answered datatype {datatype}, which infer cannot read")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)
