"""Dynamic batching for one loaded model version.

Requests are queued (highest ``priority`` first, then arrival order) from the
event loop; one dedicated thread per version takes as many rows as fit in
``max_batch_size``, runs one forward pass under ``torch.inference_mode``, splits
the outputs back per request and resolves all of the batch's futures with a
single ``call_soon_threadsafe``. With ``max_queue_delay_us == 0`` an idle model
dispatches at once; while a batch runs, arrivals pile up and form the next one.
Expired (``timeout``/deadline) and cancelled requests are dropped before they run.

Under closed-loop load (clients that send again as soon as they are answered)
that alone splits the clients into cohorts that take turns (a batch of 16 runs
while the other 16 wait), or runs a full batch and then wastes a forward pass
on the first caller to come back. So after a batch the next one waits a
moment, at most half a forward pass from the end of the last, for the rows
expected back: the callers just answered plus what was already queued. A lone
caller expects only itself and never waits; neither does a model idle longer
than that.

A model whose last forward pass took under ``INLINE_PASS_NS`` runs a request
that finds it idle (nothing queued, nothing running, no batching delay asked
for, no more rows than that pass had) right on the event loop: the two thread
hand-offs it saves cost more than such a pass.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from common.models.loading import LoadedModel, first_line
from services.inference.codec import (
    OutputTensor,
    Signature,
    batch_tensor,
    output_array,
    outputs_of,
    zero_inputs,
)
from services.inference.stats import BatchTiming, VersionStats

log = logging.getLogger(__name__)

Result = list[OutputTensor] | BaseException
Deliver = Callable[[list[tuple[asyncio.Future[list[OutputTensor]], Result]]], None]

# Forward passes at most this long run on the event loop when the model is idle
# (see the module docstring): well under what the loop spends on one request.
INLINE_PASS_NS = 100_000


@dataclass(eq=False, slots=True)
class Work:
    arrays: list[np.ndarray]
    rows: int
    outputs: list[int] | None  # indices of requested outputs; None = all
    deadline_ns: int  # perf_counter_ns; 0 = none
    enqueued_ns: int
    future: asyncio.Future[list[OutputTensor]]


class Batcher:
    def __init__(
        self,
        name: str,
        version: str,
        model: LoadedModel,
        signature: Signature,
        stats: VersionStats,
        *,
        max_batch_size: int,
        max_queue_delay_us: int,
        max_queue_size: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.name = name
        self.version = version
        self.model = model
        self.signature = signature
        self.stats = stats
        self.max_batch_size = max_batch_size if signature.batchable else 1
        self._delay_ns = max_queue_delay_us * 1000
        self._max_queue = max_queue_size
        self._loop = loop
        self._cond = threading.Condition()
        self._heap: list[tuple[int, int, Work]] = []
        self._queued_rows = 0
        self._seq = itertools.count()
        self._closed = False
        # After a batch: the rows expected back soon (that batch's callers plus
        # what was already queued) and until when to wait for them: see the
        # module docstring. The wait is half of the last forward pass.
        self._expected_rows = 0
        self._expect_until_ns = 0
        self._merge_wait_ns = 0
        # Queued rows at which submit() wakes the model thread: 1 while it idles,
        # more while it waits for a batch to fill, so the arrivals in between do
        # not each cost it a wake-up and the event loop a GIL hand-off.
        self._wake_rows = 1
        self._running = False  # a forward pass is in progress (model thread or inline)
        # The last forward pass: its duration (unknown until the first) and rows.
        self._last_pass_ns = 1 << 62
        self._last_pass_rows = 0
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}-{version}", daemon=True)

    # --- event-loop side

    def submit(
        self, arrays: list[np.ndarray], rows: int, outputs: list[int] | None, priority: int, deadline_ns: int
    ) -> asyncio.Future[list[OutputTensor]]:
        future: asyncio.Future[list[OutputTensor]] = self._loop.create_future()
        work = Work(arrays, rows, outputs, deadline_ns, time.perf_counter_ns(), future)
        with self._cond:
            if self._closed:
                raise Unavailable(f"model {self.name!r} version {self.version} is unloading; retry")
            if len(self._heap) >= self._max_queue:
                self.stats.record_failure(0)
                raise ResourceExhausted(
                    f"queue of model {self.name!r} version {self.version} "
                    f"is full ({self._max_queue} requests)"
                )
            inline = (
                not self._heap
                and not self._running
                and not self._delay_ns
                and self._last_pass_ns <= INLINE_PASS_NS
                and rows <= self._last_pass_rows  # so this pass is no longer than that one
            )
            if inline:
                self._running = True
            else:
                heapq.heappush(self._heap, (-priority, next(self._seq), work))
                self._queued_rows += rows
                if self._queued_rows >= self._wake_rows:
                    self._cond.notify()
        if inline:
            # Nothing else can be queued meanwhile: submit() runs on this loop.
            try:
                with torch.inference_mode():
                    self._execute([work], _resolve)
            finally:
                with self._cond:
                    self._running = False
        return future

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop taking requests; the thread finishes what is queued, then exits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    async def join(self, timeout_s: float) -> None:
        await asyncio.to_thread(self._thread.join, timeout_s)

    # --- model side (own thread, or a worker thread for warm-up)

    def warm_up(self) -> None:
        """Run the model at batch 1 and at the largest batch before it reports ready,
        so first requests do not pay for lazy initialisation (skipped when an input
        has variable dims past the batch: no size is known to be valid)."""
        if not self.signature.probe_ready:
            return
        sizes = sorted({1, self.max_batch_size})
        with torch.inference_mode():
            for rows in sizes:
                inputs = zero_inputs(self.signature, rows, self.model.device)
                outputs_of(self.model.module(*inputs), self.signature.outputs)

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                taken = self._next_batch()
                if taken is None:
                    return
                batch, dropped = taken
                try:
                    if dropped:
                        self._drop(dropped)
                    if batch:
                        self._execute(batch, self._deliver)
                except Exception as exc:
                    # Model errors are answered inside _execute; anything else is a bug,
                    # which must fail these requests, not strand every later one.
                    log.exception("batcher error", extra={"model": self.name, "version": self.version})
                    self._deliver([(w.future, exc) for w in (*batch, *dropped)])
                with self._cond:
                    self._running = False
                    if batch:
                        ran = sum(w.rows for w in batch)
                        self._expected_rows = min(self.max_batch_size, ran + self._queued_rows)
                        self._expect_until_ns = time.perf_counter_ns() + self._merge_wait_ns

    def _next_batch(self) -> tuple[list[Work], list[Work]] | None:
        with self._cond:
            while not self._heap:
                if self._closed:
                    return None
                self._cond.wait()
            if self._queued_rows < self._expected_rows and time.perf_counter_ns() < self._expect_until_ns:
                self._fill(self._expected_rows, self._expect_until_ns)
            elif self._delay_ns and not self._closed:
                # Let an idle model's batch fill for up to the delay after its oldest request.
                oldest = min(item[2].enqueued_ns for item in self._heap)
                self._fill(self.max_batch_size, oldest + self._delay_ns)
            batch: list[Work] = []
            dropped: list[Work] = []
            rows = 0
            now = time.perf_counter_ns()
            while self._heap:
                work = self._heap[0][2]
                if batch and rows + work.rows > self.max_batch_size:
                    break
                heapq.heappop(self._heap)
                self._queued_rows -= work.rows
                if work.future.cancelled() or (work.deadline_ns and now > work.deadline_ns):
                    dropped.append(work)
                    continue
                batch.append(work)
                rows += work.rows
                if not self.signature.batchable:
                    break
            self._running = bool(batch)
            return batch, dropped

    def _fill(self, rows: int, until_ns: int) -> None:
        """Wait (holding the condition) until ``rows`` are queued, ``until_ns`` or close."""
        self._wake_rows = rows
        try:
            while self._queued_rows < rows and not self._closed:
                left = until_ns - time.perf_counter_ns()
                if left <= 0:
                    break
                self._cond.wait(left / 1e9)
        finally:
            self._wake_rows = 1

    def _drop(self, dropped: list[Work]) -> None:
        now = time.perf_counter_ns()
        results: list[tuple[asyncio.Future[list[OutputTensor]], Result]] = []
        for work in dropped:
            self.stats.record_failure(now - work.enqueued_ns)
            if not work.future.cancelled():
                error = DeadlineExceeded(
                    f"request to model {self.name!r} version {self.version} timed out in the queue"
                )
                results.append((work.future, error))
        self._deliver(results)

    def _execute(self, batch: list[Work], deliver: Deliver) -> None:
        sig = self.signature
        device = self.model.device
        start = time.perf_counter_ns()
        try:
            inputs = [
                batch_tensor([w.arrays[i] for w in batch], spec.dtype, device)
                for i, spec in enumerate(sig.inputs)
            ]
            rows = sum(w.rows for w in batch)
            ready = time.perf_counter_ns()
            result = self._forward(inputs, rows)
            inferred = time.perf_counter_ns()
            self._last_pass_ns, self._last_pass_rows = inferred - ready, rows
            self._merge_wait_ns = self._last_pass_ns // 2
            arrays = [
                output_array(n, t) for n, t in zip(sig.outputs, outputs_of(result, sig.outputs), strict=True)
            ]
            if sig.batchable:
                for name, (_, array) in zip(sig.outputs, arrays, strict=True):
                    if array.ndim == 0 or array.shape[0] != rows:
                        raise FailedPrecondition(
                            f"model output {name!r} has shape {list(array.shape)} for a batch of {rows} rows"
                        )
            results: list[tuple[asyncio.Future[list[OutputTensor]], Result]] = []
            every = range(len(sig.outputs))
            offset = 0
            for work in batch:
                end = offset + work.rows
                outs = []
                for index in work.outputs if work.outputs is not None else every:
                    datatype, array = arrays[index]
                    part = array[offset:end] if sig.batchable else array
                    outs.append(OutputTensor(sig.outputs[index], datatype, part.shape, part.tobytes()))
                results.append((work.future, outs))
                offset = end
            done = time.perf_counter_ns()
        except Exception as exc:
            if len(batch) > 1:
                # One request the model cannot take (an out-of-range token id, a
                # shape it rejects) must not fail the requests batched with it.
                log.warning(
                    "batch failed; running its requests one by one",
                    extra={"model": self.name, "version": self.version, "requests": len(batch)},
                )
                for work in batch:
                    self._execute([work], deliver)
                return
            if isinstance(exc, InvalidArgument | ResourceExhausted):
                log.info("request refused by the model", extra={"model": self.name, "version": self.version})
            else:
                log.exception(
                    "batch failed", extra={"model": self.name, "version": self.version, "requests": 1}
                )
            now = time.perf_counter_ns()
            for work in batch:
                self.stats.record_failure(now - work.enqueued_ns)
            deliver([(w.future, exc) for w in batch])
            return
        # Recorded before the answers go out: a client that reads the statistics
        # right after its response must find its batch counted. Bookkeeping that
        # fails must not fail answers already computed.
        try:
            self.stats.record_batch(
                BatchTiming(
                    rows=rows,
                    request_ns=[done - w.enqueued_ns for w in batch],
                    queue_ns=[start - w.enqueued_ns for w in batch],
                    input_ns=ready - start,
                    infer_ns=inferred - ready,
                    output_ns=done - inferred,
                )
            )
        except Exception:
            log.exception(
                "batch statistics not recorded", extra={"model": self.name, "version": self.version}
            )
        deliver(results)

    def _forward(self, inputs: list[torch.Tensor], rows: int) -> object:
        """The module's result; its failures as the status the caller should see:
        out of memory is RESOURCE_EXHAUSTED, anything else the model raised on a
        request is INVALID_ARGUMENT (the upload proved it runs on its own signature)."""
        where = f"model {self.name!r} version {self.version}"
        try:
            result = self.model.module(*inputs)
            if self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)
            return result
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise ResourceExhausted(f"{where} ran out of memory on {rows} rows: {first_line(exc)}") from exc
        except Exception as exc:
            raise InvalidArgument(f"{where} cannot run this input: {first_line(exc)}") from exc

    def _deliver(self, results: list[tuple[asyncio.Future[list[OutputTensor]], Result]]) -> None:
        if not results:
            return
        try:
            self._loop.call_soon_threadsafe(_resolve, results)
        except RuntimeError:
            log.warning("event loop closed; %d results dropped", len(results))


def _resolve(results: list[tuple[asyncio.Future[list[OutputTensor]], Result]]) -> None:
    for future, value in results:
        if future.done():
            continue  # cancelled by the client meanwhile
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)
