"""Pushing events to each WMS (issue 12, stockhold.delivery.deliverer; docs/events.md "Pushing
to a WMS" and "Retention and the hard cap"), against tests/fake_wms.py, on both stores.

What is pinned (invariants, compared with the streams themselves, never timings):
- each subscription receives exactly the events its filter passes, each once, in stream order
  per partition; the signature verifies; Idempotency-Key = X-Stockhold-Event-Id = the body's id;
- FLOW: an event that used up its attempts is in the failed set (its stream id, with the body
  POSTed) and the next events are delivered; WAIT: the head is retried, the order kept;
- a slow WMS makes the backlog pass the alert threshold; made fast again, it drains with every
  event delivered exactly once;
- kill -9 of the delivering process: another takes over after the lease expires; no event is
  missed, and only events that were read but not acknowledged at the kill come twice;
- retention never trims an entry a group has not acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from fake_wms import FakeWMS
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis_proc import free_port
from stockhold_fixtures import Factory, Running, add_stock, async_client, is_cluster, line, unit
from test_process import STOCKHOLD, child_env

from stockhold.delivery.subscriptions import Subscription, SubscriptionStore, check_subscription
from stockhold.delivery.trim import Trimmer
from stockhold.errors import FieldViolation
from stockhold.events import StreamEvent, parse_entry
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

SECRET = "test-secret-0123456789"
FAST = {
    "delivery_lease_seconds": 1.0,
    "delivery_poll_interval_seconds": 0.02,
}
DEADLINE = 60.0  # generous bound of every wait on a condition


def _sub(name: str, url: str, **overrides: Any) -> Subscription:
    fields: dict[str, Any] = {
        "name": name,
        "url": url,
        "types": (),
        "warehouses": (),
        "skus": (),
        "timeout_ms": 0,
        "max_attempts": 0,
        "initial_backoff_ms": 10,
        "max_backoff_ms": 50,
        "on_failure": "",
    }
    fields.update(overrides)
    out: list[FieldViolation] = []
    sub = check_subscription(**fields, out=out)
    assert out == []
    return sub


async def _create(running: Running, sub: Subscription) -> SubscriptionStore:
    store = SubscriptionStore(running.server.engine.calls)
    await store.create(sub, SECRET, "now")
    return store


async def _until(what: str, check: Callable[[], Awaitable[bool]], within: float = DEADLINE) -> None:
    """Poll `check` (bounded in time and count) until it is true."""
    give_up = time.monotonic() + within
    for _ in range(100_000):
        if await check():
            return
        assert time.monotonic() < give_up, f"not within {within} s: {what}"
        await asyncio.sleep(0.05)
    raise AssertionError(what)


async def _events(running: Running) -> list[StreamEvent]:
    """Every entry of every partition's stream, per partition in stream order."""
    client: Any = async_client(running.redis)
    out: list[StreamEvent] = []
    try:
        for p in range(running.settings.partitions):
            key = running.server.engine.resolver.events_key(p)
            for entry_id, fields in await client.xrange(key):
                out.append(parse_entry(p, entry_id, fields))
    finally:
        await client.aclose()
    return out


def _key(e: StreamEvent) -> str:
    return f"{e.partition}:{e.id_text}"


def _wanted(events: list[StreamEvent], sub: Subscription) -> list[str]:
    return [_key(e) for e in events if sub.filter.matches(e)]


