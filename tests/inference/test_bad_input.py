"""Every kind of bad input answers a clear status naming the tensor; the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.artifacts import ArtifactStore
from common.registry import ModelRegistry
from tests.inference.conftest import register_mlp

pytestmark = pytest.mark.timeout(60)

Tensor = pb.ModelInferRequest.InferInputTensor
X = np.ones((2, 4), dtype="<f4")
GOOD = Tensor(name="input", datatype="FP32", shape=[2, 4])

CASES: list[tuple[str, pb.ModelInferRequest, grpc.StatusCode, tuple[str, ...]]] = [
    (
        "unknown model",
        pb.ModelInferRequest(model_name="nope", inputs=[GOOD], raw_input_contents=[X.tobytes()]),
        grpc.StatusCode.NOT_FOUND,
        ("nope",),
    ),
    (
        "unknown version",
        pb.ModelInferRequest(
            model_name="m", model_version="9", inputs=[GOOD], raw_input_contents=[X.tobytes()]
        ),
        grpc.StatusCode.NOT_FOUND,
        ("'9'",),
    ),
    (
        "missing input",
        pb.ModelInferRequest(model_name="m"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("input", "missing"),
    ),
    (
        "extra input",
        pb.ModelInferRequest(
            model_name="m",
            inputs=[GOOD, Tensor(name="extra", datatype="FP32", shape=[2, 4])],
            raw_input_contents=[X.tobytes(), X.tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("extra",),
    ),
    (
        "duplicate input",
        pb.ModelInferRequest(model_name="m", inputs=[GOOD, GOOD], raw_input_contents=[X.tobytes()] * 2),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("input", "more than once"),
    ),
    (
        "wrong dtype",
        pb.ModelInferRequest(
            model_name="m",
            inputs=[Tensor(name="input", datatype="FP64", shape=[2, 4])],
            raw_input_contents=[X.astype("<f8").tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("input", "FP64", "FP32"),
    ),
    (
        "unknown dtype",
        pb.ModelInferRequest(
            model_name="m",
            inputs=[Tensor(name="input", datatype="FP8", shape=[2, 4])],
            raw_input_contents=[X.tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("input", "FP8"),
    ),
    (
        "shape mismatch",
        pb.ModelInferRequest(
            model_name="m",
            inputs=[Tensor(name="input", datatype="FP32", shape=[2, 5])],
            raw_input_contents=[np.ones((2, 5), "<f4").tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("input", "[2, 5]", "[-1, 4]"),
    ),
    (
        "wrong rank",
        pb.ModelInferRequest(
            model_name="m",
            inputs=[Tensor(name="input", datatype="FP32", shape=[8])],
            raw_input_contents=[X.tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("input", "shape"),
    ),
    (
        "negative dim",
        pb.ModelInferRequest(
            model_name="m",
            inputs=[Tensor(name="input", datatype="FP32", shape=[-2, 4])],
            raw_input_contents=[X.tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("input", "shape"),
    ),
    (
        "raw length",
        pb.ModelInferRequest(model_name="m", inputs=[GOOD], raw_input_contents=[X.tobytes()[:-1]]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("input", "31 raw bytes", "32"),
    ),
    (
        "raw count",
        pb.ModelInferRequest(model_name="m", inputs=[GOOD], raw_input_contents=[X.tobytes()] * 2),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("raw_input_contents", "2 entries"),
    ),
    (
        "mixed raw and typed",
        pb.ModelInferRequest(
            model_name="m",
            inputs=[
                Tensor(
                    name="input",
                    datatype="FP32",
                    shape=[2, 4],
                    contents=pb.InferTensorContents(fp32_contents=[1.0] * 8),
                )
            ],
            raw_input_contents=[X.tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("input", "mixes"),
    ),
    (
        "typed count",
        pb.ModelInferRequest(
            model_name="m",
            inputs=[
                Tensor(
                    name="input",
                    datatype="FP32",
                    shape=[2, 4],
                    contents=pb.InferTensorContents(fp32_contents=[1.0] * 7),
                )
            ],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("input", "7 values"),
    ),
    (
        "typed wrong field",
        pb.ModelInferRequest(
            model_name="m",
            inputs=[
                Tensor(
                    name="input",
                    datatype="FP32",
                    shape=[2, 4],
                    contents=pb.InferTensorContents(int_contents=[1] * 8),
                )
            ],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("input", "0 values in contents.fp32_contents"),
    ),
    (
        "unknown output",
        pb.ModelInferRequest(
            model_name="m",
            inputs=[GOOD],
            raw_input_contents=[X.tobytes()],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("logits",),
    ),
    (
        "bad timeout",
        pb.ModelInferRequest(
            model_name="m",
            inputs=[GOOD],
            raw_input_contents=[X.tobytes()],
            parameters={"timeout": pb.InferParameter(string_param="soon")},
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("timeout",),
    ),
]


async def test_bad_inputs(serve, registry: ModelRegistry, store: ArtifactStore) -> None:
    register_mlp(registry, store, "m")
    nan = X.copy()
    nan[1, 2] = np.nan
    nan_request = pb.ModelInferRequest(model_name="m", inputs=[GOOD], raw_input_contents=[nan.tobytes()])
    async with serve(nan_policy="reject") as srv:
        nan_case = ("nan", nan_request, grpc.StatusCode.INVALID_ARGUMENT, ("input", "NaN"))
        for label, request, code, words in [*CASES, nan_case]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await srv.stub.ModelInfer(request)
            assert info.value.code() == code, label
            for word in words:
                assert word in (info.value.details() or ""), (label, info.value.details())
        good = pb.ModelInferRequest(model_name="m", inputs=[GOOD], raw_input_contents=[X.tobytes()])
        assert (await srv.stub.ModelInfer(good)).model_version == "1"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await srv.stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await srv.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ghost"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_nan_allowed_by_default(serve, registry: ModelRegistry, store: ArtifactStore) -> None:
    register_mlp(registry, store, "m")
    nan = X.copy()
    nan[0, 0] = np.nan
    async with serve() as srv:
        response = await srv.stub.ModelInfer(
            pb.ModelInferRequest(model_name="m", inputs=[GOOD], raw_input_contents=[nan.tobytes()])
        )
        assert np.isnan(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 3)[0]).all()
