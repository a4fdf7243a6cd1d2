"""SetOnHand (issue 12): cycle counts from the WMS, on both stores.

What is pinned: a count sets available to on_hand - reserved with holds present; the same
count id replays its stored answer and changes nothing, another count under it conflicts; a
count older than the last applied one is refused; bad input is INVALID_ARGUMENT with field
violations and changes nothing; a count below reserved is stored negative and flagged (event,
metric, log line, StockLevel.oversold), Reserve refuses, and a release brings it back;
reconcile reports 0 drift after counts; `stockhold stock count` through a running server.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from stockhold_fixtures import (
    Factory,
    Running,
    add_stock,
    expect_error,
    is_cluster,
    line,
    snapshot,
    spans_slots,
    unit,
    wait_settled,
)
from test_cli_policy import stockhold_cli
from test_reconcile import cli, drift_rows

from stockhold import constants as c
from stockhold import metrics
from stockhold.timeparse import parse_rfc3339
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

T1 = "2026-12-02T10:00:00+08:00"
T1_UTC = "2026-12-02T02:00:00Z"  # the same instant
T2 = "2026-12-02T11:00:00+08:00"


def count(
    count_id: str,
    sku: str,
    warehouse: str,
    on_hand: int,
    counted_at: str = T1,
    spec: str = "",
    barcode: str = "",
) -> pb.SetOnHandRequest:
    return pb.SetOnHandRequest(
        count_id=count_id,
        unit=unit(sku, spec, barcode),
        warehouse=warehouse,
        on_hand=on_hand,
        counted_at=counted_at,
    )


async def level(stub: pb_grpc.InventoryStub, sku: str, warehouse: str) -> pb.StockLevel:
    reply = await stub.GetAvailability(pb.GetAvailabilityRequest(units=[unit(sku)]))
    (found,) = [lv for lv in reply.levels if lv.warehouse == warehouse]
    return found


def counted_events(running: Running, sku: str) -> list[dict[str, Any]]:
    """(fields, data) of every STOCK_COUNTED event in the SKU's partition stream."""
    resolver = running.server.engine.resolver
    key = resolver.events_key(resolver.unit(sku, "", "").partition)
    out = []
    for _, fields in running.redis.client().xrange(key):
        if fields[b"type"] == c.EVENT_COUNTED.encode():
            out.append({k.decode(): v.decode() for k, v in fields.items()})
    return out


def oversold_total() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("stockhold_oversold_counts_total") or 0.0


async def test_count_sets_available_to_on_hand_minus_reserved_with_holds_present(
    stockhold: Running, stub: pb_grpc.InventoryStub
) -> None:
    await add_stock(stub, "TEE", "wh-east", 10)
    await add_stock(stub, "TEE", "wh-south", 4)
    await stub.Reserve(pb.ReserveRequest(order_id="o-1", lines=[line("TEE", 3, "wh-east")]))

    reply = await stub.SetOnHand(count("cnt-1", "TEE", "wh-east", 8))
    assert (reply.replayed, reply.previous_on_hand, reply.oversold) == (False, 10, False)
    got = reply.level
    assert (got.on_hand, got.available, got.reserved, got.oversold) == (8, 5, 3, False)
    assert (got.unit.sku, got.warehouse) == ("TEE", "wh-east")
    now = await level(stub, "TEE", "wh-east")
    assert (now.on_hand, now.available, now.reserved, now.oversold) == (8, 5, 3, False)
    assert (await level(stub, "TEE", "wh-south")).available == 4  # another warehouse: as it was

    stock_key = stockhold.server.engine.resolver.unit("TEE", "", "").stock_key
    stored = stockhold.redis.client().hgetall(stock_key)
    assert stored[f"{c.FIELD_COUNTED}wh-east".encode()] == str(parse_rfc3339(T1)).encode()
    (event,) = counted_events(stockhold, "TEE")
    assert (event["adjustment_id"], event["actor"]) == ("cnt-1", c.ACTOR_ANONYMOUS)
    assert json.loads(event["data"]) == {
        "sku": "TEE",
        "spec": "",
        "barcode": "",
        "warehouse": "wh-east",
        "count_id": "cnt-1",
        "counted_at": parse_rfc3339(T1),
        "on_hand": 8,
        "previous_on_hand": 10,
        "reserved": 3,
        "available": 5,
        "oversold": False,
    }
    # The holds are untouched: releasing gives back exactly what was held.
    await stub.Release(pb.ReleaseRequest(order_id="o-1"))
    now = await level(stub, "TEE", "wh-east")
    assert (now.on_hand, now.available, now.reserved) == (8, 8, 0)


