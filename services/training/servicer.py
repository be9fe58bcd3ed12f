"""TrainingService over gRPC: protobuf in, TrainingSubmitter, protobuf out."""

from __future__ import annotations

import asyncio

import grpc

from common.api.modelfleet.training.v1 import training_pb2, training_pb2_grpc
from services.training.submit import TrainingSubmitter


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, submitter: TrainingSubmitter) -> None:
        self._submitter = submitter

    async def SubmitTrainingJob(
        self, request: training_pb2.SubmitTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> training_pb2.SubmitTrainingJobResponse:
        # Redis calls are blocking; keep them off the event loop.
        if request.validate_only:
            await asyncio.to_thread(self._submitter.check, request)
            return training_pb2.SubmitTrainingJobResponse()
        job = await asyncio.to_thread(self._submitter.submit, request)
        return training_pb2.SubmitTrainingJobResponse(job=job)
