"""Numbers that pass a naive range check but break the computation (negative
seeds, NaN and infinite floats, digit runs past int64, a table with no feature
column) are INVALID_ARGUMENT or NOT_FOUND naming the field, never an exception
from numpy or int() (which the servers answered INTERNAL)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import redis

from common.api.modelfleet.compression.v1 import compression_spec_pb2 as spec_pb2
from common.api.modelfleet.data.v1 import data_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.errors import InvalidArgument, NotFound
from common.registry import ModelRegistry
from common.settings import Settings
from services.compression.spec import validate_step
from services.data.preprocess import split_rows
from services.data.sources import synthetic_regression
from services.data.table import RawColumn, RawTable, build_table

BAD_FLOATS = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("noise", [*BAD_FLOATS, -1.0])
def test_synthetic_noise_must_be_finite(noise: float) -> None:
    with pytest.raises(InvalidArgument, match="noise"):
        synthetic_regression(data_pb2.SyntheticRegression(n_samples=10, noise=noise), 1 << 20)


def test_negative_seeds_name_their_field() -> None:
    with pytest.raises(InvalidArgument, match=r"synthetic\.seed must be >= 0"):
        synthetic_regression(data_pb2.SyntheticRegression(n_samples=10, seed=-1), 1 << 20)
    table = synthetic_regression(data_pb2.SyntheticRegression(n_samples=10, seed=1), 1 << 20)
    with pytest.raises(InvalidArgument, match=r"split\.seed must be >= 0"):
        split_rows(table, data_pb2.SplitSpec(val_fraction=0.2, seed=-5))


def test_a_table_with_only_a_label_is_refused() -> None:
    raw = RawTable(columns=[RawColumn("label", "int64")], data=np.array([[0.0], [1.0]]))
    with pytest.raises(InvalidArgument, match="no feature columns"):
        build_table(raw, "label", data_pb2.DATASET_TASK_CLASSIFICATION)


@pytest.mark.parametrize("value", BAD_FLOATS)
@pytest.mark.parametrize("field", ["learning_rate", "temperature", "distillation_weight", "radius"])
def test_compression_floats_must_be_finite(field: str, value: float) -> None:
    if field == "radius":
        step = spec_pb2.CompressionStep(
            l1_constrained_finetune=spec_pb2.L1ConstrainedFinetune(
                radius=value, epochs=1, learning_rate=0.1, batch_size=8
            )
        )
    else:
        finetune = spec_pb2.Finetune(epochs=1, learning_rate=0.1, batch_size=8)
        setattr(finetune, field, value)
        step = spec_pb2.CompressionStep(finetune=finetune)
    with pytest.raises(InvalidArgument, match=field):
        validate_step(step, 0, True)


def test_version_refs_past_int64_are_not_found(redis_client: redis.Redis, settings: Settings) -> None:
    registry = ModelRegistry(redis_client, settings.redis_prefix)
    registry.register(
        registry_pb2.ModelVersion(
            model_name="m", format=registry_pb2.MODEL_FORMAT_TORCHSCRIPT, artifact_digest="0" * 64
        )
    )
    assert registry.resolve("m", "1") == "1"
    for ref in ("9" * 19, "9" * 5000):
        with pytest.raises((NotFound, InvalidArgument)):
            registry.resolve("m", ref)
