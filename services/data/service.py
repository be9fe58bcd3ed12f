"""The data service's operations as plain (blocking) Python; the servicer runs
them in threads so the event loop stays free."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from common.api.modelfleet.data.v1 import data_pb2
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog, DatasetRecord, load_split
from common.errors import InvalidArgument, ResourceExhausted
from common.names import validate_name
from services.data import batches, ingest, preprocess, sources, storage
from services.data.table import build_table

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")

_FORMATS = {
    data_pb2.DATA_FORMAT_CSV: "csv",
    data_pb2.DATA_FORMAT_NPY: "npy",
    data_pb2.DATA_FORMAT_NPZ: "npz",
    data_pb2.DATA_FORMAT_PARQUET: "parquet",
}


class UploadSpool:
    """Chunks of an upload written to a private scratch file, with the size limit."""

    def __init__(self, store: ArtifactStore, header: data_pb2.UploadDatasetHeader, limit: int) -> None:
        validate_name(header.name, "header.name")
        if header.format not in _FORMATS:
            raise InvalidArgument("header.format is required (CSV, NPY, NPZ or PARQUET)")
        if header.total_size_bytes > limit:
            raise ResourceExhausted(
                f"header.total_size_bytes {header.total_size_bytes} exceeds the upload limit of {limit} bytes"
            )
        if header.sha256 and not _SHA256.fullmatch(header.sha256):
            raise InvalidArgument("header.sha256 must be 64 lowercase hex digits")
        self.header = header
        self.limit = limit
        self.size = 0
        self._digest = hashlib.sha256()
        self._dir = store.scratch_dir()
        self.path = self._dir / "upload"
        self._handle: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in close()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise ResourceExhausted(f"upload exceeds the limit of {self.limit} bytes")
        self._handle.write(chunk)
        self._digest.update(chunk)

    def finish(self) -> Path:
        """The spooled file, once the bytes match what the header declared."""
        self._handle.close()
        declared = self.header.total_size_bytes
        if declared and declared != self.size:
            raise InvalidArgument(
                f"header.total_size_bytes is {declared} but {self.size} bytes arrived; nothing was stored"
            )
        digest = self._digest.hexdigest()
        if self.header.sha256 and self.header.sha256 != digest:
            raise InvalidArgument(
                f"header.sha256 is {self.header.sha256} but the bytes received hash to {digest}; "
                "nothing was stored"
            )
        return self.path

    def close(self) -> None:
        self._handle.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class DataService:
    def __init__(self, store: ArtifactStore, catalog: DatasetCatalog, max_upload_bytes: int) -> None:
        self.store = store
        self.catalog = catalog
        self.max_upload_bytes = max_upload_bytes

    @contextmanager
    def upload_spool(self, header: data_pb2.UploadDatasetHeader) -> Iterator[UploadSpool]:
        spool = UploadSpool(self.store, header, self.max_upload_bytes)
        try:
            yield spool
        finally:
            spool.close()

    def ingest(
        self, spool: UploadSpool, before_commit: Callable[[], None] | None = None
    ) -> data_pb2.DatasetVersion:
        """Parse and store a finished upload; ``before_commit`` runs right before the
        version is registered and raises to store nothing (the client went away)."""
        header = spool.header
        raw, label = ingest.parse_upload(spool.finish(), header, self.max_upload_bytes)
        table = build_table(raw, label, header.task)
        meta = storage.describe(table, header.name, header.description)
        meta.operations.append(f"upload({_FORMATS[header.format]})")
        version = storage.save_version(
            self.store, self.catalog, meta, table, {"all": np.arange(table.rows)}, before_commit
        )
        log.info("dataset uploaded", extra={"dataset": version.name, "version": version.version})
        return version

    def create_from_source(self, request: data_pb2.CreateDatasetFromSourceRequest) -> data_pb2.DatasetVersion:
        validate_name(request.name, "name")
        table = sources.load_source(request, self.max_upload_bytes)
        meta = storage.describe(table, request.name, request.description)
        op = sources.source_name(request.source)
        if request.source == data_pb2.BUILTIN_SOURCE_SYNTHETIC_REGRESSION:
            s = request.synthetic
            op += f"(n_samples={table.rows},n_features={len(table.columns)},seed={s.seed})"
        if request.images:
            op += f"(images {'x'.join(map(str, table.example_shape))})"
        meta.operations.append(f"source({op})")
        return storage.save_version(self.store, self.catalog, meta, table, {"all": np.arange(table.rows)})

    def preprocess(self, request: data_pb2.PreprocessDatasetRequest) -> data_pb2.DatasetVersion:
        target = validate_name(request.target_name or request.name, "target_name")
        parent = self.catalog.get(request.name, request.version)
        result = preprocess.preprocess(storage.load_table(self.store, parent), request)
        meta = storage.describe(result.table, target, request.description or parent.meta.description)
        meta.parent_name = parent.meta.name
        meta.parent_version = parent.meta.version
        meta.operations.extend(result.operations)
        meta.cleaning.CopyFrom(result.cleaning)
        if "all" not in result.splits:
            for split, rows in result.splits.items():
                meta.split_rows[split] = len(rows)
        return storage.save_version(self.store, self.catalog, meta, result.table, result.splits)

    def get(self, name: str, version: str) -> DatasetRecord:
        return self.catalog.get(name, version)

    def delete(self, name: str, version: str) -> None:
        if not version:
            raise InvalidArgument("version is required to delete a dataset version")
        record = self.catalog.get(name, version)
        self.catalog.delete(name, version)
        storage.release(self.store, self.catalog, [d for s in record.shards.values() for d in s.digests()])
        log.info("dataset version deleted", extra={"dataset": name, "version": version})

    def open_batches(
        self, request: data_pb2.StreamBatchesRequest, max_message_bytes: int
    ) -> tuple[batches.BatchPlan, np.ndarray, np.ndarray | None]:
        split = batches.SPLIT_NAMES.get(request.split)
        if split is None:
            raise InvalidArgument(f"split {request.split} is not a known split")
        record = self.catalog.get(request.name, request.version)
        features, labels = load_split(self.store, record, split)
        shape = tuple(record.meta.example_shape) or (int(features.shape[1]),)
        return (
            batches.plan(len(features), shape, request, max_message_bytes),
            features,
            labels,
        )
