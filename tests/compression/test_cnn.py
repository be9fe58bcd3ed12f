"""A trained CNN compressed by a real compression job (real Redis queue,
handler and artifact store): structured channel pruning, magnitude pruning over
conv and linear weights, a distillation fine-tune that keeps both, int8 codes. The
report is measured on the stored artifact, and the result serves images."""

from __future__ import annotations

import numpy as np
import pytest
import redis
import torch

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.compression.v1 import compression_pb2
from common.api.modelfleet.compression.v1 import compression_spec_pb2 as S
from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog, load_split
from common.jobs import JobQueue, Worker
from common.models.families import FAMILIES, tensor_specs
from common.models.loading import load_model, save_weights
from common.models.pruning import weight_layers
from common.registry import ModelRegistry
from common.settings import Settings
from services.compression.handler import CompressionHandler
from services.compression.submit import CompressionSubmitter
from tests.training.conftest import Dataset, add_digits_images

pytestmark = pytest.mark.timeout(120)


def _train_cnn(
    registry: ModelRegistry, catalog: DatasetCatalog, store: ArtifactStore, images: Dataset
) -> registry_pb2.ModelVersion:
    """A CNN trained in-process on the dataset's (normalized) train shard, registered
    as a training job would register it."""
    family = FAMILIES["cnn"]
    member = family.default()
    family.fit_to_dataset(member, [1, 8, 8], 10, "architecture", "digits-img")
    torch.manual_seed(0)
    model = family.build(member, images.meta.normalization)
    body = family.trainable(model)
    x, y = load_split(store, catalog.get("digits-img", images.meta.version), "train")
    features, labels = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y))
    optimizer = torch.optim.AdamW(body.parameters(), lr=1e-2)
    for epoch in range(8):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            loss = torch.nn.functional.cross_entropy(body(features[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    ref = save_weights(model, store)
    arch = model_pb2.Architecture(cnn=member)
    inputs, outputs = tensor_specs(arch)
    version = registry_pb2.ModelVersion(
        model_name="digits-cnn",
        format=registry_pb2.MODEL_FORMAT_SAFETENSORS,
        architecture=arch,
        normalization=images.meta.normalization,
        inputs=inputs,
        outputs=outputs,
        artifact_digest=ref.digest,
        artifact_size_bytes=ref.size,
    )
    version.lineage.dataset_name, version.lineage.dataset_version = "digits-img", images.meta.version
    return registry.register(version)


def test_a_cnn_is_channel_pruned_sparsified_and_quantized_with_a_measured_report(
    settings: Settings,
    redis_client: redis.Redis,
    registry: ModelRegistry,
    catalog: DatasetCatalog,
    store: ArtifactStore,
) -> None:
    images = add_digits_images(catalog, store)
    source = _train_cnn(registry, catalog, store, images)
    spec = S.CompressionSpec(
        source_model="digits-cnn",
        target_model="digits-cnn-small",
        steps=[
            S.CompressionStep(structured_pruning=S.StructuredPruning(sparsity=0.5)),
            S.CompressionStep(
                magnitude_pruning=S.MagnitudePruning(sparsity=0.5, scope=S.PRUNING_SCOPE_GLOBAL)
            ),
            S.CompressionStep(
                finetune=S.Finetune(epochs=6, learning_rate=3e-3, batch_size=32, distillation_weight=0.5)
            ),
            S.CompressionStep(quantization=S.Quantization(method=S.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY)),
        ],
        max_metric_drop=0.05,
    )
    queue = JobQueue(redis_client, settings)
    job = CompressionSubmitter(queue, registry, catalog).submit(
        compression_pb2.SubmitCompressionJobRequest(spec=spec)
    )
    worker = Worker(
        queue, jobs_pb2.JOB_KIND_COMPRESSION, CompressionHandler(settings, registry, catalog, store)
    )
    for _ in range(20):  # bounded: the queued job is delivered within a few polls
        if worker.run_once(block_ms=200):
            break
    done = queue.get(job.id)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.last_error

    version = registry.get_version("digits-cnn-small", "")
    report = version.compression_report
    print(
        f"\n[cnn compression] params {report.source.parameters} -> {report.compressed.parameters} "
        f"(non-zero {report.compressed.nonzero_parameters}); bytes {report.source.bytes_on_disk} -> "
        f"{report.compressed.bytes_on_disk}; accuracy {report.source.metric_value:.4f} -> "
        f"{report.compressed.metric_value:.4f}"
    )
    channels = [b.out_channels for b in version.architecture.cnn.blocks]
    assert channels == [16, 32]  # half of each block's filters physically removed
    assert report.compressed.parameters < report.source.parameters / 2
    assert report.compressed.nonzero_parameters <= 0.55 * report.compressed.parameters
    assert report.compressed.bytes_on_disk < report.source.bytes_on_disk / 4
    assert report.source.metric_name == report.compressed.metric_name == "accuracy"
    assert report.compressed.metric_value >= report.source.metric_value - 0.05
    assert report.source.metric_value > 0.9
    assert [list(t.shape) for t in version.inputs] == [[-1, 1, 8, 8]]
    assert version.lineage.source_version == source.version

    # What serves is the stored result: raw images in, and every conv/linear weight
    # is an int8 code times its per-channel scale, half of them zero.
    served = load_model(version, store, torch.device("cpu")).module
    weights = [m.weight for m in weight_layers(served).values()]
    assert sum(int((w == 0).sum()) for w in weights) >= 0.45 * sum(w.numel() for w in weights)
    raw = torch.from_numpy(images.raw_test_features.reshape(-1, 1, 8, 8))
    with torch.no_grad():
        accuracy = float((served(raw).argmax(1) == torch.from_numpy(images.test_labels)).float().mean())
    assert accuracy == pytest.approx(report.compressed.metric_value, abs=1.5 / len(raw))
