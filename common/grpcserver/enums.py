"""Undefined enum numbers in requests.

proto3 enums are open: a message that parses may carry a number its enum does
not define (``format = -1``), and code that later maps the number to a name or a
table raises deep inside a handler. The interceptor checks every request once,
at the door, so no handler ever sees such a value.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from common.errors import InvalidArgument

# Descriptor full name -> whether the message can hold an enum anywhere below it.
_HAS_ENUM: dict[str, bool] = {}


def _has_enum(descriptor: Any, visiting: frozenset[str] = frozenset()) -> bool:
    known = _HAS_ENUM.get(descriptor.full_name)
    if known is not None:
        return known
    visiting = visiting | {descriptor.full_name}
    found = False
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_ENUM:
            found = True
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            nested = field.message_type
            # A cycle adds nothing the rest of the walk does not find.
            found = nested.full_name not in visiting and _has_enum(nested, visiting)
        if found:
            break
    if not visiting - {descriptor.full_name}:
        _HAS_ENUM[descriptor.full_name] = found  # only top-level answers are complete
    return found


def check_enums(message: Message, where: str = "") -> None:
    """InvalidArgument naming the first field whose enum number is undefined."""
    if not _has_enum(message.DESCRIPTOR):
        return
    for field, value in message.ListFields():
        path = f"{where}{field.name}"
        if field.type == FieldDescriptor.TYPE_ENUM:
            enum = field.enum_type
            assert enum is not None
            for number in value if _is_repeated(field) else (value,):
                if number not in enum.values_by_number:
                    names = ", ".join(v.name for v in enum.values if v.number != 0)
                    raise InvalidArgument(f"{path} = {number} is not a defined value (use one of: {names})")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                _check_map(value_field, value, path)
            elif _is_repeated(field):
                for i, item in enumerate(value):
                    check_enums(item, f"{path}[{i}].")
            else:
                check_enums(value, f"{path}.")


def _check_map(value_field: FieldDescriptor, mapping: object, path: str) -> None:
    items = mapping.items()  # type: ignore[attr-defined]
    if value_field.type == FieldDescriptor.TYPE_MESSAGE:
        for key, item in items:
            check_enums(item, f"{path}[{key!r}].")
    elif value_field.type == FieldDescriptor.TYPE_ENUM:
        enum = value_field.enum_type
        assert enum is not None
        for key, number in items:
            if number not in enum.values_by_number:
                raise InvalidArgument(f"{path}[{key!r}] = {number} is not a defined value")


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)
