"""Preprocessing of a table into a new version: cleaning, transforms, a
deterministic split and normalization fitted on the train rows.

Normalization is tracked per column as y = (x - shift) / scale relative to the
*raw* features, so preprocessing an already normalized version composes the
two and a model trained on the result still takes raw inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.data.v1 import data_pb2
from common.errors import InvalidArgument
from services.data.table import CLASSIFICATION, MISSING_CLASS, Table

_CASTS = {
    data_pb2.CAST_TYPE_FLOAT32: "float32",
    data_pb2.CAST_TYPE_FLOAT64: "float64",
    data_pb2.CAST_TYPE_INT64: "int64",
}
_NORMALIZE = (model_pb2.NORMALIZATION_KIND_ZSCORE, model_pb2.NORMALIZATION_KIND_MINMAX)


@dataclass
class Result:
    table: Table
    splits: dict[str, np.ndarray]  # split name -> row indices; {"all": ...} when unsplit
    cleaning: data_pb2.CleaningReport
    operations: list[str]


def _keep(table: Table, mask: np.ndarray) -> None:
    table.features = table.features[mask]
    if table.labels is not None:
        table.labels = table.labels[mask]


def clean(table: Table, spec: data_pb2.Cleaning) -> data_pb2.CleaningReport:
    report = data_pb2.CleaningReport(rows_in=table.rows)
    if spec.drop_invalid:
        valid = np.isfinite(table.features).all(axis=1)
        report.dropped_invalid = int((~valid).sum())
        _keep(table, valid)
        if table.labels is not None:
            if table.task == CLASSIFICATION:
                labelled = table.labels != MISSING_CLASS
            else:
                labelled = np.isfinite(table.labels)
            report.dropped_missing_label = int((~labelled).sum())
            _keep(table, labelled)
    if spec.dedupe and table.rows:
        parts = [table.features.astype(np.float64)]
        if table.labels is not None:
            parts.append(table.labels.astype(np.float64)[:, None])
        rows = np.ascontiguousarray(np.concatenate(parts, axis=1))
        # Compare whole rows as bytes: exact duplicates, NaN included.
        keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
        _, first = np.unique(keys, return_index=True)
        keep = np.zeros(table.rows, dtype=bool)
        keep[first] = True
        report.dropped_duplicates = int(table.rows - keep.sum())
        _keep(table, keep)
    report.rows_out = table.rows
    return report


def _cast(table: Table, op: data_pb2.CastColumn) -> str:
    i = table.column_index(op.column, "cast.column")
    col = table.columns[i]
    if col.dtype == "string":
        raise InvalidArgument(f"cast.column {op.column!r} is categorical (string); one-hot encode it instead")
    if op.to not in _CASTS:
        raise InvalidArgument(f"cast.to is required for column {op.column!r} (FLOAT32, FLOAT64 or INT64)")
    values = table.features[:, i]
    if op.to == data_pb2.CAST_TYPE_INT64:
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.argmax(bad)) + 1
            raise InvalidArgument(f"cast.column {op.column!r}: row {row} is NaN/Inf and cannot become int64")
        table.features[:, i] = np.trunc(values)
    col.dtype = _CASTS[op.to]
    return f"cast({op.column}->{col.dtype})"


def _one_hot(table: Table, op: data_pb2.OneHotColumn) -> str:
    i = table.column_index(op.column, "one_hot.column")
    col = table.columns[i]
    if col.dtype != "string":
        raise InvalidArgument(f"one_hot.column {op.column!r} is numeric ({col.dtype}); only string columns")
    codes = table.features[:, i]
    cats = list(col.categories)
    onehot = (codes[:, None] == np.arange(len(cats), dtype=np.float32)[None, :]).astype(np.float32)
    # A missing category stays missing in every new column, so cleaning can still see it.
    onehot[np.isnan(codes)] = np.nan
    new = [
        data_pb2.Column(name=f"{col.name}={c}", dtype="float32", role=data_pb2.COLUMN_ROLE_FEATURE)
        for c in cats
    ]
    table.features = np.concatenate([table.features[:, :i], onehot, table.features[:, i + 1 :]], axis=1)
    table.columns = [*table.columns[:i], *new, *table.columns[i + 1 :]]
    table.shift = np.concatenate([table.shift[:i], np.zeros(len(cats)), table.shift[i + 1 :]])
    table.scale = np.concatenate([table.scale[:i], np.ones(len(cats)), table.scale[i + 1 :]])
    if table.fill is not None:
        table.fill = np.concatenate([table.fill[:i], np.zeros(len(cats)), table.fill[i + 1 :]])
    return f"one_hot({col.name})"


def _drop(table: Table, column: str) -> str:
    i = table.column_index(column, "drop_column")
    table.features = np.delete(table.features, i, axis=1)
    del table.columns[i]
    table.shift = np.delete(table.shift, i)
    table.scale = np.delete(table.scale, i)
    if table.fill is not None:
        table.fill = np.delete(table.fill, i)
    return f"drop({column})"


def transform(table: Table, op: data_pb2.Transform) -> str:
    kind = op.WhichOneof("op")
    if table.example_shape and kind in ("one_hot", "drop_column"):
        shape = list(table.example_shape)
        raise InvalidArgument(f"{kind} does not apply to an image dataset (examples of shape {shape})")
    if kind == "cast":
        return _cast(table, op.cast)
    if kind == "one_hot":
        return _one_hot(table, op.one_hot)
    if kind == "drop_column":
        return _drop(table, op.drop_column)
    raise InvalidArgument("transforms: each transform needs one of cast, one_hot, drop_column")


def split_rows(table: Table, spec: data_pb2.SplitSpec) -> dict[str, np.ndarray]:
    """Deterministic by seed; each split keeps the rows' original order."""
    for field in ("val_fraction", "test_fraction"):
        value = getattr(spec, field)
        if not 0.0 <= value < 1.0:
            raise InvalidArgument(f"split.{field} must be in [0, 1), not {value}")
    if spec.val_fraction + spec.test_fraction >= 1.0:
        raise InvalidArgument("split.val_fraction + split.test_fraction must leave rows for train (< 1)")
    n = table.rows
    if spec.val_fraction == 0 and spec.test_fraction == 0:
        if spec.stratify:
            raise InvalidArgument("split.stratify needs a val_fraction or test_fraction")
        return {"all": np.arange(n)}
    if spec.seed < 0:
        raise InvalidArgument(f"split.seed must be >= 0, not {spec.seed}")
    rng = np.random.default_rng(spec.seed)
    groups = [np.arange(n)]
    if spec.stratify:
        if table.task != CLASSIFICATION or table.labels is None:
            raise InvalidArgument("split.stratify needs a labelled classification dataset")
        groups = [np.flatnonzero(table.labels == c) for c in np.unique(table.labels)]
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for group in groups:
        order = rng.permutation(group)
        n_test = round(len(order) * spec.test_fraction)
        n_val = round(len(order) * spec.val_fraction)
        parts["test"].append(order[:n_test])
        parts["val"].append(order[n_test : n_test + n_val])
        parts["train"].append(order[n_test + n_val :])
    out = {name: np.sort(np.concatenate(p)) for name, p in parts.items()}
    if out["train"].size == 0:
        raise InvalidArgument(f"split leaves no train rows out of {n}")
    return {name: rows for name, rows in out.items() if rows.size}


