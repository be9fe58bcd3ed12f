"""The compression job handler: resolve the spec, run the steps on the
worker's device, store the artifact, measure source and result, and register
the result with lineage. Nothing is registered unless every step succeeded."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from google.protobuf import json_format

from common.api.modelfleet.compression.v1 import compression_spec_pb2 as spec_pb2
from common.api.modelfleet.data.v1 import data_pb2
from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactRef, ArtifactStore
from common.datasets import DatasetCatalog, DatasetRecord, load_split
from common.device import resolve_device
from common.errors import FailedPrecondition, InvalidArgument, NotFound
from common.jobs import JobCancelledError, JobContext, JobOutcome, PermanentJobError
from common.models.compressed import load_compressed, save_compressed
from common.models.families import family_of, tensor_specs
from common.models.loading import load_model
from common.registry import ModelRegistry
from common.settings import Settings
from services.compression.ops.finetune import TrainData
from services.compression.pipeline import PipelineResult, run_pipeline
from services.compression.report import check_metric_drop, measure, measured_notes
from services.compression.spec import ResolvedSpec, resolve

log = logging.getLogger(__name__)

# Splits tried, in order, for the report's metric.
EVAL_SPLITS = ("test", "val", "all")


def split_data(store: ArtifactStore, record: DatasetRecord, split: str) -> TrainData:
    """A split as tensors; the features are what the shards hold (normalized)."""
    features, labels = load_split(store, record, split)
    where = f"dataset {record.meta.name} version {record.meta.version}"
    if labels is None:
        raise InvalidArgument(f"{where}: split {split!r} has no labels to train or evaluate on")
    classification = record.meta.task == data_pb2.DATASET_TASK_CLASSIFICATION or np.issubdtype(
        labels.dtype, np.integer
    )
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64 if classification else np.float32))
    return TrainData(x, y, classification)


class CompressionHandler:
    def __init__(
        self, settings: Settings, registry: ModelRegistry, catalog: DatasetCatalog, store: ArtifactStore
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.catalog = catalog
        self.store = store

    def __call__(self, ctx: JobContext) -> JobOutcome:
        try:
            resolved = resolve(ctx.job.compression, self.registry, self.catalog)
            device = resolve_device(self.settings.device, resolved.spec.device)
        except (InvalidArgument, NotFound, FailedPrecondition) as exc:
            raise PermanentJobError(exc.message) from exc
        spec = resolved.spec
        source = load_model(resolved.source, self.store, device).module
        total = len(spec.steps) + 1  # + measuring and registering

        def check_cancel() -> None:
            if ctx.cancelled():
                raise JobCancelledError("cancelled")

        def on_step(index: int, text: str) -> None:
            ctx.progress((index + 1) / total, message=f"step {index + 1}/{len(spec.steps)}: {text}")
            check_cancel()

        def on_epoch(index: int, epoch: int, loss: float) -> None:
            ctx.progress(index / total, epoch=epoch, metrics={"loss": loss}, message=f"step {index + 1}")
            check_cancel()

        check_cancel()
        result = run_pipeline(
            source,
            resolved.source.architecture,
            resolved.source.normalization,
            spec.steps,
            lambda: self._train_data(resolved),
            seed=spec.seed,
            on_step=on_step,
            on_epoch=on_epoch,
        )
        ref = self._store(result)
        check_cancel()
        report = self._report(resolved, source, result, ref, device)
        refused = check_metric_drop(report, spec)
        if refused:
            raise PermanentJobError(refused)
        check_cancel()
        version = self.registry.register(self._version(ctx.job.id, resolved, result, ref, report))
        log.info(
            "compressed version registered", extra={"model": version.model_name, "version": version.version}
        )
        metrics = {f"test_{report.compressed.metric_name}": report.compressed.metric_value}
        return JobOutcome(
            result=jobs_pb2.JobResult(model_name=version.model_name, model_version=version.version),
            metrics=metrics if report.compressed.metric_name else {},
            compression_report=report,
        )

    def _train_data(self, resolved: ResolvedSpec) -> TrainData:
        if resolved.dataset is None:  # spec.resolve refuses training steps without one
            raise PermanentJobError("no dataset to fine-tune on")
        try:
            return split_data(self.store, resolved.dataset, "train")
        except (InvalidArgument, NotFound) as exc:
            raise PermanentJobError(exc.message) from exc

    def _eval_data(self, resolved: ResolvedSpec) -> tuple[TrainData | None, str]:
        if resolved.dataset is None:
            return None, "no dataset: the task metric was not measured"
        for split in EVAL_SPLITS:
            if split in resolved.dataset.shards or split == "all":
                try:
                    data = split_data(self.store, resolved.dataset, split)
                except InvalidArgument as exc:
                    return None, f"task metric not measured: {exc.message}"
                return data, f"task metric on the {split!r} split of {resolved.dataset.meta.name}"
        return None, "no evaluation split"

    def _store(self, result: PipelineResult) -> ArtifactRef:
        scratch = self.store.scratch_dir()
        try:
            path = scratch / "model.safetensors"
            save_compressed(result.bundle, path)
            return self.store.put_file(path)
        finally:
            for child in scratch.iterdir():
                child.unlink()
            scratch.rmdir()

    def _report(
        self,
        resolved: ResolvedSpec,
        source: torch.nn.Module,
        result: PipelineResult,
        ref: ArtifactRef,
        device: torch.device,
    ) -> spec_pb2.CompressionReport:
        data, where = self._eval_data(resolved)
        family, _ = family_of(result.bundle.arch)
        inputs, _ = tensor_specs(result.bundle.arch)
        shape = list(inputs[0].shape[1:])
        # Measure what inference will serve: the module rebuilt from the stored bytes.
        served = load_compressed(
            self._version_stub(resolved, result), Path(self.store.path(ref.digest)), device
        )
        source_bytes = resolved.source.artifact_size_bytes
        report = spec_pb2.CompressionReport(
            source=measure(source, family.trainable(source), source, shape, source_bytes, device, data),
            compressed=measure(served, family.trainable(served), result.model, shape, ref.size, device, data),
        )
        report.notes.extend(
            [*measured_notes(report), *result.notes, where, f"latency measured on {device} by this worker"]
        )
        return report

    @staticmethod
    def _version_stub(resolved: ResolvedSpec, result: PipelineResult) -> registry_pb2.ModelVersion:
        stub = registry_pb2.ModelVersion()
        stub.architecture.CopyFrom(result.bundle.arch)
        stub.normalization.CopyFrom(resolved.source.normalization)
        return stub

    def _version(
        self,
        job_id: str,
        resolved: ResolvedSpec,
        result: PipelineResult,
        ref: ArtifactRef,
        report: spec_pb2.CompressionReport,
    ) -> registry_pb2.ModelVersion:
        spec, source = resolved.spec, resolved.source
        version = self._version_stub(resolved, result)
        inputs, outputs = tensor_specs(version.architecture)
        version.model_name = spec.target_model or spec.source_model
        version.format = registry_pb2.MODEL_FORMAT_COMPRESSED
        version.artifact_digest = ref.digest
        version.artifact_size_bytes = ref.size
        version.inputs.extend(inputs)
        version.outputs.extend(outputs)
        version.class_names.extend(source.class_names)
        version.labels.update(source.labels)
        version.description = f"{spec.source_model} v{source.version}: " + "; ".join(result.steps)
        version.compression_report.CopyFrom(report)
        if report.compressed.metric_name:
            version.metrics[f"test_{report.compressed.metric_name}"] = report.compressed.metric_value
        lineage = version.lineage
        lineage.dataset_name, lineage.dataset_version = spec.dataset_name, spec.dataset_version
        lineage.job_id = job_id
        lineage.source_model, lineage.source_version = spec.source_model, source.version
        lineage.steps.extend(result.steps)
        lineage.spec_json = json_format.MessageToJson(spec, indent=None)
        return version
