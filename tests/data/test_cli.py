"""``modelfleet datasets`` against a real server (the CLI is synchronous, so it
runs in a thread while the server serves on the test's event loop)."""

from __future__ import annotations

import asyncio
import json
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
