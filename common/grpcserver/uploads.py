"""Commit a client-streamed upload only if the client finished it.

When a client cancels a stream or lets its deadline pass, grpc.aio ends the
server's request iterator exactly as a normal half-close would, and cancels the
handler's task a moment later. Work the handler already handed to a thread
(parse, then the atomic catalog or registry write) would run on and commit a
truncated upload. ``UploadGuard`` closes that gap: after the last message it lets
a pending cancellation land, and the thread checks the guard right before its
commit step, so a cancelled call commits nothing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

from common.errors import Cancelled

T = TypeVar("T")

# Event-loop turns given to a cancellation in flight after the iterator ended; it
# lands within the first one or two here.
_SETTLE_TURNS = 5


class UploadGuard:
    def __init__(self) -> None:
        self._gone = threading.Event()

    def check(self) -> None:
        """Raise Cancelled if the call ended early; call right before committing."""
        if self._gone.is_set():
            raise Cancelled("the client cancelled the upload or its deadline passed; nothing was stored")

    async def finish(self, commit: Callable[[], T]) -> T:
        """Run ``commit`` (blocking; it calls :meth:`check` before its atomic write)
        in a thread, once the request stream ended and a cancel had time to land."""
        try:
            for _ in range(_SETTLE_TURNS):
                await asyncio.sleep(0)
            return await asyncio.to_thread(commit)
        except asyncio.CancelledError:
            self._gone.set()
            raise
