"""Parsers from an uploaded file (spooled to disk) to a ``RawTable``.

Errors name the 1-based line (CSV; the row for Parquet) and the column, since
clients fix their files from these messages.
"""

from __future__ import annotations

import csv
import math
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import numpy.lib.format as npformat
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.api.modelfleet.data.v1 import data_pb2
from common.errors import InvalidArgument
from services.data.table import RawColumn, RawTable


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line, fields) of every non-blank record; ``line`` is where it ends."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, strict=True)
        try:
            for fields in reader:
                if fields and not (len(fields) == 1 and not fields[0].strip()):
                    yield reader.line_num, fields
        except csv.Error as exc:
            raise InvalidArgument(f"malformed CSV at line {reader.line_num}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                f"CSV is not UTF-8 (after line {reader.line_num}, byte {exc.start} of a block)"
            ) from None


# What spreadsheets, R, pandas and databases write for a missing cell (lowercase).
DEFAULT_MISSING = frozenset({"na", "n/a", "nan", "null", "none", "nil", "#n/a", "<na>", "-nan", "?"})


def missing_tokens(declared: Sequence[str]) -> frozenset[str]:
    """The header's missing-value tokens (lowercase), or the defaults when it names
    none; naming only "" turns the defaults off."""
    if not declared:
        return DEFAULT_MISSING
    return frozenset(t.strip().lower() for t in declared) - {""}


def parse_csv(path: Path, has_header: bool, missing: frozenset[str] = DEFAULT_MISSING) -> RawTable:
    """Two passes keep memory at the size of the result: the first checks the
    shape and finds each column's type, the second fills the array. Empty cells
    and ``missing`` tokens (lowercase) are NaN."""
    names: list[str] | None = None
    width = 0
    rows = 0
    first_text: list[tuple[str, str] | None] = []
    seen: list[bool] = []
    integral: list[bool] = []
    for line, fields in _csv_rows(path):
        if names is None:
            width = len(fields)
            first_text = [None] * width
            seen = [False] * width
            integral = [True] * width
            if has_header:
                names = [f.strip() or f"c{i}" for i, f in enumerate(fields)]
                if len(set(names)) != width:
                    raise InvalidArgument(f"CSV header at line {line} repeats a column name")
                continue
            names = [f"c{i}" for i in range(width)]
        if len(fields) != width:
            raise InvalidArgument(
                f"ragged CSV: line {line} has {len(fields)} fields, the first row has {width}"
            )
        rows += 1
        for i, text in enumerate(fields):
            text = text.strip()
            if not text or text.lower() in missing:
                continue
            seen[i] = True
            value = _number(text)
            if value is None:
                if first_text[i] is None:
                    first_text[i] = (f"line {line}", text)
            elif not (math.isfinite(value) and value.is_integer()):
                integral[i] = False
    if names is None or rows == 0:
        raise InvalidArgument("dataset is empty: the CSV has no data rows")
    text_columns = [i for i in range(width) if first_text[i] is not None]
    # Category codes in order of first appearance; remapped to sorted order below.
    codes: dict[int, dict[str, int]] = {i: {} for i in text_columns}
    data = np.full((rows, width), np.nan, dtype=np.float64)
    records = _csv_rows(path)
    if has_header:
        next(records)
    for row, (_, fields) in enumerate(records):
        for i, text in enumerate(fields):
            text = text.strip()
            if not text or text.lower() in missing:
                continue
            if i in codes:
                data[row, i] = codes[i].setdefault(text, len(codes[i]))
            else:
                data[row, i] = float(text)
    columns = [
        RawColumn(name, "int64" if integral[i] and seen[i] else "float32") for i, name in enumerate(names)
    ]
    for i in text_columns:
        categories = sorted(codes[i])
        order = np.array([codes[i][c] for c in categories], dtype=np.int64)
        remap = np.empty(len(categories), dtype=np.float64)
        remap[order] = np.arange(len(categories))
        present = ~np.isnan(data[:, i])
        data[present, i] = remap[data[present, i].astype(np.int64)]
        columns[i] = RawColumn(names[i], "string", categories, first_text[i])
    return RawTable(columns=columns, data=data)


