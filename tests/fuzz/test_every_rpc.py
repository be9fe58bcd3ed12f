"""Every RPC of every service gets hostile requests built from its request
message's descriptor; each answer must be a status, never an unhandled error,
and the fleet must be healthy afterwards."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator

import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

import common.api
from tests.fuzz.conftest import profile
from tests.fuzz.harness import Fleet, assert_healthy, call, judge, rpc_path
from tests.fuzz.strategies import requests_for

EXAMPLES_PER_RPC = 25


def all_methods() -> Iterator[MethodDescriptor]:
    for info in pkgutil.walk_packages(common.api.__path__, "common.api."):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(info.name)
            for service in module.DESCRIPTOR.services_by_name.values():
                yield from service.methods


METHODS = sorted(all_methods(), key=rpc_path)


def test_the_walk_found_every_service() -> None:
    services = {m.containing_service.full_name for m in METHODS}
    assert len(METHODS) >= 35
    assert len(services) == 6


@pytest.mark.parametrize("method", METHODS, ids=rpc_path)
def test_hostile_requests(fleet: Fleet, method: MethodDescriptor) -> None:
    strategy = requests_for(method.input_type, method.client_streaming, fleet.known)

    @profile(EXAMPLES_PER_RPC)
    @given(requests=strategy)
    def run(requests: list[Message]) -> None:
        answer = call(fleet, method, [r.SerializeToString() for r in requests])
        judge(fleet, method, answer, requests)

    run()
    assert_healthy(fleet)


@pytest.mark.parametrize("method", METHODS, ids=rpc_path)
def test_random_bytes_as_request(fleet: Fleet, method: MethodDescriptor) -> None:
    """Bytes that may not parse as the request message at all."""

    @profile(8)
    @given(payloads=st.lists(st.binary(max_size=64), min_size=1, max_size=3))
    def run(payloads: list[bytes]) -> None:
        judge(fleet, method, call(fleet, method, payloads), payloads)

    run()
