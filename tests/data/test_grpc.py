"""Round trips through a real DataService server on a free port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.data.v1 import data_pb2, data_pb2_grpc
from common.settings import Settings

CSV = b"a,b,label\n" + b"".join(f"{i},{i * i % 7},{'cat' if i % 3 else 'dog'}\n".encode() for i in range(40))


def messages(
    header: data_pb2.UploadDatasetHeader, data: bytes, chunk: int
) -> Iterator[data_pb2.UploadDatasetRequest]:
    yield data_pb2.UploadDatasetRequest(header=header)
    for i in range(0, len(data), chunk):
        yield data_pb2.UploadDatasetRequest(chunk=data[i : i + chunk])


def csv_header(**kw: object) -> data_pb2.UploadDatasetHeader:
    base = {"name": "up", "format": data_pb2.DATA_FORMAT_CSV, "label_column": "label", "csv_has_header": True}
    return data_pb2.UploadDatasetHeader(**{**base, **kw})  # type: ignore[arg-type]


async def test_upload_in_odd_chunks_then_get_and_list(stub: data_pb2_grpc.DataServiceStub) -> None:
    reply = await stub.UploadDataset(messages(csv_header(), CSV, 7))
    v = reply.dataset
    assert (v.name, v.version, v.num_rows, v.num_features) == ("up", "1", 40, 2)
    assert list(v.class_names) == ["cat", "dog"] and v.task == data_pb2.DATASET_TASK_CLASSIFICATION
    got = await stub.GetDataset(data_pb2.GetDatasetRequest(name="up"))
    assert got.dataset == v
    listed = await stub.ListDatasets(data_pb2.ListDatasetsRequest())
    assert [d.name for d in listed.datasets] == ["up"]


async def test_npz_upload(stub: data_pb2_grpc.DataServiceStub, tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(12, dtype=np.float32).reshape(6, 2), y=np.arange(6, dtype=np.float32) / 2)
    header = data_pb2.UploadDatasetHeader(
        name="z", format=data_pb2.DATA_FORMAT_NPZ, task=data_pb2.DATASET_TASK_REGRESSION
    )
    v = (await stub.UploadDataset(messages(header, path.read_bytes(), 100))).dataset
    assert v.num_rows == 6 and v.task == data_pb2.DATASET_TASK_REGRESSION


async def test_parquet_upload(stub: data_pb2_grpc.DataServiceStub, tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.table({"a": list(range(40)), "label": ["cat" if i % 3 else "dog" for i in range(40)]}), path
    )
    header = data_pb2.UploadDatasetHeader(
        name="pq", format=data_pb2.DATA_FORMAT_PARQUET, label_column="label"
    )
    v = (await stub.UploadDataset(messages(header, path.read_bytes(), 333))).dataset
    assert (v.num_rows, v.num_features, list(v.class_names)) == (40, 1, ["cat", "dog"])
    assert "upload(parquet)" in v.operations
    garbage = data_pb2.UploadDatasetHeader(name="bad", format=data_pb2.DATA_FORMAT_PARQUET)
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.UploadDataset(messages(garbage, CSV, 64)),
        "not a valid Parquet file",
    )


async def expect(code: grpc.StatusCode, call: object, needle: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code and needle in (info.value.details() or "")


async def test_bad_uploads_leave_nothing(
    stub: data_pb2_grpc.DataServiceStub, small_settings: Settings
) -> None:
    bad = grpc.StatusCode.INVALID_ARGUMENT
    await expect(bad, stub.UploadDataset(iter([data_pb2.UploadDatasetRequest(chunk=b"x")])), "header")
    await expect(bad, stub.UploadDataset(messages(csv_header(), b"a,b,label\n1,2,x\n3,4\n", 5)), "line 3")
    await expect(bad, stub.UploadDataset(messages(csv_header(label_column="nope"), CSV, 64)), "'nope'")
    await expect(bad, stub.UploadDataset(messages(csv_header(), b"a,b,label\n", 64)), "empty")
    big = grpc.StatusCode.RESOURCE_EXHAUSTED
    await expect(big, stub.UploadDataset(messages(csv_header(total_size_bytes=10**9), CSV, 64)), "total_size")
    await expect(big, stub.UploadDataset(messages(csv_header(), CSV * 20, 1000)), "limit of 4096")
    assert (await stub.ListDatasets(data_pb2.ListDatasetsRequest())).datasets == []
    # No shard and no spooled upload survives a failed upload.
    root = small_settings.artifact_root
    assert not any((root / "sha256").rglob("*.*")) and not [
        p for p in (root / "sha256").rglob("*") if p.is_file()
    ]
    assert not any((root / "tmp").iterdir())


async def test_not_found(stub: data_pb2_grpc.DataServiceStub) -> None:
    nf = grpc.StatusCode.NOT_FOUND
    await expect(nf, stub.GetDataset(data_pb2.GetDatasetRequest(name="ghost")), "'ghost'")
    await expect(nf, stub.PreprocessDataset(data_pb2.PreprocessDatasetRequest(name="ghost")), "'ghost'")
    await expect(nf, stub.DeleteDataset(data_pb2.DeleteDatasetRequest(name="ghost", version="1")), "'ghost'")
    stream = stub.StreamBatches(data_pb2.StreamBatchesRequest(name="ghost"))
    await expect(nf, stream.read(), "'ghost'")


async def collect(stub: data_pb2_grpc.DataServiceStub, **kw: object) -> list[data_pb2.StreamBatchesResponse]:
    return [b async for b in stub.StreamBatches(data_pb2.StreamBatchesRequest(**kw))]  # type: ignore[arg-type]


async def test_preprocess_and_stream_batches_shuffled_resumable(stub: data_pb2_grpc.DataServiceStub) -> None:
    await stub.CreateDatasetFromSource(
        data_pb2.CreateDatasetFromSourceRequest(
            name="syn",
            source=data_pb2.BUILTIN_SOURCE_SYNTHETIC_REGRESSION,
            synthetic=data_pb2.SyntheticRegression(n_samples=50, n_features=3, seed=1),
        )
    )
    v = (
        await stub.PreprocessDataset(
            data_pb2.PreprocessDatasetRequest(
                name="syn",
                normalization=model_pb2.NORMALIZATION_KIND_ZSCORE,
                split=data_pb2.SplitSpec(val_fraction=0.2, seed=0),
            )
        )
    ).dataset
    assert dict(v.split_rows) == {"train": 40, "val": 10}
    req = {"name": "syn", "split": data_pb2.SPLIT_TRAIN, "batch_size": 16, "shuffle": True, "seed": 5}
    first = await collect(stub, **req)
    again = await collect(stub, **req)
    assert [b.rows for b in first] == [16, 16, 8] and [b.offset for b in first] == [0, 16, 32]
    assert [b.features for b in first] == [b.features for b in again]
    assert first[0].label_dtype == "float32" and first[0].num_features == 3
    resumed = await collect(stub, **req, start_offset=16)
    assert [b.features for b in resumed] == [b.features for b in first[1:]]
    plain = await collect(stub, name="syn", split=data_pb2.SPLIT_TRAIN, batch_size=40)
    shuffled = np.frombuffer(b"".join(b.features for b in first), "<f4").reshape(-1, 3)
    ordered = np.frombuffer(plain[0].features, "<f4").reshape(-1, 3)
    assert not np.array_equal(shuffled, ordered)
    assert np.array_equal(np.sort(shuffled, axis=0), np.sort(ordered, axis=0))
    await expect(
        grpc.StatusCode.NOT_FOUND,
        collect(stub, name="syn", split=data_pb2.SPLIT_TEST),
        "no 'test' split",
    )
    await expect(grpc.StatusCode.INVALID_ARGUMENT, collect(stub, name="syn", start_offset=99), "start_offset")


async def test_cancelled_stream_and_delete(stub: data_pb2_grpc.DataServiceStub) -> None:
    await stub.CreateDatasetFromSource(
        data_pb2.CreateDatasetFromSourceRequest(name="dg", source=data_pb2.BUILTIN_SOURCE_DIGITS)
    )
    call = stub.StreamBatches(data_pb2.StreamBatchesRequest(name="dg", batch_size=8))
    got = await call.read()
    assert got.rows == 8 and got.label_dtype == "int64"
    call.cancel()
    await stub.DeleteDataset(data_pb2.DeleteDatasetRequest(name="dg", version="1"))
    await expect(grpc.StatusCode.NOT_FOUND, stub.GetDataset(data_pb2.GetDatasetRequest(name="dg")), "'dg'")
