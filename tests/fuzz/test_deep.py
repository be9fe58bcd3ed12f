"""Hostile values one or two fields at a time inside otherwise valid requests
(so checks past the first one are reached), hostile tensors for ModelInfer,
and upload streams in every order: empty, chunk before header, two headers,
truncated or garbage bodies."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import grpc
import pytest
import safetensors.torch
import torch
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from common.api.inference import grpc_predict_v2_pb2 as oip
from common.api.modelfleet.compression.v1 import compression_pb2
from common.api.modelfleet.compression.v1 import compression_spec_pb2 as cs
from common.api.modelfleet.data.v1 import data_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.api.modelfleet.training.v1 import training_pb2, training_spec_pb2
from common.models.mlp import build_model
from services.inference.codec import DTYPES
from tests.fuzz.conftest import FUZZ_DATASET, FUZZ_MODEL, profile
from tests.fuzz.harness import Fleet, assert_healthy, call, judge, valid_infer
from tests.fuzz.strategies import BYTE_BLOBS, INT64_EDGES, hostile_text, variants
from tests.inference.conftest import mlp_arch

EXAMPLES = 30


def _method(path: str) -> MethodDescriptor:
    service, name = path.strip("/").split("/")
    for module in (oip, data_pb2, registry_pb2, training_pb2, compression_pb2):
        found = module.DESCRIPTOR.services_by_name.get(service.rsplit(".", 1)[1])
        if found is not None and found.full_name == service:
            return found.methods_by_name[name]
    raise KeyError(path)


# Valid requests against the seeded objects (fuzz-mlp: 4 inputs, 3 outputs; fuzz-iris: 4 features, 3 classes).
TEMPLATES: dict[str, Callable[[Fleet], Message]] = {
    "/modelfleet.training.v1.TrainingService/SubmitTrainingJob": lambda f: (
        training_pb2.SubmitTrainingJobRequest(
            spec=training_spec_pb2.TrainingSpec(
                dataset_name=FUZZ_DATASET,
                model_name="fuzz-trained",
                epochs=1,
                batch_size=8,
                learning_rate=0.01,
            )
        )
    ),
    "/modelfleet.compression.v1.CompressionService/SubmitCompressionJob": lambda f: (
        compression_pb2.SubmitCompressionJobRequest(
            spec=cs.CompressionSpec(
                source_model=FUZZ_MODEL,
                dataset_name=FUZZ_DATASET,
                steps=[
                    cs.CompressionStep(magnitude_pruning=cs.MagnitudePruning(sparsity=0.5)),
                    cs.CompressionStep(finetune=cs.Finetune(epochs=1, learning_rate=0.01, batch_size=8)),
                    cs.CompressionStep(
                        quantization=cs.Quantization(method=cs.QUANTIZATION_METHOD_INT8_DYNAMIC)
                    ),
                ],
            )
        )
    ),
    "/modelfleet.data.v1.DataService/PreprocessDataset": lambda f: data_pb2.PreprocessDatasetRequest(
        name=FUZZ_DATASET,
        version="1",
        target_name="fuzz-iris-pp",
        cleaning=data_pb2.Cleaning(drop_invalid=True, dedupe=True),
        split=data_pb2.SplitSpec(val_fraction=0.2, test_fraction=0.1, seed=1),
    ),
    "/modelfleet.data.v1.DataService/StreamBatches": lambda f: data_pb2.StreamBatchesRequest(
        name=FUZZ_DATASET, version="1", batch_size=16, shuffle=True, seed=3
    ),
    "/modelfleet.registry.v1.ModelRegistryService/SetAlias": lambda f: registry_pb2.SetAliasRequest(
        name=FUZZ_MODEL, alias="production", version="1"
    ),
    "/modelfleet.registry.v1.ModelRegistryService/SetCanary": lambda f: registry_pb2.SetCanaryRequest(
        name=FUZZ_MODEL, version="1", fraction=0.1
    ),
    "/modelfleet.registry.v1.ModelRegistryService/ListModelVersions": lambda f: (
        registry_pb2.ListModelVersionsRequest(name=FUZZ_MODEL, page_size=2)
    ),
    "/inference.GRPCInferenceService/ModelInfer": lambda f: valid_infer(f.keep_model),
}


@pytest.mark.parametrize("path", sorted(TEMPLATES))
def test_hostile_fields_in_valid_requests(fleet: Fleet, path: str) -> None:
    rpc = _method(path)
    template = TEMPLATES[path](fleet)

    @profile(EXAMPLES)
    @given(request=variants(template, fleet.known))
    def run(request: Message) -> None:
        judge(fleet, rpc, call(fleet, rpc, [request.SerializeToString()]), request)

    run()
    assert_healthy(fleet)


DATATYPES = (*DTYPES, "BYTES", "UINT16", "UINT64", "fp32", "FP32 ", "")
DIMS = st.one_of(
    st.sampled_from((-1, 0, 1, 2, 4, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63))), st.integers(-3, 9)
)
SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, 3.4e38, -0.0, 1e-45)


@st.composite
def infer_requests(draw: st.DrawFn, model: str) -> oip.ModelInferRequest:
    """A request for ``model`` whose tensors have hostile names, datatypes, shapes
    and contents: raw bytes of the right, wrong or random length, typed values
    with NaN/Inf and out-of-range integers, or raw and typed mixed."""
    request = oip.ModelInferRequest(model_name=model, id=draw(hostile_text()))
    raws: list[bytes] = []
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.one_of(st.just("input"), hostile_text()))
        datatype = draw(st.one_of(st.sampled_from(DATATYPES), st.text(max_size=6)))
        shape = draw(st.lists(DIMS, max_size=4))
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        count = math.prod(shape) if shape and all(d >= 0 for d in shape) else 1
        itemsize = DTYPES[datatype].numpy.itemsize if datatype in DTYPES else 4
        mode = draw(st.sampled_from(("raw-exact", "raw-other", "typed", "both")))
        if mode in ("raw-exact", "both"):
            length = count * itemsize if count * itemsize <= 1 << 16 else draw(st.integers(0, 64))
            fill = draw(st.sampled_from(SPECIAL_FLOATS))
            raws.append(torch.full((length // 4 + 1,), fill).numpy().tobytes()[:length])
        if mode == "raw-other":
            raws.append(draw(st.one_of(st.sampled_from(BYTE_BLOBS), st.binary(max_size=100))))
        if mode in ("typed", "both"):
            floats = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(width=32))
            tensor.contents.fp32_contents.extend(draw(st.lists(floats, max_size=12)))
            tensor.contents.int_contents.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4)))
            tensor.contents.int64_contents.extend(draw(st.lists(st.sampled_from(INT64_EDGES), max_size=4)))
    if draw(st.booleans()):
        request.raw_input_contents.extend(raws)
    for name in draw(st.lists(st.one_of(st.just("output"), hostile_text()), max_size=2)):
        request.outputs.add(name=name)
    return request


def test_hostile_tensors(fleet: Fleet) -> None:
    infer = _method("/inference.GRPCInferenceService/ModelInfer")
    stream = _method("/inference.GRPCInferenceService/ModelStreamInfer")

    @profile(150)
    @given(request=infer_requests(fleet.keep_model))
    def run(request: oip.ModelInferRequest) -> None:
        body = request.SerializeToString()
        judge(fleet, infer, call(fleet, infer, [body]), request)
        judge(fleet, stream, call(fleet, stream, [body, body]), request)

    run()
    assert_healthy(fleet)


def _safetensors_body() -> bytes:
    torch.manual_seed(0)
    return safetensors.torch.save(build_model(mlp_arch()).state_dict())


def _upload_parts(
    header: Message, body: bytes, cls: Callable[..., Message]
) -> st.SearchStrategy[list[Message]]:
    """Header variants and body pieces (whole, truncated, garbage) in any order;
    ``cls`` is the stream's request message class."""
    headers = st.one_of(st.just(header), variants(header))
    bodies = st.one_of(
        st.just(body),
        st.integers(0, len(body)).map(lambda n: body[:n]),
        st.binary(max_size=512),
    )
    header_part = headers.map(lambda h: cls(header=h))
    chunk_parts = bodies.flatmap(
        lambda b: st.integers(1, 4).map(
            lambda k: [cls(chunk=b[i::k]) for i in range(k)] if b else [cls(chunk=b)]
        )
    )
    pieces = st.tuples(st.lists(header_part, max_size=2), chunk_parts)
    return pieces.flatmap(lambda hc: st.permutations([*hc[0], *hc[1]]))


