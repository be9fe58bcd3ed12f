"""Parsers and label encoding: every format and every malformed input."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.api.modelfleet.data.v1 import data_pb2
from common.errors import InvalidArgument
from services.data.ingest import parse_csv, parse_npy, parse_npz, parse_parquet
from services.data.table import MISSING_CLASS, build_table

CLS = data_pb2.DATASET_TASK_CLASSIFICATION
REG = data_pb2.DATASET_TASK_REGRESSION


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "f.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_header_categorical_quoted_and_missing(tmp_path: Path) -> None:
    path = write(tmp_path, 'a,color,label\n1.5,"red, dark",yes\n2,blue,no\n\n3,,yes\n4,blue,\n')
    raw = parse_csv(path, has_header=True)
    assert [c.name for c in raw.columns] == ["a", "color", "label"]
    assert raw.columns[1].dtype == "string" and raw.columns[1].categories == ["blue", "red, dark"]
    table = build_table(raw, "label", data_pb2.DATASET_TASK_UNSPECIFIED)
    assert table.task == CLS and table.class_names == ["no", "yes"]
    assert table.labels is not None and table.labels.tolist() == [1, 0, 1, MISSING_CLASS]
    assert table.features.dtype == np.float32 and table.features.shape == (4, 2)
    assert table.features[:, 1].tolist()[:2] == [1.0, 0.0] and np.isnan(table.features[2, 1])


def test_csv_without_header_numeric_labels_infer_regression(tmp_path: Path) -> None:
    raw = parse_csv(write(tmp_path, "1,2,0.5\n3,4,1.25\n"), has_header=False)
    assert [c.name for c in raw.columns] == ["c0", "c1", "c2"]
    assert raw.columns[0].dtype == "int64" and raw.columns[2].dtype == "float32"
    table = build_table(raw, "c2", data_pb2.DATASET_TASK_UNSPECIFIED)
    assert table.task == REG and table.labels is not None and table.labels.dtype == np.float32


def test_integer_labels_become_classes(tmp_path: Path) -> None:
    table = build_table(parse_csv(write(tmp_path, "x,y\n1,7\n2,3\n3,7\n"), True), "y", CLS)
    assert table.class_names == ["3", "7"] and table.labels is not None and table.labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("a,b\n1,2\n3\n", "line 3"),  # ragged
        ('a,b\n1,"2\n', "line"),  # unterminated quote: malformed
        ("a,b\n", "empty"),
        ("", "empty"),
        ("a,a\n1,2\n", "repeats"),
    ],
)
def test_bad_csv_names_the_line(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        parse_csv(write(tmp_path, text), has_header=True)


def test_unknown_label_column_and_text_regression_label(tmp_path: Path) -> None:
    raw = parse_csv(write(tmp_path, "x,y\n1,a\n2,b\n"), True)
    with pytest.raises(InvalidArgument, match="label_column 'z' is not a column"):
        build_table(raw, "z", CLS)
    with pytest.raises(InvalidArgument, match=r"'y' is not numeric \(line 2: 'a'\)"):
        build_table(raw, "y", REG)


LIMIT = 1 << 20


def test_npy_label_by_index(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    np.save(path, np.array([[1.0, 0, 2.0], [3.0, 1, 4.0]], dtype=np.float32))
    raw, label = parse_npy(path, "1", LIMIT)
    table = build_table(raw, label, CLS)
    assert [c.name for c in table.columns] == ["c0", "c2"] and table.class_names == ["0", "1"]
    with pytest.raises(InvalidArgument, match="out of range"):
        parse_npy(path, "3", LIMIT)
    with pytest.raises(InvalidArgument, match="column index"):
        parse_npy(path, "y", LIMIT)


def test_npy_rejects_object_and_1d(tmp_path: Path) -> None:
    path = tmp_path / "o.npy"
    np.save(path, np.array([[1, "a"]], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidArgument, match="numeric"):
        parse_npy(path, "", LIMIT)
    np.save(path, np.arange(3))
    with pytest.raises(InvalidArgument, match="2-D"):
        parse_npy(path, "", LIMIT)


def test_npz_x_y_and_rejections(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((3, 2)), y=np.array([0.5, 1.5, 2.5]))
    raw, label = parse_npz(path, LIMIT)
    table = build_table(raw, label, REG)
    assert (
        table.features.shape == (3, 2)
        and table.labels is not None
        and table.labels.tolist() == [0.5, 1.5, 2.5]
    )
    np.savez(path, x=np.ones((3, 2)), y=np.ones(2))
    with pytest.raises(InvalidArgument, match="'y' has 2 rows"):
        parse_npz(path, LIMIT)
    np.savez(path, z=np.ones((3, 2)))
    with pytest.raises(InvalidArgument, match="no array 'x'"):
        parse_npz(path, LIMIT)
    np.savez(path, x=np.array([["a"]], dtype=object))
    with pytest.raises(InvalidArgument, match="only numeric arrays"):
        parse_npz(path, LIMIT)
    path.write_bytes(io.BytesIO(b"not a zip").getvalue())
    with pytest.raises(InvalidArgument, match=r"not a valid \.npz"):
        parse_npz(path, LIMIT)


def write_parquet(tmp_path: Path, table: pa.Table) -> Path:
    path = tmp_path / "f.parquet"
    pq.write_table(table, path)
    return path


def test_parquet_numeric_boolean_string_dictionary_and_nulls(tmp_path: Path) -> None:
    table = pa.table(
        {
            "n": pa.array([1, 2, None, 4], pa.int32()),
            "x": pa.array([0.5, None, 1.5, 2.5], pa.float64()),
            "flag": pa.array([True, False, True, None]),
            "color": pa.array(["red", "blue", None, "red"]).dictionary_encode(),
            "label": pa.array(["yes", "no", "yes", None], pa.large_string()),
        }
    )
    raw = parse_parquet(write_parquet(tmp_path, table))
    assert [(c.name, c.dtype) for c in raw.columns] == [
        ("n", "int64"),
        ("x", "float32"),
        ("flag", "int64"),
        ("color", "string"),
        ("label", "string"),
    ]
    assert raw.columns[3].categories == ["blue", "red"] and raw.columns[3].first_text == ("row 1", "red")
    np.testing.assert_array_equal(raw.data[:, 0], [1, 2, np.nan, 4])
    np.testing.assert_array_equal(raw.data[:, 2], [1, 0, 1, np.nan])
    np.testing.assert_array_equal(raw.data[:, 3], [1, 0, np.nan, 1])
    built = build_table(raw, "label", data_pb2.DATASET_TASK_UNSPECIFIED)
    assert built.task == CLS and built.class_names == ["no", "yes"]
    assert built.labels is not None and built.labels.tolist() == [1, 0, 1, MISSING_CLASS]
    with pytest.raises(InvalidArgument, match=r"label column 'color' is not numeric \(row 1: 'red'\)"):
        build_table(raw, "color", REG)


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        (pa.table({"when": pa.array([1, 2], pa.timestamp("s"))}), "column 'when' has type timestamp"),
        (pa.table({"v": pa.array([[1], [2]])}), "column 'v' has type list"),
        (pa.table({"a": pa.array([], pa.float32())}), "empty"),
    ],
    ids=["timestamp", "list", "no-rows"],
)
def test_parquet_rejections_name_the_column(tmp_path: Path, table: pa.Table, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(needle)):
        parse_parquet(write_parquet(tmp_path, table))


def test_not_parquet_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "f.parquet"
    path.write_bytes(b"a,b\n1,2\n")
    with pytest.raises(InvalidArgument, match="not a valid Parquet file"):
        parse_parquet(path)
