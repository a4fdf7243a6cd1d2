"""ReserveStream and ReserveBatch (issue 10): many Reserves per call, each meaning exactly
what a unary Reserve means.

Where a test needs reserves held in flight or queued, it pauses Redis's writes (CLIENT PAUSE
WRITE) instead of relying on speed: stockhold's script call then waits inside Redis (its
socket timeout is raised for these servers), later orders wait in stockhold's queue, and the
test decides when Redis goes on. Background loops that would call Redis are slowed to once an
hour on those servers, so the only script calls blocked in Redis are the Reserves' own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from stockhold_fixtures import (
    Factory,
    Running,
    add_stock,
    expect_error,
    is_cluster,
    levels,
    line,
    records,
    reserved_events,
    unit,
)
from test_cli_policy import stockhold_cli

from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

# A server whose Redis may be paused for seconds: no background script calls, a socket
# timeout long enough to wait through a pause, and cold SKUs never shed (60 s threshold,
# above the socket timeout: such a Reserve waits up to the socket timeout, then UNAVAILABLE).
PAUSABLE = {
    "redis_socket_timeout_seconds": 30.0,
    "reserve_timeout_ms": 60_000,
    "health_interval_seconds": 3600.0,
    "sweep_interval_seconds": 3600.0,
    "contention_flush_seconds": 3600.0,
    "policy_refresh_seconds": 3600.0,
    "batch_max_inflight": 1,
}
WAIT_S = 10.0  # the longest any wait for a condition below may take


# -- helpers ----------------------------------------------------------------------------------


def order(order_id: str, sku: str = "TEE", qty: int = 1, **kw: Any) -> pb.ReserveRequest:
    """A one-line ReserveRequest."""
    return pb.ReserveRequest(order_id=order_id, lines=[line(sku, qty, "w1")], **kw)


def message(cid: str, request: pb.ReserveRequest | None = None) -> pb.ReserveStreamRequest:
    """A ReserveStream message (no `request` when None)."""
    if request is None:
        return pb.ReserveStreamRequest(correlation_id=cid)
    return pb.ReserveStreamRequest(correlation_id=cid, request=request)


def decode(
    status: status_pb2.Status,
) -> tuple[grpc.StatusCode, str, dict[str, str], dict[str, str]]:
    """(code, ErrorInfo reason, metadata, BadRequest field -> description) of a Status."""
    code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    reason, metadata, violations = "", {}, {}
    for detail in status.details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            assert info.domain == "stockhold"
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Unpack(bad):
            violations = {v.field: v.description for v in bad.field_violations}
    return code, reason, metadata, violations


async def read_until(
    call: Any,
    answers: dict[str, pb.ReserveStreamResponse],
    done: Callable[[], bool],
    window: asyncio.Semaphore | None = None,
) -> None:
    """Read answers into `answers` (by correlation id, each at most once) until `done()`;
    release `window` once per answer."""
    deadline = time.monotonic() + WAIT_S
    while not done():
        left = deadline - time.monotonic()
        assert left > 0, f"still waiting after {WAIT_S} s; answers so far: {sorted(answers)}"
        answer = await asyncio.wait_for(call.read(), timeout=left)
        assert answer is not grpc.aio.EOF, f"the stream ended early: {sorted(answers)}"
        assert answer.correlation_id not in answers, f"{answer.correlation_id} answered twice"
        answers[answer.correlation_id] = answer
        if window is not None:
            window.release()


async def read_to_end(call: Any) -> dict[str, pb.ReserveStreamResponse]:
    """Every remaining answer, until the server ends the stream; asserts it ends OK."""
    answers: dict[str, pb.ReserveStreamResponse] = {}
    deadline = time.monotonic() + WAIT_S
    while True:
        answer = await asyncio.wait_for(call.read(), timeout=deadline - time.monotonic())
        if answer is grpc.aio.EOF:
            break
        assert answer.correlation_id not in answers, f"{answer.correlation_id} answered twice"
        answers[answer.correlation_id] = answer
    assert await call.code() == grpc.StatusCode.OK
    return answers


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` (bounded: WAIT_S) until it holds."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def paused(running: Running) -> Iterator[list[Any]]:
    """Redis (every master of a cluster) executes no write command (no reserve script) until
    the block ends; yields a client of each paused node."""
    nodes = running.redis.masters if is_cluster(running.redis) else [running.redis]
    clients = [node.client() for node in nodes]
    for r in clients:
        r.execute_command("CLIENT", "PAUSE", int(WAIT_S * 3 * 1000), "WRITE")
    try:
        yield clients
    finally:
        for r in clients:
            r.execute_command("CLIENT", "UNPAUSE")
            r.close()


def scripts_blocked(clients: list[Any]) -> int:
    """Script calls held by the pause (the client is blocked, its command an EVAL*)."""
    return sum(
        1
        for r in clients
        for c in r.client_list()
        if "b" in c["flags"] and c["cmd"].lower().startswith(("eval", "fcall"))
    )


def check_books(running: Running, stock: int) -> set[str]:
    """One snapshot of Redis (MULTI: no script runs in between, whatever is in flight):
    every record has exactly one ORDER_RESERVED event and holds one unit of TEE in w1, and
    the counters balance. Returns the order ids held."""
    r = running.redis.client()
    (stock_key,) = (k for k in r.keys("sh:*:stock:*") if k.decode().endswith(":TEE::"))
    if is_cluster(running.redis):
        # No MULTI spans slots: read key by key, so only once every reserve is answered.
        keys = r.keys("sh:*:order:*")
        streams = [r.xrange(f"sh:{{p{n}}}:events") for n in range(running.settings.partitions)]
        counters = r.hgetall(stock_key)
    else:
        tx = r.pipeline(transaction=True)
        tx.keys("sh:*:order:*")
        for n in range(running.settings.partitions):
            tx.xrange(f"sh:{{p{n}}}:events")
        tx.hgetall(stock_key)
        keys, *streams, counters = tx.execute()
    held = {k.decode().rsplit(":", 1)[1] for k in keys}
    events = [
        f[b"order_id"].decode()
        for entries in streams
        for _, f in entries
        if f[b"type"] == b"ORDER_RESERVED"
    ]
    assert sorted(events) == sorted(held)
    available, reserved = int(counters[b"a:w1"]), int(counters[b"r:w1"])
    assert (available + reserved, reserved) == (stock, len(held))
    return held


@pytest.fixture
async def pausable(make_stockhold: Factory) -> Running:
    """A stockhold server whose Redis a test may pause (see PAUSABLE)."""
    return await make_stockhold(**PAUSABLE)


# -- streams ----------------------------------------------------------------------------------


async def test_stream_answers_every_message_then_ends_ok_after_half_close(
    stockhold: Running, stub: pb_grpc.InventoryStub
) -> None:
    await add_stock(stub, "TEE", "w1", 100)
    call = stub.ReserveStream(timeout=WAIT_S)
    for i in range(30):
        await call.write(message(f"c-{i}", order(f"s-{i}")))
    await call.done_writing()
    answers = await read_to_end(call)

    assert sorted(answers) == sorted(f"c-{i}" for i in range(30))
    for i in range(30):
        answer = answers[f"c-{i}"]
        assert answer.WhichOneof("result") == "reserved", answer
        r = answer.reserved.reservation
        assert (r.order_id, r.state, answer.reserved.replayed) == (
            f"s-{i}",
            pb.RESERVATION_STATE_HELD,
            False,
        )
        assert [(a.unit.sku, a.warehouse, a.quantity) for a in r.allocations] == [("TEE", "w1", 1)]
    assert check_books(stockhold, 100) == {f"s-{i}" for i in range(30)}


async def test_an_order_is_reserved_once_whether_sent_by_unary_stream_or_batch(
    stockhold: Running, stub: pb_grpc.InventoryStub
) -> None:
    await add_stock(stub, "TEE", "w1", 100)
    first = {
        "u-1": await stub.Reserve(order("u-1")),
        "b-1": (await stub.ReserveBatch(pb.ReserveBatchRequest(orders=[order("b-1")])))
        .results[0]
        .reserved,
    }
    call = stub.ReserveStream(timeout=WAIT_S)
    await call.write(message("s", order("s-1")))
    await call.write(message("u", order("u-1")))  # first sent by unary
    await call.write(message("b", order("b-1")))  # first sent in a batch
    await call.write(message("conflict", order("u-1", qty=2)))
    await call.done_writing()
    answers = await read_to_end(call)
    first["s-1"] = answers["s"].reserved

    # Then again by unary and by batch: the stream's order is replayed too.
    again_unary = await stub.Reserve(order("s-1"))
    batch = await stub.ReserveBatch(
        pb.ReserveBatchRequest(orders=[order("s-1"), order("u-1"), order("b-1")])
    )

    assert [answers[c].reserved.replayed for c in ("s", "u", "b")] == [False, True, True]
    assert [first[o].replayed for o in first] == [False, False, False]
    for cid, oid in (("u", "u-1"), ("b", "b-1")):
        assert answers[cid].reserved.reservation == first[oid].reservation
    assert again_unary.replayed and again_unary.reservation == first["s-1"].reservation
    for result, oid in zip(batch.results, ("s-1", "u-1", "b-1"), strict=True):
        assert result.reserved.replayed, result
        assert result.reserved.reservation == first[oid].reservation
    code, reason, meta, _ = decode(answers["conflict"].error)
    assert (code, reason, meta) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "ORDER_CONFLICT",
        {"order_id": "u-1"},
    )
    # One hold and one ORDER_RESERVED event per order, whatever the shapes and retries.
    assert check_books(stockhold, 100) == {"u-1", "b-1", "s-1"}


async def test_bad_messages_are_answered_with_unary_errors_and_the_stream_stays_open(
    stockhold: Running, stub: pb_grpc.InventoryStub
) -> None:
    await add_stock(stub, "TEE", "w1", 5)
    bad_qty = order("bad-qty", qty=0)
    too_many = order("too-many", qty=6)
    unary_bad = await expect_error(stub.Reserve(bad_qty))
    unary_short = await expect_error(stub.Reserve(too_many))

    call = stub.ReserveStream(timeout=WAIT_S)
    await call.write(message("g-1", order("good-1")))
    await call.write(message("no-request"))
    await call.write(message("bad-qty", bad_qty))
    await call.write(message("", order("no-cid")))
    await call.write(message("x" * 129, order("long-cid")))
    await call.write(message("too-many", too_many))
    await call.write(message("g-2", order("good-2")))
    await call.done_writing()
    answers = await read_to_end(call)

    assert sorted(answers) == sorted(
        ["g-1", "no-request", "bad-qty", "", "x" * 129, "too-many", "g-2"]
    )
    assert answers["g-1"].WhichOneof("result") == answers["g-2"].WhichOneof("result") == "reserved"
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    code, reason, _, violations = decode(answers["no-request"].error)
    assert (code, reason, list(violations)) == (invalid, "INVALID_ARGUMENT", ["request"])
    assert decode(answers[""].error)[3] == {"correlation_id": "must not be empty"}
    assert list(decode(answers["x" * 129].error)[3]) == ["correlation_id"]
    # The same details as a unary call's rich error, with the paths inside the message.
    code, reason, meta, violations = decode(answers["bad-qty"].error)
    assert (code, reason, meta) == (unary_bad.code, unary_bad.reason, unary_bad.metadata)
    assert violations == {f"request.{f}": d for f, d in unary_bad.violations.items()}
    assert list(violations) == ["request.lines[0].quantity"]
    code, reason, meta, violations = decode(answers["too-many"].error)
    # (good-1 took one of the five units before it)
    assert (code, reason, meta, violations) == (
        unary_short.code,
        unary_short.reason,
        {**unary_short.metadata, "available": "4"},
        {},
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_STOCK")
    assert answers["too-many"].error.message == unary_short.message
    assert check_books(stockhold, 5) == {"good-1", "good-2"}


# Standalone only: its premise is batch_max_inflight=1 queueing every later message behind
# the one held call; a cluster allows CLUSTER_INFLIGHT batches in flight (engine.py).
@pytest.mark.stores("standalone")
async def test_a_hot_skus_messages_are_shed_while_others_on_the_same_stream_succeed(
    pausable: Running,
) -> None:
    running = pausable
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "TEE", "w1", 100)
        await add_stock(stub, "HOT", "w1", 100)
        policy = await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="HOT", hot=True, pinned=True))
        assert policy.effective_reserve_timeout_ms == 300
        call = stub.ReserveStream(timeout=WAIT_S * 3)
        answers: dict[str, pb.ReserveStreamResponse] = {}
        hot = [f"hot-{i}" for i in range(4)]
        cold = [f"cold-{i}" for i in range(1, 5)]
        with paused(running) as r:
            # cold-0 is sent and held inside Redis; every later message queues behind it.
            await call.write(message("cold-0", order("cold-0")))
            await wait_for(lambda: scripts_blocked(r) == 1, "cold-0's script call")
            for h, c in zip(hot, cold, strict=True):
                await call.write(message(h, order(h, "HOT")))
                await call.write(message(c, order(c)))
            # The hot SKU's messages are shed after its 300 ms threshold, Redis still paused.
            await read_until(call, answers, lambda: set(hot) <= set(answers))
            assert set(answers) == set(hot), "only the hot messages are answered so far"
        await call.done_writing()
        answers.update(await read_to_end(call))

        for h in hot:
            code, reason, meta, _ = decode(answers[h].error)
            assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESERVE_TIMEOUT")
            assert (meta["sku"], meta["threshold_ms"], meta["limit"]) == (
                "HOT",
                "300",
                "sku_threshold",
            )
            assert int(meta["waited_ms"]) >= 298  # uvloop timers: ms resolution
        for c in ["cold-0", *cold]:
            assert answers[c].WhichOneof("result") == "reserved", answers[c]
        # Shed messages left nothing behind.
        assert records(running) == {"cold-0", *cold}
        assert sorted(reserved_events(running)) == sorted(["cold-0", *cold])
        assert (await levels(stub, unit("HOT")))[("HOT", "", "", "w1")] == (100, 100, 0)


async def test_messages_beyond_the_bound_are_answered_resource_exhausted_each_exactly_once(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold(**PAUSABLE, stream_max_outstanding=4)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "TEE", "w1", 100)
        call = stub.ReserveStream(timeout=WAIT_S * 3)
        answers: dict[str, pb.ReserveStreamResponse] = {}
        held = [f"in-{i}" for i in range(4)]
        extra = [f"over-{i}" for i in range(6)]
        with paused(running) as r:
            for oid in held:
                await call.write(message(oid, order(oid)))
            await wait_for(lambda: scripts_blocked(r) == 1, "the first script call")
            # Four are outstanding (held by the pause): each further one is refused at once.
            for oid in extra:
                await call.write(message(oid, order(oid)))
            await read_until(call, answers, lambda: len(answers) == len(extra))
            assert set(answers) == set(extra)
        # Once answers come back, the stream takes messages again.
        await read_until(call, answers, lambda: len(answers) == len(extra) + len(held))
        await call.write(message("after", order("after")))
        await call.done_writing()
        answers.update(await read_to_end(call))

    assert sorted(answers) == sorted([*held, *extra, "after"])
    for oid in extra:
        code, reason, meta, _ = decode(answers[oid].error)
        assert (code, reason, meta) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "STREAM_BACKPRESSURE",
            {"max_outstanding": "4"},
        )
    for oid in [*held, "after"]:
        assert answers[oid].WhichOneof("result") == "reserved", answers[oid]
    assert records(running) == {*held, "after"}


async def test_a_client_that_sends_everything_before_reading_still_gets_every_answer(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold(stream_max_outstanding=4)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "TEE", "w1", 1000)
        call = stub.ReserveStream(timeout=WAIT_S * 3)
        sent = [f"n-{i}" for i in range(300)]
        for oid in sent:
            await call.write(message(oid, order(oid)))
        await call.done_writing()
        answers = await read_to_end(call)

    assert sorted(answers) == sorted(sent), "every message answered exactly once"
    reserved = {cid for cid, a in answers.items() if a.WhichOneof("result") == "reserved"}
    for cid in set(sent) - reserved:
        assert decode(answers[cid].error)[1] == "STREAM_BACKPRESSURE"
    assert reserved, "the first messages at least are reserved"
    assert check_books(running, 1000) == reserved


# Standalone only: its premise is batch_max_inflight=1 queueing every later message behind
# the one held call; a cluster allows CLUSTER_INFLIGHT batches in flight (engine.py).
@pytest.mark.stores("standalone")
async def test_a_stream_cancelled_with_reserves_in_flight_loses_nothing_acknowledged(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold(**PAUSABLE, stream_max_outstanding=8)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "TEE", "w1", 100)
        await stub.Reserve(order("before"))
        call = stub.ReserveStream(timeout=WAIT_S * 3)
        answers: dict[str, pb.ReserveStreamResponse] = {}
        sent = [f"c-{i}" for i in range(8)]
        with paused(running) as r:
            for oid in sent:
                await call.write(message(oid, order(oid)))
            await wait_for(lambda: scripts_blocked(r) == 1, "the first script call")
            # The bound's answer proves the server holds all eight.
            await call.write(message("over", order("over")))
            await read_until(call, answers, lambda: "over" in answers)
            call.cancel()
            await wait_for(call.done, "the cancelled call")
        # Redis goes on: the script call it held completes; the queued orders were dropped
        # (or, if the cancel reached the server after that call, sent next: in flight too).
        await wait_for(lambda: records(running) != {"before"}, "the held script call")
        assert await call.code() == grpc.StatusCode.CANCELLED
        assert list(answers) == ["over"]
        held = check_books(running, 100) - {"before"}
    # Nothing acknowledged (no OK answer came back), nothing invented: every record is a
    # message that was in flight at the cancel.
    assert held <= set(sent), f"invented: {sorted(held - set(sent))}"


# Standalone only: its books must balance at every moment (one MULTI snapshot); on a cluster
# no MULTI spans slots and a cross-slot order holds its parts before its record exists
# (test_cluster_crash.py checks the cluster's invariants once the orders are done).
@pytest.mark.stores("standalone")
async def test_a_stream_cancelled_mid_flight_under_load_loses_nothing_and_invents_nothing(
    stockhold: Running, stub: pb_grpc.InventoryStub
) -> None:
    await add_stock(stub, "TEE", "w1", 1000)
    call = stub.ReserveStream(timeout=WAIT_S * 3)
    sent: list[str] = []
    answers: dict[str, pb.ReserveStreamResponse] = {}

    window = asyncio.Semaphore(64)  # at most 64 unanswered (the server's bound is 256)

    async def send() -> None:
        for i in range(600):
            await window.acquire()
            sent.append(f"m-{i}")
            await call.write(message(f"m-{i}", order(f"m-{i}")))

    sender = asyncio.ensure_future(send())
    try:
        await read_until(call, answers, lambda: len(answers) >= 150, window)
    finally:
        call.cancel()
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.UsageError, Exception):
            await sender
    await wait_for(call.done, "the cancelled call")
    assert await call.code() == grpc.StatusCode.CANCELLED
    acked = set(answers)
    assert all(a.WhichOneof("result") == "reserved" for a in answers.values())
    assert len(acked) >= 150 and len(sent) > len(acked)
    # A snapshot while reserves sent before the cancel may still be finishing: the books
    # balance at every moment; then once more after a Reserve queued behind them all.
    for _ in range(2):
        held = check_books(stockhold, 1000) - {"barrier"}
        assert acked <= held, f"acknowledged but missing: {sorted(acked - held)}"
        assert held <= set(sent), f"invented: {sorted(held - set(sent))}"
        await stub.Reserve(order("barrier"))


# -- batches ----------------------------------------------------------------------------------


async def test_batch_results_are_one_per_order_in_order(
    stockhold: Running, stub: pb_grpc.InventoryStub
) -> None:
    await add_stock(stub, "TEE", "w1", 100)
    await add_stock(stub, "CAP", "w2", 100)
    orders = [order(f"b-{i}", "TEE" if i % 2 else "CAP", qty=i + 1) for i in range(16)]
    for o in orders:
        o.lines[0].warehouse = "w1" if o.lines[0].unit.sku == "TEE" else "w2"
    reply = await stub.ReserveBatch(pb.ReserveBatchRequest(orders=orders))
    assert len(reply.results) == 16
    for o, result in zip(orders, reply.results, strict=True):
        assert result.WhichOneof("result") == "reserved", result
        r = result.reserved.reservation
        assert r.order_id == o.order_id and not result.reserved.replayed
        assert r.allocations[0].quantity == o.lines[0].quantity
    tee = sum(o.lines[0].quantity for o in orders if o.lines[0].unit.sku == "TEE")
    got = await levels(stub, unit("TEE"), unit("CAP"))
    assert got[("TEE", "", "", "w1")] == (100, 100 - tee, tee)
    assert got[("CAP", "", "", "w2")] == (100, 100 - (136 - tee), 136 - tee)


async def test_each_order_of_a_batch_is_all_or_nothing_on_its_own(
    stockhold: Running, stub: pb_grpc.InventoryStub
) -> None:
    await add_stock(stub, "TEE", "w1", 10)
    await add_stock(stub, "CAP", "w1", 1)
    short = pb.ReserveRequest(order_id="short", lines=[line("TEE", 2, "w1"), line("CAP", 2, "w1")])
    bad = pb.ReserveRequest(order_id="bad", lines=[line("TEE", 1, "w1"), line("TEE", 0, "w1")])
    reply = await stub.ReserveBatch(
        pb.ReserveBatchRequest(orders=[order("ok-0"), short, bad, order("ok-3", qty=3)])
    )
    kinds = [r.WhichOneof("result") for r in reply.results]
    assert kinds == ["reserved", "error", "error", "reserved"]
    code, reason, meta, _ = decode(reply.results[1].error)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_STOCK")
    assert (meta["sku"], meta["requested"], meta["available"]) == ("CAP", "2", "1")
    code, reason, _, violations = decode(reply.results[2].error)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert list(violations) == ["orders[2].lines[1].quantity"]
    # The refused orders hold nothing, not even their good lines.
    assert records(stockhold) == {"ok-0", "ok-3"}
    got = await levels(stub, unit("TEE"), unit("CAP"))
    assert got[("TEE", "", "", "w1")] == (10, 6, 4)
    assert got[("CAP", "", "", "w1")] == (1, 1, 0)


@pytest.mark.parametrize("n", [0, 101])
async def test_a_batch_of_0_or_over_100_orders_is_refused_whole_and_writes_nothing(
    stockhold: Running, stub: pb_grpc.InventoryStub, n: int
) -> None:
    await add_stock(stub, "TEE", "w1", 1000)
    err = await expect_error(
        stub.ReserveBatch(pb.ReserveBatchRequest(orders=[order(f"o-{i}") for i in range(n)]))
    )
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert err.violations == {"orders": f"must hold 1..100 orders (got {n})"}
    assert records(stockhold) == set()
    assert reserved_events(stockhold) == []
    # 100 is the most a call takes.
    reply = await stub.ReserveBatch(
        pb.ReserveBatchRequest(orders=[order(f"o-{i}") for i in range(100)])
    )
    assert all(r.WhichOneof("result") == "reserved" for r in reply.results)


async def test_a_repeated_order_id_in_a_batch_is_a_retry_of_its_first_occurrence(
    stockhold: Running, stub: pb_grpc.InventoryStub
) -> None:
    await add_stock(stub, "TEE", "w1", 10)
    reply = await stub.ReserveBatch(
        pb.ReserveBatchRequest(
            orders=[order("dup"), order("other"), order("dup"), order("dup", qty=2)]
        )
    )
    first, other, again, changed = reply.results
    assert (first.reserved.replayed, other.reserved.replayed) == (False, False)
    assert again.reserved.replayed and again.reserved.reservation == first.reserved.reservation
    code, reason, _, _ = decode(changed.error)
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "ORDER_CONFLICT")
    assert check_books(stockhold, 10) == {"dup", "other"}


# -- the CLI ----------------------------------------------------------------------------------


async def test_cli_reserve_batch_and_reserve_stream_print_one_json_line_per_answer(
    stockhold: Running, stub: pb_grpc.InventoryStub, tmp_path: Path
) -> None:
    await add_stock(stub, "TEE", "w1", 5)
    path = tmp_path / "orders.jsonl"
    rows = [
        {
            "order_id": "cli-1",
            "lines": [{"unit": {"sku": "TEE"}, "warehouse": "w1", "quantity": 2}],
        },
        {"order_id": "cli-2", "lines": [{"unit": {"sku": "TEE"}, "quantity": 9}]},
        {"order_id": "cli-3", "lines": [{"unit": {"sku": "TEE"}, "quantity": 0}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    code, out, err = await stockhold_cli(stockhold, "reserve-batch", "--file", str(path))
    assert code == 1, err  # some orders were refused
    batch = [json.loads(text) for text in out.splitlines()]
    assert [(a["line"], a["order_id"]) for a in batch] == [(1, "cli-1"), (2, "cli-2"), (3, "cli-3")]
    assert batch[0]["reserved"]["reservation"]["state"] == "RESERVATION_STATE_HELD"
    assert (batch[1]["error"]["code"], batch[1]["error"]["reason"]) == (
        "FAILED_PRECONDITION",
        "INSUFFICIENT_STOCK",
    )
    assert list(batch[2]["error"]["field_violations"]) == ["orders[2].lines[0].quantity"]

    code, out, err = await stockhold_cli(
        stockhold, "reserve-stream", "--file", str(path), "--window", "2"
    )
    assert code == 1, err
    stream = sorted((json.loads(text) for text in out.splitlines()), key=lambda a: a["line"])
    assert [(a["line"], a["correlation_id"]) for a in stream] == [(1, "1"), (2, "2"), (3, "3")]
    assert stream[0]["reserved"]["replayed"] is True  # the batch reserved it first
    assert stream[1]["error"]["reason"] == "INSUFFICIENT_STOCK"
    assert list(stream[2]["error"]["field_violations"]) == ["request.lines[0].quantity"]