UPLOADS: dict[str, Callable[[], st.SearchStrategy[list[Message]]]] = {
    "/modelfleet.registry.v1.ModelRegistryService/UploadModel": lambda: _upload_parts(
        registry_pb2.UploadModelHeader(
            name="fuzz-upload", format=registry_pb2.MODEL_FORMAT_SAFETENSORS, architecture=mlp_arch()
        ),
        _safetensors_body(),
        registry_pb2.UploadModelRequest,
    ),
    "/modelfleet.data.v1.DataService/UploadDataset": lambda: _upload_parts(
        data_pb2.UploadDatasetHeader(
            name="fuzz-csv",
            format=data_pb2.DATA_FORMAT_CSV,
            label_column="label",
            csv_has_header=True,
            task=data_pb2.DATASET_TASK_CLASSIFICATION,
        ),
        _csv_body(),
        data_pb2.UploadDatasetRequest,
    ),
}


def _csv_body() -> bytes:
    out = io.StringIO()
    out.write("a,b,label\n")
    for i in range(40):
        out.write(f"{i * 0.5},{-i},{'xy'[i % 2]}\n")
    return out.getvalue().encode()


@pytest.mark.parametrize("path", sorted(UPLOADS))
def test_upload_streams_in_any_order(fleet: Fleet, path: str) -> None:
    rpc = _method(path)

    @profile(EXAMPLES)
    @given(parts=UPLOADS[path]())
    def run(parts: list[Message]) -> None:
        judge(fleet, rpc, call(fleet, rpc, [p.SerializeToString() for p in parts]), parts)

    run()
    assert_healthy(fleet)


