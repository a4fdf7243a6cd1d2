"""WatchEvents and `stockhold events tail` (issue 12): every partition's stream as one feed.

What is pinned: the events delivered are exactly the streams' entries (compared with XRANGE of
every partition), each partition in its order; filters; `earliest` and "from now"; a feed
resumed from cursors at random points of a concurrent load is the streams with no gap and no
duplicate; bad cursors and filters are INVALID_ARGUMENT and change nothing; a cancelled call
and a server shutdown end the server's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from stockhold_fixtures import (
    Factory,
    Running,
    add_stock,
    expect_error,
    line,
    rich_error,
    snapshot,
    wait_settled,
)
from test_cli_policy import stockhold_cli

from stockhold import constants as c
from stockhold.events import encode_cursor
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

WAIT_S = 20.0  # the most any wait below lasts (a loaded 2-core box)


# -- helpers -------------------------------------------------------------------------------------


def stream_entries(running: Running) -> dict[int, list[tuple[str, dict[str, str]]]]:
    """partition -> [(id, fields)] of its stream, by XRANGE: what the feed must equal."""
    client = running.redis.client()
    resolver = running.server.engine.resolver
    out: dict[int, list[tuple[str, dict[str, str]]]] = {}
    for p in range(running.settings.partitions):
        entries = client.xrange(resolver.events_key(p))
        out[p] = [(i.decode(), {k.decode(): v.decode() for k, v in f.items()}) for i, f in entries]
    return out


def entry_count(running: Running) -> int:
    return sum(len(v) for v in stream_entries(running).values())


class Watch:
    """One WatchEvents call read by a background task into a queue (so waits are bounded
    without cancelling a read)."""

    def __init__(self, stub: pb_grpc.InventoryStub, request: pb.WatchEventsRequest) -> None:
        self.call = stub.WatchEvents(request)
        self.queue: asyncio.Queue[pb.Event] = asyncio.Queue()
        self.error: grpc.aio.AioRpcError | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in self.call:
                self.queue.put_nowait(event)
        except grpc.aio.AioRpcError as err:
            self.error = err

    async def upto(self, n: int, limit_s: float) -> list[pb.Event]:
        """The next n events, or fewer: those that arrived within limit_s."""
        out: list[pb.Event] = []
        give_up = time.monotonic() + limit_s
        while len(out) < n:
            left = give_up - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                out.append(await asyncio.wait_for(self.queue.get(), min(left, 0.5)))
        return out

    async def take(self, n: int, limit_s: float = WAIT_S) -> list[pb.Event]:
        """The next n events; fails after limit_s."""
        out = await self.upto(n, limit_s)
        assert len(out) == n, f"{len(out)} of {n} events after {limit_s} s (error: {self.error})"
        return out

    async def quiet(self, settle_s: float = 0.5) -> list[pb.Event]:
        """Whatever arrives within settle_s (used only to show nothing more comes)."""
        await asyncio.sleep(settle_s)
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@contextlib.asynccontextmanager
async def watching(stub: pb_grpc.InventoryStub, **request: Any) -> AsyncIterator[Watch]:
    watch = Watch(stub, pb.WatchEventsRequest(**request))
    try:
        yield watch
    finally:
        await watch.close()


async def split_order_scenario(stub: pb_grpc.InventoryStub) -> None:
    """Stock in two warehouses; one order with a line from each, committed; a second order
    released; a policy change. Every kind of event the filters look at."""
    await add_stock(stub, "A", "wh-east", 10)
    await add_stock(stub, "B", "wh-south", 10)
    await add_stock(stub, "C", "wh-east", 5)
    split = pb.ReserveRequest(
        order_id="split-1", lines=[line("A", 2, "wh-east"), line("B", 3, "wh-south")]
    )
    await stub.Reserve(split)
    await stub.Commit(pb.CommitRequest(order_id="split-1", payment_ref="pay-1"))
    await stub.Reserve(pb.ReserveRequest(order_id="east-only", lines=[line("C", 1, "wh-east")]))
    await stub.Release(pb.ReleaseRequest(order_id="east-only", reason="cancelled"))
    await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="B", max_line_quantity=50))


def by_partition(events: list[pb.Event]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for e in events:
        out.setdefault(e.partition, []).append(e.id)
    return out


def expected_ids(running: Running) -> dict[int, list[str]]:
    return {p: [i for i, _ in v] for p, v in stream_entries(running).items() if v}


async def watches_end(running: Running) -> None:
    """Bounded wait until the server runs no WatchEvents call."""
    give_up = time.monotonic() + WAIT_S
    while running.server.servicer.watches:
        assert time.monotonic() < give_up, "a WatchEvents call still runs on the server"
        await asyncio.sleep(0.02)


# -- tests ---------------------------------------------------------------------------------------


async def test_earliest_delivers_every_stream_entry_in_partition_order_with_its_fields(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold()
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await split_order_scenario(stub)
        await wait_settled(running.redis)
        total = entry_count(running)
        async with watching(stub, cursor="earliest") as watch:
            got = await watch.take(total)
            assert await watch.quiet() == []
    assert by_partition(got) == expected_ids(running)
    # An id is unique in its stream only: two partitions may both hold "<ms>-0".
    stored = {(p, i): f for p, v in stream_entries(running).items() for i, f in v}
    for e in got:
        fields = stored[e.partition, e.id]
        assert (e.type, e.data_json) == (fields["type"], fields["data"])
        assert e.ts.ToMilliseconds() == int(fields["ts"])
        assert e.order_id == fields.get("order_id", "")
        assert e.adjustment_id == fields.get("adjustment_id", "")
        assert e.sku == fields.get("sku", "")
        assert e.cursor
    split = [e for e in got if e.order_id == "split-1"]
    assert [e.type for e in split] == [c.EVENT_RESERVED, c.EVENT_COMMITTED]
    for e in split:
        assert sorted(e.skus) == ["A", "B"] and sorted(e.warehouses) == ["wh-east", "wh-south"]
    (policy,) = [e for e in got if e.type == c.EVENT_POLICY_CHANGED]
    assert (policy.sku, list(policy.skus), list(policy.warehouses)) == ("B", ["B"], [])
    adjusted = [e for e in got if e.type == c.EVENT_ADJUSTED]
    assert sorted((tuple(e.skus), tuple(e.warehouses)) for e in adjusted) == [
        (("A",), ("wh-east",)),
        (("B",), ("wh-south",)),
        (("C",), ("wh-east",)),
    ]


async def test_filters_by_type_warehouse_and_sku_are_applied_on_the_server(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold()
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await split_order_scenario(stub)
        await wait_settled(running.redis)
        total = entry_count(running)
        async with watching(stub, cursor="earliest") as watch:
            every = await watch.take(total)

        def expect(pred: Any) -> list[str]:
            return sorted((e.partition, e.id) for e in every if pred(e))

        cases: list[tuple[dict[str, Any], Any]] = [
            ({"warehouses": ["wh-east"]}, lambda e: "wh-east" in e.warehouses),
            ({"warehouses": ["wh-south"]}, lambda e: "wh-south" in e.warehouses),
            ({"skus": ["C"]}, lambda e: "C" in e.skus),
            (
                {"types": [c.EVENT_RESERVED, c.EVENT_RELEASED]},
                lambda e: e.type in (c.EVENT_RESERVED, c.EVENT_RELEASED),
            ),
            (
                {"types": [c.EVENT_RESERVED], "warehouses": ["wh-south"], "skus": ["B"]},
                lambda e: e.type == c.EVENT_RESERVED and "wh-south" in e.warehouses,
            ),
        ]
        for request, pred in cases:
            want = expect(pred)
            assert want, request
            async with watching(stub, cursor="earliest", **request) as watch:
                got = await watch.take(len(want))
                got += await watch.quiet(0.3)
            assert sorted((e.partition, e.id) for e in got) == want, request
    # The split order reached both warehouses' feeds: reserved + committed in each.
    east = [e.type for e in every if "wh-east" in e.warehouses and e.order_id == "split-1"]
    south = [e.type for e in every if "wh-south" in e.warehouses and e.order_id == "split-1"]
    assert east == south == [c.EVENT_RESERVED, c.EVENT_COMMITTED]


async def test_from_now_delivers_only_events_appended_after_the_call_started(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold()
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await split_order_scenario(stub)
        before = {(p, i) for p, v in expected_ids(running).items() for i in v}
        async with watching(stub) as watch:
            # The call reads the streams' heads at some point after it starts: probe until an
            # event arrives; the probes before that point are not delivered, all after are.
            probes: list[str] = []
            first: list[pb.Event] = []
            for n in range(100):
                adj = f"probe-{n}"
                probes.append(adj)
                await add_stock(stub, "P", "wh-east", 1, adjustment_id=adj)
                first = await watch.quiet(0.2)
                if first:
                    break
            assert first, "no event reached a from-now watch"
            await add_stock(stub, "A", "wh-east", 1, adjustment_id="after-1")
            await stub.Reserve(pb.ReserveRequest(order_id="after-o", lines=[line("A", 1)]))
            got = first + await watch.take(2)
            got += await watch.quiet(0.3)
    assert not before & {(e.partition, e.id) for e in got}
    delivered = [e.adjustment_id or e.order_id for e in got]
    k = probes.index(delivered[0])
    assert delivered == [*probes[k:], "after-1", "after-o"]


async def test_resumed_from_cursors_at_random_points_during_load_equals_the_streams(
    make_stockhold: Factory,
) -> None:
    # Small batches: a read often stops mid-stream (the "full batch: read again" path).
    running = await make_stockhold(watch_batch_size=3)
    rng = random.Random(12)
    skus = [f"S{i}" for i in range(12)]
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        for i, sku in enumerate(skus):
            await add_stock(stub, sku, ("wh-east", "wh-south")[i % 2], 10_000)
        load_done = asyncio.Event()

        async def worker(w: int) -> None:
            for n in range(40):
                oid = f"o-{w}-{n}"
                picks = rng.sample(skus, 2)
                await stub.Reserve(
                    pb.ReserveRequest(order_id=oid, lines=[line(s, 1) for s in picks])
                )
                if n % 3:
                    await stub.Commit(pb.CommitRequest(order_id=oid))
                else:
                    await stub.Release(pb.ReleaseRequest(order_id=oid))

        async def load() -> None:
            try:
                await asyncio.gather(*(worker(w) for w in range(4)))
            finally:
                load_done.set()

        loader = asyncio.create_task(load())
        got: list[pb.Event] = []
        cursor = "earliest"
        reconnects = during_load = 0
        give_up = time.monotonic() + 120
        while True:
            assert time.monotonic() < give_up, f"{len(got)} events, feed never caught up"
            async with watching(stub, cursor=cursor) as watch:
                cut = rng.randint(1, 40)
                got += await watch.upto(cut, limit_s=1.0)  # fewer arrived: reconnect anyway
                got += [watch.queue.get_nowait() for _ in range(watch.queue.qsize())]
            reconnects += 1
            during_load += not load_done.is_set()
            if got:
                cursor = got[-1].cursor
            if load_done.is_set():
                await wait_settled(running.redis)
                if len(got) >= entry_count(running):
                    break
        await loader
    assert during_load >= 3, "the feed was not resumed while the load ran"
    ids = [(e.partition, e.id) for e in got]
    assert len(ids) == len(set(ids)), "a duplicate"
    assert by_partition(got) == expected_ids(running)


async def test_resuming_from_an_earlier_cursor_gives_exactly_what_followed_it(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold()
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await split_order_scenario(stub)
        await wait_settled(running.redis)
        total = entry_count(running)
        async with watching(stub, cursor="earliest") as watch:
            every = await watch.take(total)
        for k in (0, total // 2, total - 1):
            async with watching(stub, cursor=every[k].cursor) as watch:
                rest = await watch.take(total - 1 - k)
                assert await watch.quiet(0.3) == []
            assert by_partition(rest) == by_partition(every[k + 1 :])


async def test_bad_cursor_or_filter_is_invalid_argument_and_changes_nothing(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold()
    partitions = running.settings.partitions
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await split_order_scenario(stub)
        await wait_settled(running.redis)
        async with watching(stub, cursor="earliest") as watch:
            good = (await watch.take(1))[0].cursor
        flipped = good[:-2] + ("A" if good[-2] != "A" else "B") + good[-1]
        cases: list[tuple[dict[str, Any], str]] = [
            ({"cursor": "not a cursor!"}, "cursor"),
            ({"cursor": "EARLIEST"}, "cursor"),
            ({"cursor": good + "A"}, "cursor"),
            ({"cursor": good[:-3]}, "cursor"),
            ({"cursor": flipped}, "cursor"),
            ({"cursor": good + "="}, "cursor"),
            ({"cursor": encode_cursor([(0, 0)] * (partitions + 1))}, "cursor"),
            ({"cursor": encode_cursor([(2**60, 0)] * partitions)}, "cursor"),  # ahead
            ({"types": ["ORDER_RESERVED", "NOPE"]}, "types[1]"),
            ({"types": ["ORDER_RESERVED"] * 101}, "types"),
            ({"warehouses": [""]}, "warehouses[0]"),
            ({"skus": ["x" * (c.MAX_SKU + 1)]}, "skus[0]"),
            ({"skus": ["bad\x00sku"]}, "skus[0]"),
        ]
        before = await snapshot(running.redis)
        for request, field in cases:
            call = stub.WatchEvents(pb.WatchEventsRequest(**request))
            err = await expect_error(call.read())
            assert err.code is grpc.StatusCode.INVALID_ARGUMENT, request
            assert err.reason == "INVALID_ARGUMENT"
            assert field in err.violations, (request, err.violations)
        assert await snapshot(running.redis) == before
    await watches_end(running)


async def test_cancelling_the_call_ends_the_server_stream(make_stockhold: Factory) -> None:
    running = await make_stockhold()
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await split_order_scenario(stub)
        for _ in range(3):
            async with watching(stub, cursor="earliest") as watch:
                await watch.take(1)
                assert running.server.servicer.watches == 1
            await watches_end(running)
        # An idle watch (nothing to deliver) ends on cancel too.
        async with watching(stub) as watch:
            give_up = time.monotonic() + WAIT_S
            while not running.server.servicer.watches:
                assert time.monotonic() < give_up
                await asyncio.sleep(0.02)
        await watches_end(running)


async def test_server_shutdown_ends_watches_unavailable_before_the_grace_runs_out(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold(shutdown_grace_seconds=60.0)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await split_order_scenario(stub)
        async with watching(stub, cursor="earliest") as watch:
            await watch.take(1)
            stopping = asyncio.create_task(running.server.stop())
            await asyncio.wait_for(watch.task, WAIT_S)  # long before the 60 s grace
            assert watch.error is not None
            err = rich_error(watch.error)
            assert err.code is grpc.StatusCode.UNAVAILABLE
            assert (err.reason, err.metadata) == ("BACKEND_UNAVAILABLE", {"cause": "shutdown"})
            await asyncio.wait_for(stopping, WAIT_S)


async def test_events_tail_prints_one_json_line_per_event_and_resumes_from_its_cursor(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold()
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await split_order_scenario(stub)
        await wait_settled(running.redis)
    total = entry_count(running)
    code, out, err = await stockhold_cli(
        running, "events", "tail", "--from", "earliest", "--count", "3"
    )
    assert code == 0, err
    head = [json.loads(x) for x in out.splitlines()]
    assert len(head) == 3 and all(e["cursor"] and isinstance(e["data"], dict) for e in head)
    code, out, err = await stockhold_cli(
        running, "events", "tail", "--from", head[-1]["cursor"], "--count", str(total - 3)
    )
    assert code == 0, err
    rest = [json.loads(x) for x in out.splitlines()]
    ids = [(e["partition"], e["id"]) for e in head + rest]
    assert len(set(ids)) == total
    got: dict[int, list[str]] = {}
    for p, i in ids:
        got.setdefault(p, []).append(i)
    assert got == expected_ids(running)
    code, out, err = await stockhold_cli(
        running, "events", "tail", "--from", "earliest", "--warehouse", "wh-south", "--timeout", "1"
    )
    assert code == 0, err
    south = [json.loads(x) for x in out.splitlines()]
    assert south and all("wh-south" in e["warehouses"] for e in south)
    code, out, err = await stockhold_cli(running, "events", "tail", "--from", "bogus")
    assert code == 1 and "cursor" in err and "INVALID_ARGUMENT" in err
