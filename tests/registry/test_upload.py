"""ModelUpload without gRPC: header checks, validation by loading, cleanup."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pytest
import redis
import torch
from safetensors.torch import save

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactStore
from common.errors import InvalidArgument, NotFound, ResourceExhausted
from common.models.loading import load_model
from common.registry import ModelRegistry
from common.settings import Settings
from services.registry.upload import ModelUpload, check_header, first_header
from tests.registry.helpers import ARCH, mlp_bytes, mlp_header, torchscript_bytes


@pytest.fixture
def registry(redis_client: redis.Redis, settings: Settings) -> ModelRegistry:
    return ModelRegistry(redis_client, settings.redis_prefix)


def stored_digests(store: ArtifactStore) -> list[str]:
    return sorted(p.name for p in (store.root / "sha256").glob("*/*"))


def upload(
    header: registry_pb2.UploadModelHeader,
    data: bytes,
    store: ArtifactStore,
    registry: ModelRegistry,
    limit: int = 1 << 20,
) -> registry_pb2.ModelVersion:
    job = ModelUpload(header, store, registry, limit)
    for start in range(0, len(data), 100):
        job.write(data[start : start + 100])
    return job.commit()


def test_safetensors_upload_registers_with_mlp_specs(store: ArtifactStore, registry: ModelRegistry) -> None:
    data = mlp_bytes()
    version = upload(mlp_header(sha256=hashlib.sha256(data).hexdigest()), data, store, registry)
    assert (version.model_name, version.version) == ("iris", "1")
    assert version.artifact_digest == hashlib.sha256(data).hexdigest()
    assert version.artifact_size_bytes == len(data)
    assert [(t.name, t.datatype, list(t.shape)) for t in version.inputs] == [("input", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in version.outputs] == [("output", "FP32", [-1, 3])]
    assert version.metrics["test_accuracy"] == pytest.approx(0.9)
    assert store.read_bytes(version.artifact_digest) == data
    assert registry.get_version("iris").architecture == ARCH


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # TorchScript is a supported format
def test_torchscript_upload_needs_tensor_specs(store: ArtifactStore, registry: ModelRegistry) -> None:
    header = registry_pb2.UploadModelHeader(name="ts", format=registry_pb2.MODEL_FORMAT_TORCHSCRIPT)
    with pytest.raises(InvalidArgument, match=r"header\.inputs and header\.outputs are required"):
        check_header(header)
    header.inputs.add(name="x", datatype="FP32", shape=[-1, 4])
    header.outputs.add(name="y", datatype="FP32", shape=[-1, 2])
    version = upload(header, torchscript_bytes(), store, registry)
    assert version.format == registry_pb2.MODEL_FORMAT_TORCHSCRIPT and version.inputs[0].name == "x"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "a/b"}, r"header\.name"),
        ({"format": registry_pb2.MODEL_FORMAT_UNSPECIFIED}, r"header\.format is required"),
        ({"sha256": "zz"}, r"header\.sha256"),
    ],
)
def test_header_checks(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_header(mlp_header(**change))


def test_header_checks_architecture_specs_and_normalization() -> None:
    no_arch = mlp_header()
    no_arch.ClearField("architecture")
    with pytest.raises(InvalidArgument, match=r"architecture is required for MODEL_FORMAT_SAFETENSORS"):
        check_header(no_arch)
    bad_width = mlp_header()
    bad_width.architecture.mlp.output_size = 0
    with pytest.raises(InvalidArgument, match=r"header\.architecture\.mlp\.output_size"):
        check_header(bad_width)
    bad_type = mlp_header()
    bad_type.inputs.add(name="input", datatype="FLOAT", shape=[-1, 4])
    with pytest.raises(InvalidArgument, match=r"header\.inputs\[0\]\.datatype 'FLOAT'"):
        check_header(bad_type)
    bad_norm = mlp_header()
    bad_norm.normalization.CopyFrom(
        model_pb2.Normalization(kind=model_pb2.NORMALIZATION_KIND_ZSCORE, shift=[0, 0], scale=[1, 1])
    )
    with pytest.raises(InvalidArgument, match="2 values for 4 input features"):
        check_header(bad_norm)
    with pytest.raises(InvalidArgument, match="first UploadModel message must carry the header"):
        first_header(registry_pb2.UploadModelRequest(chunk=b"x"))


@pytest.mark.parametrize("datatype", ["UINT16", "UINT32", "UINT64", "BYTES", "fp32", ""])
def test_only_datatypes_a_replica_can_serve_are_accepted(datatype: str) -> None:
    header = registry_pb2.UploadModelHeader(
        name="ts",
        format=registry_pb2.MODEL_FORMAT_TORCHSCRIPT,
        inputs=[model_pb2.TensorSpec(name="x", datatype=datatype, shape=[-1, 4])],
        outputs=[model_pb2.TensorSpec(name="y", datatype="FP32", shape=[-1, 2])],
    )
    with pytest.raises(
        InvalidArgument, match=r"header\.inputs\[0\]\.datatype .* is not one this server serves"
    ):
        check_header(header)


def test_garbage_registers_nothing_and_leaves_no_bytes(store: ArtifactStore, registry: ModelRegistry) -> None:
    with pytest.raises(InvalidArgument, match="not a loadable MODEL_FORMAT_SAFETENSORS"):
        upload(mlp_header(), b"not a model at all" * 10, store, registry)
    with pytest.raises(NotFound):
        registry.get_model("iris")
    assert stored_digests(store) == []


def test_wrong_architecture_fails_the_load(store: ArtifactStore, registry: ModelRegistry) -> None:
    header = mlp_header()
    header.architecture.mlp.hidden_sizes[:] = [16]
    with pytest.raises(InvalidArgument):
        upload(header, mlp_bytes(), store, registry)
    assert stored_digests(store) == []


def _spec(name: str, shape: list[int], datatype: str = "FP32") -> model_pb2.TensorSpec:
    return model_pb2.TensorSpec(name=name, datatype=datatype, shape=shape)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        ([_spec("x", [-1, 5])], [_spec("y", [-1, 2])], r"fails on zeros of .* inputs \(x \[1, 5\]\)"),
        ([_spec("x", [-1, 4], "INT64")], [_spec("y", [-1, 2])], r"fails on zeros of its declared inputs"),
        ([_spec("x", [-1, 4])], [_spec("y", [-1, 2]), _spec("z", [-1, 2])], r"1 outputs but declares 2"),
        ([_spec("x", [-1, 4]), _spec("w", [-1, 4])], [_spec("y", [-1, 2])], r"fails on zeros"),
    ],
    ids=["wrong-width", "wrong-dtype", "output-count", "input-count"],
)
def test_a_model_that_cannot_serve_its_declared_signature_is_refused(
    store: ArtifactStore,
    registry: ModelRegistry,
    inputs: list[model_pb2.TensorSpec],
    outputs: list[model_pb2.TensorSpec],
    message: str,
) -> None:
    header = registry_pb2.UploadModelHeader(
        name="ts", format=registry_pb2.MODEL_FORMAT_TORCHSCRIPT, inputs=inputs, outputs=outputs
    )
    with pytest.raises(InvalidArgument, match=message):
        upload(header, torchscript_bytes(), store, registry)
    with pytest.raises(NotFound):
        registry.get_model("ts")
    assert stored_digests(store) == []


def test_failed_upload_keeps_shared_bytes(store: ArtifactStore, registry: ModelRegistry) -> None:
    data = mlp_bytes()
    good = upload(mlp_header(), data, store, registry)
    wrong = mlp_header("other")
    wrong.architecture.mlp.input_size = 5
    with pytest.raises(InvalidArgument):
        upload(wrong, data, store, registry)
    assert stored_digests(store) == [good.artifact_digest]
    with pytest.raises(NotFound):
        registry.get_model("other")


def test_sha256_mismatch(store: ArtifactStore, registry: ModelRegistry) -> None:
    with pytest.raises(InvalidArgument, match="hash to"):
        upload(mlp_header(sha256="0" * 64), mlp_bytes(), store, registry)
    assert stored_digests(store) == []


def test_size_limit(store: ArtifactStore, registry: ModelRegistry) -> None:
    with pytest.raises(ResourceExhausted, match="size limit of 150 bytes"):
        upload(mlp_header(), mlp_bytes(), store, registry, limit=150)
    assert stored_digests(store) == []
    assert list((store.root / "tmp").iterdir()) == []


def test_an_architecture_larger_than_its_weights_is_refused_before_allocation(
    store: ArtifactStore, registry: ModelRegistry
) -> None:
    header = mlp_header()
    header.architecture.mlp.hidden_sizes[:] = [1 << 30]  # 8.6e9 parameters for a 564-byte file
    with pytest.raises(InvalidArgument, match=r"parameters but the artifact holds only"):
        upload(header, mlp_bytes(), store, registry)
    assert stored_digests(store) == []


class _TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 3)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(features)
        return hidden, hidden.argmax(dim=1)


def test_a_torch_export_upload_takes_its_signature_from_the_program(
    store: ArtifactStore, registry: ModelRegistry
) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    buffer = io.BytesIO()
    torch.export.save(
        torch.export.export(_TwoHeads(), (torch.zeros(2, 4),), dynamic_shapes=({0: batch},)), buffer
    )
    header = registry_pb2.UploadModelHeader(name="ex", format=registry_pb2.MODEL_FORMAT_TORCH_EXPORT)
    version = upload(header, buffer.getvalue(), store, registry)
    assert [(t.name, t.datatype, list(t.shape)) for t in version.inputs] == [("features", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in version.outputs] == [
        ("output_0", "FP32", [-1, 3]),
        ("output_1", "INT64", [-1]),
    ]
    # Declared specs still win over the program's.
    header.outputs.add(name="scores", datatype="FP32", shape=[-1, 3])
    header.outputs.add(name="label", datatype="INT64", shape=[-1])
    assert [t.name for t in upload(header, buffer.getvalue(), store, registry).outputs] == ["scores", "label"]


@pytest.mark.parametrize("prefix", ["", "module.", "model."])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_plain_sequential_state_dict_uploads_as_an_mlp(
    store: ArtifactStore, registry: ModelRegistry, prefix: str, dropout: float
) -> None:
    """No undocumented "layers." prefix: a user's nn.Sequential weights map onto
    the MLP's Linear layers in order, with or without dropout between them."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    data = save({f"{prefix}{k}": v.contiguous() for k, v in plain.state_dict().items()})
    header = mlp_header()
    header.architecture.mlp.dropout = dropout
    version = upload(header, data, store, registry)
    loaded = load_model(version, store, torch.device("cpu"))
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), plain(x))
    wrong = save({k: v.contiguous() for k, v in plain[:1].state_dict().items()})  # one layer short
    with pytest.raises(InvalidArgument, match="do not match the architecture"):
        upload(header, wrong, store, registry)


def test_a_model_with_variable_image_dims_uploads_and_serves_any_size(
    store: ArtifactStore, registry: ModelRegistry
) -> None:
    """Zeros of [1, 3, 1, 1] are no valid input for a 3x3 convolution: such a
    signature is verified but not probe-run, and real sizes serve."""
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(conv.eval()), buffer)
    header = registry_pb2.UploadModelHeader(
        name="conv",
        format=registry_pb2.MODEL_FORMAT_TORCHSCRIPT,
        inputs=[model_pb2.TensorSpec(name="x", datatype="FP32", shape=[-1, 3, -1, -1])],
        outputs=[model_pb2.TensorSpec(name="y", datatype="FP32", shape=[-1, 4])],
    )
    version = upload(header, buffer.getvalue(), store, registry)
    loaded = load_model(version, store, torch.device("cpu"))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), conv(x))