def _examples(array: np.ndarray, what: str, channels_last: bool) -> tuple[np.ndarray, tuple[int, ...]]:
    """Rows of a 2-D array, or images (N x H x W, N x C x H x W, or N x H x W x C
    with ``channels_last``) flattened to rows with their (C, H, W)."""
    if array.dtype.kind not in "biuf":
        raise InvalidArgument(f"{what} has dtype {array.dtype}; only numeric arrays are accepted")
    if array.ndim == 2:
        return array, ()
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and channels_last:
        array = array.transpose(0, 3, 1, 2)
    elif array.ndim != 4:
        raise InvalidArgument(
            f"{what} must be 2-D [rows, columns] or images [N, C, H, W], not shape {list(array.shape)}"
        )
    shape = tuple(int(d) for d in array.shape[1:])
    if 0 in shape:
        raise InvalidArgument(f"{what} has an empty image shape {list(shape)}")
    return np.ascontiguousarray(array).reshape(len(array), -1), shape


def _columns_for(array: np.ndarray, names: list[str]) -> list[RawColumn]:
    dtype = "int64" if array.dtype.kind in "biu" else "float32"
    return [RawColumn(name, dtype) for name in names]


def _load_npy(source: IO[bytes], what: str, size: int, max_bytes: int) -> np.ndarray:
    """The array in ``source`` (``size`` bytes), after its header proves it numeric
    and no larger than the bytes present and ``max_bytes``: numpy would otherwise
    allocate what a 100-byte header declares before reading any data."""
    try:
        version = npformat.read_magic(source)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(source)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npformat.read_array_header_2_0(source)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, EOFError, OSError) as exc:
        raise InvalidArgument(f"{what} is not a valid .npy file: {exc}") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise InvalidArgument(f"{what} has dtype {dtype}; only numeric arrays are accepted")
    declared = math.prod(shape) * dtype.itemsize
    present = size - source.tell()
    if declared > max_bytes:
        raise InvalidArgument(
            f"{what} declares shape {list(shape)} ({declared} bytes), over the {max_bytes}-byte limit"
        )
    if declared != present:
        raise InvalidArgument(
            f"{what} declares shape {list(shape)} ({declared} bytes) but holds {present} bytes of data"
        )
    data = source.read(declared)
    if len(data) != declared:
        raise InvalidArgument(f"{what} ends after {len(data)} of its {declared} data bytes")
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape))
    return flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)


def parse_npy(
    path: Path, label_column: str, max_bytes: int, channels_last: bool = False
) -> tuple[RawTable, str]:
    """A 2-D array (``label_column`` is a column index as text, or empty) or
    unlabelled images. Returns the table and the label column's name."""
    with path.open("rb") as source:
        array = _load_npy(source, "the .npy upload", path.stat().st_size, max_bytes)
    array, shape = _examples(array, "the .npy array", channels_last)
    names = [f"c{i}" for i in range(array.shape[1])]
    label = ""
    if label_column and shape:
        raise InvalidArgument("label_column does not apply to .npy images; upload .npz with 'x' and 'y'")
    if label_column:
        try:
            index = int(label_column)
        except ValueError:
            raise InvalidArgument(
                f"label_column {label_column!r} must be a column index for .npy uploads"
            ) from None
        if not 0 <= index < array.shape[1]:
            raise InvalidArgument(
                f"label_column {index} is out of range: the array has {array.shape[1]} columns"
            )
        label = names[index]
    return RawTable(
        columns=_columns_for(array, names), data=array.astype(np.float64), example_shape=shape
    ), label


