"""The subscription RPCs (issue 12, docs/events.md): CRUD, lag, metrics, replay, the CLI.

What is pinned: CreateSubscription returns a server-made secret once; Get/List/Delete; every
bad request is INVALID_ARGUMENT (field violations) or NOT_FOUND and changes nothing; lag
figures of a hand-built state (a fake consumer's reads and acks, failed entries, delivery
statistics) exactly, on Redis 7 (XINFO `lag`), Redis 6.2 (counted) and a cluster, with
configurable thresholds, also as Prometheus gauges; ReplayFailed delivers in time order, each
event once, empties the failed set and stops at the first refusal; ReplayFrom rewinds the
groups; the CLI commands against a running server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from stockhold_fixtures import Factory, Running, add_stock, async_client, expect_error, snapshot
from test_cli_policy import stockhold_cli

from stockhold import metrics
from stockhold.delivery import wire
from stockhold.delivery.subscriptions import SubscriptionStore
from stockhold.events import encode_cursor, parse_entry, parse_id
from stockhold.settings import Settings
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

# Tests build the consumer side by hand: no deliverer may read the groups.
QUIET = {"delivery_enabled": False} if "delivery_enabled" in Settings.__dataclass_fields__ else {}


async def start(make_stockhold: Factory, redis: Any = None, **overrides: Any) -> Running:
    return await make_stockhold(redis=redis, **QUIET, **overrides)


def sub_pb(name: str = "wms-east", url: str = "http://127.0.0.1:9/hook", **kw: Any) -> Any:
    return pb.Subscription(name=name, url=url, **kw)


def store_of(running: Running) -> SubscriptionStore:
    return SubscriptionStore(running.server.engine.calls)


def partition_of(running: Running, sku: str) -> int:
    return running.server.engine.resolver.units([(sku, "", "")])[0].partition


_adjusted = 0


async def adjust(running: Running, stub: pb_grpc.InventoryStub, sku: str, wh: str) -> None:
    """AdjustStock +1 whose event lands in the SKU's partition (on one node an adjustment's
    event goes to its id's partition, on a cluster to the unit's: an id where both agree)."""
    global _adjusted
    resolver = running.server.engine.resolver
    want = partition_of(running, sku)
    for _ in range(10_000):
        _adjusted += 1
        aid = f"adj-{_adjusted}"
        if resolver.adjustment(aid).partition == want:
            await add_stock(stub, sku, wh, 1, adjustment_id=aid)
            return
    raise AssertionError("no adjustment id for the partition")


def two_partitions(running: Running) -> tuple[str, str]:
    """Two SKUs whose stock lives in different partitions."""
    first = partition_of(running, "A")
    for i in range(1000):
        if partition_of(running, f"B{i}") != first:
            return "A", f"B{i}"
    raise AssertionError("no second partition")


# -- CRUD ----------------------------------------------------------------------------------------


async def test_create_get_list_delete(make_stockhold: Factory) -> None:
    running = await start(make_stockhold)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        request = pb.CreateSubscriptionRequest(
            subscription=sub_pb(warehouses=["wh-east"], on_failure=pb.WAIT)
        )
        made = await stub.CreateSubscription(request)
        assert made.created and len(made.secret) >= 32
        s = made.subscription
        assert (s.name, s.url, list(s.warehouses), s.on_failure) == (
            "wms-east",
            "http://127.0.0.1:9/hook",
            ["wh-east"],
            pb.WAIT,
        )
        assert (s.timeout_ms, s.retry.max_attempts, s.retry.initial_backoff_ms) == (5000, 8, 200)
        assert s.created_at.seconds > 0 and len(s.secret_fingerprint) == 12
        again = await stub.CreateSubscription(request)  # a replay: the secret is not shown
        assert not again.created and again.secret == "" and again.subscription == s
        given = await stub.CreateSubscription(
            pb.CreateSubscriptionRequest(subscription=sub_pb("wms-south"), secret="s" * 16)
        )
        assert given.created and given.secret == ""  # only a server-made secret comes back
        assert await stub.GetSubscription(pb.GetSubscriptionRequest(name="wms-east")) == s
        listed = await stub.ListSubscriptions(pb.ListSubscriptionsRequest())
        assert [x.name for x in listed.subscriptions] == ["wms-east", "wms-south"]
        deleted = await stub.DeleteSubscription(pb.DeleteSubscriptionRequest(name="wms-east"))
        assert deleted.deleted
        again_deleted = await stub.DeleteSubscription(pb.DeleteSubscriptionRequest(name="wms-east"))
        assert not again_deleted.deleted
        err = await expect_error(stub.GetSubscription(pb.GetSubscriptionRequest(name="wms-east")))
        assert (err.code.name, err.reason) == ("NOT_FOUND", "SUBSCRIPTION_NOT_FOUND")


# -- bad input -----------------------------------------------------------------------------------

AHEAD = encode_cursor([(2**50, 0)] * 16)


def _create(**kw: Any) -> tuple[str, Any]:
    sub = {"name": "new", **kw.pop("sub", {})}
    return "CreateSubscription", pb.CreateSubscriptionRequest(subscription=sub_pb(**sub), **kw)


BAD: list[tuple[str, tuple[str, Any], str, set[str]]] = [
    ("url not http", _create(sub={"url": "ftp://x/y"}), "INVALID_ARGUMENT", {"subscription.url"}),
    ("bad name", _create(sub={"name": "a b"}), "INVALID_ARGUMENT", {"subscription.name"}),
    ("short secret", _create(secret="short"), "INVALID_ARGUMENT", {"secret"}),
    ("bad cursor", _create(start_cursor="nope"), "INVALID_ARGUMENT", {"start_cursor"}),
    ("cursor ahead", _create(start_cursor=AHEAD), "INVALID_ARGUMENT", {"start_cursor"}),
    (
        "bad filters",
        _create(sub={"types": ["NOPE"], "warehouses": [""]}),
        "INVALID_ARGUMENT",
        {"subscription.types[0]", "subscription.warehouses[0]"},
    ),
    (
        "bad retry",
        _create(sub={"timeout_ms": -1, "retry": pb.RetryPolicy(max_attempts=1000)}),
        "INVALID_ARGUMENT",
        {"subscription.timeout_ms", "subscription.retry.max_attempts"},
    ),
    ("exists", ("CreateSubscription", pb.CreateSubscriptionRequest(
        subscription=sub_pb("old", url="http://127.0.0.1:10/other"))), "ALREADY_EXISTS", set()),
    ("get unknown", ("GetSubscription", pb.GetSubscriptionRequest(name="nope")), "NOT_FOUND",
     set()),
    ("get bad name", ("GetSubscription", pb.GetSubscriptionRequest(name="")), "INVALID_ARGUMENT",
     {"name"}),
    ("lag unknown", ("GetSubscriptionLag", pb.GetSubscriptionLagRequest(name="nope")),
     "NOT_FOUND", set()),
    ("replay unknown", ("ReplayFailed", pb.ReplayFailedRequest(name="nope")), "NOT_FOUND",
     set()),
    ("replay bad filter", ("ReplayFailed", pb.ReplayFailedRequest(
        name="old", types=["NOPE"], max_events=-1)), "INVALID_ARGUMENT",
     {"types[0]", "max_events"}),
    ("replay-from unknown", ("ReplayFrom", pb.ReplayFromRequest(name="nope", cursor="earliest")),
     "NOT_FOUND", set()),
    ("replay-from no cursor", ("ReplayFrom", pb.ReplayFromRequest(name="old")),
     "INVALID_ARGUMENT", {"cursor"}),
    ("replay-from bad cursor", ("ReplayFrom", pb.ReplayFromRequest(name="old", cursor="x!")),
     "INVALID_ARGUMENT", {"cursor"}),
    ("replay-from ahead", ("ReplayFrom", pb.ReplayFromRequest(name="old", cursor=AHEAD)),
     "INVALID_ARGUMENT", {"cursor"}),
]  # fmt: skip


async def test_bad_input_is_refused_and_changes_nothing(make_stockhold: Factory) -> None:
    running = await start(make_stockhold)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await stub.CreateSubscription(
            pb.CreateSubscriptionRequest(subscription=sub_pb("old"), secret="s" * 16)
        )
        await add_stock(stub, "A", "wh-east", 5)
        for label, (method, request), code, fields in BAD:
            before = await snapshot(running.redis)
            err = await expect_error(getattr(stub, method)(request))
            assert err.code.name == code, (label, err)
            assert set(err.violations) == fields, (label, err.violations)
            if code == "NOT_FOUND":
                assert err.reason == "SUBSCRIPTION_NOT_FOUND", label
            assert await snapshot(running.redis) == before, label


# -- lag -----------------------------------------------------------------------------------------


async def test_lag_figures_of_a_hand_built_state(make_stockhold: Factory, redis_any: Any) -> None:
    running = await start(make_stockhold, redis_any, lag_warn_events=2, lag_alert_events=8)
    store = store_of(running)
    sku_a, sku_b = two_partitions(running)
    pa, pb_ = partition_of(running, sku_a), partition_of(running, sku_b)
    pc = next(p for p in range(store.partitions) if p not in (pa, pb_))
    client: Any = async_client(running.redis)
    try:
        async with running.channel() as channel:
            stub = pb_grpc.InventoryStub(channel)
            await stub.CreateSubscription(pb.CreateSubscriptionRequest(subscription=sub_pb()))
            for _ in range(8):
                await adjust(running, stub, sku_a, "wh-east")
            await adjust(running, stub, sku_b, "wh-east")
            # A fake consumer reads 3 of A's partition and acknowledges the first.
            key_a = store.stream_key(pa)
            read = await client.xreadgroup("sub:wms-east", "fake", {key_a: ">"}, count=3)
            ids = [i for i, _ in read[0][1]]
            await client.xack(key_a, "sub:wms-east", ids[0])
            await client.zadd(store.failed_key("wms-east", pb_), {"1-0": 1, "2-0": 2})
            now = await running.server.engine.calls.redis_time_ms()
            stats = {
                pa: {"owner": "proc-1", "up": now, "rate": 12.5, "p50": 40, "p99": 900, "n": 10},
                pb_: {"owner": "proc-2", "up": now, "rate": 2.5, "p50": 20, "p99": 50, "n": 30,
                      "lost": 3},
                pc: {"owner": "gone", "up": now - 60_000, "rate": 99, "p50": 0, "p99": 0, "n": 0},
            }  # fmt: skip
            for p, fields in stats.items():
                await client.hset(store.stats_key("wms-east", p), mapping=fields)
            t0 = await running.server.engine.calls.redis_time_ms()
            reply = await stub.GetSubscriptionLag(pb.GetSubscriptionLagRequest(name="wms-east"))
            t1 = await running.server.engine.calls.redis_time_ms()
    finally:
        await client.aclose()
    assert (reply.warn_events, reply.alert_events, reply.slow_consumer_ms) == (2, 8, 800)
    (s,) = reply.subscriptions
    parts = {p.partition: p for p in s.partitions}
    assert len(parts) == store.partitions
    a, b, c = parts[pa], parts[pb_], parts[pc]
    assert (a.backlog, a.status, a.owner, a.rate_per_second) == (7, pb.WARN, "proc-1", 12.5)
    oldest_ms = parse_id(ids[1])[0]  # the oldest pending entry once the first was acked
    assert t0 - oldest_ms <= a.oldest_age_ms <= t1 - oldest_ms
    assert (b.backlog, b.failed, b.status, b.lost, b.wms_p99_ms) == (1, 2, pb.HEALTHY, 3, 50)
    assert (c.backlog, c.owner, c.rate_per_second) == (0, "", 0)  # stale statistics
    assert (s.backlog, s.failed, s.lost, s.status) == (8, 2, 3, pb.ALERT)
    assert (s.rate_per_second, s.wms_p50_ms, s.wms_p99_ms, s.slow_consumer) == (15, 25, 900, True)
    assert s.oldest_age_ms == max(p.oldest_age_ms for p in s.partitions)

    # The same figures as gauges, from a scrape.
    collector = metrics.SubscriptionLagCollector(metrics.ContentionCollector(running.address))
    try:
        families = {f.name: f for f in await asyncio.to_thread(lambda: list(collector.collect()))}
    finally:
        collector.server.close()

    def gauge(name: str, **labels: str) -> float:
        for sample in families[f"stockhold_subscription_{name}"].samples:
            if sample.labels == {"subscription": "wms-east", **labels}:
                return float(sample.value)
        raise AssertionError(name)

    assert families["stockhold_subscription_lag_up"].samples[0].value == 1
    assert (gauge("backlog"), gauge("failed"), gauge("status"), gauge("slow_consumer")) == (
        8,
        2,
        2,
        1,
    )
    assert (gauge("delivery_rate"), gauge("lost")) == (15, 3)
    assert gauge("wms_response_ms", quantile="0.99") == 900
    assert gauge("wms_response_ms", quantile="0.5") == 25
    assert gauge("oldest_age_seconds") == pytest.approx(s.oldest_age_ms / 1000, abs=5)


# -- replay --------------------------------------------------------------------------------------


class FakeWms:
    """A webhook that records each POST's Idempotency-Key and answers 500 for keys in `fail`."""

    def __init__(self) -> None:
        self.ok: list[str] = []
        self.refused: list[str] = []
        self.fail: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        body = await request.read()
        assert json.loads(body)["id"] == key
        if key in self.fail:
            self.refused.append(key)
            return web.Response(status=500)
        self.ok.append(key)
        return web.Response(status=204)


