"""Coalesce concurrent requests into few script calls, each request still answered alone.

grpc.aio hands requests over one per event-loop turn, so "everything that arrived this turn"
is almost always one request. The batcher instead bounds the number of script calls in
flight: while they are, new requests queue, and the next call takes the whole queue (up to
`max_batch`). An idle server therefore adds no delay (a lone request is sent at once), and a
busy one sends bigger batches: the collect window is exactly as long as Redis is busy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")
SendBatch = Callable[[Sequence[Item]], Awaitable[Sequence[Result]]]


class NotSent(Exception):
    """The item waited longer than its limit and was dropped before it was sent."""


class Timed(NamedTuple, Generic[Result]):
    """An item's result with where its time went (perf_counter seconds)."""

    result: Result
    queued_s: float  # from submit until its batch was sent
    call_s: float  # the batch's call, sent to answered


class _Entry(Generic[Item, Result]):
    __slots__ = ("done_at", "fut", "item", "queued_at", "sent", "sent_at", "timer")

    def __init__(self, item: Item, fut: asyncio.Future[Result]) -> None:
        self.item = item
        self.fut = fut
        self.sent = False
        self.queued_at = 0.0
        self.sent_at = 0.0
        self.done_at = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def timed(self) -> Timed[Result]:
        """Its result (raises its exception) with where its time went."""
        return Timed(self.fut.result(), self.sent_at - self.queued_at, self.done_at - self.sent_at)


def _drop_unsent(entry: _Entry[Any, Any], wait_limit: float) -> None:
    """Timer callback: fail an entry that is still queued (_dispatch then skips it)."""
    if not entry.sent and not entry.fut.done():
        entry.fut.set_exception(NotSent(f"not sent within {wait_limit:.3f} s"))


class Batcher(Generic[Item, Result]):
    """Send queued items in batches through `send`, at most `max_inflight` calls at once.

    `send` gets a batch and must return one result per item, in order; if it raises, every
    item of that batch gets the exception. A request cancelled while still queued is dropped
    before it is sent, so it changes nothing.
    """

    def __init__(self, send: SendBatch[Item, Result], max_batch: int, max_inflight: int) -> None:
        if max_batch < 1 or max_inflight < 1:
            raise ValueError("max_batch and max_inflight must be at least 1")
        self._send = send
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._queue: deque[_Entry[Item, Result]] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Figures for tests and metrics: calls made and items sent.
        self.calls = 0
        self.items = 0
        self.largest = 0

    @property
    def queued(self) -> int:
        """Items waiting for a call slot (dropped ones included until a batch skips them)."""
        return len(self._queue)

    @property
    def inflight(self) -> int:
        """Calls sent and not yet answered."""
        return self._inflight

    async def submit(self, item: Item, wait_limit: float | None = None) -> Result:
        """Queue one item and wait for its own result.

        If the item is still queued after `wait_limit` seconds it is dropped, never sent, and
        NotSent is raised. Once sent, the item's true result is always awaited: a request is
        never reported failed when its script call may have written.
        """
        return (await self.submit_timed(item, wait_limit)).result

    async def submit_timed(self, item: Item, wait_limit: float | None = None) -> Timed[Result]:
        """As `submit`, and say how long the item queued and how long its call took."""
        entry = self.enqueue(item, wait_limit)
        try:
            await entry.fut
        finally:
            if entry.timer is not None:
                entry.timer.cancel()
        return entry.timed()

    def enqueue(self, item: Item, wait_limit: float | None = None) -> _Entry[Item, Result]:
        """Queue one item without waiting: the caller awaits `entry.fut`, then cancels
        `entry.timer` (if any) and reads `entry.timed()`. For callers that submit many items
        at once (ReserveBatch): one await for all of them instead of a task each."""
        loop = asyncio.get_running_loop()
        entry: _Entry[Item, Result] = _Entry(item, loop.create_future())
        entry.queued_at = time.perf_counter()
        self._queue.append(entry)
        if self._inflight < self._max_inflight:
            self._dispatch()
        if wait_limit is not None and not entry.sent:
            # One timer handle, no extra task: the cheapest way to bound the queue wait
            # (measured: cheaper than one shared timer over a deadline heap).
            entry.timer = loop.call_later(wait_limit, _drop_unsent, entry, wait_limit)
        return entry

    def _dispatch(self) -> None:
        batch: list[_Entry[Item, Result]] = []
        now = time.perf_counter()
        while self._queue and len(batch) < self._max_batch:
            entry = self._queue.popleft()
            if not entry.fut.done():  # cancelled while queued: never sent
                entry.sent = True
                entry.sent_at = now
                batch.append(entry)
        if not batch:
            return
        self._inflight += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Entry[Item, Result]]) -> None:
        self.calls += 1
        self.items += len(batch)
        self.largest = max(self.largest, len(batch))
        try:
            try:
                results = await self._send([entry.item for entry in batch])
            finally:
                done = time.perf_counter()
                for entry in batch:
                    entry.done_at = done
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} got {len(results)} results")
        except asyncio.CancelledError:
            for entry in batch:
                entry.fut.cancel()
            raise
        except Exception as exc:  # every waiter must learn of the failure
            for entry in batch:
                if not entry.fut.done():
                    entry.fut.set_exception(exc)
        else:
            for entry, result in zip(batch, results, strict=True):
                if not entry.fut.done():
                    entry.fut.set_result(result)
        finally:
            self._inflight -= 1
            if self._queue:
                self._dispatch()

    async def drain(self) -> None:
        """Wait until every call in flight has finished."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
