"""Contention publishing through Redis: heads each time, closed sub-windows once, dead ones age out.

A real Redis (tests/conftest.py), two stores standing for two processes, clocks driven by the
test: what a reader merges must be what the processes recorded, however the publishes and the
reads interleave.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import orjson
import pytest
from redis.asyncio import Redis

from stockhold import constants as c
from stockhold.contention import ContentionStats
from stockhold.contention_store import ContentionStore
from stockhold.engine import Engine
from stockhold.settings import Settings

WALL_OFFSET = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + WALL_OFFSET


class U(NamedTuple):
    unit_id: str
    sku: str


def record(stats: ContentionStats, clock: Clock, seconds: int, tag: str) -> None:
    """Ten requests a second over `seconds`, on keys of `tag`."""
    for _ in range(seconds):
        for i in range(10):
            unit = U(f"{tag}/k{i % 4}", tag)
            stats.record_request([unit], [i % 2 == 0], (100 + i) / 1e6, 2e-4, "ok")
        clock.now += 1


@pytest.fixture
async def engines(redis_proc: Any) -> AsyncIterator[tuple[Clock, list[Engine]]]:
    clock = Clock()
    settings = Settings(contention_snapshot_keys=8)
    made = [Engine(Redis.from_url(redis_proc.url), settings) for _ in range(2)]
    for engine in made:
        engine.contention = ContentionStats(clock=clock, wall_clock=clock.wall)
    yield clock, made
    for engine in made:
        await engine.client.aclose()


async def fields(client: Redis, key: str) -> dict[bytes, bytes]:
    return await client.hgetall(key)  # type: ignore[no-any-return]


async def test_closed_sub_windows_are_stored_once_and_heads_every_time(
    engines: tuple[Clock, list[Engine]],
) -> None:
    clock, (engine, _) = engines
    store = ContentionStore(engine, proc_id="p1")
    record(engine.contention, clock, 22, "a")  # four closed sub-windows and a live one
    await store.publish()
    pieces = await fields(engine.client, store.slots_key)
    assert sorted(int(i) for i in pieces) == sorted(store.stats.publication().closed)
    assert len(pieces) == 4
    first = store.last_publish_bytes
    head = orjson.loads((await fields(engine.client, store.hash_key))[b"p1"])
    assert head["v"] == 2 and len(head["slots"]) == 1

    await store.publish()  # nothing closed since: the head alone
    assert store.last_publish_bytes < first / 2
    ttl = await engine.client.pttl(store.slots_key)
    assert 0 < ttl <= store.pieces_ttl_ms

    record(engine.contention, clock, 5, "a")  # one more closes
    await store.publish()
    assert len(await fields(engine.client, store.slots_key)) == 5
    record(engine.contention, clock, 60, "b")  # the old ones leave the window
    await store.publish()
    left = await fields(engine.client, store.slots_key)
    assert sorted(int(i) for i in left) == sorted(store.stats.publication().closed)
    assert all(orjson.loads(p)[0] > clock.wall() - 60 for p in left.values())


async def test_a_reader_merges_both_processes_as_they_recorded(
    engines: tuple[Clock, list[Engine]],
) -> None:
    clock, (e1, e2) = engines
    s1, s2 = ContentionStore(e1, proc_id="p1"), ContentionStore(e2, proc_id="p2")
    record(e1.contention, clock, 17, "a")
    record(e2.contention, clock, 13, "b")
    await s1.publish()
    await s2.publish()
    merged, processes = await s1.merged()
    assert processes == 2 and merged.skipped == 0
    # Every request of both, in the window and since start (4 keys each: exact).
    window = {k: s.requests for k, s in merged.window.entries.items()}
    assert sum(v for k, v in window.items() if k.startswith("a/")) == 170
    assert sum(v for k, v in window.items() if k.startswith("b/")) == 130
    assert sum(s.requests for s in merged.since_start.entries.values()) == 300

    # The same figures as whole snapshots would give.
    whole = e1.contention.merge([e1.contention.snapshot(8), e2.contention.snapshot(8)])
    assert merged.window.top() == whole.window.top()
    assert merged.since_start.top() == whole.since_start.top()


async def test_lost_pieces_are_stored_again(engines: tuple[Clock, list[Engine]]) -> None:
    clock, (engine, reader_engine) = engines
    store = ContentionStore(engine, proc_id="p1")
    reader = ContentionStore(reader_engine, proc_id="reader")
    record(engine.contention, clock, 22, "a")
    await store.publish()
    await engine.client.delete(store.slots_key)  # as after a Redis restart without data
    await store.publish()
    assert len(await fields(engine.client, store.slots_key)) == 4
    merged, _ = await reader.merged()
    assert sum(s.requests for s in merged.window.entries.values()) == 220


async def test_a_dead_process_ages_out_with_its_pieces(
    engines: tuple[Clock, list[Engine]],
) -> None:
    clock, (e1, e2) = engines
    e2.settings = Settings(contention_snapshot_keys=8, contention_stale_seconds=0.5)
    dead, alive = ContentionStore(e1, proc_id="dead"), ContentionStore(e2, proc_id="alive")
    record(e1.contention, clock, 12, "a")
    await dead.publish()
    assert await e1.client.exists(dead.slots_key)
    # Its pieces expire by themselves...
    assert 0 < await e1.client.pttl(dead.slots_key) <= dead.pieces_ttl_ms
    # ...and once it is silent for contention_stale_seconds, a publisher drops it all.
    await e2.client.zadd(alive.seen_key, {"dead": 1})  # seen long ago
    await alive.publish()
    assert not await e1.client.exists(dead.slots_key)
    assert await e1.client.hkeys(alive.hash_key) == [b"alive"]
    key = e1.resolver.meta_key(f"{c.META_CONTENTION_SLOTS}:dead")
    assert dead.slots_key == key
