"""Reserve: all-or-nothing lines, summed duplicates, auto-allocation, idempotent replays."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from stockhold_fixtures import add_stock, expect_error, levels, line, snapshot, unit

from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

HELD = pb.RESERVATION_STATE_HELD


def allocations(r: pb.Reservation) -> dict[tuple[str, str, str, str], int]:
    """(sku, spec, barcode, warehouse) -> quantity, for order-independent comparisons."""
    out: dict[tuple[str, str, str, str], int] = {}
    for a in r.allocations:
        k = (a.unit.sku, a.unit.spec, a.unit.barcode, a.warehouse)
        assert k not in out, f"allocation {k} listed twice"
        out[k] = a.quantity
    return out


def event_entries(redis_proc: Any) -> list[dict[bytes, bytes]]:
    """Every entry of every partition event stream."""
    c = redis_proc.client()
    return [fields for key in c.scan_iter(match="*:events") for _, fields in c.xrange(key)]


async def reserve(
    stub: pb_grpc.InventoryStub, order_id: str, *lines: pb.ReserveLine, hold_seconds: int = 0
) -> pb.ReserveResponse:
    return await stub.Reserve(
        pb.ReserveRequest(order_id=order_id, lines=list(lines), hold_seconds=hold_seconds)
    )


# -- all or nothing ------------------------------------------------------------------------


async def test_multi_line_reserve_holds_every_line(stub: pb_grpc.InventoryStub) -> None:
    await add_stock(stub, "apple", "w1", 10)
    await add_stock(stub, "pear", "w1", 4)
    await add_stock(stub, "plum", "w2", 7)

    resp = await reserve(
        stub, "o-1", line("apple", 3, "w1"), line("pear", 4, "w1"), line("plum", 2, "w2")
    )

    assert not resp.replayed
    assert resp.reservation.order_id == "o-1"
    assert resp.reservation.state == HELD
    assert allocations(resp.reservation) == {
        ("apple", "", "", "w1"): 3,
        ("pear", "", "", "w1"): 4,
        ("plum", "", "", "w2"): 2,
    }
    assert await levels(stub, unit("apple"), unit("pear"), unit("plum")) == {
        ("apple", "", "", "w1"): (10, 7, 3),
        ("pear", "", "", "w1"): (4, 0, 4),
        ("plum", "", "", "w2"): (7, 5, 2),
    }


async def test_one_short_line_refuses_the_whole_order_and_writes_nothing(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await add_stock(stub, "apple", "w1", 10)
    await add_stock(stub, "pear", "w1", 4)
    await add_stock(stub, "plum", "w2", 7)
    before = await snapshot(redis_proc)

    err = await expect_error(
        reserve(stub, "o-1", line("apple", 3, "w1"), line("pear", 5, "w1"), line("plum", 2, "w2"))
    )

    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "INSUFFICIENT_STOCK"
    assert err.metadata == {
        "sku": "pear",
        "spec": "",
        "barcode": "",
        "warehouse": "w1",
        "requested": "5",
        "available": "4",
    }
    assert await snapshot(redis_proc) == before
    assert await levels(stub, unit("apple"), unit("pear"), unit("plum")) == {
        ("apple", "", "", "w1"): (10, 10, 0),
        ("pear", "", "", "w1"): (4, 4, 0),
        ("plum", "", "", "w2"): (7, 7, 0),
    }
    not_found = await expect_error(stub.GetReservation(pb.GetReservationRequest(order_id="o-1")))
    assert not_found.code == grpc.StatusCode.NOT_FOUND


async def test_line_for_a_warehouse_without_stock_is_refused_with_available_zero(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await add_stock(stub, "apple", "w1", 10)
    before = await snapshot(redis_proc)

    err = await expect_error(reserve(stub, "o-1", line("apple", 1, "w2")))

    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "INSUFFICIENT_STOCK"
    assert err.metadata["warehouse"] == "w2"
    assert err.metadata["requested"] == "1"
    assert err.metadata["available"] == "0"
    assert await snapshot(redis_proc) == before


# -- duplicate lines -----------------------------------------------------------------------


@pytest.mark.parametrize("warehouse", ["w1", ""], ids=["named-warehouse", "auto-warehouse"])
async def test_two_lines_for_the_same_unit_are_checked_against_their_sum(
    stub: pb_grpc.InventoryStub, redis_proc: Any, warehouse: str
) -> None:
    await add_stock(stub, "apple", "w1", 5)
    before = await snapshot(redis_proc)

    err = await expect_error(
        reserve(stub, "o-1", line("apple", 3, warehouse), line("apple", 3, warehouse))
    )

    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "INSUFFICIENT_STOCK"
    assert err.metadata == {
        "sku": "apple",
        "spec": "",
        "barcode": "",
        "warehouse": warehouse,
        "requested": "6",
        "available": "5",
    }
    assert await snapshot(redis_proc) == before


@pytest.mark.parametrize("warehouse", ["w1", ""], ids=["named-warehouse", "auto-warehouse"])
async def test_two_lines_for_the_same_unit_succeed_when_stock_covers_their_sum(
    stub: pb_grpc.InventoryStub, warehouse: str
) -> None:
    await add_stock(stub, "apple", "w1", 6)

    resp = await reserve(stub, "o-1", line("apple", 3, warehouse), line("apple", 3, warehouse))

    assert allocations(resp.reservation) == {("apple", "", "", "w1"): 6}
    assert await levels(stub, unit("apple")) == {("apple", "", "", "w1"): (6, 0, 6)}


async def test_auto_allocated_line_accounts_for_named_lines_of_the_same_order(
    stub: pb_grpc.InventoryStub,
) -> None:
    await add_stock(stub, "apple", "w-a", 5)
    await add_stock(stub, "apple", "w-b", 4)

    # The named line takes 3 of w-a, leaving 2 there: only w-b covers the 4 of the auto line.
    resp = await reserve(stub, "o-1", line("apple", 4), line("apple", 3, "w-a"))

    assert allocations(resp.reservation) == {
        ("apple", "", "", "w-a"): 3,
        ("apple", "", "", "w-b"): 4,
    }
    assert await levels(stub, unit("apple")) == {
        ("apple", "", "", "w-a"): (5, 2, 3),
        ("apple", "", "", "w-b"): (4, 0, 4),
    }


# -- allocation of lines without a warehouse --------------------------------------------------


async def test_auto_allocation_takes_the_first_priority_warehouse_that_covers_the_line(
    make_stockhold: Any,
) -> None:
    running = await make_stockhold(warehouse_priority=("w-c", "w-a"))
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "apple", "w-a", 10)
        await add_stock(stub, "apple", "w-b", 50)  # most stock, but not in the priority list
        await add_stock(stub, "apple", "w-c", 5)

        first = await reserve(stub, "o-1", line("apple", 4))
        assert allocations(first.reservation) == {("apple", "", "", "w-c"): 4}

        # w-c has 1 left: the next priority warehouse that covers the whole line wins.
        second = await reserve(stub, "o-2", line("apple", 8))
        assert allocations(second.reservation) == {("apple", "", "", "w-a"): 8}

        # Neither priority warehouse covers 3 now (w-c 1, w-a 2): the others follow.
        third = await reserve(stub, "o-3", line("apple", 3))
        assert allocations(third.reservation) == {("apple", "", "", "w-b"): 3}

        assert await levels(stub, unit("apple")) == {
            ("apple", "", "", "w-a"): (10, 2, 8),
            ("apple", "", "", "w-b"): (50, 47, 3),
            ("apple", "", "", "w-c"): (5, 1, 4),
        }


async def test_auto_allocation_without_priority_takes_the_most_available_warehouse(
    stub: pb_grpc.InventoryStub,
) -> None:
    await add_stock(stub, "apple", "w-a", 5)
    await add_stock(stub, "apple", "w-b", 9)
    await add_stock(stub, "apple", "w-c", 7)

    resp = await reserve(stub, "o-1", line("apple", 3))

    assert allocations(resp.reservation) == {("apple", "", "", "w-b"): 3}


async def test_auto_allocation_breaks_ties_in_available_stock_by_warehouse_name(
    stub: pb_grpc.InventoryStub,
) -> None:
    await add_stock(stub, "apple", "w-c", 7)
    await add_stock(stub, "apple", "w-a", 5)
    await add_stock(stub, "apple", "w-b", 7)

    resp = await reserve(stub, "o-1", line("apple", 3))

    assert allocations(resp.reservation) == {("apple", "", "", "w-b"): 3}


async def test_auto_allocation_splits_across_warehouses_when_none_covers_the_line(
    stub: pb_grpc.InventoryStub,
) -> None:
    await add_stock(stub, "apple", "w-a", 3)
    await add_stock(stub, "apple", "w-b", 4)
    await add_stock(stub, "apple", "w-c", 2)

    resp = await reserve(stub, "o-1", line("apple", 8))

    # Most available first: w-b 4, w-a 3, then 1 of w-c.
    assert allocations(resp.reservation) == {
        ("apple", "", "", "w-b"): 4,
        ("apple", "", "", "w-a"): 3,
        ("apple", "", "", "w-c"): 1,
    }
    assert sum(a.quantity for a in resp.reservation.allocations) == 8
    assert await levels(stub, unit("apple")) == {
        ("apple", "", "", "w-a"): (3, 0, 3),
        ("apple", "", "", "w-b"): (4, 0, 4),
        ("apple", "", "", "w-c"): (2, 1, 1),
    }
    got = await stub.GetReservation(pb.GetReservationRequest(order_id="o-1"))
    assert allocations(got) == allocations(resp.reservation)


async def test_auto_allocation_split_follows_the_priority_order(make_stockhold: Any) -> None:
    running = await make_stockhold(warehouse_priority=("w-c",))
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "apple", "w-a", 3)
        await add_stock(stub, "apple", "w-b", 4)
        await add_stock(stub, "apple", "w-c", 2)

        resp = await reserve(stub, "o-1", line("apple", 7))

        # w-c first (priority), then the most available (w-b), then w-a for the rest.
        assert allocations(resp.reservation) == {
            ("apple", "", "", "w-c"): 2,
            ("apple", "", "", "w-b"): 4,
            ("apple", "", "", "w-a"): 1,
        }


async def test_auto_allocation_refuses_when_all_warehouses_together_are_short(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await add_stock(stub, "apple", "w-a", 3)
    await add_stock(stub, "apple", "w-b", 4)
    await add_stock(stub, "apple", "w-c", 2)
    before = await snapshot(redis_proc)

    err = await expect_error(reserve(stub, "o-1", line("apple", 10)))

    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "INSUFFICIENT_STOCK"
    assert err.metadata == {
        "sku": "apple",
        "spec": "",
        "barcode": "",
        "warehouse": "",
        "requested": "10",
        "available": "9",
    }
    assert await snapshot(redis_proc) == before


async def test_auto_allocation_of_a_unit_never_stocked_is_refused_with_available_zero(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    before = await snapshot(redis_proc)

    err = await expect_error(reserve(stub, "o-1", line("ghost", 1)))

    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "INSUFFICIENT_STOCK"
    assert err.metadata["warehouse"] == ""
    assert err.metadata["available"] == "0"
    assert await snapshot(redis_proc) == before


# -- idempotency -----------------------------------------------------------------------------


async def test_retry_with_same_order_id_returns_the_same_reservation_and_changes_nothing(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await add_stock(stub, "apple", "w-a", 3)
    await add_stock(stub, "apple", "w-b", 4)
    request = pb.ReserveRequest(order_id="o-1", lines=[line("apple", 5)], hold_seconds=600)
    first = await stub.Reserve(request)
    assert not first.replayed
    before = await snapshot(redis_proc)

    for _ in range(3):
        again = await stub.Reserve(request)
        assert again.replayed
        assert again.reservation == first.reservation

    assert await snapshot(redis_proc) == before
    # Split once (w-b 4, w-a 1) and never again.
    assert await levels(stub, unit("apple")) == {
        ("apple", "", "", "w-a"): (3, 2, 1),
        ("apple", "", "", "w-b"): (4, 0, 4),
    }


async def test_same_order_id_with_other_lines_is_refused_as_order_conflict(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await add_stock(stub, "apple", "w1", 10)
    await reserve(stub, "o-1", line("apple", 2, "w1"))
    before = await snapshot(redis_proc)

    for other in (
        [line("apple", 3, "w1")],
        [line("apple", 2, "")],
        [line("apple", 2, "w1"), line("apple", 1, "w1")],
        [line("apple", 2, "w1", spec="red")],
    ):
        err = await expect_error(stub.Reserve(pb.ReserveRequest(order_id="o-1", lines=other)))
        assert err.code == grpc.StatusCode.ALREADY_EXISTS
        assert err.reason == "ORDER_CONFLICT"
        assert err.metadata.get("order_id") == "o-1"

    assert await snapshot(redis_proc) == before


async def test_same_order_id_with_other_hold_seconds_is_refused_as_order_conflict(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await add_stock(stub, "apple", "w1", 10)
    await reserve(stub, "o-1", line("apple", 2, "w1"), hold_seconds=600)
    before = await snapshot(redis_proc)

    err = await expect_error(reserve(stub, "o-1", line("apple", 2, "w1"), hold_seconds=601))

    assert err.code == grpc.StatusCode.ALREADY_EXISTS
    assert err.reason == "ORDER_CONFLICT"
    assert await snapshot(redis_proc) == before


# -- unit identity -----------------------------------------------------------------------------


async def test_key_syntax_characters_in_unit_fields_keep_units_distinct(
    stub: pb_grpc.InventoryStub,
) -> None:
    # Pairs that would collide if ':' '{' '}' '%' were joined into keys without escaping.
    units = [
        ("a:b", "", ""),
        ("a", "b", ""),
        ("a", ":b", ""),
        ("a", "", "b"),
        ("a%3Ab", "", ""),
        ("{p1}", "", ""),
        ("{p1}", "}{", "{"),
        ("商品", "红色", "条码:1"),
        ("café", "größe:L", "🍎"),
    ]
    for i, (sku, spec, barcode) in enumerate(units):
        await add_stock(stub, sku, "w1", 10 + i, spec=spec, barcode=barcode)

    reply = await levels(stub, *(unit(*u) for u in units))
    assert reply == {(*u, "w1"): (10 + i, 10 + i, 0) for i, u in enumerate(units)}

    lines = [
        line(sku, i + 1, "w1", spec=spec, barcode=barcode)
        for i, (sku, spec, barcode) in enumerate(units)
    ]
    resp = await reserve(stub, "o-1", *lines)
    assert allocations(resp.reservation) == {(*u, "w1"): i + 1 for i, u in enumerate(units)}
    assert await levels(stub, *(unit(*u) for u in units)) == {
        (*u, "w1"): (10 + i, 10 + i - (i + 1), i + 1) for i, u in enumerate(units)
    }


async def test_unit_text_is_nfc_normalised_so_equivalent_spellings_are_one_unit(
    stub: pb_grpc.InventoryStub,
) -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    await add_stock(stub, decomposed, "w1", 5)

    resp = await reserve(stub, "o-1", line(composed, 2, "w1"))

    assert allocations(resp.reservation) == {(composed, "", "", "w1"): 2}
    assert await levels(stub, unit(decomposed)) == {(composed, "", "", "w1"): (5, 3, 2)}


async def test_order_id_with_braces_and_colons_is_plain_data(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await add_stock(stub, "apple", "w1", 5)
    ids = ["{p0}:order:x", "a:b", "a%3Ab", "}{", "订单-1"]
    for i, oid in enumerate(ids):
        resp = await reserve(stub, oid, line("apple", 1, "w1"))
        assert resp.reservation.order_id == oid
        assert not resp.replayed, i
    for oid in ids:
        got = await stub.GetReservation(pb.GetReservationRequest(order_id=oid))
        assert got.order_id == oid
        assert got.state == HELD
    # Every key carries exactly one hash tag: user braces never reach key syntax.
    for key in redis_proc.dump():
        assert key.count(b"{") == 1 and key.count(b"}") == 1, key


# -- hold length ---------------------------------------------------------------------------------


async def test_default_hold_is_48_hours(stub: pb_grpc.InventoryStub) -> None:
    await add_stock(stub, "apple", "w1", 5)

    resp = await reserve(stub, "o-1", line("apple", 1, "w1"))

    r = resp.reservation
    assert r.expires_at.ToMilliseconds() - r.created_at.ToMilliseconds() == 172_800_000
    assert not r.HasField("updated_at")


async def test_explicit_hold_seconds_sets_the_deadline(stub: pb_grpc.InventoryStub) -> None:
    await add_stock(stub, "apple", "w1", 5)

    resp = await reserve(stub, "o-1", line("apple", 1, "w1"), hold_seconds=90)

    r = resp.reservation
    assert r.expires_at.ToMilliseconds() - r.created_at.ToMilliseconds() == 90_000


async def test_reserve_appends_one_event_and_a_replay_none(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    await add_stock(stub, "apple", "w1", 5)
    await reserve(stub, "o-1", line("apple", 2, "w1"))
    await reserve(stub, "o-1", line("apple", 2, "w1"))

    events = event_entries(redis_proc)
    assert sorted(e[b"type"] for e in events) == [b"ORDER_RESERVED", b"STOCK_ADJUSTED"]
    reserved = next(e for e in events if e[b"type"] == b"ORDER_RESERVED")
    assert reserved[b"order_id"] == b"o-1"
    assert {b"type", b"order_id", b"ts", b"data"} <= set(reserved)