def _per_partition(keys: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        out[k.split(":", 1)[0]].append(k)
    return dict(out)


def _first_seen(keys: list[str]) -> list[str]:
    return list(dict.fromkeys(keys))


async def _delivered_all(wms: FakeWMS, running: Running, sub: Subscription) -> bool:
    return set(_wanted(await _events(running), sub)) <= set(wms.keys())


@pytest.fixture
async def wms() -> AsyncIterator[Callable[[], Awaitable[FakeWMS]]]:
    started: list[FakeWMS] = []

    async def start() -> FakeWMS:
        w = await FakeWMS(SECRET).start()
        started.append(w)
        return w

    yield start
    for w in started:
        await w.stop()


WmsFactory = Callable[[], Awaitable[FakeWMS]]


async def _group_backlog(running: Running, sub: Subscription) -> int:
    """Pending + not yet read entries of the subscription's group, over every partition."""
    client: Any = async_client(running.redis)
    total = 0
    try:
        for p in range(running.settings.partitions):
            key = running.server.engine.resolver.events_key(p)
            for g in await client.xinfo_groups(key):
                name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                if name == sub.group:
                    total += int(g["pending"]) + int(g.get("lag") or 0)
    finally:
        await client.aclose()
    return total


async def test_each_warehouse_gets_its_events_in_order(
    make_stockhold: Factory, wms: WmsFactory
) -> None:
    running = await make_stockhold(**FAST)
    east, south = await wms(), await wms()
    sub_east = _sub("wms-east", east.url(), warehouses=("wh-east",))
    sub_south = _sub("wms-south", south.url(), warehouses=("wh-south",))
    await _create(running, sub_east)
    await _create(running, sub_south)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "A", "wh-east", 10)
        await add_stock(stub, "B", "wh-south", 10)
        before = await stub.GetAvailability(pb.GetAvailabilityRequest(units=[unit("A"), unit("B")]))
        split = pb.ReserveRequest(
            order_id="split-1", lines=[line("A", 2, "wh-east"), line("B", 3, "wh-south")]
        )
        await stub.Reserve(split)
        await stub.Commit(pb.CommitRequest(order_id="split-1", payment_ref="pay-1"))
        after = await stub.GetAvailability(pb.GetAvailabilityRequest(units=[unit("A"), unit("B")]))
    changed = {
        (a.unit.sku, a.warehouse)
        for a, b in zip(after.levels, before.levels, strict=True)
        if (a.available, a.on_hand) != (b.available, b.on_hand)
    }
    assert changed == {("A", "wh-east"), ("B", "wh-south")}

    await _until("east delivered", lambda: _delivered_all(east, running, sub_east))
    await _until("south delivered", lambda: _delivered_all(south, running, sub_south))
    await asyncio.sleep(0.3)  # nothing more arrives
    events = await _events(running)
    for w, sub, warehouse in ((east, sub_east, "wh-east"), (south, sub_south, "wh-south")):
        got = w.keys()
        assert Counter(got) == Counter(_wanted(events, sub))  # each once, nothing else
        assert _per_partition(got) == _per_partition(_wanted(events, sub))  # stream order
        assert all(warehouse in r.event["warehouses"] for r in w.received)
        types = {r.event["type"] for r in w.received}
        assert {"STOCK_ADJUSTED", "ORDER_RESERVED", "ORDER_COMMITTED"} <= types
        assert all(r.signature_ok for r in w.received)


async def test_headers_signature_and_idempotency_key(
    make_stockhold: Factory, wms: WmsFactory
) -> None:
    running = await make_stockhold(**FAST)
    w = await wms()
    sub = _sub("hdr", w.url("/in"), max_attempts=3)
    await _create(running, sub)
    w.fail_next(1)  # the first POST fails: its retry carries the same key and body
    async with running.channel() as channel:
        await add_stock(pb_grpc.InventoryStub(channel), "H", "wh-1", 5)
    await _until("delivered", lambda: _delivered_all(w, running, sub))
    first, retry = w.received[0], w.received[1]
    assert first.status == 500 and retry.status == 200
    assert (first.key, first.body) == (retry.key, retry.body)
    for r in w.received:
        h = r.headers
        assert h["Content-Type"] == "application/json"
        assert h["Idempotency-Key"] == h["X-Stockhold-Event-Id"] == r.event["id"] == r.key
        assert h["X-Stockhold-Subscription"] == "hdr"
        assert h["X-Stockhold-Signature"].startswith("sha256=") and r.signature_ok
    body = retry.event
    (e,) = [e for e in await _events(running) if _key(e) == retry.key]
    assert body["partition"] == e.partition and body["stream_id"] == e.id_text
    assert body["type"] == "STOCK_ADJUSTED" and body["warehouses"] == ["wh-1"]
    assert body["ts_ms"] == e.ts_ms and body["ts"].endswith("Z")
    assert isinstance(body["data"], dict) and body["data"]["sku"] == "H"


