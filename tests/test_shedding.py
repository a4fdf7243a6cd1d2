"""Per-SKU reserve thresholds (issue 4): hot SKUs fail fast when Redis is slow, others go on.

Redis is slowed on purpose by a busy Lua script run over and over from another connection
(each run blocks Redis for SLOW_MS): stockhold's script calls queue behind it, and the
requests in stockhold's own queue wait. A request of a hot SKU that waited its threshold is
shed before it is sent (RESOURCE_EXHAUSTED, RESERVE_TIMEOUT) and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import pytest
from stockhold_fixtures import Factory, Running, add_stock, expect_error, line, rich_error

from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

SLOW_MS = 100
BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start >= tonumber(ARGV[1]) * 1000
return 1
"""


class SlowRedis:
    """Keeps Redis busy SLOW_MS at a time from a thread, for at most `limit` seconds."""

    def __init__(self, redis: Any, limit: float = 10.0) -> None:
        self.client = redis.client()
        self.limit = limit
        self.stop = threading.Event()
        self.runs = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.client.eval(BUSY, 0, SLOW_MS)
            self.runs += 1
            time.sleep(0.002)  # let the other clients' commands in between

    def __enter__(self) -> SlowRedis:
        self.thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=self.limit + 1)
        self.client.close()


@pytest.fixture
async def stockhold_small_batches(make_stockhold: Factory) -> Running:
    # Small batches make the queue long enough to measure with a few dozen requests.
    return await make_stockhold(batch_max_orders=4)


def records(running: Running) -> set[str]:
    """Order ids with a reservation record in Redis."""
    r = running.redis.client()
    return {k.decode().rsplit(":", 1)[1] for k in r.keys("sh:*:order:*")}


def reserved_events(running: Running) -> list[str]:
    r = running.redis.client()
    return [
        f[b"order_id"].decode()
        for key in r.keys("sh:*:events")
        for _, f in r.xrange(key)
        if f[b"type"] == b"ORDER_RESERVED"
    ]


async def test_hot_sku_fails_fast_near_300_ms_while_others_succeed_and_failures_leave_nothing(
    stockhold_small_batches: Running,
) -> None:
    running = stockhold_small_batches
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "HOT", "w1", 1000)
        await add_stock(stub, "COLD", "w1", 1000)
        p = await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="HOT", hot=True, pinned=True))
        assert p.effective_reserve_timeout_ms == 300

        async def one(sku: str, i: int) -> tuple[str, str, float, Any]:
            oid = f"{sku}-{i}"
            t0 = time.monotonic()
            try:
                await stub.Reserve(pb.ReserveRequest(order_id=oid, lines=[line(sku, 1)]), timeout=5)
                return sku, oid, time.monotonic() - t0, None
            except grpc.aio.AioRpcError as err:
                return sku, oid, time.monotonic() - t0, rich_error(err)

        with SlowRedis(running.redis) as slow:
            results = await asyncio.gather(*(one("HOT" if i % 2 else "COLD", i) for i in range(24)))
        assert slow.runs > 0

    hot_ok = [r for r in results if r[0] == "HOT" and r[3] is None]
    hot_shed = [r for r in results if r[0] == "HOT" and r[3] is not None]
    cold = [r for r in results if r[0] == "COLD"]
    assert [r[3] for r in cold] == [None] * 12, "every cold request succeeds"
    assert hot_shed, "some hot requests waited past 300 ms and were shed"
    assert hot_ok, "the hot requests at the head of the queue were served"
    for _, _, elapsed, err in hot_shed:
        assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESERVE_TIMEOUT")
        assert err.metadata["sku"] == "HOT"
        assert err.metadata["threshold_ms"] == "300"
        assert err.metadata["limit"] == "sku_threshold"
        # (uvloop timers have millisecond resolution: one may fire a fraction of a ms early)
        assert 298 <= int(err.metadata["waited_ms"]) < 400
        assert 0.29 <= elapsed < 0.6, f"shed after {elapsed:.3f} s"
    # Some cold requests waited longer than the hot threshold and still succeeded.
    assert max(r[2] for r in cold) > 0.3

    # Every failure left no trace; every success did.
    ok_ids = {r[1] for r in results if r[3] is None}
    assert records(running) == ok_ids
    assert sorted(reserved_events(running)) == sorted(ok_ids)
    r = running.redis.client()
    hot_key, cold_key = (
        next(k for k in r.keys("sh:*:stock:*") if k.decode().endswith(f":{sku}::"))
        for sku in ("HOT", "COLD")
    )
    assert int(r.hget(hot_key, "r:w1")) == len(hot_ok)
    assert int(r.hget(cold_key, "r:w1")) == 12
    assert int(r.hget(hot_key, "a:w1")) == 1000 - len(hot_ok)


async def test_client_deadline_sooner_than_the_threshold_sheds_before_it(
    stockhold_small_batches: Running,
) -> None:
    running = stockhold_small_batches
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "COLD", "w1", 1000)
        with SlowRedis(running.redis):
            # Fill the queue, then ask with a 150 ms deadline behind it.
            backlog = [
                asyncio.ensure_future(
                    stub.Reserve(
                        pb.ReserveRequest(order_id=f"b-{i}", lines=[line("COLD", 1)]), timeout=5
                    )
                )
                for i in range(16)
            ]
            await asyncio.sleep(0.01)
            t0 = time.monotonic()
            err = await expect_error(
                stub.Reserve(
                    pb.ReserveRequest(order_id="late", lines=[line("COLD", 1)]), timeout=0.15
                )
            )
            elapsed = time.monotonic() - t0
            await asyncio.gather(*backlog)
    # Shed by stockhold just before the deadline (an explicit answer, not a bare timeout).
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESERVE_TIMEOUT")
    assert err.metadata["limit"] == "deadline"
    assert elapsed < 0.2
    assert "late" not in records(running)
