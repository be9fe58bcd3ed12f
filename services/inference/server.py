"""Composition root of the inference service: the Open Inference Protocol and
the model registry on ``inference_port``, Prometheus metrics on ``metrics_port``."""

from __future__ import annotations

import torch

from common.api.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from common.api.modelfleet.registry.v1 import registry_pb2_grpc
from common.artifacts import ArtifactStore
from common.device import resolve_device
from common.grpcserver import ServiceHost
from common.redis import connect, wait_for_redis
from common.registry import ModelRegistry
from common.settings import Settings
from services.inference.engine import InferenceEngine
from services.inference.repository import ModelRepository
from services.inference.servicer import InferenceServicer
from services.registry.servicer import ModelRegistryServicer

INFERENCE_SERVICE = "inference.GRPCInferenceService"
REGISTRY_SERVICE = "modelfleet.registry.v1.ModelRegistryService"


async def build(settings: Settings, poll_s: float = 3.0) -> ServiceHost:
    """The server, not started; its start-up models load and warm in ``host.ready()``.

    ``poll_s`` is how often every followed model's routing is re-read (pub/sub
    events act at once; the poll only bounds the delay after a missed one).
    """
    torch.set_num_threads(settings.torch_threads)
    client = connect(settings.redis_url, settings.redis_timeout_s)
    wait_for_redis(client)
    registry = ModelRegistry(client, settings.redis_prefix)
    store = ArtifactStore(settings.artifact_root)
    repository = ModelRepository(settings, registry, store, resolve_device(settings.device), poll_s=poll_s)
    host = ServiceHost(settings, "inference", settings.inference_port)
    engine = InferenceEngine(repository, reject_nan=settings.nan_policy == "reject")
    host.add(pb_grpc.add_GRPCInferenceServiceServicer_to_server, InferenceServicer(engine), INFERENCE_SERVICE)
    host.add(
        registry_pb2_grpc.add_ModelRegistryServiceServicer_to_server,
        ModelRegistryServicer(registry, store, settings.max_upload_bytes),
        REGISTRY_SERVICE,
    )

    async def close() -> None:
        await repository.stop()
        client.close()

    host.on_shutdown(close)
    # Models load and warm after the port opens: ServerLive answers and health
    # says NOT_SERVING meanwhile, as Kubernetes' startup probe expects.
    host.on_ready(repository.start)
    return host


async def serve(settings: Settings) -> None:
    await (await build(settings)).serve()
