"""A model whose dataset was imputed takes NaN inputs, even under
MODELFLEET_NAN_POLICY=reject, and fills them as its training data was filled;
Inf is still refused, and a model without imputation still refuses NaN."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactStore
from common.models.loading import save_weights
from common.models.mlp import build_model
from common.registry import ModelRegistry
from tests.inference.conftest import mlp_arch, register_mlp

pytestmark = pytest.mark.timeout(60)

FILL = [0.5, -1.0, 2.0, 3.0]


def _request(model: str, row: list[float]) -> pb.ModelInferRequest:
    x = np.array([row], dtype="<f4")
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 4])
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes()])


async def test_imputed_models_take_nan_inputs(serve, registry: ModelRegistry, store: ArtifactStore) -> None:
    arch = mlp_arch()
    norm = model_pb2.Normalization(
        kind=model_pb2.NORMALIZATION_KIND_ZSCORE, shift=[1, 2, 3, 4], scale=[1, 2, 1, 2], fill=FILL
    )
    torch.manual_seed(0)
    model = build_model(arch, norm).eval()
    ref = save_weights(model, store)
    registry.register(
        registry_pb2.ModelVersion(
            model_name="imputed",
            format=registry_pb2.MODEL_FORMAT_SAFETENSORS,
            architecture=arch,
            normalization=norm,
            artifact_digest=ref.digest,
            artifact_size_bytes=ref.size,
        )
    )
    register_mlp(registry, store, "plain")
    async with serve(nan_policy="reject") as srv:
        missing = await srv.stub.ModelInfer(_request("imputed", [float("nan"), 1.0, float("nan"), 0.0]))
        filled = await srv.stub.ModelInfer(_request("imputed", [FILL[0], 1.0, FILL[2], 0.0]))
        assert missing.raw_output_contents[0] == filled.raw_output_contents[0]
        for model_name, row, words in (
            ("imputed", [float("inf"), 1.0, 2.0, 3.0], "Inf values"),
            ("plain", [float("nan"), 1.0, 2.0, 3.0], "NaN or Inf"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await srv.stub.ModelInfer(_request(model_name, row))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in (
                info.value.details() or ""
            )
