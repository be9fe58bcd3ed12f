"""``inference.GRPCInferenceService``: protobuf in, protobuf out; the work is in
the engine and the repository. Errors are raised as ``common.errors`` and mapped
to status codes by the server interceptor."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version

import grpc

from common.api.inference import grpc_predict_v2_pb2 as pb
from common.api.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from common.errors import InvalidArgument, ModelfleetError
from common.grpcserver.interceptor import cut_message
from services.inference.engine import InferenceEngine
from services.inference.repository import ModelRepository

log = logging.getLogger(__name__)

EXTENSIONS = ("classification", "model_repository", "statistics")


def _server_version() -> str:
    try:
        return version("modelfleet")
    except PackageNotFoundError:
        return "0"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: InferenceEngine) -> None:
        self._engine = engine
        self._repo: ModelRepository = engine.repository
        self._version = _server_version()

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._repo.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        _require_name(request.name)
        return pb.ModelReadyResponse(ready=self._repo.is_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="modelfleet", version=self._version, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        _require_name(request.name)
        served = (
            self._repo.route(request.name, request.version)
            if request.version
            else self._repo.default(request.name)
        )
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=sorted((s.version for s in self._repo.served(request.name)), key=int),
            platform=served.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in served.model.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in served.model.outputs],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._engine.infer(request, context.time_remaining())

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Errors go into the stream (error_message) so one bad request does not end it.
        async for request in request_iterator:
            try:
                response = await self._engine.infer(request, context.time_remaining())
            except ModelfleetError as exc:
                yield pb.ModelStreamInferResponse(error_message=cut_message(exc.message))
                continue
            except Exception:
                log.exception("stream inference failed")
                yield pb.ModelStreamInferResponse(error_message="internal error; see server logs")
                continue
            yield pb.ModelStreamInferResponse(infer_response=response)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        served = self._repo.served(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[s.stats.proto() for s in served])

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        entries = await self._repo.index(request.ready)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[index(name=e.name, version=e.version, state=e.state, reason=e.reason) for e in entries]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        _require_name(request.model_name)
        await self._repo.load(request.model_name, _version_param(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        _require_name(request.model_name)
        await self._repo.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _require_name(name: str) -> None:
    if not name:
        raise InvalidArgument("model name is required")


def _version_param(parameters: object) -> str:
    """The ``version`` load parameter (string or integer), "" when absent."""
    params: dict[str, pb.ModelRepositoryParameter] = dict(parameters)  # type: ignore[call-overload]
    param = params.get("version")
    if param is None:
        return ""
    kind = param.WhichOneof("parameter_choice")
    value = (
        str(param.int64_param)
        if kind == "int64_param"
        else param.string_param
        if kind == "string_param"
        else None
    )
    if value is None or not (value.isascii() and value.isdigit()):
        raise InvalidArgument("parameter 'version' must be a version number")
    return value
