"""`stockhold migrate-layout`: data an earlier stockhold wrote in key layout 1 is served again.

Layout-1 data is made from layout-2 data the server wrote (stock, HELD and finished orders,
policies), converted by hand as layout 1 kept it: each stock hash in the partition of its
unit id, every SKU in one `{meta}:skus` index, no `{meta}:layout`. After the migration the
Redis must hold exactly what the server had written, and serve it as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from redis_proc import RedisProc
from stockhold_fixtures import TEST_SETTINGS, Running, add_stock, line, unit, without_heartbeat

from stockhold import constants as c
from stockhold.embedded import EmbeddedRedis
from stockhold.engine import PartitionMismatch
from stockhold.migrate import MIGRATING, Migration, Summary
from stockhold.server import StockholdServer
from stockhold.settings import Settings
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

P = TEST_SETTINGS["partitions"]
UNITS = [  # (sku, spec, barcode): key syntax and non-ASCII text included
    ("TEE", "red", "111"),
    ("TEE", "blue", "222"),
    ("MUG", "", ""),
    ("CAP:{x}", "s", "9%"),
    ("靴", "", "42"),
]
HELD = {"o-held-a": [(0, 2), (2, 1)], "o-held-b": [(3, 1), (4, 1)]}
FINISHED = {"o-commit": [(1, 3)], "o-release": [(2, 2)]}
POLICY_SKUS = ("MUG", "HAT")
CLI_TIMEOUT = 60.0


@contextlib.asynccontextmanager
async def serving(proc: RedisProc) -> AsyncIterator[Running]:
    """A stockhold server on `proc`, stopped on leaving (even one that refused the data)."""
    settings = Settings(**{**TEST_SETTINGS, "redis_url": proc.url})
    server = StockholdServer(settings, proc.url)
    port = await server.start()
    try:
        yield Running(server, settings, proc, f"127.0.0.1:{port}")
    finally:
        await server.stop(grace=0)


async def migrate_cli(*argv: str) -> tuple[int, str, str]:
    """`stockhold migrate-layout ARGV` as users run it: (exit status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKHOLD_")}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "stockhold.cli", "migrate-layout", *argv),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=CLI_TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def state(proc: RedisProc) -> dict[bytes, object]:
    """Every key and value, less the contention figures each server publishes as it stops."""
    return without_heartbeat(proc.dump())


async def snapshot(stub: pb_grpc.InventoryStub) -> tuple[Any, ...]:
    """What clients see: levels of every unit, every reservation, the listed policies."""
    levels = await stub.GetAvailability(pb.GetAvailabilityRequest(units=[unit(*u) for u in UNITS]))
    reservations = [
        await stub.GetReservation(pb.GetReservationRequest(order_id=oid))
        for oid in sorted({**HELD, **FINISHED})
    ]
    policies = await stub.ListSkuPolicies(pb.ListSkuPoliciesRequest(page_size=100))
    return levels, reservations, policies


async def make_data(proc: RedisProc) -> tuple[Any, ...]:
    """Layout-2 data through the server: stock, two HELD orders, one committed, one
    released, stored policies; what clients saw of it."""
    async with serving(proc) as running, running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        for sku, spec, barcode in UNITS:
            await add_stock(stub, sku, "w1", 10, spec, barcode)
        for oid, lines in {**HELD, **FINISHED}.items():
            await stub.Reserve(
                pb.ReserveRequest(
                    order_id=oid,
                    lines=[line(UNITS[i][0], q, "w1", *UNITS[i][1:]) for i, q in lines],
                )
            )
        await stub.Commit(pb.CommitRequest(order_id="o-commit"))
        await stub.Release(pb.ReleaseRequest(order_id="o-release"))
        for sku in POLICY_SKUS:
            await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku=sku, max_line_quantity=5))
        seen = await snapshot(stub)
    listed = {p.sku for p in seen[2].policies}
    assert listed == {"TEE", *POLICY_SKUS}, listed  # TEE: by its sales
    return seen


