"""DataService over gRPC: protobuf in and out; the work runs in threads
(``services.data.service``) so the event loop never parses or reads files."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from common.api.modelfleet.data.v1 import data_pb2, data_pb2_grpc
from common.errors import InvalidArgument
from common.grpcserver.uploads import UploadGuard
from services.data import batches
from services.data.service import DataService


class DataServicer(data_pb2_grpc.DataServiceServicer):
    def __init__(self, service: DataService, max_message_bytes: int) -> None:
        self._service = service
        self._max_message_bytes = max_message_bytes

    async def UploadDataset(
        self,
        request_iterator: AsyncIterator[data_pb2.UploadDatasetRequest],
        context: grpc.aio.ServicerContext,
    ) -> data_pb2.UploadDatasetResponse:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("the first UploadDatasetRequest must carry the header")
        guard = UploadGuard()
        with self._service.upload_spool(first.header) as spool:
            async for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument("only the first UploadDatasetRequest may carry a header")
                await asyncio.to_thread(spool.write, message.chunk)
            version = await guard.finish(lambda: self._service.ingest(spool, guard.check))
        return data_pb2.UploadDatasetResponse(dataset=version)

    async def CreateDatasetFromSource(
        self, request: data_pb2.CreateDatasetFromSourceRequest, context: grpc.aio.ServicerContext
    ) -> data_pb2.CreateDatasetFromSourceResponse:
        version = await asyncio.to_thread(self._service.create_from_source, request)
        return data_pb2.CreateDatasetFromSourceResponse(dataset=version)

    async def PreprocessDataset(
        self, request: data_pb2.PreprocessDatasetRequest, context: grpc.aio.ServicerContext
    ) -> data_pb2.PreprocessDatasetResponse:
        version = await asyncio.to_thread(self._service.preprocess, request)
        return data_pb2.PreprocessDatasetResponse(dataset=version)

    async def GetDataset(
        self, request: data_pb2.GetDatasetRequest, context: grpc.aio.ServicerContext
    ) -> data_pb2.GetDatasetResponse:
        record = await asyncio.to_thread(self._service.get, request.name, request.version)
        return data_pb2.GetDatasetResponse(dataset=record.meta)

    async def ListDatasets(
        self, request: data_pb2.ListDatasetsRequest, context: grpc.aio.ServicerContext
    ) -> data_pb2.ListDatasetsResponse:
        items, token = await asyncio.to_thread(
            self._service.catalog.list, request.name_prefix, request.page_size, request.page_token
        )
        return data_pb2.ListDatasetsResponse(datasets=items, next_page_token=token)

    async def ListDatasetVersions(
        self, request: data_pb2.ListDatasetVersionsRequest, context: grpc.aio.ServicerContext
    ) -> data_pb2.ListDatasetVersionsResponse:
        items, token = await asyncio.to_thread(
            self._service.catalog.list_versions, request.name, request.page_size, request.page_token
        )
        return data_pb2.ListDatasetVersionsResponse(versions=items, next_page_token=token)

    async def DeleteDataset(
        self, request: data_pb2.DeleteDatasetRequest, context: grpc.aio.ServicerContext
    ) -> data_pb2.DeleteDatasetResponse:
        await asyncio.to_thread(self._service.delete, request.name, request.version)
        return data_pb2.DeleteDatasetResponse()

    async def StreamBatches(
        self, request: data_pb2.StreamBatchesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[data_pb2.StreamBatchesResponse]:
        plan, features, labels = await asyncio.to_thread(
            self._service.open_batches, request, self._max_message_bytes
        )
        # One batch per thread hop: a cancelled client stops the stream at the next
        # await (grpc cancels this generator), and the loop never reads a memmap.
        for offset in batches.offsets(plan):
            yield await asyncio.to_thread(batches.make_batch, plan, offset, features, labels)
