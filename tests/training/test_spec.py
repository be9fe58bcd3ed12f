"""TrainingSpec validation and defaults (plain Python, no gRPC)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.data.v1 import data_pb2
from common.api.modelfleet.training.v1 import training_spec_pb2 as ts
from common.errors import InvalidArgument
from services.training.spec import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LEARNING_RATE,
    bind_to_dataset,
    normalize_spec,
)


def good() -> ts.TrainingSpec:
    return ts.TrainingSpec(dataset_name="digits", model_name="digits-mlp")


def meta(
    task: data_pb2.DatasetTask.ValueType = data_pb2.DATASET_TASK_CLASSIFICATION, classes: int = 10
) -> data_pb2.DatasetVersion:
    return data_pb2.DatasetVersion(
        name="digits", version="3", num_features=64, task=task, num_classes=classes
    )


def test_defaults_are_filled() -> None:
    spec = normalize_spec(good())
    assert spec.optimizer == ts.OPTIMIZER_ADAM
    assert spec.epochs == DEFAULT_EPOCHS
    assert spec.batch_size == DEFAULT_BATCH_SIZE
    assert spec.learning_rate == DEFAULT_LEARNING_RATE
    assert spec.world_size == 1
    assert spec.checkpoint_interval_epochs == 1
    assert spec.nodes == 1
    assert list(spec.architecture.mlp.hidden_sizes) == [64]


def test_bind_fills_task_loss_sizes_and_pins_version() -> None:
    spec = bind_to_dataset(normalize_spec(good()), meta(), {"train", "val"})
    assert spec.dataset_version == "3"
    assert spec.task == ts.TASK_CLASSIFICATION
    assert spec.loss == ts.LOSS_CROSS_ENTROPY
    assert (spec.architecture.mlp.input_size, spec.architecture.mlp.output_size) == (64, 10)
    regression = bind_to_dataset(normalize_spec(good()), meta(data_pb2.DATASET_TASK_REGRESSION, 0), {"train"})
    assert regression.loss == ts.LOSS_MSE
    assert regression.architecture.mlp.output_size == 1


Mutation = Callable[[ts.TrainingSpec], None]


def _set(field: str, value: object) -> Mutation:
    def apply(spec: ts.TrainingSpec) -> None:
        setattr(spec, field, value)

    return apply


def _both(first: Mutation, second: Mutation) -> Mutation:
    def apply(spec: ts.TrainingSpec) -> None:
        first(spec)
        second(spec)

    return apply


BAD_SPECS: list[tuple[str, Mutation, str]] = [
    ("no dataset", _set("dataset_name", ""), "spec.dataset_name"),
    ("bad dataset name", _set("dataset_name", "../etc"), "spec.dataset_name"),
    ("bad dataset version", _set("dataset_version", "latest"), "spec.dataset_version"),
    ("no model name", _set("model_name", ""), "spec.model_name"),
    ("bad model name", _set("model_name", "a/b"), "spec.model_name"),
    ("negative lr", _set("learning_rate", -0.1), "spec.learning_rate must be > 0"),
    ("nan lr", _set("learning_rate", math.nan), "spec.learning_rate"),
    (
        "momentum 1",
        _both(_set("optimizer", ts.OPTIMIZER_SGD), _set("momentum", 1.0)),
        "spec.momentum",
    ),
    ("momentum with adam", _set("momentum", 0.9), "spec.momentum"),
    ("negative epochs", _set("epochs", -1), "spec.epochs"),
    ("huge epochs", _set("epochs", 10**9), "spec.epochs"),
    ("negative batch", _set("batch_size", -5), "spec.batch_size"),
    ("batch below world", _both(_set("world_size", 4), _set("batch_size", 2)), "spec.batch_size"),
    ("negative world", _set("world_size", -1), "spec.world_size"),
    ("huge world", _set("world_size", 1000), "spec.world_size"),
    ("negative decay", _set("weight_decay", -1e-4), "spec.weight_decay"),
    ("inf decay", _set("weight_decay", math.inf), "spec.weight_decay"),
    ("negative l1", _set("l1_penalty", -1.0), "spec.l1_penalty"),
    ("negative interval", _set("checkpoint_interval_epochs", -2), "spec.checkpoint_interval_epochs"),
    ("multi node", _set("nodes", 2), "spec.nodes"),
    ("unknown task", _set("task", 9), "spec.task"),
    ("unknown loss", _set("loss", 9), "spec.loss"),
    ("unknown optimizer", _set("optimizer", 9), "spec.optimizer"),
    ("unknown device", _set("device", 9), "spec.device"),
    (
        "loss for wrong task",
        _both(_set("task", ts.TASK_CLASSIFICATION), _set("loss", ts.LOSS_MSE)),
        "spec.loss",
    ),
    (
        "negative patience",
        lambda s: setattr(s.early_stopping, "patience", -1),
        "spec.early_stopping.patience",
    ),
    (
        "negative min_delta",
        lambda s: setattr(s.early_stopping, "min_delta", -0.5),
        "spec.early_stopping.min_delta",
    ),
    ("zero width", lambda s: s.architecture.mlp.hidden_sizes.extend([8, 0]), "hidden_sizes[1]"),
    ("dropout 1", lambda s: setattr(s.architecture.mlp, "dropout", 1.0), "spec.architecture.mlp.dropout"),
    (
        "bad activation",
        lambda s: setattr(s.architecture.mlp, "activation", 42),
        "spec.architecture.mlp.activation",
    ),
    (
        "negative input",
        lambda s: setattr(s.architecture.mlp, "input_size", -3),
        "spec.architecture.mlp.input_size",
    ),
]


@pytest.mark.parametrize(("case", "mutate", "named"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_field_is_rejected_by_name(case: str, mutate: Mutation, named: str) -> None:
    spec = good()
    mutate(spec)
    with pytest.raises(InvalidArgument, match=named.replace("[", r"\[").replace("]", r"\]")):
        normalize_spec(spec)


BAD_BINDINGS: list[tuple[str, Mutation, data_pb2.DatasetVersion, set[str], str]] = [
    ("no train split", lambda s: None, meta(), {"all"}, "no train split"),
    (
        "early stop without val",
        lambda s: setattr(s.early_stopping, "patience", 2),
        meta(),
        {"train"},
        "val split",
    ),
    ("task mismatch", _set("task", ts.TASK_REGRESSION), meta(), {"train"}, "spec.task"),
    (
        "input mismatch",
        lambda s: setattr(s.architecture.mlp, "input_size", 5),
        meta(),
        {"train"},
        "input_size",
    ),
    (
        "output mismatch",
        lambda s: setattr(s.architecture.mlp, "output_size", 3),
        meta(),
        {"train"},
        "output_size",
    ),
    ("one class", lambda s: None, meta(classes=1), {"train"}, "classes"),
    ("unlabelled", lambda s: None, meta(task=data_pb2.DATASET_TASK_UNSPECIFIED), {"train"}, "no labels"),
]


@pytest.mark.parametrize(
    ("case", "mutate", "dataset", "splits", "named"), BAD_BINDINGS, ids=[c[0] for c in BAD_BINDINGS]
)
def test_spec_not_fitting_dataset_is_rejected(
    case: str, mutate: Mutation, dataset: data_pb2.DatasetVersion, splits: set[str], named: str
) -> None:
    spec = good()
    mutate(spec)
    with pytest.raises(InvalidArgument, match=named):
        bind_to_dataset(normalize_spec(spec), dataset, splits)


def test_normalize_does_not_touch_the_callers_spec() -> None:
    spec = good()
    normalize_spec(spec)
    assert spec.epochs == 0
    assert spec.architecture.WhichOneof("family") is None
    assert model_pb2.Architecture().WhichOneof("family") is None