def layout1_key(key: str) -> str:
    """A layout-2 stock key where layout 1 kept it: the partition of the unit id."""
    head, unit_id = key.split(f":{c.STOCK}:", 1)
    prefix = head.rsplit(":", 1)[0]
    return f"{prefix}:{{p{zlib.crc32(unit_id.encode()) % P}}}:{c.STOCK}:{unit_id}"


def to_layout1(r: redis.Redis) -> dict[str, int]:
    """Turn layout-2 data into what an earlier stockhold kept; how many keys changed."""
    moved = records = held = 0
    for key in list(r.scan_iter(match="sh:{p*}:stock:*")):
        if layout1_key(key) != key:
            r.rename(key, layout1_key(key))
            moved += 1
    for key in list(r.scan_iter(match="sh:{p*}:order:*")):
        text, st = r.hmget(key, "keys", "st")
        new = orjson.dumps([layout1_key(k) for k in orjson.loads(text)]).decode()
        if new != text:
            r.hset(key, "keys", new)
            records += 1
            held += st == c.STATE_HELD
    skus = 0
    for key in list(r.scan_iter(match="sh:{p*}:skus")):
        members = r.zrange(key, 0, -1)
        r.zadd(f"sh:{c.META_SKUS_LAYOUT1}", dict.fromkeys(members, 0))
        r.delete(key)
        skus += len(members)
    r.delete(f"sh:{c.META_LAYOUT}")
    return {"moved": moved, "records": records, "held": held, "skus": skus}


async def refusal(proc: RedisProc) -> str:
    """The reason a server gives for not serving this Redis (it must refuse)."""
    async with serving(proc) as running:
        failure = running.server.failure
    assert isinstance(failure, PartitionMismatch), failure
    return str(failure)


async def test_layout1_data_is_migrated_and_served_as_before(redis_proc: RedisProc) -> None:
    before = await make_data(redis_proc)
    written = state(redis_proc)
    r = redis_proc.client(decode_responses=True)
    changed = to_layout1(r)
    # The case the migration is for: stock hashes elsewhere, a HELD record naming them.
    assert changed["moved"] >= 2 and changed["held"] >= 1 and changed["skus"] == 3, changed
    layout1 = state(redis_proc)
    assert layout1 != written

    reason = await refusal(redis_proc)
    assert "stockhold migrate-layout" in reason and "layout 1" in reason
    assert state(redis_proc) == layout1  # the refused server wrote nothing

    code, out, err = await migrate_cli(
        "--redis-url", redis_proc.url, "--partitions", str(P), "--dry-run"
    )
    assert code == 0, err
    assert f"{changed['moved']} would be moved" in out and "nothing written" in out
    assert state(redis_proc) == layout1

    code, out, err = await migrate_cli("--redis-url", redis_proc.url, "--partitions", str(P))
    assert code == 0, err
    assert len(out.splitlines()) <= 10, out
    assert f"{changed['moved']} moved to their SKU's partition" in out
    assert f"{changed['records']} rewritten ({changed['held']} HELD)" in out
    assert f"{changed['skus']} SKUs re-indexed" in out
    # Exactly what the server had written, layout key included.
    assert state(redis_proc) == written

    async with serving(redis_proc) as running, running.channel() as channel:
        assert running.server.failure is None
        stub = pb_grpc.InventoryStub(channel)
        assert await snapshot(stub) == before
        # The HELD orders move on as before: one committed, one released.
        await stub.Commit(pb.CommitRequest(order_id="o-held-a"))
        await stub.Release(pb.ReleaseRequest(order_id="o-held-b"))
        after = await stub.GetAvailability(
            pb.GetAvailabilityRequest(units=[unit(*u) for u in UNITS])
        )
    was = {(s.unit.sku, s.unit.spec, s.unit.barcode): s for s in before[0].levels}
    now = {(s.unit.sku, s.unit.spec, s.unit.barcode): s for s in after.levels}
    for i, q in HELD["o-held-a"]:  # committed: gone from on hand and reserved
        w, n = was[UNITS[i]], now[UNITS[i]]
        assert (n.on_hand, n.available, n.reserved) == (w.on_hand - q, w.available, w.reserved - q)
    for i, q in HELD["o-held-b"]:  # released: back to available
        w, n = was[UNITS[i]], now[UNITS[i]]
        assert (n.on_hand, n.available, n.reserved) == (w.on_hand, w.available + q, w.reserved - q)

    code, out, err = await migrate_cli("--redis-url", redis_proc.url, "--partitions", str(P))
    assert (code, err) == (0, ""), err
    assert "already layout 2" in out


