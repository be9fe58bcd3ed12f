"""Array uploads whose headers promise more than they hold: refused from the
header, before numpy allocates what it declares (a 2^40-row header was a
MemoryError, answered INTERNAL), and zip members that would decompress past the
upload limit are refused unread. Through the real UploadDataset RPC."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import grpc
import numpy as np
import numpy.lib.format as npformat
import pytest

from common.api.modelfleet.data.v1 import data_pb2, data_pb2_grpc
from common.errors import InvalidArgument
from services.data.ingest import parse_npy, parse_npz
from tests.data.test_grpc import messages

LIMIT = 1 << 20


def npy_claiming(shape: tuple[int, ...], data: bytes, dtype: str = "<f8", fortran: bool = False) -> bytes:
    """A .npy whose header declares ``shape`` followed by ``data`` (any length)."""
    buffer = io.BytesIO()
    header = {"descr": dtype, "fortran_order": fortran, "shape": shape}
    npformat.write_array_header_1_0(buffer, header)
    buffer.seek(0)
    return buffer.getvalue() + data


def npz_of(**members: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(f"{name}.npy", data)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


LIES = {
    "2^40 rows, 16 bytes": npy_claiming((1 << 40, 2), b"\0" * 16),
    "short data": npy_claiming((4, 2), b"\0" * 40),
    "extra data": npy_claiming((1, 2), b"\0" * 40),
    "over the limit": npy_claiming((LIMIT, 2), b""),
    "object dtype": npy_claiming((1, 1), b"\0" * 8, dtype="|O"),
}


@pytest.mark.parametrize("case", sorted(LIES))
def test_npy_headers_that_lie_are_refused(tmp_path: Path, case: str) -> None:
    path = tmp_path / "a.npy"
    path.write_bytes(LIES[case])
    with pytest.raises(InvalidArgument, match=r"declares shape|only numeric"):
        parse_npy(path, "", LIMIT)
    path = tmp_path / "a.npz"
    path.write_bytes(npz_of(x=LIES[case]))
    with pytest.raises(InvalidArgument, match=r"declares shape|only numeric|ends after"):
        parse_npz(path, LIMIT)


def test_npz_members_past_the_limit_are_refused_unread(tmp_path: Path) -> None:
    zeros = npy_bytes(np.zeros((1024, 256)))  # 2 MiB of zeros compresses to a few KiB
    path = tmp_path / "bomb.npz"
    path.write_bytes(npz_of(x=zeros))
    assert path.stat().st_size < 16 * 1024
    with pytest.raises(InvalidArgument, match=r"decompress to \d+ bytes, over the 1048576-byte limit"):
        parse_npz(path, LIMIT)


def test_honest_arrays_still_load_in_every_layout(tmp_path: Path) -> None:
    base = np.arange(12, dtype=np.float64).reshape(4, 3)
    for array in (base, np.asfortranarray(base), base.astype(">f4"), base.astype(np.int16)):
        path = tmp_path / "a.npy"
        path.write_bytes(npy_bytes(array))
        raw, _ = parse_npy(path, "", LIMIT)
        np.testing.assert_array_equal(raw.data, base)
        path = tmp_path / "a.npz"
        path.write_bytes(npz_of(x=npy_bytes(array), y=npy_bytes(np.arange(4.0))))
        raw, label = parse_npz(path, LIMIT)
        assert label == "y"
        np.testing.assert_array_equal(raw.data[:, :3], base)


@pytest.mark.parametrize("fmt", ["npy", "npz"])
async def test_bombs_through_the_rpc_store_nothing(stub: data_pb2_grpc.DataServiceStub, fmt: str) -> None:
    lie = LIES["2^40 rows, 16 bytes"]
    body = lie if fmt == "npy" else npz_of(x=npy_bytes(np.zeros((64, 64))))  # 32 KiB over the 4 KiB limit
    kind = data_pb2.DATA_FORMAT_NPY if fmt == "npy" else data_pb2.DATA_FORMAT_NPZ
    header = data_pb2.UploadDatasetHeader(name="bomb", format=kind, task=data_pb2.DATASET_TASK_REGRESSION)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UploadDataset(messages(header, body, 1000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "declares shape" in (err.value.details() or "") or "over the 4096-byte limit" in (
        err.value.details() or ""
    )
    assert (await stub.ListDatasets(data_pb2.ListDatasetsRequest())).datasets == []
