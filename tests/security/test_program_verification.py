"""Uploaded programs are verified before anything runs them.

Each hostile artifact below is live: run unguarded (in a child process) it writes
a file. Through the real UploadModel RPC it is refused with INVALID_ARGUMENT
naming what was refused, nothing is registered and the file never appears; an
artifact already in the store (stored before verification existed) is refused
by every load the same way. Every model family the product serves still loads,
and the op rule itself is tested over the whole class of effectful ATen ops.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from torch import nn

from common.api.modelfleet.registry.v1 import registry_pb2, registry_pb2_grpc
from common.artifacts import ArtifactStore
from common.errors import InvalidArgument
from common.models import verify
from common.models.loading import load_model
from tests.security.test_safe_loading import ADMIN, OUT, TENSOR, _messages, model_upload

pytestmark = pytest.mark.timeout(120)


class SetStateWrites(nn.Module):
    """Loading its archive runs the scripted ``__setstate__``: ``torch.from_file`` creates ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.weight: torch.Tensor = nn.Parameter(torch.zeros(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.path, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        written = torch.from_file(state[0], True, 4)
        self.path = state[0]
        self.weight = state[1] + written.sum() * 0
        self.training = state[2]


class ForwardWrites(nn.Module):
    """Every call creates ``path`` (the result is used, so the compiler keeps the op)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        written = torch.from_file(self.path, True, 4)
        return self.linear(x) + written.sum() * 0


class AddsZeros(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + torch.zeros(4).sum()


def ts_setstate(marker: Path, tmp: Path) -> bytes:
    path = tmp / "setstate.pt"
    torch.jit.save(torch.jit.script(SetStateWrites(str(marker))), str(path))
    return path.read_bytes()


def ts_forward(marker: Path, tmp: Path) -> bytes:
    path = tmp / "forward.pt"
    torch.jit.save(torch.jit.script(ForwardWrites(str(marker))), str(path))
    return path.read_bytes()


def export_forward(marker: Path, tmp: Path) -> bytes:
    """A valid exported program whose graph was edited to call ``aten::from_file``."""
    program = torch.export.export(AddsZeros(), (torch.zeros(2, 4),))
    for node in program.graph.nodes:
        if node.target is torch.ops.aten.zeros.default:
            node.target = torch.ops.aten.from_file.default
            node.args, node.kwargs = (str(marker), True, 4), {"dtype": torch.float32}
    program.graph_module.recompile()
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def ts_foreign_global(marker: Path, tmp: Path) -> bytes:
    """A scripted module whose data.pkl was swapped for one naming ``os.system``."""
    source = tmp / "plain.pt"
    torch.jit.save(torch.jit.script(nn.Linear(4, 3)), str(source))
    payload = pickle.dumps(_Touch(marker), protocol=2)
    return _rezip(source, lambda name, data: payload if name.endswith("/data.pkl") else data)


def ts_duplicate_entry(marker: Path, tmp: Path) -> bytes:
    """A scripted module with a second, different copy of its code: readers may disagree on which runs."""
    good = tmp / "good.pt"
    torch.jit.save(torch.jit.script(nn.Linear(4, 3)), str(good))
    ts_forward(marker, tmp)
    evil = tmp / "forward.pt"
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(good) as plain,
        zipfile.ZipFile(evil) as hostile,
        zipfile.ZipFile(buffer, "w") as out,
    ):
        prefix = plain.namelist()[0].split("/")[0]
        for item in plain.infolist():
            out.writestr(item, plain.read(item.filename))
        for item in hostile.infolist():
            if "/code/" in item.filename:
                rest = item.filename.split("/", 1)[1]
                out.writestr(f"{prefix}/{rest}", hostile.read(item.filename))
    return buffer.getvalue()


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _rezip(source: Path, change: Callable[[str, bytes], bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(buffer, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, change(item.filename, zin.read(item.filename)))
    return buffer.getvalue()


TS = registry_pb2.MODEL_FORMAT_TORCHSCRIPT
EXPORT = registry_pb2.MODEL_FORMAT_TORCH_EXPORT
# builder, format, what the refusal names, and how the payload is triggered unguarded
HOSTILE: dict[str, tuple[Callable[[Path, Path], bytes], int, str, str]] = {
    "torchscript __setstate__": (ts_setstate, TS, "__setstate__|__getstate__", "load"),
    "torchscript forward": (ts_forward, TS, "aten::from_file", "call"),
    "torch.export forward": (export_forward, EXPORT, "aten::from_file", "call"),
    "torchscript foreign pickle global": (ts_foreign_global, TS, "posix.system|not allowed", "none"),
    "torchscript duplicate entries": (ts_duplicate_entry, TS, "duplicate", "none"),
}

_UNGUARDED = """
import sys, torch
path, fmt, how = sys.argv[1:]
module = torch.jit.load(path) if fmt == "ts" else torch.export.load(path).module()
if how == "call":
    module(torch.zeros(2, 4))
"""


def _prove_live(artifact: Path, fmt: int, how: str, marker: Path) -> None:
    """The payload really runs when torch loads the artifact without our checks."""
    if how == "none":
        return
    kind = "ts" if fmt == TS else "export"
    subprocess.run(
        [sys.executable, "-c", _UNGUARDED, str(artifact), kind, how],
        capture_output=True,
        timeout=90,
        check=True,
    )
    assert marker.exists(), "the hostile artifact should write its file when loaded unguarded"
    marker.unlink()


@pytest.fixture
def marker(tmp_path: Path) -> Any:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "an uploaded program wrote a file"


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_programs_are_refused_at_upload(
    fleet: dict[str, str], marker: Path, tmp_path: Path, case: str
) -> None:
    build, fmt, names, how = HOSTILE[case]
    body = build(marker, tmp_path)
    artifact = tmp_path / "artifact"
    artifact.write_bytes(body)
    _prove_live(artifact, fmt, how, marker)

    header = registry_pb2.UploadModelHeader(name="evil", format=fmt, inputs=TENSOR, outputs=OUT)  # type: ignore[arg-type]
    async with grpc.aio.insecure_channel(fleet["modelfleet.registry.v1.ModelRegistryService"]) as channel:
        stub = registry_pb2_grpc.ModelRegistryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UploadModel(_messages(model_upload(header, body)), metadata=ADMIN, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details() or ""
        assert any(name in details for name in names.split("|")), details
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetModel(registry_pb2.GetModelRequest(name="evil"), metadata=ADMIN, timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_programs_already_stored_are_refused_by_every_load(
    store: ArtifactStore, marker: Path, tmp_path: Path, case: str
) -> None:
    build, fmt, _, _ = HOSTILE[case]
    artifact = tmp_path / "artifact"
    artifact.write_bytes(build(marker, tmp_path))
    version = _version(store, artifact, fmt)
    with pytest.raises(InvalidArgument, match="model 'm' version '1'"):
        load_model(version, store, torch.device("cpu"))


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.norm = nn.LayerNorm(8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embed(tokens))
        hidden, _ = self.gru(hidden)
        return torch.softmax(self.norm(hidden[:, -1]), -1)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def _families() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Dropout(0.1), nn.Linear(8, 3))
    return {
        "mlp": (mlp, torch.randn(2, 4)),
        "cnn": (cnn, torch.randn(2, 3, 16, 16)),
        "recurrent": (_Recurrent(), torch.randint(0, 10, (2, 5))),
        "transformer": (encoder, torch.randn(2, 5, 16)),
        "attention": (_Attention(), torch.randn(2, 5, 16)),
    }


@pytest.mark.parametrize("family", sorted(_families()))
@pytest.mark.parametrize("how", ["script", "trace", "export"])
def test_every_model_family_passes_verification(
    store: ArtifactStore, tmp_path: Path, family: str, how: str
) -> None:
    module, example = _families()[family]
    module.eval()
    path = tmp_path / "model"
    if how == "script":
        torch.jit.save(torch.jit.script(module), str(path))
    elif how == "trace":
        torch.jit.save(torch.jit.trace(module, (example,), check_trace=False), str(path))
    else:
        torch.export.save(torch.export.export(module, (example,)), str(path))
    loaded = load_model(_version(store, path, EXPORT if how == "export" else TS), store, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(example), module(example))


def test_int8_dynamic_quantized_torchscript_passes_verification(store: ArtifactStore, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    path = tmp_path / "q.pt"
    torch.jit.save(torch.jit.script(quantized), str(path))
    loaded = load_model(_version(store, path, TS), store, torch.device("cpu"))
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded.module(x), quantized(x))


def test_every_effectful_aten_op_is_refused() -> None:
    """The class, not one op: every schema taking a file name, storage, RPC
    reference, future or stream is refused, as are the listed state changers."""
    effectful = {
        schema.name
        for schema in torch._C._jit_get_all_schemas()
        if any(
            a.name == "filename" or any(t in str(a.type) for t in ("Storage", "RRef", "Future", "Stream"))
            for a in schema.arguments
        )
    }
    assert {"aten::from_file", "aten::save", "aten::set_", "aten::to_here", "aten::wait"} <= effectful
    for name in sorted(effectful | {"aten::manual_seed", "aten::seed", "aten::backward", "aten::_backward"}):
        assert verify.op_refusal(name) is not None, name
    for name in (
        "prim::Print",
        "profiler::_record_function_enter_new",
        "mylib::anything",
        "aten::no_such_op",
    ):
        assert verify.op_refusal(name) is not None, name
    for name in ("aten::linear", "aten::conv2d", "aten::triu", "aten::masked_fill_", "aten::len", "prim::If"):
        assert verify.op_refusal(name) is None, name


def _version(store: ArtifactStore, path: Path, fmt: int) -> registry_pb2.ModelVersion:
    ref = store.put_file(path)
    return registry_pb2.ModelVersion(
        model_name="m",
        version="1",
        format=fmt,  # type: ignore[arg-type]
        artifact_digest=ref.digest,
        inputs=TENSOR,
        outputs=OUT,
    )