_IMPUTE_NAMES = {
    data_pb2.IMPUTE_STRATEGY_MEAN: "mean",
    data_pb2.IMPUTE_STRATEGY_MEDIAN: "median",
    data_pb2.IMPUTE_STRATEGY_MOST_FREQUENT: "most_frequent",
    data_pb2.IMPUTE_STRATEGY_CONSTANT: "constant",
}


def impute(table: Table, spec: data_pb2.Imputation, fit_rows: np.ndarray) -> str | None:
    """Fill missing (NaN) features with values fitted on ``fit_rows`` and record them,
    in the units of the raw inputs, so a model trained on the result fills the same
    way at inference. A column with no present train value gets 0 (or the constant)."""
    if spec.strategy == data_pb2.IMPUTE_STRATEGY_UNSPECIFIED:
        return None
    name = _IMPUTE_NAMES.get(spec.strategy)
    if name is None:
        raise InvalidArgument(f"imputation.strategy {spec.strategy} is unknown")
    if spec.strategy == data_pb2.IMPUTE_STRATEGY_CONSTANT and not math.isfinite(spec.constant):
        raise InvalidArgument(f"imputation.constant must be finite, got {spec.constant}")
    fit = table.features[fit_rows].astype(np.float64)
    fit[~np.isfinite(fit)] = np.nan
    fill = np.full(len(table.columns), spec.constant if name == "constant" else 0.0)
    for i in range(len(table.columns)):
        present = fit[:, i][~np.isnan(fit[:, i])]
        if name == "constant" or present.size == 0:
            continue
        if name == "mean":
            fill[i] = present.mean()
        elif name == "median":
            fill[i] = np.median(present)
        else:
            values, counts = np.unique(present, return_counts=True)
            fill[i] = values[np.argmax(counts)]  # ties: the smallest value
    missing = np.isnan(table.features)
    table.features = np.where(missing, fill.astype(np.float32), table.features).astype(np.float32)
    raw = fill * table.scale + table.shift  # the features may already be normalized by a parent
    table.fill = raw if table.fill is None else np.where(np.isnan(table.fill), raw, table.fill)
    return f"impute({name}{f'={spec.constant:g}' if name == 'constant' else ''},filled={int(missing.sum())})"


