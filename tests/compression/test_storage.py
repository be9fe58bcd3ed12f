"""Every compressed format, for every built-in family, round-trips through
save_compressed/load_compressed with identical outputs, shrinks on disk as
promised, and serves what was stored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.compression.v1 import compression_spec_pb2 as spec_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.models.compressed import build_runtime_module, load_compressed, save_compressed
from common.models.families import FAMILIES, family_of
from common.models.pruning import weight_layers
from services.compression.ops.finetune import TrainData
from services.compression.pipeline import PipelineResult, run_pipeline

torch.set_num_threads(1)

Q = spec_pb2.QuantizationMethod
# One small source per family; each takes 16 raw features (the CNN as 1x4x4 images).
ARCHS = {
    "mlp": model_pb2.Architecture(
        mlp=model_pb2.MlpArchitecture(input_size=16, hidden_sizes=[64, 32], output_size=4)
    ),
    "cnn": model_pb2.Architecture(
        cnn=model_pb2.CnnArchitecture(
            input_shape=[1, 4, 4],
            blocks=[
                model_pb2.ConvBlock(out_channels=16, batch_norm=True, pooling=model_pb2.POOLING_MAX),
                model_pb2.ConvBlock(out_channels=8),
            ],
            output_size=4,
        )
    ),
}
NORM = model_pb2.Normalization(kind=model_pb2.NORMALIZATION_KIND_ZSCORE, shift=[0.5] * 16, scale=[2.0] * 16)


def _source(family: str = "mlp") -> torch.nn.Module:
    torch.manual_seed(0)
    kind, member = family_of(ARCHS[family])
    model = kind.build(member, NORM)
    # Fresh BatchNorm statistics are 0/1: give them values, so pruning must carry them.
    for name, buffer in model.named_buffers():
        if "running" in name:
            buffer.copy_(torch.rand(buffer.shape) + 0.5)
    return model.eval()


def _inputs(family: str, rows: int) -> torch.Tensor:
    (spec, *_), _ = FAMILIES[family].tensor_specs(getattr(ARCHS[family], family))
    return torch.randn(rows, *spec.shape[1:]) * 3 + 1


def _data() -> TrainData:
    g = torch.Generator().manual_seed(0)
    return TrainData(torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g), True)


def _step(**kwargs: object) -> spec_pb2.CompressionStep:
    return spec_pb2.CompressionStep(**kwargs)  # type: ignore[arg-type]


def _quant(method: spec_pb2.QuantizationMethod.ValueType, bits: int = 0) -> spec_pb2.CompressionStep:
    return _step(quantization=spec_pb2.Quantization(method=method, bits=bits))


def _prune(sparsity: float) -> spec_pb2.CompressionStep:
    return _step(magnitude_pruning=spec_pb2.MagnitudePruning(sparsity=sparsity))


def _structured(sparsity: float) -> spec_pb2.CompressionStep:
    return _step(structured_pruning=spec_pb2.StructuredPruning(sparsity=sparsity))


def _finetune() -> spec_pb2.CompressionStep:
    return _step(
        finetune=spec_pb2.Finetune(epochs=1, learning_rate=1e-3, batch_size=16, distillation_weight=0.5)
    )


def _l1() -> spec_pb2.CompressionStep:
    return _step(
        l1_constrained_finetune=spec_pb2.L1ConstrainedFinetune(
            radius=20, epochs=1, learning_rate=0.01, batch_size=16
        )
    )


FORMATS = {
    "fp32-sparse": [_prune(0.9)],
    "structured-finetune": [_structured(0.5), _finetune()],
    "l1": [_l1()],
    "int8-dynamic": [_quant(Q.QUANTIZATION_METHOD_INT8_DYNAMIC)],
    "int8-weight-only": [_quant(Q.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY)],
    "fp16": [_quant(Q.QUANTIZATION_METHOD_FP16)],
    "bf16": [_quant(Q.QUANTIZATION_METHOD_BF16)],
    **{f"kbit-{b}": [_quant(Q.QUANTIZATION_METHOD_KBIT_WEIGHT_ONLY, b)] for b in (2, 3, 4, 8)},
    "sparse-int4": [_prune(0.8), _quant(Q.QUANTIZATION_METHOD_KBIT_WEIGHT_ONLY, 4)],
    "pipeline": [_structured(0.5), _finetune(), _quant(Q.QUANTIZATION_METHOD_INT8_DYNAMIC)],
}


def _save(result: PipelineResult, path: Path) -> registry_pb2.ModelVersion:
    save_compressed(result.bundle, path)
    version = registry_pb2.ModelVersion(
        model_name="m", version="1", format=registry_pb2.MODEL_FORMAT_COMPRESSED
    )
    version.architecture.CopyFrom(result.bundle.arch)
    version.normalization.CopyFrom(NORM)
    return version


@pytest.mark.parametrize("family", sorted(ARCHS))
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_round_trip_gives_identical_outputs(family: str, name: str, tmp_path: Path) -> None:
    result = run_pipeline(_source(family), ARCHS[family], NORM, FORMATS[name], _data)
    version = _save(result, tmp_path / "m.safetensors")
    loaded = load_compressed(version, tmp_path / "m.safetensors", torch.device("cpu"))
    in_memory = build_runtime_module(
        result.bundle.arch,
        NORM,
        result.bundle.tensors,
        result.bundle.quantized,
        result.bundle.runtime,
        torch.device("cpu"),
    )
    x = _inputs(family, 8)
    with torch.no_grad():
        out = loaded(x)
        assert out.dtype == torch.float32 and out.shape == (8, 4)
        assert torch.equal(out, in_memory(x))
        # The stored model computes (up to activation rounding) what the pipeline's float model does.
        tolerance = {"fp16": 2e-2, "bf16": 1e-1, "int8-dynamic": 5e-2, "pipeline": 5e-2}.get(name, 1e-5)
        torch.testing.assert_close(out, result.model(x), atol=tolerance, rtol=0)


def test_sparse_storage_shrinks_with_sparsity(tmp_path: Path) -> None:
    sizes = {}
    for sparsity in (0.0, 0.5, 0.9):
        result = run_pipeline(_source(), ARCHS["mlp"], NORM, [_prune(sparsity)], _data)
        save_compressed(result.bundle, tmp_path / f"{sparsity}.st")
        sizes[sparsity] = (tmp_path / f"{sparsity}.st").stat().st_size
    assert sizes[0.9] < sizes[0.5] < sizes[0.0]
    assert sizes[0.0] / sizes[0.9] > 3


@pytest.mark.parametrize(("family", "linears"), [("mlp", 3), ("cnn", 1)])
def test_int8_dynamic_serves_the_stored_int8_weights(family: str, linears: int, tmp_path: Path) -> None:
    source = _source(family)
    result = run_pipeline(source, ARCHS[family], NORM, FORMATS["int8-dynamic"], _data)
    module = load_compressed(_save(result, tmp_path / "q.st"), tmp_path / "q.st", torch.device("cpu"))
    dynamic = {n: m for n, m in module.named_modules() if isinstance(m, DynamicLinear)}
    assert len(dynamic) == linears
    for name, layer in dynamic.items():
        stored = result.bundle.quantized[f"{name}.weight"]
        assert torch.equal(layer.weight().int_repr(), stored.codes)
    # Convolutions keep their int8 codes on disk and compute with them dequantized.
    for name, conv in weight_layers(module).items():
        torch.testing.assert_close(conv.weight, result.bundle.quantized[f"{name}.weight"].dequantize())
    x = _inputs(family, 4)
    with torch.no_grad():
        assert not torch.equal(module(x), source(x))


def test_cuda_request_falls_back_to_float_weights_off_cpu(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    result = run_pipeline(_source(), ARCHS["mlp"], NORM, FORMATS["int8-dynamic"], _data)
    module = load_compressed(_save(result, tmp_path / "q.st"), tmp_path / "q.st", torch.device("cuda"))
    assert not any(isinstance(m, DynamicLinear) for m in module.modules())
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(module(x.cuda()).cpu(), result.model(x), atol=1e-4, rtol=0)
