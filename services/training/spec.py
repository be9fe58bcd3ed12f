"""TrainingSpec validation and defaults.

Two steps: :func:`normalize_spec` checks what can be checked without the
dataset and fills defaults (at submit); :func:`bind_to_dataset` checks the spec
against the dataset version and pins it (input/output sizes, task, version).
Both raise ``InvalidArgument`` naming the field, so the same code rejects a bad
spec at submit and (as a permanent job failure) at run time.
"""

from __future__ import annotations

import math

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.data.v1 import data_pb2
from common.api.modelfleet.training.v1 import training_spec_pb2 as ts
from common.datasets import DatasetCatalog, DatasetRecord
from common.errors import InvalidArgument
from common.models.families import default_architecture, family_of
from common.names import validate_name

DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 1e-3
# Bounds that catch typos (an extra zero) before they occupy a worker for days.
MAX_EPOCHS = 100_000
MAX_WORLD_SIZE = 64

_TASK_LOSSES = {
    ts.TASK_CLASSIFICATION: (ts.LOSS_CROSS_ENTROPY,),
    ts.TASK_REGRESSION: (ts.LOSS_MSE, ts.LOSS_MAE, ts.LOSS_HUBER),
}
_DEFAULT_LOSS = {ts.TASK_CLASSIFICATION: ts.LOSS_CROSS_ENTROPY, ts.TASK_REGRESSION: ts.LOSS_MSE}
_DATASET_TASK = {
    data_pb2.DATASET_TASK_CLASSIFICATION: ts.TASK_CLASSIFICATION,
    data_pb2.DATASET_TASK_REGRESSION: ts.TASK_REGRESSION,
}


def _finite_at_least_zero(value: float, field: str) -> None:
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"spec.{field} must be a finite number >= 0, got {value}")


def _non_negative_int(value: int, field: str, maximum: int | None = None) -> None:
    if value < 0:
        raise InvalidArgument(f"spec.{field} must be >= 1 (0 means the default), got {value}")
    if maximum is not None and value > maximum:
        raise InvalidArgument(f"spec.{field} must be <= {maximum}, got {value}")


def normalize_spec(spec: ts.TrainingSpec) -> ts.TrainingSpec:
    """A validated copy of ``spec`` with defaults filled in."""
    out = ts.TrainingSpec()
    out.CopyFrom(spec)
    if not out.dataset_name:
        raise InvalidArgument("spec.dataset_name is required")
    validate_name(out.dataset_name, "spec.dataset_name")
    if out.dataset_version and not (out.dataset_version.isascii() and out.dataset_version.isdigit()):
        raise InvalidArgument(f"spec.dataset_version must be a version number, got {out.dataset_version!r}")
    if not out.model_name:
        raise InvalidArgument("spec.model_name is required")
    validate_name(out.model_name, "spec.model_name")

    if out.architecture.WhichOneof("family") is None:
        out.architecture.CopyFrom(default_architecture())
    family, arch = family_of(out.architecture, "spec.architecture")
    # Sizes left at 0 come from the dataset later; everything else is checked now.
    family.validate(arch, "spec.architecture", sizes_from_dataset=True)

    if out.task not in (ts.TASK_UNSPECIFIED, *_TASK_LOSSES):
        raise InvalidArgument(f"spec.task {out.task} is unknown")
    if out.loss not in ts.Loss.values():
        raise InvalidArgument(f"spec.loss {out.loss} is unknown")
    if out.task != ts.TASK_UNSPECIFIED:
        _check_loss(out)
    if out.optimizer not in ts.Optimizer.values():
        raise InvalidArgument(f"spec.optimizer {out.optimizer} is unknown")
    if out.optimizer == ts.OPTIMIZER_UNSPECIFIED:
        out.optimizer = ts.OPTIMIZER_ADAM

    if not math.isfinite(out.learning_rate) or out.learning_rate < 0:
        raise InvalidArgument(f"spec.learning_rate must be > 0, got {out.learning_rate}")
    if out.learning_rate == 0:
        out.learning_rate = DEFAULT_LEARNING_RATE
    if not math.isfinite(out.momentum) or not 0 <= out.momentum < 1:
        raise InvalidArgument(f"spec.momentum must be in [0, 1), got {out.momentum}")
    if out.momentum and out.optimizer != ts.OPTIMIZER_SGD:
        raise InvalidArgument("spec.momentum applies only to optimizer SGD")
    _finite_at_least_zero(out.weight_decay, "weight_decay")
    _finite_at_least_zero(out.l1_penalty, "l1_penalty")

    _non_negative_int(out.epochs, "epochs", MAX_EPOCHS)
    out.epochs = out.epochs or DEFAULT_EPOCHS
    _non_negative_int(out.world_size, "world_size", MAX_WORLD_SIZE)
    out.world_size = out.world_size or 1
    _non_negative_int(out.batch_size, "batch_size")
    out.batch_size = out.batch_size or max(DEFAULT_BATCH_SIZE, out.world_size)
    if out.batch_size < out.world_size:
        raise InvalidArgument(
            f"spec.batch_size ({out.batch_size}) must be >= spec.world_size ({out.world_size}): "
            "it is the global batch, split across processes"
        )
    _non_negative_int(out.checkpoint_interval_epochs, "checkpoint_interval_epochs")
    out.checkpoint_interval_epochs = out.checkpoint_interval_epochs or 1
    if out.device not in model_pb2.Device.values():
        raise InvalidArgument(f"spec.device {out.device} is unknown")
    _non_negative_int(out.nodes, "nodes")
    if out.nodes > 1:
        raise InvalidArgument(
            "spec.nodes > 1 is not supported yet (multi-node is designed in docs/multinode.md)"
        )
    out.nodes = 1

    stop = out.early_stopping
    if stop.patience < 0:
        raise InvalidArgument(f"spec.early_stopping.patience must be >= 0, got {stop.patience}")
    if not math.isfinite(stop.min_delta) or stop.min_delta < 0:
        raise InvalidArgument(
            f"spec.early_stopping.min_delta must be a finite number >= 0, got {stop.min_delta}"
        )
    return out


