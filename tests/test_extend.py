"""ExtendReservation: a HELD reservation's deadline becomes max(itself, Redis's now + hold_seconds).

It never brings a deadline closer; `extended` and one ORDER_EXTENDED event say when it moved.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
import pytest
from stockhold_fixtures import (
    Factory,
    add_stock,
    expect_error,
    levels,
    line,
    snapshot,
    unit,
    wait_settled,
)

from stockhold import constants as c
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

HELD = pb.RESERVATION_STATE_HELD
EXPIRED = pb.RESERVATION_STATE_EXPIRED
MAX_HOLD = 30 * 86_400  # Settings.max_hold_seconds default
TEE = ("tee", "", "", "w1")


# -- helpers -------------------------------------------------------------------------------------


def redis_ms(client: Any) -> int:
    """Redis's clock in ms (sync client): the only clock a deadline is measured against."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def events(client: Any, order_id: str) -> list[dict[str, Any]]:
    """The events of one order, decoded, in stream order."""
    out: list[dict[str, Any]] = []
    for key in sorted(client.scan_iter(match="*:events")):
        for _, fields in client.xrange(key):
            e = {k.decode(): v.decode() for k, v in fields.items()}
            if e.get("order_id") == order_id:
                e["data"] = orjson.loads(e["data"])
                out.append(e)
    return out


def record(client: Any, order_id: str) -> dict[str, str]:
    """The stored record of an order (found by scan: tests do not rebuild the key layout)."""
    for k in client.scan_iter(match="*:order:*"):
        if client.hget(k, "oid") == order_id.encode():
            return {f.decode(): v.decode() for f, v in client.hgetall(k).items()}
    raise AssertionError(f"no record for {order_id}")


def index_score(client: Any, order_id: str) -> float | None:
    """The order's deadline in the expiry index, None when it is not there."""
    scores = [client.zscore(k, order_id) for k in client.scan_iter(match="*:expiry")]
    found = [s for s in scores if s is not None]
    assert len(found) <= 1
    return found[0] if found else None


async def hold(stub: pb_grpc.InventoryStub, order_id: str = "o-1", seconds: int = 0) -> Any:
    """Stock tee 10 in w1 (once) and hold 3 of it for `order_id`."""
    if not (await levels(stub, unit("tee"))):
        await add_stock(stub, "tee", "w1", 10)
    req = pb.ReserveRequest(order_id=order_id, lines=[line("tee", 3, "w1")], hold_seconds=seconds)
    return (await stub.Reserve(req)).reservation


def extend(stub: pb_grpc.InventoryStub, order_id: str = "o-1", seconds: int = 60) -> Any:
    return stub.ExtendReservation(
        pb.ExtendReservationRequest(order_id=order_id, hold_seconds=seconds)
    )


async def wait_past(client: Any, ms: int, limit_s: float = 5.0) -> None:
    """Sleep (bounded) until Redis's clock is past `ms`."""
    give_up = time.monotonic() + limit_s
    for _ in range(500):
        if redis_ms(client) > ms:
            return
        assert time.monotonic() < give_up, "Redis's clock never passed"
        await asyncio.sleep(0.02)
    raise AssertionError("Redis's clock never passed")


async def wait_swept(client: Any, order_id: str, limit_s: float = 4.0) -> None:
    """Poll (bounded) until the sweeper has stored the record as EXPIRED."""
    give_up = time.monotonic() + limit_s
    for _ in range(200):
        if record(client, order_id)["st"] == "E":
            return
        assert time.monotonic() < give_up, f"{order_id} was not swept"
        await asyncio.sleep(0.05)
    raise AssertionError(f"{order_id} was not swept")


@pytest.fixture
async def unswept(make_stockhold: Factory) -> AsyncIterator[pb_grpc.InventoryStub]:
    """A stub on a server whose sweeper never runs during the test."""
    running = await make_stockhold(sweep_interval_seconds=3600)
    async with running.channel() as channel:
        yield pb_grpc.InventoryStub(channel)


# -- the deadline moves, on Redis's clock ------------------------------------------------------


