"""The models this replica serves: loaded versions, routing, hot swap.

Each served model keeps the versions its routing needs (default and canary).
A swap loads and warms the new version in the background, then replaces the
routing object in one assignment; the old version's batcher is closed, which
lets the work it already queued finish before its thread exits. Because a
request is routed and queued in the same event-loop step (no await between),
no request can reach a batcher after it was closed: swaps fail nothing.

The repository follows the registry: its pub/sub events trigger a reconcile of
the named model, and every ``poll_s`` all models are re-read, so a missed
message only delays a swap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactStore
from common.errors import ModelfleetError, NotFound, Unavailable
from common.models.loading import LoadedModel, load_model
from common.redis import connect_async
from common.registry import ModelRegistry, Routing
from common.settings import Settings
from services.inference.batcher import Batcher
from services.inference.codec import Signature
from services.inference.stats import VersionStats

log = logging.getLogger(__name__)

PLATFORMS = {
    registry_pb2.MODEL_FORMAT_SAFETENSORS: "pytorch_safetensors",
    registry_pb2.MODEL_FORMAT_TORCHSCRIPT: "pytorch_torchscript",
    registry_pb2.MODEL_FORMAT_TORCH_EXPORT: "pytorch_export",
    registry_pb2.MODEL_FORMAT_COMPRESSED: "pytorch_compressed",
}
_NO_ROUTING = Routing(default_version="", canary_version="", canary_fraction=0.0)
# How long an unloaded version's thread gets to finish its queue.
_DRAIN_S = 30.0
# A version that failed to load is retried after this long, doubling each time up
# to the cap (an explicit RepositoryModelLoad retries at once).
LOAD_BACKOFF_S = 5.0
LOAD_BACKOFF_MAX_S = 300.0


@dataclass(eq=False)
class Served:
    """One loaded, warmed version and its batcher."""

    name: str
    version: str
    record: registry_pb2.ModelVersion
    model: LoadedModel
    signature: Signature
    batcher: Batcher
    stats: VersionStats

    @property
    def platform(self) -> str:
        return PLATFORMS.get(self.record.format, "pytorch")


@dataclass(eq=False)
class _Model:
    versions: dict[str, Served] = field(default_factory=dict)
    routing: Routing = _NO_ROUTING
    # A version pinned by RepositoryModelLoad; "" follows the registry.
    pinned: str = ""


@dataclass(frozen=True)
class _Backoff:
    error: ModelfleetError
    delay_s: float
    retry_at: float  # event-loop time


def _next_delay(previous: _Backoff | None) -> float:
    """Seconds before a failed version is tried again: doubling up to five minutes."""
    return min(LOAD_BACKOFF_MAX_S, previous.delay_s * 2) if previous else LOAD_BACKOFF_S


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


class ModelRepository:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        store: ArtifactStore,
        device: torch.device,
        poll_s: float = 3.0,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._store = store
        self._device = device
        self._poll_s = poll_s
        self._models: dict[str, _Model] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._failures: dict[str, str] = {}  # model -> why its last load failed
        # (model, version) -> when a version that failed to load may be tried again.
        self._backoff: dict[tuple[str, str], _Backoff] = {}
        self._unloaded: set[str] = set()  # explicitly unloaded: not followed until loaded again
        self._tasks: set[asyncio.Task[None]] = set()
        self._follower: asyncio.Task[None] | None = None
        # Start-up models not loaded yet: a call for one is retryable (UNAVAILABLE), not
        # NOT_FOUND, since the port opens before they load and a client should try elsewhere.
        # Seeded here because the port may open before start() runs; with "*" every
        # name counts as starting until the registry has been listed.
        self._starting: set[str] = set(settings.inference_models) - {"*"}
        self._listing = "*" in settings.inference_models
        self.ready = False

    # --- hot path

    def route(self, name: str, version: str) -> Served:
        model = self._models.get(name)
        if model is None:
            raise self._absent(name)
        if not version:
            routing = model.routing
            version = routing.default_version
            if routing.canary_version and random.random() < routing.canary_fraction:
                version = routing.canary_version
        served = model.versions.get(version)
        if served is None:
            raise NotFound(f"version {version!r} of model {name!r} is not loaded on this server")
        return served

    def _absent(self, name: str) -> ModelfleetError:
        if name in self._starting or self._listing:
            return Unavailable(f"model {name!r} is still loading on this server (starting up); retry")
        return NotFound(f"model {name!r} is not loaded on this server")

    # --- queries

    def served(self, name: str = "", version: str = "") -> list[Served]:
        """Loaded versions, optionally of one model/version (NotFound when none)."""
        if not name:
            return [s for m in self._models.values() for s in m.versions.values()]
        if version:
            return [self.route(name, version)]
        model = self._models.get(name)
        if model is None:
            raise self._absent(name)
        return list(model.versions.values())

    def default(self, name: str) -> Served:
        return self.route(name, self._routing(name).default_version)

    def _routing(self, name: str) -> Routing:
        model = self._models.get(name)
        if model is None:
            raise self._absent(name)
        return model.routing

    def is_ready(self, name: str, version: str) -> bool:
        model = self._models.get(name)
        if model is None:
            return False
        return (version or model.routing.default_version) in model.versions

    async def index(self, ready_only: bool) -> list[IndexEntry]:
        entries = [IndexEntry(s.name, s.version, "READY", "") for s in self.served()]
        if ready_only:
            return entries
        loaded = {e.name for e in entries}
        served = {(e.name, e.version) for e in entries}
        for (name, version), backoff in sorted(self._backoff.items()):
            if (name, version) not in served:
                entries.append(IndexEntry(name, version, "UNAVAILABLE", backoff.error.message))
                loaded.add(name)
        for name in sorted(await asyncio.to_thread(self._registry_names)):
            if name not in loaded:
                entries.append(IndexEntry(name, "", "UNAVAILABLE", self._failures.get(name, "not loaded")))
        return entries

    # --- lifecycle

    async def start(self) -> None:
        """Load and warm the start-up models, then follow the registry."""
        names = await asyncio.to_thread(self._startup_names)
        self._starting.update(names)
        self._listing = False
        await asyncio.gather(*(self._start_one(n) for n in names))
        self._follower = asyncio.create_task(self._follow(), name="registry-follower")
        self.ready = True

    async def _start_one(self, name: str) -> None:
        try:
            await self._reconcile_quietly(name)
        finally:
            self._starting.discard(name)

    async def stop(self) -> None:
        self.ready = False
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        served = self.served()
        self._models.clear()
        for s in served:
            s.batcher.close()
        await asyncio.gather(*(s.batcher.join(_DRAIN_S) for s in served))

    async def load(self, name: str, version: str = "") -> None:
        """RepositoryModelLoad: serve ``name`` (pinned to ``version`` if given,
        else following the registry). A failure keeps what was serving."""
        self._unloaded.discard(name)
        async with self._lock(name):
            model = self._models.get(name)
            previous = model.pinned if model else ""
            pin = str(int(version)) if (version.isascii() and version.isdigit()) else version
            errors = await self._apply(name, pin, force=True)
            if errors:
                if name in self._models:
                    self._models[name].pinned = previous
                raise errors[0]

    async def unload(self, name: str) -> None:
        """RepositoryModelUnload: stop serving ``name`` until it is loaded again."""
        async with self._lock(name):
            model = self._models.pop(name, None)
            if model is None:
                raise self._absent(name)
            self._unloaded.add(name)
            self._retire(model.versions.values())

    # --- following the registry

    def _follows(self, name: str) -> bool:
        if name in self._unloaded:
            return False
        wanted = self._settings.inference_models
        return name in self._models or "*" in wanted or name in wanted

    def _registry_names(self) -> list[str]:
        names: list[str] = []
        token = ""
        while True:
            models, token = self._registry.list_models(page_size=500, page_token=token)
            names.extend(m.name for m in models)
            if not token:
                return names

    def _startup_names(self) -> list[str]:
        wanted = self._settings.inference_models
        if "*" in wanted:
            return self._registry_names()
        return list(wanted)

    async def _follow(self) -> None:
        client = connect_async(self._settings.redis_url)
        pubsub = client.pubsub()
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + self._poll_s
        try:
            while True:
                try:
                    if not pubsub.subscribed:
                        await pubsub.subscribe(self._registry.channel)
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        name = _event_model(message.get("data"))
                        if name and self._follows(name):
                            self._spawn(self._reconcile_quietly(name))
                    if loop.time() >= next_poll:
                        next_poll = loop.time() + self._poll_s
                        names = await asyncio.to_thread(self._startup_names)
                        for name in {*names, *self._models}:
                            if self._follows(name):
                                self._spawn(self._reconcile_quietly(name))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # Redis hiccup: keep following; the periodic re-read catches up.
                    log.warning("registry follower error; retrying", exc_info=True)
                    await asyncio.sleep(1.0)
        finally:
            await pubsub.aclose()
            await client.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconcile_quietly(self, name: str) -> None:
        async with self._lock(name):
            model = self._models.get(name)
            await self._apply(name, model.pinned if model else "")

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def _apply(self, name: str, pin: str, force: bool = False) -> list[ModelfleetError]:
        """Bring ``name`` to its target routing (caller holds its lock); returns load errors.
        Versions that failed to load are skipped until their backoff ends, unless ``force``."""
        try:
            if pin:
                target = Routing(default_version=pin, canary_version="", canary_fraction=0.0)
            else:
                target = await asyncio.to_thread(self._registry.routing, name)
        except NotFound as exc:
            gone = self._models.pop(name, None)
            if gone is not None:
                log.info("model left the registry; unloading", extra={"model": name})
                self._retire(gone.versions.values())
            return [exc]
        model = self._models.get(name) or _Model()
        loop = asyncio.get_running_loop()
        errors: list[ModelfleetError] = []
        loaded: dict[str, Served] = {}
        for version in {target.default_version, target.canary_version} - {""} - set(model.versions):
            backoff = self._backoff.get((name, version))
            if backoff is not None and not force and loop.time() < backoff.retry_at:
                # Failed recently: the registry poll does not retry it before its backoff ends.
                errors.append(backoff.error)
                continue
            try:
                loaded[version] = await self._load_version(name, version)
            except Exception as exc:
                error = (
                    exc
                    if isinstance(exc, ModelfleetError)
                    else ModelfleetError(f"version {version} failed to load: {type(exc).__name__}")
                )
                errors.append(error)
                self._failures[name] = error.message
                delay = _next_delay(backoff)
                self._backoff[(name, version)] = _Backoff(error, delay, loop.time() + delay)
                log.warning(
                    "model load failed",
                    exc_info=not isinstance(exc, ModelfleetError),
                    extra={"model": name, "version": version, "reason": error.message, "retry_in_s": delay},
                )
            else:
                self._backoff.pop((name, version), None)
        available = {**model.versions, **loaded}
        # A version that failed to load keeps its predecessor serving.
        default = (
            target.default_version if target.default_version in available else model.routing.default_version
        )
        canary = target.canary_version if target.canary_version in available else ""
        routing = Routing(default, canary, target.canary_fraction if canary else 0.0)
        keep = {v: s for v, s in available.items() if v in (default, canary)}
        retired = [s for v, s in available.items() if v not in keep]
        if not keep:
            self._models.pop(name, None)
        else:
            if not errors:
                self._failures.pop(name, None)
            # One assignment each: requests see either the old or the new state.
            self._models[name] = _Model(versions=keep, routing=routing, pinned=pin)
            if routing != model.routing:
                log.info(
                    "model routing switched",
                    extra={
                        "model": name,
                        "default": default,
                        "canary": canary,
                        "fraction": routing.canary_fraction,
                    },
                )
        self._retire(retired)
        return errors

    async def _load_version(self, name: str, version: str) -> Served:
        record = await asyncio.to_thread(self._registry.get_version, name, version)
        model = await asyncio.to_thread(load_model, record, self._store, self._device)
        signature = Signature(
            name, model.inputs, model.outputs, accepts_missing=bool(record.normalization.fill)
        )
        stats = VersionStats(name, version)
        settings = self._settings
        batcher = Batcher(
            name,
            version,
            model,
            signature,
            stats,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_us=settings.max_queue_delay_us,
            max_queue_size=settings.max_queue_size,
            loop=asyncio.get_running_loop(),
        )
        await asyncio.to_thread(batcher.warm_up)
        batcher.start()
        log.info("model version ready", extra={"model": name, "version": version, "format": record.format})
        return Served(name, version, record, model, signature, batcher, stats)

    def _retire(self, versions: Iterable[Served]) -> None:
        for served in versions:
            served.batcher.close()
            self._spawn(served.batcher.join(_DRAIN_S))
            log.info("model version unloading", extra={"model": served.name, "version": served.version})


def _event_model(data: object) -> str:
    try:
        event = json.loads(data) if isinstance(data, bytes | str) else None
    except ValueError:
        return ""
    return str(event.get("name", "")) if isinstance(event, dict) else ""
