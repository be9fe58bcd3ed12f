"""A cut upload stores nothing: streams the client cancels or lets run past
their deadline after part of a 10,000-row CSV (once, 1 in 6 were committed
truncated), and streams whose bytes do not match the declared size or sha256."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import grpc
import pytest
import redis

from common.api.modelfleet.data.v1 import data_pb2, data_pb2_grpc
from common.settings import Settings
from services.data.server import build

ROWS = 10_000
CSV = b"a,b,label\n" + b"".join(f"{i},{i * 7 % 13},{i % 3}\n".encode() for i in range(ROWS))
CHUNK = 4096
TRIES = 12


def _header(name: str, **kw: object) -> data_pb2.UploadDatasetHeader:
    return data_pb2.UploadDatasetHeader(
        name=name,
        format=data_pb2.DATA_FORMAT_CSV,
        label_column="label",
        csv_has_header=True,
        **{"total_size_bytes": len(CSV), **kw},  # type: ignore[arg-type]
    )


async def _part(name: str, upto: int, stall: asyncio.Event) -> AsyncIterator[data_pb2.UploadDatasetRequest]:
    # No declared size: only the end of the call can tell a cut stream from a whole one.
    yield data_pb2.UploadDatasetRequest(header=_header(name, total_size_bytes=0))
    for i in range(0, upto, CHUNK):
        yield data_pb2.UploadDatasetRequest(chunk=CSV[i : min(i + CHUNK, upto)])
    stall.set()
    await asyncio.sleep(3600)  # the client never finishes: it is cancelled or times out


@pytest.fixture
async def stub(settings: Settings, redis_client: redis.Redis) -> AsyncIterator[data_pb2_grpc.DataServiceStub]:
    """A data server with the default upload limit (the shared one allows 4 KiB)."""
    host = await build(settings)
    port = await host.start()
    await host.ready()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield data_pb2_grpc.DataServiceStub(channel)
    await host.stop(grace=1.0)


async def _versions(stub: data_pb2_grpc.DataServiceStub, name: str) -> int:
    """How many versions ``name`` has (0 when the dataset does not exist)."""
    try:
        reply = await stub.ListDatasetVersions(data_pb2.ListDatasetVersionsRequest(name=name))
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        return 0
    return len(reply.versions)


async def test_cancelled_and_timed_out_uploads_store_nothing(
    stub: data_pb2_grpc.DataServiceStub, settings: Settings
) -> None:
    outcomes: list[str] = []
    for i in range(TRIES):
        name = f"cut-{i}"
        stall = asyncio.Event()
        # Cut at a line end: the part received is itself a valid, shorter CSV.
        upto = CSV.index(b"\n", len(CSV) * (i + 1) // (TRIES + 1)) + 1
        if i % 2:
            call = stub.UploadDataset(_part(name, upto, stall))
            await asyncio.wait_for(stall.wait(), 30)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            outcomes.append("CANCELLED")
        else:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.UploadDataset(_part(name, upto, stall), timeout=1.0)
            outcomes.append(info.value.code().name)
    await asyncio.sleep(0.5)  # anything still running server-side would commit by now
    for i in range(TRIES):
        assert await _versions(stub, f"cut-{i}") == 0, f"cut-{i} was stored ({outcomes[i]})"
    scratch = settings.artifact_root / "tmp"
    assert not scratch.exists() or not any(scratch.iterdir()), list(scratch.iterdir())


async def _whole(
    header: data_pb2.UploadDatasetHeader, data: bytes
) -> AsyncIterator[data_pb2.UploadDatasetRequest]:
    yield data_pb2.UploadDatasetRequest(header=header)
    for i in range(0, len(data), CHUNK):
        yield data_pb2.UploadDatasetRequest(chunk=data[i : i + CHUNK])


async def test_declared_size_and_digest_must_match(stub: data_pb2_grpc.DataServiceStub) -> None:
    half = CSV[: len(CSV) // 2].rsplit(b"\n", 1)[0] + b"\n"  # a well-formed, shorter CSV
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.UploadDataset(_whole(_header("short"), half))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "total_size_bytes" in (info.value.details() or "")
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.UploadDataset(_whole(_header("digest", sha256=wrong), CSV))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256" in (info.value.details() or "")
    for name in ("short", "digest"):
        assert await _versions(stub, name) == 0
    right = hashlib.sha256(CSV).hexdigest()
    reply = await stub.UploadDataset(_whole(_header("whole", sha256=right), CSV))
    assert reply.dataset.num_rows == ROWS