async def test_extend_sets_the_deadline_to_redis_now_plus_hold(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    admin = redis_proc.client()
    held = await hold(stub, seconds=60)

    before = redis_ms(admin)
    resp = await extend(stub, seconds=3600)
    after = redis_ms(admin)

    r = resp.reservation
    assert resp.extended is True
    deadline = r.expires_at.ToMilliseconds()
    assert before + 3_600_000 <= deadline <= after + 3_600_000
    assert r.state == HELD and r.order_id == "o-1"
    assert r.created_at == held.created_at and list(r.allocations) == list(held.allocations)
    assert not r.HasField("updated_at")  # still HELD: updated_at marks a terminal state
    assert int(record(admin, "o-1")["dl"]) == deadline
    assert index_score(admin, "o-1") == deadline
    assert (await stub.GetReservation(pb.GetReservationRequest(order_id="o-1"))) == r
    ext = [e for e in events(admin, "o-1") if e["type"] == c.EVENT_EXTENDED]
    assert len(ext) == 1
    assert before <= int(ext[0]["ts"]) <= after
    assert ext[0]["data"] == {
        "expires_at": deadline,
        "previous_expires_at": held.expires_at.ToMilliseconds(),
        "hold_seconds": 3600,
    }
    assert await levels(stub, unit("tee")) == {TEE: (10, 7, 3)}  # stock untouched


async def test_extending_again_with_the_same_hold_moves_the_deadline_again(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    admin = redis_proc.client()
    await hold(stub, seconds=60)
    one = await extend(stub, seconds=600)
    first = one.reservation.expires_at.ToMilliseconds()
    await wait_past(admin, redis_ms(admin) + 5)

    two = await extend(stub, seconds=600)
    second = two.reservation.expires_at.ToMilliseconds()

    assert one.extended and two.extended
    assert second > first
    assert [
        e["data"]["expires_at"] for e in events(admin, "o-1") if e["type"] == c.EVENT_EXTENDED
    ] == [
        first,
        second,
    ]


async def test_extend_never_shortens_a_hold_and_a_call_that_moves_nothing_writes_nothing(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    """Extend(300) on a 48 h hold: unchanged, extended = false, no event, no write at all."""
    admin = redis_proc.client()
    held = await hold(stub)  # the default: 48 h
    before = await snapshot(redis_proc, with_ttl=True)

    resp = await extend(stub, seconds=300)

    assert resp.extended is False
    assert resp.reservation == held  # same deadline, no updated_at, nothing else moved
    assert await snapshot(redis_proc, with_ttl=True) == before  # no event, no index or record write
    assert c.EVENT_EXTENDED not in {e["type"] for e in events(admin, "o-1")}
    assert (await stub.GetReservation(pb.GetReservationRequest(order_id="o-1"))) == held


async def test_a_longer_extension_of_a_long_hold_moves_it_with_one_event(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    admin = redis_proc.client()
    held = await hold(stub)  # the default: 48 h
    previous = held.expires_at.ToMilliseconds()
    await extend(stub, seconds=300)  # moves nothing
    before = redis_ms(admin)

    resp = await extend(stub, seconds=72 * 3600)
    after = redis_ms(admin)

    assert resp.extended is True
    deadline = resp.reservation.expires_at.ToMilliseconds()
    assert before + 72 * 3_600_000 <= deadline <= after + 72 * 3_600_000
    assert deadline > previous
    assert int(record(admin, "o-1")["dl"]) == deadline == index_score(admin, "o-1")
    (ext,) = [e for e in events(admin, "o-1") if e["type"] == c.EVENT_EXTENDED]
    assert ext["data"] == {
        "expires_at": deadline,
        "previous_expires_at": previous,
        "hold_seconds": 72 * 3600,
    }
    # Extending back down to 300 s after that moves nothing either.
    again = await extend(stub, seconds=300)
    assert again.extended is False
    assert again.reservation.expires_at.ToMilliseconds() == deadline
    assert len([e for e in events(admin, "o-1") if e["type"] == c.EVENT_EXTENDED]) == 1


async def test_an_extended_hold_outlives_its_old_deadline_and_expires_at_the_new_one(
    make_stockhold: Factory, redis_proc: Any
) -> None:
    running = await make_stockhold(sweep_interval_seconds=0.1)
    admin = redis_proc.client()
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        held = await hold(stub, seconds=1)
        r = (await extend(stub, seconds=3)).reservation
        new_deadline = r.expires_at.ToMilliseconds()
        old_deadline = held.expires_at.ToMilliseconds()

        # Several sweeps after the old deadline: still held.
        await wait_past(admin, old_deadline + 500)
        got = await stub.GetReservation(pb.GetReservationRequest(order_id="o-1"))
        assert got.state == HELD
        assert record(admin, "o-1")["st"] == "H"
        assert await levels(stub, unit("tee")) == {TEE: (10, 7, 3)}
        assert c.EVENT_EXPIRED not in {e["type"] for e in events(admin, "o-1")}

        # Then the sweeper expires it at the new deadline.
        await wait_past(admin, new_deadline)
        await wait_swept(admin, "o-1")
        (exp,) = [e for e in events(admin, "o-1") if e["type"] == c.EVENT_EXPIRED]
        assert new_deadline <= int(exp["ts"]) <= new_deadline + 2000
        # On a cluster the event is in the stream a moment before the parts' stock follows.
        await wait_settled(redis_proc)
        assert await levels(stub, unit("tee")) == {TEE: (10, 10, 0)}


async def test_commit_after_the_old_deadline_of_an_extended_hold_succeeds(
    unswept: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    admin = redis_proc.client()
    held = await hold(unswept, seconds=1)
    await extend(unswept, seconds=60)
    await wait_past(admin, held.expires_at.ToMilliseconds())

    r = (await unswept.Commit(pb.CommitRequest(order_id="o-1", payment_ref="pay-1"))).reservation

    assert r.state == pb.RESERVATION_STATE_COMMITTED
    assert await levels(unswept, unit("tee")) == {TEE: (7, 7, 0)}


# -- refusals: nothing changes -----------------------------------------------------------------


async def test_extend_of_a_committed_or_released_reservation_is_refused(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await hold(stub, "o-c")
    await hold(stub, "o-r")
    await stub.Commit(pb.CommitRequest(order_id="o-c"))
    await stub.Release(pb.ReleaseRequest(order_id="o-r"))
    before = await snapshot(redis_proc, with_ttl=True)

    committed = await expect_error(extend(stub, "o-c"))
    released = await expect_error(extend(stub, "o-r"))

    assert (committed.code, committed.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RESERVATION_COMMITTED",
    )
    assert (released.code, released.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RESERVATION_RELEASED",
    )
    assert await snapshot(redis_proc, with_ttl=True) == before


async def test_extend_of_an_expired_reservation_is_refused(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    admin = redis_proc.client()
    await hold(stub, seconds=1)
    await wait_swept(admin, "o-1")
    await wait_settled(redis_proc)
    before = await snapshot(redis_proc, with_ttl=True)

    err = await expect_error(extend(stub))

    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_EXPIRED")
    assert await snapshot(redis_proc, with_ttl=True) == before


async def test_extend_of_a_held_reservation_past_its_deadline_expires_it_and_is_refused(
    unswept: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    """Not revived, not moved: expired for real (as the sweeper would), then refused."""
    admin = redis_proc.client()
    held = await hold(unswept, seconds=1)
    deadline = held.expires_at.ToMilliseconds()
    await wait_past(admin, deadline)
    assert record(admin, "o-1")["st"] == "H"  # the sweeper is not running here

    err = await expect_error(extend(unswept, seconds=3600))

    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_EXPIRED")
    rec = record(admin, "o-1")
    assert rec["st"] == "E" and int(rec["dl"]) == deadline
    assert index_score(admin, "o-1") is None
    assert await levels(unswept, unit("tee")) == {TEE: (10, 10, 0)}  # the stock is back
    types = [e["type"] for e in events(admin, "o-1")]
    assert types == [c.EVENT_RESERVED, c.EVENT_EXPIRED]
    (exp,) = [e for e in events(admin, "o-1") if e["type"] == c.EVENT_EXPIRED]
    assert int(exp["ts"]) == int(rec["up"]) >= deadline
    got = await unswept.GetReservation(pb.GetReservationRequest(order_id="o-1"))
    assert got.state == EXPIRED and got.updated_at.ToMilliseconds() == int(exp["ts"])

    # Again: still refused, and nothing more is written.
    before = await snapshot(redis_proc, with_ttl=True)
    err = await expect_error(extend(unswept, seconds=3600))
    assert err.reason == "RESERVATION_EXPIRED"
    assert await snapshot(redis_proc, with_ttl=True) == before


async def test_extend_of_an_unknown_order_is_not_found(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    before = await snapshot(redis_proc, with_ttl=True)

    err = await expect_error(extend(stub, "nobody"))

    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")
    assert err.metadata == {"order_id": "nobody"}
    assert await snapshot(redis_proc, with_ttl=True) == before


@pytest.mark.parametrize(
    ("order_id", "seconds", "fields"),
    [
        ("o-1", 0, {"hold_seconds"}),
        ("o-1", -1, {"hold_seconds"}),
        ("o-1", -(2**63), {"hold_seconds"}),
        ("o-1", MAX_HOLD + 1, {"hold_seconds"}),
        ("o-1", 2**62, {"hold_seconds"}),
        ("", 60, {"order_id"}),
        ("o" * 129, 60, {"order_id"}),
        ("o-1\n", 60, {"order_id"}),
        ("", 0, {"order_id", "hold_seconds"}),
    ],
    ids=[
        "hold-0",
        "hold-negative",
        "hold-min-int64",
        "hold-above-max",
        "hold-2e62",
        "order-id-empty",
        "order-id-129",
        "order-id-newline",
        "both",
    ],
)
async def test_bad_input_is_invalid_argument_and_changes_nothing(
    stub: pb_grpc.InventoryStub, redis_proc: Any, order_id: str, seconds: int, fields: set[str]
) -> None:
    await hold(stub)
    before = await snapshot(redis_proc, with_ttl=True)

    err = await expect_error(extend(stub, order_id, seconds))

    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "INVALID_ARGUMENT"
    assert set(err.violations) == fields
    assert await snapshot(redis_proc, with_ttl=True) == before


async def test_the_longest_allowed_hold_is_accepted(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    admin = redis_proc.client()
    await hold(stub)
    before = redis_ms(admin)

    r = (await extend(stub, seconds=MAX_HOLD)).reservation

    assert r.expires_at.ToMilliseconds() >= before + MAX_HOLD * 1000
