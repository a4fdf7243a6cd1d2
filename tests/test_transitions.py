"""Reservation states: HELD -> COMMITTED | RELEASED | EXPIRED, refusals, replays, events."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
import pytest
from stockhold_fixtures import add_stock, expect_error, levels, line, snapshot, unit, wait_settled

from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

HELD = pb.RESERVATION_STATE_HELD
COMMITTED = pb.RESERVATION_STATE_COMMITTED
RELEASED = pb.RESERVATION_STATE_RELEASED
EXPIRED = pb.RESERVATION_STATE_EXPIRED

APPLE = ("apple", "", "", "w1")
PEAR = ("pear", "", "", "w2")


# -- helpers -------------------------------------------------------------------------------------


def events(redis_proc: Any) -> list[dict[str, Any]]:
    """Every event of every partition stream, decoded, in stream order per partition."""
    c = redis_proc.client()
    out: list[dict[str, Any]] = []
    for key in sorted(c.scan_iter(match="*:events")):
        for _, fields in c.xrange(key):
            e = {k.decode(): v.decode() for k, v in fields.items()}
            e["data"] = orjson.loads(e["data"])
            out.append(e)
    return out


def event_types(redis_proc: Any, order_id: str | None = None) -> Counter[str]:
    return Counter(
        e["type"] for e in events(redis_proc) if order_id is None or e.get("order_id") == order_id
    )


def redis_ms(c: Any) -> int:
    """Redis's clock in milliseconds (the only clock stockhold trusts); `c` a sync client."""
    seconds, micros = c.time()
    return int(seconds) * 1000 + int(micros) // 1000


def order_key(c: Any, order_id: str) -> bytes:
    """The record key of an order (found by scan: tests do not rebuild the key layout)."""
    keys = [k for k in c.scan_iter(match="*:order:*") if c.hget(k, "oid") == order_id.encode()]
    assert len(keys) == 1, keys
    return bytes(keys[0])


async def wait_until_swept(c: Any, order_id: str, limit_s: float = 3.0) -> None:
    """Poll (bounded) until the sweeper has stored the record as EXPIRED."""
    key = order_key(c, order_id)
    start = time.monotonic()
    for _ in range(200):
        if c.hget(key, "st") == b"E":
            return
        assert time.monotonic() - start < limit_s, f"{order_id} did not expire within {limit_s} s"
        await asyncio.sleep(0.05)
    raise AssertionError(f"{order_id} did not expire")


async def stocked_hold(
    stub: pb_grpc.InventoryStub, order_id: str = "o-1", hold_seconds: int = 0
) -> pb.Reservation:
    """Stock apple 10 in w1 and pear 5 in w2, then hold apple 3 + pear 2 for `order_id`."""
    await add_stock(stub, "apple", "w1", 10)
    await add_stock(stub, "pear", "w2", 5)
    resp = await stub.Reserve(
        pb.ReserveRequest(
            order_id=order_id,
            lines=[line("apple", 3, "w1"), line("pear", 2, "w2")],
            hold_seconds=hold_seconds,
        )
    )
    assert resp.reservation.state == HELD
    return resp.reservation


async def counters(stub: pb_grpc.InventoryStub) -> dict[tuple[str, str, str, str], Any]:
    return await levels(stub, unit("apple"), unit("pear"))


def commit(stub: pb_grpc.InventoryStub, order_id: str = "o-1", payment_ref: str = "pay-1") -> Any:
    return stub.Commit(pb.CommitRequest(order_id=order_id, payment_ref=payment_ref))


def release(stub: pb_grpc.InventoryStub, order_id: str = "o-1", reason: str = "cancelled") -> Any:
    return stub.Release(pb.ReleaseRequest(order_id=order_id, reason=reason))


def get(stub: pb_grpc.InventoryStub, order_id: str = "o-1") -> Any:
    return stub.GetReservation(pb.GetReservationRequest(order_id=order_id))


@pytest.fixture
async def unswept(make_stockhold: Any) -> AsyncIterator[pb_grpc.InventoryStub]:
    """A stub on a server whose sweeper never runs during the test."""
    running = await make_stockhold(sweep_interval_seconds=3600)
    async with running.channel() as channel:
        yield pb_grpc.InventoryStub(channel)


async def wait_past(redis_proc: Any, deadline_ms: int, limit_s: float = 3.0) -> None:
    """Sleep (bounded) until Redis's clock is past `deadline_ms`."""
    c = redis_proc.client()
    give_up = time.monotonic() + limit_s
    for _ in range(200):
        if redis_ms(c) > deadline_ms:
            return
        assert time.monotonic() < give_up, "Redis clock never passed the deadline"
        await asyncio.sleep(0.05)
    raise AssertionError("Redis clock never passed the deadline")


