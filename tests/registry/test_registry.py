"""ModelRegistry against real Redis, isolated by the per-test prefix."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from common.api.modelfleet.registry.v1 import registry_pb2
from common.errors import FailedPrecondition, InvalidArgument, NotFound
from common.registry import ModelRegistry, Routing
from common.settings import Settings

DIGEST = "ab" * 32


@pytest.fixture
def registry(redis_client: redis.Redis, settings: Settings) -> ModelRegistry:
    return ModelRegistry(redis_client, settings.redis_prefix)


def make_version(name: str = "iris", **metrics: float) -> registry_pb2.ModelVersion:
    return registry_pb2.ModelVersion(
        model_name=name,
        format=registry_pb2.MODEL_FORMAT_SAFETENSORS,
        artifact_digest=DIGEST,
        artifact_size_bytes=10,
        metrics=metrics,
        description="test",
    )


def register_n(registry: ModelRegistry, n: int, name: str = "iris") -> list[str]:
    return [registry.register(make_version(name)).version for _ in range(n)]


def guard(metric: str, max_drop: float) -> registry_pb2.PromotionGuard:
    return registry_pb2.PromotionGuard(metric=metric, max_drop=max_drop)


def test_register_assigns_numbers_and_timestamps(registry: ModelRegistry) -> None:
    first = registry.register(make_version(test_accuracy=0.9))
    second = registry.register(make_version())
    assert (first.version, second.version) == ("1", "2")
    assert first.created_at.seconds > 0
    stored = registry.get_version("iris", "1")
    assert stored.metrics["test_accuracy"] == pytest.approx(0.9)
    assert stored.artifact_digest == DIGEST
    model = registry.get_model("iris")
    assert (model.latest_version, model.version_count) == ("2", 2)
    assert model.created_at.seconds > 0 and model.updated_at.seconds > 0


def test_register_rejects_bad_input(registry: ModelRegistry) -> None:
    with pytest.raises(InvalidArgument, match="model_name"):
        registry.register(make_version("../etc"))
    bad_digest = make_version()
    bad_digest.artifact_digest = "xyz"
    with pytest.raises(InvalidArgument, match="artifact_digest"):
        registry.register(bad_digest)
    no_format = make_version()
    no_format.format = registry_pb2.MODEL_FORMAT_UNSPECIFIED
    with pytest.raises(InvalidArgument, match="format"):
        registry.register(no_format)


def test_concurrent_registrations_get_distinct_numbers(registry: ModelRegistry) -> None:
    results: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(10):
            number = registry.register(make_version()).version
            with lock:
                results.append(number)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results, key=int) == [str(i) for i in range(1, 41)]
    assert registry.get_model("iris").version_count == 40


def test_resolve_default_numbers_and_aliases(registry: ModelRegistry) -> None:
    register_n(registry, 3)
    assert registry.resolve("iris") == "3"  # no production: latest
    registry.set_alias("iris", "production", "2")
    assert registry.resolve("iris") == "2"
    assert registry.resolve("iris", "1") == "1"
    assert registry.resolve("iris", "production") == "2"
    assert registry.get_version("iris").aliases == ["production"]
    with pytest.raises(NotFound, match="version 9"):
        registry.resolve("iris", "9")
    with pytest.raises(NotFound, match="alias 'staging'"):
        registry.resolve("iris", "staging")
    with pytest.raises(NotFound, match="model 'nope'"):
        registry.resolve("nope")


def test_alias_set_and_rollback_walks_history(registry: ModelRegistry) -> None:
    register_n(registry, 3)
    registry.set_alias("iris", "production", "1")
    registry.set_alias("iris", "production", "2")
    model = registry.set_alias("iris", "production", "3")
    assert model.aliases["production"] == "3"
    assert registry.rollback_alias("iris", "production").aliases["production"] == "2"
    assert registry.rollback_alias("iris", "production").aliases["production"] == "1"
    with pytest.raises(FailedPrecondition, match="no earlier version"):
        registry.rollback_alias("iris", "production")
    with pytest.raises(NotFound, match="alias 'staging'"):
        registry.rollback_alias("iris", "staging")


def test_rollback_skips_deleted_versions(registry: ModelRegistry) -> None:
    register_n(registry, 3)
    for v in ("1", "2", "3"):
        registry.set_alias("iris", "production", v)
    registry.delete_version("iris", "2")
    assert registry.rollback_alias("iris", "production").aliases["production"] == "1"


def test_alias_validation(registry: ModelRegistry) -> None:
    register_n(registry, 1)
    with pytest.raises(InvalidArgument, match="alias '1abc'"):
        registry.set_alias("iris", "1abc", "1")
    with pytest.raises(InvalidArgument, match="version 'x'"):
        registry.set_alias("iris", "production", "x")
    with pytest.raises(NotFound, match="version 5"):
        registry.set_alias("iris", "production", "5")


def test_guard_refuses_a_drop_and_names_both_values(registry: ModelRegistry) -> None:
    registry.register(make_version(test_accuracy=0.95, test_loss=0.10))
    registry.register(make_version(test_accuracy=0.90, test_loss=0.30))
    registry.register(make_version(test_accuracy=0.94))
    registry.set_alias("iris", "production", "1")
    with pytest.raises(FailedPrecondition, match=r"0\.95 to 0\.9") as info:
        registry.set_alias("iris", "production", "2", guard("test_accuracy", 0.01))
    assert "0.01" in info.value.message
    # Loss-like metrics: a rise is a drop.
    with pytest.raises(FailedPrecondition, match=r"test_loss would go from 0\.1 to 0\.3"):
        registry.set_alias("iris", "production", "2", guard("test_loss", 0.1))
    # Within the bar.
    model = registry.set_alias("iris", "production", "3", guard("test_accuracy", 0.02))
    assert model.aliases["production"] == "3"
    assert registry.resolve("iris", "production") == "3"


def test_guard_refuses_missing_metrics(registry: ModelRegistry) -> None:
    registry.register(make_version(test_accuracy=0.95))
    registry.register(make_version())
    with pytest.raises(FailedPrecondition, match="'test_accuracy' is missing"):
        registry.set_alias("iris", "production", "2", guard("test_accuracy", 0.5))  # alias unset
    registry.set_alias("iris", "production", "1")
    with pytest.raises(FailedPrecondition, match=r"candidate: missing, current: 0\.95"):
        registry.set_alias("iris", "production", "2", guard("test_accuracy", 0.5))
    with pytest.raises(InvalidArgument, match=r"guard\.metric"):
        registry.set_alias("iris", "production", "1", guard("", 0.5))
    assert registry.resolve("iris", "production") == "1"


def test_canary_validation_and_routing(registry: ModelRegistry) -> None:
    register_n(registry, 3)
    assert registry.routing("iris") == Routing("3", "", 0.0)
    registry.set_alias("iris", "production", "1")
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(InvalidArgument, match="fraction"):
            registry.set_canary("iris", "2", bad)
    with pytest.raises(InvalidArgument, match="already its default"):
        registry.set_canary("iris", "1", 0.1)
    with pytest.raises(NotFound, match="version 7"):
        registry.set_canary("iris", "7", 0.1)
    model = registry.set_canary("iris", "2", 0.25)
    assert (model.canary.version, model.canary.fraction) == ("2", 0.25)
    assert registry.routing("iris") == Routing("1", "2", 0.25)
    with pytest.raises(FailedPrecondition, match="its canary"):
        registry.delete_version("iris", "2")
    model = registry.end_canary("iris")
    assert not model.HasField("canary") or not model.canary.version
    assert model.aliases["production"] == "1"
    assert registry.routing("iris") == Routing("1", "", 0.0)
    with pytest.raises(FailedPrecondition, match="no canary"):
        registry.end_canary("iris")


def test_end_canary_promotes_with_guard(registry: ModelRegistry) -> None:
    registry.register(make_version(test_accuracy=0.9))
    registry.register(make_version(test_accuracy=0.5))
    registry.register(make_version(test_accuracy=0.91))
    registry.set_alias("iris", "production", "1")
    registry.set_canary("iris", "2", 0.1)
    with pytest.raises(FailedPrecondition, match=r"0\.9 to 0\.5"):
        registry.end_canary("iris", promote=True, guard=guard("test_accuracy", 0.05))
    assert registry.routing("iris") == Routing("1", "2", 0.1)  # refused: nothing changed
    registry.set_canary("iris", "3", 0.1)
    model = registry.end_canary("iris", promote=True, guard=guard("test_accuracy", 0.05))
    assert model.aliases["production"] == "3" and not model.canary.version
    assert registry.rollback_alias("iris", "production").aliases["production"] == "1"


def test_delete_version(registry: ModelRegistry) -> None:
    register_n(registry, 3)
    registry.set_alias("iris", "production", "1")
    with pytest.raises(FailedPrecondition, match="alias 'production'"):
        registry.delete_version("iris", "1")
    registry.delete_version("iris", "3")
    with pytest.raises(NotFound):
        registry.get_version("iris", "3")
    with pytest.raises(NotFound):
        registry.delete_version("iris", "3")
    model = registry.get_model("iris")
    assert (model.latest_version, model.version_count) == ("2", 2)
    assert registry.register(make_version()).version == "4"  # numbers are never reused


def test_pagination(registry: ModelRegistry) -> None:
    for name in ("a1", "a2", "a3", "b1", "b2"):
        registry.register(make_version(name))
    names: list[str] = []
    token = ""
    for _ in range(10):
        page, token = registry.list_models(page_size=2, page_token=token)
        assert len(page) <= 2
        names += [m.name for m in page]
        if not token:
            break
    assert names == ["a1", "a2", "a3", "b1", "b2"]
    page, token = registry.list_models(name_prefix="a", page_size=2)
    assert [m.name for m in page] == ["a1", "a2"]
    page, token = registry.list_models(name_prefix="a", page_size=2, page_token=token)
    assert ([m.name for m in page], token) == (["a3"], "")

    register_n(registry, 4, "c")
    registry.delete_version("c", "3")
    first, token = registry.list_versions("c", page_size=2)
    rest, last = registry.list_versions("c", page_size=2, page_token=token)
    assert [v.version for v in first] == ["4", "2"]
    assert ([v.version for v in rest], last) == (["1"], "")
    with pytest.raises(InvalidArgument, match="page_token"):
        registry.list_versions("c", page_token="garbage!")
    _, models_token = registry.list_models(page_size=1)
    with pytest.raises(InvalidArgument, match="page_token"):  # another listing's token is refused
        registry.list_versions("c", page_token=models_token)
    with pytest.raises(InvalidArgument, match="page_size"):
        registry.list_models(page_size=-1)


def _events(pubsub: redis.client.PubSub, count: int) -> Iterator[dict[str, str]]:
    deadline = time.monotonic() + 5
    seen = 0
    while seen < count and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message and message["type"] == "message":
            seen += 1
            yield json.loads(message["data"])


def test_events_on_every_change(registry: ModelRegistry, redis_client: redis.Redis) -> None:
    pubsub = redis_client.pubsub()
    pubsub.subscribe(registry.channel)
    try:
        register_n(registry, 3)
        registry.set_alias("iris", "production", "1")
        registry.set_alias("iris", "production", "2")
        registry.rollback_alias("iris", "production")
        registry.set_canary("iris", "3", 0.5)
        registry.end_canary("iris")
        registry.delete_version("iris", "3")
        got = list(_events(pubsub, 9))
    finally:
        pubsub.close()
    assert [(e["type"], e["version"], e["alias"]) for e in got] == [
        ("version_registered", "1", ""),
        ("version_registered", "2", ""),
        ("version_registered", "3", ""),
        ("alias_set", "1", "production"),
        ("alias_set", "2", "production"),
        ("alias_rolled_back", "1", "production"),
        ("canary_set", "3", ""),
        ("canary_ended", "3", ""),
        ("version_deleted", "3", ""),
    ]
    assert {e["name"] for e in got} == {"iris"}


def test_concurrent_alias_moves_keep_history_consistent(registry: ModelRegistry) -> None:
    register_n(registry, 4)
    registry.set_alias("iris", "production", "1")
    errors: list[BaseException] = []

    def mover(version: str) -> None:
        try:
            for _ in range(10):
                registry.set_alias("iris", "production", version)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=mover, args=(v,)) for v in ("2", "3", "4")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    final = registry.resolve("iris", "production")
    # Every recorded move is a real change: rollbacks never land on the same version twice in a row.
    previous = final
    for _ in range(5):
        try:
            now = registry.rollback_alias("iris", "production").aliases["production"]
        except FailedPrecondition:
            break
        assert now != previous
        previous = now


def test_unknown_model(registry: ModelRegistry) -> None:
    for call in (
        lambda: registry.get_model("nope"),
        lambda: registry.routing("nope"),
        lambda: registry.list_versions("nope"),
        lambda: registry.set_alias("nope", "production", "1"),
        lambda: registry.set_canary("nope", "1", 0.5),
    ):
        with pytest.raises(NotFound, match="'nope'"):
            call()
