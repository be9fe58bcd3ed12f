"""DatasetCatalog on real Redis, and load_split from the artifact store."""

from __future__ import annotations

import numpy as np
import pytest

from common.api.modelfleet.data.v1 import data_pb2
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog, SplitShards, load_split
from common.errors import InvalidArgument, NotFound


def shard(store: ArtifactStore, x: np.ndarray, y: np.ndarray | None) -> SplitShards:
    def put(a: np.ndarray) -> str:
        with store.writer() as w:
            np.save(w, a, allow_pickle=False)
        return w.digest

    return SplitShards(features=put(x), labels=None if y is None else put(y))


def test_versions_latest_paging_and_delete(catalog: DatasetCatalog, store: ArtifactStore) -> None:
    s = {"all": shard(store, np.ones((2, 1), np.float32), None)}
    for name in ("b", "a1", "a2", "c"):
        catalog.create(data_pb2.DatasetVersion(name=name), s)
    v2 = catalog.create(data_pb2.DatasetVersion(name="a1", num_rows=2), s)
    assert v2.version == "2" and v2.created_at.seconds > 0
    assert catalog.get("a1").meta.version == "2" and catalog.get("a1", "1").meta.num_rows == 0
    page, token = catalog.list(page_size=2)
    assert [d.name for d in page] == ["a1", "a2"] and page[0].version_count == 2 and token == "a2"
    page, token = catalog.list(page_size=2, page_token=token)
    assert [d.name for d in page] == ["b", "c"] and token == ""
    assert [d.name for d in catalog.list(name_prefix="a")[0]] == ["a1", "a2"]
    versions, token = catalog.list_versions("a1", page_size=1)
    assert [v.version for v in versions] == ["1"] and token == "1"
    assert [v.version for v in catalog.list_versions("a1", page_token=token)[0]] == ["2"]
    assert catalog.references(s["all"].features) == 5
    catalog.delete("a1", "2")
    assert catalog.get("a1").meta.version == "1"
    assert catalog.references(s["all"].features) == 4
    with pytest.raises(NotFound, match="no version '2'"):
        catalog.get("a1", "2")
    # Version numbers are never reused, so "a1:2" can never name other bytes.
    assert catalog.create(data_pb2.DatasetVersion(name="a1"), s).version == "3"


def test_unknown_and_invalid(catalog: DatasetCatalog) -> None:
    with pytest.raises(NotFound, match="dataset 'nope' not found"):
        catalog.get("nope")
    with pytest.raises(NotFound):
        catalog.list_versions("nope")
    with pytest.raises(NotFound):
        catalog.delete("nope", "1")
    with pytest.raises(InvalidArgument):
        catalog.get("../x")
    with pytest.raises(InvalidArgument):
        catalog.get("x", "latest")


def test_load_split_memmaps_and_concatenates(catalog: DatasetCatalog, store: ArtifactStore) -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    y = np.array([0, 1, 2], dtype=np.int64)
    meta = catalog.create(
        data_pb2.DatasetVersion(name="d"),
        {"train": shard(store, x[:2], y[:2]), "test": shard(store, x[2:], y[2:])},
    )
    record = catalog.get("d", meta.version)
    tx, ty = load_split(store, record, "train")
    assert isinstance(tx, np.memmap) and ty is not None and ty.tolist() == [0, 1]
    ax, ay = load_split(store, record, "all")
    assert np.array_equal(ax, x) and ay is not None and ay.tolist() == [0, 1, 2]
    with pytest.raises(NotFound, match="no 'val' split"):
        load_split(store, record, "val")
    with pytest.raises(InvalidArgument):
        load_split(store, record, "holdout")
