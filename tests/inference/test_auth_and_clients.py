"""Auth on and off, and the independent tritonclient library against our server."""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import numpy as np
import pytest
import torch

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.artifacts import ArtifactStore
from common.registry import ModelRegistry
from tests.inference.conftest import register_mlp

pytestmark = pytest.mark.timeout(60)

Tensor = pb.ModelInferRequest.InferInputTensor
REQUEST = pb.ModelInferRequest(
    model_name="m",
    inputs=[Tensor(name="input", datatype="FP32", shape=[1, 4])],
    raw_input_contents=[np.ones((1, 4), "<f4").tobytes()],
)


async def test_auth_on(serve, registry: ModelRegistry, store: ArtifactStore) -> None:
    register_mlp(registry, store, "m")
    async with serve(auth_tokens=("s3cret",)) as srv:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await srv.stub.ModelInfer(REQUEST)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await srv.stub.ModelInfer(REQUEST, metadata=[("authorization", "Bearer wrong")])
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        response = await srv.stub.ModelInfer(REQUEST, metadata=[("authorization", "Bearer s3cret")])
        assert response.model_version == "1"


async def test_auth_off(serve, registry: ModelRegistry, store: ArtifactStore) -> None:
    register_mlp(registry, store, "m")
    async with serve() as srv:
        assert (await srv.stub.ModelInfer(REQUEST)).model_version == "1"


# tritonclient registers its own copy of the `inference` protos, which clashes
# with ours in one descriptor pool, so it runs in a child process, as a real
# third-party client would.
TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
client = triton.InferenceServerClient(url=sys.argv[1])
x = np.array(json.loads(sys.argv[2]), dtype=np.float32)
infer_input = triton.InferInput("input", list(x.shape), "FP32")
infer_input.set_data_from_numpy(x)
result = client.infer("m", [infer_input], outputs=[triton.InferRequestedOutput("output")], request_id="t1")
print(json.dumps({
    "metadata": client.get_model_metadata("m", as_json=True),
    "ready": client.is_model_ready("m"),
    "live": client.is_server_live(),
    "output": result.as_numpy("output").tolist(),
    "id": result.get_response().id,
}))
"""


async def test_tritonclient(serve, registry: ModelRegistry, store: ArtifactStore) -> None:
    _, model = register_mlp(registry, store, "m")
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    async with serve() as srv:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            TRITON_CLIENT,
            srv.address,
            json.dumps(x.tolist()),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(child.communicate(), timeout=60)
        assert child.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["ready"] and result["live"] and result["id"] == "t1"
    assert result["metadata"]["platform"] == "pytorch_safetensors"
    assert result["metadata"]["inputs"][0]["name"] == "input"
    assert result["metadata"]["inputs"][0]["shape"] == ["-1", "4"]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.array(result["output"], dtype=np.float32), expected, rtol=1e-5, atol=1e-6)
