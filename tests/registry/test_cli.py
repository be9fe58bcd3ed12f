"""``modelfleet models ...`` against a real registry service."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from services.cli.main import main
from tests.registry.helpers import mlp_bytes


async def cli(capsys: pytest.CaptureFixture[str], port: int, *argv: str) -> tuple[int, Any, str]:
    """Run one command in a thread (the CLI is blocking gRPC; the server runs on this loop)."""
    code = await asyncio.to_thread(main, ["models", *argv, "--target", f"127.0.0.1:{port}", "-o", "json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


async def test_upload_promote_canary_rollback(
    registry_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(mlp_bytes())
    for accuracy in ("0.9", "0.5"):
        code, version, _ = await cli(
            capsys,
            registry_port,
            "upload",
            "iris",
            str(weights),
            "--mlp",
            "4,8,3",
            "--metric",
            f"test_accuracy={accuracy}",
        )
        assert code == 0
    assert version["version"] == "2" and version["inputs"][0]["shape"] == ["-1", "4"]

    code, model, _ = await cli(capsys, registry_port, "promote", "iris", "1")
    assert (code, model[0]["aliases"]) == (0, {"production": "1"})
    code, _, err = await cli(capsys, registry_port, "promote", "iris", "2", "--max-drop", "0.1")
    assert code == 1 and "FAILED_PRECONDITION" in err and "0.9" in err and "0.5" in err

    code, model, _ = await cli(capsys, registry_port, "canary", "iris", "2", "--fraction", "0.3")
    assert model[0]["canary"] == {"version": "2", "fraction": 0.3}
    code, model, _ = await cli(capsys, registry_port, "end-canary", "iris", "--promote")
    assert model[0]["aliases"] == {"production": "2"} and "canary" not in model[0]
    code, model, _ = await cli(capsys, registry_port, "rollback", "iris")
    assert model[0]["aliases"] == {"production": "1"}

    code, versions, _ = await cli(capsys, registry_port, "versions", "iris")
    assert [(v["version"], v.get("aliases", [])) for v in versions] == [("2", []), ("1", ["production"])]
    code, models, _ = await cli(capsys, registry_port, "list")
    assert [(m["name"], m["latest_version"]) for m in models] == [("iris", "2")]
    code, deleted, _ = await cli(capsys, registry_port, "delete", "iris", "2")
    assert code == 0 and deleted["deleted_version"] == "2"
    code, _, err = await cli(capsys, registry_port, "show", "nope")
    assert code == 1 and "NOT_FOUND" in err


async def test_bad_flags_are_reported(
    registry_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(mlp_bytes())
    code, _, err = await cli(capsys, registry_port, "upload", "iris", str(weights), "--mlp", "4,x")
    assert code == 2 and "--mlp" in err
    code, _, err = await cli(capsys, registry_port, "upload", "iris", str(weights))  # no architecture
    assert code == 1 and "INVALID_ARGUMENT" in err and "architecture" in err