def parse_npz(path: Path, max_bytes: int, channels_last: bool = False) -> tuple[RawTable, str]:
    """Arrays ``x`` (2-D rows or images, as for .npy) and optional ``y`` (1-D, one
    per example). Members may decompress to at most ``max_bytes`` in total (zip
    bombs are refused unread)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            if len(members) != len(archive.infolist()):
                raise InvalidArgument(".npz names an array twice")
            if "x" not in members:
                raise InvalidArgument(
                    f".npz has no array 'x' (arrays: {', '.join(sorted(members)) or 'none'})"
                )
            wanted = [members[n] for n in ("x", "y") if n in members]
            total = sum(info.file_size for info in wanted)
            if total > max_bytes:
                raise InvalidArgument(
                    f".npz arrays decompress to {total} bytes, over the {max_bytes}-byte limit"
                )
            arrays = {}
            for info in wanted:
                name = info.filename.removesuffix(".npy")
                with archive.open(info) as member:
                    arrays[name] = _load_npy(member, f".npz array {name!r}", info.file_size, max_bytes)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InvalidArgument(f"the upload is not a valid .npz archive: {exc}") from None
    x, shape = _examples(arrays["x"], ".npz array 'x'", channels_last)
    y = arrays.get("y")
    names = [f"c{i}" for i in range(x.shape[1])]
    columns = _columns_for(x, names)
    if y is None:
        return RawTable(columns=columns, data=x.astype(np.float64), example_shape=shape), ""
    if y.dtype.kind not in "biuf" or y.ndim != 1:
        raise InvalidArgument(f".npz array 'y' must be 1-D numeric, not {y.dtype} shape {list(y.shape)}")
    if y.shape[0] != x.shape[0]:
        raise InvalidArgument(f".npz array 'y' has {y.shape[0]} rows but 'x' has {x.shape[0]}")
    data = np.concatenate([x.astype(np.float64), y.astype(np.float64)[:, None]], axis=1)
    return RawTable(columns=[*columns, *_columns_for(y[:, None], ["y"])], data=data, example_shape=shape), "y"


def parse_parquet(path: Path) -> RawTable:
    """Numeric, boolean and string columns (string and dictionary-encoded); nulls
    are missing values. pyarrow >= 14.0.1 never unpickles extension types found in
    a file (CVE-2023-47248), so reading an uploaded file runs no Python from it."""
    try:
        table = pq.read_table(path, memory_map=True)
    except (pa.ArrowException, OSError) as exc:
        raise InvalidArgument(f"the upload is not a valid Parquet file: {exc}") from None
    names = table.column_names
    if len(set(names)) != len(names):
        raise InvalidArgument("the Parquet file repeats a column name")
    if table.num_rows == 0 or not names:
        raise InvalidArgument("dataset is empty: the Parquet file has no rows")
    data = np.empty((table.num_rows, len(names)), dtype=np.float64)
    columns: list[RawColumn] = []
    for i, (name, column) in enumerate(zip(names, table.columns, strict=True)):
        kind = column.type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
            column = column.cast(kind)
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            columns.append(_parquet_strings(name, column.cast(pa.string()), data[:, i]))
            continue
        if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
            columns.append(RawColumn(name, "int64"))
        elif pa.types.is_floating(kind) or pa.types.is_decimal(kind) or pa.types.is_null(kind):
            columns.append(RawColumn(name, "float32"))
        else:
            raise InvalidArgument(
                f"Parquet column {name!r} has type {column.type}; "
                "numeric, boolean and string columns are supported"
            )
        data[:, i] = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return RawTable(columns=columns, data=data)


def _parquet_strings(name: str, values: pa.ChunkedArray, out: np.ndarray) -> RawColumn:
    """Category codes in sorted order into ``out`` (NaN where null), as CSV text columns get."""
    categories = sorted(pc.unique(values).drop_null().to_pylist())
    codes = pc.index_in(values, value_set=pa.array(categories, pa.string()))
    out[:] = codes.cast(pa.float64()).to_numpy(zero_copy_only=False)
    valid = pc.indices_nonzero(pc.is_valid(values))
    first = int(valid[0].as_py()) if len(valid) else None
    first_text = (f"row {first + 1}", str(values[first].as_py())) if first is not None else None
    return RawColumn(name, "string", categories, first_text)


def parse_upload(path: Path, header: data_pb2.UploadDatasetHeader, max_bytes: int) -> tuple[RawTable, str]:
    """Parse by ``header.format``; returns the table and the label column's name.
    ``max_bytes`` bounds what an array may decode to."""
    if header.format == data_pb2.DATA_FORMAT_CSV:
        missing = missing_tokens(header.csv_missing_values)
        return parse_csv(path, header.csv_has_header, missing), header.label_column
    if header.format == data_pb2.DATA_FORMAT_NPY:
        return parse_npy(path, header.label_column, max_bytes, header.channels_last)
    if header.format == data_pb2.DATA_FORMAT_NPZ:
        return parse_npz(path, max_bytes, header.channels_last)
    if header.format == data_pb2.DATA_FORMAT_PARQUET:
        return parse_parquet(path), header.label_column
    raise InvalidArgument("header.format is required (CSV, NPY, NPZ or PARQUET)")
