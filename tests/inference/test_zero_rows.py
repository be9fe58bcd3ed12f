"""A request with 0 rows is answered at once with 0-row outputs, in ModelInfer
and in ModelStreamInfer (it used to wait in the queue, never waking the model
thread, until another request came: with no deadline, forever)."""

from __future__ import annotations

import pytest

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.modelfleet.common.v1 import model_pb2
from common.artifacts import ArtifactStore
from common.errors import InvalidArgument
from common.registry import ModelRegistry
from common.settings import Settings
from services.inference.codec import empty_outputs
from tests.inference.conftest import register_mlp, running

# A safety bound only: a regression fails with DEADLINE_EXCEEDED instead of hanging.
TIMEOUT_S = 10.0


def _empty() -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[0, 4])
    return pb.ModelInferRequest(model_name="zero", inputs=[tensor], raw_input_contents=[b""])


async def test_zero_rows_answered_in_infer_and_stream(
    registry: ModelRegistry, store: ArtifactStore, settings: Settings
) -> None:
    register_mlp(registry, store, "zero")
    async with running(settings) as server:
        reply = await server.stub.ModelInfer(_empty(), timeout=TIMEOUT_S)
        assert [list(o.shape) for o in reply.outputs] == [[0, 3]]
        assert reply.raw_output_contents == [b""]
        typed = _empty()
        typed.ClearField("raw_input_contents")
        typed.inputs[0].contents.SetInParent()
        assert (await server.stub.ModelInfer(typed, timeout=TIMEOUT_S)).outputs[0].shape == [0, 3]

        async def requests():
            for _ in range(3):
                yield _empty()

        got = [r async for r in server.stub.ModelStreamInfer(requests(), timeout=TIMEOUT_S)]
        assert [list(r.infer_response.outputs[0].shape) for r in got] == [[0, 3]] * 3
        assert not any(r.error_message for r in got)


def test_zero_rows_with_an_output_dim_known_only_from_data_is_refused() -> None:
    spec = model_pb2.TensorSpec(name="o", datatype="FP32", shape=[-1, -1])
    with pytest.raises(InvalidArgument, match="0 rows"):
        empty_outputs([spec], None)
