"""The batcher: coalescing under load, no delay when idle, each request answered alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest
from stockhold_fixtures import Running, add_stock, line

from stockhold.batcher import Batcher, NotSent
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc


class Recorder:
    """A send function that records its batches and answers item * 10 after `delay`."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.batches: list[list[int]] = []

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("boom")
        return [i * 10 for i in items]


async def test_a_lone_request_is_sent_at_once_without_a_collect_delay() -> None:
    send = Recorder()
    batcher: Batcher[int, int] = Batcher(send, max_batch=64, max_inflight=2)
    start = time.perf_counter()
    assert await batcher.submit(7) == 70
    assert time.perf_counter() - start < 0.05
    assert send.batches == [[7]]


async def test_concurrent_requests_are_coalesced_and_each_gets_its_own_result() -> None:
    send = Recorder(delay=0.01)
    batcher: Batcher[int, int] = Batcher(send, max_batch=16, max_inflight=2)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(200)))
    assert results == [i * 10 for i in range(200)]
    assert sorted(i for b in send.batches for i in b) == list(range(200))
    assert len(send.batches) < 30  # 200 requests, at most 16 per call
    assert max(len(b) for b in send.batches) == 16
    assert batcher.calls == len(send.batches) and batcher.items == 200


async def test_a_failed_call_fails_only_the_requests_of_that_batch() -> None:
    send = Recorder(delay=0.01, fail_on=0)
    batcher: Batcher[int, int] = Batcher(send, max_batch=1, max_inflight=1)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert isinstance(results[0], RuntimeError)
    assert results[1:] == [10, 20]


async def test_a_request_cancelled_while_queued_is_never_sent() -> None:
    send = Recorder(delay=0.05)
    batcher: Batcher[int, int] = Batcher(send, max_batch=8, max_inflight=1)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)  # 1 is in flight now
    queued = asyncio.create_task(batcher.submit(2))
    await asyncio.sleep(0)
    queued.cancel()
    assert await first == 10
    await batcher.drain()
    assert send.batches == [[1]]


async def test_a_request_queued_past_its_wait_limit_is_dropped_unsent() -> None:
    send = Recorder(delay=0.3)
    batcher: Batcher[int, int] = Batcher(send, max_batch=8, max_inflight=1)
    first = asyncio.create_task(batcher.submit(1, wait_limit=0.05))
    await asyncio.sleep(0)
    start = time.perf_counter()
    with pytest.raises(NotSent):
        await batcher.submit(2, wait_limit=0.05)
    assert time.perf_counter() - start < 0.2
    # The request already sent is not cut off by its limit: it gets the true result.
    assert await first == 10
    await batcher.drain()
    assert send.batches == [[1]]


async def test_server_coalesces_concurrent_reserves_into_fewer_script_calls(
    stockhold: Running, stub: pb_grpc.InventoryStub
) -> None:
    await add_stock(stub, "hot", "w1", 10_000)
    reserves = stockhold.server.engine.reserves
    calls_before, items_before = reserves.calls, reserves.items

    async def one(i: int) -> Any:
        return await stub.Reserve(pb.ReserveRequest(order_id=f"o-{i}", lines=[line("hot", 1)]))

    replies = await asyncio.gather(*(one(i) for i in range(400)))
    assert all(not r.replayed for r in replies)
    calls, items = reserves.calls - calls_before, reserves.items - items_before
    assert items == 400
    assert calls < 400, f"no coalescing: {calls} script calls for 400 reserves"
    print(f"[batching] 400 concurrent reserves -> {calls} script calls, largest {reserves.largest}")
