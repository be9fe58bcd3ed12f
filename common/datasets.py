"""Dataset versions: metadata in Redis (``DatasetCatalog``) and memory-mapped
shards from the artifact store (``load_split``).

Redis data model (under the settings prefix):

- ``<p>:dataset:<name>`` hash: ``next`` (version counter, never reused so a
  version number always names the same bytes), ``created_at``, ``updated_at``.
- ``<p>:dataset:<name>:versions`` sorted set of live versions (score = number).
- ``<p>:dataset:<name>:v:<n>`` hash: ``meta`` (DatasetVersion bytes), ``shards`` (JSON).
- ``<p>:datasets`` sorted set of names with live versions (lexicographic paging).
- ``<p>:dataset_shard_refs`` hash: artifact digest -> number of versions using it,
  so deleting a version only removes shards no other version shares.
"""

from __future__ import annotations

import builtins
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from google.protobuf.timestamp_pb2 import Timestamp

from common.api.modelfleet.data.v1 import data_pb2
from common.artifacts import ArtifactStore
from common.errors import InvalidArgument, NotFound
from common.names import validate_name
from common.redis import Keys

SPLITS = ("train", "val", "test")
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50


@dataclass(frozen=True)
class SplitShards:
    features: str  # artifact digest of a .npy float32 [rows, num_features]
    labels: str | None  # artifact digest of a .npy int64/float32 [rows]; None if unlabelled

    def digests(self) -> list[str]:
        return [self.features] if self.labels is None else [self.features, self.labels]


@dataclass(frozen=True)
class DatasetRecord:
    meta: data_pb2.DatasetVersion
    shards: dict[str, SplitShards]  # "train"/"val"/"test", or "all" if unsplit


def _shards_json(shards: dict[str, SplitShards]) -> str:
    return json.dumps({k: {"features": v.features, "labels": v.labels} for k, v in shards.items()})


