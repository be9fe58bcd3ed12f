"""ModelRegistryService: protobuf in and out around ``common.registry`` and
``services.registry.upload``. Hosted by the inference server:

    host.add(registry_pb2_grpc.add_ModelRegistryServiceServicer_to_server,
             ModelRegistryServicer(registry, store, settings.max_upload_bytes),
             "modelfleet.registry.v1.ModelRegistryService")

Registry calls are blocking Redis and upload work is file I/O and torch, so
everything runs in threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from common.api.modelfleet.registry.v1 import registry_pb2, registry_pb2_grpc
from common.artifacts import ArtifactStore
from common.errors import InvalidArgument
from common.grpcserver.uploads import UploadGuard
from common.registry import ModelRegistry
from services.registry.upload import ModelUpload, first_header


class ModelRegistryServicer(registry_pb2_grpc.ModelRegistryServiceServicer):
    def __init__(self, registry: ModelRegistry, store: ArtifactStore, max_upload_bytes: int) -> None:
        self._registry = registry
        self._store = store
        self._max_upload_bytes = max_upload_bytes

    async def ListModels(
        self, request: registry_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListModelsResponse:
        models, token = await asyncio.to_thread(
            self._registry.list_models, request.name_prefix, request.page_size, request.page_token
        )
        return registry_pb2.ListModelsResponse(models=models, next_page_token=token)

    async def GetModel(
        self, request: registry_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.GetModelResponse:
        model = await asyncio.to_thread(self._registry.get_model, request.name)
        return registry_pb2.GetModelResponse(model=model)

    async def ListModelVersions(
        self, request: registry_pb2.ListModelVersionsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListModelVersionsResponse:
        versions, token = await asyncio.to_thread(
            self._registry.list_versions, request.name, request.page_size, request.page_token
        )
        return registry_pb2.ListModelVersionsResponse(versions=versions, next_page_token=token)

    async def GetModelVersion(
        self, request: registry_pb2.GetModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.GetModelVersionResponse:
        version = await asyncio.to_thread(self._registry.get_version, request.name, request.version)
        return registry_pb2.GetModelVersionResponse(version=version)

    async def SetAlias(
        self, request: registry_pb2.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.SetAliasResponse:
        guard = request.guard if request.HasField("guard") else None
        model = await asyncio.to_thread(
            self._registry.set_alias, request.name, request.alias, request.version, guard
        )
        return registry_pb2.SetAliasResponse(model=model)

    async def RollbackAlias(
        self, request: registry_pb2.RollbackAliasRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RollbackAliasResponse:
        model = await asyncio.to_thread(self._registry.rollback_alias, request.name, request.alias)
        return registry_pb2.RollbackAliasResponse(model=model)

    async def SetCanary(
        self, request: registry_pb2.SetCanaryRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.SetCanaryResponse:
        model = await asyncio.to_thread(
            self._registry.set_canary, request.name, request.version, request.fraction
        )
        return registry_pb2.SetCanaryResponse(model=model)

    async def EndCanary(
        self, request: registry_pb2.EndCanaryRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.EndCanaryResponse:
        guard = request.guard if request.HasField("guard") else None
        model = await asyncio.to_thread(self._registry.end_canary, request.name, request.promote, guard)
        return registry_pb2.EndCanaryResponse(model=model)

    async def DeleteModelVersion(
        self, request: registry_pb2.DeleteModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeleteModelVersionResponse:
        await asyncio.to_thread(self._registry.delete_version, request.name, request.version)
        return registry_pb2.DeleteModelVersionResponse()

    async def UploadModel(
        self,
        request_iterator: AsyncIterator[registry_pb2.UploadModelRequest],
        context: grpc.aio.ServicerContext,
    ) -> registry_pb2.UploadModelResponse:
        parts = aiter(request_iterator)
        header = first_header(await anext(parts, None))
        upload = await asyncio.to_thread(
            ModelUpload, header, self._store, self._registry, self._max_upload_bytes
        )
        try:
            async for request in parts:
                if request.WhichOneof("part") != "chunk":
                    raise InvalidArgument("UploadModel messages after the first must carry a chunk")
                await asyncio.to_thread(upload.write, request.chunk)
        except BaseException:
            # Also on client cancellation: the partial bytes must not linger.
            upload.abort()
            raise
        guard = UploadGuard()
        try:
            version = await guard.finish(lambda: upload.commit(guard.check))
        except asyncio.CancelledError:
            upload.abort()  # idempotent: the bytes are dropped if commit had not taken them
            raise
        return registry_pb2.UploadModelResponse(version=version)
