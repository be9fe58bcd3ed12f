"""JobService: protobuf in and out; the logic is common.jobs. Unary calls run the
synchronous queue in a thread so Redis round trips never block the event loop;
WatchJob follows the job's event stream with redis.asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import redis.asyncio as aioredis

from common.api.modelfleet.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from common.auth import check_job_owner
from common.grpcserver import ServiceHost
from common.jobs import JobQueue, watch_job
from common.redis import connect_async
from common.settings import Settings

SERVICE_NAME = "modelfleet.jobs.v1.JobService"


def add_job_service(host: ServiceHost, queue: JobQueue) -> None:
    """Host JobService on a service's server (training and compression both do),
    with the asyncio Redis client WatchJob follows streams with, closed at shutdown."""
    async_client = connect_async(host.settings.redis_url)
    host.add(
        jobs_pb2_grpc.add_JobServiceServicer_to_server,
        JobServicer(queue, async_client, host.settings),
        SERVICE_NAME,
    )

    async def close() -> None:
        await async_client.aclose()

    host.on_shutdown(close)


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, queue: JobQueue, async_redis_client: aioredis.Redis, settings: Settings) -> None:
        self.queue = queue
        self.redis = async_redis_client
        self.settings = settings

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetJobResponse:
        job = await asyncio.to_thread(self.queue.get, request.job_id)
        return jobs_pb2.GetJobResponse(job=job)

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        jobs, token = await asyncio.to_thread(
            self.queue.list, request.kind, list(request.states), request.page_size, request.page_token
        )
        return jobs_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        # A client that goes away cancels this generator's task, which ends the XREAD.
        async for event, job in watch_job(
            self.redis, self.queue.keys, request.job_id, request.from_beginning
        ):
            yield jobs_pb2.WatchJobResponse(event=event, job=job)

    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.CancelJobResponse:
        # Submitters may cancel only their own jobs (the interceptor already required submitter).
        owned = await asyncio.to_thread(self.queue.get, request.job_id)
        check_job_owner(owned.id, owned.submitted_by)
        job = await asyncio.to_thread(self.queue.cancel, request.job_id, request.reason)
        return jobs_pb2.CancelJobResponse(job=job)