async def test_flow_moves_failed_events_aside_and_the_next_ones_follow(
    make_stockhold: Factory, wms: WmsFactory
) -> None:
    running = await make_stockhold(**FAST)
    w = await wms()
    sub = _sub("flow", w.url(), max_attempts=2, initial_backoff_ms=5, max_backoff_ms=10)
    store = await _create(running, sub)
    w.fail_next(None)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        for sku in ("F1", "F2", "F3"):
            await add_stock(stub, sku, "wh-1", 1)
        bad = [_key(e) for e in await _events(running)]
        client: Any = async_client(running.redis)
        try:

            async def failed() -> dict[str, bytes]:
                out: dict[str, bytes] = {}
                for p in range(running.settings.partitions):
                    ids = await client.zrange(store.failed_key("flow", p), 0, -1)
                    bodies = await client.hgetall(store.failed_events_key("flow", p))
                    for i in ids:
                        out[f"{p}:{i.decode()}"] = bodies[i]
                return out

            async def all_failed() -> bool:
                return len(await failed()) == 3

            await _until("3 in the failed set", all_failed)
            stored = await failed()
        finally:
            await client.aclose()
        assert sorted(stored) == sorted(bad)
        import orjson

        for key, raw in stored.items():
            record = orjson.loads(raw)
            assert orjson.loads(record["body"])["id"] == key
            assert record["attempts"] == 2 and record["error"] == "HTTP 500"
        w.reset()
        await add_stock(stub, "F4", "wh-1", 1)
        await add_stock(stub, "F5", "wh-1", 1)
    await _until("later events delivered", lambda: _ok_count(w, 2))
    assert not set(w.keys()) & set(bad)
    assert await _group_backlog(running, sub) == 0


async def _ok_count(w: FakeWMS, n: int) -> bool:
    return len(w.ok()) >= n


async def test_wait_retries_the_head_and_keeps_the_order(
    make_stockhold: Factory, wms: WmsFactory
) -> None:
    running = await make_stockhold(**FAST)
    w = await wms()
    sub = _sub(
        "wait", w.url(), on_failure="WAIT", max_attempts=2, initial_backoff_ms=5, max_backoff_ms=20
    )
    await _create(running, sub)
    w.fail_next(6)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        for i in range(5):  # adjustments, over several partitions
            await add_stock(stub, "W", "wh-1", i + 1)
    await _until("delivered", lambda: _delivered_all(w, running, sub))
    events = await _events(running)
    wanted = _per_partition(_wanted(events, sub))
    assert _per_partition(w.keys()) == wanted  # each once, in stream order per partition
    assert sum(r.status == 500 for r in w.received) == 6
    for p, tried in _per_partition([r.key for r in w.received]).items():
        # a failure is retried before anything after it: only the head repeats
        assert [k for i, k in enumerate(tried) if i == 0 or tried[i - 1] != k] == wanted[p]


async def test_slow_wms_backlog_alerts_then_drains_exactly_once(
    make_stockhold: Factory, wms: WmsFactory
) -> None:
    # the default lease: with 1 s, a loaded box's late renewal loses a lease now and then, and
    # an event in flight then goes out again (at least once; this test counts exactly once)
    running = await make_stockhold(**{**FAST, "delivery_lease_seconds": 5.0})
    w = await wms()
    sub = _sub("slow", w.url())
    await _create(running, sub)
    w.delay = 0.9
    alert = running.settings.lag_alert_events
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        for sku in ("S1", "S2"):
            await add_stock(stub, sku, "wh-1", 100_000)
        n = 0
        give_up = time.monotonic() + DEADLINE
        while await _group_backlog(running, sub) < alert:  # a steady reserve load
            assert time.monotonic() < give_up, "the backlog never reached the alert line"
            await asyncio.gather(
                *(
                    stub.Reserve(
                        pb.ReserveRequest(order_id=f"s-{n + i}", lines=[line(f"S{i % 2 + 1}", 1)])
                    )
                    for i in range(20)
                )
            )
            n += 20
    assert await _group_backlog(running, sub) >= alert
    w.delay = 0.0
    await _until("drained", lambda: _drained(running, sub))
    events = await _events(running)
    assert Counter(w.keys()) == Counter(_wanted(events, sub))  # every event exactly once
    assert _per_partition(w.keys()) == _per_partition(_wanted(events, sub))


