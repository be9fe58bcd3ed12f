"""In-memory tables: what the parsers produce (``RawTable``) and what a dataset
version holds (``Table``), and the step between them: choosing the label
column and encoding labels (classes as 0..C-1)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.data.v1 import data_pb2
from common.errors import InvalidArgument

CLASSIFICATION = data_pb2.DATASET_TASK_CLASSIFICATION
REGRESSION = data_pb2.DATASET_TASK_REGRESSION
MISSING_CLASS = -1  # label code of a row without a label (cleaning drops it)


@dataclass
class RawColumn:
    name: str
    dtype: str  # "float32", "int64" or "string"
    categories: list[str] = field(default_factory=list)  # sorted; string columns only
    # Where a non-numeric value first appeared ("line 3" in a CSV, "row 3" in
    # Parquet) and the value, for error messages.
    first_text: tuple[str, str] | None = None


@dataclass
class RawTable:
    columns: list[RawColumn]
    # float64 [rows, columns]; string columns hold category codes; NaN = missing.
    data: np.ndarray
    # (C, H, W) when each row is an image flattened row-major; () for tabular rows.
    example_shape: tuple[int, ...] = ()


@dataclass
class Table:
    """Feature columns (string columns as category codes until one-hot encoded),
    labels, and the per-column normalization applied so far (identity if none)."""

    columns: list[data_pb2.Column]
    features: np.ndarray  # float32 [rows, len(columns)]
    label: data_pb2.Column | None
    labels: np.ndarray | None  # int64 codes (MISSING_CLASS = none) or float32 (NaN = none)
    task: data_pb2.DatasetTask.ValueType
    class_names: list[str]
    norm_kind: model_pb2.NormalizationKind.ValueType = model_pb2.NORMALIZATION_KIND_NONE
    shift: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scale: np.ndarray = field(default_factory=lambda: np.ones(0))
    # Raw-space value a missing input takes (NaN: that column is not imputed); None: no imputation.
    fill: np.ndarray | None = None
    # (C, H, W) when each row is an image flattened row-major; () for tabular rows.
    example_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.shift.shape != (len(self.columns),):
            self.shift = np.zeros(len(self.columns))
            self.scale = np.ones(len(self.columns))

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])

    def column_index(self, name: str, what: str) -> int:
        for i, col in enumerate(self.columns):
            if col.name == name:
                return i
        if self.label is not None and self.label.name == name:
            raise InvalidArgument(f"{what}: {name!r} is the label column, not a feature")
        names = ", ".join(c.name for c in self.columns)
        raise InvalidArgument(f"{what}: no feature column {name!r} (columns: {names})")


def _class_name(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def build_table(raw: RawTable, label_column: str, task: data_pb2.DatasetTask.ValueType) -> Table:
    """Split the label column off ``raw`` and encode it for ``task``
    (UNSPECIFIED: classification for text or integer labels, else regression)."""
    if raw.data.shape[0] == 0:
        raise InvalidArgument("dataset is empty: no data rows")
    names = [c.name for c in raw.columns]
    if not label_column:
        if task != data_pb2.DATASET_TASK_UNSPECIFIED:
            raise InvalidArgument(f"label_column is required for task {data_pb2.DatasetTask.Name(task)}")
        features = raw.data
        label = None
        labels = None
        class_names: list[str] = []
    else:
        if label_column not in names:
            raise InvalidArgument(
                f"label_column {label_column!r} is not a column (columns: {', '.join(names)})"
            )
        idx = names.index(label_column)
        col = raw.columns[idx]
        values = raw.data[:, idx]
        features = np.delete(raw.data, idx, axis=1)
        if task == data_pb2.DATASET_TASK_UNSPECIFIED:
            known = values[~np.isnan(values)]
            integral = bool(np.all(np.isfinite(known)) and np.all(known == np.round(known)))
            task = CLASSIFICATION if col.dtype == "string" or integral else REGRESSION
        if task == CLASSIFICATION:
            labels, class_names = _encode_classes(values, col)
            label = data_pb2.Column(
                name=col.name, dtype="int64", role=data_pb2.COLUMN_ROLE_LABEL, categories=class_names
            )
        else:
            if col.dtype == "string":
                where, text = col.first_text or ("?", "")
                raise InvalidArgument(
                    f"label column {col.name!r} is not numeric ({where}: {text!r}); "
                    "task regression needs numbers"
                )
            labels = values.astype(np.float32)
            class_names = []
            label = data_pb2.Column(name=col.name, dtype="float32", role=data_pb2.COLUMN_ROLE_LABEL)
        raw.columns = [c for i, c in enumerate(raw.columns) if i != idx]
    if features.shape[1] == 0:
        raise InvalidArgument(
            f"dataset has no feature columns (columns: {', '.join(names)}); a model needs at least one input"
        )
    columns = [
        data_pb2.Column(
            name=c.name, dtype=c.dtype, role=data_pb2.COLUMN_ROLE_FEATURE, categories=c.categories
        )
        for c in raw.columns
    ]
    return Table(
        columns=columns,
        features=np.ascontiguousarray(features, dtype=np.float32),
        label=label,
        labels=labels,
        task=task,
        class_names=class_names,
        example_shape=raw.example_shape,
    )


def _encode_classes(values: np.ndarray, col: RawColumn) -> tuple[np.ndarray, list[str]]:
    missing = np.isnan(values)
    codes = np.full(values.shape[0], MISSING_CLASS, dtype=np.int64)
    if col.dtype == "string":
        # Category codes are already 0..C-1 in sorted category order.
        codes[~missing] = values[~missing].astype(np.int64)
        return codes, list(col.categories)
    classes = np.unique(values[~missing])
    codes[~missing] = np.searchsorted(classes, values[~missing])
    return codes, [_class_name(v) for v in classes]
