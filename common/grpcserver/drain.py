"""Drain: the part of a graceful shutdown that gRPC's own ``server.stop(grace)``
gets wrong for us. Calls that reach a stopping gRPC server before a handler took
them end CANCELLED (grpc/grpc#41785), though nothing ran. So the server first
stops *taking* calls itself while still fully up: new calls are answered
UNAVAILABLE (retry elsewhere) from their headers, calls already accepted run to
the end, and only when none is left and no new call has arrived for a quiet
moment does ``server.stop`` close the port."""

from __future__ import annotations

import asyncio
import time

from common.errors import Unavailable

# No new call for this long before the port closes: clients that were answered
# UNAVAILABLE have moved on, so nothing is in the air when gRPC stops.
QUIET_S = 0.25


class Drain:
    def __init__(self, name: str) -> None:
        self.name = name
        self.draining = False
        self.in_flight = 0
        # When the last call arrived, accepted or refused (monotonic seconds).
        self._last_arrival = 0.0

    def enter(self) -> None:
        self.in_flight += 1
        self._last_arrival = time.monotonic()

    def leave(self) -> None:
        self.in_flight -= 1

    def refusal(self) -> Unavailable:
        """The answer to a call that arrives while draining."""
        self._last_arrival = time.monotonic()
        return Unavailable(f"{self.name} is shutting down; retry on another replica")

    async def wait_idle(self, grace_s: float) -> float:
        """Start draining; return once no accepted call is left and none arrived for
        QUIET_S (at once when nobody called lately), or when ``grace_s`` is spent.
        Returns the grace left."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            quiet = time.monotonic() - self._last_arrival >= QUIET_S
            if self.in_flight <= 0 and quiet:
                break
            await asyncio.sleep(0.01)
        return max(0.0, deadline - time.monotonic())
