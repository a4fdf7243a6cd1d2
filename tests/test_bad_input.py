"""Malformed requests: INVALID_ARGUMENT with BadRequest field paths, and Redis unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from stockhold_fixtures import add_stock, expect_error, levels, line, snapshot, unit

from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

MAX_HOLD = 30 * 86_400  # Settings.max_hold_seconds default
EXISTING = "o-existing"


def reserve(
    order_id: str = "o-new",
    lines: list[pb.ReserveLine] | None = None,
    hold_seconds: int = 0,
) -> tuple[str, Any]:
    return "Reserve", pb.ReserveRequest(
        order_id=order_id,
        lines=[line("apple", 1, "w1")] if lines is None else lines,
        hold_seconds=hold_seconds,
    )


def reserve_line(**kw: Any) -> tuple[str, Any]:
    """A Reserve whose 4th line (index 3) is built from `kw`; the other three are fine."""
    fields: dict[str, Any] = {"sku": "apple", "qty": 1, "warehouse": "w1", **kw}
    good = line("apple", 1, "w1")
    bad = line(
        fields["sku"],
        fields["qty"],
        fields["warehouse"],
        fields.get("spec", ""),
        fields.get("barcode", ""),
    )
    return reserve(lines=[good, line("pear", 1, "w1"), good, bad])


def commit(order_id: str = EXISTING, payment_ref: str = "") -> tuple[str, Any]:
    return "Commit", pb.CommitRequest(order_id=order_id, payment_ref=payment_ref)


def release(order_id: str = EXISTING, reason: str = "") -> tuple[str, Any]:
    return "Release", pb.ReleaseRequest(order_id=order_id, reason=reason)


def get_reservation(order_id: str) -> tuple[str, Any]:
    return "GetReservation", pb.GetReservationRequest(order_id=order_id)


def availability(*units: pb.SalesUnit) -> tuple[str, Any]:
    return "GetAvailability", pb.GetAvailabilityRequest(units=list(units))


def adjust(
    adjustment_id: str = "adj-new",
    sku: str = "apple",
    warehouse: str = "w1",
    delta: int = 5,
    reason: str = "",
) -> tuple[str, Any]:
    return "AdjustStock", pb.AdjustStockRequest(
        adjustment_id=adjustment_id,
        unit=unit(sku),
        warehouse=warehouse,
        delta=delta,
        reason=reason,
    )


# (id, request builder, field path that must be among the violations)
CASES: list[tuple[str, Callable[[], tuple[str, Any]], str]] = [
    # -- Reserve: order_id
    ("reserve-order-id-empty", lambda: reserve(order_id=""), "order_id"),
    ("reserve-order-id-129", lambda: reserve(order_id="o" * 129), "order_id"),
    ("reserve-order-id-nul", lambda: reserve(order_id="o\x00x"), "order_id"),
    ("reserve-order-id-newline", lambda: reserve(order_id="o-1\n"), "order_id"),
    ("reserve-order-id-del", lambda: reserve(order_id="o\x7f"), "order_id"),
    # -- Reserve: unit text
    ("reserve-sku-empty", lambda: reserve_line(sku=""), "lines[3].unit.sku"),
    ("reserve-sku-65", lambda: reserve_line(sku="s" * 65), "lines[3].unit.sku"),
    ("reserve-sku-nul", lambda: reserve_line(sku="a\x00b"), "lines[3].unit.sku"),
    ("reserve-sku-newline", lambda: reserve_line(sku="apple\n"), "lines[3].unit.sku"),
    ("reserve-sku-del", lambda: reserve_line(sku="\x7f"), "lines[3].unit.sku"),
    ("reserve-spec-65", lambda: reserve_line(spec="x" * 65), "lines[3].unit.spec"),
    ("reserve-spec-tab", lambda: reserve_line(spec="red\tL"), "lines[3].unit.spec"),
    ("reserve-barcode-65", lambda: reserve_line(barcode="9" * 65), "lines[3].unit.barcode"),
    ("reserve-barcode-nul", lambda: reserve_line(barcode="\x00"), "lines[3].unit.barcode"),
    ("reserve-warehouse-65", lambda: reserve_line(warehouse="w" * 65), "lines[3].warehouse"),
    ("reserve-warehouse-newline", lambda: reserve_line(warehouse="w\n1"), "lines[3].warehouse"),
    # -- Reserve: quantity
    ("reserve-quantity-0", lambda: reserve_line(qty=0), "lines[3].quantity"),
    ("reserve-quantity-negative", lambda: reserve_line(qty=-1), "lines[3].quantity"),
    ("reserve-quantity-1000001", lambda: reserve_line(qty=1_000_001), "lines[3].quantity"),
    ("reserve-quantity-2e62", lambda: reserve_line(qty=2**62), "lines[3].quantity"),
    ("reserve-quantity-min-int64", lambda: reserve_line(qty=-(2**63)), "lines[3].quantity"),
    # -- Reserve: line count and hold
    ("reserve-0-lines", lambda: reserve(lines=[]), "lines"),
    (
        "reserve-101-lines",
        lambda: reserve(lines=[line(f"s{i}", 1, "w1") for i in range(101)]),
        "lines",
    ),
    ("reserve-hold-negative", lambda: reserve(hold_seconds=-1), "hold_seconds"),
    ("reserve-hold-min-int64", lambda: reserve(hold_seconds=-(2**63)), "hold_seconds"),
    ("reserve-hold-above-max", lambda: reserve(hold_seconds=MAX_HOLD + 1), "hold_seconds"),
    ("reserve-hold-2e62", lambda: reserve(hold_seconds=2**62), "hold_seconds"),
    # -- Commit
    ("commit-order-id-empty", lambda: commit(order_id=""), "order_id"),
    ("commit-order-id-129", lambda: commit(order_id="o" * 129), "order_id"),
    ("commit-order-id-nul", lambda: commit(order_id="\x00"), "order_id"),
    ("commit-payment-ref-129", lambda: commit(payment_ref="p" * 129), "payment_ref"),
    ("commit-payment-ref-newline", lambda: commit(payment_ref="p\n"), "payment_ref"),
    # -- Release
    ("release-order-id-empty", lambda: release(order_id=""), "order_id"),
    ("release-order-id-del", lambda: release(order_id="o-existing\x7f"), "order_id"),
    ("release-reason-257", lambda: release(reason="r" * 257), "reason"),
    ("release-reason-nul", lambda: release(reason="r\x00"), "reason"),
    # -- GetReservation
    ("get-order-id-empty", lambda: get_reservation(""), "order_id"),
    ("get-order-id-129", lambda: get_reservation("o" * 129), "order_id"),
    ("get-order-id-newline", lambda: get_reservation("\n"), "order_id"),
    # -- GetAvailability
    ("availability-0-units", lambda: availability(), "units"),
    ("availability-501-units", lambda: availability(*(unit(f"s{i}") for i in range(501))), "units"),
    ("availability-sku-empty", lambda: availability(unit("apple"), unit("")), "units[1].sku"),
    ("availability-spec-65", lambda: availability(unit("apple", "x" * 65)), "units[0].spec"),
    (
        "availability-barcode-del",
        lambda: availability(unit("apple", "", "\x7f")),
        "units[0].barcode",
    ),
    # -- AdjustStock
    ("adjust-id-empty", lambda: adjust(adjustment_id=""), "adjustment_id"),
    ("adjust-id-129", lambda: adjust(adjustment_id="a" * 129), "adjustment_id"),
    ("adjust-id-nul", lambda: adjust(adjustment_id="a\x00"), "adjustment_id"),
    ("adjust-sku-empty", lambda: adjust(sku=""), "unit.sku"),
    ("adjust-sku-65", lambda: adjust(sku="s" * 65), "unit.sku"),
    ("adjust-warehouse-empty", lambda: adjust(warehouse=""), "warehouse"),
    ("adjust-warehouse-65", lambda: adjust(warehouse="w" * 65), "warehouse"),
    ("adjust-warehouse-newline", lambda: adjust(warehouse="w1\n"), "warehouse"),
    ("adjust-delta-0", lambda: adjust(delta=0), "delta"),
    ("adjust-delta-2e40", lambda: adjust(delta=2**40), "delta"),
    ("adjust-delta-minus-2e40", lambda: adjust(delta=-(2**40)), "delta"),
    ("adjust-delta-1e9-plus-1", lambda: adjust(delta=1_000_000_001), "delta"),
    ("adjust-delta-min-int64", lambda: adjust(delta=-(2**63)), "delta"),
    ("adjust-reason-257", lambda: adjust(reason="r" * 257), "reason"),
    ("adjust-reason-newline", lambda: adjust(reason="r\n"), "reason"),
]


@pytest.mark.parametrize(("build", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_bad_input_is_invalid_argument_with_field_path_and_writes_nothing(
    stub: pb_grpc.InventoryStub, redis_proc: Any, build: Callable[[], tuple[str, Any]], field: str
) -> None:
    # Some state worth protecting: stock, a held order, a stored adjustment, events.
    await add_stock(stub, "apple", "w1", 10, adjustment_id="adj-existing")
    await stub.Reserve(pb.ReserveRequest(order_id=EXISTING, lines=[line("apple", 2, "w1")]))
    rpc, request = build()
    before = await snapshot(redis_proc)

    err = await expect_error(getattr(stub, rpc)(request))

    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.reason == "INVALID_ARGUMENT"
    assert field in err.violations, f"{field!r} not in {sorted(err.violations)}"
    assert all(err.violations.values()), "every violation says what is wrong"
    assert await snapshot(redis_proc) == before


async def test_every_bad_field_of_a_request_is_reported_at_once(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    before = await snapshot(redis_proc)
    request = pb.ReserveRequest(
        order_id="",
        lines=[line("apple", 1, "w1"), line("", 0, "w\n"), line("pear", 2_000_000, "w1")],
        hold_seconds=-5,
    )

    err = await expect_error(stub.Reserve(request))

    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {
        "order_id",
        "hold_seconds",
        "lines[1].unit.sku",
        "lines[1].warehouse",
        "lines[1].quantity",
        "lines[2].quantity",
    } <= set(err.violations)
    assert not any(f.startswith("lines[0]") for f in err.violations)
    assert await snapshot(redis_proc) == before


# -- the bounds themselves are valid -------------------------------------------------------------


async def test_values_at_the_bounds_are_accepted(stub: pb_grpc.InventoryStub) -> None:
    sku, spec, barcode, wh = "s" * 64, "p" * 64, "b" * 64, "w" * 64
    await add_stock(
        stub, sku, wh, 1_000_000_000, spec=spec, barcode=barcode, adjustment_id="a" * 128
    )
    await add_stock(stub, "apple", "w1", 100)

    big = await stub.Reserve(
        pb.ReserveRequest(
            order_id="o" * 128,
            lines=[line(sku, 1_000_000, wh, spec=spec, barcode=barcode)],
            hold_seconds=MAX_HOLD,
        )
    )
    many = await stub.Reserve(
        pb.ReserveRequest(order_id="o-100", lines=[line("apple", 1, "w1")] * 100, hold_seconds=1)
    )
    committed = await stub.Commit(pb.CommitRequest(order_id="o" * 128, payment_ref="p" * 128))
    released = await stub.Release(pb.ReleaseRequest(order_id="o-100", reason="r" * 256))
    shrink = await stub.AdjustStock(
        pb.AdjustStockRequest(
            adjustment_id="shrink", unit=unit("apple"), warehouse="w1", delta=-100, reason="r" * 256
        )
    )

    r = big.reservation
    assert r.expires_at.ToMilliseconds() - r.created_at.ToMilliseconds() == MAX_HOLD * 1000
    assert [a.quantity for a in many.reservation.allocations] == [100]
    assert committed.reservation.payment_ref == "p" * 128
    assert released.reservation.release_reason == "r" * 256
    assert shrink.level.available == 0
    assert await levels(stub, unit(sku, spec, barcode)) == {
        (sku, spec, barcode, wh): (999_000_000, 999_000_000, 0)
    }


async def test_unicode_printable_text_is_accepted(stub: pb_grpc.InventoryStub) -> None:
    sku, spec, barcode, wh = "商品-ß-🍎", "größe L", "№ 42", "仓库 1"
    await add_stock(stub, sku, wh, 3, spec=spec, barcode=barcode, adjustment_id="调整-1")

    resp = await stub.Reserve(
        pb.ReserveRequest(order_id="订单-1", lines=[line(sku, 2, wh, spec=spec, barcode=barcode)])
    )

    assert resp.reservation.order_id == "订单-1"
    assert await levels(stub, unit(sku, spec, barcode)) == {(sku, spec, barcode, wh): (3, 1, 2)}


async def test_ids_with_braces_and_colons_are_valid_data(
    stub: pb_grpc.InventoryStub, redis_proc: Any
) -> None:
    """Braces and colons are key syntax inside Redis, but plain data on the wire."""
    sku, wh = "{sku}:x", "{wh}"
    adj = await stub.AdjustStock(
        pb.AdjustStockRequest(
            adjustment_id="{adj}:1", unit=unit(sku, "{spec}", "}{"), warehouse=wh, delta=5
        )
    )
    assert not adj.replayed
    for oid in ("{order}", "{p0}:order:1", "}:{"):
        resp = await stub.Reserve(
            pb.ReserveRequest(order_id=oid, lines=[line(sku, 1, wh, spec="{spec}", barcode="}{")])
        )
        assert resp.reservation.order_id == oid
        assert resp.reservation.allocations[0].unit.sku == sku
        assert resp.reservation.allocations[0].warehouse == wh

    assert (await stub.GetReservation(pb.GetReservationRequest(order_id="{order}"))).order_id == (
        "{order}"
    )
    assert (await stub.Commit(pb.CommitRequest(order_id="{p0}:order:1"))).reservation.state == (
        pb.RESERVATION_STATE_COMMITTED
    )
    assert (await stub.Release(pb.ReleaseRequest(order_id="}:{"))).reservation.state == (
        pb.RESERVATION_STATE_RELEASED
    )
    again = await stub.AdjustStock(
        pb.AdjustStockRequest(
            adjustment_id="{adj}:1", unit=unit(sku, "{spec}", "}{"), warehouse=wh, delta=5
        )
    )
    assert again.replayed
    assert await levels(stub, unit(sku, "{spec}", "}{")) == {(sku, "{spec}", "}{", wh): (4, 3, 1)}
    # User braces never become a second hash tag in a key.
    for key in redis_proc.dump():
        assert key.count(b"{") == 1 and key.count(b"}") == 1, key
