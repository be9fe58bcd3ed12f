"""Every GRPCInferenceService RPC against a real server, and every datatype round trip."""

from __future__ import annotations

from pathlib import Path
from typing import List  # noqa: UP035 (TorchScript resolves typing.List)

import numpy as np
import pytest
import torch

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactStore
from common.registry import ModelRegistry
from tests.inference.conftest import register_file, register_mlp

pytestmark = pytest.mark.timeout(60)

Tensor = pb.ModelInferRequest.InferInputTensor


def raw_request(name: str, x: np.ndarray, version: str = "", **kwargs: object) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=name,
        model_version=version,
        inputs=[Tensor(name="input", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.astype("<f4").tobytes()],
        **kwargs,  # type: ignore[arg-type]
    )


def output(response: pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    tensor = response.outputs[index]
    assert tensor.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[index], dtype="<f4").reshape(tuple(tensor.shape))


async def test_every_rpc(serve, registry: ModelRegistry, store: ArtifactStore) -> None:
    _, model = register_mlp(registry, store, "iris")
    async with serve() as srv:
        stub = srv.stub
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="iris"))).ready
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="iris", version="7"))).ready
        meta = await stub.ServerMetadata(pb.ServerMetadataRequest())
        assert meta.name == "modelfleet"
        assert {"classification", "model_repository", "statistics"} <= set(meta.extensions)
        mm = await stub.ModelMetadata(pb.ModelMetadataRequest(name="iris"))
        assert mm.platform == "pytorch_safetensors"
        assert list(mm.versions) == ["1"]
        assert [(t.name, t.datatype, list(t.shape)) for t in mm.inputs] == [("input", "FP32", [-1, 4])]
        assert [(t.name, t.datatype, list(t.shape)) for t in mm.outputs] == [("output", "FP32", [-1, 3])]

        x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
        response = await stub.ModelInfer(raw_request("iris", x, id="req-1"))
        assert response.id == "req-1"
        assert (response.model_name, response.model_version) == ("iris", "1")
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(output(response), expected, rtol=1e-5, atol=1e-6)

        typed = pb.ModelInferRequest(
            model_name="iris",
            inputs=[
                Tensor(
                    name="input",
                    datatype="FP32",
                    shape=[5, 4],
                    contents=pb.InferTensorContents(fp32_contents=x.ravel()),
                )
            ],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="output")],
        )
        np.testing.assert_allclose(output(await stub.ModelInfer(typed)), expected, rtol=1e-5, atol=1e-6)

        async def requests():
            for i in range(3):
                yield raw_request("iris", x[i : i + 1], id=f"s{i}")
            yield raw_request("nope", x[:1], id="bad")

        streamed = [r async for r in stub.ModelStreamInfer(requests())]
        assert [r.infer_response.id for r in streamed[:3]] == ["s0", "s1", "s2"]
        assert "nope" in streamed[3].error_message

        stats = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name="iris"))).model_stats
        assert len(stats) == 1 and stats[0].version == "1"
        assert stats[0].inference_stats.success.count == 5
        assert stats[0].inference_count == 5 + 5 + 3
        assert sum(b.compute_infer.count for b in stats[0].batch_stats) == stats[0].execution_count
        assert stats[0].last_inference > 0

        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert [(m.name, m.version, m.state) for m in index.models] == [("iris", "1", "READY")]
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="iris"))
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="iris"))).ready
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert [(m.name, m.state) for m in index.models] == [("iris", "UNAVAILABLE")]
        assert not (await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))).models

        register_mlp(registry, store, "iris", seed=1)
        version = pb.ModelRepositoryParameter(string_param="1")
        await stub.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="iris", parameters={"version": version})
        )
        assert (await stub.ModelInfer(raw_request("iris", x))).model_version == "1"
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="iris"))
        assert (await stub.ModelInfer(raw_request("iris", x))).model_version == "2"


DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BF16": np.uint16,
}


