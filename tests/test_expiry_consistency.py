"""Issue 9, item 2: EXPIRED means the stock is back, whoever reads it and whenever.

A HELD hold at or after its deadline is expired for real by the first call that finds it (or
by the sweeper, whichever comes first), in one script call: stock back, one ORDER_EXPIRED
event, the record EXPIRED with `updated_at` = that event's `ts`. So no client ever sees
EXPIRED while the hold still counts as reserved, and no order gets two expiry events.

Every deadline comes from Redis's clock and every assertion is an invariant of what the
clients saw, in the order each one saw it: none depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from stockhold_fixtures import (
    Factory,
    Running,
    add_stock,
    expect_error,
    levels,
    line,
    snapshot,
    unit,
)
from test_expiry_sweep import counting

from stockhold import constants as c
from stockhold.engine import Engine
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

HELD = pb.RESERVATION_STATE_HELD
EXPIRED = pb.RESERVATION_STATE_EXPIRED

# Orders on distinct units: each holds all 5 of its own unit.
SOLO = {f"solo-{i}": f"SOLO-{i}" for i in range(4)}
SOLO_STOCK = 5
# Orders on one shared unit: quantities 1, 2, 4, so the reserved counter (a sum of the holds
# still counted) names exactly which of them it still counts.
SHARED_SKU = "SHARED"
SHARED = {"share-0": 1, "share-1": 2, "share-2": 4}
SHARED_STOCK = 10
ORDERS = [*SOLO, *SHARED]
UNITS = [unit(s) for s in (*SOLO.values(), SHARED_SKU)]

CLIENTS = 4
MAX_ROUNDS = 20_000  # per client; the loop ends long before, once it saw every order EXPIRED
LIMIT_S = 30.0  # per client, after the last deadline; again ends long before
GAP_S = 0.3  # between the two groups of holds
# What this file checks is consistency, not Redis timeouts: a loaded box (everything here runs
# in one process) must not turn a slow answer into BACKEND_UNAVAILABLE.
PATIENT = {"redis_socket_timeout_seconds": 10.0, "redis_connect_timeout_seconds": 5.0}


# -- helpers -------------------------------------------------------------------------------------


def redis_ms(client: Any) -> int:
    """Redis's clock in ms (sync client): the only clock a deadline is measured against."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def expiry_events(client: Any) -> dict[str, list[int]]:
    """order id -> the ts of each of its ORDER_EXPIRED events, over every partition stream."""
    out: dict[str, list[int]] = defaultdict(list)
    for key in client.scan_iter(match="*:events", count=1000):
        for _, fields in client.xrange(key):
            if fields[b"type"] == c.EVENT_EXPIRED.encode():
                out[fields[b"order_id"].decode()].append(int(fields[b"ts"]))
    return out


def event_types(client: Any, order_id: str) -> Counter[str]:
    """How many events of each type an order has."""
    out: Counter[str] = Counter()
    for key in client.scan_iter(match="*:events", count=1000):
        for _, fields in client.xrange(key):
            if fields.get(b"order_id") == order_id.encode():
                out[fields[b"type"].decode()] += 1
    return out


def record(client: Any, order_id: str) -> dict[str, str]:
    """The stored record of an order (found by scan: tests do not rebuild the key layout)."""
    for k in client.scan_iter(match="*:order:*", count=1000):
        if client.hget(k, "oid") == order_id.encode():
            return {f.decode(): v.decode() for f, v in client.hgetall(k).items()}
    raise AssertionError(f"no record for {order_id}")


def in_expiry_index(client: Any, order_id: str) -> bool:
    return any(
        client.zscore(k, order_id) is not None
        for k in client.scan_iter(match="*:expiry", count=1000)
    )


