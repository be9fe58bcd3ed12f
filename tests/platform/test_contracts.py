"""The public contracts: OIP wire compatibility with a standard client's
descriptors, and the conventions of our own protos."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor

import common.api
from common.api.inference import grpc_predict_v2_pb2 as oip


def _messages(desc: FileDescriptor | Descriptor) -> dict[str, Descriptor]:
    out: dict[str, Descriptor] = {}
    types = desc.message_types_by_name.values() if isinstance(desc, FileDescriptor) else desc.nested_types
    for m in types:
        out[m.full_name] = m
        out.update(_messages(m))
    return out


def _as_proto(file: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


@pytest.fixture(scope="module")
def reference() -> descriptor_pb2.FileDescriptorProto:
    """Triton's client descriptors, read in a child process: both define the
    ``inference`` package, so they cannot share one descriptor pool."""
    code = (
        "import sys, tritonclient.grpc.service_pb2 as t\n"
        "from google.protobuf import descriptor_pb2\n"
        "p = descriptor_pb2.FileDescriptorProto(); t.DESCRIPTOR.CopyToProto(p)\n"
        "sys.stdout.buffer.write(p.SerializeToString())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=60).stdout
    return descriptor_pb2.FileDescriptorProto.FromString(out)


def _flat(
    messages: list[descriptor_pb2.DescriptorProto], prefix: str = ""
) -> dict[str, descriptor_pb2.DescriptorProto]:
    out = {}
    for m in messages:
        out[prefix + m.name] = m
        out.update(_flat(list(m.nested_type), f"{prefix}{m.name}."))
    return out


def test_oip_messages_are_wire_compatible_with_tritonclient(
    reference: descriptor_pb2.FileDescriptorProto,
) -> None:
    ours = _flat(list(_as_proto(oip.DESCRIPTOR).message_type))
    theirs = _flat(list(reference.message_type))
    assert len(ours) >= 30
    for name, message in ours.items():
        assert name in theirs, f"{name} is not an Open Inference Protocol message"
        other = {f.number: f for f in theirs[name].field}
        for field in message.field:
            assert field.number in other, f"{name}.{field.name} has no field #{field.number} in the reference"
            ref = other[field.number]
            assert (field.name, field.type, field.label, field.type_name) == (
                ref.name,
                ref.type,
                ref.label,
                ref.type_name,
            ), f"{name}.{field.name}"


def test_oip_service_methods_match_reference(reference: descriptor_pb2.FileDescriptorProto) -> None:
    assert oip.DESCRIPTOR.package == "inference"
    ours = next(s for s in _as_proto(oip.DESCRIPTOR).service if s.name == "GRPCInferenceService")
    theirs = next(s for s in reference.service if s.name == "GRPCInferenceService")
    methods = {m.name: m for m in theirs.method}
    for method in ours.method:
        ref = methods[method.name]
        assert (method.input_type, method.output_type) == (ref.input_type, ref.output_type), method.name
        assert (method.client_streaming, method.server_streaming) == (
            ref.client_streaming,
            ref.server_streaming,
        )


def _our_files() -> list[FileDescriptor]:
    files = []
    for info in pkgutil.walk_packages(common.api.__path__, "common.api."):
        if info.name.endswith("_pb2") and ".modelfleet." in info.name:
            files.append(importlib.import_module(info.name).DESCRIPTOR)
    return files


def _enums(file: FileDescriptor) -> list[EnumDescriptor]:
    enums = list(file.enum_types_by_name.values())
    for message in _messages(file).values():
        enums.extend(message.enum_types)
    return enums


@pytest.mark.parametrize("file", _our_files(), ids=lambda f: f.name)
def test_modelfleet_protos_follow_conventions(file: FileDescriptor) -> None:
    assert file.package.startswith("modelfleet.") and file.package.endswith(".v1"), file.package
    for enum in _enums(file):
        zero = enum.values_by_number[0]
        assert zero.name.endswith("_UNSPECIFIED"), f"{enum.full_name}: value 0 must be *_UNSPECIFIED"
    for service in file.services_by_name.values():
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request", method.full_name
            assert method.output_type.name == f"{method.name}Response", method.full_name
