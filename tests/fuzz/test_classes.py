"""Classes of bad input tried on every run, not left to hypothesis' luck: every
enum field of every request message set to numbers its enum does not define,
and every string field set to non-ASCII digits and to an overlong value. The
answers must be proper statuses (never INTERNAL/UNKNOWN), an undefined enum is
INVALID_ARGUMENT, and no status message grows with the value it echoes."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from common.grpcserver.interceptor import MAX_MESSAGE_CHARS
from tests.fuzz.conftest import FUZZ_DATASET, FUZZ_MODEL
from tests.fuzz.harness import Fleet, assert_healthy, call, judge, rpc_path
from tests.fuzz.test_every_rpc import METHODS

# Digits str.isdigit() accepts that int() does not, or that are not ASCII.
ODD_DIGITS = ("²", "١٢", "\uff11", "½", "٣")  # \uff11: full-width one
LONG_VALUE = "n" * 20_000
MAX_DEPTH = 2


def _paths(descriptor: Descriptor, kind: int, depth: int = 0) -> Iterator[tuple[FieldDescriptor, ...]]:
    """Paths to singular fields of ``kind``, through singular message fields."""
    for field in descriptor.fields:
        if field.is_repeated:
            if field.type == kind and kind == FieldDescriptor.TYPE_ENUM:
                yield (field,)
            continue
        if field.type == kind:
            yield (field,)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and depth < MAX_DEPTH and field.message_type:
            for rest in _paths(field.message_type, kind, depth + 1):
                yield (field, *rest)


def _base(method: MethodDescriptor) -> Message:
    """A request naming things that exist, so lookups pass and later checks run."""
    message = GetMessageClass(method.input_type)()
    known = FUZZ_DATASET if "Dataset" in method.name or "Batches" in method.name else FUZZ_MODEL
    for name in ("name", "model_name"):
        field = method.input_type.fields_by_name.get(name)
        if field is not None and field.type == FieldDescriptor.TYPE_STRING:
            setattr(message, name, known)
    return message


def _with(method: MethodDescriptor, path: tuple[FieldDescriptor, ...], value: object) -> list[bytes]:
    message = _base(method)
    target = message
    for field in path[:-1]:
        target = getattr(target, field.name)
    last = path[-1]
    if last.is_repeated:
        getattr(target, last.name).append(value)
    else:
        setattr(target, last.name, value)
    return [message.SerializeToString()]


def _name(path: tuple[FieldDescriptor, ...]) -> str:
    return ".".join(f.name for f in path)


def _undefined(field: FieldDescriptor) -> tuple[int, ...]:
    assert field.enum_type is not None
    numbers = [v.number for v in field.enum_type.values]
    return (-1, max(numbers) + 1, 2**31 - 1)


@pytest.mark.parametrize("method", METHODS, ids=rpc_path)
def test_undefined_enum_numbers_are_invalid_argument(fleet: Fleet, method: MethodDescriptor) -> None:
    for path in _paths(method.input_type, FieldDescriptor.TYPE_ENUM):
        for number in _undefined(path[-1]):
            answer = call(fleet, method, _with(method, path, number))
            judge(fleet, method, answer, f"{_name(path)}={number}")
            assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, (_name(path), number, answer)
            assert _name(path).split(".")[-1] in answer.details, answer.details


@pytest.mark.parametrize("method", METHODS, ids=rpc_path)
def test_odd_digits_and_long_strings_get_a_status(fleet: Fleet, method: MethodDescriptor) -> None:
    for path in _paths(method.input_type, FieldDescriptor.TYPE_STRING):
        for value in (*ODD_DIGITS, LONG_VALUE):
            answer = call(fleet, method, _with(method, path, value))
            judge(fleet, method, answer, f"{_name(path)}={value[:20]!r}")
            # An echoed 20,000-character value once made the status itself too big
            # for the client (RESOURCE_EXHAUSTED instead of the real error).
            assert len(answer.details) <= MAX_MESSAGE_CHARS, (_name(path), len(answer.details))
            if answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert "metadata" not in answer.details.lower(), answer.details
    assert_healthy(fleet)
