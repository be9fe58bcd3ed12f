"""CompressionService: protobuf in and out; the logic is in submit.py."""

from __future__ import annotations

import asyncio

import grpc

from common.api.modelfleet.compression.v1 import compression_pb2, compression_pb2_grpc
from services.compression.submit import CompressionSubmitter


class CompressionServicer(compression_pb2_grpc.CompressionServiceServicer):
    def __init__(self, submitter: CompressionSubmitter) -> None:
        self._submitter = submitter

    async def SubmitCompressionJob(
        self, request: compression_pb2.SubmitCompressionJobRequest, context: grpc.aio.ServicerContext
    ) -> compression_pb2.SubmitCompressionJobResponse:
        # Redis calls are blocking: keep them off the event loop.
        if request.validate_only:
            await asyncio.to_thread(self._submitter.check, request)
            return compression_pb2.SubmitCompressionJobResponse()
        job = await asyncio.to_thread(self._submitter.submit, request)
        return compression_pb2.SubmitCompressionJobResponse(job=job)
