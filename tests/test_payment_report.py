"""Payment sync, callback channel (issue 5 section 2): ReportPayment and what it decides.

PAID commits, FAILED/CLOSED release, idempotent by (provider, transaction id); an amount that
differs from the order's is refused and flagged; paid after expiry takes the stock again or is
flagged for a refund; MarkPaymentPending; a commit racing the sweeper at the deadline.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import grpc
import pytest
import redis.asyncio
from payment_helpers import (
    CLOSED,
    FAILED,
    dump,
    events,
    pending,
    report,
    state_of,
    wait_for,
)
from stockhold_fixtures import (
    Factory,
    add_stock,
    async_client,
    expect_error,
    levels,
    line,
    snapshot,
    spans_slots,
    unit,
    wait_settled,
)

from stockhold.server import StockholdServer
from stockhold.settings import Settings
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

HELD = pb.RESERVATION_STATE_HELD
COMMITTED = pb.RESERVATION_STATE_COMMITTED
RELEASED = pb.RESERVATION_STATE_RELEASED
EXPIRED = pb.RESERVATION_STATE_EXPIRED


async def reserve(
    stub: pb_grpc.InventoryStub,
    order_id: str,
    qty: int = 2,
    amount: int = 4200,
    sku: str = "TSHIRT",
    **fields: Any,
) -> pb.Reservation:
    reply = await stub.Reserve(
        pb.ReserveRequest(order_id=order_id, lines=[line(sku, qty)], amount=amount, **fields)
    )
    return reply.reservation


async def test_paid_commits_once_for_fifty_concurrent_duplicates(
    stub: pb_grpc.InventoryStub, stockhold: Any
) -> None:
    await add_stock(stub, "TSHIRT", "wh-east", 10)
    await reserve(stub, "order-1")
    replies = await asyncio.gather(
        *(
            stub.ReportPayment(report("order-1", "4200000001", paid_at="2026-11-26T22:28:16+08:00"))
            for _ in range(50)
        )
    )
    assert sorted(r.replayed for r in replies) == [False] + [True] * 49
    for r in replies:
        res = r.reservation
        assert res.state == COMMITTED and res.payment_ref == "4200000001"
        assert res.payment.status == pb.PAYMENT_STATUS_PAID
        assert res.payment.transaction_id == "4200000001" and res.payment.provider == "wechatpay"
        # the same instant as 14:28:16Z
        assert res.payment.paid_at.seconds == 1795703296
    assert await levels(stub, unit("TSHIRT")) == {("TSHIRT", "", "", "wh-east"): (8, 8, 0)}
    rds = async_client(stockhold.redis)
    try:
        evs = (await events(rds))["order-1"]
        assert [t for t, _ in evs] == ["ORDER_RESERVED", "ORDER_COMMITTED"]
        assert evs[1][1]["payment"]["transaction_id"] == "4200000001"
        # Later (a day later: the answer is kept with the record for the retention period).
        before = await dump(rds)
        again = await stub.ReportPayment(report("order-1", "4200000001"))
        assert again.replayed and again.reservation == replies[0].reservation
        assert await dump(rds) == before
        key = stockhold.server.engine.resolver.order("order-1").order_key
        assert await rds.pttl(key) > 29 * 86_400_000
    finally:
        await rds.aclose()


async def test_failed_and_closed_release_the_hold(
    stub: pb_grpc.InventoryStub, stockhold: Any
) -> None:
    await add_stock(stub, "TSHIRT", "wh-east", 10)
    await reserve(stub, "order-f")
    await reserve(stub, "order-c")
    # WeChat gives no transaction id for an order closed unpaid: allowed for FAILED / CLOSED.
    f = await stub.ReportPayment(report("order-f", "4200000002", status=FAILED))
    c = await stub.ReportPayment(report("order-c", "", status=CLOSED, amount=0))
    assert f.reservation.state == RELEASED and f.reservation.release_reason == "payment FAILED"
    assert c.reservation.state == RELEASED and c.reservation.release_reason == "payment CLOSED"
    assert c.reservation.payment.status == pb.PAYMENT_STATUS_CLOSED
    assert (await stub.ReportPayment(report("order-c", "", status=CLOSED, amount=0))).replayed
    assert await levels(stub, unit("TSHIRT")) == {("TSHIRT", "", "", "wh-east"): (10, 10, 0)}
    # A FAILED report for a committed order changes nothing (states only move forward).
    await reserve(stub, "order-p")
    await stub.ReportPayment(report("order-p", "4200000003"))
    late = await stub.ReportPayment(report("order-p", "4200000004", status=FAILED))
    assert late.reservation.state == COMMITTED and not late.replayed
    assert late.reservation.payment.status == pb.PAYMENT_STATUS_PAID
    rds = async_client(stockhold.redis)
    try:
        evs = await events(rds)
    finally:
        await rds.aclose()
    assert [t for t, _ in evs["order-f"]] == ["ORDER_RESERVED", "ORDER_RELEASED"]
    assert evs["order-f"][1][1]["reason"] == "payment FAILED"
    assert [t for t, _ in evs["order-p"]] == ["ORDER_RESERVED", "ORDER_COMMITTED"]


async def test_amount_mismatch_is_refused_flagged_and_never_committed(
    stub: pb_grpc.InventoryStub, stockhold: Any
) -> None:
    await add_stock(stub, "TSHIRT", "wh-east", 10)
    await reserve(stub, "order-m", amount=4200)
    rds = async_client(stockhold.redis)
    try:
        before = await dump(rds)
        err = await expect_error(stub.ReportPayment(report("order-m", "4200000009", amount=42)))
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION
        assert err.reason == "PAYMENT_AMOUNT_MISMATCH"
        assert err.metadata == {"expected": "4200", "got": "42"}
        after = await dump(rds)
        # What changed is the documented flag: the record's pflag and the stored answer of the
        # transaction, and one PAYMENT_FLAGGED event. Stock and state did not move.
        changed = {k for k in after if after[k] != before.get(k)}
        k = stockhold.server.engine.resolver.order("order-m")
        assert changed == {k.order_key.encode(), k.events_key.encode()}
        rec_before, rec_after = before[k.order_key.encode()][1], after[k.order_key.encode()][1]
        assert set(rec_after) - set(rec_before) == {b"pflag", b"t:wechatpay:4200000009"}
        assert {f: v for f, v in rec_after.items() if f in rec_before} == rec_before
        assert rec_after[b"pflag"] == b"AMOUNT_MISMATCH"
        res = await state_of(stub, "order-m")
        assert res.state == HELD and res.payment.flag == "AMOUNT_MISMATCH"
        # The same transaction again: the same refusal, nothing more written.
        again = await expect_error(stub.ReportPayment(report("order-m", "4200000009", amount=42)))
        assert again.reason == "PAYMENT_AMOUNT_MISMATCH" and again.metadata == err.metadata
        assert await dump(rds) == after
        evs = (await events(rds))["order-m"]
        assert [t for t, _ in evs] == ["ORDER_RESERVED", "PAYMENT_FLAGGED"]
        assert evs[1][1]["flag"] == "AMOUNT_MISMATCH" and evs[1][1]["expected"] == 4200
        assert await levels(stub, unit("TSHIRT")) == {("TSHIRT", "", "", "wh-east"): (10, 8, 2)}
    finally:
        await rds.aclose()
    # The right amount (another transaction) still commits; the flag stays for a person.
    ok = await stub.ReportPayment(report("order-m", "4200000010", amount=4200))
    assert ok.reservation.state == COMMITTED and ok.reservation.payment.flag == "AMOUNT_MISMATCH"


async def test_paid_after_expiry_takes_the_stock_again_once(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold(sweep_interval_seconds=0.05)
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        await add_stock(stub, "TSHIRT", "wh-east", 10)
        await reserve(stub, "order-x", qty=3, hold_seconds=1)
        assert await wait_for(lambda: _state_is(stub, "order-x", EXPIRED, swept=True))
        assert await levels(stub, unit("TSHIRT")) == {("TSHIRT", "", "", "wh-east"): (10, 10, 0)}
        replies = await asyncio.gather(
            *(stub.ReportPayment(report("order-x", "4200000020")) for _ in range(20))
        )
        assert sorted(r.replayed for r in replies) == [False] + [True] * 19
        res = replies[0].reservation
        # The hold did end: the state stays EXPIRED; the late payment is a new deduction
        # (on a cluster not for a cross-slot order: flagged REFUND instead, docs/cluster.md).
        retaken = not spans_slots(running, "order-x", "TSHIRT")
        left = 7 if retaken else 10
        assert res.state == EXPIRED and res.payment.status == pb.PAYMENT_STATUS_PAID
        assert res.payment.HasField("recommitted_at") == retaken
        assert res.payment.flag == ("" if retaken else "REFUND")
        assert await levels(stub, unit("TSHIRT")) == {
            ("TSHIRT", "", "", "wh-east"): (left, left, 0)
        }
        # A second payment for it is not counted again: flagged for a refund.
        dup = await stub.ReportPayment(report("order-x", "4200000021"))
        assert dup.reservation.payment.flag == "REFUND"
        assert await levels(stub, unit("TSHIRT")) == {
            ("TSHIRT", "", "", "wh-east"): (left, left, 0)
        }
        rds = async_client(running.redis)
        try:
            evs = (await events(rds))["order-x"]
        finally:
            await rds.aclose()
        assert [t for t, _ in evs] == [
            "ORDER_RESERVED",
            "ORDER_EXPIRED",
            "PAYMENT_AFTER_EXPIRY",
            "PAYMENT_FLAGGED",
        ]
        assert evs[2][1]["recommitted"] is retaken
        assert evs[2][1]["allocations"] == [["TSHIRT", "", "", "wh-east", 3]]
        assert evs[3][1]["reason"] == "DUPLICATE_PAYMENT"


async def test_paid_after_expiry_without_stock_is_flagged_for_refund(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold(sweep_interval_seconds=0.05)
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        await add_stock(stub, "TSHIRT", "wh-east", 5)
        await reserve(stub, "order-y", qty=4, hold_seconds=1)
        assert await wait_for(lambda: _state_is(stub, "order-y", EXPIRED, swept=True))
        await reserve(stub, "order-z", qty=3)  # someone else took the stock meanwhile
        r = await stub.ReportPayment(report("order-y", "4200000030"))
        assert r.reservation.state == EXPIRED and r.reservation.payment.flag == "REFUND"
        assert not r.reservation.payment.HasField("recommitted_at")
        assert await levels(stub, unit("TSHIRT")) == {("TSHIRT", "", "", "wh-east"): (5, 2, 3)}
        rds = async_client(running.redis)
        try:
            evs = (await events(rds))["order-y"]
        finally:
            await rds.aclose()
        assert [t for t, _ in evs][-1] == "PAYMENT_AFTER_EXPIRY"
        assert evs[-1][1]["recommitted"] is False and evs[-1][1]["flag"] == "REFUND"


async def test_paid_after_release_is_flagged_for_refund(stub: pb_grpc.InventoryStub) -> None:
    await add_stock(stub, "TSHIRT", "wh-east", 10)
    await reserve(stub, "order-r")
    await stub.Release(pb.ReleaseRequest(order_id="order-r", reason="customer cancelled"))
    r = await stub.ReportPayment(report("order-r", "4200000040"))
    assert r.reservation.state == RELEASED and r.reservation.payment.flag == "REFUND"
    assert await levels(stub, unit("TSHIRT")) == {("TSHIRT", "", "", "wh-east"): (10, 10, 0)}


async def test_bad_reports_are_refused_and_change_nothing(
    stub: pb_grpc.InventoryStub, stockhold: Any
) -> None:
    await add_stock(stub, "TSHIRT", "wh-east", 10)
    await reserve(stub, "order-b")
    cases = [
        (report("order-b", "4200000050", paid_at="2026-11-26T14:28:16"), "paid_at"),
        (report("order-b", "4200000050", paid_at="2026-11-26 14:28:16.5"), "paid_at"),
        (report("order-b", "4200000050", paid_at="yesterday"), "paid_at"),
        (report("order-b", "4200000050", status=pb.PAYMENT_STATUS_PENDING), "status"),
        (report("order-b", "4200000050", status=pb.PAYMENT_STATUS_UNSPECIFIED), "status"),
        (report("order-b", ""), "transaction_id"),
        (report("order-b", "x" * 129), "transaction_id"),
        (report("order-b", "4200000050", amount=-1), "amount"),
        (report("order-b", "4200000050", provider="WeChat Pay"), "provider"),
        (report("order-b", "4200000050", provider=""), "provider"),
        (report("", "4200000050"), "order_id"),
    ]
    rds = async_client(stockhold.redis)
    try:
        before = await dump(rds)
        for request, field in cases:
            err = await expect_error(stub.ReportPayment(request))
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT, request
            assert field in err.violations, (request, err.violations)
        err = await expect_error(stub.ReportPayment(report("order-unknown", "4200000050")))
        assert err.code == grpc.StatusCode.NOT_FOUND and err.reason == "RESERVATION_NOT_FOUND"
        assert await dump(rds) == before
    finally:
        await rds.aclose()
    # One BadRequest for every bad field, the naive paid_at among them.
    err = await expect_error(
        stub.ReportPayment(report("order-b", "", amount=-5, paid_at="2026-11-26T14:28:16"))
    )
    assert set(err.violations) == {"transaction_id", "amount", "paid_at"}


async def test_reserve_amount_and_payment_are_part_of_the_replay(
    stub: pb_grpc.InventoryStub, stockhold: Any
) -> None:
    await add_stock(stub, "TSHIRT", "wh-east", 10)
    first = await reserve(stub, "order-a", amount=4200, payment=pending("NO-1001"))
    assert first.amount == 4200 and first.payment.out_trade_no == "NO-1001"
    assert first.payment.status == pb.PAYMENT_STATUS_PENDING
    again = await stub.Reserve(
        pb.ReserveRequest(
            order_id="order-a", lines=[line("TSHIRT", 2)], amount=4200, payment=pending("NO-1001")
        )
    )
    assert again.replayed
    for other in (
        {"amount": 4300, "payment": pending("NO-1001")},
        {"amount": 4200},
        {"amount": 4200, "payment": pending("NO-1002")},
        {},
    ):
        err = await expect_error(
            stub.Reserve(pb.ReserveRequest(order_id="order-a", lines=[line("TSHIRT", 2)], **other))
        )
        assert err.reason == "ORDER_CONFLICT", other
    # A Reserve without amount or payment keeps the resolver's own fingerprint (old records
    # still replay).
    await reserve(stub, "order-plain", amount=0)
    engine = stockhold.server.engine
    order = engine.resolver.resolve_order("order-plain", [("TSHIRT", "", "", "", 2)], 0, 10**7)
    rds = async_client(stockhold.redis)
    try:
        assert await rds.hget(order.keys.order_key, "fp") == order.fingerprint.encode()
        # The out_trade_no now names order-a: another order cannot use it.
        err = await expect_error(
            stub.Reserve(
                pb.ReserveRequest(
                    order_id="order-b", lines=[line("TSHIRT", 1)], payment=pending("NO-1001")
                )
            )
        )
        assert err.code == grpc.StatusCode.ALREADY_EXISTS and err.reason == "PAYMENT_CONFLICT"
        assert err.metadata == {"out_trade_no": "NO-1001", "order_id": "order-a"}
    finally:
        await rds.aclose()
    # Malformed amount and payment come with the lines' violations in one BadRequest.
    err = await expect_error(
        stub.Reserve(
            pb.ReserveRequest(
                order_id="order-c",
                lines=[line("TSHIRT", 0)],
                amount=-1,
                payment=pending("", provider="Bad!"),
            )
        )
    )
    assert set(err.violations) == {
        "lines[0].quantity",
        "amount",
        "payment.provider",
        "payment.out_trade_no",
    }


async def test_mark_payment_pending(stub: pb_grpc.InventoryStub, stockhold: Any) -> None:
    await add_stock(stub, "TSHIRT", "wh-east", 10)
    await reserve(stub, "order-p")
    mark = pb.MarkPaymentPendingRequest(order_id="order-p", payment=pending("NO-2001"))
    r = (await stub.MarkPaymentPending(mark)).reservation
    assert r.payment.status == pb.PAYMENT_STATUS_PENDING and r.payment.polls == 0
    assert r.payment.HasField("next_poll_at")
    # The first poll is one step (30 s) after the mark, on Redis's clock.
    assert 29 <= r.payment.next_poll_at.seconds - r.created_at.seconds <= 31
    assert (await stub.MarkPaymentPending(mark)).reservation == r
    rds = async_client(stockhold.redis)
    try:
        assert [t for t, _ in (await events(rds))["order-p"]] == [
            "ORDER_RESERVED",
            "PAYMENT_PENDING",
        ]
        engine = stockhold.server.engine
        assert await engine.order_for_payment("wechatpay", "NO-2001") == "order-p"
        assert await engine.order_for_payment("wechatpay", "NO-none") == "NO-none"
    finally:
        await rds.aclose()
    await reserve(stub, "order-q")
    err = await expect_error(
        stub.MarkPaymentPending(
            pb.MarkPaymentPendingRequest(order_id="order-q", payment=pending("NO-2001"))
        )
    )
    assert err.reason == "PAYMENT_CONFLICT"
    await stub.Commit(pb.CommitRequest(order_id="order-q"))
    await wait_settled(stockhold.redis)
    before = await snapshot(stockhold.redis)
    # refused: nothing written, the out_trade_no map included (on a cluster it is often in
    # another slot, claimed before the order is read, and given back on the refusal)
    for no in ("NO-2002", "NO-2004", "NO-2005", "NO-2006"):
        err = await expect_error(
            stub.MarkPaymentPending(
                pb.MarkPaymentPendingRequest(order_id="order-q", payment=pending(no))
            )
        )
        assert err.reason == "RESERVATION_COMMITTED"
    err = await expect_error(
        stub.MarkPaymentPending(
            pb.MarkPaymentPendingRequest(order_id="nope", payment=pending("NO-2003"))
        )
    )
    assert err.reason == "RESERVATION_NOT_FOUND"
    assert await snapshot(stockhold.redis) == before
    err = await expect_error(
        stub.MarkPaymentPending(pb.MarkPaymentPendingRequest(order_id="order-p"))
    )
    assert set(err.violations) == {"payment.provider", "payment.out_trade_no"}


async def _state_is(
    stub: pb_grpc.InventoryStub, order_id: str, state: int, swept: bool = False
) -> bool:
    r = await state_of(stub, order_id)
    if r.state != state:
        return False
    # swept: expired for real (a read of a due hold expires it first, so EXPIRED always comes
    # with updated_at = its ORDER_EXPIRED event's ts and the stock back)
    return not swept or r.HasField("updated_at")


async def test_payment_racing_the_sweeper_at_the_deadline(make_stockhold: Factory) -> None:
    """1,000 holds fall due while their payments arrive (half ReportPayment, half Commit),
    some just before and some just after the deadline: each order ends in exactly one final
    state with exactly one final event, and the counters balance. (The 5 s hold leaves room
    for reserving 1,000 orders on a loaded machine before the first deadline comes near.)"""
    n = 1000
    running = await make_stockhold(sweep_interval_seconds=0.02)
    skus = [f"RACE-{i}" for i in range(4)]
    stock = 1000
    rds = async_client(running.redis)
    try:
        async with running.channel() as ch:
            stub = pb_grpc.InventoryStub(ch)
            for sku in skus:
                await add_stock(stub, sku, "wh", stock)
            await _race(stub, rds, running, n, skus, stock)
    finally:
        await rds.aclose()


async def _race(
    stub: pb_grpc.InventoryStub,
    rds: redis.asyncio.Redis | redis.asyncio.RedisCluster,
    running: Any,
    n: int,
    skus: list[str],
    stock: int,
) -> None:
    sem = asyncio.Semaphore(200)

    async def hold(i: int) -> pb.Reservation:
        async with sem:
            return await reserve(
                stub, f"race-{i}", qty=1, amount=100, sku=skus[i % 4], hold_seconds=5
            )

    loop = asyncio.get_running_loop()
    began = loop.time()
    held = await asyncio.gather(*(hold(i) for i in range(n)))
    reserving_s = loop.time() - began
    seconds, micros = await rds.time()
    offset_ms = seconds * 1000 + micros // 1000 - loop.time() * 1000
    rng = random.Random(5)
    outcome: dict[str, str] = {}
    # Sent from 1 s before to 0.2 s after each deadline, at most 100 at once, so that a slow
    # (loaded) machine delays the calls a little rather than piling them all past the deadline.
    in_flight = asyncio.Semaphore(100)

    async def pay(i: int, r: pb.Reservation) -> None:
        deadline_ms = r.expires_at.seconds * 1000 + r.expires_at.nanos // 1_000_000
        at = (deadline_ms + rng.uniform(-1000, 200) - offset_ms) / 1000
        await asyncio.sleep(max(0.0, at - loop.time()))
        async with in_flight:
            await _pay(i, r.order_id)

    async def _pay(i: int, oid: str) -> None:
        try:
            if i % 2:
                await stub.ReportPayment(report(oid, f"tx-{i}", amount=100))
            else:
                await stub.Commit(pb.CommitRequest(order_id=oid, payment_ref=f"ref-{i}"))
            outcome[oid] = "ok"
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
            outcome[oid] = "refused"

    await asyncio.gather(*(pay(i, r) for i, r in enumerate(held)))
    resolver = running.server.engine.resolver

    async def swept() -> bool:
        for p in range(running.settings.partitions):
            if await rds.zcard(resolver.expiry_key(p)):
                return False
        return True

    assert await wait_for(swept, within=5)
    await wait_settled(running.redis)
    evs = await events(rds)
    finals: Counter[str] = Counter()
    deducted = 0
    for i in range(n):
        oid = f"race-{i}"
        types = [t for t, _ in evs[oid]]
        final = [t for t in types if t in _FINAL_EVENTS]
        assert len(final) == 1, (oid, types)
        state = (await state_of(stub, oid)).state
        assert state == {"ORDER_COMMITTED": COMMITTED, "ORDER_EXPIRED": EXPIRED}[final[0]]
        finals[final[0]] += 1
        late = [d for t, d in evs[oid] if t == "PAYMENT_AFTER_EXPIRY"]
        if i % 2:  # ReportPayment: paid either way; after expiry the stock is taken again
            # (on a cluster not for a cross-slot order: flagged REFUND, docs/cluster.md)
            assert outcome[oid] == "ok"
            assert len(late) == (final[0] == "ORDER_EXPIRED")
            retaken = not spans_slots(running, oid, skus[i % 4])
            assert all(d["recommitted"] == retaken for d in late)
            deducted += final[0] == "ORDER_COMMITTED" or retaken
        else:  # Commit: refused at or after the deadline
            assert (outcome[oid] == "ok") == (final[0] == "ORDER_COMMITTED"), oid
            assert not late
            deducted += final[0] == "ORDER_COMMITTED"
    # The race really happened: both outcomes occurred.
    assert finals["ORDER_COMMITTED"] > n // 100 and finals["ORDER_EXPIRED"] > n // 100, (
        finals,
        reserving_s,
    )
    got = await levels(stub, *(unit(s) for s in skus))
    assert all(reserved == 0 for _, _, reserved in got.values())
    assert sum(on_hand for on_hand, _, _ in got.values()) == len(skus) * stock - deducted
    assert all(on_hand == avail for on_hand, avail, _ in got.values())
    print(f"\nrace: {dict(finals)}, deducted {deducted} of {n}, reserved in {reserving_s:.2f} s")


_FINAL_EVENTS = ("ORDER_COMMITTED", "ORDER_EXPIRED", "ORDER_RELEASED")


async def test_orders_with_and_without_payment_share_one_batch(
    stub: pb_grpc.InventoryStub, stockhold: Any
) -> None:
    """Concurrent Reserves are coalesced into few reserve.lua calls; an order with a payment
    brings two more keys to its group, and its neighbours must not notice."""
    await add_stock(stub, "TSHIRT", "wh-east", 100)
    replies = await asyncio.gather(
        *(
            reserve(
                stub,
                f"mix-{i}",
                qty=1,
                amount=100 * i,
                **({"payment": pending(f"NO-mix-{i}")} if i % 3 == 0 else {}),
            )
            for i in range(40)
        )
    )
    for i, r in enumerate(replies):
        assert r.state == HELD and r.amount == 100 * i
        assert r.HasField("payment") == (i % 3 == 0), i
        if i % 3 == 0:
            assert r.payment.out_trade_no == f"NO-mix-{i}"
    assert await levels(stub, unit("TSHIRT")) == {("TSHIRT", "", "", "wh-east"): (100, 60, 40)}
    engine = stockhold.server.engine
    for i in range(0, 40, 3):
        assert await engine.order_for_payment("wechatpay", f"NO-mix-{i}") == f"mix-{i}"


def test_a_webhook_without_notification_keys_is_refused_at_start(redis_proc: Any) -> None:
    settings = Settings(redis_url=redis_proc.url, payment_webhook_listen="127.0.0.1:0")
    with pytest.raises(ValueError, match="payment_webhook_listen needs WeChat Pay"):
        StockholdServer(settings, redis_proc.url)
