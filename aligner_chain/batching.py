"""Micro-batching: concurrent callers of one local model share batched forward/generate calls.

A model on a GPU (or CPU) does nearly the same work for a batch of 8 as for 1, so concurrent
``invoke``/``ainvoke`` calls from threads and asyncio tasks are queued and run together. The
batching is continuous: an idle model runs a request at once, and the requests that arrive
while it runs are taken together into the next call, so a lone call never waits and batches
grow with the load. One caller's own batch is one unit, never split (it runs as one call, as
it would without batching); ``max_batch_size`` caps only how many items of separate callers
are merged. The queue is bounded: a full queue raises
:class:`~aligner_chain.errors.BackpressureError` at once instead of growing without limit.

Remote correctors do not need this: the server (vLLM, TGI, ...) batches continuously.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

from langchain_core.runnables.config import run_in_executor
from pydantic import BaseModel, ConfigDict, Field

from aligner_chain.errors import BackpressureError

In = TypeVar("In")
Out = TypeVar("Out")

BatchFn = Callable[[list[In]], list[Out]]


class BatchingConfig(BaseModel):
    """How concurrent calls are coalesced.

    - ``max_batch_size``: the most items (pairs) merged from separate callers into one model
      call. A caller's own batch larger than this still runs whole, in one call. 32 measured
      fastest on CPU (32 concurrent calls: 1.2-1.7x the throughput of 8); a large model with
      long answers on a small GPU may need less (a merged batch that fails, e.g. out of memory,
      is retried caller by caller).
    - ``max_wait_ms``: how long an idle model waits for company before running the oldest
      request. 0 (default) runs it at once: measured on CPU, waiting cost a lone call ~7 ms
      and bought nothing, because callers that arrive while a call runs batch anyway.
    - ``max_queue``: items that may wait at once; beyond it callers get ``BackpressureError``.
    - ``idle_timeout_s``: the worker thread exits after this long without work (and restarts
      on the next call), so an unused component holds no thread.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(default=32, ge=1)
    max_wait_ms: float = Field(default=0.0, ge=0)
    max_queue: int = Field(default=1024, ge=1)
    idle_timeout_s: float = Field(default=30.0, gt=0)


@dataclass
class BatcherStats:
    """Counters for tests and monitoring."""

    batches: int = 0
    items: int = 0
    rejected: int = 0
    max_pending: int = 0
    isolated_reruns: int = 0


