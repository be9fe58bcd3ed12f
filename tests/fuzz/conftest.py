"""One fuzz fleet per session: all four services in a subprocess (so its RSS
and a crash are visible), seeded with a model, a dataset and a job whose names
the strategies mix into their strings, plus a model the fuzzers never name,
used for the post-fuzz health check. Hypothesis runs derandomized without a
database, so CI replays the same inputs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from common.api.modelfleet.data.v1 import data_pb2
from common.artifacts import ArtifactStore
from common.jobs import JobQueue
from common.redis import connect
from common.registry import ModelRegistry
from common.settings import Settings
from tests.conftest import _purge, loopback_settings
from tests.fuzz.harness import (
    CODES,
    RSS_BOUND_MIB,
    RSS_MIB,
    TRIED,
    Fleet,
    assert_healthy,
    infer_ok,
    start_fleet,
)
from tests.inference.conftest import register_mlp
from tests.jobs.helpers import training_job

torch.set_num_threads(1)

FUZZ_MODEL = "fuzz-mlp"
FUZZ_DATASET = "fuzz-iris"


def profile(max_examples: int) -> hypothesis_settings:
    return hypothesis_settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


@pytest.fixture(scope="session")
def fuzz_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # Small limits so hostile sizes hit them instead of building big datasets.
    return loopback_settings(
        "mfz",
        tmp_path_factory.mktemp("fuzz") / "artifacts",
        max_upload_bytes=1024 * 1024,
        max_message_bytes=8 * 1024 * 1024,
    )


@pytest.fixture(scope="session")
def fleet(fuzz_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    client = connect(fuzz_settings.redis_url)
    _purge(client, fuzz_settings.redis_prefix)
    registry = ModelRegistry(client, fuzz_settings.redis_prefix)
    store = ArtifactStore(fuzz_settings.artifact_root)
    keep_model = f"keep-{uuid.uuid4().hex[:8]}"
    register_mlp(registry, store, keep_model)
    register_mlp(registry, store, FUZZ_MODEL, seed=1)
    job = JobQueue(client, fuzz_settings).submit(training_job())
    log_path = tmp_path_factory.mktemp("fuzzlog") / "server.log"
    fleet = start_fleet(fuzz_settings.env(), log_path, keep_model)
    try:
        data = fleet.channel("modelfleet.data.v1.DataService")
        data.unary_unary("/modelfleet.data.v1.DataService/CreateDatasetFromSource")(
            data_pb2.CreateDatasetFromSourceRequest(
                name=FUZZ_DATASET, source=data_pb2.BUILTIN_SOURCE_IRIS
            ).SerializeToString(),
            timeout=60,
        )
        fleet.known = (FUZZ_MODEL, FUZZ_DATASET, job.id, "1", "2")
        for _ in range(20):  # warm the inference path before the baseline
            infer_ok(fleet)
        fleet.baseline_rss = fleet.rss_bytes()
        assert_healthy(fleet)
        yield fleet
        RSS_MIB.update(baseline=fleet.baseline_rss / 2**20, end=fleet.rss_bytes() / 2**20)
    finally:
        fleet.close()
        _purge(client, fuzz_settings.redis_prefix)
        client.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TRIED:
        return
    terminalreporter.section("fuzz: inputs tried per RPC (status codes seen)")
    for path, count in sorted(TRIED.items()):
        codes = ", ".join(f"{code} {n}" for code, n in CODES[path].most_common())
        terminalreporter.write_line(f"{count:6d}  {path}  ({codes})")
    terminalreporter.write_line(f"{sum(TRIED.values()):6d}  total over {len(TRIED)} RPCs")
    if RSS_MIB:
        terminalreporter.write_line(
            f"server RSS {RSS_MIB['baseline']:.0f} -> {RSS_MIB['end']:.0f} MiB (bound: +{RSS_BOUND_MIB} MiB)"
        )
