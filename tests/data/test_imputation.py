"""Imputation: fitted on the train split only, applied to every row, recorded in
raw units, and carried into models so a served model fills NaN inputs the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.data.v1 import data_pb2
from common.artifacts import ArtifactStore
from common.datasets import load_split
from common.errors import InvalidArgument
from common.models.mlp import build_model
from services.data.preprocess import impute
from services.data.service import DataService
from services.data.table import Table
from tests.data.test_preprocess import upload

NAN = np.nan
S = data_pb2.Imputation


def _table(features: list[list[float]]) -> Table:
    columns = [data_pb2.Column(name=f"c{i}", dtype="float32") for i in range(len(features[0]))]
    return Table(
        columns=columns,
        features=np.array(features, dtype=np.float32),
        label=None,
        labels=None,
        task=data_pb2.DATASET_TASK_UNSPECIFIED,
        class_names=[],
    )


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (data_pb2.IMPUTE_STRATEGY_MEAN, [2.0, 20.0]),
        (data_pb2.IMPUTE_STRATEGY_MEDIAN, [1.5, 20.0]),
        (data_pb2.IMPUTE_STRATEGY_MOST_FREQUENT, [1.0, 20.0]),
    ],
)
def test_fill_values_come_from_the_fit_rows_only(strategy: int, expected: list[float]) -> None:
    # Rows 0-3 are train; row 4 (val) holds 1000s that must not move the fill.
    table = _table([[1, 20], [1, NAN], [2, 20], [4, 20], [1000, 1000], [NAN, NAN]])
    operation = impute(table, S(strategy=strategy), np.arange(4))  # type: ignore[arg-type]
    assert table.fill is not None and np.allclose(table.fill, expected)
    assert np.allclose(table.features[5], expected) and table.features[1, 1] == expected[1]
    assert not np.isnan(table.features).any() and operation is not None and "filled=3" in operation


def test_constant_fill_and_raw_units_under_an_earlier_normalization() -> None:
    table = _table([[NAN, 1.0], [0.5, NAN]])
    table.shift, table.scale = np.array([10.0, 0.0]), np.array([2.0, 1.0])  # features hold (raw - 10) / 2
    impute(table, S(strategy=data_pb2.IMPUTE_STRATEGY_CONSTANT, constant=3.0), np.arange(2))
    assert table.features[0, 0] == 3.0 and table.fill is not None
    assert np.allclose(table.fill, [3.0 * 2 + 10, 3.0])  # what a raw input is replaced by
    with pytest.raises(InvalidArgument, match=r"imputation\.constant must be finite"):
        impute(
            _table([[NAN]]),
            S(strategy=data_pb2.IMPUTE_STRATEGY_CONSTANT, constant=float("inf")),
            np.arange(1),
        )
    with pytest.raises(InvalidArgument, match=r"imputation\.strategy 9 is unknown"):
        impute(_table([[NAN]]), S(strategy=9), np.arange(1))  # type: ignore[arg-type]


def test_preprocess_imputes_then_normalizes_and_the_model_fills_the_same_way(
    service: DataService, store: ArtifactStore, tmp_path: Path
) -> None:
    rows = "".join(f"{'NA' if i % 5 == 0 else i},{(i * 7) % 11},{i % 2}\n" for i in range(40))
    upload(service, tmp_path, "a,b,y\n" + rows)
    v = service.preprocess(
        data_pb2.PreprocessDatasetRequest(
            name="t",
            imputation=S(strategy=data_pb2.IMPUTE_STRATEGY_MEDIAN),
            normalization=model_pb2.NORMALIZATION_KIND_ZSCORE,
            split=data_pb2.SplitSpec(val_fraction=0.25, seed=1),
        )
    )
    norm = v.normalization
    assert norm.kind == model_pb2.NORMALIZATION_KIND_ZSCORE and len(norm.fill) == 2
    assert any(op.startswith("impute(median,filled=8)") for op in v.operations)
    features, _ = load_split(store, service.get("t", v.version), "all")
    assert not np.isnan(features).any()
    # A model built on this normalization maps a NaN input where the shards put it.
    arch = model_pb2.Architecture(
        mlp=model_pb2.MlpArchitecture(input_size=2, hidden_sizes=[4], output_size=2)
    )
    model = build_model(arch, norm).eval()
    with torch.no_grad():
        missing = model(torch.tensor([[float("nan"), 3.0]]))
        filled = model(torch.tensor([[norm.fill[0], 3.0]]))
        assert torch.equal(missing, filled)
        assert torch.allclose(
            model.norm(torch.tensor([[float("nan"), 3.0]]))[0, 0],
            torch.tensor((norm.fill[0] - norm.shift[0]) / norm.scale[0]),
        )
