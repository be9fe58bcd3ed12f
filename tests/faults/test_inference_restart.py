"""Rolling restart of two real inference replicas (SIGTERM one, restart it, then
the other) under a steady load from one client that round-robins over both and
moves a call to the other replica on UNAVAILABLE: zero failed requests.

The client also moves calls answered CANCELLED (it never cancels its own): gRPC
core ends calls that reached a shutting-down server before a handler took them
with CANCELLED instead of UNAVAILABLE (grpc/grpc#41785; one call in 2 of our
first 8 runs), although the server never started them."""

from __future__ import annotations

import itertools
import signal
import subprocess
import threading
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import redis
import torch

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from common.artifacts import ArtifactStore
from common.registry import ModelRegistry
from common.settings import Settings
from tests.faults.conftest import Fleet, free_port, wait_until
from tests.inference.conftest import register_mlp

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MODEL = "rolling"
LOAD_THREADS = 2
WAIT_S = 60.0
# A call is tried on at most this many replicas (alternating) before it counts as failed.
MAX_TRIES = 40
RETRY_PAUSE_S = 0.05
# What a replica going away answers; inference is idempotent, so both are safe to retry.
MOVE_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
# Reconnect quickly to a replica that comes back (gRPC's default backoff grows to minutes).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


@dataclass
class Tally:
    sent: int = 0
    failed: int = 0
    retried: int = 0
    cancelled_by_shutdown: int = 0
    wrong: int = 0
    served: list[int] = field(default_factory=lambda: [0, 0])  # answers per replica
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FailoverClient:
    """Round-robin over replicas; an answer in MOVE_ON moves the call to the next one."""

    def __init__(self, targets: list[str]) -> None:
        self.channels = [grpc.insecure_channel(t, options=CHANNEL_OPTIONS) for t in targets]
        self.stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in self.channels]
        self._next = itertools.count()

    def infer(self, request: pb.ModelInferRequest, tally: Tally) -> pb.ModelInferResponse:
        start = next(self._next)
        last: grpc.RpcError | None = None
        for attempt in range(MAX_TRIES):
            target = (start + attempt) % len(self.stubs)
            try:
                response: pb.ModelInferResponse = self.stubs[target].ModelInfer(request, timeout=10)
            except grpc.RpcError as exc:
                if exc.code() not in MOVE_ON:
                    raise
                last = exc
                with tally.lock:
                    tally.retried += 1
                    tally.cancelled_by_shutdown += exc.code() == grpc.StatusCode.CANCELLED
                if attempt % len(self.stubs) == len(self.stubs) - 1:
                    threading.Event().wait(RETRY_PAUSE_S)  # every replica refused: back off
                continue
            with tally.lock:
                tally.served[target] += 1
            return response
        assert last is not None
        raise last

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def ready(stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
    try:
        answer: pb.ModelReadyResponse = stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=2)
    except grpc.RpcError:
        return False
    return answer.ready


def request_for(x: np.ndarray) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return pb.ModelInferRequest(model_name=MODEL, inputs=[tensor])


def load(
    client: FailoverClient, model: torch.nn.Module, tally: Tally, stop: threading.Event, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        x = rng.normal(size=(2, 4)).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        with tally.lock:
            tally.sent += 1
        try:
            response = client.infer(request_for(x), tally)
        except grpc.RpcError as exc:
            with tally.lock:
                tally.failed += 1
                tally.errors.append(f"{exc.code()}: {exc.details()}")
            continue
        got = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(expected.shape)
        if not np.allclose(got, expected, atol=1e-5):
            with tally.lock:
                tally.wrong += 1


def more_load(tally: Tally, what: str, requests: int = 20) -> None:
    """Wait until the load loop has sent ``requests`` more calls."""
    target = tally.sent + requests
    wait_until(lambda: tally.sent >= target, WAIT_S, what)


def test_rolling_restart_of_two_replicas_under_load_fails_no_request(
    fleet: Fleet, fault_settings: Settings, redis_client: redis.Redis
) -> None:
    registry = ModelRegistry(redis_client, fault_settings.redis_prefix)
    _, model = register_mlp(registry, ArtifactStore(fault_settings.artifact_root), MODEL)
    replicas = [
        fault_settings.replace(
            inference_port=free_port(), metrics_port=free_port(), inference_models=(MODEL,)
        )
        for _ in range(2)
    ]
    procs: list[subprocess.Popen[bytes]] = [fleet.start("serve", "inference", settings=s) for s in replicas]
    client = FailoverClient([f"127.0.0.1:{s.inference_port}" for s in replicas])
    tally, stop = Tally(), threading.Event()
    threads = [
        threading.Thread(target=load, args=(client, model, tally, stop, seed)) for seed in range(LOAD_THREADS)
    ]
    try:
        for stub in client.stubs:
            wait_until(lambda: ready(stub), WAIT_S, "a replica to serve the model")  # noqa: B023
        for thread in threads:
            thread.start()
        more_load(tally, "load to flow")
        exits = []
        for n, settings in enumerate(replicas):
            procs[n].send_signal(signal.SIGTERM)
            exits.append(procs[n].wait(timeout=WAIT_S))
            more_load(tally, "load to flow to the other replica")
            procs[n] = fleet.start("serve", "inference", settings=settings)
            # Through the load client's own channel, so it is back in the rotation.
            wait_until(lambda: ready(client.stubs[n]), WAIT_S, "the restarted replica")  # noqa: B023
        more_load(tally, "load after the restarts")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        client.close()
    print(
        f"\n[inference rolling restart] replicas=2 load threads={LOAD_THREADS} requests sent={tally.sent} "
        f"failed={tally.failed} wrong answers={tally.wrong} moved to the other replica={tally.retried} "
        f"(of which CANCELLED by a shutting-down server={tally.cancelled_by_shutdown}) "
        f"answered per replica={tally.served} replica exit codes={exits}"
    )
    assert tally.failed == 0, tally.errors[:5]
    assert tally.wrong == 0
    assert exits == [0, 0]  # each drained and exited cleanly on SIGTERM