async def _drained(running: Running, sub: Subscription) -> bool:
    return await _group_backlog(running, sub) == 0


async def test_trim_keeps_every_unacknowledged_event(
    make_stockhold: Factory, wms: WmsFactory
) -> None:
    running = await make_stockhold(
        **FAST, event_retention_seconds=1, event_trim_interval_seconds=60
    )
    w = await wms()
    sub = _sub("keep", w.url(), on_failure="WAIT", max_attempts=1, max_backoff_ms=20)
    store = await _create(running, sub)
    w.fail_next(None)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        for i in range(300):  # over the partitions: streams of more than one node (4 KiB)
            await add_stock(stub, "T", "wh-1", 1, adjustment_id=f"t-{i}")
    made = await _events(running)
    assert len(made) == 300
    await asyncio.sleep(1.2)  # every entry is past the retention
    trimmer = Trimmer(running.server.engine.calls, store)
    await trimmer.run_once()
    assert [_key(e) for e in await _events(running)] == [_key(e) for e in made]
    w.reset()
    await _until("drained", lambda: _drained(running, sub))
    assert Counter(w.keys()) == Counter(_key(e) for e in made)
    await asyncio.sleep(1.1)
    report = await trimmer.run_once()
    assert sum(r.trimmed for r in report) > 0  # acknowledged and old: trimmed now
    assert not any(r.lost for r in report)


async def test_a_lease_renewed_late_is_taken_again_unless_another_holds_it(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold(delivery_enabled=False)
    calls = running.server.engine.calls
    store = SubscriptionStore(calls)
    key = store.lease_key("late", 3)

    async def lease(op: str, owner: str) -> int:
        return int(await calls.call_script(calls.scripts.lease, [key], [op, owner, "5000"]))

    assert await lease("acquire", "a") == 1
    assert await lease("acquire", "b") == 0
    assert await lease("renew", "a") == 1
    await calls.pipeline([("DEL", key)])  # expired before a's renewal: nobody took it
    assert await lease("renew", "a") == 1  # taken again: a's pending entries are still a's
    (holder,) = await calls.pipeline([("GET", key)])
    assert holder == b"a"
    await calls.pipeline([("SET", key, "b", "PX", 5000)])  # b took it meanwhile
    assert await lease("renew", "a") == 0
    (holder,) = await calls.pipeline([("GET", key)])
    assert holder == b"b"
    assert await lease("release", "a") == 0 and await lease("release", "b") == 1


# -- kill -9 of the delivering process -----------------------------------------------------------


class Serve:
    """`stockhold serve` as a subprocess on the test's Redis."""

    def __init__(self, running: Running, log_path: Path) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        cmd = [*STOCKHOLD, "serve", "--redis-url", running.redis.url, "--listen", self.address]
        # one process (the default is one worker per core under a supervisor, and SIGSTOP /
        # kill -9 of the supervisor would leave its workers delivering)
        cmd += ["--partitions", str(running.settings.partitions), "--workers", "1"]
        if is_cluster(running.redis):
            cmd.append("--redis-cluster")
        env = child_env()
        env["STOCKHOLD_DELIVERY_LEASE_SECONDS"] = "1.0"
        env["STOCKHOLD_DELIVERY_POLL_INTERVAL_SECONDS"] = "0.02"
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )

    async def wait_serving(self) -> None:
        give_up = time.monotonic() + DEADLINE
        async with grpc.aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.proc.poll() is None, self.log_path.read_text(errors="replace")
                assert time.monotonic() < give_up, "serve never became SERVING"
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