# -- allowed transitions ---------------------------------------------------------------------------


async def test_commit_of_a_held_reservation_deducts_the_stock(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    held = await stocked_hold(stub)
    assert await counters(stub) == {APPLE: (10, 7, 3), PEAR: (5, 3, 2)}

    resp = await commit(stub, payment_ref="pay-42")

    r = resp.reservation
    assert r.state == COMMITTED
    assert r.payment_ref == "pay-42"
    assert r.HasField("updated_at")
    assert r.updated_at.ToMilliseconds() >= r.created_at.ToMilliseconds()
    assert list(r.allocations) == list(held.allocations)
    # reserved -= q, on_hand -= q, available unchanged.
    assert await counters(stub) == {APPLE: (7, 7, 0), PEAR: (3, 3, 0)}
    assert (await get(stub)).state == COMMITTED
    assert event_types(redis_proc, "o-1") == {"ORDER_RESERVED": 1, "ORDER_COMMITTED": 1}


async def test_release_of_a_held_reservation_returns_the_stock(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await stocked_hold(stub)

    resp = await release(stub, reason="customer cancelled")

    r = resp.reservation
    assert r.state == RELEASED
    assert r.release_reason == "customer cancelled"
    assert r.HasField("updated_at")
    # reserved -= q, available += q, on_hand unchanged.
    assert await counters(stub) == {APPLE: (10, 10, 0), PEAR: (5, 5, 0)}
    assert (await get(stub)).state == RELEASED
    assert event_types(redis_proc, "o-1") == {"ORDER_RESERVED": 1, "ORDER_RELEASED": 1}


async def test_hold_expires_within_3_seconds_but_not_before_its_deadline(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    c = redis_proc.client()
    held = await stocked_hold(stub, hold_seconds=1)
    deadline = held.expires_at.ToMilliseconds()
    assert deadline - held.created_at.ToMilliseconds() == 1000
    key = order_key(c, "o-1")
    start = time.monotonic()

    held_counters = {APPLE: (10, 7, 3), PEAR: (5, 3, 2)}
    back_counters = {APPLE: (10, 10, 0), PEAR: (5, 5, 0)}
    seen_held = swept = False
    for _ in range(150):  # bounded: at most 150 polls, and 3 s by the clock
        before = redis_ms(c)
        r = await get(stub)
        lv = await counters(stub)
        stored = c.hget(key, "st")
        after = redis_ms(c)
        if after < deadline:  # the whole poll happened before the deadline
            seen_held = True
            assert r.state == HELD
            assert lv == held_counters
            assert stored == b"H"
        if r.state != HELD:
            assert r.state == EXPIRED
            assert after >= deadline, "reported EXPIRED before its deadline"
            # EXPIRED means the stock is back: read after it, the counters say so.
            assert lv == back_counters, "read EXPIRED while the hold still counted"
            assert stored == b"E"
        else:
            assert before < deadline, "still HELD although the deadline had passed"
        if lv != held_counters:
            assert lv == back_counters
            assert after >= deadline, "stock came back before the deadline"
        if stored == b"E":
            swept = True
            break
        assert time.monotonic() - start < 3.0, "the hold did not expire within 3 s"
        await asyncio.sleep(0.02)

    assert seen_held
    assert swept, "the hold was not expired (by the sweeper or by a read)"
    assert time.monotonic() - start < 3.0
    r = await get(stub)
    assert r.state == EXPIRED
    assert r.updated_at.ToMilliseconds() >= deadline
    assert await counters(stub) == back_counters
    assert event_types(redis_proc, "o-1") == {"ORDER_RESERVED": 1, "ORDER_EXPIRED": 1}
    expired = next(e for e in events(redis_proc) if e["type"] == "ORDER_EXPIRED")
    assert int(expired["ts"]) >= deadline


async def test_sweeper_expiry_is_final_and_later_calls_see_expired(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    c = redis_proc.client()
    held = await stocked_hold(stub, hold_seconds=1)
    await wait_until_swept(c, "o-1")
    await wait_settled(redis_proc)
    assert redis_ms(c) >= held.expires_at.ToMilliseconds()
    before = await snapshot(redis_proc)

    err = await expect_error(commit(stub))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "RESERVATION_EXPIRED"

    again = await release(stub)
    assert again.reservation.state == EXPIRED
    assert again.reservation.release_reason == ""

    assert await snapshot(redis_proc) == before
    assert (await get(stub)).state == EXPIRED


# -- the deadline decides, not the sweeper -----------------------------------------------------


def assert_expired_for_real(redis_proc: Any, order_id: str, deadline: int) -> int:
    """The record is EXPIRED with `up` = the one ORDER_EXPIRED event's ts (>= the deadline),
    out of the expiry index, kept for the retention only; returns that ts."""
    c = redis_proc.client()
    key = order_key(c, order_id)
    st, dl, up = c.hmget(key, "st", "dl", "up")
    assert (st, int(dl)) == (b"E", deadline)
    assert c.pttl(key) > 0
    assert all(c.zscore(k, order_id) is None for k in c.scan_iter(match="*:expiry"))
    (e,) = [
        e
        for e in events(redis_proc)
        if e["type"] == "ORDER_EXPIRED" and e.get("order_id") == order_id
    ]
    assert int(e["ts"]) == int(up) >= deadline
    return int(up)


async def test_commit_after_the_deadline_expires_the_hold_and_is_refused_before_any_sweep(
    unswept: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    stub = unswept
    held = await stocked_hold(stub, hold_seconds=1)
    deadline = held.expires_at.ToMilliseconds()
    await wait_past(redis_proc, deadline)
    c = redis_proc.client()
    assert c.hget(order_key(c, "o-1"), "st") == b"H"  # the sweeper has not run

    err = await expect_error(commit(stub))

    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "RESERVATION_EXPIRED"
    # The answer says expired, so the stock is back (nothing deducted) and the event exists.
    assert await counters(stub) == {APPLE: (10, 10, 0), PEAR: (5, 5, 0)}
    assert event_types(redis_proc, "o-1") == {"ORDER_RESERVED": 1, "ORDER_EXPIRED": 1}
    ts = assert_expired_for_real(redis_proc, "o-1", deadline)
    r = await get(stub)
    assert r.state == EXPIRED and r.updated_at.ToMilliseconds() == ts

    # Again: the same refusal, nothing more written.
    before = await snapshot(redis_proc)
    err = await expect_error(commit(stub))
    assert err.reason == "RESERVATION_EXPIRED"
    assert await snapshot(redis_proc) == before


async def test_get_reservation_of_a_held_reservation_past_its_deadline_expires_it(
    unswept: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    stub = unswept
    held = await stocked_hold(stub, hold_seconds=1)
    assert (await get(stub)).state == HELD
    deadline = held.expires_at.ToMilliseconds()
    await wait_past(redis_proc, deadline)
    c = redis_proc.client()
    assert c.hget(order_key(c, "o-1"), "st") == b"H"  # the sweeper has not run

    r = await get(stub)

    assert r.state == EXPIRED
    assert r.expires_at == held.expires_at
    # Expired for real by the read, exactly as the sweeper would have.
    ts = assert_expired_for_real(redis_proc, "o-1", deadline)
    assert r.updated_at.ToMilliseconds() == ts
    assert await counters(stub) == {APPLE: (10, 10, 0), PEAR: (5, 5, 0)}
    assert event_types(redis_proc, "o-1") == {"ORDER_RESERVED": 1, "ORDER_EXPIRED": 1}
    before = await snapshot(redis_proc)
    assert await get(stub) == r  # a later read changes nothing
    assert await snapshot(redis_proc) == before


async def test_release_after_the_deadline_ends_expired_and_returns_the_stock(
    unswept: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    stub = unswept
    held = await stocked_hold(stub, hold_seconds=1)
    await wait_past(redis_proc, held.expires_at.ToMilliseconds())

    resp = await release(stub, reason="too late")

    assert resp.reservation.state == EXPIRED
    assert resp.reservation.updated_at.ToMilliseconds() == assert_expired_for_real(
        redis_proc, "o-1", held.expires_at.ToMilliseconds()
    )
    assert await counters(stub) == {APPLE: (10, 10, 0), PEAR: (5, 5, 0)}
    assert event_types(redis_proc, "o-1") == {"ORDER_RESERVED": 1, "ORDER_EXPIRED": 1}

    before = await snapshot(redis_proc)
    again = await release(stub)
    assert again.reservation.state == EXPIRED
    err = await expect_error(commit(stub))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "RESERVATION_EXPIRED"
    assert await snapshot(redis_proc) == before


# -- refused transitions -------------------------------------------------------------------------


async def test_commit_of_a_released_reservation_is_refused_and_writes_nothing(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await stocked_hold(stub)
    await release(stub)
    before = await snapshot(redis_proc)

    err = await expect_error(commit(stub))

    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "RESERVATION_RELEASED"
    assert await snapshot(redis_proc) == before
    assert (await get(stub)).state == RELEASED


async def test_release_of_a_committed_reservation_is_refused_and_writes_nothing(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await stocked_hold(stub)
    await commit(stub)
    before = await snapshot(redis_proc)

    err = await expect_error(release(stub))

    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "RESERVATION_COMMITTED"
    assert await snapshot(redis_proc) == before
    assert (await get(stub)).state == COMMITTED
    assert await counters(stub) == {APPLE: (7, 7, 0), PEAR: (3, 3, 0)}


@pytest.mark.parametrize("rpc", ["Commit", "Release", "GetReservation"])
async def test_unknown_order_is_not_found(
    stub: pb_grpc.InventoryStub, redis_proc: Any, rpc: str
) -> None:
    await stocked_hold(stub)
    before = await snapshot(redis_proc)
    call = {
        "Commit": lambda: commit(stub, "no-such-order"),
        "Release": lambda: release(stub, "no-such-order"),
        "GetReservation": lambda: get(stub, "no-such-order"),
    }[rpc]

    err = await expect_error(call())

    assert err.code == grpc.StatusCode.NOT_FOUND
    assert err.reason == "RESERVATION_NOT_FOUND"
    assert err.metadata.get("order_id") == "no-such-order"
    assert await snapshot(redis_proc) == before


# -- replays ------------------------------------------------------------------------------------


async def test_commit_twice_gives_the_same_answer_and_one_event(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await stocked_hold(stub)
    first = await commit(stub, payment_ref="pay-1")
    before = await snapshot(redis_proc)

    second = await commit(stub, payment_ref="pay-1")
    other_ref = await commit(stub, payment_ref="pay-2")

    assert second.reservation == first.reservation
    assert other_ref.reservation == first.reservation  # the first payment_ref stays
    assert await snapshot(redis_proc) == before
    assert event_types(redis_proc, "o-1") == {"ORDER_RESERVED": 1, "ORDER_COMMITTED": 1}
    assert await counters(stub) == {APPLE: (7, 7, 0), PEAR: (3, 3, 0)}


async def test_release_twice_is_ok_and_changes_nothing(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await stocked_hold(stub)
    first = await release(stub, reason="first")
    before = await snapshot(redis_proc)

    second = await release(stub, reason="second")

    assert second.reservation == first.reservation
    assert second.reservation.release_reason == "first"
    assert await snapshot(redis_proc) == before
    assert event_types(redis_proc, "o-1") == {"ORDER_RESERVED": 1, "ORDER_RELEASED": 1}
    assert await counters(stub) == {APPLE: (10, 10, 0), PEAR: (5, 5, 0)}


async def test_reserve_replay_after_commit_changes_nothing(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await stocked_hold(stub)
    await commit(stub)
    before = await snapshot(redis_proc)

    again = await stub.Reserve(
        pb.ReserveRequest(order_id="o-1", lines=[line("apple", 3, "w1"), line("pear", 2, "w2")])
    )

    assert again.replayed
    assert again.reservation.state == COMMITTED
    assert await snapshot(redis_proc) == before


# -- events ------------------------------------------------------------------------------------


async def test_every_state_change_appends_exactly_one_event(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await add_stock(stub, "apple", "w1", 20, adjustment_id="adj-1")
    for oid in ("o-c", "o-r", "o-e"):
        await stub.Reserve(
            pb.ReserveRequest(
                order_id=oid,
                lines=[line("apple", 2, "w1")],
                hold_seconds=1 if oid == "o-e" else 0,
            )
        )
    await commit(stub, "o-c", "pay-c")
    await release(stub, "o-r", "changed mind")
    # Replays and refusals: no events.
    await add_stock(stub, "apple", "w1", 20, adjustment_id="adj-1")
    await commit(stub, "o-c", "pay-c")
    await release(stub, "o-r")
    await expect_error(commit(stub, "o-r"))
    await expect_error(release(stub, "o-c"))
    await wait_until_swept(redis_proc.client(), "o-e")

    evs = events(redis_proc)
    by_id = Counter((e["type"], e.get("order_id") or e.get("adjustment_id")) for e in evs)
    assert by_id == {
        ("STOCK_ADJUSTED", "adj-1"): 1,
        ("ORDER_RESERVED", "o-c"): 1,
        ("ORDER_RESERVED", "o-r"): 1,
        ("ORDER_RESERVED", "o-e"): 1,
        ("ORDER_COMMITTED", "o-c"): 1,
        ("ORDER_RELEASED", "o-r"): 1,
        ("ORDER_EXPIRED", "o-e"): 1,
    }
    for e in evs:
        assert {"type", "ts", "data"} <= set(e)
        assert ("order_id" in e) != ("adjustment_id" in e)
        assert int(e["ts"]) > 0
    committed = next(e for e in evs if e["type"] == "ORDER_COMMITTED")
    assert committed["data"]["payment_ref"] == "pay-c"
    assert committed["data"]["allocations"] == [["apple", "", "", "w1", 2]]
    released = next(e for e in evs if e["type"] == "ORDER_RELEASED")
    assert released["data"]["reason"] == "changed mind"
    assert await counters(stub) == {APPLE: (18, 18, 0)}


# -- AdjustStock ----------------------------------------------------------------------------------


def adjust(
    stub: pb_grpc.InventoryStub, adjustment_id: str, delta: int, warehouse: str = "w1", **kw: Any
) -> Any:
    return stub.AdjustStock(
        pb.AdjustStockRequest(
            adjustment_id=adjustment_id,
            unit=unit(kw.pop("sku", "apple")),
            warehouse=warehouse,
            delta=delta,
            reason=kw.pop("reason", "receipt"),
        )
    )


async def test_adjust_stock_receipt_and_shrinkage_change_available_and_on_hand(
    stub: pb_grpc.InventoryStub,
) -> None:
    first = await adjust(stub, "adj-1", 10)
    assert not first.replayed
    assert (first.level.on_hand, first.level.available, first.level.reserved) == (10, 10, 0)
    assert first.level.warehouse == "w1"
    assert first.level.unit.sku == "apple"

    await stub.Reserve(pb.ReserveRequest(order_id="o-1", lines=[line("apple", 3, "w1")]))
    shrink = await adjust(stub, "adj-2", -7, reason="damaged")

    assert (shrink.level.on_hand, shrink.level.available, shrink.level.reserved) == (3, 0, 3)
    assert await levels(stub, unit("apple")) == {APPLE: (3, 0, 3)}


async def test_adjust_stock_replay_returns_the_stored_answer_and_changes_nothing(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    first = await adjust(stub, "adj-1", 10)
    await adjust(stub, "adj-2", 5)
    before = await snapshot(redis_proc)

    again = await adjust(stub, "adj-1", 10)

    assert again.replayed
    assert again.level == first.level
    assert await snapshot(redis_proc) == before
    assert await levels(stub, unit("apple")) == {APPLE: (15, 15, 0)}
    assert event_types(redis_proc) == {"STOCK_ADJUSTED": 2}


@pytest.mark.parametrize(
    "change",
    [
        {"delta": 11},
        {"warehouse": "w2"},
        {"sku": "pear"},
        {"reason": "other reason"},
    ],
    ids=["delta", "warehouse", "unit", "reason"],
)
async def test_adjust_stock_same_id_other_contents_is_adjustment_conflict(
    stub: pb_grpc.InventoryStub, redis_proc: Any, change: dict[str, Any]
) -> None:
    await adjust(stub, "adj-1", 10)
    before = await snapshot(redis_proc)
    args: dict[str, Any] = {"delta": 10, "warehouse": "w1", **change}

    err = await expect_error(adjust(stub, "adj-1", **args))

    assert err.code == grpc.StatusCode.ALREADY_EXISTS
    assert err.reason == "ADJUSTMENT_CONFLICT"
    assert await snapshot(redis_proc) == before


async def test_adjust_stock_shrink_below_available_zero_is_insufficient_stock(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await adjust(stub, "adj-1", 10)
    await stub.Reserve(pb.ReserveRequest(order_id="o-1", lines=[line("apple", 4, "w1")]))
    before = await snapshot(redis_proc)

    # on_hand is 10, but only the 6 available may shrink.
    err = await expect_error(adjust(stub, "adj-2", -7))

    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "INSUFFICIENT_STOCK"
    assert err.metadata == {
        "sku": "apple",
        "spec": "",
        "barcode": "",
        "warehouse": "w1",
        "requested": "7",
        "available": "6",
    }
    assert await snapshot(redis_proc) == before
    # A refused adjustment is not remembered: the same id may be used again.
    ok = await adjust(stub, "adj-2", -6)
    assert not ok.replayed
    assert await levels(stub, unit("apple")) == {APPLE: (4, 0, 4)}


async def test_adjust_stock_shrink_of_a_warehouse_never_stocked_is_refused(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    before = await snapshot(redis_proc)

    err = await expect_error(adjust(stub, "adj-1", -1, warehouse="nowhere"))

    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "INSUFFICIENT_STOCK"
    assert err.metadata["available"] == "0"
    assert await snapshot(redis_proc) == before
