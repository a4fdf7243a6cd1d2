"""`stockhold snapshot` and `stockhold reconcile` (issue 12): counters checked against the events.

What is pinned, on both stores: after a Reserve/Commit/Release/AdjustStock load through a
running server, a snapshot, more load (and a snapshot taken while load runs; 1 s holds expire
meanwhile), reconcile reports 0 drift, with and without the snapshot; three counters corrupted
directly in Redis are reported exactly, with their expected and actual figures; `--repair`
sets them back with exactly one STOCK_REPAIRED event each; reconcile then reports 0 drift
again.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import pytest
from stockhold_fixtures import (
    Factory,
    Running,
    add_stock,
    is_cluster,
    line,
    wait_settled,
)

from stockhold import constants as c
from stockhold.events import decode_cursor, parse_id
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

SKUS = [f"R{i}" for i in range(10)]
WAREHOUSES = ("wh-east", "wh-south")


async def cli(running: Running, *argv: str) -> tuple[int, str, str]:
    """`stockhold <argv> --redis-url ... --partitions ...` in a subprocess (bounded)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKHOLD_")}
    flags = ["--redis-url", running.redis.url, "--partitions", str(running.settings.partitions)]
    if is_cluster(running.redis):
        flags.append("--redis-cluster")
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "stockhold.cli", *argv, *flags),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def drift_rows(out: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in out.splitlines() if x.startswith("{")]


async def load(
    stub: pb_grpc.InventoryStub, rng: random.Random, tag: str, orders: int, hold: int = 0
) -> list[str]:
    """Reserves of 1-3 lines (some split over both warehouses), then a commit, a release, or
    the hold left HELD (for `hold` seconds when given: the ids returned); a receipt now and
    then."""
    left: list[str] = []
    for n in range(orders):
        oid = f"{tag}-{n}"
        picks = rng.sample(SKUS, rng.randint(1, 3))
        lines = [line(s, rng.randint(1, 3), rng.choice(("", *WAREHOUSES))) for s in picks]
        step = n % 4
        held_for = hold if step == 3 else 0
        await stub.Reserve(pb.ReserveRequest(order_id=oid, lines=lines, hold_seconds=held_for))
        if held_for:
            left.append(oid)
        if step in (0, 1):
            await stub.Commit(pb.CommitRequest(order_id=oid))
        elif step == 2:
            await stub.Release(pb.ReleaseRequest(order_id=oid, reason="test"))
        if n % 7 == 0:
            await add_stock(stub, rng.choice(SKUS), rng.choice(WAREHOUSES), rng.randint(1, 5))
    return left


def repaired_events(running: Running) -> list[dict[str, Any]]:
    client = running.redis.client()
    resolver = running.server.engine.resolver
    out = []
    for p in range(running.settings.partitions):
        for _, fields in client.xrange(resolver.events_key(p)):
            if fields[b"type"] == c.EVENT_REPAIRED.encode():
                out.append(json.loads(fields[b"data"]))
    return out


