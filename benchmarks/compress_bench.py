"""Compression benchmark: size on disk, batch-1/batch-32 latency and test
accuracy of compressed variants of an MLP and a CNN trained on digits
(in-process), and size/latency of variants of an untrained 1024-4096-4096-10 MLP
and an untrained 64-128-256-channel CNN on 3x32x32 images.

Every variant goes through the production path: the step pipeline, the
COMPRESSED file on disk, and the module load_compressed rebuilds from it.

    python benchmarks/compress_bench.py [--threads 1] [--skip-big]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

# Run as a script from anywhere: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.compression.v1 import compression_spec_pb2 as S
from common.api.modelfleet.registry.v1 import registry_pb2
from common.models.compressed import load_compressed, save_compressed
from common.models.families import family_of, tensor_specs
from services.compression.ops.finetune import FinetuneConfig, TrainData, finetune
from services.compression.pipeline import run_pipeline
from services.compression.report import latency_ms, task_metric

Q = S.QuantizationMethod


def _quant(method: S.QuantizationMethod.ValueType, bits: int = 0) -> S.CompressionStep:
    return S.CompressionStep(quantization=S.Quantization(method=method, bits=bits))


STRUCTURED = S.CompressionStep(structured_pruning=S.StructuredPruning(sparsity=0.5, norm=2))
FINETUNE = S.CompressionStep(
    finetune=S.Finetune(
        epochs=15, learning_rate=1e-3, batch_size=64, distillation_weight=0.5, temperature=2.0
    )
)
VARIANTS: dict[str, list[S.CompressionStep]] = {
    "90% unstructured": [
        S.CompressionStep(magnitude_pruning=S.MagnitudePruning(sparsity=0.9, scope=S.PRUNING_SCOPE_GLOBAL))
    ],
    "90% unstr. + finetune": [
        S.CompressionStep(magnitude_pruning=S.MagnitudePruning(sparsity=0.9, scope=S.PRUNING_SCOPE_GLOBAL)),
        FINETUNE,
    ],
    "50% structured": [STRUCTURED],
    "50% structured + finetune": [STRUCTURED, FINETUNE],
    "int8 dynamic": [_quant(Q.QUANTIZATION_METHOD_INT8_DYNAMIC)],
    "int4 weight-only": [_quant(Q.QUANTIZATION_METHOD_KBIT_WEIGHT_ONLY, 4)],
    "pipeline struct->ft->int8": [STRUCTURED, FINETUNE, _quant(Q.QUANTIZATION_METHOD_INT8_DYNAMIC)],
    "int8 weight-only": [_quant(Q.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY)],
}
# Convolutions recover from pruning with a stronger fine-tune than the MLP needs.
FINETUNE_CNN = S.CompressionStep(
    finetune=S.Finetune(
        epochs=15, learning_rate=3e-3, batch_size=64, distillation_weight=0.5, temperature=2.0
    )
)
CNN_VARIANTS: dict[str, list[S.CompressionStep]] = {
    "90% unstr. + finetune": [VARIANTS["90% unstructured"][0], FINETUNE_CNN],
    "50% structured": [STRUCTURED],
    "50% structured + finetune": [STRUCTURED, FINETUNE_CNN],
    "int8 weight-only": VARIANTS["int8 weight-only"],
    "pipeline struct->ft->int8": [STRUCTURED, FINETUNE_CNN, _quant(Q.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY)],
}


@dataclass
class Row:
    name: str
    size: int
    lat1: float
    lat32: float
    accuracy: float | None


def digits() -> tuple[TrainData, TrainData, model_pb2.Normalization]:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y, test_size=0.25, random_state=0, stratify=y
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0
    norm = model_pb2.Normalization(
        kind=model_pb2.NORMALIZATION_KIND_ZSCORE, shift=mean.tolist(), scale=std.tolist()
    )

    def split(features: np.ndarray, labels: np.ndarray) -> TrainData:
        normalized = ((features - mean) / std).astype(np.float32)
        return TrainData(torch.from_numpy(normalized), torch.from_numpy(labels.astype(np.int64)), True)

    return split(x_train, y_train), split(x_test, y_test), norm


def build(arch: model_pb2.Architecture, norm: model_pb2.Normalization | None = None) -> torch.nn.Module:
    family, member = family_of(arch)
    return family.build(member, norm)


def _row(
    name: str, module: torch.nn.Module, arch: model_pb2.Architecture, path: Path, test: TrainData | None
) -> Row:
    family, _ = family_of(arch)
    inputs, _ = tensor_specs(arch)
    shape = list(inputs[0].shape[1:])
    cpu = torch.device("cpu")
    accuracy = task_metric(family.trainable(module), test)[1] if test is not None else None
    return Row(
        name,
        path.stat().st_size,
        latency_ms(module, shape, 1, cpu, 200),
        latency_ms(module, shape, 32, cpu, 100),
        accuracy,
    )


def fp32_row(
    model: torch.nn.Module, arch: model_pb2.Architecture, folder: Path, test: TrainData | None
) -> Row:
    path = folder / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return _row("fp32", model, arch, path, test)


def variant_row(
    source: torch.nn.Module,
    arch: model_pb2.Architecture,
    norm: model_pb2.Normalization,
    name: str,
    train: TrainData | None,
    test: TrainData | None,
    folder: Path,
    variants: dict[str, list[S.CompressionStep]] = VARIANTS,
) -> Row:
    steps = variants[name]
    result = run_pipeline(source, arch, norm, steps, lambda: train)  # type: ignore[arg-type,return-value]
    path = folder / "variant.safetensors"
    save_compressed(result.bundle, path)
    version = registry_pb2.ModelVersion(format=registry_pb2.MODEL_FORMAT_COMPRESSED, normalization=norm)
    version.architecture.CopyFrom(result.bundle.arch)
    module = load_compressed(version, path, torch.device("cpu"))
    return _row(name, module, result.bundle.arch, path, test)


def trained(
    arch: model_pb2.Architecture,
    norm: model_pb2.Normalization,
    train: TrainData,
    learning_rate: float,
    batch_size: int,
) -> torch.nn.Module:
    model = build(arch, norm)
    family, _ = family_of(arch)
    config = FinetuneConfig(epochs=30, learning_rate=learning_rate, batch_size=batch_size)
    finetune(family.trainable(model), train, config)
    return model.eval()


DIGITS_CNN = model_pb2.Architecture(
    cnn=model_pb2.CnnArchitecture(
        input_shape=[1, 8, 8],
        blocks=[
            model_pb2.ConvBlock(out_channels=32, batch_norm=True),
            model_pb2.ConvBlock(out_channels=64, batch_norm=True, pooling=model_pb2.POOLING_MAX),
            model_pb2.ConvBlock(out_channels=128, batch_norm=True),
        ],
        output_size=10,
        dropout=0.2,
    )
)
BIG_CNN = model_pb2.Architecture(
    cnn=model_pb2.CnnArchitecture(
        input_shape=[3, 32, 32],
        blocks=[
            model_pb2.ConvBlock(out_channels=64, batch_norm=True, pooling=model_pb2.POOLING_MAX),
            model_pb2.ConvBlock(out_channels=128, batch_norm=True, pooling=model_pb2.POOLING_MAX),
            model_pb2.ConvBlock(out_channels=256, batch_norm=True),
        ],
        output_size=10,
    )
)


def print_table(title: str, rows: list[Row]) -> dict[str, Row]:
    base = rows[0]
    print(f"\n## {title}\n")
    print(
        "| variant | size on disk | x smaller | batch-1 ms | x faster | batch-32 ms | x faster | test acc |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        acc = f"{100 * r.accuracy:.2f}%" if r.accuracy is not None else "-"
        print(
            f"| {r.name} | {r.size / 1024:,.1f} KiB | {base.size / r.size:.2f} | {r.lat1:.3f} | "
            f"{base.lat1 / r.lat1:.2f} | {r.lat32:.3f} | {base.lat32 / r.lat32:.2f} | {acc} |"
        )
    return {r.name: r for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-big", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    train, test, norm = digits()
    arch = model_pb2.Architecture(
        mlp=model_pb2.MlpArchitecture(input_size=64, hidden_sizes=[256, 256], output_size=10)
    )
    model = trained(arch, norm, train, 1e-3, 64)
    checks: list[tuple[str, bool, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = [fp32_row(model, arch, folder, test)]
        rows += [variant_row(model, arch, norm, name, train, test, folder) for name in VARIANTS]
        small = print_table("MLP 64-256-256-10 trained on digits", rows)
        fp32 = small["fp32"]
        drop = 100 * (fp32.accuracy or 0) - 100 * (small["pipeline struct->ft->int8"].accuracy or 0)
        checks += [
            ("digits: 90% sparse >= 6x smaller", fp32.size / small["90% unstructured"].size >= 6, ""),
            (
                "digits: pipeline >= 10x smaller",
                fp32.size / small["pipeline struct->ft->int8"].size >= 10,
                "",
            ),
            ("digits: pipeline accuracy drop <= 1 point", drop <= 1.0, f"{drop:.2f} points"),
        ]
        cnn = trained(DIGITS_CNN, norm, train, 2e-3, 32)
        cnn_rows = [fp32_row(cnn, DIGITS_CNN, folder, test)]
        cnn_rows += [variant_row(cnn, DIGITS_CNN, norm, name, train, test, folder) for name in CNN_VARIANTS]
        digits_cnn = print_table("CNN 1x8x8 -> 32 -> 64 -> 128 channels, trained on digits", cnn_rows)
        cnn_drop = 100 * (digits_cnn["fp32"].accuracy or 0) - 100 * (
            digits_cnn["pipeline struct->ft->int8"].accuracy or 0
        )
        checks += [
            ("digits CNN: fp32 test accuracy >= 97%", (digits_cnn["fp32"].accuracy or 0) >= 0.97, ""),
            ("digits CNN: pipeline accuracy drop <= 1 point", cnn_drop <= 1.0, f"{cnn_drop:.2f} points"),
        ]
        if not args.skip_big:
            big_arch = model_pb2.Architecture(
                mlp=model_pb2.MlpArchitecture(input_size=1024, hidden_sizes=[4096, 4096], output_size=10)
            )
            big = build(big_arch).eval()
            big_rows = [fp32_row(big, big_arch, folder, None)]
            for name in ("90% unstructured", "50% structured", "int8 dynamic", "int4 weight-only"):
                big_rows.append(
                    variant_row(big, big_arch, model_pb2.Normalization(), name, None, None, folder)
                )
            large = print_table("MLP 1024-4096-4096-10 (untrained; size and latency only)", big_rows)
            base = large["fp32"]
            q = large["int8 dynamic"]
            checks += [
                (
                    "big: int8 dynamic >= 3.9x smaller",
                    base.size / q.size >= 3.9,
                    f"{base.size / q.size:.2f}x",
                ),
                (
                    "big: int8 dynamic >= 3x faster at batch 1",
                    base.lat1 / q.lat1 >= 3,
                    f"{base.lat1 / q.lat1:.2f}x",
                ),
                ("big: 90% sparse >= 6x smaller", base.size / large["90% unstructured"].size >= 6, ""),
                (
                    "big: 50% structured >= 2.5x faster (batch 1)",
                    base.lat1 / large["50% structured"].lat1 >= 2.5,
                    f"{base.lat1 / large['50% structured'].lat1:.2f}x",
                ),
            ]
            conv = build(BIG_CNN).eval()
            conv_rows = [fp32_row(conv, BIG_CNN, folder, None)]
            for name in ("50% structured", "int8 weight-only"):
                conv_rows.append(
                    variant_row(conv, BIG_CNN, model_pb2.Normalization(), name, None, None, folder)
                )
            convs = print_table("CNN 3x32x32 -> 64 -> 128 -> 256 channels (untrained)", conv_rows)
            speedup = convs["fp32"].lat32 / convs["50% structured"].lat32
            checks.append(("big CNN: 50% channels >= 2x faster at batch 32", speedup >= 2, f"{speedup:.2f}x"))
    print("\n## Targets\n")
    for what, ok, detail in checks:
        print(f"- [{'x' if ok else ' '}] {what}" + (f" ({detail})" if detail else ""))
    print(
        f"\n{args.threads} torch thread(s); machine shared with other workloads; "
        f"{time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