def still_counted(reply: pb.GetAvailabilityResponse) -> set[str]:
    """The orders whose hold the counters of one GetAvailability still count as reserved.

    Also checks that every counter is one the holds can explain (on_hand never moves here).
    """
    by_sku = {s.unit.sku: s for s in reply.levels}
    assert len(by_sku) == len(UNITS), reply
    counted: set[str] = set()
    for oid, sku in SOLO.items():
        s = by_sku[sku]
        assert (s.available + s.reserved, s.reserved) in {(SOLO_STOCK, 0), (SOLO_STOCK, 5)}, s
        if s.reserved:
            counted.add(oid)
    s = by_sku[SHARED_SKU]
    assert s.available + s.reserved == SHARED_STOCK and 0 <= s.reserved <= 7, s
    counted |= {oid for oid, q in SHARED.items() if s.reserved & q}
    return counted


async def stock_and_hold(stub: pb_grpc.InventoryStub, hold_seconds: int) -> dict[str, int]:
    """Stock every unit, then hold the orders in two groups, the second `GAP_S` later, so that
    the clients see some holds due while others (on the shared unit too) are not; order id ->
    deadline (Redis ms)."""
    for sku in SOLO.values():
        await add_stock(stub, sku, "w1", SOLO_STOCK)
    await add_stock(stub, SHARED_SKU, "w1", SHARED_STOCK)
    wanted = [(oid, sku, SOLO_STOCK) for oid, sku in SOLO.items()]
    wanted += [(oid, SHARED_SKU, q) for oid, q in SHARED.items()]
    deadlines: dict[str, int] = {}
    for group in (wanted[::2], wanted[1::2]):
        if deadlines:
            await asyncio.sleep(GAP_S)
        replies = await asyncio.gather(
            *(
                stub.Reserve(
                    pb.ReserveRequest(
                        order_id=oid, lines=[line(sku, q, "w1")], hold_seconds=hold_seconds
                    )
                )
                for oid, sku, q in group
            )
        )
        for r in replies:
            assert r.reservation.state == HELD
            deadlines[r.reservation.order_id] = r.reservation.expires_at.ToMilliseconds()
    return deadlines


def assert_balanced(reply: pb.GetAvailabilityResponse) -> None:
    """Every hold expired: everything available again, nothing reserved."""
    assert {(s.unit.sku, s.on_hand, s.available, s.reserved) for s in reply.levels} == {
        (sku, SOLO_STOCK, SOLO_STOCK, 0) for sku in SOLO.values()
    } | {(SHARED_SKU, SHARED_STOCK, SHARED_STOCK, 0)}


# -- several clients around the deadline, with the sweepers running ------------------------------


class Seen:
    """What one client saw, in the order it saw it."""

    def __init__(self) -> None:
        self.expired: set[str] = set()  # orders it read EXPIRED
        self.released: set[str] = set()  # orders whose stock it saw back
        self.updated_at: dict[str, set[int]] = defaultdict(set)  # of its EXPIRED reads
        self.held_reads = 0
        self.expired_reads = 0
        self.rounds = 0


async def hammer(stub: pb_grpc.InventoryStub, index: int, give_up: float) -> Seen:
    """GetReservation of one order, then GetAvailability of every unit, over and over, until
    this client has read every order EXPIRED; checks each answer against what it saw before."""
    seen = Seen()
    all_units = pb.GetAvailabilityRequest(units=UNITS)
    for n in range(MAX_ROUNDS):
        assert time.monotonic() < give_up, f"client {index}: not every order read EXPIRED"
        seen.rounds = n + 1
        oid = ORDERS[(n + index) % len(ORDERS)]
        r = await stub.GetReservation(pb.GetReservationRequest(order_id=oid))
        if r.state == EXPIRED:
            seen.expired.add(oid)
            seen.expired_reads += 1
            assert r.HasField("updated_at"), r
            assert r.updated_at.ToMilliseconds() >= r.expires_at.ToMilliseconds(), r
            seen.updated_at[oid].add(r.updated_at.ToMilliseconds())
        else:
            assert r.state == HELD, r
            seen.held_reads += 1
            assert oid not in seen.expired, f"client {index}: {oid} HELD again after EXPIRED"
            assert oid not in seen.released, f"client {index}: {oid} HELD after its stock was back"
        counted = still_counted(await stub.GetAvailability(all_units))
        # The heart of it: read EXPIRED before, so the stock must be back now.
        ghosts = counted & seen.expired
        assert not ghosts, f"client {index}: read EXPIRED, yet still counted as reserved: {ghosts}"
        back_again = counted & seen.released
        assert not back_again, f"client {index}: stock came back, then counted again: {back_again}"
        seen.released |= set(ORDERS) - counted
        if len(seen.expired) == len(ORDERS):
            return seen
    raise AssertionError(f"client {index}: not every order read EXPIRED in {MAX_ROUNDS} rounds")


