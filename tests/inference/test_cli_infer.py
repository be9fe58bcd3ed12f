"""``modelfleet infer`` against a real server, from a .npy file and from JSON."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
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


async def test_infer_names_the_predicted_class_and_refuses_bad_json(
    serve, registry: ModelRegistry, store: ArtifactStore, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["setosa", "versicolor", "virginica"]
    _, model = register_mlp(registry, store, "iris", class_names=names)
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    with torch.no_grad():
        expected = [names[i] for i in model(torch.from_numpy(x)).argmax(dim=1).tolist()]
    async with serve() as srv:
        args = ["infer", "iris", "--json", json.dumps(x.tolist()), "--target", srv.address]
        assert await asyncio.to_thread(main, [*args, "-o", "json"]) == 0
        assert json.loads(capsys.readouterr().out)["predicted"] == expected
        assert await asyncio.to_thread(main, args) == 0
        assert f"predicted: {', '.join(expected)}" in capsys.readouterr().out
        for bad in ('[["a", "b", "c", "d"]]', "[[1, 2], [3]]", "{", '{"x": 1}', "[" * 100_000):
            code = await asyncio.to_thread(main, ["infer", "iris", "--json", bad, "--target", srv.address])
            captured = capsys.readouterr()
            assert code == 2 and "--json" in captured.err and "Traceback" not in captured.err, captured.err


def test_infer_encodes_without_importing_torch() -> None:
    probe = (
        "import sys, numpy as np; from services.cli import infer; "
        "infer._encode(np.ones((1, 4)), 'FP32'); infer._decode(b'\\0' * 8, 'FP32', (1, 2)); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
