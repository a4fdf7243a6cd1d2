"""Actor on every event (issue 12): each stream entry says who caused it, in its field `actor`,
and WatchEvents returns it in Event.actor.

What is pinned: every event an RPC writes carries the caller (servicer.actor_of: "anonymous"
until authentication exists), a hold expired lazily by a read carries the reader, the sweeper's
expiries "sweeper", the payment poller's and the webhook's reports "poller" and "webhook", and
`stockhold reconcile --repair` "reconcile"; read through WatchEvents and directly from the
streams. An entry written before actors existed reads as "".
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from fake_wechatpay import FakeWeChatPay
from payment_helpers import Start, fake_config, pending
from stockhold_fixtures import Factory, Running, add_stock, line, wait_settled
from test_reconcile import cli
from test_watch_events import stream_entries, watching

from stockhold import constants as c
from stockhold.events import parse_entry
from stockhold.payments.config import PaymentProviders
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

WAIT_S = 20.0  # the most any wait below lasts (a loaded 2-core box)
# No sweeps during a test that expires holds by reading them (the reader must be the actor).
NO_SWEEP = {"sweep_interval_seconds": 3600.0}


def entries(running: Running) -> list[dict[str, str]]:
    """Every stream entry's fields, over every partition."""
    return [f for es in stream_entries(running).values() for _, f in es]


def actors_by_type(running: Running) -> dict[str, set[str]]:
    """event type -> the actors its entries carry (a missing field as "<none>")."""
    out: dict[str, set[str]] = {}
    for f in entries(running):
        out.setdefault(f["type"], set()).add(f.get("actor", "<none>"))
    return out


async def until(check: Any, limit_s: float = WAIT_S) -> None:
    """Wait (bounded) until `check()` is true."""
    give_up = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < give_up, f"not reached within {limit_s} s"
        await asyncio.sleep(0.05)


def has_event(running: Running, etype: str, order_id: str) -> bool:
    return any(f["type"] == etype and f.get("order_id") == order_id for f in entries(running))


def actor_of_event(running: Running, etype: str, order_id: str) -> str:
    (found,) = [
        f.get("actor", "<none>")
        for f in entries(running)
        if f["type"] == etype and f.get("order_id") == order_id
    ]
    return found


async def test_every_event_an_rpc_writes_carries_the_caller(make_stockhold: Factory) -> None:
    running = await make_stockhold(**NO_SWEEP)
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        await add_stock(stub, "A", "wh-east", 20)
        await add_stock(stub, "B", "wh-south", 20)
        await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="B", max_line_quantity=50))
        # one order over two SKUs (on a cluster it may span slots: finish.lua writes it)
        split = [line("A", 2, "wh-east"), line("B", 3, "wh-south")]
        await stub.Reserve(pb.ReserveRequest(order_id="split", lines=split, hold_seconds=10))
        extended = await stub.ExtendReservation(
            pb.ExtendReservationRequest(order_id="split", hold_seconds=600)
        )
        assert extended.extended
        await stub.Commit(pb.CommitRequest(order_id="split", payment_ref="pay-1"))
        batch = [pb.ReserveRequest(order_id=f"b-{i}", lines=[line("A", 1)]) for i in range(3)]
        await stub.ReserveBatch(pb.ReserveBatchRequest(orders=batch))
        await stub.Release(pb.ReleaseRequest(order_id="b-0", reason="cancelled"))
        await stub.MarkPaymentPending(
            pb.MarkPaymentPendingRequest(order_id="b-1", payment=pending("OTN-b-1"))
        )
        await stub.ReportPayment(
            pb.ReportPaymentRequest(
                order_id="b-2",
                provider="wechatpay",
                transaction_id="tx-b-2",
                status=pb.PAYMENT_STATUS_PAID,
            )
        )
        # a hold found due by a read is expired by that reader
        await stub.Reserve(
            pb.ReserveRequest(order_id="short", lines=[line("A", 1)], hold_seconds=1)
        )
        await asyncio.sleep(1.1)
        got = await stub.GetReservation(pb.GetReservationRequest(order_id="short"))
        assert got.state == pb.RESERVATION_STATE_EXPIRED
        await wait_settled(running.redis)

        by_type = actors_by_type(running)
        assert set(by_type) >= {
            c.EVENT_ADJUSTED,
            c.EVENT_POLICY_CHANGED,
            c.EVENT_RESERVED,
            c.EVENT_EXTENDED,
            c.EVENT_COMMITTED,
            c.EVENT_RELEASED,
            c.EVENT_PAYMENT_PENDING,
            c.EVENT_EXPIRED,
        }
        assert by_type == {t: {c.ACTOR_ANONYMOUS} for t in by_type}

        # the same through WatchEvents, event by event
        n = len(entries(running))
        async with watching(stub, cursor="earliest") as watch:
            events = await watch.take(n)
        assert {e.actor for e in events} == {c.ACTOR_ANONYMOUS}
        assert {e.type for e in events} == set(by_type)