async def test_snapshot_load_reconcile_corrupt_repair(
    make_stockhold: Factory, tmp_path: Path
) -> None:
    running = await make_stockhold()
    rng = random.Random(7)
    snap, live_snap = tmp_path / "snap.jsonl", tmp_path / "live.jsonl"
    resolver = running.server.engine.resolver
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        for sku in SKUS:
            for wh in WAREHOUSES:
                await add_stock(stub, sku, wh, 500)
        await asyncio.gather(*(load(stub, rng, f"a{w}", 25) for w in range(3)))
        await wait_settled(running.redis)
        code, out, err = await cli(running, "snapshot", "--out", str(snap))
        assert code == 0, err
        header = json.loads(snap.read_text().splitlines()[0])
        assert header["partitions"] == running.settings.partitions and header["cursor"]
        assert len(snap.read_text().splitlines()) == 1 + len(SKUS) * len(WAREHOUSES) + sum(
            1 for x in snap.read_text().splitlines()[1:] if '"part"' in x
        )

        # A snapshot taken while load runs: the positions account for the racing events. The
        # load runs until the snapshot is written, and a few orders past it.
        snapshot_done = asyncio.Event()
        started = asyncio.Event()
        expiring: list[str] = []

        async def steady(w: int) -> None:
            for n in range(400):
                expiring.extend(await load(stub, rng, f"b{w}-{n}", 4, hold=1))
                if n == 2:
                    started.set()
                if snapshot_done.is_set() and n > 10:
                    return

        loader = asyncio.gather(*(steady(w) for w in range(3)))
        await asyncio.wait_for(started.wait(), timeout=60)
        code, _, err = await cli(running, "snapshot", "--out", str(live_snap))
        snapshot_done.set()
        assert code == 0, err
        await loader
        # the 1 s holds expire (the sweeper, or GetReservation finding them due)
        assert expiring
        for oid in expiring:
            for _ in range(300):
                got = await stub.GetReservation(pb.GetReservationRequest(order_id=oid))
                if got.state == pb.RESERVATION_STATE_EXPIRED:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"{oid} never expired")
        await wait_settled(running.redis)
        cursors = [json.loads(f.read_text().splitlines()[0])["cursor"] for f in (snap, live_snap)]
        first, live = (decode_cursor(x, running.settings.partitions) for x in cursors)
        sync = running.redis.client()
        heads = []
        for p in range(running.settings.partitions):
            last = sync.xrevrange(resolver.events_key(p), count=1)
            heads.append(parse_id(last[0][0]) if last else (0, 0))
        assert first != live != heads  # events before and after the live snapshot

        for args in (("--snapshot", str(snap)), ("--snapshot", str(live_snap)), ()):
            code, out, err = await cli(running, "reconcile", *args)
            assert code == 0, (args, out, err)
            assert drift_rows(out) == [] and " 0 drifting" in out

        # Corrupt three counters directly in Redis.
        client = running.redis.client()
        before = (
            await stub.GetAvailability(
                pb.GetAvailabilityRequest(units=[pb.SalesUnit(sku=s) for s in SKUS[:3]])
            )
        ).levels
        held = {(lv.unit.sku, lv.warehouse): lv for lv in before}
        targets = [
            (SKUS[0], "wh-east", "available", 7),
            (SKUS[1], "wh-south", "available", -4),
            (SKUS[2], "wh-east", "reserved", 3),
        ]
        for sku, wh, counter, delta in targets:
            key = resolver.unit(sku, "", "").stock_key
            client.hincrby(key, f"{counter[0]}:{wh}", delta)

        code, out, err = await cli(running, "reconcile", "--snapshot", str(snap))
        assert code == 1, (out, err)
        rows = drift_rows(out)
        assert sorted((r["unit"], r["warehouse"], r["counter"]) for r in rows) == sorted(
            (f"{s}::", wh, counter) for s, wh, counter, _ in targets
        )
        for sku, wh, counter, delta in targets:
            (row,) = [r for r in rows if r["unit"] == f"{sku}::" and r["warehouse"] == wh]
            was = getattr(held[(sku, wh)], counter)
            assert (row["expected"], row["actual"]) == (was, was + delta)
        # Without a snapshot only reserved is checked (against the HELD holds).
        code, out, _ = await cli(running, "reconcile")
        assert code == 1
        assert [(r["unit"], r["counter"]) for r in drift_rows(out)] == [
            (f"{SKUS[2]}::", "reserved")
        ]

        code, out, err = await cli(running, "reconcile", "--snapshot", str(snap), "--repair")
        assert code == 0, (out, err)
        events = repaired_events(running)
        assert len(events) == 3
        assert sorted((e["sku"], e["warehouse"], e["counter"]) for e in events) == sorted(
            (s, wh, counter) for s, wh, counter, _ in targets
        )
        after = (
            await stub.GetAvailability(
                pb.GetAvailabilityRequest(units=[pb.SalesUnit(sku=s) for s in SKUS[:3]])
            )
        ).levels
        assert [(lv.available, lv.reserved) for lv in after] == [
            (lv.available, lv.reserved) for lv in before
        ]
        for args in (("--snapshot", str(snap)), ("--snapshot", str(live_snap)), ()):
            code, out, err = await cli(running, "reconcile", *args)
            assert code == 0, (args, out, err)
        # More load after the repair: still no drift from the old snapshot, no new repair.
        await load(stub, rng, "c", 12)
        await wait_settled(running.redis)
        code, out, err = await cli(running, "reconcile", "--snapshot", str(snap), "--repair")
        assert code == 0, (out, err)
        assert len(repaired_events(running)) == 3


async def test_bad_snapshot_is_refused(make_stockhold: Factory, tmp_path: Path) -> None:
    running = await make_stockhold()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"snapshot": 1, "cursor": "nope"}\n')
    code, _, err = await cli(running, "reconcile", "--snapshot", str(bad))
    assert code == 2 and "bad.jsonl" in err