def normalize(table: Table, kind: model_pb2.NormalizationKind.ValueType, fit_rows: np.ndarray) -> str | None:
    """Fit on ``fit_rows``, apply to all rows, and compose with what was applied before."""
    if kind not in _NORMALIZE:
        return None
    fit = table.features[fit_rows].astype(np.float64)
    if table.example_shape:
        # Images: one shift and scale per channel, over every pixel of it.
        fit = (
            fit.reshape(len(fit), table.example_shape[0], -1)
            .transpose(0, 2, 1)
            .reshape(-1, table.example_shape[0])
        )
    finite = np.isfinite(fit)
    count = np.maximum(finite.sum(axis=0), 1)
    if kind == model_pb2.NORMALIZATION_KIND_ZSCORE:
        shift = np.where(finite, fit, 0.0).sum(axis=0) / count
        scale = np.sqrt((np.where(finite, fit - shift, 0.0) ** 2).sum(axis=0) / count)
    else:
        shift = np.where(finite, fit, np.inf).min(axis=0, initial=np.inf)
        scale = np.where(finite, fit, -np.inf).max(axis=0, initial=-np.inf) - shift
    if table.example_shape:
        pixels = math.prod(table.example_shape[1:])
        shift, scale = np.repeat(shift, pixels), np.repeat(scale, pixels)
    shift = np.where(np.isfinite(shift), shift, 0.0)
    # A constant (or empty) column would divide by zero: leave its scale at 1.
    scale = np.where(np.isfinite(scale) & (scale > 1e-12), scale, 1.0)
    table.features = ((table.features - shift) / scale).astype(np.float32)
    # (((x - s0) / c0) - s1) / c1 == (x - (s0 + s1 c0)) / (c0 c1)
    table.shift = table.shift + shift * table.scale
    table.scale = table.scale * scale
    table.norm_kind = kind
    return "normalize(zscore)" if kind == model_pb2.NORMALIZATION_KIND_ZSCORE else "normalize(minmax)"


def preprocess(table: Table, request: data_pb2.PreprocessDatasetRequest) -> Result:
    operations: list[str] = []
    report = clean(table, request.cleaning)
    if request.cleaning.drop_invalid:
        operations.append("drop_invalid")
    if request.cleaning.dedupe:
        operations.append("dedupe")
    for op in request.transforms:
        operations.append(transform(table, op))
    if table.rows == 0:
        raise InvalidArgument(f"dataset is empty after cleaning ({report.rows_in} rows in, none left)")
    for col in table.columns:
        if col.dtype == "string":
            raise InvalidArgument(
                f"column {col.name!r} is categorical (string): add a one_hot or drop_column transform for it"
            )
    splits = split_rows(table, request.split)
    if "all" not in splits:
        s = request.split
        operations.append(
            f"split(val={s.val_fraction:g},test={s.test_fraction:g},seed={s.seed}"
            + (",stratify)" if s.stratify else ")")
        )
    fit_rows = splits.get("train", splits.get("all", np.arange(0)))
    imputed = impute(table, request.imputation, fit_rows)
    if imputed:
        operations.append(imputed)
    fitted = normalize(table, request.normalization, fit_rows)
    if fitted:
        operations.append(fitted)
    return Result(table=table, splits=splits, cleaning=report, operations=operations)