async def test_count_of_a_new_unit_creates_its_stock(stub: pb_grpc.InventoryStub) -> None:
    reply = await stub.SetOnHand(count("cnt-new", "NEW", "wh-east", 6))
    assert (reply.previous_on_hand, reply.level.available, reply.level.reserved) == (0, 6, 0)
    await stub.Reserve(pb.ReserveRequest(order_id="o-new", lines=[line("NEW", 6)]))
    assert (await level(stub, "NEW", "wh-east")).available == 0


async def test_same_count_id_replays_the_stored_answer_and_changes_nothing(
    stockhold: Running, stub: pb_grpc.InventoryStub
) -> None:
    await add_stock(stub, "TEE", "wh-east", 10)
    first = await stub.SetOnHand(count("cnt-1", "TEE", "wh-east", 7))
    await stub.Reserve(pb.ReserveRequest(order_id="o-1", lines=[line("TEE", 2, "wh-east")]))
    before = await snapshot(stockhold.redis)
    # The same count, counted_at written in another zone (the same instant): its stored answer
    # (the level it left then, not now), nothing written.
    again = await stub.SetOnHand(count("cnt-1", "TEE", "wh-east", 7, T1_UTC))
    assert again.replayed is True
    assert (again.level, again.previous_on_hand, again.oversold) == (
        first.level,
        first.previous_on_hand,
        first.oversold,
    )
    assert await snapshot(stockhold.redis) == before
    assert len(counted_events(stockhold, "TEE")) == 1


async def test_same_count_id_with_another_count_conflicts_and_changes_nothing(
    stockhold: Running, stub: pb_grpc.InventoryStub
) -> None:
    await add_stock(stub, "TEE", "wh-east", 10)
    await stub.SetOnHand(count("cnt-1", "TEE", "wh-east", 7))
    before = await snapshot(stockhold.redis)
    for other in (
        count("cnt-1", "TEE", "wh-east", 8),
        count("cnt-1", "TEE", "wh-east", 7, T2),
        count("cnt-1", "TEE", "wh-south", 7),
    ):
        err = await expect_error(stub.SetOnHand(other))
        assert (err.code, err.reason) == (grpc.StatusCode.ALREADY_EXISTS, "COUNT_CONFLICT")
        assert err.metadata["count_id"] == "cnt-1"
    assert await snapshot(stockhold.redis) == before


async def test_an_older_count_is_refused_as_stale_and_changes_nothing(
    stockhold: Running, stub: pb_grpc.InventoryStub
) -> None:
    await add_stock(stub, "TEE", "wh-east", 10)
    await stub.SetOnHand(count("cnt-late", "TEE", "wh-east", 7, T2))
    before = await snapshot(stockhold.redis)
    err = await expect_error(stub.SetOnHand(count("cnt-early", "TEE", "wh-east", 9, T1)))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "STALE_COUNT")
    assert err.metadata["last_counted_at_ms"] == str(parse_rfc3339(T2))
    assert parse_rfc3339(err.metadata["last_counted_at"]) == parse_rfc3339(T2)
    assert (err.metadata["count_id"], err.metadata["warehouse"]) == ("cnt-early", "wh-east")
    assert await snapshot(stockhold.redis) == before
    # Another warehouse has its own last count; the same instant again is not older.
    await stub.SetOnHand(count("cnt-south", "TEE", "wh-south", 3, T1))
    reply = await stub.SetOnHand(count("cnt-same", "TEE", "wh-east", 6, T2))
    assert reply.level.available == 6
    # The refused count id was never recorded: it can be used once its time is right.
    reply = await stub.SetOnHand(count("cnt-early", "TEE", "wh-east", 9, T2))
    assert reply.level.available == 9 and not reply.replayed


