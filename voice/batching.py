"""Micro-batching of requests from many sessions: one worker thread per stage takes the oldest waiting
request, waits a short window for more that can share its batch, and runs them in one engine call.

On a GPU a batch of 8 costs about what one request does, so batching is how one process serves many sessions.
On a 2-core CPU it is off by default: a batch of two ASR requests takes 0.60 s against 0.35 s + 0.35 s one by
one (measured), so the first session waits longer than it gains (docs/benchmarks.md).

Requests are served first come, first served: a session has at most one request waiting at each stage (its
next clause waits for the previous one), so the queue is fair between sessions. Only requests with the same
batch key share a batch (the same TTS model, say); a request whose key is None always runs alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatchingOptions:
    max_batch: int = 1
    """Largest batch; 1 turns batching off (every request runs alone, in arrival order)."""
    window: float = 0.0
    """Seconds the oldest request may wait for others to join its batch; 0 batches only what is already
    waiting."""


@dataclass(eq=False)
class _Job(Generic[T]):
    item: T
    key: Hashable | None
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[T, R]):
    """``run_batch(items) -> results`` (one result per item, in order; an exception instance as a result
    fails only that item) is called on this batcher's worker threads (``workers`` batches run at once, for
    engines that run concurrent calls well, such as ONNX Runtime on a GPU). ``key(item)`` says which items may
    share a batch."""

    def __init__(self, run_batch: Callable[[list[T]], Sequence[R | BaseException]], *,
                 options: BatchingOptions | None = None, key: Callable[[T], Hashable | None] | None = None,
                 name: str = "batch", on_batch: Callable[[int], None] | None = None, workers: int = 1) -> None:
        self.run_batch = run_batch
        self.options = options or BatchingOptions()
        self.key = key or (lambda _item: "all")
        self.name = name
        self.on_batch = on_batch
        self.batches = 0
        self.items = 0
        self._queue: collections.deque[_Job[T]] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._threads = [threading.Thread(target=self._loop, name=f"stemme-{name}-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch being run)."""
        return len(self._queue)

    def submit(self, item: T) -> Future:
        return self._enqueue(item).future

    def _enqueue(self, item: T) -> _Job[T]:
        job = _Job(item, self.key(item) if self.options.max_batch > 1 else None)
        with self._cond:
            if self._stop:
                raise RuntimeError(f"the {self.name} stage is shut down")
            self._queue.append(job)
            self._cond.notify()
        return job

    async def __call__(self, item: T) -> R:
        """Submit from the event loop and wait for this item's result (cancelling the wait withdraws the item
        from the queue if no worker has taken it yet)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[R] = loop.create_future()
        job = self._enqueue(item)
        job.future.add_done_callback(lambda done: _hand_over(loop, waiter, done))
        try:
            return await waiter
        except asyncio.CancelledError:
            self._withdraw(job)
            raise

    def _withdraw(self, job: _Job[T]) -> None:
        with self._cond, contextlib.suppress(ValueError):  # ValueError: a worker has taken it
            self._queue.remove(job)
        job.future.cancel()

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            for job in self._queue:
                job.future.cancel()
            self._queue.clear()
            self._cond.notify_all()

    def _take(self) -> list[_Job[T]] | None:
        """The oldest job and, after the window, every waiting job that may share its batch."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._stop)
            if self._stop:
                return None
            head = self._queue.popleft()
            batch = [head]
            if head.key is None:
                return batch
            deadline = head.queued + self.options.window
            while True:
                for job in list(self._queue):
                    if len(batch) >= self.options.max_batch:
                        break
                    if job.key == head.key:
                        self._queue.remove(job)
                        batch.append(job)
                left = deadline - time.perf_counter()
                if len(batch) >= self.options.max_batch or left <= 0 or self._stop:
                    return batch
                self._cond.wait(left)

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not live:
                continue
            with self._cond:
                self.batches += 1
                self.items += len(live)
            if self.on_batch is not None:
                self.on_batch(len(live))
            try:
                results: Sequence[Any] = self.run_batch([j.item for j in live])
                if len(results) != len(live):
                    raise RuntimeError(f"{self.name}: {len(results)} results for a batch of {len(live)}")
            except BaseException as e:  # noqa: BLE001 - handed to every waiting caller
                for j in live:
                    j.future.set_exception(e)
                continue
            for j, r in zip(live, results, strict=True):
                if isinstance(r, BaseException):
                    j.future.set_exception(r)
                else:
                    j.future.set_result(r)


def _hand_over(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[Any], job: Future) -> None:
    """On the worker thread: pass a job's outcome to the waiting coroutine on its loop. When that loop has closed
    (its session is gone, the process is stopping), the outcome is dropped: the worker serves the others."""

    def settle() -> None:
        if waiter.done():
            return
        if job.cancelled():
            waiter.cancel()
        elif (exc := job.exception()) is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(job.result())

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # "Event loop is closed"
        logger.debug("a result for a closed event loop was dropped")
