"""Validation and resolution of a CompressionSpec, shared by submission (so a
bad spec is refused with INVALID_ARGUMENT before it is queued) and the worker
(which re-resolves what it will actually run).

Messages name the field as ``steps[i].<step>.<field>``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.compression.v1 import compression_spec_pb2 as spec_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.datasets import DatasetCatalog, DatasetRecord
from common.errors import InvalidArgument
from common.models.families import FAMILIES, family_of
from common.names import validate_name
from common.registry import ModelRegistry

TRAINING_STEPS = ("l1_constrained_finetune", "finetune")
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class ResolvedSpec:
    """The spec with its source version and dataset pinned to numbers."""

    spec: spec_pb2.CompressionSpec
    source: registry_pb2.ModelVersion
    dataset: DatasetRecord | None


def _unit_interval(value: float, where: str) -> None:
    if not 0.0 <= value < 1.0:
        raise InvalidArgument(f"{where} must be in [0, 1), got {value:g}")


def _training(epochs: int, learning_rate: float, batch_size: int, where: str) -> None:
    if epochs < 1:
        raise InvalidArgument(f"{where}.epochs must be >= 1, got {epochs}")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise InvalidArgument(f"{where}.learning_rate must be finite and > 0, got {learning_rate:g}")
    if batch_size < 1:
        raise InvalidArgument(f"{where}.batch_size must be >= 1, got {batch_size}")


def validate_step(step: spec_pb2.CompressionStep, index: int, last: bool) -> None:
    """Field checks of one step that need nothing but the step itself."""
    kind = step.WhichOneof("step")
    where = f"steps[{index}].{kind}"
    if kind is None:
        raise InvalidArgument(f"steps[{index}] sets no step")
    if kind == "magnitude_pruning":
        _unit_interval(step.magnitude_pruning.sparsity, f"{where}.sparsity")
        if step.magnitude_pruning.scope not in spec_pb2.PruningScope.values():
            raise InvalidArgument(f"{where}.scope {step.magnitude_pruning.scope} is unknown")
    elif kind == "structured_pruning":
        _unit_interval(step.structured_pruning.sparsity, f"{where}.sparsity")
        if step.structured_pruning.norm not in (0, 1, 2):
            raise InvalidArgument(f"{where}.norm must be 1 or 2, got {step.structured_pruning.norm}")
    elif kind == "l1_constrained_finetune":
        c = step.l1_constrained_finetune
        if not (c.radius > 0 and math.isfinite(c.radius)):
            raise InvalidArgument(f"{where}.radius must be finite and > 0, got {c.radius:g}")
        _training(c.epochs, c.learning_rate, c.batch_size, where)
    elif kind == "finetune":
        f = step.finetune
        _training(f.epochs, f.learning_rate, f.batch_size, where)
        if not 0.0 <= f.distillation_weight <= 1.0:
            raise InvalidArgument(
                f"{where}.distillation_weight must be in [0, 1], got {f.distillation_weight:g}"
            )
        if not (f.temperature >= 0 and math.isfinite(f.temperature)):
            raise InvalidArgument(f"{where}.temperature must be > 0 (0 means 2), got {f.temperature:g}")
    else:
        q = step.quantization
        if (
            q.method == spec_pb2.QUANTIZATION_METHOD_UNSPECIFIED
            or q.method not in spec_pb2.QuantizationMethod.values()
        ):
            raise InvalidArgument(f"{where}.method must be set to a known quantization method")
        kbit = q.method == spec_pb2.QUANTIZATION_METHOD_KBIT_WEIGHT_ONLY
        if (kbit or q.bits != 0) and not MIN_BITS <= q.bits <= MAX_BITS:
            raise InvalidArgument(f"{where}.bits must be in {MIN_BITS}..{MAX_BITS}, got {q.bits}")
        if not kbit and q.bits not in (0, 8):
            raise InvalidArgument(f"{where}.bits applies to KBIT_WEIGHT_ONLY only (got {q.bits})")
        if not last:
            raise InvalidArgument(f"{where} must be the last step (nothing can train quantized weights)")


def validate_fields(spec: spec_pb2.CompressionSpec) -> None:
    """Everything checkable without Redis."""
    if not spec.source_model:
        raise InvalidArgument("source_model is required")
    validate_name(spec.source_model, "source_model")
    if spec.target_model:
        validate_name(spec.target_model, "target_model")
    if spec.dataset_name:
        validate_name(spec.dataset_name, "dataset_name")
    if spec.device not in model_pb2.Device.values():
        raise InvalidArgument(f"device {spec.device} is unknown")
    if not spec.steps:
        raise InvalidArgument("steps must list at least one step")
    for index, step in enumerate(spec.steps):
        validate_step(step, index, index == len(spec.steps) - 1)
    # "not >= 0" also catches NaN.
    if spec.HasField("max_metric_drop") and not (
        spec.max_metric_drop >= 0 and math.isfinite(spec.max_metric_drop)
    ):
        raise InvalidArgument(f"max_metric_drop must be >= 0, got {spec.max_metric_drop:g}")


def validate_applies(spec: spec_pb2.CompressionSpec, source: registry_pb2.ModelVersion) -> None:
    """Every step must apply to the source model's layers."""
    built_in = source.architecture.WhichOneof("family") in FAMILIES
    for index, step in enumerate(spec.steps):
        where = f"steps[{index}].{step.WhichOneof('step')}"
        if source.format != registry_pb2.MODEL_FORMAT_SAFETENSORS or not built_in:
            fmt = registry_pb2.ModelFormat.Name(source.format).removeprefix("MODEL_FORMAT_")
            raise InvalidArgument(
                f"{where} does not apply to {source.model_name} version {source.version}: a {fmt} model "
                f"(models of a built-in family ({', '.join(sorted(FAMILIES))}) stored as SAFETENSORS "
                "can be compressed)"
            )
        family, member = family_of(source.architecture)
        if step.HasField("structured_pruning") and family.hidden_units(member) == 0:
            raise InvalidArgument(f"{where} does not apply: the model has no hidden units to remove")


def resolve(spec: spec_pb2.CompressionSpec, registry: ModelRegistry, catalog: DatasetCatalog) -> ResolvedSpec:
    """Validate ``spec`` and pin its source version and dataset.

    NotFound for an unknown model, version or dataset; InvalidArgument (naming
    the step and field) for everything else."""
    validate_fields(spec)
    source = registry.get_version(spec.source_model, spec.source_version)
    validate_applies(spec, source)
    pinned = spec_pb2.CompressionSpec()
    pinned.CopyFrom(spec)
    pinned.source_version = source.version
    dataset_name = spec.dataset_name or source.lineage.dataset_name
    dataset_version = spec.dataset_version if spec.dataset_name else source.lineage.dataset_version
    dataset: DatasetRecord | None = None
    if dataset_name:
        dataset = catalog.get(dataset_name, dataset_version)
        pinned.dataset_name, pinned.dataset_version = dataset.meta.name, dataset.meta.version
        family, member = family_of(source.architecture)
        expected = family.input_width(member)
        if dataset.meta.num_features and dataset.meta.num_features != expected:
            raise InvalidArgument(
                f"dataset_name: {dataset_name} version {dataset.meta.version} has "
                f"{dataset.meta.num_features} features, the model takes {expected}"
            )
    for index, step in enumerate(spec.steps):
        kind = step.WhichOneof("step")
        if kind in TRAINING_STEPS and dataset is None:
            raise InvalidArgument(
                f"steps[{index}].{kind} needs a dataset: set dataset_name "
                "(the source version names none in its lineage)"
            )
    return ResolvedSpec(pinned, source, dataset)