async def test_an_interrupted_migration_is_finished_by_running_it_again(
    redis_proc: RedisProc,
) -> None:
    before = await make_data(redis_proc)
    written = state(redis_proc)
    r = redis_proc.client(decode_responses=True)
    changed = to_layout1(r)
    # Stopped after the stock hashes moved and one SKU was re-indexed: records still name the
    # layout-1 keys, the old index is still there.
    r.set(f"sh:{c.META_LAYOUT}", MIGRATING)
    Migration(r, "sh", P).stock(Summary(), write=True)
    r.zadd(f"sh:{{p{zlib.crc32(b'MUG') % P}}}:{c.SKU_INDEX}", {"MUG": 0})
    assert MIGRATING in await refusal(redis_proc)

    code, out, err = await migrate_cli("--redis-url", redis_proc.url, "--partitions", str(P))
    assert code == 0, err
    assert "0 moved to their SKU's partition" in out
    assert f"{changed['records']} rewritten" in out
    assert state(redis_proc) == written
    async with serving(redis_proc) as running, running.channel() as channel:
        assert await snapshot(pb_grpc.InventoryStub(channel)) == before


async def test_mixed_layouts_are_refused_and_nothing_is_written(redis_proc: RedisProc) -> None:
    await make_data(redis_proc)
    r = redis_proc.client(decode_responses=True)
    stock = list(r.scan_iter(match="sh:{p*}:stock:*"))
    to_layout1(r)
    # A unit whose stock is both at its layout-1 key and at its layout-2 key.
    both = next(k for k in stock if layout1_key(k) != k)
    r.hset(both, "a:w1", 1)
    layout1 = state(redis_proc)

    code, out, err = await migrate_cli("--redis-url", redis_proc.url, "--partitions", str(P))
    assert (code, out) == (1, "")
    assert "both exist" in err and both in err and layout1_key(both) in err
    assert "nothing written" in err and "Traceback" not in err
    assert state(redis_proc) == layout1


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--redis-cluster"], "never held layout-1 data"),
        (["--partitions", "8"], "holds data for 16 partitions"),
        (["--key-prefix", "other"], "nothing to migrate"),
        (["--partitions", "x"], "--partitions"),
    ],
)
async def test_refusals_are_one_line_and_exit_2(
    redis_proc: RedisProc, argv: list[str], words: str
) -> None:
    redis_proc.client().set(f"sh:{c.META_PARTITIONS}", P)
    code, out, err = await migrate_cli("--redis-url", redis_proc.url, *argv)
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and err.startswith("stockhold: "), err
    assert words in err


async def test_the_embedded_redis_of_a_data_directory_is_migrated(tmp_path: Path) -> None:
    code, out, err = await migrate_cli("--data-dir", str(tmp_path / "none"))
    assert (code, out) == (2, "") and "no data directory" in err
    # One layout-1 stock hash in the data directory's own Redis (AOF), migrated there.
    new = f"sh:{{p{zlib.crc32(b'MUG') % P}}}:{c.STOCK}:MUG::"
    old = layout1_key(new)
    assert old != new
    with EmbeddedRedis(tmp_path / "data") as embedded:
        r = redis.Redis.from_url(embedded.url, password=embedded.password)
        r.mset({f"sh:{c.META_PARTITIONS}": P})
        r.hset(old, mapping={"a:w1": 7, "r:w1": 0})
        r.close()
    code, out, err = await migrate_cli("--data-dir", str(tmp_path / "data"), "--partitions", "16")
    assert code == 0, err
    assert "1 moved" in out
    with EmbeddedRedis(tmp_path / "data") as embedded:
        r = redis.Redis.from_url(embedded.url, password=embedded.password, decode_responses=True)
        assert r.get(f"sh:{c.META_LAYOUT}") == c.LAYOUT
        assert r.hgetall(new) == {"a:w1": "7", "r:w1": "0"} and not r.exists(old)
        r.close()
