"""Hypothesis strategies for malformed requests, built from the protobuf
descriptors so every field of every request message gets hostile values:
unicode/control/path-traversal strings, boundary and huge integers, NaN/Inf,
unknown enum numbers, random and oversized bytes, and (for client streams)
messages in any order, including none at all."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

# Names and values that have broken services before: traversal, separators, key-ish
# strings, control characters, look-alike numbers, and one field far past any sane size.
HOSTILE_STRINGS = (
    "",
    " ",
    ".",
    "..",
    "../../etc/passwd",
    "/etc/passwd",
    "a/../../b",
    "..\\..\\windows",
    "name\n",
    "name\x00",
    "\x00",
    "\r\n\t\x1b[31m",
    "名前",
    "\U0001f642",
    "e\u0301",
    "a" * 129,
    "x" * 70_000,
    "-1",
    "0",
    "1",
    "99999999999999999999999999",
    "1e9",
    "\u00b2",  # superscript two: str.isdigit() is true, int() refuses it
    "\u0661\u0662",  # Arabic-Indic digits: int() takes them, they are not ASCII
    "\uff11",  # full-width one
    "nan",
    "latest",
    "*",
    "%s%n%x",
    "mf:model:x",
    "name:with:colons",
    "{}",
)
BYTE_BLOBS = (b"", b"\x00", b"\x00" * 4096, b"\xff" * 7, bytes(range(256)))
INT32_EDGES = (0, 1, -1, 2, 7, 1000, 2**31 - 1, -(2**31))
INT64_EDGES = (*INT32_EDGES, 2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1, -(2**63))

_INT32 = (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32)
_INT64 = (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64)
_UINT32 = (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32)
_UINT64 = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)
MAX_DEPTH = 3
MAX_REPEATED = 3


def _message_type(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and _message_type(field).GetOptions().map_entry


def hostile_text(known: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """A third known-good names (so requests get past lookups), a third hostile, a third random."""
    choices = [st.sampled_from(HOSTILE_STRINGS), st.text(max_size=40)]
    if known:
        choices.insert(0, st.sampled_from(tuple(known)))
    return st.one_of(*choices)


def _scalar(field: FieldDescriptor, known: Sequence[str]) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return hostile_text(known)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.sampled_from(BYTE_BLOBS), st.binary(max_size=256))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None, field.full_name
        numbers = tuple(v.number for v in field.enum_type.values)
        undefined = (-1, max(numbers) + 1, 2**31 - 1, -(2**31))
        return st.one_of(st.sampled_from(numbers), st.sampled_from(undefined), st.integers(-3, 1000))
    if kind in _INT32:
        return st.one_of(st.sampled_from(INT32_EDGES), st.integers(-(2**31), 2**31 - 1))
    if kind in _INT64:
        return st.one_of(st.sampled_from(INT64_EDGES), st.integers(-(2**63), 2**63 - 1))
    if kind in _UINT32:
        return st.one_of(st.sampled_from((0, 1, 2**31, 2**32 - 1)), st.integers(0, 2**32 - 1))
    if kind in _UINT64:
        return st.one_of(st.sampled_from((0, 1, 2**40, 2**64 - 1)), st.integers(0, 2**64 - 1))
    raise AssertionError(f"no strategy for field type {kind} of {field.full_name}")


def _value(field: FieldDescriptor, known: Sequence[str], depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(_message_type(field), known, depth + 1)
    return _scalar(field, known)


def _field(field: FieldDescriptor, known: Sequence[str], depth: int) -> st.SearchStrategy[Any] | None:
    """What to put in one field; None leaves it unset (nesting past MAX_DEPTH)."""
    is_message = field.type == FieldDescriptor.TYPE_MESSAGE
    if _is_map(field):
        key_field = _message_type(field).fields_by_name["key"]
        value_field = _message_type(field).fields_by_name["value"]
        if depth >= MAX_DEPTH and value_field.type == FieldDescriptor.TYPE_MESSAGE:
            return None
        return st.dictionaries(
            _scalar(key_field, known), _value(value_field, known, depth), max_size=MAX_REPEATED
        )
    if is_message and depth >= MAX_DEPTH:
        return None
    one = _value(field, known, depth)
    if field.is_repeated:
        return st.lists(one, max_size=MAX_REPEATED)
    return one


def messages(descriptor: Descriptor, known: Sequence[str] = (), depth: int = 0) -> st.SearchStrategy[Message]:
    """Instances of ``descriptor`` with any subset of fields set to hostile values."""
    optional = {}
    for field in descriptor.fields:
        strategy = _field(field, known, depth)
        if strategy is not None:
            optional[field.name] = strategy
    empty = GetMessageClass(descriptor)()
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: _apply(empty, values))


def variants(template: Message, known: Sequence[str] = (), depth: int = 0) -> st.SearchStrategy[Message]:
    """``template`` (a valid request) with one or two fields replaced by hostile
    values, nested messages mutated the same way, so checks past the first are reached."""
    choices: dict[str, st.SearchStrategy[Any]] = {}
    descriptor: Any = template.DESCRIPTOR
    for field in descriptor.fields:
        nested = field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated
        if nested and template.HasField(field.name) and depth < MAX_DEPTH:
            choices[field.name] = variants(getattr(template, field.name), known, depth + 1)
        else:
            strategy = _field(field, known, depth)
            if strategy is not None:
                choices[field.name] = strategy
    picks = st.lists(st.sampled_from(sorted(choices)), min_size=1, max_size=2, unique=True)
    changes = picks.flatmap(lambda names: st.fixed_dictionaries({n: choices[n] for n in names}))
    return changes.map(lambda values: _apply(template, values))


def _apply(base: Message, values: dict[str, Any]) -> Message:
    """A copy of ``base`` with the named fields replaced."""
    message = type(base)()
    message.CopyFrom(base)
    fields: Any = message.DESCRIPTOR.fields_by_name
    for name, value in values.items():
        field: FieldDescriptor = fields[name]
        message.ClearField(name)
        target: Any = getattr(message, name)
        if _is_map(field):
            for key, item in value.items():
                if isinstance(item, Message):
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif field.is_repeated:
            target.extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def requests_for(
    descriptor: Descriptor, client_streaming: bool, known: Sequence[str] = ()
) -> st.SearchStrategy[list[Message]]:
    """One request, or for a client stream 0-4 of them in any order (empty stream,
    chunk before header, two headers, truncated)."""
    one = messages(descriptor, known)
    if client_streaming:
        return st.lists(one, max_size=4)
    return one.map(lambda message: [message])