async def test_the_sweeper_expires_as_sweeper(make_stockhold: Factory) -> None:
    running = await make_stockhold(sweep_interval_seconds=0.05)
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        await add_stock(stub, "A", "wh-east", 5)
        for i in range(3):
            request = pb.ReserveRequest(order_id=f"s-{i}", lines=[line("A", 1)], hold_seconds=1)
            await stub.Reserve(request)
        await until(lambda: all(has_event(running, c.EVENT_EXPIRED, f"s-{i}") for i in range(3)))
        for i in range(3):
            assert actor_of_event(running, c.EVENT_RESERVED, f"s-{i}") == c.ACTOR_ANONYMOUS
            assert actor_of_event(running, c.EVENT_EXPIRED, f"s-{i}") == c.ACTOR_SWEEPER
        async with watching(stub, cursor="earliest", types=[c.EVENT_EXPIRED]) as watch:
            events = await watch.take(3)
        assert [e.actor for e in events] == [c.ACTOR_SWEEPER] * 3


async def hold_paid(stub: pb_grpc.InventoryStub, order_id: str, out_trade_no: str) -> None:
    await add_stock(stub, "TSHIRT", "wh-east", 2)
    await stub.Reserve(
        pb.ReserveRequest(
            order_id=order_id,
            lines=[line("TSHIRT", 2)],
            amount=4200,
            payment=pending(out_trade_no),
        )
    )


async def test_a_polled_payment_commits_as_poller(servers: Start, fake: FakeWeChatPay) -> None:
    clients = PaymentProviders(clients={"wechatpay": fake.client()})
    running = await servers(
        clients, payment_poll_schedule="0.2x10", payment_poll_interval_seconds=0.02
    )
    fake.set_order("NO-7001", amount=4200, transaction_id="4200000000000000000000000071")
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        await hold_paid(stub, "order-7001", "NO-7001")
        await until(lambda: has_event(running, c.EVENT_COMMITTED, "order-7001"))
        assert actor_of_event(running, c.EVENT_RESERVED, "order-7001") == c.ACTOR_ANONYMOUS
        assert actor_of_event(running, c.EVENT_COMMITTED, "order-7001") == c.ACTOR_POLLER
        async with watching(stub, cursor="earliest", types=[c.EVENT_COMMITTED]) as watch:
            (event,) = await watch.take(1)
        assert event.order_id == "order-7001" and event.actor == c.ACTOR_POLLER


async def test_a_notified_payment_commits_as_webhook(
    servers: Start, fake: FakeWeChatPay, tmp_path: Path
) -> None:
    running = await servers(
        None, **fake_config(fake, tmp_path / "wx"), payment_webhook_listen="127.0.0.1:0"
    )
    url = f"http://127.0.0.1:{running.server.webhook_port}/wechatpay/notify"
    fake.set_order("NO-7002", amount=4200, transaction_id="4200000000000000000000000072")
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        await hold_paid(stub, "order-7002", "NO-7002")
        assert await fake.deliver(url, fake.notification("NO-7002")) == (204, "")
        await until(lambda: has_event(running, c.EVENT_COMMITTED, "order-7002"))
        assert actor_of_event(running, c.EVENT_COMMITTED, "order-7002") == c.ACTOR_WEBHOOK


async def test_a_repair_is_the_reconciles(make_stockhold: Factory) -> None:
    running = await make_stockhold()
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        await add_stock(stub, "A", "wh-east", 10)
        stock_key = running.server.engine.resolver.unit("A", "", "").stock_key
        # reserved corrupted behind its back (no HELD hold counts there): reconcile without a
        # snapshot checks reserved against the holds
        running.redis.client().hset(stock_key, "r:wh-east", 3)
        code, out, err = await cli(running, "reconcile", "--repair")
        assert code == 0, (out, err)
        repaired = [f for f in entries(running) if f["type"] == c.EVENT_REPAIRED]
        assert [f["actor"] for f in repaired] == [c.ACTOR_RECONCILE]
        async with watching(stub, cursor="earliest", types=[c.EVENT_REPAIRED]) as watch:
            (event,) = await watch.take(1)
        assert event.actor == c.ACTOR_RECONCILE


def test_an_entry_without_an_actor_reads_as_empty() -> None:
    """Entries written before actors existed have no field: "" (never a guess)."""
    fields = {b"type": b"ORDER_RESERVED", b"order_id": b"o-1", b"ts": b"1", b"data": b"{}"}
    assert parse_entry(0, b"1-0", fields).actor == ""
    assert parse_entry(0, b"1-0", {**fields, b"actor": b"sweeper"}).actor == "sweeper"