def _check_loss(spec: ts.TrainingSpec) -> None:
    if spec.loss == ts.LOSS_UNSPECIFIED:
        spec.loss = _DEFAULT_LOSS[spec.task]
    elif spec.loss not in _TASK_LOSSES[spec.task]:
        task = ts.Task.Name(spec.task)
        raise InvalidArgument(f"spec.loss {ts.Loss.Name(spec.loss)} does not fit spec.task {task}")


def bind_to_dataset(
    spec: ts.TrainingSpec, meta: data_pb2.DatasetVersion, splits: set[str]
) -> ts.TrainingSpec:
    """``spec`` (already normalized) checked against a dataset version, with the
    version pinned and task and input/output sizes filled from it."""
    out = ts.TrainingSpec()
    out.CopyFrom(spec)
    dataset = f"dataset {meta.name} version {meta.version}"
    if "train" not in splits:
        raise InvalidArgument(f"spec.dataset_name: {dataset} has no train split (preprocess it with a split)")
    if out.early_stopping.patience and "val" not in splits:
        raise InvalidArgument(f"spec.early_stopping needs a val split, and {dataset} has none")
    out.dataset_version = meta.version

    data_task = _DATASET_TASK.get(meta.task)
    if data_task is None:
        raise InvalidArgument(f"spec.dataset_name: {dataset} has no labels (task unspecified)")
    if out.task == ts.TASK_UNSPECIFIED:
        out.task = data_task
    elif out.task != data_task:
        raise InvalidArgument(
            f"spec.task {ts.Task.Name(out.task)} does not match {dataset} "
            f"({data_pb2.DatasetTask.Name(meta.task)})"
        )
    _check_loss(out)

    outputs = meta.num_classes if out.task == ts.TASK_CLASSIFICATION else 1
    if out.task == ts.TASK_CLASSIFICATION and outputs < 2:
        raise InvalidArgument(
            f"spec.dataset_name: {dataset} has {outputs} classes; classification needs >= 2"
        )
    example_shape = list(meta.example_shape) or [meta.num_features]
    _check_augmentation(out.augmentation, example_shape, dataset)
    family, arch = family_of(out.architecture, "spec.architecture")
    family.fit_to_dataset(arch, example_shape, outputs, "spec.architecture", dataset)
    return out


def _check_augmentation(spec: ts.Augmentation, example_shape: list[int], dataset: str) -> None:
    padding = spec.random_crop_padding
    if padding < 0:
        raise InvalidArgument(f"spec.augmentation.random_crop_padding must be >= 0, got {padding}")
    if not (padding or spec.horizontal_flip):
        return
    if len(example_shape) != 3:
        raise InvalidArgument(
            "spec.augmentation applies to image datasets (example shape [C, H, W]); "
            f"{dataset} has {example_shape}"
        )
    limit = min(example_shape[1:])
    if padding > limit:
        raise InvalidArgument(f"spec.augmentation.random_crop_padding must be at most {limit} for {dataset}")


def resolve_spec(catalog: DatasetCatalog, spec: ts.TrainingSpec) -> tuple[ts.TrainingSpec, DatasetRecord]:
    """Normalize ``spec``, look its dataset up (NotFound if missing) and bind to it."""
    normalized = normalize_spec(spec)
    record = catalog.get(normalized.dataset_name, normalized.dataset_version)
    return bind_to_dataset(normalized, record.meta, set(record.shards)), record
