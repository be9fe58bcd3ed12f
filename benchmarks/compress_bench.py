"""Compression benchmark: size on disk, batch-1/batch-32 latency and test
accuracy of compressed variants of an MLP trained on digits (in-process), and
size/latency of the same variants of an untrained 1024-4096-4096-10 MLP.

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
from common.models.mlp import MLP, build_model
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


def fp32_row(model: MLP, name: str, folder: Path, test: TrainData | None, input_size: int) -> Row:
    path = folder / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    cpu = torch.device("cpu")
    accuracy = task_metric(model.layers, test)[1] if test is not None else None
    return Row(
        name,
        path.stat().st_size,
        latency_ms(model, input_size, 1, cpu, 200),
        latency_ms(model, input_size, 32, cpu, 100),
        accuracy,
    )


def variant_row(
    source: MLP,
    norm: model_pb2.Normalization,
    name: str,
    train: TrainData | None,
    test: TrainData | None,
    folder: Path,
) -> Row:
    steps = VARIANTS[name]
    result = run_pipeline(source, norm, steps, lambda: train)  # type: ignore[arg-type,return-value]
    path = folder / "variant.safetensors"
    save_compressed(result.bundle, path)
    version = registry_pb2.ModelVersion(format=registry_pb2.MODEL_FORMAT_COMPRESSED, normalization=norm)
    version.architecture.mlp.CopyFrom(result.bundle.arch)
    cpu = torch.device("cpu")
    module = load_compressed(version, path, cpu)
    input_size = result.bundle.arch.input_size
    accuracy = task_metric(module.layers, test)[1] if test is not None else None
    return Row(
        name,
        path.stat().st_size,
        latency_ms(module, input_size, 1, cpu, 200),
        latency_ms(module, input_size, 32, cpu, 100),
        accuracy,
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
    model = build_model(arch, norm)
    finetune(model.layers, train, FinetuneConfig(epochs=30, learning_rate=1e-3, batch_size=64))
    model.eval()
    checks: list[tuple[str, bool, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = [fp32_row(model, "fp32", folder, test, 64)]
        rows += [variant_row(model, norm, name, train, test, folder) for name in VARIANTS]
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
        if not args.skip_big:
            big_arch = model_pb2.Architecture(
                mlp=model_pb2.MlpArchitecture(input_size=1024, hidden_sizes=[4096, 4096], output_size=10)
            )
            big = build_model(big_arch).eval()
            big_rows = [fp32_row(big, "fp32", folder, None, 1024)]
            for name in ("90% unstructured", "50% structured", "int8 dynamic", "int4 weight-only"):
                big_rows.append(variant_row(big, model_pb2.Normalization(), name, None, None, folder))
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
    print("\n## Targets\n")
    for what, ok, detail in checks:
        print(f"- [{'x' if ok else ' '}] {what}" + (f" ({detail})" if detail else ""))
    print(
        f"\n{args.threads} torch thread(s); machine shared with other workloads; "
        f"{time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
