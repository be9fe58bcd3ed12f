"""Job files for ``modelfleet submit``: YAML in, validated submit requests out.

A file holds one job (a mapping) or several (a list, or several ``---``
documents). A job's keys are the JSON field names of ``TrainingSpec`` or
``CompressionSpec`` (``dataset_name`` or ``datasetName``), plus ``kind``
(``training`` | ``compression``) and the optional ``request_id``, ``priority``
(``low`` | ``normal`` | ``high``) and ``max_attempts``.

Everything checkable without the servers is checked here, so that a typo is
reported as ``FILE:LINE: message`` before anything is queued: YAML syntax,
the protobuf JSON mapping (``json_format`` errors carry a field path, which we
map back to the YAML node it came from) and the services' own static spec
checks (their messages start with the field path too).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from common.api.modelfleet.compression.v1 import compression_pb2
from common.api.modelfleet.compression.v1 import compression_spec_pb2 as cspec
from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.training.v1 import training_pb2
from common.api.modelfleet.training.v1 import training_spec_pb2 as tspec
from common.errors import InvalidArgument

KINDS = ("training", "compression")
PRIORITIES = {
    "low": jobs_pb2.PRIORITY_LOW,
    "normal": jobs_pb2.PRIORITY_NORMAL,
    "high": jobs_pb2.PRIORITY_HIGH,
}

SubmitRequest = training_pb2.SubmitTrainingJobRequest | compression_pb2.SubmitCompressionJobRequest
# A path into a job: mapping keys (snake_case) and list indexes.
Path_ = tuple[str | int, ...]


class JobFileInvalid(InvalidArgument):
    """A job file failed validation; ``errors`` holds one ``FILE:LINE: message`` per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Job:
    kind: str
    request: SubmitRequest
    line: int


@dataclass(frozen=True)
class _Node:
    """One job as Python values, with the line (1-based) of every path in it."""

    value: Any
    lines: dict[Path_, int]
    line: int


class _Problem(Exception):
    """A problem at ``path`` within a job, or at an absolute ``line`` of the file."""

    def __init__(self, path: Path_, message: str, line: int = 0) -> None:
        super().__init__(message)
        self.path = path
        self.message = message
        self.line = line


