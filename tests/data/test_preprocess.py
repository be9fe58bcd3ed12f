"""Preprocessing through the domain service: cleaning counts, transforms,
normalization stored and applied, deterministic splits, immutability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.data.v1 import data_pb2
from common.artifacts import ArtifactStore
from common.datasets import load_split
from common.errors import InvalidArgument
from services.data.service import DataService

ZSCORE = model_pb2.NORMALIZATION_KIND_ZSCORE
MINMAX = model_pb2.NORMALIZATION_KIND_MINMAX
CSV = "a,b,color,y\n1,10,red,0\n2,20,blue,1\nnan,30,red,1\n2,20,blue,1\n4,inf,red,0\n5,50,blue,\n6,60,red,1\n"


def upload(service: DataService, tmp_path: Path, text: str, name: str = "t", label: str = "y") -> str:
    header = data_pb2.UploadDatasetHeader(
        name=name, format=data_pb2.DATA_FORMAT_CSV, label_column=label, csv_has_header=True
    )
    with service.upload_spool(header) as spool:
        spool.write(text.encode())
        return service.ingest(spool).version


def request(**kw: object) -> data_pb2.PreprocessDatasetRequest:
    return data_pb2.PreprocessDatasetRequest(name="t", **kw)  # type: ignore[arg-type]


ONE_HOT = [data_pb2.Transform(one_hot=data_pb2.OneHotColumn(column="color"))]


def test_cleaning_counts_one_hot_and_lineage(
    service: DataService, store: ArtifactStore, tmp_path: Path
) -> None:
    upload(service, tmp_path, CSV)
    v = service.preprocess(
        request(cleaning=data_pb2.Cleaning(drop_invalid=True, dedupe=True), transforms=ONE_HOT)
    )
    c = v.cleaning
    assert (c.rows_in, c.dropped_invalid, c.dropped_missing_label, c.dropped_duplicates, c.rows_out) == (
        7,
        2,
        1,
        1,
        3,
    )
    assert list(v.feature_names) == ["a", "b", "color=blue", "color=red"] and v.num_features == 4
    assert (v.parent_name, v.parent_version, v.version) == ("t", "1", "2")
    assert v.operations[:3] == ["drop_invalid", "dedupe", "one_hot(color)"]
    x, y = load_split(store, service.get("t", "2"), "all")
    assert x.tolist() == [[1, 10, 0, 1], [2, 20, 1, 0], [6, 60, 0, 1]] and y is not None
    assert y.tolist() == [0, 1, 1] and y.dtype == np.int64
    # The parent is untouched: preprocessing made a new version.
    assert service.get("t", "1").meta.num_rows == 7


def test_string_column_without_one_hot_is_rejected(service: DataService, tmp_path: Path) -> None:
    upload(service, tmp_path, CSV)
    with pytest.raises(InvalidArgument, match="'color' is categorical"):
        service.preprocess(request(cleaning=data_pb2.Cleaning(drop_invalid=True)))
    with pytest.raises(InvalidArgument, match="no feature column 'nope'"):
        service.preprocess(request(transforms=[data_pb2.Transform(drop_column="nope")]))
    with pytest.raises(InvalidArgument, match="empty after cleaning"):
        upload(service, tmp_path, "a,y\nnan,1\n", name="e")
        service.preprocess(
            data_pb2.PreprocessDatasetRequest(name="e", cleaning=data_pb2.Cleaning(drop_invalid=True))
        )


@pytest.mark.parametrize("kind", [ZSCORE, MINMAX])
def test_normalization_fitted_on_train_and_applied(
    service: DataService, store: ArtifactStore, kind: int
) -> None:
    service.create_from_source(
        data_pb2.CreateDatasetFromSourceRequest(name="t", source=data_pb2.BUILTIN_SOURCE_IRIS)
    )
    raw_x, _ = load_split(store, service.get("t", "1"), "all")
    v = service.preprocess(
        request(normalization=kind, split=data_pb2.SplitSpec(val_fraction=0.2, test_fraction=0.2, seed=3))
    )
    assert dict(v.split_rows) == {"train": 90, "val": 30, "test": 30} and v.num_rows == 150
    norm = v.normalization
    assert norm.kind == kind and len(norm.shift) == 4 and min(norm.scale) > 0
    record = service.get("t", v.version)
    train, _ = load_split(store, record, "train")
    if kind == ZSCORE:
        assert np.allclose(train.mean(axis=0), 0, atol=1e-4) and np.allclose(train.std(axis=0), 1, atol=1e-3)
    else:
        assert np.allclose(train.min(axis=0), 0) and np.allclose(train.max(axis=0), 1)
    # Shards hold (raw - shift) / scale: what a model's norm buffers undo.
    all_x, _ = load_split(store, record, "all")
    expected = (np.sort(raw_x, axis=0) - np.array(norm.shift)) / np.array(norm.scale)
    assert np.allclose(np.sort(all_x, axis=0), expected, atol=1e-4)
    assert np.allclose(v.statistics.mean, all_x.mean(axis=0), atol=1e-4)


def test_second_normalization_composes_against_raw(service: DataService, store: ArtifactStore) -> None:
    service.create_from_source(
        data_pb2.CreateDatasetFromSourceRequest(name="t", source=data_pb2.BUILTIN_SOURCE_IRIS)
    )
    raw_x, _ = load_split(store, service.get("t", "1"), "all")
    service.preprocess(request(normalization=MINMAX))
    v3 = service.preprocess(request(normalization=ZSCORE))
    x, _ = load_split(store, service.get("t", v3.version), "all")
    n = v3.normalization
    assert np.allclose(x, (raw_x - np.array(n.shift)) / np.array(n.scale), atol=1e-4)


def test_split_deterministic_and_stratified(service: DataService, store: ArtifactStore) -> None:
    service.create_from_source(
        data_pb2.CreateDatasetFromSourceRequest(name="t", source=data_pb2.BUILTIN_SOURCE_BREAST_CANCER)
    )
    spec = data_pb2.SplitSpec(val_fraction=0.25, test_fraction=0.25, seed=7, stratify=True)
    a = service.get("t", service.preprocess(request(version="1", split=spec)).version)
    b = service.get("t", service.preprocess(request(version="1", split=spec)).version)
    assert a.shards == b.shards  # same seed, same bytes (content-addressed)
    _, y_all = load_split(store, a, "all")
    _, y_val = load_split(store, a, "val")
    assert y_all is not None and y_val is not None
    assert abs(y_val.mean() - y_all.mean()) < 0.01
    other = service.get(
        "t",
        service.preprocess(request(version="1", split=data_pb2.SplitSpec(val_fraction=0.25, seed=8))).version,
    )
    assert other.shards["val"] != a.shards["val"]
    with pytest.raises(InvalidArgument, match=r"split\.val_fraction"):
        service.preprocess(request(split=data_pb2.SplitSpec(val_fraction=1.5)))


def test_delete_removes_only_unshared_shards(service: DataService, store: ArtifactStore) -> None:
    service.create_from_source(
        data_pb2.CreateDatasetFromSourceRequest(name="t", source=data_pb2.BUILTIN_SOURCE_IRIS)
    )
    v2 = service.create_from_source(
        data_pb2.CreateDatasetFromSourceRequest(name="t", source=data_pb2.BUILTIN_SOURCE_IRIS)
    )
    shared = service.get("t", "1").shards["all"].features
    service.delete("t", "1")
    assert store.exists(shared)  # version 2 has the same bytes
    service.delete("t", v2.version)
    assert not store.exists(shared)