@pytest.mark.parametrize("sweep_s", [0.05, 0.5], ids=["sweeper-fast", "sweeper-slow"])
async def test_no_client_sees_expired_while_the_hold_still_counts(
    make_stockhold: Factory, sweep_s: float
) -> None:
    # Two servers on one Redis, each sweeping; the clients alternate between them.
    servers = [await make_stockhold(sweep_interval_seconds=sweep_s, **PATIENT) for _ in range(2)]
    swept: list[int] = []
    for s in servers:
        counting(s.server.engine, swept)
    admin = servers[0].redis.client()
    channels = [servers[i % 2].channel() for i in range(CLIENTS)]
    try:
        stubs = [pb_grpc.InventoryStub(ch) for ch in channels]
        deadlines = await stock_and_hold(stubs[0], hold_seconds=1)
        last = max(deadlines.values())

        # Start hammering shortly before the first deadline (a late start only means fewer
        # HELD reads: nothing asserted depends on it).
        wait_s = (min(deadlines.values()) - redis_ms(admin) - 300) / 1000
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        give_up = time.monotonic() + max(0.0, (last - redis_ms(admin)) / 1000) + LIMIT_S
        seen = await asyncio.gather(*(hammer(s, i, give_up) for i, s in enumerate(stubs)))

        # One ORDER_EXPIRED per order, at or after its deadline, and the record agrees.
        events = expiry_events(admin)
        assert {oid: len(ts) for oid, ts in events.items()} == {oid: 1 for oid in ORDERS}
        for oid in ORDERS:
            (ts,) = events[oid]
            rec = record(admin, oid)
            assert rec["st"] == c.STATE_EXPIRED and int(rec["up"]) == ts >= deadlines[oid]
            assert not in_expiry_index(admin, oid)
            assert event_types(admin, oid) == {c.EVENT_RESERVED: 1, c.EVENT_EXPIRED: 1}
            # Every EXPIRED any client read carried that event's ts as updated_at.
            assert set().union(*(s.updated_at[oid] for s in seen)) == {ts}, oid
            got = await stubs[0].GetReservation(pb.GetReservationRequest(order_id=oid))
            assert got.state == EXPIRED and got.updated_at.ToMilliseconds() == ts

        # Counters balance, through every server.
        for stub in stubs[:2]:
            assert_balanced(await stub.GetAvailability(pb.GetAvailabilityRequest(units=UNITS)))
    finally:
        for ch in channels:
            await ch.close()
    by_sweepers = sum(swept)
    print(
        f"\n{len(ORDERS)} holds, sweep every {sweep_s} s: expired by the sweepers "
        f"{by_sweepers}, by a call that found them due {len(ORDERS) - by_sweepers}; rounds per "
        f"client {[s.rounds for s in seen]}, HELD reads {sum(s.held_reads for s in seen)}, "
        f"EXPIRED reads {sum(s.expired_reads for s in seen)}"
    )


# -- the sweeper off: the first call after the deadline expires the hold ---------------------------


