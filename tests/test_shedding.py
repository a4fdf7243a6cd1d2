"""Per-SKU reserve thresholds (issue 4): hot SKUs fail fast when Redis is slow, others go on.

The test controls the queue instead of assuming a CPU speed: Redis is told to hold every
script call (`CLIENT PAUSE ... WRITE`: EVALSHA may write, so it waits; reads and CLIENT
commands still run), one Reserve is sent and held there, occupying the process's only script
call slot (`batch_max_inflight` is 1), and every Reserve after it queues in stockhold for as
long as the test keeps Redis paused. A queued request of a hot SKU that waited its threshold
is shed before it is sent (RESOURCE_EXHAUSTED, RESERVE_TIMEOUT) and leaves nothing behind; a
request already sent gets its true result, however long it waited.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from stockhold_fixtures import (
    Factory,
    Running,
    add_stock,
    expect_error,
    line,
    records,
    reserved_events,
    rich_error,
)

from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

# Longer than any wait below: a paused call must not hit the "Redis stuck" bound.
SOCKET_TIMEOUT_S = 20.0
# The cold SKU's threshold: cold requests outwait the test's pause on any machine.
COLD_TIMEOUT_MS = 15_000


class PausedRedis:
    """Redis holding every script call until `resume()` (or the end of the block)."""

    def __init__(self, redis: Any) -> None:
        self.client = redis.client()

    def __enter__(self) -> PausedRedis:
        self.client.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
        return self

    def resume(self) -> None:
        self.client.execute_command("CLIENT", "UNPAUSE")

    def __exit__(self, *exc: object) -> None:
        self.resume()
        self.client.close()


async def wait_until(check: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    """Poll `check` (bounded in time and count)."""
    give_up = time.monotonic() + limit_s
    for _ in range(2000):
        if check():
            return
        assert time.monotonic() < give_up, f"timed out waiting until {what}"
        await asyncio.sleep(0.005)
    raise AssertionError(f"gave up waiting until {what}")


@pytest.fixture
async def stockhold_small_batches(make_stockhold: Factory) -> Running:
    # Small batches: the queue drains over several script calls once Redis resumes.
    return await make_stockhold(
        batch_max_orders=4, batch_max_inflight=1, redis_socket_timeout_seconds=SOCKET_TIMEOUT_S
    )


async def test_hot_sku_fails_fast_near_300_ms_while_others_succeed_and_failures_leave_nothing(
    stockhold_small_batches: Running,
) -> None:
    running = stockhold_small_batches
    queue = running.server.engine.reserves
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "HOT", "w1", 1000)
        await add_stock(stub, "COLD", "w1", 1000)
        p = await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="HOT", hot=True, pinned=True))
        assert p.effective_reserve_timeout_ms == 300
        p = await stub.SetSkuPolicy(
            pb.SetSkuPolicyRequest(sku="COLD", reserve_timeout_ms=COLD_TIMEOUT_MS, pinned=True)
        )
        assert p.effective_reserve_timeout_ms == COLD_TIMEOUT_MS

        async def one(sku: str, oid: str) -> tuple[str, str, Any]:
            try:
                await stub.Reserve(
                    pb.ReserveRequest(order_id=oid, lines=[line(sku, 1)]), timeout=30
                )
                return sku, oid, None
            except grpc.aio.AioRpcError as err:
                return sku, oid, rich_error(err)

        with PausedRedis(running.redis) as paused:
            # A hot order sent first, held in Redis: it occupies the only call slot.
            head = asyncio.ensure_future(one("HOT", "HOT-head"))
            await wait_until(lambda: queue.inflight == 1, "the head order is sent")
            hot = [asyncio.ensure_future(one("HOT", f"HOT-{i}")) for i in range(12)]
            cold = [asyncio.ensure_future(one("COLD", f"COLD-{i}")) for i in range(12)]
            await wait_until(lambda: queue.queued >= 24, "every order queues behind it")
            # Each hot order is answered while Redis still holds the head's call, so none of
            # them can have been sent.
            hot_results = await asyncio.wait_for(asyncio.gather(*hot), timeout=10)
            assert queue.inflight == 1 and not head.done(), "nothing else was sent meanwhile"
            assert not any(f.done() for f in cold), "cold orders wait longer than hot ones"
            paused.resume()
            head_result = await asyncio.wait_for(head, timeout=10)
            cold_results = await asyncio.wait_for(asyncio.gather(*cold), timeout=10)

    # The head waited far past 300 ms, but it was sent: it gets its true result.
    assert head_result[2] is None
    assert [r[2] for r in cold_results] == [None] * 12, "every cold request succeeds"
    for _, _, err in hot_results:
        assert err is not None
        assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESERVE_TIMEOUT")
        assert err.metadata["sku"] == "HOT"
        assert err.metadata["threshold_ms"] == "300"
        assert err.metadata["limit"] == "sku_threshold"
        # Never shed before the threshold (uvloop timers have millisecond resolution: one may
        # fire a fraction of a ms early).
        assert int(err.metadata["waited_ms"]) >= 298

    # Every failure left no trace; every success did.
    ok_ids = {"HOT-head"} | {r[1] for r in cold_results}
    assert records(running) == ok_ids
    assert sorted(reserved_events(running)) == sorted(ok_ids)
    r = running.redis.client()
    hot_key, cold_key = (
        next(k for k in r.keys("sh:*:stock:*") if k.decode().endswith(f":{sku}::"))
        for sku in ("HOT", "COLD")
    )
    assert int(r.hget(hot_key, "r:w1")) == 1
    assert int(r.hget(hot_key, "a:w1")) == 999
    assert int(r.hget(cold_key, "r:w1")) == 12


async def test_client_deadline_sooner_than_the_threshold_sheds_before_it(
    stockhold_small_batches: Running,
) -> None:
    running = stockhold_small_batches
    queue = running.server.engine.reserves
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "COLD", "w1", 1000)
        await stub.SetSkuPolicy(
            pb.SetSkuPolicyRequest(sku="COLD", reserve_timeout_ms=COLD_TIMEOUT_MS, pinned=True)
        )
        with PausedRedis(running.redis):
            head = asyncio.ensure_future(
                stub.Reserve(
                    pb.ReserveRequest(order_id="head", lines=[line("COLD", 1)]), timeout=30
                )
            )
            await wait_until(lambda: queue.inflight == 1, "the head order is sent")
            # Behind it, a request whose deadline (1 s) is far sooner than its SKU's threshold.
            t0 = time.monotonic()
            err = await expect_error(
                stub.Reserve(pb.ReserveRequest(order_id="late", lines=[line("COLD", 1)]), timeout=1)
            )
            elapsed = time.monotonic() - t0
            assert not head.done(), "the late request was answered while Redis held the head"
        await asyncio.wait_for(head, timeout=10)
    # Shed by stockhold before the deadline: an explicit answer, not a bare DEADLINE_EXCEEDED.
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESERVE_TIMEOUT")
    assert err.metadata["limit"] == "deadline"
    assert int(err.metadata["waited_ms"]) <= 1000
    assert elapsed < 1.0
    assert records(running) == {"head"}
