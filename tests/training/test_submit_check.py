"""``submit --check`` and ``validate_only``: the server checks a job as a submit
would (dataset existence, budgets) and queues nothing; the CLI reports each
refusal as FILE:LINE. Before, --check said "valid" for jobs the server refused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.training.v1 import training_pb2, training_pb2_grpc
from common.api.modelfleet.training.v1 import training_spec_pb2 as ts
from common.jobs import JobQueue
from common.settings import Settings
from services.cli.main import main
from services.training.server import build
from tests.training.conftest import Dataset

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def target(fast_settings: Settings, redis_client: redis.Redis) -> AsyncIterator[str]:
    host = await build(fast_settings)
    port = await host.start()
    await host.ready()
    yield f"127.0.0.1:{port}"
    await host.stop(0)


def _queued(settings: Settings, client: redis.Redis) -> list[jobs_pb2.Job]:
    return JobQueue(client, settings).list()[0]


async def test_validate_only_checks_everything_and_queues_nothing(
    target: str, digits: Dataset, fast_settings: Settings, redis_client: redis.Redis
) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        good = training_pb2.SubmitTrainingJobRequest(
            spec=ts.TrainingSpec(dataset_name="digits", model_name="m"), validate_only=True
        )
        reply = await stub.SubmitTrainingJob(good)
        assert not reply.HasField("job")
        for spec, code in (
            (ts.TrainingSpec(dataset_name="nope", model_name="m"), grpc.StatusCode.NOT_FOUND),
            (
                ts.TrainingSpec(dataset_name="digits", model_name="m", epochs=-1),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SubmitTrainingJob(
                    training_pb2.SubmitTrainingJobRequest(spec=spec, validate_only=True)
                )
            assert err.value.code() == code
    assert _queued(fast_settings, redis_client) == []


async def test_submit_check_asks_the_server(
    target: str,
    digits: Dataset,
    fast_settings: Settings,
    redis_client: redis.Redis,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "jobs.yaml"
    good, missing = (
        "kind: training\ndataset_name: digits\nmodel_name: a\n",
        "kind: training\ndataset_name: nope\n",
    )
    path.write_text(good + "---\n" + missing + "model_name: b\n")
    args = ["submit", "--check", str(path), "--training-target", target]
    assert await asyncio.to_thread(main, args) == 2
    captured = capsys.readouterr()
    assert f"{path}:5: NOT_FOUND" in captured.err and "'nope'" in captured.err
    assert "1 of 2 job(s) valid" in captured.out
    path.write_text(good)
    assert await asyncio.to_thread(main, [*args, "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] and report["errors"] == [] and report["unchecked"] == []
    assert _queued(fast_settings, redis_client) == []
