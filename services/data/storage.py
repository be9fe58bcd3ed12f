"""Saving a ``Table`` as a dataset version (one .npy per split per array in
the artifact store, metadata in the catalog) and reading one back."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.data.v1 import data_pb2
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog, DatasetRecord, SplitShards, load_split
from services.data.table import CLASSIFICATION, Table

log = logging.getLogger(__name__)


def statistics(features: np.ndarray) -> data_pb2.FeatureStatistics:
    """Per-feature mean/std/min/max over finite values (0 where a column has none)."""
    finite = np.isfinite(features)
    count = finite.sum(axis=0)
    safe = np.where(finite, features, 0.0).astype(np.float64)
    mean = safe.sum(axis=0) / np.maximum(count, 1)
    var = (np.where(finite, features - mean, 0.0) ** 2).sum(axis=0) / np.maximum(count, 1)
    lo = np.where(count > 0, np.where(finite, features, np.inf).min(axis=0, initial=np.inf), 0.0)
    hi = np.where(count > 0, np.where(finite, features, -np.inf).max(axis=0, initial=-np.inf), 0.0)
    return data_pb2.FeatureStatistics(mean=mean, std=np.sqrt(var), min=lo, max=hi)


def describe(table: Table, name: str, description: str) -> data_pb2.DatasetVersion:
    """Version metadata of ``table`` (statistics over all its rows); the caller
    adds splits and lineage."""
    schema = list(table.columns) + ([table.label] if table.label is not None else [])
    meta = data_pb2.DatasetVersion(
        name=name,
        schema=schema,
        num_rows=table.rows,
        num_features=len(table.columns),
        task=table.task,
        num_classes=len(table.class_names) if table.task == CLASSIFICATION else 0,
        class_names=table.class_names,
        statistics=statistics(table.features),
        description=description,
        feature_names=[c.name for c in table.columns],
        example_shape=list(table.example_shape) or [len(table.columns)],
    )
    normalized = table.norm_kind in (model_pb2.NORMALIZATION_KIND_ZSCORE, model_pb2.NORMALIZATION_KIND_MINMAX)
    meta.normalization.kind = table.norm_kind if normalized else model_pb2.NORMALIZATION_KIND_NONE
    if normalized or table.fill is not None:
        meta.normalization.shift[:] = table.shift.tolist()
        meta.normalization.scale[:] = table.scale.tolist()
    if table.fill is not None:
        meta.normalization.fill[:] = table.fill.tolist()
    return meta


def _put_array(store: ArtifactStore, array: np.ndarray) -> str:
    with store.writer() as w:
        np.save(w, np.ascontiguousarray(array), allow_pickle=False)
    return w.digest


def save_version(
    store: ArtifactStore,
    catalog: DatasetCatalog,
    meta: data_pb2.DatasetVersion,
    table: Table,
    splits: dict[str, np.ndarray],
    before_commit: Callable[[], None] | None = None,
) -> data_pb2.DatasetVersion:
    """Write one shard pair per split (``splits`` maps a split name to its row
    indices in ``table``) and register the version. ``before_commit`` runs just
    before the registration and may raise to abandon it. If anything fails, the
    shards written here that no other version uses are removed."""
    written: list[str] = []
    try:
        shards: dict[str, SplitShards] = {}
        for split, rows in splits.items():
            features = _put_array(store, table.features[rows])
            written.append(features)
            labels = None
            if table.labels is not None:
                labels = _put_array(store, table.labels[rows])
                written.append(labels)
            shards[split] = SplitShards(features=features, labels=labels)
        meta.size_bytes = sum(store.size(d) for d in written)
        if before_commit is not None:
            before_commit()
        return catalog.create(meta, shards)
    except BaseException:
        release(store, catalog, written)
        raise


def release(store: ArtifactStore, catalog: DatasetCatalog, digests: list[str]) -> None:
    """Delete the artifacts among ``digests`` that no dataset version references."""
    for digest in set(digests):
        if catalog.references(digest) == 0:
            store.delete(digest)
            log.info("deleted unreferenced shard", extra={"digest": digest})


def _copy(column: data_pb2.Column) -> data_pb2.Column:
    out = data_pb2.Column()
    out.CopyFrom(column)
    return out


def load_table(store: ArtifactStore, record: DatasetRecord) -> Table:
    """All rows of a version (splits concatenated) with its schema and normalization."""
    meta = record.meta
    features, labels = load_split(store, record, "all")
    columns = [c for c in meta.schema if c.role == data_pb2.COLUMN_ROLE_FEATURE]
    label = next((c for c in meta.schema if c.role == data_pb2.COLUMN_ROLE_LABEL), None)
    table = Table(
        columns=[_copy(c) for c in columns],
        features=np.array(features, dtype=np.float32),
        label=label,
        labels=None if labels is None else np.array(labels),
        task=meta.task,
        class_names=list(meta.class_names),
        example_shape=tuple(meta.example_shape) if len(meta.example_shape) > 1 else (),
    )
    if meta.normalization.kind in (model_pb2.NORMALIZATION_KIND_ZSCORE, model_pb2.NORMALIZATION_KIND_MINMAX):
        table.norm_kind = meta.normalization.kind
    if len(meta.normalization.shift) == len(table.columns):
        table.shift = np.array(meta.normalization.shift, dtype=np.float64)
        table.scale = np.array(meta.normalization.scale, dtype=np.float64)
    if meta.normalization.fill:
        table.fill = np.array(meta.normalization.fill, dtype=np.float64)
    return table
