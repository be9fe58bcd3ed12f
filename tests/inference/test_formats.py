"""TorchScript and torch.export models serve; artifacts carrying a pickle payload
are refused without running it."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactStore
from common.errors import InvalidArgument
from common.models.loading import load_model
from common.registry import ModelRegistry
from tests.inference.conftest import register_file

pytestmark = pytest.mark.timeout(90)

Tensor = pb.ModelInferRequest.InferInputTensor
IN = [model_pb2.TensorSpec(name="x", datatype="FP32", shape=[-1, 4])]
OUT = [model_pb2.TensorSpec(name="y", datatype="FP32", shape=[-1, 2])]


def small() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Tanh()).eval()


def export_file(path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(small(), (torch.zeros(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def replace_member(src: Path, dst: Path, suffix: str, data: bytes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, data if item.filename.endswith(suffix) else zin.read(item.filename))


async def test_torchscript_and_export_serve(
    serve, registry: ModelRegistry, store: ArtifactStore, tmp_path: Path
) -> None:
    script = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(small()), str(script))
    register_file(registry, store, "ts", script, registry_pb2.MODEL_FORMAT_TORCHSCRIPT, IN, OUT)
    register_file(
        registry,
        store,
        "ex",
        export_file(tmp_path / "m.pt2"),
        registry_pb2.MODEL_FORMAT_TORCH_EXPORT,
        IN,
        OUT,
    )
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    with torch.no_grad():
        expected = small()(torch.from_numpy(x)).numpy()
    async with serve() as srv:
        for name, platform in (("ts", "pytorch_torchscript"), ("ex", "pytorch_export")):
            meta = await srv.stub.ModelMetadata(pb.ModelMetadataRequest(name=name))
            assert meta.platform == platform
            response = await srv.stub.ModelInfer(
                pb.ModelInferRequest(
                    model_name=name,
                    inputs=[Tensor(name="x", datatype="FP32", shape=[3, 4])],
                    raw_input_contents=[x.tobytes()],
                )
            )
            got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(3, 2)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_export_with_pickle_payload_is_refused(store: ArtifactStore, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save(Payload(marker), evil)
    path = tmp_path / "evil.pt2"
    replace_member(export_file(tmp_path / "good.pt2"), path, "sample_inputs/model.pt", evil.getvalue())
    # The payload is live: torch.export.load without the guard runs it (in a child process).
    probe = "import sys, torch; torch.export.load(sys.argv[1])"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_WEIGHTS_ONLY_LOAD"}
    subprocess.run([sys.executable, "-c", probe, str(path)], env=env, capture_output=True, timeout=60)
    assert marker.exists(), "the planted payload should run when loaded unguarded"
    marker.unlink()

    version = _version(store, path, registry_pb2.MODEL_FORMAT_TORCH_EXPORT)
    with pytest.raises(InvalidArgument, match="not a loadable"):
        load_model(version, store, torch.device("cpu"))
    assert not marker.exists()


def test_torchscript_with_pickle_payload_is_refused(store: ArtifactStore, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    script = tmp_path / "good.pt"
    torch.jit.save(torch.jit.script(small()), str(script))
    import pickle

    evil = tmp_path / "evil.pt"
    replace_member(script, evil, "/data.pkl", pickle.dumps(Payload(marker), protocol=2))
    plain = tmp_path / "plain.pt"
    torch.save(Payload(marker), plain)  # an ordinary pickle checkpoint posing as TorchScript
    for path in (evil, plain):
        version = _version(store, path, registry_pb2.MODEL_FORMAT_TORCHSCRIPT)
        with pytest.raises(InvalidArgument, match=r"not a loadable|not allowed"):
            load_model(version, store, torch.device("cpu"))
        assert not marker.exists()


def _version(
    store: ArtifactStore, path: Path, fmt: registry_pb2.ModelFormat.ValueType
) -> registry_pb2.ModelVersion:
    ref = store.put_file(path)
    return registry_pb2.ModelVersion(
        model_name="evil",
        version="1",
        format=fmt,
        artifact_digest=ref.digest,
        inputs=IN,
        outputs=OUT,
    )


async def test_variable_image_dims_serve_without_a_warm_up_probe(
    serve, registry: ModelRegistry, store: ArtifactStore, tmp_path: Path
) -> None:
    """Warm-up zeros of [1, 3, 1, 1] would fail a 3x3 convolution and the load with
    it; a signature with variable dims past the batch is not warmed up."""
    torch.manual_seed(0)
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    ).eval()
    path = tmp_path / "conv.pt"
    torch.jit.save(torch.jit.script(conv), str(path))
    image = [model_pb2.TensorSpec(name="x", datatype="FP32", shape=[-1, 3, -1, -1])]
    out = [model_pb2.TensorSpec(name="y", datatype="FP32", shape=[-1, 4])]
    register_file(registry, store, "conv", path, registry_pb2.MODEL_FORMAT_TORCHSCRIPT, image, out)
    x = np.random.default_rng(0).standard_normal((1, 3, 9, 7)).astype(np.float32)
    async with serve() as srv:
        response = await srv.stub.ModelInfer(
            pb.ModelInferRequest(
                model_name="conv",
                inputs=[Tensor(name="x", datatype="FP32", shape=[1, 3, 9, 7])],
                raw_input_contents=[x.tobytes()],
            )
        )
    with torch.no_grad():
        expected = conv(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        np.frombuffer(response.raw_output_contents[0], "<f4").reshape(1, 4), expected, rtol=1e-5
    )
