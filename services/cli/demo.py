"""``modelfleet demo``: the whole pipeline through the public gRPC API only.

Ingest digits -> preprocess -> train (DDP, world_size 2) -> compress
(structured prune -> fine-tune -> int8) -> promote -> infer, with a progress
bar per job and a final table of accuracy, size and latency per version.
Runs against a fleet that is already up, or starts its own.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.api.inference import grpc_predict_v2_pb2 as oip
from common.api.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.compression.v1 import compression_pb2, compression_pb2_grpc
from common.api.modelfleet.compression.v1 import compression_spec_pb2 as cspec
from common.api.modelfleet.data.v1 import data_pb2, data_pb2_grpc
from common.api.modelfleet.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from common.api.modelfleet.registry.v1 import registry_pb2, registry_pb2_grpc
from common.api.modelfleet.training.v1 import training_pb2, training_pb2_grpc
from common.api.modelfleet.training.v1 import training_spec_pb2 as tspec
from common.errors import FailedPrecondition
from common.settings import Settings
from services.cli.client import call_metadata, connect, print_table
from services.cli.fleet import Fleet
from services.cli.progress import watch_job

MODEL = "demo-digits-mlp"
HIDDEN = [256, 128]
DATASET = "demo-digits"
CANARY_FRACTION = 0.1


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the end-to-end pipeline (starts a local fleet unless one is up)")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    demo.add_argument("--world-size", type=int, default=2, help="DDP processes for training (default 2)")
    demo.set_defaults(handler=_demo)


def _fleet_is_up(settings: Settings) -> bool:
    with connect(f"127.0.0.1:{settings.inference_port}", settings) as channel:
        try:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError:
            return False
    return status == health_pb2.HealthCheckResponse.SERVING


def _demo(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    try:
        if _fleet_is_up(settings):
            print("using the fleet that is already up")
            return Demo(settings, args.epochs, args.world_size).run()
        print("no fleet answers; starting a local one (logs in .modelfleet/logs)")
        with Fleet(settings):
            return Demo(settings, args.epochs, args.world_size).run()
    except grpc.RpcError as exc:
        print(f"modelfleet: demo failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


class Demo:
    def __init__(self, settings: Settings, epochs: int, world_size: int) -> None:
        self.settings = settings
        self.epochs = epochs
        self.world_size = world_size
        self.metadata = call_metadata(settings)

        def channel(port: int) -> grpc.Channel:
            return connect(f"127.0.0.1:{port}", settings)

        self.data = data_pb2_grpc.DataServiceStub(channel(settings.data_port))
        training_channel = channel(settings.training_port)
        self.training = training_pb2_grpc.TrainingServiceStub(training_channel)
        self.jobs = jobs_pb2_grpc.JobServiceStub(training_channel)
        self.compression = compression_pb2_grpc.CompressionServiceStub(channel(settings.compression_port))
        inference_channel = channel(settings.inference_port)
        self.registry = registry_pb2_grpc.ModelRegistryServiceStub(inference_channel)
        self.inference = oip_grpc.GRPCInferenceServiceStub(inference_channel)

    def run(self) -> int:
        started = time.monotonic()
        dataset = self.prepare_data()
        x_test, y_test = self.raw_test_split(dataset)

        print(f"\n[3/6] training {MODEL} (world_size={self.world_size}, {self.epochs} epochs)")
        job = self.training.SubmitTrainingJob(
            training_pb2.SubmitTrainingJobRequest(
                spec=tspec.TrainingSpec(
                    dataset_name=dataset.name,
                    dataset_version=dataset.version,
                    model_name=MODEL,
                    architecture=model_pb2.Architecture(mlp=model_pb2.MlpArchitecture(hidden_sizes=HIDDEN)),
                    task=tspec.TASK_CLASSIFICATION,
                    optimizer=tspec.OPTIMIZER_ADAM,
                    learning_rate=2e-3,
                    epochs=self.epochs,
                    batch_size=64,
                    weight_decay=1e-4,
                    seed=0,
                    world_size=self.world_size,
                    checkpoint_interval_epochs=5,
                ),
                request_id=uuid.uuid4().hex,
            ),
            metadata=self.metadata,
        ).job
        trained = self.finish(job)

        print(f"\n[4/6] compressing {MODEL} v{trained}: structured prune 50% -> fine-tune -> int8 dynamic")
        steps = [
            cspec.CompressionStep(structured_pruning=cspec.StructuredPruning(sparsity=0.5)),
            cspec.CompressionStep(
                finetune=cspec.Finetune(epochs=8, learning_rate=1e-3, batch_size=64, distillation_weight=0.5)
            ),
            cspec.CompressionStep(
                quantization=cspec.Quantization(method=cspec.QUANTIZATION_METHOD_INT8_DYNAMIC)
            ),
        ]
        job = self.compression.SubmitCompressionJob(
            compression_pb2.SubmitCompressionJobRequest(
                spec=cspec.CompressionSpec(
                    source_model=MODEL,
                    source_version=trained,
                    steps=steps,
                    dataset_name=dataset.name,
                    dataset_version=dataset.version,
                    seed=0,
                ),
                request_id=uuid.uuid4().hex,
            ),
            metadata=self.metadata,
        ).job
        compressed = self.finish(job)

        print(f"\n[5/6] rollout: v{trained} to production, v{compressed} as a {CANARY_FRACTION:.0%} canary")
        self.promote(trained)
        self.registry.SetCanary(
            registry_pb2.SetCanaryRequest(name=MODEL, version=compressed, fraction=CANARY_FRACTION),
            metadata=self.metadata,
        )
        # Replicas serve exactly the versions routing needs, so both are
        # addressable by version only while one is production and one canary.
        self.wait_until_loaded({trained, compressed})

        print("\n[6/6] inference through the Open Inference Protocol")
        measured = {version: self.measure(version, x_test, y_test) for version in (trained, compressed)}
        served = self.end_canary(compressed)
        self.wait_until_served(served)
        rows = []
        for version, (accuracy, p50) in measured.items():
            meta = self.registry.GetModelVersion(
                registry_pb2.GetModelVersionRequest(name=MODEL, version=version), metadata=self.metadata
            ).version
            label = "fp32" if version == trained else "pruned+ft+int8"
            marker = " (production)" if version == served else ""
            size = meta.artifact_size_bytes
            rows.append((f"v{version}{marker}", label, f"{accuracy:.4f}", size, f"{p50:.2f}"))
        print()
        print_table(("version", "model", "test accuracy", "bytes on disk", "p50 latency ms (batch 1)"), rows)
        print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
        return 0

    def prepare_data(self) -> data_pb2.DatasetVersion:
        print("[1/6] ingesting scikit-learn's bundled digits")
        raw = self.data.CreateDatasetFromSource(
            data_pb2.CreateDatasetFromSourceRequest(name=DATASET, source=data_pb2.BUILTIN_SOURCE_DIGITS),
            metadata=self.metadata,
        ).dataset
        print(f"  {raw.name} v{raw.version}: {raw.num_rows} rows x {raw.num_features} features")
        print("[2/6] preprocessing: drop invalid, dedupe, z-score, split 70/15/15")
        dataset = self.data.PreprocessDataset(
            data_pb2.PreprocessDatasetRequest(
                name=raw.name,
                version=raw.version,
                cleaning=data_pb2.Cleaning(drop_invalid=True, dedupe=True),
                normalization=model_pb2.NORMALIZATION_KIND_ZSCORE,
                split=data_pb2.SplitSpec(val_fraction=0.15, test_fraction=0.15, seed=0, stratify=True),
            ),
            metadata=self.metadata,
        ).dataset
        splits = ", ".join(f"{k}={v}" for k, v in sorted(dataset.split_rows.items()))
        dupes = dataset.cleaning.dropped_duplicates
        print(f"  {dataset.name} v{dataset.version}: {splits}; dropped {dupes} duplicates")
        return dataset

    def raw_test_split(self, dataset: data_pb2.DatasetVersion) -> tuple[np.ndarray, np.ndarray]:
        """The test split, un-normalized with the version's published statistics:
        models carry the normalization, so clients send raw features."""
        xs, ys = [], []
        request = data_pb2.StreamBatchesRequest(
            name=dataset.name, version=dataset.version, split=data_pb2.SPLIT_TEST, batch_size=512
        )
        for batch in self.data.StreamBatches(request, metadata=self.metadata):
            xs.append(np.frombuffer(batch.features, "<f4").reshape(batch.rows, batch.num_features))
            ys.append(np.frombuffer(batch.labels, "<i8"))
        x = np.concatenate(xs)
        norm = dataset.normalization
        if norm.kind in (model_pb2.NORMALIZATION_KIND_ZSCORE, model_pb2.NORMALIZATION_KIND_MINMAX):
            x = x * np.asarray(norm.scale, np.float32) + np.asarray(norm.shift, np.float32)
        return x.astype(np.float32), np.concatenate(ys)

    def finish(self, job: jobs_pb2.Job) -> str:
        final = watch_job(self.jobs, jobs_pb2.WatchJobRequest(job_id=job.id), self.metadata, sys.stdout)
        if final.state != jobs_pb2.JOB_STATE_SUCCEEDED:
            state = jobs_pb2.JobState.Name(final.state)
            raise FailedPrecondition(f"job {job.id} ended {state}: {final.last_error}")
        return final.result.model_version

    def promote(self, version: str) -> None:
        request = registry_pb2.SetAliasRequest(name=MODEL, alias="production", version=version)
        self.registry.SetAlias(request, metadata=self.metadata)
        print(f"  production -> v{version}")

    def end_canary(self, canary: str) -> str:
        """Promote the canary if its test accuracy is at most one point lower; returns production."""
        guard = registry_pb2.PromotionGuard(metric="test_accuracy", max_drop=0.01)
        try:
            model = self.registry.EndCanary(
                registry_pb2.EndCanaryRequest(name=MODEL, promote=True, guard=guard), metadata=self.metadata
            ).model
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            print(f"  promotion of v{canary} refused by the guard: {exc.details()}")
            model = self.registry.EndCanary(
                registry_pb2.EndCanaryRequest(name=MODEL), metadata=self.metadata
            ).model
        production = str(model.aliases["production"])
        print(f"  canary ended; production -> v{production}")
        return production

    def wait_until_served(self, version: str, timeout_s: float = 60.0) -> None:
        """Replicas follow the registry through Redis; wait until the default
        route answers with ``version``."""
        deadline = time.monotonic() + timeout_s
        probe = np.zeros((1, 64), np.float32)
        while time.monotonic() < deadline:
            try:
                if self.infer("", probe).model_version == version:
                    print(f"  inference serves {MODEL} v{version} as production")
                    return
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise
            time.sleep(0.25)
        raise FailedPrecondition(f"inference did not serve v{version} within {timeout_s:.0f} s")

    def wait_until_loaded(self, versions: set[str], timeout_s: float = 60.0) -> None:
        """Wait until the replica serves exactly ``versions``. ModelMetadata lists
        them in one snapshot; probing each version in turn could pass while the
        replica is still stepping through older routing changes."""
        deadline = time.monotonic() + timeout_s
        request = oip.ModelMetadataRequest(name=MODEL)
        while time.monotonic() < deadline:
            try:
                reply = self.inference.ModelMetadata(request, metadata=self.metadata, timeout=10)
                served = set(reply.versions)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise
                served = set()
            if served == versions:
                listed = " and ".join(f"v{v}" for v in sorted(versions, key=int))
                print(f"  inference serves {MODEL} {listed}")
                return
            time.sleep(0.25)
        wanted = sorted(versions, key=int)
        raise FailedPrecondition(f"inference did not load versions {wanted} within {timeout_s:.0f} s")

    def measure(self, version: str, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        return self.accuracy(version, x, y), self.latency_p50(version, x)

    def infer(self, version: str, x: np.ndarray) -> oip.ModelInferResponse:
        request = oip.ModelInferRequest(
            model_name=MODEL,
            model_version=version,
            inputs=[
                oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))
            ],
            raw_input_contents=[np.ascontiguousarray(x, "<f4").tobytes()],
        )
        return self.inference.ModelInfer(request, metadata=self.metadata, timeout=30)

    def accuracy(self, version: str, x: np.ndarray, y: np.ndarray) -> float:
        correct = 0
        for start, batch in _batches(x, 32):
            response = self.infer(version, batch)
            logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(len(batch), -1)
            correct += int((logits.argmax(axis=1) == y[start : start + len(batch)]).sum())
        return correct / len(y)

    def latency_p50(self, version: str, x: np.ndarray, n: int = 100) -> float:
        times = []
        for i in range(n):
            begin = time.perf_counter()
            self.infer(version, x[i % len(x) : i % len(x) + 1])
            times.append((time.perf_counter() - begin) * 1000)
        return statistics.median(times)


def _batches(x: np.ndarray, size: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, len(x), size):
        yield start, x[start : start + size]
