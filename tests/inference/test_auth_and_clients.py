"""Auth on and off, and the independent tritonclient library against our server."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

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


async def run_client(script: str, *args: str) -> object:
    """Run a tritonclient script in a child process; its JSON output."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(child.communicate(), timeout=60)
    assert child.returncode == 0, err.decode()
    return json.loads(out)


async def test_tritonclient(serve, registry: ModelRegistry, store: ArtifactStore) -> None:
    _, model = register_mlp(registry, store, "m")
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    async with serve() as srv:
        result: Any = await run_client(TRITON_CLIENT, srv.address, json.dumps(x.tolist()))
    assert result["ready"] and result["live"] and result["id"] == "t1"
    assert result["metadata"]["platform"] == "pytorch_safetensors"
    assert result["metadata"]["inputs"][0]["name"] == "input"
    assert result["metadata"]["inputs"][0]["shape"] == ["-1", "4"]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.array(result["output"], dtype=np.float32), expected, rtol=1e-5, atol=1e-6)


TRITON_CLASSIFY = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
client = triton.InferenceServerClient(url=sys.argv[1])
x = np.array(json.loads(sys.argv[2]), dtype=np.float32)
infer_input = triton.InferInput("input", list(x.shape), "FP32")
infer_input.set_data_from_numpy(x)
wanted = triton.InferRequestedOutput("output", class_count=int(sys.argv[3]))
result = client.infer(sys.argv[4], [infer_input], outputs=[wanted])
print(json.dumps([[s.decode() for s in row] for row in result.as_numpy("output")]))
"""


async def test_tritonclient_classification_extension(
    serve, registry: ModelRegistry, store: ArtifactStore
) -> None:
    """class_count=k answers the top-k classes per row as 'score:index:label', as Triton does."""
    names = ["setosa", "versicolor", "virginica"]
    _, model = register_mlp(registry, store, "iris", class_names=names)
    register_mlp(registry, store, "plain")
    x = np.random.default_rng(2).standard_normal((4, 4)).astype(np.float32)

    async def classify(name: str, k: int) -> Any:
        return await run_client(TRITON_CLASSIFY, srv.address, json.dumps(x.tolist()), str(k), name)

    async with serve() as srv:
        top2 = await classify("iris", 2)
        unnamed = await classify("plain", 5)  # k past the class count gives every class
        with pytest.raises(grpc.aio.AioRpcError) as info:
            bad = pb.ModelInferRequest.InferRequestedOutputTensor(name="output")
            bad.parameters["classification"].int64_param = 0
            await srv.stub.ModelInfer(
                pb.ModelInferRequest(
                    model_name="iris",
                    inputs=REQUEST.inputs,
                    raw_input_contents=REQUEST.raw_input_contents,
                    outputs=[bad],
                )
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "classification" in (
            info.value.details() or ""
        )
    with torch.no_grad():
        scores = model(torch.from_numpy(x)).numpy()
    for row, answer in zip(scores, top2, strict=True):
        order = np.argsort(-row, kind="stable")[:2]
        assert [a.split(":")[1:] for a in answer] == [[str(i), names[i]] for i in order]
        assert [float(a.split(":")[0]) for a in answer] == pytest.approx(row[order].tolist(), abs=1e-5)
    assert all(len(r) == 3 and all(len(a.split(":")) == 2 for a in r) for r in unnamed)