def echo_model(tmp_path: Path) -> Path:
    """A TorchScript model with one input per datatype, echoed back (BF16 doubled)."""
    names = list(DTYPES)

    class Multi(torch.nn.Module):
        def forward(
            self,
            a: torch.Tensor,
            b: torch.Tensor,
            c: torch.Tensor,
            d: torch.Tensor,
            e: torch.Tensor,
            f: torch.Tensor,
            g: torch.Tensor,
            h: torch.Tensor,
            i: torch.Tensor,
            j: torch.Tensor,
        ) -> List[torch.Tensor]:  # noqa: UP006 (TorchScript needs typing.List)
            return [
                a.clone(),
                b.clone(),
                c.clone(),
                d.clone(),
                e.clone(),
                f.clone(),
                g.clone(),
                h.clone(),
                i.clone(),
                j * 2,
            ]

    assert len(names) == 10
    path = tmp_path / "echo.pt"
    torch.jit.save(torch.jit.script(Multi()), str(path))
    return path


async def test_every_dtype_round_trip(
    serve, registry: ModelRegistry, store: ArtifactStore, tmp_path: Path
) -> None:
    specs = [model_pb2.TensorSpec(name=f"in_{d}", datatype=d, shape=[-1, 3]) for d in DTYPES]
    outs = [model_pb2.TensorSpec(name=f"out_{d}", datatype=d, shape=[-1, 3]) for d in DTYPES]
    register_file(
        registry, store, "echo", echo_model(tmp_path), registry_pb2.MODEL_FORMAT_TORCHSCRIPT, specs, outs
    )
    rng = np.random.default_rng(1)
    values: dict[str, np.ndarray] = {
        d: (rng.integers(0, 2, (2, 3)).astype(t) if d == "BOOL" else rng.integers(0, 100, (2, 3)).astype(t))
        for d, t in DTYPES.items()
    }
    async with serve() as srv:
        meta = await srv.stub.ModelMetadata(pb.ModelMetadataRequest(name="echo"))
        assert meta.platform == "pytorch_torchscript"
        raw = pb.ModelInferRequest(
            model_name="echo",
            inputs=[Tensor(name=f"in_{d}", datatype=d, shape=[2, 3]) for d in DTYPES],
            raw_input_contents=[
                values[d].astype(values[d].dtype.newbyteorder("<")).tobytes() for d in DTYPES
            ],
        )
        response = await srv.stub.ModelInfer(raw)
        got = {
            o.name: (o.datatype, data)
            for o, data in zip(response.outputs, response.raw_output_contents, strict=True)
        }
        for d, t in DTYPES.items():
            datatype, data = got[f"out_{d}"]
            assert datatype == d
            result: np.ndarray = np.frombuffer(data, dtype=t).reshape(2, 3)
            if d == "BF16":
                expected = (
                    (torch.from_numpy(values[d].copy()).view(torch.bfloat16) * 2).view(torch.int16).numpy()
                )
                np.testing.assert_array_equal(result.view(np.int16), expected)
            else:
                np.testing.assert_array_equal(result, values[d])

        fields = {
            "BOOL": "bool_contents",
            "UINT8": "uint_contents",
            "INT64": "int64_contents",
            "FP32": "fp32_contents",
            "FP64": "fp64_contents",
            "FP16": "fp32_contents",
        }
        typed_inputs = []
        for d in DTYPES:
            if d == "BF16":
                continue
            field = fields.get(d, "int_contents")
            contents = pb.InferTensorContents(**{field: values[d].ravel().tolist()})
            typed_inputs.append(Tensor(name=f"in_{d}", datatype=d, shape=[2, 3], contents=contents))
        # BF16 has no typed field: only raw. Typed requests therefore cannot feed this model's BF16 input.
        bad = pb.ModelInferRequest(
            model_name="echo", inputs=[*typed_inputs, Tensor(name="in_BF16", datatype="BF16", shape=[2, 3])]
        )
        with pytest.raises(Exception) as info:
            await srv.stub.ModelInfer(bad)
        assert "in_BF16" in str(info.value) and "raw" in str(info.value)