@pytest.mark.parametrize(
    ("request_fields", "fields"),
    [
        ({"counted_at": "2026-12-02T10:00:00"}, {"counted_at"}),  # naive: no offset
        ({"counted_at": ""}, {"counted_at"}),
        ({"counted_at": "yesterday"}, {"counted_at"}),
        ({"counted_at": "3000-01-01T00:00:00Z"}, {"counted_at"}),
        ({"counted_at": "1969-12-31T23:59:59Z"}, {"counted_at"}),
        ({"count_id": ""}, {"count_id"}),
        ({"count_id": "x" * 129}, {"count_id"}),
        ({"unit": unit("")}, {"unit.sku"}),
        ({"warehouse": ""}, {"warehouse"}),
        ({"on_hand": -1}, {"on_hand"}),
        ({"on_hand": c.MAX_DELTA + 1}, {"on_hand"}),
        (
            {"count_id": "", "warehouse": "", "on_hand": -5, "counted_at": "2026-12-02 10:00"},
            {"count_id", "warehouse", "on_hand", "counted_at"},
        ),
    ],
)
async def test_bad_input_is_invalid_argument_and_changes_nothing(
    stockhold: Running,
    stub: pb_grpc.InventoryStub,
    request_fields: dict[str, Any],
    fields: set[str],
) -> None:
    await add_stock(stub, "TEE", "wh-east", 10)
    before = await snapshot(stockhold.redis)
    request = count("cnt-bad", "TEE", "wh-east", 5)
    for name, value in request_fields.items():
        if name == "unit":
            request.unit.CopyFrom(value)
        else:
            setattr(request, name, value)
    err = await expect_error(stub.SetOnHand(request))
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert set(err.violations) == fields
    assert await snapshot(stockhold.redis) == before
    # Nothing was recorded under the id: the good count goes through.
    reply = await stub.SetOnHand(count("cnt-bad", "TEE", "wh-east", 5))
    assert not reply.replayed and reply.level.available == 5


async def test_oversold_count_is_stored_negative_flagged_and_recovers(
    stockhold: Running, stub: pb_grpc.InventoryStub, caplog: pytest.LogCaptureFixture
) -> None:
    metrics.enable()
    total = oversold_total()
    await add_stock(stub, "TEE", "wh-east", 10)
    await stub.Reserve(pb.ReserveRequest(order_id="o-1", lines=[line("TEE", 4, "wh-east")]))
    await stub.Reserve(pb.ReserveRequest(order_id="o-2", lines=[line("TEE", 2, "wh-east")]))

    with caplog.at_level(logging.WARNING, logger="stockhold.counts"):
        reply = await stub.SetOnHand(count("cnt-1", "TEE", "wh-east", 3))
    assert reply.oversold and not reply.replayed
    got = reply.level
    assert (got.on_hand, got.available, got.reserved, got.oversold) == (3, -3, 6, True)
    assert oversold_total() == total + 1
    (record,) = [r for r in caplog.records if r.name == "stockhold.counts"]
    assert record.levelno == logging.WARNING
    logged = tuple(getattr(record, k) for k in ("unit", "warehouse", "on_hand", "reserved"))
    assert logged == ("TEE::", "wh-east", 3, 6)
    (event,) = counted_events(stockhold, "TEE")
    data = json.loads(event["data"])
    assert (data["available"], data["reserved"], data["on_hand"], data["oversold"]) == (
        -3,
        6,
        3,
        True,
    )
    now = await level(stub, "TEE", "wh-east")
    assert (now.available, now.oversold) == (-3, True)
    # A replay is not counted again.
    assert (await stub.SetOnHand(count("cnt-1", "TEE", "wh-east", 3))).replayed
    assert oversold_total() == total + 1

    # Reserve refuses, with available reported as is (order ids in several partitions: on a
    # cluster some orders span slots), and an order letting stockhold allocate finds nothing.
    ids = [f"o-x{n}" for n in range(6)]
    assert any(spans_slots(stockhold, o, "TEE") for o in ids) == is_cluster(stockhold.redis)
    for oid in ids:
        request = pb.ReserveRequest(order_id=oid, lines=[line("TEE", 1, "wh-east")])
        err = await expect_error(stub.Reserve(request))
        assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_STOCK")
        assert err.metadata["available"] == "-3"
    err = await expect_error(
        stub.Reserve(pb.ReserveRequest(order_id="o-auto", lines=[line("TEE", 1)]))
    )
    assert (err.reason, err.metadata["available"]) == ("INSUFFICIENT_STOCK", "0")
    # Shrinkage making it more negative is refused; a receipt is taken (still oversold).
    err = await expect_error(add_stock(stub, "TEE", "wh-east", -1))
    assert err.reason == "INSUFFICIENT_STOCK"
    got = (await add_stock(stub, "TEE", "wh-east", 1)).level
    assert (got.available, got.reserved, got.oversold) == (-2, 6, True)
    # Commit takes the sold units off on hand; release gives the held ones back.
    await stub.Commit(pb.CommitRequest(order_id="o-2"))
    now = await level(stub, "TEE", "wh-east")
    assert (now.on_hand, now.available, now.reserved, now.oversold) == (2, -2, 4, True)
    await stub.Release(pb.ReleaseRequest(order_id="o-1"))
    now = await level(stub, "TEE", "wh-east")
    assert (now.on_hand, now.available, now.reserved, now.oversold) == (2, 2, 0, False)
    await stub.Reserve(pb.ReserveRequest(order_id="o-4", lines=[line("TEE", 2, "wh-east")]))


