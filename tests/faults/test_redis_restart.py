"""Restart Redis (a private instance with AOF) while real training jobs are queued
and running: every job succeeds once, and datasets and models are all still there."""

from __future__ import annotations

import pytest

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog
from common.jobs import JobQueue
from common.redis import connect
from common.registry import ModelRegistry
from common.settings import Settings
from tests.faults.conftest import DATASET, TERMINAL, Fleet, make_dataset, submit_tiny, wait_until
from tests.jobs.test_faults import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

JOBS = 3
WAIT_S = 120.0


def test_jobs_datasets_and_models_survive_a_redis_restart(
    own_redis: RedisServer, fleet: Fleet, fault_settings: Settings
) -> None:
    settings = fault_settings.replace(redis_url=own_redis.url)
    client = connect(settings.redis_url)
    try:
        make_dataset(client, settings)
        queue = JobQueue(client, settings)
        ids = [submit_tiny(client, settings, f"restart-{i}").id for i in range(JOBS)]
        for _ in range(2):
            fleet.worker(settings)
        wait_until(
            lambda: any(queue.get(i).state == jobs_pb2.JOB_STATE_RUNNING for i in ids), WAIT_S, "a job to run"
        )
        at_restart = [queue.get(i).state for i in ids]
        own_redis.stop()
        own_redis.start()

        def all_done() -> bool:
            return all(queue.get(i).state in TERMINAL for i in ids)

        wait_until(all_done, WAIT_S, "every job to finish after the restart", poll_s=0.2)
        jobs = [queue.get(i) for i in ids]
        registry = ModelRegistry(client, settings.redis_prefix)
        store = ArtifactStore(settings.artifact_root)
        versions = {j.id: registry.list_versions(j.training.model_name)[0] for j in jobs}
        dataset = DatasetCatalog(client, settings.redis_prefix).get(DATASET)
        succeeded = sum(j.state == jobs_pb2.JOB_STATE_SUCCEEDED for j in jobs)
        print(
            f"\n[redis restart] jobs={JOBS} at restart: "
            f"running={at_restart.count(jobs_pb2.JOB_STATE_RUNNING)} "
            f"queued={at_restart.count(jobs_pb2.JOB_STATE_QUEUED)} "
            f"succeeded={at_restart.count(jobs_pb2.JOB_STATE_SUCCEEDED)} | after: succeeded={succeeded} "
            f"lost={JOBS - succeeded} attempts={[j.attempts for j in jobs]} "
            f"model versions={sum(len(v) for v in versions.values())} dataset v{dataset.meta.version} kept"
        )
        for job in jobs:
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, (job.id, job.last_error)
            assert [v.lineage.job_id for v in versions[job.id]] == [job.id]
            assert store.path(versions[job.id][0].artifact_digest).is_file()
        assert dataset.meta.num_rows == 300
        for split in dataset.shards.values():
            for digest in split.digests():
                assert store.path(digest).is_file()
    finally:
        client.close()