@pytest.fixture
async def wms() -> AsyncIterator[tuple[FakeWms, str]]:
    fake = FakeWms()
    app = web.Application()
    app.router.add_post("/hook", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield fake, f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


async def fail_every_event(running: Running, name: str) -> list[str]:
    """Put every stream entry into the subscription's failed set, as the deliverer would
    after the last attempt; returns their keys in time order (ms, partition, seq)."""
    store = store_of(running)
    client: Any = async_client(running.redis)
    keys: list[tuple[int, int, int, str]] = []
    try:
        for p in range(store.partitions):
            for entry_id, fields in await client.xrange(store.stream_key(p)):
                e = parse_entry(p, entry_id, fields)
                record = {"body": wire.event_body(e).decode(), "error": "HTTP 500", "attempts": 8}
                await client.zadd(store.failed_key(name, p), {e.id_text: e.id[0]})
                await client.hset(store.failed_events_key(name, p), e.id_text, orjson.dumps(record))
                keys.append((e.id[0], p, e.id[1], wire.event_key(e)))
    finally:
        await client.aclose()
    return [k for *_, k in sorted(keys)]


async def failed_left(running: Running, name: str) -> int:
    store = store_of(running)
    replies = await store.calls.pipeline(
        [
            (cmd, key(name, p))
            for p in range(store.partitions)
            for cmd, key in (("ZCARD", store.failed_key), ("HLEN", store.failed_events_key))
        ]
    )
    return sum(int(r) for r in replies)


async def test_replay_failed_in_time_order_once_each(
    make_stockhold: Factory, wms: tuple[FakeWms, str]
) -> None:
    fake, url = wms
    running = await start(make_stockhold)
    sku_a, sku_b = two_partitions(running)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await stub.CreateSubscription(pb.CreateSubscriptionRequest(subscription=sub_pb(url=url)))
        for i in range(6):
            await adjust(running, stub, (sku_a, sku_b)[i % 2], ("wh-east", "wh-south")[i % 3 == 0])
        expected = await fail_every_event(running, "wms-east")
        assert len(expected) == 6
        # A filter no failed event matches: nothing sent.
        none = await stub.ReplayFailed(pb.ReplayFailedRequest(name="wms-east", skus=["ZZZ"]))
        assert (none.delivered, none.remaining, none.error, fake.ok) == (0, 0, "", [])
        # The WMS refuses the third: two delivered, the replay stops there.
        fake.fail = {expected[2]}
        first = await stub.ReplayFailed(pb.ReplayFailedRequest(name="wms-east"))
        assert (first.delivered, first.remaining) == (2, 4) and "HTTP 500" in first.error
        assert fake.ok == expected[:2] and fake.refused == [expected[2]]
        assert await failed_left(running, "wms-east") == 2 * 4
        # max_events bounds a replay.
        fake.fail = set()
        one = await stub.ReplayFailed(pb.ReplayFailedRequest(name="wms-east", max_events=1))
        assert (one.delivered, one.remaining, one.error) == (1, 3, "")
        rest = await stub.ReplayFailed(pb.ReplayFailedRequest(name="wms-east"))
        assert (rest.delivered, rest.remaining, rest.error) == (3, 0, "")
    assert fake.ok == expected  # every event exactly once, in time order
    assert await failed_left(running, "wms-east") == 0


async def test_replay_from_rewinds_the_groups(make_stockhold: Factory) -> None:
    running = await start(make_stockhold)
    store = store_of(running)
    sku_a, sku_b = two_partitions(running)
    pa = partition_of(running, sku_a)
    client: Any = async_client(running.redis)
    try:
        async with running.channel() as channel:
            stub = pb_grpc.InventoryStub(channel)
            await stub.CreateSubscription(pb.CreateSubscriptionRequest(subscription=sub_pb()))
            for i in range(5):
                await adjust(running, stub, (sku_a, sku_b)[i % 2], "wh-east")
            heads: list[tuple[int, int]] = []
            for p in range(store.partitions):  # a fake consumer takes and acks everything
                key = store.stream_key(p)
                read = await client.xreadgroup("sub:wms-east", "fake", {key: ">"}, count=100)
                ids = [i for _, entries in read for i, _ in entries]
                if ids:
                    await client.xack(key, "sub:wms-east", *ids)
                last = await client.xrevrange(key, count=1)
                heads.append(parse_id(last[0][0]) if last else (0, 0))

            async def backlog() -> int:
                lag = await stub.GetSubscriptionLag(pb.GetSubscriptionLagRequest(name="wms-east"))
                return lag.subscriptions[0].backlog

            assert await backlog() == 0
            back = await stub.ReplayFrom(pb.ReplayFromRequest(name="wms-east", cursor="earliest"))
            assert (back.partitions, back.truncated_partitions) == (store.partitions, 0)
            assert await backlog() == 5
            here = await stub.ReplayFrom(
                pb.ReplayFromRequest(name="wms-east", cursor=encode_cursor(heads))
            )
            assert here.truncated_partitions == 0 and await backlog() == 0
            # The cursor's position in A's partition trimmed away: that partition is truncated.
            entries = await client.xrange(store.stream_key(pa))
            old = list(heads)
            old[pa] = parse_id(entries[0][0])
            await client.xtrim(
                store.stream_key(pa), minid=entries[1][0].decode(), approximate=False
            )
            cut = await stub.ReplayFrom(
                pb.ReplayFromRequest(name="wms-east", cursor=encode_cursor(old))
            )
            assert cut.truncated_partitions == 1
            assert await backlog() == len(entries) - 1
    finally:
        await client.aclose()


# -- the CLI -------------------------------------------------------------------------------------


async def test_cli_subscription_commands(make_stockhold: Factory, tmp_path: Path) -> None:
    running = await start(make_stockhold)
    secret = tmp_path / "secret"
    secret.write_text("a-secret-of-16-bytes-or-more\n")

    async def cli(*argv: str, code: int = 0) -> str:
        rc, out, err = await stockhold_cli(running, *argv)
        assert rc == code, err
        return out if code == 0 else err

    made = json.loads(
        await cli(
            "subscriptions", "create", "wms-east", "--url", "http://127.0.0.1:9/hook",
            "--warehouse", "wh-east", "--type", "ORDER_RESERVED", "--max-attempts", "3",
            "--on-failure", "wait", "--secret-file", str(secret), "--from", "earliest",
        )
    )  # fmt: skip
    assert made["created"] is True and made["secret"] == ""
    sub = made["subscription"]
    assert (sub["warehouses"], sub["types"], sub["on_failure"]) == (
        ["wh-east"],
        ["ORDER_RESERVED"],
        "WAIT",
    )
    assert sub["retry"]["max_attempts"] == 3
    listed = json.loads(await cli("subscriptions", "list"))
    assert [s["name"] for s in listed["subscriptions"]] == ["wms-east"]
    assert json.loads(await cli("subscriptions", "get", "wms-east"))["name"] == "wms-east"
    lag = json.loads(await cli("events", "lag", "wms-east", "--json"))
    assert lag["subscriptions"][0]["status"] == "HEALTHY"
    table = await cli("events", "lag")
    assert "wms-east  HEALTHY  backlog 0" in table and "healthy < 50" in table
    replayed = json.loads(await cli("subscriptions", "replay-failed", "wms-east"))
    assert (replayed["delivered"], replayed["remaining"]) == ("0", "0")
    rewound = json.loads(await cli("subscriptions", "replay-from", "wms-east", "earliest"))
    assert rewound["partitions"] == running.settings.partitions
    err = await cli("subscriptions", "get", "nope", code=1)
    assert "NOT_FOUND" in err and "SUBSCRIPTION_NOT_FOUND" in err
    assert json.loads(await cli("subscriptions", "delete", "wms-east"))["deleted"] is True
