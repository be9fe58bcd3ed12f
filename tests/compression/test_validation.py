"""Every bad input answers the right gRPC status, naming the step and field;
nothing is queued for a refused spec."""

from __future__ import annotations

import grpc
import pytest
import torch

from common.api.modelfleet.compression.v1 import compression_pb2
from common.api.modelfleet.compression.v1 import compression_spec_pb2 as spec_pb2
from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactStore
from common.models.families import tensor_specs
from common.registry import ModelRegistry
from tests.compression.conftest import Source, Stubs, register_mlp

S = spec_pb2
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def _prune(sparsity: float) -> S.CompressionStep:
    return S.CompressionStep(magnitude_pruning=S.MagnitudePruning(sparsity=sparsity))


def _quant(method: S.QuantizationMethod.ValueType, bits: int = 0) -> S.CompressionStep:
    return S.CompressionStep(quantization=S.Quantization(method=method, bits=bits))


FINETUNE = S.CompressionStep(finetune=S.Finetune(epochs=1, learning_rate=0.01, batch_size=8))
INT8 = _quant(S.QUANTIZATION_METHOD_INT8_DYNAMIC)

CASES = {
    "unknown model": (dict(source_model="nope"), [INT8], NOT_FOUND, "nope"),
    "unknown version": (dict(source_version="99"), [INT8], NOT_FOUND, "99"),
    "unknown dataset": (dict(dataset_name="missing"), [INT8], NOT_FOUND, "missing"),
    "sparsity 1": ({}, [_prune(1.0)], INVALID, "steps[0].magnitude_pruning.sparsity"),
    "sparsity < 0": ({}, [_prune(-0.1)], INVALID, "steps[0].magnitude_pruning.sparsity"),
    "structured sparsity": (
        {},
        [_prune(0.5), S.CompressionStep(structured_pruning=S.StructuredPruning(sparsity=1.5))],
        INVALID,
        "steps[1].structured_pruning.sparsity",
    ),
    "bits 9": (
        {},
        [_quant(S.QUANTIZATION_METHOD_KBIT_WEIGHT_ONLY, 9)],
        INVALID,
        "steps[0].quantization.bits",
    ),
    "bits 1": (
        {},
        [_quant(S.QUANTIZATION_METHOD_KBIT_WEIGHT_ONLY, 1)],
        INVALID,
        "steps[0].quantization.bits",
    ),
    "kbit without bits": (
        {},
        [_quant(S.QUANTIZATION_METHOD_KBIT_WEIGHT_ONLY)],
        INVALID,
        "steps[0].quantization.bits",
    ),
    "no method": ({}, [_quant(S.QUANTIZATION_METHOD_UNSPECIFIED)], INVALID, "steps[0].quantization.method"),
    "quantization not last": ({}, [INT8, _prune(0.5)], INVALID, "steps[0].quantization"),
    "bad radius": (
        {},
        [
            S.CompressionStep(
                l1_constrained_finetune=S.L1ConstrainedFinetune(
                    radius=0, epochs=1, learning_rate=0.1, batch_size=4
                )
            )
        ],
        INVALID,
        "steps[0].l1_constrained_finetune.radius",
    ),
    "bad epochs": (
        {},
        [S.CompressionStep(finetune=S.Finetune(epochs=0, learning_rate=0.01, batch_size=8))],
        INVALID,
        "steps[0].finetune.epochs",
    ),
    "no steps": ({}, [], INVALID, "steps"),
    "empty step": ({}, [S.CompressionStep()], INVALID, "steps[0]"),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_spec_is_refused(case: str, stubs: Stubs, source: Source) -> None:
    overrides, steps, code, needle = CASES[case]
    fields = {"source_model": "clf", **overrides}
    spec = S.CompressionSpec(steps=steps, **fields)  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.compression.SubmitCompressionJob(compression_pb2.SubmitCompressionJobRequest(spec=spec))
    assert err.value.code() == code
    assert needle in (err.value.details() or "")
    listed = await stubs.jobs.ListJobs(jobs_pb2.ListJobsRequest(kind=jobs_pb2.JOB_KIND_COMPRESSION))
    assert not listed.jobs


async def test_structured_pruning_of_a_model_without_hidden_layers(
    stubs: Stubs, registry: ModelRegistry, store: ArtifactStore
) -> None:
    register_mlp(registry, store, "linear", [])
    step = S.CompressionStep(structured_pruning=S.StructuredPruning(sparsity=0.5))
    spec = S.CompressionSpec(source_model="linear", steps=[_prune(0.5), step])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.compression.SubmitCompressionJob(compression_pb2.SubmitCompressionJobRequest(spec=spec))
    assert err.value.code() == INVALID and "steps[1].structured_pruning" in (err.value.details() or "")


async def test_any_step_on_a_torchscript_model(
    stubs: Stubs, registry: ModelRegistry, store: ArtifactStore, source: Source
) -> None:
    scripted = torch.jit.trace(source.model, torch.randn(1, 8))
    path = store.scratch_dir() / "m.pt"
    scripted.save(str(path))
    ref = store.put_file(path)
    inputs, outputs = tensor_specs(source.version.architecture)
    registry.register(
        registry_pb2.ModelVersion(
            model_name="ts",
            format=registry_pb2.MODEL_FORMAT_TORCHSCRIPT,
            artifact_digest=ref.digest,
            artifact_size_bytes=ref.size,
            inputs=inputs,
            outputs=outputs,
        )
    )
    spec = S.CompressionSpec(source_model="ts", steps=[INT8])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.compression.SubmitCompressionJob(compression_pb2.SubmitCompressionJobRequest(spec=spec))
    assert err.value.code() == INVALID
    assert "steps[0].quantization" in (err.value.details() or "") and "TORCHSCRIPT" in (
        err.value.details() or ""
    )


async def test_finetune_without_a_resolvable_dataset(
    stubs: Stubs, registry: ModelRegistry, store: ArtifactStore
) -> None:
    register_mlp(registry, store, "orphan", [8])  # no dataset in its lineage
    spec = S.CompressionSpec(source_model="orphan", steps=[_prune(0.5), FINETUNE])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.compression.SubmitCompressionJob(compression_pb2.SubmitCompressionJobRequest(spec=spec))
    assert err.value.code() == INVALID and "steps[1].finetune" in (err.value.details() or "")


async def test_valid_spec_is_queued_with_its_source_pinned(stubs: Stubs, source: Source) -> None:
    spec = S.CompressionSpec(source_model="clf", steps=[_prune(0.5), FINETUNE, INT8])
    reply = await stubs.compression.SubmitCompressionJob(
        compression_pb2.SubmitCompressionJobRequest(spec=spec)
    )
    job = reply.job
    assert job.state == jobs_pb2.JOB_STATE_QUEUED and job.kind == jobs_pb2.JOB_KIND_COMPRESSION
    assert job.compression.source_version == source.version.version
    assert (job.compression.dataset_name, job.compression.dataset_version) == ("blobs", "1")