class _Request(Generic[In, Out]):
    """One caller's items: a unit that is never split across model calls."""

    __slots__ = ("enqueued", "future", "items")

    def __init__(self, items: list[In]) -> None:
        self.items = items
        self.future: Future[list[Out]] = Future()
        self.enqueued = time.monotonic()

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class MicroBatcher(Generic[In, Out]):
    """Coalesces concurrent calls of ``fn(items) -> results`` (one result per item, in order).

    Call it like ``fn`` from any thread (``batcher(items)``) or await ``batcher.acall(items)``.
    ``fn`` runs one batch at a time: on the worker thread, or, for a synchronous call that
    finds the model idle and nothing queued, on the caller's own thread.

    If a batch holding several callers' items fails, each caller's items are run again on
    their own, so one caller's bad input fails only that caller. A caller cancelled while
    queued is dropped before its items reach the model; one cancelled later leaves the batch
    untouched and its result is discarded.
    """

    def __init__(self, fn: BatchFn[In, Out], config: BatchingConfig | None = None) -> None:
        self._fn = fn
        self.config = config or BatchingConfig()
        self.stats = BatcherStats()
        self._queue: deque[_Request[In, Out]] = deque()
        self._pending = 0  # items in the queue
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False  # a batch is in the model (on the worker or a leading caller)
        self._inside = threading.local()  # set while this thread runs fn

    @property
    def pending(self) -> int:
        """Items queued and not yet taken into a batch."""
        return self._pending

    def __call__(self, items: Sequence[In]) -> list[Out]:
        if not items:
            return []
        if getattr(self._inside, "fn", False):  # fn calling back into its batcher
            return self._fn(list(items))
        request = self._lead(items)
        if request is None:
            return self._enqueue(items).future.result()
        try:
            self._run([request], isolate=False)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify()
        return request.future.result()

    async def acall(self, items: Sequence[In]) -> list[Out]:
        """Async variant: waits without holding a thread; cancelling it cancels the request."""
        if not items:
            return []
        return await asyncio.wrap_future(self._enqueue(items).future)

    # -- queue -------------------------------------------------------------------------------

    def _lead(self, items: Sequence[In]) -> _Request[In, Out] | None:
        """A request for a synchronous caller to run on its own thread: when the model is idle,
        nothing is queued and no wait for company is configured. Handing a lone call to the
        worker thread and back cost wall-clock time on a loaded CPU (two thread wake-ups)."""
        if self.config.max_wait_ms:
            return None
        with self._cond:
            if self._busy or self._queue:
                return None
            self._busy = True
        request: _Request[In, Out] = _Request(list(items))
        request.future.set_running_or_notify_cancel()
        return request

    def _enqueue(self, items: Sequence[In]) -> _Request[In, Out]:
        request: _Request[In, Out] = _Request(list(items))
        with self._cond:
            if self._pending + len(request.items) > self.config.max_queue:
                self.stats.rejected += 1
                raise BackpressureError(
                    f"batch queue full ({self._pending} of {self.config.max_queue} items "
                    f"waiting, {len(request.items)} more requested): retry later or shed load"
                )
            self._queue.append(request)
            self._pending += len(request.items)
            self.stats.max_pending = max(self.stats.max_pending, self._pending)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="aligner-microbatcher", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return request

    def _take(self) -> list[_Request[In, Out]]:
        """The oldest live request whole, then the next ones while the merged batch stays
        within ``max_batch_size`` (caller holds the lock). Cancelled requests are dropped."""
        batch: list[_Request[In, Out]] = []
        size = 0
        while self._queue:
            request = self._queue[0]
            if batch and size + len(request.items) > self.config.max_batch_size:
                break
            self._queue.popleft()
            self._pending -= len(request.items)
            if request.future.set_running_or_notify_cancel():
                batch.append(request)
                size += len(request.items)
        return batch

    def _work(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # the worker is dying: no caller may wait forever
            with self._cond:
                self._thread = None
                lost = list(self._queue)
                self._queue.clear()
                self._pending = 0
            for request in lost:
                request.fail(exc)
            raise

    def _serve(self) -> None:
        max_wait = self.config.max_wait_ms / 1000
        while True:
            with self._cond:
                while self._busy or not self._queue:
                    if not self._cond.wait(self.config.idle_timeout_s) and not self._queue:
                        self._thread = None
                        return
                deadline = self._queue[0].enqueued + max_wait
                while self._pending < self.config.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._take()
                self._busy = bool(batch)
            if batch:
                try:
                    self._run(batch, isolate=True)
                finally:
                    with self._cond:
                        self._busy = False

    def _run(self, batch: list[_Request[In, Out]], *, isolate: bool) -> None:
        items = [item for request in batch for item in request.items]
        try:
            self._inside.fn = True
            try:
                outputs = self._fn(items)
            finally:
                self._inside.fn = False
            if len(outputs) != len(items):
                raise RuntimeError(
                    f"batch function returned {len(outputs)} results for {len(items)}"
                )
        except BaseException as exc:
            if not isinstance(exc, Exception):
                for request in batch:
                    request.fail(exc)
                raise
            if isolate and len(batch) > 1:
                self.stats.isolated_reruns += 1
                for request in batch:
                    self._run([request], isolate=False)
            else:
                for request in batch:
                    request.fail(exc)
            return
        self.stats.batches += 1
        self.stats.items += len(items)
        start = 0
        for request in batch:
            end = start + len(request.items)
            if not request.future.done():
                request.future.set_result(outputs[start:end])
            start = end


class DirectRunner(Generic[In, Out]):
    """The same call shape as :class:`MicroBatcher` without coalescing (batching turned off)."""

    def __init__(self, fn: BatchFn[In, Out]) -> None:
        self._fn = fn

    def __call__(self, items: Sequence[In]) -> list[Out]:
        return self._fn(list(items)) if items else []

    async def acall(self, items: Sequence[In]) -> list[Out]:
        return await run_in_executor(None, self, items)


def make_runner(
    fn: BatchFn[In, Out], batching: BatchingConfig | bool = True
) -> MicroBatcher[In, Out] | DirectRunner[In, Out]:
    """What a model-based component calls its batch function through.

    ``True`` uses the default :class:`BatchingConfig`, ``False`` calls ``fn`` directly.
    """
    if batching is False:
        return DirectRunner(fn)
    return MicroBatcher(fn, None if batching is True else batching)
