"""Crash safety of cross-slot orders on Redis Cluster (issue 11, docs/cluster.md).

A real 3-master cluster (tests/redis_cluster.py). One engine plays a process that dies between
protocol steps at random: its fault hook raises `Crash` (not an Exception: no compensation
runs, as after kill -9) at any step of Reserve, the parts' settling after Commit / Release,
and the sweeper's expiry. A second engine, another process, then runs recovery passes; after
the recovery window the invariants hold exactly:

- every unit's `r:<warehouse>` equals the sum of the HELD records and parts holding it;
- stock is conserved: available + reserved + committed = what was stocked (no oversell);
- no HELD part exists without a home record that lists it, and none is HELD under a finished
  record;
- each order has one final state, and one event per state change.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from stockhold import constants as c
from stockhold.crossslot import Crash
from stockhold.engine import Engine, Transition
from stockhold.errors import DomainError, Reason
from stockhold.settings import Settings

pytestmark = pytest.mark.asyncio

WAREHOUSES = ("east", "west")
STOCK = 60  # below the orders' demand: refusals (and their aborts) happen too


def cluster_settings(url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "redis_url": url,
        "redis_cluster": True,
        "partitions": 16,
        "recovery_window_seconds": 1.0,
    }
    return Settings(**{**base, **overrides})


@pytest.fixture
async def cluster_engines(
    make_redis_cluster: Callable[..., Any],
) -> AsyncIterator[tuple[Engine, Engine, Any]]:
    cluster = make_redis_cluster(masters=3)
    settings = cluster_settings(cluster.url)
    dying = Engine.connect(cluster.url, settings)
    other = Engine.connect(cluster.url, settings)
    try:
        yield dying, other, cluster
    finally:
        await dying.close()
        await other.close()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def _all_keys(engine: Engine) -> dict[str, dict[str, str]]:
    """Every hash of the deployment: key -> fields (SCAN over every master)."""
    client: Any = engine.client
    out: dict[str, dict[str, str]] = {}
    async for raw in client.scan_iter(match="sh:*", count=1000):
        key = _s(raw)
        if await client.type(key) in (b"hash", "hash"):
            out[key] = {_s(f): _s(v) for f, v in (await client.hgetall(key)).items()}
    return out


async def check_invariants(engine: Engine, stocked: dict[tuple[str, str], int]) -> None:
    hashes = await _all_keys(engine)
    resolver = engine.resolver
    held: Counter[tuple[str, str]] = Counter()
    committed: Counter[tuple[str, str]] = Counter()
    homes: dict[str, dict[str, str]] = {}
    parts: list[tuple[str, dict[str, str]]] = []
    for key, h in hashes.items():
        if f":{c.ORDER}:" in key:
            homes[h["oid"]] = h
        elif f":{c.PART}:" in key:
            parts.append((key, h))
    for h in [*(v for k, v in hashes.items() if f":{c.ORDER}:" in k), *(p for _, p in parts)]:
        if "parts" in h:
            continue  # a home of a cross-slot order: its stock is in its parts
        units = orjson.loads(h["units"])
        for idx, wh, q in orjson.loads(h["alloc"]):
            stock_key = resolver.unit(*units[idx - 1]).stock_key
            if h["st"] == c.STATE_HELD:
                held[(stock_key, wh)] += q
            elif h["st"] == c.STATE_COMMITTED:
                committed[(stock_key, wh)] += q
    for (stock_key, wh), initial in stocked.items():
        s = hashes[stock_key]
        a, r = int(s.get(f"a:{wh}", 0)), int(s.get(f"r:{wh}", 0))
        assert r == held[(stock_key, wh)], (stock_key, wh, r, held[(stock_key, wh)])
        assert a >= 0
        assert a + r + committed[(stock_key, wh)] == initial, (stock_key, wh)
    for key, h in parts:
        home = homes.get(h["oid"])
        partition = int(key.split("{p", 1)[1].split("}", 1)[0])
        if h["st"] == c.STATE_HELD:
            assert home is not None, f"a held part without its record: {key}"
            listed = {(int(p), str(n)) for p, n in orjson.loads(home["parts"])}
            assert (partition, h["nc"]) in listed, f"a held part its record does not list: {key}"
            assert home["st"] == c.STATE_HELD, f"a held part under a finished order: {key}"
        elif home is not None:
            assert h["st"] == home["st"], key
    # one event per state change, matching each record's state
    client: Any = engine.client
    events: dict[str, list[str]] = defaultdict(list)
    for p in range(engine.settings.partitions):
        for _id, fields in await client.xrange(resolver.events_key(p)):
            f = {_s(k): _s(v) for k, v in fields.items()}
            if "order_id" in f:
                events[f["order_id"]].append(f["type"])
    final = {
        c.STATE_HELD: [],
        c.STATE_COMMITTED: [c.EVENT_COMMITTED],
        c.STATE_RELEASED: [c.EVENT_RELEASED],
        c.STATE_EXPIRED: [c.EVENT_EXPIRED],
    }
    for oid, h in homes.items():
        assert events[oid] == [c.EVENT_RESERVED, *final[h["st"]]], (oid, h["st"], events[oid])
    for oid in set(events) - set(homes):
        raise AssertionError(f"events of an order without a record: {oid} {events[oid]}")


async def _stock(engine: Engine, skus: list[str]) -> dict[tuple[str, str], int]:
    stocked: dict[tuple[str, str], int] = {}
    for s in skus:
        unit = engine.resolver.unit(s, "", "")
        for wh in WAREHOUSES:
            await engine.adjust(f"init-{s}-{wh}", unit, wh, STOCK, "stock", actor="test")
            stocked[(unit.stock_key, wh)] = STOCK
    return stocked


async def _recover_until_quiet(engine: Engine, window_s: float) -> Counter[str]:
    """Recovery passes until one finds nothing, after the window has passed (bounded); what
    they did."""
    cross = engine.cross
    assert cross is not None
    await asyncio.sleep(window_s + 0.2)
    deadline = time.monotonic() + 30
    done: Counter[str] = Counter()
    while time.monotonic() < deadline:
        await engine.expire_due(actor="test")
        counts = await cross.recover()
        if not any(counts.values()):
            return done
        done.update(counts)
    raise AssertionError("recovery did not settle within 30 s")


@pytest.mark.parametrize("orders", [1000])
async def test_crash_between_steps_then_recovery_restores_every_invariant(
    cluster_engines: tuple[Engine, Engine, Any], orders: int
) -> None:
    dying, other, _cluster = cluster_engines
    rng = random.Random(11)
    skus = [f"crash-sku-{i}" for i in range(24)]
    stocked = await _stock(other, skus)
    assert len({other.resolver.unit(s, "", "").partition for s in skus}) >= 8
    cross = dying.cross
    assert cross is not None
    crashes: Counter[str] = Counter()

    def fault(step: str) -> None:
        if rng.random() < 0.06:
            crashes[step] += 1
            raise Crash(step)

    cross.fault = fault
    outcome: Counter[str] = Counter()

    async def one(i: int) -> None:
        lines = []
        for _ in range(rng.randint(1, 5)):
            s = rng.choice(skus)
            lines.append((s, "", "", rng.choice(("", *WAREHOUSES)), rng.randint(1, 4)))
        hold = rng.choice((0, 0, 0, 1))  # some fall due and are swept
        order = dying.resolver.resolve_order(f"ord-{i}", lines, hold, 172800)
        try:
            if dying._home_only(order):
                await dying.reserve(order, actor="test")
            else:
                await cross.reserve(order, order.fingerprint, 0, None, "", "test")
            outcome["reserved"] += 1
            op = rng.choice(("commit", "release", "keep", "keep"))
            if op != "keep":
                arg = "tx" if op == "commit" else "changed mind"
                await dying._transition_batch([Transition(op, order.keys, arg, "test")])
        except Crash:
            outcome["crashed"] += 1
        except DomainError as err:
            outcome[err.reason.value] += 1

    sem = asyncio.Semaphore(32)

    async def bounded(i: int) -> None:
        async with sem:
            await one(i)

    await asyncio.wait_for(asyncio.gather(*(bounded(i) for i in range(orders))), 240)
    await asyncio.sleep(1.1)  # the short holds fall due; the dying sweeper may crash too
    try:
        await dying.expire_due(actor="test")
    except Crash:
        outcome["sweep crashed"] += 1
    assert crashes, "no fault was injected"
    assert outcome["reserved"] > orders // 3
    print("outcome", dict(outcome), "crashes", dict(crashes))
    assert outcome[Reason.INSUFFICIENT_STOCK.value] > 0
    recovered = await _recover_until_quiet(other, other.settings.recovery_window_seconds)
    print("recovered", dict(recovered))
    assert recovered["undone"] and recovered["settled"] and recovered["confirmed"]
    await check_invariants(other, stocked)
    # the check itself can fail: one unit off is caught
    (stock_key, wh) = next(iter(stocked))
    await other.client.hincrby(stock_key, f"r:{wh}", 1)  # type: ignore[misc]
    with pytest.raises(AssertionError):
        await check_invariants(other, stocked)
