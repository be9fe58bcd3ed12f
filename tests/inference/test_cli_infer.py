"""``modelfleet infer`` against a real server, from a .npy file and from JSON."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.artifacts import ArtifactStore
from common.registry import ModelRegistry
from services.cli.main import main
from tests.inference.conftest import register_mlp

pytestmark = pytest.mark.timeout(60)


async def test_infer_command(
    serve, registry: ModelRegistry, store: ArtifactStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, model = register_mlp(registry, store, "m")
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    async with serve() as srv:
        code = await asyncio.to_thread(
            main, ["infer", "m", "--input", str(tmp_path / "x.npy"), "--target", srv.address, "-o", "json"]
        )
        assert code == 0
        result = json.loads(capsys.readouterr().out)
        assert result["version"] == "1"
        np.testing.assert_allclose(np.array(result["outputs"]["output"]), expected, rtol=1e-5, atol=1e-6)

        code = await asyncio.to_thread(
            main, ["infer", "m", "--json", json.dumps(x[0].tolist()), "--target", srv.address]
        )
        assert code == 0
        assert "output" in capsys.readouterr().out

        code = await asyncio.to_thread(
            main, ["infer", "nope", "--json", "[1, 2, 3, 4]", "--target", srv.address]
        )
        assert code == 1
        assert "NOT_FOUND" in capsys.readouterr().err