def _shards_from_json(raw: bytes | str) -> dict[str, SplitShards]:
    data: dict[str, dict[str, Any]] = json.loads(raw)
    return {k: SplitShards(features=v["features"], labels=v.get("labels")) for k, v in data.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument(f"page_size must be >= 0, not {page_size}")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _version_number(version: str, what: str = "version") -> int:
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise InvalidArgument(f"{what} {version!r} is not a version number (1, 2, ...)")
    return int(version)


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class DatasetCatalog:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._r = client
        self._k = Keys(prefix)

    def _head(self, name: str) -> str:
        return self._k("dataset", name)

    def _versions(self, name: str) -> str:
        return self._k("dataset", name, "versions")

    def _version_key(self, name: str, version: int | str) -> str:
        return self._k("dataset", name, "v", str(version))

    def create(
        self, meta: data_pb2.DatasetVersion, shards: dict[str, SplitShards]
    ) -> data_pb2.DatasetVersion:
        """Store a new version of ``meta.name``; assigns ``version`` and ``created_at``."""
        name = validate_name(meta.name, "dataset name")
        if not shards:
            raise InvalidArgument(f"dataset {name!r}: a version needs at least one shard")
        number = int(self._r.hincrby(self._head(name), "next", 1))
        now = time.time()
        out = data_pb2.DatasetVersion()
        out.CopyFrom(meta)
        out.version = str(number)
        out.created_at.CopyFrom(_timestamp(now))
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(
            self._version_key(name, number),
            mapping={"meta": out.SerializeToString(), "shards": _shards_json(shards)},
        )
        pipe.zadd(self._versions(name), {str(number): number})
        pipe.zadd(self._k("datasets"), {name: 0})
        pipe.hsetnx(self._head(name), "created_at", str(now))
        pipe.hset(self._head(name), "updated_at", str(now))
        for shard in shards.values():
            for digest in shard.digests():
                pipe.hincrby(self._k("dataset_shard_refs"), digest, 1)
        pipe.execute()
        return out

    def _latest(self, name: str) -> str:
        latest = self._r.zrange(self._versions(name), -1, -1)
        if not latest:
            raise NotFound(f"dataset {name!r} not found")
        return _text(latest[0])

    def get(self, name: str, version: str = "") -> DatasetRecord:
        """A version (``""`` = latest); NotFound naming the dataset or version."""
        validate_name(name, "dataset name")
        if version:
            _version_number(version)
        else:
            version = self._latest(name)
        raw = self._r.hmget(self._version_key(name, version), ["meta", "shards"])
        if raw[0] is None or raw[1] is None:
            if not self._r.exists(self._versions(name)):
                raise NotFound(f"dataset {name!r} not found")
            raise NotFound(f"dataset {name!r} has no version {version!r}")
        meta = data_pb2.DatasetVersion.FromString(_bytes(raw[0]))
        return DatasetRecord(meta=meta, shards=_shards_from_json(_bytes(raw[1])))

    def list(
        self, name_prefix: str = "", page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> tuple[list[data_pb2.Dataset], str]:
        """Datasets by name; ``page_token`` is the last name of the previous page."""
        size = _page_size(page_size)
        if page_token and page_token >= name_prefix:
            low = "(" + page_token
        else:
            low = "[" + name_prefix if name_prefix else "-"
        # Names use a subset of ASCII below 0x7f, so this bounds every name with the prefix.
        high = "(" + name_prefix + "\x7f" if name_prefix else "+"
        names = [_text(n) for n in self._r.zrangebylex(self._k("datasets"), low, high, start=0, num=size + 1)]
        more = len(names) > size
        names = names[:size]
        pipe = self._r.pipeline(transaction=False)
        for n in names:
            pipe.zrange(self._versions(n), -1, -1)
            pipe.zcard(self._versions(n))
            pipe.hget(self._head(n), "updated_at")
        raw = pipe.execute()
        out = []
        for i, n in enumerate(names):
            latest, count, updated = raw[3 * i : 3 * i + 3]
            item = data_pb2.Dataset(
                name=n, latest_version=_text(latest[0]) if latest else "", version_count=int(count)
            )
            if updated:
                item.updated_at.CopyFrom(_timestamp(float(updated)))
            out.append(item)
        return out, (names[-1] if more else "")

    def list_versions(
        self, name: str, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> tuple[builtins.list[data_pb2.DatasetVersion], str]:
        """Versions in ascending order; ``page_token`` is the last version of the previous page."""
        validate_name(name, "dataset name")
        size = _page_size(page_size)
        low = f"({_version_number(page_token, 'page_token')}" if page_token else "-inf"
        versions = self._r.zrangebyscore(self._versions(name), low, "+inf", start=0, num=size + 1)
        if not versions and not self._r.exists(self._versions(name)):
            raise NotFound(f"dataset {name!r} not found")
        more = len(versions) > size
        versions = versions[:size]
        pipe = self._r.pipeline(transaction=False)
        for v in versions:
            pipe.hget(self._version_key(name, _text(v)), "meta")
        metas = [data_pb2.DatasetVersion.FromString(m) for m in pipe.execute() if m is not None]
        return metas, (_text(versions[-1]) if more else "")

    def delete(self, name: str, version: str) -> None:
        """Remove a version's metadata and release its shard references."""
        validate_name(name, "dataset name")
        _version_number(version)
        key = self._version_key(name, version)
        refs_key = self._k("dataset_shard_refs")

        def remove(pipe: redis.client.Pipeline) -> None:
            raw = pipe.hget(key, "shards")
            if raw is None:
                if not pipe.exists(self._versions(name)):
                    raise NotFound(f"dataset {name!r} not found")
                raise NotFound(f"dataset {name!r} has no version {version!r}")
            digests = [d for s in _shards_from_json(_bytes(raw)).values() for d in s.digests()]
            counts = pipe.hmget(refs_key, digests) if digests else []
            remaining = int(pipe.zcard(self._versions(name))) - 1
            pipe.multi()
            pipe.delete(key)
            pipe.zrem(self._versions(name), version)
            if remaining == 0:
                pipe.zrem(self._k("datasets"), name)
            pipe.hset(self._head(name), "updated_at", str(time.time()))
            left: dict[str, int] = {}
            for digest, count in zip(digests, counts, strict=True):
                left[digest] = left.get(digest, int(count or 0)) - 1
            for digest, n in left.items():
                if n > 0:
                    pipe.hset(refs_key, digest, n)
                else:
                    pipe.hdel(refs_key, digest)

        self._r.transaction(remove, key, refs_key, self._versions(name))

    def references(self, digest: str) -> int:
        """How many dataset versions use the artifact ``digest``."""
        return int(self._r.hget(self._k("dataset_shard_refs"), digest) or 0)


def _load(store: ArtifactStore, digest: str) -> np.ndarray:
    return np.load(store.path(digest), mmap_mode="r", allow_pickle=False)


def load_split(
    store: ArtifactStore, record: DatasetRecord, split: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features and labels of one split, memory-mapped. ``"all"`` on a split
    version concatenates train, val and test (in that order, in memory)."""
    if split not in (*SPLITS, "all"):
        raise InvalidArgument(f"split {split!r} is not one of train, val, test, all")
    name = f"dataset {record.meta.name!r} version {record.meta.version!r}"
    shard = record.shards.get(split)
    if shard is not None:
        return _load(store, shard.features), (None if shard.labels is None else _load(store, shard.labels))
    if split != "all":
        raise NotFound(f"{name} has no {split!r} split (it has: {', '.join(sorted(record.shards))})")
    parts = [record.shards[s] for s in SPLITS if s in record.shards]
    features = np.concatenate([_load(store, p.features) for p in parts])
    if any(p.labels is None for p in parts):
        return features, None
    return features, np.concatenate([_load(store, p.labels) for p in parts if p.labels is not None])
