"""Micro-benchmark: one reserve.lua call through the hot client against redis-py (issue 10).

    .venv/bin/python -m pytest bench/test_bench_hotclient.py --benchmark-only

A private redis-server (free 127.0.0.1 port, never 6379) runs the real reserve.lua with the
KEYS/ARGV `Engine.reserve_call` builds for a one-order, one-line batch, a distinct order id
per call (a real hold every time, never a replay). Each benchmark round runs `CALLS` calls on
uvloop, one after another (`c1`) or 16 at a time (`c16`), so a round's time is that of
`CALLS` calls (Redis included); `extra_info` has this process's CPU µs per call (client side
only: Redis is another process). bench/redis_clients.py makes the fuller comparison.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from redis_proc import RedisProc, redis_binaries

from stockhold import scripts
from stockhold.engine import Engine
from stockhold.settings import Settings
from stockhold.store.calls import make_client
from stockhold.store.hotclient import HotClient, ScriptDef

CALLS = 100
ROUNDS = 20
UNITS = 64
SETTINGS = Settings(redis_connect_timeout_seconds=5.0, redis_socket_timeout_seconds=10.0)

Call = Callable[[Sequence[str], Sequence[bytes]], Awaitable[Any]]


class Bench:
    """A uvloop loop, a Redis with stock, and enough distinct one-line orders."""

    def __init__(self, proc: RedisProc, loop: asyncio.AbstractEventLoop) -> None:
        self.proc = proc
        self.loop = loop
        self.engine = Engine(make_client(proc.url, SETTINGS), SETTINGS)
        resolver = self.engine.resolver
        self.units = [resolver.unit(f"SKU-{i:05d}", "red-L", f"69{i:011d}") for i in range(UNITS)]
        self.calls: list[tuple[list[str], list[bytes]]] = []
        self.next = 0
        for i, u in enumerate(self.units):
            loop.run_until_complete(
                self.engine.adjust(f"seed-{i}", u, "wh-1", 10**9, "bench", actor="bench")
            )

    def batch(self, n: int) -> list[tuple[list[str], list[bytes]]]:
        """The KEYS/ARGV of `n` orders never sent before."""
        out = []
        resolver = self.engine.resolver
        for _ in range(n):
            i = self.next
            self.next += 1
            u = self.units[i % UNITS]
            order = resolver.resolve_order(
                f"bench-{i:09d}", [(u.sku, u.spec, u.barcode, "", 1)], 0, 3600
            )
            out.append(self.engine.reserve_call([(order, "bench")]))
        return out


@pytest.fixture(scope="module")
def bench() -> Iterator[Bench]:
    binaries = redis_binaries()
    if not binaries:
        pytest.skip("no redis-server >= 6.2")
    loop = uvloop.new_event_loop()
    with tempfile.TemporaryDirectory(prefix="stockhold-bench-") as tmp:
        proc = RedisProc(binaries[0][1], Path(tmp) / "redis").start()
        b = Bench(proc, loop)
        try:
            yield b
        finally:
            loop.run_until_complete(b.engine.client.aclose(close_connection_pool=True))
            proc.stop()
            loop.close()


def open_client(name: str, b: Bench) -> tuple[Call, Callable[[], Awaitable[None]]]:
    if name == "hotclient":
        hot = HotClient.from_url(b.proc.url, SETTINGS)
        reserve = ScriptDef.of("reserve")

        async def hot_call(keys: Sequence[str], args: Sequence[bytes]) -> Any:
            return await hot.evalsha(reserve, keys, args)

        return hot_call, hot.aclose
    client = make_client(b.proc.url, SETTINGS)
    script = client.register_script(scripts.source("reserve"))

    async def py_call(keys: Sequence[str], args: Sequence[bytes]) -> Any:
        return await script(keys=keys, args=args)

    async def py_close() -> None:
        await client.aclose(close_connection_pool=True)

    return py_call, py_close


async def run_calls(call: Call, todo: list[tuple[list[str], list[bytes]]], c: int) -> None:
    it = iter(todo)

    async def worker() -> None:
        for keys, args in it:
            await call(keys, args)

    await asyncio.gather(*(worker() for _ in range(c)))


@pytest.mark.parametrize("concurrency", [1, 16], ids=["c1", "c16"])
@pytest.mark.parametrize("client", ["hotclient", "redis-py"])
def test_reserve_call(benchmark: Any, bench: Bench, client: str, concurrency: int) -> None:
    call, close = open_client(client, bench)
    loop = bench.loop
    loop.run_until_complete(run_calls(call, bench.batch(32), concurrency))  # warm: connect, load
    batches = iter([bench.batch(CALLS) for _ in range(ROUNDS + 1)])
    cpu = 0.0

    def one_round() -> None:
        nonlocal cpu
        todo = next(batches)
        t0 = time.process_time()
        loop.run_until_complete(run_calls(call, todo, concurrency))
        cpu += time.process_time() - t0

    try:
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    finally:
        loop.run_until_complete(close())
    benchmark.extra_info["calls_per_round"] = CALLS
    benchmark.extra_info["cpu_us_per_call"] = round(cpu / (ROUNDS * CALLS) * 1e6, 1)
