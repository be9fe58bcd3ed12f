"""``modelfleet datasets`` against a real server (the CLI is synchronous, so it
runs in a thread while the server serves on the test's event loop)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from services.cli.main import main


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_create_upload_preprocess_show_delete(
    data_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", data_target)
    code, out, _ = await run(capsys, "datasets", "create", "ir", "--source", "iris", *t, "-o", "json")
    assert code == 0 and json.loads(out)["num_rows"] == "150"
    csv = tmp_path / "pets.csv"
    csv.write_text("w,kind,y\n1,cat,0\n2,dog,1\n3,cat,0\n")
    code, out, _ = await run(capsys, "datasets", "upload", str(csv), "--label", "y", *t, "-o", "json")
    assert code == 0 and json.loads(out)["name"] == "pets"
    code, out, _ = await run(
        capsys,
        "datasets",
        "preprocess",
        "pets",
        "--one-hot",
        "kind",
        "--normalize",
        "minmax",
        *t,
        "-o",
        "json",
    )
    assert code == 0 and json.loads(out)["feature_names"] == ["w", "kind=cat", "kind=dog"]
    code, out, _ = await run(capsys, "datasets", "versions", "pets", *t)
    assert code == 0 and "one_hot(kind)" in out
    code, out, _ = await run(capsys, "datasets", "list", *t, "-o", "json")
    assert [d["name"] for d in json.loads(out)] == ["ir", "pets"]
    code, _, err = await run(capsys, "datasets", "show", "ghost", *t)
    assert code == 1 and "NOT_FOUND" in err and "'ghost'" in err
    code, out, _ = await run(capsys, "datasets", "delete", "pets", "1", *t)
    assert code == 0 and "deleted pets:1" in out


async def test_missing_value_tokens_stay_numeric_and_drops_are_reported(
    data_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """'NA', 'N/A', 'null', 'NaN' in a numeric column made it a category column;
    they are missing values now, and --drop-invalid says how many rows it dropped."""
    t = ("--target", data_target)
    csv = tmp_path / "m.csv"
    csv.write_text("w,v,y\n1,2.5,0\nNA,3,1\n2,N/A,0\n3,null,1\n4,NaN,0\n5,1,none\n6,?,1\n7,8,0\n")
    code, out, _ = await run(capsys, "datasets", "upload", str(csv), "--label", "y", *t, "-o", "json")
    assert code == 0, out
    uploaded = json.loads(out)
    assert uploaded["num_rows"] == "8" and uploaded["feature_names"] == ["w", "v"]
    code, out, _ = await run(capsys, "datasets", "preprocess", "m", "--drop-invalid", *t)
    assert code == 0
    assert "8 -> 2" in out
    for label, count in ((r"invalid \(NaN/Inf\)", 5), ("missing label", 1), ("duplicates", 0)):
        assert re.search(rf"dropped {label}\s+{count}\s", out), out
    # The tokens are configurable: with only "?" declared, "NA" is text again.
    code, _, _ = await run(
        capsys, "datasets", "upload", str(csv), "--name", "m2", "--label", "y", "--missing", "?", *t
    )
    assert code == 0
    code, _, err = await run(capsys, "datasets", "preprocess", "m2", *t)
    assert code == 1 and "column 'w' is categorical" in err
