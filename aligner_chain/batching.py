"""Micro-batching: concurrent callers of one local model share batched forward/generate calls.

A model on a GPU (or CPU) does nearly the same work for a batch of 8 as for 1, so concurrent
``invoke``/``ainvoke`` calls from threads and asyncio tasks are queued and run together: the
worker waits at most ``max_wait_ms`` after the oldest queued request (or until
``max_batch_size`` items are queued), runs one batched call, and hands each caller its own
slice of the results. The queue is bounded: a full queue raises
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

    - ``max_batch_size``: items (pairs) per model call.
    - ``max_wait_ms``: how long the oldest queued item may wait for others to join its batch.
    - ``max_queue``: items that may wait at once; beyond it callers get ``BackpressureError``.
    - ``idle_timeout_s``: the worker thread exits after this long without work (and restarts
      on the next call), so an unused component holds no thread.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(default=8, ge=1)
    max_wait_ms: float = Field(default=5.0, ge=0)
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
    """One caller's items, collected back into one future."""

    __slots__ = ("enqueued", "failed", "future", "items", "remaining", "results", "started")

    def __init__(self, items: list[In]) -> None:
        self.items = items
        self.results: list[Out | None] = [None] * len(items)
        self.remaining = len(items)
        self.future: Future[list[Out]] = Future()
        self.enqueued = time.monotonic()
        self.started = False
        self.failed = False

    def deliver(self, index: int, value: Out) -> None:
        self.results[index] = value
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(list(self.results))  # type: ignore[arg-type]

    def fail(self, exc: BaseException) -> None:
        self.failed = True
        if not self.future.done():
            self.future.set_exception(exc)


_Entry = tuple[_Request[In, Out], int]


class MicroBatcher(Generic[In, Out]):
    """Coalesces concurrent calls of ``fn(items) -> results`` (one result per item, in order).

    Call it like ``fn`` from any thread (``batcher(items)``) or await ``batcher.acall(items)``.
    ``fn`` runs on one worker thread, one batch at a time.

    If a batch holding several callers' items fails, each caller's items are run again on
    their own, so one caller's bad input fails only that caller. A caller cancelled while
    queued is dropped before its items reach the model; one cancelled later leaves the batch
    untouched and its result is discarded.
    """

    def __init__(self, fn: BatchFn[In, Out], config: BatchingConfig | None = None) -> None:
        self._fn = fn
        self.config = config or BatchingConfig()
        self.stats = BatcherStats()
        self._queue: deque[_Entry[In, Out]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Items queued and not yet taken into a batch."""
        return len(self._queue)

    def __call__(self, items: Sequence[In]) -> list[Out]:
        if not items:
            return []
        if threading.current_thread() is self._thread:  # fn calling back into its batcher
            return self._fn(list(items))
        return self._enqueue(items).future.result()

    async def acall(self, items: Sequence[In]) -> list[Out]:
        """Async variant: waits without holding a thread; cancelling it cancels the request."""
        if not items:
            return []
        return await asyncio.wrap_future(self._enqueue(items).future)

    # -- queue -------------------------------------------------------------------------------

    def _enqueue(self, items: Sequence[In]) -> _Request[In, Out]:
        request: _Request[In, Out] = _Request(list(items))
        with self._cond:
            if len(self._queue) + len(request.items) > self.config.max_queue:
                self.stats.rejected += 1
                raise BackpressureError(
                    f"batch queue full ({len(self._queue)} of {self.config.max_queue} items "
                    f"waiting, {len(request.items)} more requested): retry later or shed load"
                )
            self._queue.extend((request, i) for i in range(len(request.items)))
            self.stats.max_pending = max(self.stats.max_pending, len(self._queue))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="aligner-microbatcher", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return request

    def _take(self) -> list[_Entry[In, Out]]:
        """Pop up to ``max_batch_size`` live entries (caller holds the lock)."""
        batch: list[_Entry[In, Out]] = []
        while self._queue and len(batch) < self.config.max_batch_size:
            request, index = self._queue.popleft()
            if not request.started:
                request.started = True
                if not request.future.set_running_or_notify_cancel():
                    request.failed = True  # cancelled while queued: drop its items
            if not request.failed:
                batch.append((request, index))
        return batch

    def _work(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # the worker is dying: no caller may wait forever
            with self._cond:
                self._thread = None
                lost = list(dict.fromkeys(request for request, _ in self._queue))
                self._queue.clear()
            for request in lost:
                request.fail(exc)
            raise

    def _serve(self) -> None:
        max_wait = self.config.max_wait_ms / 1000
        while True:
            with self._cond:
                if not self._queue:
                    self._cond.wait(self.config.idle_timeout_s)
                    if not self._queue:
                        self._thread = None
                        return
                deadline = self._queue[0][0].enqueued + max_wait
                while len(self._queue) < self.config.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._take()
            if batch:
                self._run(batch, isolate=True)

    def _run(self, batch: list[_Entry[In, Out]], *, isolate: bool) -> None:
        items = [request.items[index] for request, index in batch]
        try:
            outputs = self._fn(items)
            if len(outputs) != len(items):
                raise RuntimeError(
                    f"batch function returned {len(outputs)} results for {len(items)}"
                )
        except BaseException as exc:
            requests = list(dict.fromkeys(request for request, _ in batch))
            if not isinstance(exc, Exception):
                for request in requests:
                    request.fail(exc)
                raise
            if isolate and len(requests) > 1:
                self.stats.isolated_reruns += 1
                for request in requests:
                    self._run([e for e in batch if e[0] is request], isolate=False)
            else:
                for request in requests:
                    request.fail(exc)
            return
        self.stats.batches += 1
        self.stats.items += len(items)
        for (request, index), output in zip(batch, outputs):
            request.deliver(index, output)


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