@pytest.fixture
async def unswept(make_stockhold: Factory) -> Running:
    """A server whose sweeper never runs during the test."""
    return await make_stockhold(sweep_interval_seconds=3600, **PATIENT)


async def wait_past(client: Any, ms: int, limit_s: float = 5.0) -> None:
    """Sleep (bounded) until Redis's clock is past `ms`."""
    give_up = time.monotonic() + limit_s
    for _ in range(500):
        if redis_ms(client) > ms:
            return
        assert time.monotonic() < give_up, "Redis's clock never passed"
        await asyncio.sleep(0.02)
    raise AssertionError("Redis's clock never passed")


async def one_due_hold(stub: pb_grpc.InventoryStub, admin: Any) -> int:
    """Stock TEE 10 and hold 3 for o-1 for 1 s; wait until it is due. Returns its deadline."""
    await add_stock(stub, "TEE", "w1", 10)
    held = await stub.Reserve(
        pb.ReserveRequest(order_id="o-1", lines=[line("TEE", 3, "w1")], hold_seconds=1)
    )
    deadline: int = held.reservation.expires_at.ToMilliseconds()
    await wait_past(admin, deadline)
    assert record(admin, "o-1")["st"] == c.STATE_HELD  # nobody expired it yet
    return deadline


def assert_expired_for_real(admin: Any, deadline: int) -> int:
    """o-1 is EXPIRED as the sweeper would leave it; returns its ORDER_EXPIRED event's ts."""
    rec = record(admin, "o-1")
    (ts,) = expiry_events(admin)["o-1"]
    assert rec["st"] == c.STATE_EXPIRED and int(rec["dl"]) == deadline
    assert int(rec["up"]) == ts >= deadline
    assert not in_expiry_index(admin, "o-1")
    assert event_types(admin, "o-1") == {c.EVENT_RESERVED: 1, c.EVENT_EXPIRED: 1}
    (key,) = [
        k for k in admin.scan_iter(match="*:order:*", count=1000) if admin.hget(k, "oid") == b"o-1"
    ]
    assert admin.pttl(key) > 0  # kept for the retention, as every finished record
    return ts


async def test_a_read_right_after_the_deadline_expires_the_hold_with_the_sweeper_off(
    unswept: Running,
) -> None:
    admin = unswept.redis.client()
    async with unswept.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        deadline = await one_due_hold(stub, admin)

        r = await stub.GetReservation(pb.GetReservationRequest(order_id="o-1"))

        assert r.state == EXPIRED
        ts = assert_expired_for_real(admin, deadline)
        assert r.updated_at.ToMilliseconds() == ts
        assert await levels(stub, unit("TEE")) == {("TEE", "", "", "w1"): (10, 10, 0)}
        # Later reads and a sweep change nothing.
        before = await snapshot(unswept.redis, with_ttl=True)
        assert await stub.GetReservation(pb.GetReservationRequest(order_id="o-1")) == r
        assert await unswept.server.engine.expire_due(actor="test") == 0
        assert await snapshot(unswept.redis, with_ttl=True) == before


def _call(op: str, stub: pb_grpc.InventoryStub) -> Awaitable[Any]:
    if op == "get":
        return stub.GetReservation(pb.GetReservationRequest(order_id="o-1"))
    if op == "commit":
        return stub.Commit(pb.CommitRequest(order_id="o-1", payment_ref="pay-1"))
    if op == "release":
        return stub.Release(pb.ReleaseRequest(order_id="o-1", reason="cancelled"))
    if op == "extend":
        return stub.ExtendReservation(pb.ExtendReservationRequest(order_id="o-1", hold_seconds=60))
    if op == "mark-pending":
        payment = pb.PaymentPending(provider="wechatpay", out_trade_no="NO-1")
        return stub.MarkPaymentPending(
            pb.MarkPaymentPendingRequest(order_id="o-1", payment=payment)
        )
    assert op == "report-failed"
    return stub.ReportPayment(
        pb.ReportPaymentRequest(
            order_id="o-1", provider="wechatpay", status=pb.PAYMENT_STATUS_FAILED
        )
    )


