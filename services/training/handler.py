"""The training job handler: dataset -> DDP ranks -> registered model version."""

from __future__ import annotations

import logging
import os

import numpy as np
import redis
import torch
from google.protobuf.json_format import MessageToJson
from torch import nn

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.api.modelfleet.training.v1 import training_spec_pb2 as ts
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog, DatasetRecord, load_split
from common.device import resolve_device
from common.errors import FailedPrecondition, InvalidArgument, NotFound
from common.jobs import JobCancelledError, JobContext, JobOutcome, JobQueue, PermanentJobError
from common.models.families import check_parameter_budget, family_of, tensor_specs
from common.models.inputs import is_normalized
from common.models.loading import save_weights
from common.registry import ModelRegistry
from common.settings import Settings
from services.training.checkpoint import CheckpointDir, checkpoint_dir
from services.training.launcher import RankFailedError, TrainingCancelledError, launch
from services.training.objective import evaluate_sums, loss_fn, metrics_from_sums
from services.training.spec import resolve_spec
from services.training.trainer import RankJob

log = logging.getLogger(__name__)


class TrainingHandler:
    def __init__(self, settings: Settings, client: redis.Redis, store: ArtifactStore) -> None:
        self.settings = settings
        self.store = store
        self.queue = JobQueue(client, settings)
        self.catalog = DatasetCatalog(client, settings.redis_prefix)
        self.registry = ModelRegistry(client, settings.redis_prefix)

    def __call__(self, ctx: JobContext) -> JobOutcome:
        job = ctx.job
        try:
            spec, record = resolve_spec(self.catalog, job.training)
            check_parameter_budget(spec.architecture, self.settings.max_model_parameters, "spec.architecture")
        except (InvalidArgument, NotFound) as exc:
            raise PermanentJobError(exc.message) from exc
        # A node without CUDA (or with too few GPUs) may be followed by one with
        # them, so these stay retryable.
        device = resolve_device(self.settings.device, spec.device)
        if device.type == "cuda" and spec.world_size > torch.cuda.device_count():
            raise FailedPrecondition(
                f"spec.world_size {spec.world_size} exceeds the {torch.cuda.device_count()} GPUs on this node"
            )

        ckpt = CheckpointDir(checkpoint_dir(self.settings.artifact_root, job.id))
        if ctx.attempt <= 1:
            ckpt.clear()  # leftovers of an earlier job with this id cannot be ours
        resume = ckpt.latest_epoch()
        rank_job = RankJob(
            job_id=job.id,
            spec=spec.SerializeToString(),
            dataset_meta=record.meta.SerializeToString(),
            shards={k: (v.features, v.labels) for k, v in record.shards.items()},
            artifact_root=str(self.settings.artifact_root),
            checkpoint_dir=str(ckpt.path),
            device=device.type,
            rendezvous_file="",
            resume_epoch=resume,
            parent_pid=os.getpid(),
            torch_threads=self.settings.torch_threads,
            log_level=self.settings.log_level,
            log_format=self.settings.log_format,
        )
        log.info(
            "training started",
            extra={"world_size": spec.world_size, "device": str(device), "resume_epoch": resume},
        )

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            ctx.progress(
                epoch / spec.epochs, epoch=epoch, metrics=metrics, message=f"epoch {epoch}/{spec.epochs}"
            )

        try:
            summary = launch(
                rank_job, spec.world_size, on_epoch=on_epoch, on_log=ctx.log, cancelled=ctx.cancelled
            )
        except RankFailedError as exc:
            if exc.permanent:
                raise PermanentJobError(str(exc)) from exc
            raise
        except TrainingCancelledError as exc:
            # Only a real cancel drops the checkpoints; if another worker took the
            # job over (lease lost), it resumes from them.
            if self.queue.get(job.id).state == jobs_pb2.JOB_STATE_CANCELLED:
                ckpt.clear()
            raise JobCancelledError(str(exc)) from exc

        model = self._final_model(spec, record, ckpt)
        metrics = dict(summary.metrics)
        metrics.update(self._test_metrics(model, spec, record, device))
        metrics["epochs_run"] = float(summary.epochs_run)
        metrics["best_epoch"] = float(summary.best_epoch)
        metrics["resumed_from_epoch"] = float(summary.resumed_from_epoch)
        version = self._register(model, spec, record, job.id, metrics, summary.stopped_early)
        ckpt.clear()
        log.info("model registered", extra={"model": spec.model_name, "version": version.version})
        return JobOutcome(
            result=jobs_pb2.JobResult(model_name=spec.model_name, model_version=version.version),
            metrics=metrics,
        )

    def _final_model(self, spec: ts.TrainingSpec, record: DatasetRecord, ckpt: CheckpointDir) -> nn.Module:
        """The served model: the trained part behind the dataset's input transform,
        so clients send raw features."""
        norm = record.meta.normalization if is_normalized(record.meta.normalization) else None
        family, arch = family_of(spec.architecture)
        model = family.build(arch, norm)
        family.trainable(model).load_state_dict(ckpt.load_final())
        return model.eval()

    def _test_metrics(
        self, model: nn.Module, spec: ts.TrainingSpec, record: DatasetRecord, device: torch.device
    ) -> dict[str, float]:
        if "test" not in record.shards:
            return {}
        features, labels = load_split(self.store, record, "test")
        if labels is None:
            return {}
        family, _ = family_of(spec.architecture)
        layers = family.trainable(model).to(device)
        sums = evaluate_sums(
            layers, features, labels, np.arange(len(features)), spec.task, loss_fn(spec.loss), device
        )
        model.to("cpu")
        return metrics_from_sums(sums, spec.task, "test")

    def _register(
        self,
        model: nn.Module,
        spec: ts.TrainingSpec,
        record: DatasetRecord,
        job_id: str,
        metrics: dict[str, float],
        stopped_early: bool,
    ) -> registry_pb2.ModelVersion:
        ref = save_weights(model, self.store)
        inputs, outputs = tensor_specs(spec.architecture)
        steps = [
            f"trained {int(metrics['epochs_run'])}/{spec.epochs} epochs on {spec.world_size} process(es)"
            + (", stopped early" if stopped_early else ""),
        ]
        version = registry_pb2.ModelVersion(
            model_name=spec.model_name,
            format=registry_pb2.MODEL_FORMAT_SAFETENSORS,
            artifact_digest=ref.digest,
            artifact_size_bytes=ref.size,
            architecture=spec.architecture,
            inputs=inputs,
            outputs=outputs,
            metrics=metrics,
            lineage=registry_pb2.Lineage(
                dataset_name=record.meta.name,
                dataset_version=record.meta.version,
                job_id=job_id,
                steps=steps,
                spec_json=MessageToJson(spec),
            ),
            description=spec.description,
            class_names=list(record.meta.class_names),
            labels={"task": ts.Task.Name(spec.task).removeprefix("TASK_").lower()},
        )
        if is_normalized(record.meta.normalization):
            version.normalization.CopyFrom(record.meta.normalization)
        return self.registry.register(version)