def load(path: Path) -> list[Job]:
    """Parse and validate every job in ``path``; raises :class:`JobFileInvalid` listing all problems."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read job file {path}: {exc}") from None
    return parse(text, str(path))


def parse(text: str, name: str) -> list[Job]:
    try:
        nodes = list(_job_nodes(text))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise JobFileInvalid([f"{name}:{line}: invalid YAML: {exc.problem or exc.context}"]) from None
    except _Problem as exc:
        raise JobFileInvalid([f"{name}:{exc.line or 1}: {exc.message}"]) from None
    if not nodes:
        raise JobFileInvalid([f"{name}:1: the file holds no job"])
    jobs, errors = [], []
    for node in nodes:
        try:
            jobs.append(_job(node))
        except _Problem as exc:
            errors.append(f"{name}:{_line_of(node, exc.path)}: {exc.message}")
    if errors:
        raise JobFileInvalid(errors)
    return jobs


# --- YAML with line numbers


def _job_nodes(text: str) -> Iterator[_Node]:
    """Each job of each document; a document is one job (mapping) or a list of them."""
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            root = loader.get_node()
            # The constructor resolves scalars exactly like yaml.safe_load; the
            # node walk beside it only records where each value came from.
            data = loader.construct_document(root)
            if isinstance(root, yaml.SequenceNode):
                for item_node, item in zip(root.value, data, strict=True):
                    yield _located(item_node, item)
            elif root is not None:
                yield _located(root, data)
    finally:
        loader.dispose()


def _located(node: yaml.Node, value: Any) -> _Node:
    lines: dict[Path_, int] = {}
    _record_lines(node, (), lines)
    return _Node(_snake_keys(value), lines, node.start_mark.line + 1)


def _record_lines(node: yaml.Node, path: Path_, lines: dict[Path_, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = _snake(str(key_node.value))
            if key in seen:
                raise _Problem(path, f"key {key_node.value!r} repeats", key_node.start_mark.line + 1)
            seen.add(key)
            # A value is reported at its key's line: that is where a reader looks.
            lines[(*path, key)] = key_node.start_mark.line + 1
            _record_lines(value_node, (*path, key), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, (*path, index), lines)


def _snake(key: str) -> str:
    """``learningRate`` -> ``learning_rate`` (protobuf's JSON name back to the field name)."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


def _snake_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {_snake(str(k)): _snake_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_snake_keys(v) for v in value]
    return value


def _line_of(node: _Node, path: Path_) -> int:
    """The line of ``path``, or of its deepest ancestor present in the file."""
    for end in range(len(path), 0, -1):
        if path[:end] in node.lines:
            return node.lines[path[:end]]
    return node.line


def _resolve(node: _Node, hints: list[str | int]) -> list[str | int]:
    """Follow field names and indexes through the job; a name not directly
    below the current path is looked for deeper (json_format skips oneof
    levels such as ``architecture.mlp`` in its messages). Hints not found in
    the file are kept at the end, so the result still names the whole field."""
    path: Path_ = ()
    for used, hint in enumerate(hints):
        direct = (*path, hint)
        if direct in node.lines:
            path = direct
            continue
        deeper = [p for p in node.lines if p[: len(path)] == path and len(p) > len(path) and p[-1] == hint]
        if not deeper:
            return [*path, *hints[used:]]
        path = min(deeper, key=lambda p: (len(p), node.lines[p]))
    return list(path)


def _dotted(path: list[str | int]) -> str:
    """``["steps", 1, "finetune"]`` -> ``steps[1].finetune``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


# --- validation


def _job(node: _Node) -> Job:
    if not isinstance(node.value, dict):
        raise _Problem((), f"a job must be a mapping of fields, not {type(node.value).__name__}")
    fields = dict(node.value)
    kind = fields.pop("kind", None)
    if kind is None:
        raise _Problem((), "kind is required: training or compression")
    if kind not in KINDS:
        raise _Problem(("kind",), f"kind must be training or compression, not {kind!r}")
    request_id = fields.pop("request_id", "")
    if not isinstance(request_id, str | int) or isinstance(request_id, bool):
        raise _Problem(("request_id",), "request_id must be a string")
    priority = _priority(fields.pop("priority", "normal"))
    max_attempts = fields.pop("max_attempts", 0)
    if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 0:
        raise _Problem(("max_attempts",), f"max_attempts must be an integer >= 0, not {max_attempts!r}")
    if kind == "training":
        tspec_ = _spec(node, fields, tspec.TrainingSpec())
        _check_training(node, tspec_)
        return Job(
            kind,
            training_pb2.SubmitTrainingJobRequest(
                spec=tspec_, request_id=str(request_id), priority=priority, max_attempts=max_attempts
            ),
            node.line,
        )
    cspec_ = _spec(node, fields, cspec.CompressionSpec())
    _check_compression(node, cspec_)
    return Job(
        kind,
        compression_pb2.SubmitCompressionJobRequest(
            spec=cspec_, request_id=str(request_id), priority=priority, max_attempts=max_attempts
        ),
        node.line,
    )


def _priority(value: Any) -> jobs_pb2.Priority.ValueType:
    name = str(value).lower().removeprefix("priority_")
    if name not in PRIORITIES:
        raise _Problem(("priority",), f"priority must be low, normal or high, not {value!r}")
    return PRIORITIES[name]


# `at "TrainingSpec.steps[1].quantization"` or `at TrainingSpec.task`.
_AT = re.compile(r' at "?[A-Za-z0-9_]+((?:\.[A-Za-z0-9_]+|\[\d+\])*)"?')
_UNKNOWN = re.compile(r'has no field named "([^"]+)"')
_PARSING = re.compile(r"Failed to parse (\w+) field")
_PATH_PARTS = re.compile(r"\.?([A-Za-z0-9_]+)|\[(\d+)\]")


def _spec(node: _Node, fields: dict[str, Any], message: Any) -> Any:
    try:
        json_format.ParseDict(fields, message)
    except json_format.ParseError as exc:
        text = str(exc)
        path = _resolve(node, _error_path(text))
        raise _Problem(tuple(path), f"{_dotted(path) or 'spec'}: {_reason(text)}") from None
    return message


def _reason(text: str) -> str:
    """The innermost reason of a json_format error, without the path it repeats."""
    unknown = _UNKNOWN.search(text)
    if unknown:
        known = re.search(r"Available Fields\(except extensions\): \"\[(.*)\]\"", text)
        names = ", ".join(_snake(n.strip(" '")) for n in known.group(1).split(",")) if known else ""
        return "unknown field" + (f" (known: {names})" if names else "")
    # "Failed to parse a field: Failed to parse b field: <reason> at X.a.b."
    reason = re.sub(r"^(Failed to parse \w+ field: )+", "", text.split("\n")[0])
    return _AT.sub("", reason).rstrip(".")


def _error_path(text: str) -> list[str | int]:
    """The field path a json_format error names: its ``at X.a[0].b`` part when
    present, else the chain of ``Failed to parse <field> field``."""
    at = _AT.search(text)
    hints: list[str | int]
    if at and at.group(1):
        hints = [int(i) if i else n for n, i in _PATH_PARTS.findall(at.group(1))]
    else:
        hints = list(_PARSING.findall(text))
    unknown = _UNKNOWN.search(text)
    if unknown:
        hints.append(_snake(unknown.group(1)))
    return hints


def _domain_path(message: str) -> list[str | int]:
    """The field path a service validation message starts with (``spec.epochs must ...``)."""
    first = message.split(" ", 1)[0].rstrip(":").removeprefix("spec.")
    return [int(i) if i else n for n, i in _PATH_PARTS.findall(first)]


def _check_training(node: _Node, spec: tspec.TrainingSpec) -> None:
    # Imported here: it pulls in torch (for the MLP checks), which listing commands do not need.
    from services.training.spec import normalize_spec

    try:
        normalize_spec(spec)
    except InvalidArgument as exc:
        path = tuple(_resolve(node, _domain_path(exc.message)))
        raise _Problem(path, exc.message.removeprefix("spec.")) from None


def _check_compression(node: _Node, spec: cspec.CompressionSpec) -> None:
    from services.compression.spec import validate_fields

    try:
        validate_fields(spec)
    except InvalidArgument as exc:
        raise _Problem(tuple(_resolve(node, _domain_path(exc.message))), exc.message) from None
