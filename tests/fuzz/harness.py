"""The fuzz fleet (all services in one subprocess), raw calls to any RPC, and
the verdict on each answer: a status that is never UNKNOWN or INTERNAL (an
unhandled exception), a live process, bounded RSS, health SERVING."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.api.inference import grpc_predict_v2_pb2 as oip

CALL_TIMEOUT_S = 20.0
START_TIMEOUT_S = 120.0
# Server RSS may grow this much over its warm baseline during the whole fuzz run.
RSS_BOUND_MIB = 256
# What the servers answer when a handler raised something that is not a common.errors
# exception (the interceptor's INTERNAL, and ModelStreamInfer's in-stream equivalent).
INTERNAL_MESSAGE = "internal error; see server logs"
BAD_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED})
STREAM_READ = 3
# Streams that legitimately wait for events (a live job's next change): a deadline
# there is the expected end of the watch, not a hang.
WAITING_STREAMS = {"WatchJob": 2.0}

# Inputs tried and status codes seen, per RPC path, for the terminal summary.
TRIED: Counter[str] = Counter()
CODES: dict[str, Counter[str]] = {}
# Server RSS in MiB: the warm baseline and the value at teardown.
RSS_MIB: dict[str, float] = {}


def rpc_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    responses: list[bytes] = field(default_factory=list)


@dataclass
class Fleet:
    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    log_path: Path
    keep_model: str
    known: tuple[str, ...] = ()
    baseline_rss: int = 0
    channels: dict[int, grpc.Channel] = field(default_factory=dict)

    def channel(self, service: str) -> grpc.Channel:
        port = self.ports[service]
        if port not in self.channels:
            self.channels[port] = grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
            )
        return self.channels[port]

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS for the server process")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


def start_fleet(env: dict[str, str], log_path: Path, keep_model: str) -> Fleet:
    """Start ``tests.fuzz.server_main`` and wait (bounded) for its port line."""
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fuzz.server_main"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=log,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert process.stdout is not None
    line = _read_line(process, START_TIMEOUT_S)
    if not line:
        process.kill()
        raise AssertionError(f"fuzz server did not start:\n{log_path.read_text(errors='replace')[-4000:]}")
    return Fleet(process, {k: int(v) for k, v in json.loads(line).items()}, log_path, keep_model)


def _read_line(process: subprocess.Popen[bytes], timeout_s: float) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            return ""
    return process.stdout.readline().decode()


def call(fleet: Fleet, method: MethodDescriptor, requests: Sequence[bytes]) -> Answer:
    """Send serialized requests to one RPC; read at most STREAM_READ responses of a stream."""
    channel = fleet.channel(method.containing_service.full_name)
    path = rpc_path(method)
    timeout = WAITING_STREAMS.get(method.name, CALL_TIMEOUT_S)
    got: list[bytes] = []
    try:
        if method.client_streaming and method.server_streaming:
            stream = channel.stream_stream(path)(iter(requests), timeout=timeout)
            got = _take(stream)
        elif method.client_streaming:
            got = [channel.stream_unary(path)(iter(requests), timeout=timeout)]
        elif method.server_streaming:
            got = _take(channel.unary_stream(path)(requests[0], timeout=timeout))
        else:
            got = [channel.unary_unary(path)(requests[0], timeout=timeout)]
    except grpc.RpcError as exc:
        return Answer(exc.code(), exc.details() or "", got)
    return Answer(grpc.StatusCode.OK, "", got)


def _take(stream: Any) -> list[bytes]:
    got: list[bytes] = []
    for item in stream:
        got.append(item)
        if len(got) >= STREAM_READ:
            stream.cancel()
            break
    return got


def judge(fleet: Fleet, method: MethodDescriptor, answer: Answer, what: object) -> None:
    """Record the answer; fail on an unhandled error, a hang, or a dead server."""
    path = rpc_path(method)
    TRIED[path] += 1
    CODES.setdefault(path, Counter())[answer.code.name] += 1
    problem = ""
    waited = answer.code == grpc.StatusCode.DEADLINE_EXCEEDED and method.name in WAITING_STREAMS
    if answer.code in BAD_CODES and not waited:
        problem = f"{answer.code.name}: {answer.details}"
    elif method.name == "ModelStreamInfer":
        for raw in answer.responses:
            if oip.ModelStreamInferResponse.FromString(raw).error_message == INTERNAL_MESSAGE:
                problem = f"in-stream {INTERNAL_MESSAGE!r}"
    if fleet.process.poll() is not None:
        problem = f"server exited with {fleet.process.returncode}"
    assert not problem, f"{path} <- {what!r}\n{problem}\nserver log:\n{fleet.log_tail()}"


def assert_healthy(fleet: Fleet) -> None:
    """Every service SERVING, a valid inference answered, RSS within the bound."""
    assert fleet.process.poll() is None, f"server exited:\n{fleet.log_tail()}"
    for service in fleet.ports:
        health = health_pb2_grpc.HealthStub(fleet.channel(service))
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    infer_ok(fleet)
    growth = fleet.rss_bytes() - fleet.baseline_rss
    assert growth < RSS_BOUND_MIB * 1024 * 1024, f"server RSS grew {growth / 2**20:.0f} MiB"


def valid_infer(model: str) -> oip.ModelInferRequest:
    tensor = oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[2, 4])
    return oip.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[bytes(2 * 4 * 4)])


def infer_ok(fleet: Fleet) -> None:
    channel = fleet.channel("inference.GRPCInferenceService")
    raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(
        valid_infer(fleet.keep_model).SerializeToString(), timeout=CALL_TIMEOUT_S
    )
    reply = oip.ModelInferResponse.FromString(raw)
    assert reply.outputs[0].shape == [2, 3]