def test_oversized_message_is_refused(fleet: Fleet) -> None:
    """A request above max_message_bytes (8 MiB here) is refused by gRPC, not buffered."""
    rpc = _method("/modelfleet.registry.v1.ModelRegistryService/GetModel")
    answer = call(fleet, rpc, [registry_pb2.GetModelRequest(name="x" * (9 << 20)).SerializeToString()])
    judge(fleet, rpc, answer, "9 MiB name")
    assert answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_healthy(fleet)


CONTROL = st.characters(categories=["Cc", "Cf", "Zl", "Zp"])


def test_names_with_control_characters_are_refused(fleet: Fleet) -> None:
    """Names become Redis key parts and paths: a trailing newline or any control
    character is INVALID_ARGUMENT, not a new dataset or alias."""
    create = _method("/modelfleet.data.v1.DataService/CreateDatasetFromSource")
    alias = _method("/modelfleet.registry.v1.ModelRegistryService/SetAlias")

    @profile(EXAMPLES)
    @given(char=CONTROL, at_end=st.booleans())
    def run(char: str, at_end: bool) -> None:
        word = f"ctl{char}" if at_end else f"c{char}tl"
        answer = call(
            fleet,
            create,
            [
                data_pb2.CreateDatasetFromSourceRequest(
                    name=word, source=data_pb2.BUILTIN_SOURCE_IRIS
                ).SerializeToString()
            ],
        )
        judge(fleet, create, answer, word)
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, (word, answer)
        request = registry_pb2.SetAliasRequest(name=FUZZ_MODEL, alias=word, version="1")
        answer = call(fleet, alias, [request.SerializeToString()])
        judge(fleet, alias, answer, word)
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, (word, answer)

    run()