@pytest.mark.parametrize(
    ("op", "refused"),
    [
        ("get", False),
        ("commit", True),
        ("release", False),
        ("extend", True),
        ("mark-pending", True),
        ("report-failed", False),
    ],
)
async def test_every_call_that_finds_a_due_hold_expires_it_before_answering(
    unswept: Running, op: str, refused: bool
) -> None:
    """Whatever the call: once its answer says EXPIRED, the stock is back, the one event is
    there, and updated_at is its ts. Commit, Extend and MarkPaymentPending are refused with
    RESERVATION_EXPIRED; the same call again writes nothing more."""
    admin = unswept.redis.client()
    async with unswept.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        deadline = await one_due_hold(stub, admin)

        if refused:
            err = await expect_error(_call(op, stub))
            assert (err.code, err.reason) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "RESERVATION_EXPIRED",
            )
        else:
            reply = await _call(op, stub)
            r = reply if op == "get" else reply.reservation
            assert r.state == EXPIRED and r.release_reason == ""

        ts = assert_expired_for_real(admin, deadline)
        if not refused:
            assert r.updated_at.ToMilliseconds() == ts
        assert await levels(stub, unit("TEE")) == {("TEE", "", "", "w1"): (10, 10, 0)}
        got = await stub.GetReservation(pb.GetReservationRequest(order_id="o-1"))
        assert got.state == EXPIRED and got.updated_at.ToMilliseconds() == ts
        assert not got.HasField("payment") or got.payment.status != pb.PAYMENT_STATUS_PENDING

        before = await snapshot(unswept.redis, with_ttl=True)
        if refused:
            err = await expect_error(_call(op, stub))
            assert err.reason == "RESERVATION_EXPIRED"
        else:
            await _call(op, stub)
        assert await snapshot(unswept.redis, with_ttl=True) == before


async def test_racing_first_calls_and_sweeps_on_a_due_hold_expire_it_once(
    unswept: Running,
) -> None:
    """Reads, commits and sweeps of two engines, all at once on one due hold: one expiry."""
    admin = unswept.redis.client()
    engine = unswept.server.engine
    other = Engine.connect(unswept.redis.url, unswept.settings)
    try:
        async with unswept.channel() as channel:
            stub = pb_grpc.InventoryStub(channel)
            deadline = await one_due_hold(stub, admin)

            calls: list[Awaitable[Any]] = []
            for i in range(30):
                calls.append(stub.GetReservation(pb.GetReservationRequest(order_id="o-1")))
                if i % 3 == 0:
                    calls.append(stub.Commit(pb.CommitRequest(order_id="o-1")))
                if i % 6 == 0:
                    calls.append((engine if i % 12 else other).expire_due(actor="test"))
                    calls.append(other.get_reservation("o-1", actor="test"))
            results = await asyncio.gather(*calls, return_exceptions=True)

            ts = assert_expired_for_real(admin, deadline)
            for res in results:
                if isinstance(res, grpc.aio.AioRpcError):
                    assert res.code() == grpc.StatusCode.FAILED_PRECONDITION, res
                    assert "expired" in (res.details() or "")
                elif isinstance(res, int):
                    assert res in (0, 1)
                elif isinstance(res, pb.Reservation):
                    assert res.state == EXPIRED and res.updated_at.ToMilliseconds() == ts
                else:
                    assert not isinstance(res, BaseException), res
                    assert res.state.name == "EXPIRED" and res.updated_ms == ts
            assert sum(res for res in results if isinstance(res, int)) <= 1
            assert await levels(stub, unit("TEE")) == {("TEE", "", "", "w1"): (10, 10, 0)}
    finally:
        await other.close()
    assert expiry_events(admin) == {"o-1": [ts]}
