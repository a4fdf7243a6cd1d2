"""Payment sync against a local fake WeChat Pay (issue 5 sections 3 and 4): the active channel
(poller) and the callback channel (webhook), wired into real stockhold servers.

The fake listens on 127.0.0.1 only; schedules are compressed to fractions of a second.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from fake_wechatpay import FakeWeChatPay, Notification
from payment_helpers import (
    Start,
    dump,
    events,
    fake_config,
    pending,
    report,
    state_of,
    wait_for,
)
from redis_proc import free_port
from stockhold_fixtures import add_stock, async_client, levels, line, unit

from stockhold.payments.config import PaymentProviders
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

HELD = pb.RESERVATION_STATE_HELD
COMMITTED = pb.RESERVATION_STATE_COMMITTED
EXPIRED = pb.RESERVATION_STATE_EXPIRED
FAST = {"payment_poll_interval_seconds": 0.02, "sweep_interval_seconds": 0.05}


def polled(fake: FakeWeChatPay) -> PaymentProviders:
    """Payment providers for a server: a WeChat Pay client aimed at the fake."""
    return PaymentProviders(clients={"wechatpay": fake.client()})


async def hold(
    stub: pb_grpc.InventoryStub,
    order_id: str,
    out_trade_no: str,
    amount: int = 4200,
    hold_seconds: int = 0,
) -> pb.Reservation:
    await add_stock(stub, "TSHIRT", "wh-east", 2)
    reply = await stub.Reserve(
        pb.ReserveRequest(
            order_id=order_id,
            lines=[line("TSHIRT", 2)],
            amount=amount,
            hold_seconds=hold_seconds,
            payment=pending(out_trade_no),
        )
    )
    return reply.reservation


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 3) for a, b in itertools.pairwise(times)]


def rel(times: list[float], start: float) -> list[float]:
    return [round(t - start, 3) for t in times]


# How late a poll may be: a poller tick (0.02 s) plus a claim and an HTTP round trip, with room
# for a loaded test machine.
LATE = 0.2


def on_schedule(times: list[float], start: float, due: tuple[float, ...]) -> bool:
    """Exactly one query per due time (seconds after `start`), none early, none late."""
    return len(times) == len(due) and all(
        -0.02 <= t - start - d < LATE for t, d in zip(times, due, strict=True)
    )


async def test_callbacks_dropped_polling_commits_the_order(
    servers: Start, fake: FakeWeChatPay
) -> None:
    running = await servers(polled(fake), payment_poll_schedule="0.2x3,0.4x5", **FAST)
    fake.set_order("NO-1001", trade_state="NOTPAY", amount=4200)
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        await hold(stub, "order-1001", "NO-1001")
        assert await wait_for(lambda: _queries(fake, "NO-1001", 2), within=3)
        # The customer pays; the notification never arrives.
        fake.set_order("NO-1001", amount=4200, transaction_id="4200000000000000000000000001")
        assert await wait_for(lambda: _state(stub, "order-1001", COMMITTED), within=3)
        r = await state_of(stub, "order-1001")
        assert r.payment_ref == "4200000000000000000000000001"
        assert r.payment.status == pb.PAYMENT_STATUS_PAID and r.payment.polls == 3
        assert not r.payment.HasField("next_poll_at")
        n = len(fake.queries["NO-1001"])
        await asyncio.sleep(0.6)  # more than a step: no poll after the commit
        assert len(fake.queries["NO-1001"]) == n == 3
        assert await levels(stub, unit("TSHIRT")) == {("TSHIRT", "", "", "wh-east"): (0, 0, 0)}
    rds = async_client(running.redis)
    try:
        assert [t for t, _ in (await events(rds))["order-1001"]] == [
            "ORDER_RESERVED",
            "ORDER_COMMITTED",
        ]
    finally:
        await rds.aclose()


async def test_polls_follow_the_schedule_then_stop_and_flag(
    servers: Start, fake: FakeWeChatPay
) -> None:
    running = await servers(polled(fake), payment_poll_schedule="0.2x3,0.4x2", **FAST)
    fake.set_order("NO-2001", trade_state="NOTPAY", amount=4200)
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        await add_stock(stub, "TSHIRT", "wh-east", 2)
        started = time.monotonic()
        await stub.Reserve(
            pb.ReserveRequest(
                order_id="order-2001", lines=[line("TSHIRT", 1)], payment=pending("NO-2001")
            )
        )
        assert await wait_for(lambda: _flag(stub, "order-2001", "POLLS_EXHAUSTED"), within=4)
        flagged_at = time.monotonic() - started
        await asyncio.sleep(0.8)  # two more of the longest step: nothing more is polled
        times = fake.queries["NO-2001"]
        assert len(times) == 5, times
        # Each poll at its step after the mark (0.2, 0.4, 0.6, 1.0, 1.4 s), never early and
        # at most a poller tick plus a round trip late.
        assert on_schedule(times, started, (0.2, 0.4, 0.6, 1.0, 1.4)), rel(times, started)
        # flagged one (last) step after the last poll: 0.2 * 3 + 0.4 * 2 + 0.4 = 1.8 s
        assert 1.7 < flagged_at < 2.1, flagged_at
        r = await state_of(stub, "order-2001")
        assert r.state == HELD and r.payment.polls == 5
        # What is left: one last query just before the hold's deadline.
        assert r.payment.next_poll_at.seconds == r.expires_at.seconds - 10
    rds = async_client(running.redis)
    try:
        evs = (await events(rds))["order-2001"]
    finally:
        await rds.aclose()
    assert [t for t, _ in evs] == ["ORDER_RESERVED", "PAYMENT_FLAGGED"]
    assert evs[1][1]["flag"] == "POLLS_EXHAUSTED" and evs[1][1]["polls"] == 5


async def test_a_last_poll_before_the_hold_expires_commits_it(
    servers: Start, fake: FakeWeChatPay
) -> None:
    running = await servers(
        polled(fake),
        payment_poll_schedule="0.3x2",
        payment_final_poll_margin_seconds=1.0,
        **FAST,
    )
    fake.set_order("NO-3001", trade_state="NOTPAY", amount=4200)
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        started = time.monotonic()
        r = await hold(stub, "order-3001", "NO-3001", hold_seconds=3)
        assert await wait_for(lambda: _flag(stub, "order-3001", "POLLS_EXHAUSTED"), within=3)
        fake.set_order("NO-3001", amount=4200, transaction_id="4200000000000000000000000002")
        assert await wait_for(lambda: _state(stub, "order-3001", COMMITTED), within=3)
        times = fake.queries["NO-3001"]
        # 0.3 and 0.6 s, then the final one not before the deadline (3 s) - margin (1 s),
        # and before the deadline itself (however busy the machine: the order is committed
        # before it expires, checked below)
        assert len(times) == 3, times
        assert 1.95 <= times[2] - started < 3.0, times[2] - started
        done = await state_of(stub, "order-3001")
        assert done.updated_at.ToMilliseconds() < r.expires_at.ToMilliseconds()


async def test_provider_errors_count_as_polls_and_the_next_step_retries(
    servers: Start, fake: FakeWeChatPay
) -> None:
    running = await servers(polled(fake), payment_poll_schedule="0.2x6", **FAST)
    fake.set_order("NO-4001", amount=4200, transaction_id="4200000000000000000000000003")
    fake.fail(500, times=2)
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        started = time.monotonic()
        await hold(stub, "order-4001", "NO-4001")
        assert await wait_for(lambda: _state(stub, "order-4001", COMMITTED), within=3)
        times = fake.queries["NO-4001"]
        assert on_schedule(times, started, (0.2, 0.4, 0.6)), rel(times, started)
        assert (await state_of(stub, "order-4001")).payment.polls == 3
        assert running.server.poller is not None and running.server.poller.failed == 2


async def test_many_processes_poll_each_order_once_per_step(
    servers: Start, fake: FakeWeChatPay
) -> None:
    settings = {"payment_poll_schedule": "0.25x3", **FAST}
    first = await servers(polled(fake), **settings)
    for _ in range(2):
        await servers(polled(fake), **settings)
    orders = [f"order-5{i:03d}" for i in range(30)]
    for oid in orders:
        fake.set_order(f"NO-{oid}", trade_state="NOTPAY", amount=4200)
    async with first.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        await asyncio.gather(*(hold(stub, oid, f"NO-{oid}") for oid in orders))

        async def all_flagged() -> bool:
            for oid in orders:
                if not await _flag(stub, oid, "POLLS_EXHAUSTED"):
                    return False
            return True

        assert await wait_for(all_flagged, within=4)
        await asyncio.sleep(0.3)
        for oid in orders:
            times = fake.queries[f"NO-{oid}"]
            # three steps, three queries: never two for one step, whichever process claimed it
            assert len(times) == 3, (oid, times)
            assert (await state_of(stub, oid)).payment.polls == 3
    rds = async_client(first.redis)
    try:
        evs = await events(rds)
    finally:
        await rds.aclose()
    for oid in orders:
        assert [t for t, _ in evs[oid]] == ["ORDER_RESERVED", "PAYMENT_FLAGGED"], oid


_TRY_AGAIN = {
    (500, '{"code":"FAIL","message":"TEMPORARILY_UNAVAILABLE"}'),
    (500, '{"code":"FAIL","message":"RETRY_LATER"}'),
}


async def _deliver_until_taken(fake: FakeWeChatPay, url: str, out_trade_no: str) -> tuple[int, str]:
    """Deliver a notification, and again with a fresh nonce (as WeChat redelivers) while the
    webhook answers one of its "try again" 500s: on a loaded box 100 simultaneous callers can
    outlast the 0.25 s Redis connect timeout, and the answer then is TEMPORARILY_UNAVAILABLE
    (the nonce guard) or RETRY_LATER (the commit: BACKEND_UNAVAILABLE), by design.
    Bounded: 8 deliveries; the last answer."""
    for _ in range(8):
        status, text = await fake.deliver(url, fake.notification(out_trade_no))
        if (status, text) not in _TRY_AGAIN:
            break
        await asyncio.sleep(0.2)
    return status, text


async def test_webhook_duplicates_commit_once(
    servers: Start, fake: FakeWeChatPay, tmp_path: Path
) -> None:
    """Configured from files, as an operator would: 50 deliveries of one payment at once
    (fresh nonces, as WeChat's redeliveries have) plus 50 ReportPayment calls: one commit."""
    running = await servers(
        None, **fake_config(fake, tmp_path / "wx"), payment_webhook_listen="127.0.0.1:0"
    )
    url = f"http://127.0.0.1:{running.server.webhook_port}/wechatpay/notify"
    tx = "4200000000000000000000000004"
    fake.set_order("NO-6001", amount=4200, transaction_id=tx)
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        await hold(stub, "order-6001", "NO-6001")
        answers, replies = await asyncio.gather(
            asyncio.gather(*(_deliver_until_taken(fake, url, "NO-6001") for _ in range(50))),
            asyncio.gather(*(stub.ReportPayment(report("order-6001", tx)) for _ in range(50))),
        )
        assert answers == [(204, "")] * 50
        assert all(r.reservation.state == COMMITTED for r in replies)
        assert sum(not r.replayed for r in replies) <= 1
        # The same delivery (same nonce) 50 times at once: one accepted, 49 replays.
        same = fake.notification("NO-6001")
        answers = await asyncio.gather(*(fake.deliver(url, same) for _ in range(50)))
        assert sorted(s for s, _ in answers) == [204] + [401] * 49
        assert {t for s, t in answers if s == 401} == {'{"code":"FAIL","message":"REPLAYED_NONCE"}'}
        r = await state_of(stub, "order-6001")
        assert r.state == COMMITTED and r.payment_ref == tx
        assert await levels(stub, unit("TSHIRT")) == {("TSHIRT", "", "", "wh-east"): (0, 0, 0)}
    rds = async_client(running.redis)
    try:
        assert [t for t, _ in (await events(rds))["order-6001"]] == [
            "ORDER_RESERVED",
            "ORDER_COMMITTED",
        ]
    finally:
        await rds.aclose()


async def test_refused_notifications_change_nothing(
    servers: Start, fake: FakeWeChatPay, tmp_path: Path
) -> None:
    running = await servers(
        None, **fake_config(fake, tmp_path / "wx"), payment_webhook_listen="127.0.0.1:0"
    )
    url = f"http://127.0.0.1:{running.server.webhook_port}/wechatpay/notify"
    fake.set_order("NO-7001", amount=4200, transaction_id="4200000000000000000000000005")
    fake.set_order("NO-7002", amount=100, transaction_id="4200000000000000000000000006")
    rds = async_client(running.redis)
    try:
        async with running.channel() as ch:
            stub = pb_grpc.InventoryStub(ch)
            await hold(stub, "order-7001", "NO-7001")
            await hold(stub, "order-7002", "NO-7002", amount=100)
            # A genuine delivery for another order: its nonce is then seen.
            seen = fake.notification("NO-7002")
            assert await fake.deliver(url, seen) == (204, "")
            before = await dump(rds)
            # Each one is built right before its delivery: the signed timestamp is whole
            # seconds, so +301 s is rounded up and -301 s down to stay 301 s off when checked.
            now = time.time()
            refused: dict[str, list[Callable[[], Notification]]] = {
                "BAD_SIGNATURE": [
                    lambda: fake.notification("NO-7001", tamper_body=True),
                    lambda: fake.notification("NO-7001", forge=True),
                ],
                "UNKNOWN_SERIAL": [
                    lambda: fake.notification("NO-7001", serial="5157F09EFDC096DE15EBE81A")
                ],
                "STALE_TIMESTAMP": [
                    lambda: fake.notification("NO-7001", timestamp=math.ceil(now) + 301),
                    lambda: fake.notification("NO-7001", timestamp=math.floor(now) - 301),
                ],
                "DECRYPT_FAILED": [lambda: fake.notification("NO-7001", flip_tag=True)],
                "REPLAYED_NONCE": [lambda: fake.notification("NO-7001", nonce=seen.nonce)],
                "BAD_PAYLOAD": [
                    lambda: fake.notification(
                        "NO-7001", transaction={"success_time": "2026-11-26T22:28:16"}
                    )
                ],
            }
            for reason, builds in refused.items():
                for build in builds:
                    now = time.time()
                    status, text = await fake.deliver(url, build())
                    assert (status, orjson.loads(text or "{}")) == (
                        401,
                        {"code": "FAIL", "message": reason},
                    ), reason
            assert await dump(rds) == before
            assert (await state_of(stub, "order-7001")).state == HELD
            # Genuine, but the amount differs: acknowledged (redelivery cannot change the
            # answer), refused, flagged; what changes is the flag, the transaction's stored
            # answer, one PAYMENT_FLAGGED event and the notification's nonce.
            wrong = fake.notification("NO-7001", transaction={"amount": {"total": 1}})
            assert await fake.deliver(url, wrong) == (204, "")
            after = await dump(rds)
            k = running.server.engine.resolver.order("order-7001")
            nonce_key = f"sh:{{meta}}:wxnonce:{wrong.nonce}".encode()
            changed = {key for key in after if after[key] != before.get(key)}
            assert changed == {k.order_key.encode(), k.events_key.encode(), nonce_key}
            r = await state_of(stub, "order-7001")
            assert r.state == HELD and r.payment.flag == "AMOUNT_MISMATCH"
            assert await levels(stub, unit("TSHIRT")) == {("TSHIRT", "", "", "wh-east"): (2, 0, 2)}
    finally:
        await rds.aclose()


async def test_every_worker_binds_the_webhook_port(
    servers: Start, fake: FakeWeChatPay, tmp_path: Path
) -> None:
    """serve --workers N: each worker binds the same webhook port (SO_REUSEPORT)."""
    port = free_port()
    config = {**fake_config(fake, tmp_path / "wx"), "payment_webhook_listen": f"127.0.0.1:{port}"}
    a = await servers(None, **config)
    b = await servers(None, **config)
    assert a.server.webhook_port == b.server.webhook_port == port
    for i in range(10):
        fake.set_order(
            f"NO-80{i:02d}", amount=100, transaction_id=f"42000000000000000000000080{i:02d}"
        )
    async with a.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        for i in range(10):
            await hold(stub, f"order-80{i:02d}", f"NO-80{i:02d}", amount=100)
        url = f"http://127.0.0.1:{port}/wechatpay/notify"
        notes = [fake.notification(f"NO-80{i:02d}") for i in range(10)]
        assert await asyncio.gather(*(fake.deliver(url, n) for n in notes)) == [(204, "")] * 10
        for i in range(10):
            assert (await state_of(stub, f"order-80{i:02d}")).state == COMMITTED


async def test_shifting_the_host_clock_changes_no_poll_and_no_deadline(
    servers: Start, fake: FakeWeChatPay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Polls and deadlines run on Redis's clock: the app host's clock 3 days ahead changes
    nothing (the fake and the WeChat Pay client keep signing with the true time)."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3 * 86_400)
    running = await servers(
        polled(fake),
        payment_poll_schedule="0.2x3",
        payment_final_poll_margin_seconds=0.5,
        **FAST,
    )
    fake.set_order("NO-9001", trade_state="NOTPAY", amount=4200)
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        started = time.monotonic()
        r = await hold(stub, "order-9001", "NO-9001", hold_seconds=2)
        assert r.expires_at.ToMilliseconds() - r.created_at.ToMilliseconds() == 2000
        assert abs(r.created_at.seconds - real()) < 5
        assert await wait_for(lambda: _state(stub, "order-9001", EXPIRED), within=4)
        expired_after = time.monotonic() - started
        assert 1.8 < expired_after < 2.6, expired_after
        times = fake.queries["NO-9001"]
        # 0.2, 0.4, 0.6 s, flagged at 0.8 s, the final poll at 2 - 0.5 = 1.5 s
        assert on_schedule(times, started, (0.2, 0.4, 0.6, 1.5)), rel(times, started)
        assert fake.auth_failures == 0


async def _queries(fake: FakeWeChatPay, out_trade_no: str, n: int) -> bool:
    return len(fake.queries[out_trade_no]) >= n


async def _state(stub: pb_grpc.InventoryStub, order_id: str, state: int) -> bool:
    return (await state_of(stub, order_id)).state == state


async def _flag(stub: pb_grpc.InventoryStub, order_id: str, flag: str) -> bool:
    return (await state_of(stub, order_id)).payment.flag == flag