async def test_reconcile_reports_no_drift_after_counts(
    make_stockhold: Factory, tmp_path: Path
) -> None:
    running = await make_stockhold()
    snap = tmp_path / "snap.jsonl"
    skus = [f"K{i}" for i in range(6)]
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        for sku in skus:
            await add_stock(stub, sku, "wh-east", 20)
        for i, sku in enumerate(skus):
            await stub.Reserve(pb.ReserveRequest(order_id=f"a-{i}", lines=[line(sku, 5)]))
        await wait_settled(running.redis)
        code, _, err = await cli(running, "snapshot", "--out", str(snap))
        assert code == 0, err
        # Counts after the snapshot, with holds present: one above, one below reserved
        # (oversold), then more holds, commits and releases, and a later count.
        await stub.SetOnHand(count("k-0", skus[0], "wh-east", 30))
        oversold = await stub.SetOnHand(count("k-1", skus[1], "wh-east", 2))
        assert oversold.oversold
        for i, sku in enumerate(skus[2:], 2):
            await stub.Reserve(
                pb.ReserveRequest(order_id=f"b-{i}", lines=[line(sku, 1), line(skus[0], 1)])
            )
        await stub.Commit(pb.CommitRequest(order_id="a-0"))
        await stub.Release(pb.ReleaseRequest(order_id="a-2"))
        await stub.SetOnHand(count("k-0b", skus[0], "wh-east", 12, T2))
        await stub.SetOnHand(count("k-2", skus[2], "wh-south", 4))
        await add_stock(stub, skus[1], "wh-east", 1)
        await wait_settled(running.redis)
        assert (await level(stub, skus[1], "wh-east")).available == -2
    for args in (("--snapshot", str(snap)), ()):
        code, out, err = await cli(running, "reconcile", *args)
        assert code == 0, (args, out, err)
        assert drift_rows(out) == [] and " 0 drifting" in out


async def test_stock_count_through_the_cli(stockhold: Running, stub: pb_grpc.InventoryStub) -> None:
    await add_stock(stub, "TEE", "wh-east", 10, spec="red", barcode="690")
    argv = [
        *("stock", "count", "--count-id", "cli-1", "--sku", "TEE", "--spec", "red"),
        *("--barcode", "690", "--warehouse", "wh-east", "--on-hand", "4", "--counted-at", T1),
    ]
    code, out, err = await stockhold_cli(stockhold, *argv)
    assert code == 0, err
    reply = json.loads(out)
    assert (reply["replayed"], reply["previous_on_hand"], reply["oversold"]) == (False, "10", False)
    assert (reply["level"]["available"], reply["level"]["on_hand"]) == ("4", "4")
    code, out, err = await stockhold_cli(stockhold, *argv)
    assert code == 0, err
    assert json.loads(out)["replayed"] is True
    tail = ["events", "tail", "--from", "earliest", "--type", "STOCK_COUNTED"]
    code, out, err = await stockhold_cli(stockhold, *tail, "--warehouse", "wh-east", "--count", "1")
    assert code == 0, err
    (event,) = [json.loads(x) for x in out.splitlines()]
    assert (event["type"], event["adjustment_id"]) == ("STOCK_COUNTED", "cli-1")
    assert (event["data"]["on_hand"], event["data"]["previous_on_hand"]) == (4, 10)
    naive = [*argv[:-1], "2026-12-02T10:00:00"]
    naive[argv.index("cli-1")] = "cli-2"
    code, out, err = await stockhold_cli(stockhold, *naive)
    assert code == 1 and "counted_at" in err and "INVALID_ARGUMENT" in err
