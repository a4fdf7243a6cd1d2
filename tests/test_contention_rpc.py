"""GetContentionStats (issue 4): per sales unit, merged over every process through Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from stockhold_fixtures import Running, add_stock, expect_error, is_cluster, line
from test_workers import _children, _sockets_on, serve_workers

from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

HOT = pb.SalesUnit(sku="PHONE", spec="128GB", barcode="690{1}:x")  # key syntax in user text


async def load(stubs: list[pb_grpc.InventoryStub], hot_calls: int, cold_units: int) -> None:
    """Stock, then hot_calls Reserves of HOT and one Reserve each of cold_units other units."""
    stub = stubs[0]
    await add_stock(stub, HOT.sku, "w1", 100_000, spec=HOT.spec, barcode=HOT.barcode)
    for i in range(cold_units):
        await add_stock(stub, f"C{i}", "w1", 10)

    async def reserve(k: int, oid: str, ln: pb.ReserveLine) -> None:
        await stubs[k % len(stubs)].Reserve(pb.ReserveRequest(order_id=oid, lines=[ln]), timeout=10)

    hot = [
        reserve(i, f"h-{i}", line(HOT.sku, 1, spec=HOT.spec, barcode=HOT.barcode))
        for i in range(hot_calls)
    ]
    cold = [reserve(i, f"c-{i}", line(f"C{i}", 1)) for i in range(cold_units)]
    # Interleaved, all at once: the hot unit's requests overlap one another.
    calls = [c for pair in zip(hot, cold + [None] * len(hot), strict=False) for c in pair if c]
    await asyncio.gather(*calls)


def by_key(resp: pb.GetContentionStatsResponse) -> dict[str, pb.KeyContention]:
    return {k.unit.sku + "/" + k.unit.spec + "/" + k.unit.barcode: k for k in resp.keys}


async def test_hot_unit_ranks_first_with_exact_counts_in_one_process(
    stockhold: Running, stub: pb_grpc.InventoryStub
) -> None:
    await load([stub], hot_calls=200, cold_units=50)
    # The insufficient refusal is counted against its unit.
    await add_stock(stub, "EMPTY", "w1", 1)
    short = pb.ReserveRequest(order_id="x", lines=[line("EMPTY", 5)])
    err = await expect_error(stub.Reserve(short))
    assert err.reason == "INSUFFICIENT_STOCK"

    resp = await stub.GetContentionStats(pb.GetContentionStatsRequest(top_n=100))
    assert resp.processes == 1 and resp.skipped == 0
    assert resp.flag_ms == 200
    assert resp.window.seconds == 60
    first = resp.keys[0]
    assert (first.unit.sku, first.unit.spec, first.unit.barcode) == (HOT.sku, HOT.spec, HOT.barcode)
    assert first.requests == 200 and first.timeouts == 0 and first.errors == 0
    assert first.contended > 0  # 200 at once: most found another one queued or in flight
    assert first.wait_max_ms >= first.wait_p99_ms >= first.wait_p50_ms >= 0
    assert not first.estimated
    keys = by_key(resp)
    assert all(keys[f"C{i}//"].requests == 1 for i in range(50))
    assert keys["EMPTY//"].insufficient == 1
    assert sum(k.requests for k in resp.keys) == 200 + 50 + 1

    top3 = await stub.GetContentionStats(pb.GetContentionStatsRequest(top_n=3))
    assert len(top3.keys) == 3 and top3.keys[0].key == first.key
    since = await stub.GetContentionStats(pb.GetContentionStatsRequest(since_start=True))
    assert since.keys[0].requests == 200 and not since.HasField("window")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GetContentionStatsRequest(top_n=1001), "top_n"),
        (pb.GetContentionStatsRequest(top_n=-1), "top_n"),
        (pb.GetContentionStatsRequest(window=Duration(seconds=61)), "window"),
        (pb.GetContentionStatsRequest(window=Duration(seconds=0)), "window"),
        (pb.GetContentionStatsRequest(window=Duration(seconds=5), since_start=True), "window"),
        # beyond timedelta's range: was UNKNOWN (OverflowError), found by tests/test_fuzz.py
        (pb.GetContentionStatsRequest(window=Duration(seconds=2**63 - 1)), "window"),
        (pb.GetContentionStatsRequest(window=Duration(seconds=-(2**63))), "window"),
        (pb.GetContentionStatsRequest(window=Duration(seconds=1, nanos=-(2**31))), "window"),
    ],
)
async def test_bad_stats_request_is_refused_with_field_details(
    stub: pb_grpc.InventoryStub, request_: pb.GetContentionStatsRequest, field: str
) -> None:
    err = await expect_error(stub.GetContentionStats(request_))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.violations


async def test_sku_hint_names_a_sku_with_several_hot_units(
    stockhold: Running, stub: pb_grpc.InventoryStub
) -> None:
    for spec in ("red", "blue"):
        await add_stock(stub, "SHOE", "w1", 1000, spec=spec)
    for i in range(20):
        await add_stock(stub, f"Z{i}", "w1", 10)
    calls = [
        stub.Reserve(pb.ReserveRequest(order_id=f"{spec}-{i}", lines=[line("SHOE", 1, spec=spec)]))
        for i in range(60)
        for spec in ("red", "blue")
    ]
    calls += [
        stub.Reserve(pb.ReserveRequest(order_id=f"z-{i}", lines=[line(f"Z{i}", 1)]))
        for i in range(20)
    ]
    await asyncio.gather(*calls)
    resp = await stub.GetContentionStats(pb.GetContentionStatsRequest(top_n=22))
    assert resp.sku_hints[0].sku == "SHOE"
    assert sorted(resp.sku_hints[0].keys) == ["SHOE:blue:", "SHOE:red:"]


# -- across worker processes --------------------------------------------------------------------


@pytest.fixture
def two_workers(redis_proc: Any, tmp_path: Path) -> Iterator[tuple[int, int]]:
    env = {"STOCKHOLD_CONTENTION_FLUSH_SECONDS": "0.2"}
    if is_cluster(redis_proc):
        env["STOCKHOLD_REDIS_CLUSTER"] = "true"
    with serve_workers(redis_proc.url, tmp_path / "serve.log", env=env) as (proc, port):
        yield proc.pid, port


async def test_counts_are_aggregated_across_two_worker_processes(
    two_workers: tuple[int, int],
) -> None:
    parent, port = two_workers
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(16)]
    try:
        stubs = [pb_grpc.InventoryStub(ch) for ch in channels]
        for s in stubs:  # connect every channel before the load, so both workers get some
            await s.GetAvailability(pb.GetAvailabilityRequest(units=[HOT]), timeout=5)
        # Both workers hold some of the connections, so both serve part of the load.
        per_worker = {pid: _sockets_on(pid, port) for pid in _children(parent)}
        assert len(per_worker) == 2 and all(per_worker.values()), per_worker
        await load(stubs, hot_calls=320, cold_units=80)
        resp = pb.GetContentionStatsResponse()
        for _ in range(50):  # snapshots are published every 0.2 s
            resp = await stubs[0].GetContentionStats(pb.GetContentionStatsRequest(top_n=200))
            if resp.processes == 2 and sum(k.requests for k in resp.keys) == 400:
                break
            await asyncio.sleep(0.1)
        assert resp.processes == 2
        first = resp.keys[0]
        assert (first.unit.sku, first.unit.barcode) == (HOT.sku, HOT.barcode)
        assert first.requests == 320
        keys = by_key(resp)
        assert all(keys[f"C{i}//"].requests == 1 for i in range(80))
        assert sum(k.requests for k in resp.keys) == 400
    finally:
        for ch in channels:
            await ch.close()