async def test_kill_9_mid_batch_the_next_owner_misses_nothing(
    make_stockhold: Factory, wms: WmsFactory, tmp_path: Path
) -> None:
    producer = await make_stockhold(delivery_enabled=False)  # produces, delivers nothing
    w = await wms()
    sub = _sub("crash", w.url())
    await _create(producer, sub)
    w.delay = 0.3
    child = Serve(producer, tmp_path / "serve.log")
    try:
        await child.wait_serving()
        async with producer.channel() as channel:
            stub = pb_grpc.InventoryStub(channel)
            for _ in range(30):  # adjustments, over several partitions
                await add_stock(stub, "K", "wh-1", 1)
        await _until("a few delivered", lambda: _ok_count(w, 3))
        os.kill(child.proc.pid, signal.SIGSTOP)  # frozen: what it read and did not ack is fixed
        client: Any = async_client(producer.redis)
        try:
            pending: set[str] = set()
            for p in range(producer.settings.partitions):
                key = producer.server.engine.resolver.events_key(p)
                for row in await client.xpending_range(key, sub.group, "-", "+", 1000):
                    mid = row["message_id"]
                    pending.add(f"{p}:{mid.decode() if isinstance(mid, bytes) else mid}")
        finally:
            await client.aclose()
        child.kill()
        assert pending, "nothing was in flight at the kill"
        w.delay = 0.0
        # takes over once the dead lease expires (its own lease the default: a loaded box's
        # late renewal of a 1 s lease could make it deliver its in-flight events twice)
        taker = await make_stockhold(**{**FAST, "delivery_lease_seconds": 5.0})
        await _until("delivered", lambda: _delivered_all(w, taker, sub))
        await asyncio.sleep(0.3)
    finally:
        child.kill()
    events = await _events(producer)
    wanted = _wanted(events, sub)
    got = w.keys()
    assert set(got) == set(wanted)  # no gap
    duplicates = {k for k, n in Counter(got).items() if n > 1}
    assert duplicates <= pending  # only what was read but not acknowledged at the kill
    assert _per_partition(_first_seen(got)) == _per_partition(wanted)  # in order


async def test_connection_reads_every_response_framing_and_reconnects() -> None:
    """wire.Connection (the deliverer's HTTP/1.1 client): Content-Length, chunked, a body to
    the end of the connection, `Connection: close`, a kept-alive connection the server closed
    (sent again once on a new one), a refused connection (an error, no exception)."""
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        b"HTTP/1.0 201 Created\r\n\r\nbody to the end",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n",
    ]
    seen: list[bytes] = []
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(h.split(b":")[1])
                    for h in head.split(b"\r\n")
                    if h.lower().startswith(b"content-length:")
                )
                seen.append(head + await reader.readexactly(length))
                answer = answers.pop(0)
                writer.write(answer)
                await writer.drain()
                if b"close" in answer or b"HTTP/1.0" in answer or len(answers) == 1:
                    break  # and before the last one: close a kept-alive connection unasked
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    from stockhold.delivery import wire
    from stockhold.delivery.subscriptions import StoredSubscription

    stored = StoredSubscription(_sub("c", f"http://127.0.0.1:{port}/in?x=1"), SECRET, 0)
    conn = wire.Connection(stored.sub.url)
    try:
        got = []
        for i in range(6):
            got.append(await conn.post(stored, f"0:{i}-0", b'{"n":%d}' % i))
            await asyncio.sleep(0.05)  # the unasked close has reached the client
    finally:
        conn.close()
        server.close()
        await server.wait_closed()
    assert [r.status for r in got] == [200, 204, 500, 201, 200, 202]
    assert [r.ok for r in got] == [True, True, False, True, True, True]
    assert got[2].error == "HTTP 500"
    assert connections == 4  # new ones after the close, the HTTP/1.0 answer, the unasked close
    assert all(h.startswith(b"POST /in?x=1 HTTP/1.1\r\n") for h in seen)
    assert b"X-Stockhold-Signature: sha256=" in seen[0] and seen[0].endswith(b'{"n":0}')
    refused = await wire.Connection(f"http://127.0.0.1:{free_port()}/").post(stored, "k", b"{}")
    assert not refused.ok and refused.status == 0 and refused.error
