"""ServiceHost: builds a grpc.aio server the same way for every service.

It adds the standard ``grpc.health.v1`` service (NOT_SERVING until the service
says it is ready, and again from shutdown, so Kubernetes' native gRPC probes
work), server reflection, message size limits, the interceptor (auth, ids,
metrics, error mapping), an optional Prometheus HTTP endpoint, an optional
plaintext health-only port (``health_port``, for probes when TLS is on), and a graceful
SIGTERM/SIGINT drain: health flips to NOT_SERVING, in-flight calls get
``shutdown_grace_s`` to finish, then the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from common.auth import Authenticator
from common.errors import Unavailable
from common.grpcserver.drain import Drain
from common.grpcserver.interceptor import ServerInterceptor
from common.grpcserver.tls import server_credentials
from common.settings import Settings

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# How often depends_on probes run.
DEPENDENCY_POLL_S = 1.0


def authenticator_for(settings: Settings) -> Authenticator:
    tokens_file = Path(settings.auth_tokens_file) if settings.auth_tokens_file else None
    return Authenticator(settings.auth_tokens, tokens_file)


class ServiceHost:
    def __init__(self, settings: Settings, name: str, port: int, max_receive_bytes: int = 0) -> None:
        """``max_receive_bytes``: the largest request message (0: MODELFLEET_MAX_MESSAGE_BYTES);
        gRPC refuses a bigger one with RESOURCE_EXHAUSTED before the servicer sees it."""
        self.settings = settings
        self.name = name
        self.port = port
        # Every service exposes Prometheus metrics on the process's metrics port (0 = off).
        self.metrics_port = settings.metrics_port
        self._service_names: list[str] = []
        self._ready_hooks: list[Callable[[], Awaitable[None]]] = []
        self._shutdown_hooks: list[Callable[[], Awaitable[None]]] = []
        self._stopping = asyncio.Event()
        self.drain = Drain(name)
        # Health: what the service asked for (set_serving), held down while a
        # dependency the service cannot work without is unreachable.
        self._wanted = False
        self._dependencies: list[tuple[str, Callable[[], object]]] = []
        self._down: set[str] = set()
        self._monitor: asyncio.Task[None] | None = None
        options = [
            ("grpc.max_receive_message_length", max_receive_bytes or settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # Accept client keepalive pings every 10 s so long streams survive idle proxies.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        self.server = grpc.aio.server(
            interceptors=[ServerInterceptor(authenticator_for(settings), self.drain)],
            options=options,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.health_server: grpc.aio.Server | None = None
        if settings.health_port:
            # Plaintext, health only and no interceptor: the same servicer object, so
            # readiness and drain read the same here as on the (TLS) main port.
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)

    def add(self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any, service_name: str) -> None:
        """Add a servicer: ``register`` is the generated ``add_XServicer_to_server``,
        ``service_name`` its full name (e.g. ``inference.GRPCInferenceService``)."""
        register(servicer, self.server)
        self._service_names.append(service_name)

    def on_ready(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` once the port is open and before health reports SERVING
        (e.g. load and warm models): probes then see NOT_SERVING, not a closed port."""
        self._ready_hooks.append(hook)

    def depends_on(self, name: str, probe: Callable[[], object]) -> None:
        """Report NOT_SERVING while ``probe`` (blocking; run in a thread every
        ``DEPENDENCY_POLL_S``) raises, and SERVING again once it passes: for a
        dependency without which the service answers nothing useful (Redis)."""
        self._dependencies.append((name, probe))

    async def ready(self) -> None:
        """Run the on-ready hooks (once), then report SERVING."""
        hooks, self._ready_hooks = self._ready_hooks, []
        for hook in hooks:
            await hook()
        await self.set_serving(True)
        if self._dependencies and self._monitor is None:
            self._monitor = asyncio.create_task(self._watch_dependencies(), name=f"{self.name}-dependencies")

    async def _watch_dependencies(self) -> None:
        while not self._stopping.is_set():
            for name, probe in self._dependencies:
                try:
                    await asyncio.wait_for(asyncio.to_thread(probe), DEPENDENCY_POLL_S * 2)
                except Exception as exc:
                    if name not in self._down:
                        log.warning("dependency unreachable", extra={"dependency": name, "reason": str(exc)})
                        self._down.add(name)
                        await self._publish()
                else:
                    if name in self._down:
                        log.info("dependency reachable again", extra={"dependency": name})
                        self._down.discard(name)
                        await self._publish()
            await asyncio.sleep(DEPENDENCY_POLL_S)

    def on_shutdown(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` after in-flight calls drained (e.g. stop batchers, close Redis)."""
        self._shutdown_hooks.append(hook)

    async def start(self) -> int:
        """Bind and start; returns the bound port (useful with port 0). Health
        reports NOT_SERVING until :meth:`set_serving`."""
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        credentials = server_credentials(self.settings)
        bound = self._bind(self.server, self.port, credentials)
        if self.health_server is not None:
            self._bind(self.health_server, self.settings.health_port, None)
        self.port = bound
        await self.set_serving(False)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self.metrics_port:
            try:
                start_http_server(self.metrics_port, addr=self.settings.host)
            except OSError as exc:
                await self.server.stop(None)
                if self.health_server is not None:
                    await self.health_server.stop(None)
                raise Unavailable(
                    f"{self.name}: cannot serve metrics on port {self.metrics_port}: {exc}"
                ) from exc
        log.info(
            "%s listening",
            self.name,
            extra={
                "port": bound,
                "metrics_port": self.metrics_port,
                "health_port": self.settings.health_port or None,
                "tls": credentials is not None,
            },
        )
        return bound

    def _bind(self, server: grpc.aio.Server, port: int, credentials: grpc.ServerCredentials | None) -> int:
        address = f"{self.settings.host}:{port}"
        try:
            if credentials is None:
                bound = server.add_insecure_port(address)
            else:
                bound = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise Unavailable(f"{self.name}: cannot listen on {address}: {exc}") from exc
        if bound == 0:
            raise Unavailable(f"{self.name}: cannot listen on {address} (port in use?)")
        return bound

    async def set_serving(self, serving: bool) -> None:
        self._wanted = serving
        await self._publish()

    async def _publish(self) -> None:
        serving = self._wanted and not self._down and not self._stopping.is_set()
        status = _SERVING if serving else _NOT_SERVING
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING first so load balancers move away, then let
        in-flight calls finish within the grace period, then shutdown hooks."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.cancel()
        await self.set_serving(False)
        grace = self.settings.shutdown_grace_s if grace is None else grace
        log.info("%s draining", self.name, extra={"grace_s": grace, "in_flight": self.drain.in_flight})
        # New calls are answered UNAVAILABLE while accepted ones finish; gRPC's own
        # stop comes after (see common/grpcserver/drain.py).
        left = await self.drain.wait_idle(grace)
        await self.server.stop(left)
        if self.health_server is not None:
            # Probes saw NOT_SERVING through the whole drain; only now does the port close.
            await self.health_server.stop(None)
        for hook in self._shutdown_hooks:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        log.info("%s stopped", self.name)

    async def serve(self) -> None:
        """Start, get ready, report SERVING and run until SIGTERM/SIGINT, then
        drain: the whole life of a service process."""
        await self.start()
        await self.ready()
        await self.run_until_signal()

    async def run_until_signal(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain and stop."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server_done = asyncio.ensure_future(self.server.wait_for_termination())
        signal_seen = asyncio.ensure_future(stop.wait())
        await asyncio.wait({server_done, signal_seen}, return_when=asyncio.FIRST_COMPLETED)
        signal_seen.cancel()
        await self.stop()
        server_done.cancel()
