"""Side-by-side cost of the Reserve path's script call through several Redis clients (issue 10).

    .venv/bin/python bench/redis_clients.py                      # every client, c=1 and c=64
    .venv/bin/python bench/redis_clients.py --calls 5000 --rounds 1   # a quick look

One run starts a private redis-server (a free port on 127.0.0.1, never 6379, no persistence),
loads the real reserve.lua (`stockhold.scripts.source("reserve")`) and calls it with the KEYS
and ARGV that `Engine.reserve_call` builds for a one-order batch of one line (a distinct order
id per call, over 64 sales units with ample stock, so every call is a real hold, never a
replay), through each client in turn:

    redis-py   today's `stockhold.engine.make_client` (BlockingConnectionPool) + a registered
               Script object, as `Engine._call` runs it;
    coredis    `coredis.Redis` (anyio, on the same uvloop loop) + `register_script`;
    glide      `valkey-glide`'s async `GlideClient` (Rust core, in-process threads) +
               `invoke_script`;
    minimal    a pipelined asyncio Protocol on `hiredis.Reader`, one connection, no pool, no
               timeouts: the floor a Python client can reach;
    hotclient  `stockhold.store.hotclient.HotClient`, the client built from this measurement
               (when it exists in the tree).

For each client and concurrency level (1 and 64 calls in flight, on uvloop) it runs at most
`--calls` calls and at most `--seconds` seconds, and measures

    client CPU µs/call  time.process_time() over the run / calls: every thread of this process
                        (glide's Rust threads included), not the redis-server process;
    calls/s             calls / wall time;
    redis µs/call       Redis's own `INFO commandstats` usec_per_call of EVALSHA.

Before each run Redis is flushed and the stock re-seeded, so every client sees the same data.
Clients run in rounds (each round: every client, every level); the table shows each figure's
median over the rounds, and ratios to the minimal client. A client that cannot be imported or
run here is reported as such, with the error.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hiredis
import orjson
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError

try:
    from redis._parsers.base import BaseParser
except ImportError:  # pragma: no cover - older redis-py layout
    from redis.connection import BaseParser  # type: ignore[attr-defined,no-redef]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # redis_proc: the tests' private redis-server helper

from redis_proc import RedisProc, redis_binaries  # noqa: E402

from stockhold import scripts  # noqa: E402
from stockhold.engine import Engine, make_client  # noqa: E402
from stockhold.resolver import ResolvedOrder, Unit  # noqa: E402
from stockhold.settings import Settings  # noqa: E402

UNITS = 64
WAREHOUSE = "wh-1"
STOCK = 10**9

Call = Callable[[Sequence[str], Sequence[bytes]], Awaitable[Any]]


# -- the minimal client ------------------------------------------------------------------------
class _MinimalProtocol(asyncio.Protocol):
    """Pipelined RESP2 over one connection: a FIFO of futures answered by hiredis.Reader."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error
        )
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        pending = self.pending
        while (reply := reader.gets()) is not False:
            fut = pending.popleft()
            if not fut.done():
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(RedisConnectionError("connection lost"))


class MinimalClient:
    """EVALSHA through `_MinimalProtocol`; loads the script on NOSCRIPT."""

    def __init__(self, protocol: _MinimalProtocol) -> None:
        self.protocol = protocol
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, host: str, port: int) -> MinimalClient:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_MinimalProtocol, host, port)
        return cls(protocol)

    async def command(self, *args: Any) -> Any:
        protocol = self.protocol
        assert protocol.transport is not None
        fut = self.loop.create_future()
        protocol.pending.append(fut)
        protocol.transport.write(hiredis.pack_command(args))
        reply = await fut
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def evalsha(self, sha: str, src: str, keys: Sequence[str], args: Sequence[bytes]) -> Any:
        try:
            return await self.command("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.command("SCRIPT", "LOAD", src)
            return await self.command("EVALSHA", sha, len(keys), *keys, *args)

    def close(self) -> None:
        if self.protocol.transport is not None:
            self.protocol.transport.close()


# -- the clients under test ----------------------------------------------------------------------
@dataclass
class Contender:
    """One client: how to open it (returns its call and its closer) and what went wrong."""

    name: str
    open: Callable[[str, int, Settings], Awaitable[tuple[Call, Callable[[], Awaitable[None]]]]]
    error: str = ""


async def open_redis_py(
    host: str, port: int, settings: Settings
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    client = make_client(f"redis://{host}:{port}/0", settings)
    script = client.register_script(scripts.source("reserve"))

    async def call(keys: Sequence[str], args: Sequence[bytes]) -> Any:
        return await script(keys=keys, args=args)

    async def close() -> None:
        await client.aclose(close_connection_pool=True)

    return call, close


async def open_coredis(
    host: str, port: int, settings: Settings
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import coredis

    client: Any = coredis.Redis(
        host=host,
        port=port,
        db=0,
        max_connections=settings.redis_max_connections,
        connect_timeout=settings.redis_connect_timeout_seconds,
        stream_timeout=settings.redis_socket_timeout_seconds,
    )
    # coredis 6 is structured-concurrency (anyio): the client lives inside its context.
    stack = contextlib.AsyncExitStack()
    await stack.enter_async_context(client)
    script = client.register_script(scripts.source("reserve"))

    async def call(keys: Sequence[str], args: Sequence[bytes]) -> Any:
        return await script(keys=keys, args=args)

    return call, stack.aclose


async def open_glide(
    host: str, port: int, settings: Settings
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    from glide import GlideClient, GlideClientConfiguration, NodeAddress, Script

    config = GlideClientConfiguration(
        [NodeAddress(host, port)],
        request_timeout=round(settings.redis_socket_timeout_seconds * 1000),
    )
    client = await GlideClient.create(config)
    script = Script(scripts.source("reserve"))

    async def call(keys: Sequence[str], args: Sequence[bytes]) -> Any:
        return await client.invoke_script(script, keys=list(keys), args=list(args))

    async def close() -> None:
        await client.close()

    return call, close


async def open_minimal(
    host: str, port: int, settings: Settings
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    src = scripts.source("reserve")
    sha = _sha1(src)
    client = await MinimalClient.connect(host, port)

    async def call(keys: Sequence[str], args: Sequence[bytes]) -> Any:
        return await client.evalsha(sha, src, keys, args)

    async def close() -> None:
        client.close()

    return call, close


async def open_hotclient(
    host: str, port: int, settings: Settings
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    from stockhold.store.hotclient import HotClient, ScriptDef

    client = HotClient.from_url(f"redis://{host}:{port}/0", settings)
    script = ScriptDef.of("reserve")

    async def call(keys: Sequence[str], args: Sequence[bytes]) -> Any:
        return await client.evalsha(script, keys, args)

    return call, client.aclose


def _sha1(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()


CONTENDERS = {
    "redis-py": open_redis_py,
    "coredis": open_coredis,
    "glide": open_glide,
    "minimal": open_minimal,
    "hotclient": open_hotclient,
}
BASELINE = "minimal"


# -- the workload ----------------------------------------------------------------------------------
@dataclass
class Workload:
    """The seeded units and one (KEYS, ARGV) per call, built by the real Engine."""

    engine: Engine
    units: list[Unit]
    calls: list[tuple[list[str], list[bytes]]] = field(default_factory=list)


def build_workload(settings: Settings, url: str, n: int) -> Workload:
    # The engine only builds arguments here: its redis-py client is used to seed stock.
    engine = Engine(make_client(url, settings), settings)
    resolver = engine.resolver
    units = [resolver.unit(f"SKU-{i:05d}", "red-L", f"690123456{i:04d}") for i in range(UNITS)]
    w = Workload(engine, units)
    for i in range(n):
        u = units[i % UNITS]
        order: ResolvedOrder = resolver.resolve_order(
            f"order-{i:09d}",
            [(u.sku, u.spec, u.barcode, "", 1)],
            0,
            settings.max_hold_seconds,
        )
        w.calls.append(engine.reserve_call([(order, "bench")]))
    return w


async def seed(w: Workload, proc: RedisProc) -> None:
    """FLUSHALL, then STOCK units of every sales unit in WAREHOUSE (through the real adjust)."""
    proc.flush()
    for i, u in enumerate(w.units):
        await w.engine.adjust(f"seed-{i}", u, WAREHOUSE, STOCK, "bench", actor="bench")


@dataclass
class Sample:
    calls: int
    cpu_s: float
    wall_s: float
    redis_usec_per_call: float

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.calls * 1e6

    @property
    def rate(self) -> float:
        return self.calls / self.wall_s


async def measure(
    call: Call, w: Workload, proc: RedisProc, concurrency: int, n: int, seconds: float
) -> Sample:
    await seed(w, proc)
    # Warm up: the script is loaded and the connections exist before the clock starts (the
    # order ids used here are the first ones; the measured calls use the rest).
    warm = min(concurrency, 64)
    await asyncio.gather(*(call(*w.calls[i]) for i in range(warm)))
    admin = proc.client()
    admin.config_resetstat()
    loop = asyncio.get_running_loop()
    next_i = warm
    limit = warm + n
    deadline = loop.time() + seconds
    done = 0
    first: Any = None

    async def worker() -> None:
        nonlocal next_i, done, first
        while next_i < limit and loop.time() < deadline:
            i = next_i
            next_i += 1
            reply = await call(*w.calls[i])
            done += 1
            if first is None:
                first = reply

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    # Every call must have been a real, successful hold (reserve.lua: [now, [1, ...]]).
    result = orjson.loads(first)
    if not (isinstance(result, list) and result[1][0] == 1):
        raise RuntimeError(f"unexpected reserve reply: {first!r}")
    stats = admin.info("commandstats").get("cmdstat_evalsha", {})
    usec = float(stats.get("usec_per_call", 0.0)) if isinstance(stats, dict) else 0.0
    return Sample(done, cpu, wall, usec)


def median(samples: Sequence[Sample], attr: str) -> float:
    return statistics.median(getattr(s, attr) for s in samples)


async def run(args: argparse.Namespace) -> int:
    # Generous timeouts: this measures cost, not the "Redis stuck" bound, and a busy 2-core
    # box can take more than the production 0.25 s to accept a connection.
    settings = Settings(
        redis_connect_timeout_seconds=5.0,
        redis_socket_timeout_seconds=10.0,
        redis_pool_timeout_seconds=10.0,
    )
    binaries = redis_binaries()
    if not binaries:
        print("no redis-server >= 6.2 found", file=sys.stderr)
        return 1
    names = [n.strip() for n in args.clients.split(",") if n.strip()]
    levels = [int(x) for x in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="stockhold-bench-") as tmp:
        proc = RedisProc(binaries[0][1], Path(tmp) / "redis").start()
        try:
            version = ".".join(map(str, proc.version))
            print(
                f"redis-server {version} on 127.0.0.1:{proc.port}; reserve.lua, one order of one "
                f"line per call; {args.calls} calls or {args.seconds:g} s per run, "
                f"{args.rounds} round(s), uvloop; python {sys.version.split()[0]}"
            )
            w = build_workload(settings, proc.url, args.calls + 64)
            results: dict[tuple[str, int], list[Sample]] = collections.defaultdict(list)
            errors: dict[str, str] = {}
            unavailable: set[str] = set()
            for rnd in range(args.rounds):
                for name in names:
                    if name in unavailable:
                        continue
                    for level in levels:
                        try:
                            call, close = await CONTENDERS[name]("127.0.0.1", proc.port, settings)
                        except ImportError as exc:
                            errors[name] = f"cannot import: {exc}"
                            unavailable.add(name)
                            break
                        except Exception as exc:
                            errors[name] = f"cannot open: {type(exc).__name__}: {exc}"
                            if args.verbose:
                                traceback.print_exc()
                            continue
                        try:
                            sample = await measure(call, w, proc, level, args.calls, args.seconds)
                        except Exception as exc:
                            errors[name] = f"round {rnd + 1} c={level}: {type(exc).__name__}: {exc}"
                            if args.verbose:
                                traceback.print_exc()
                            continue
                        finally:
                            with contextlib.suppress(Exception):
                                await close()
                        results[(name, level)].append(sample)
                        print(
                            f"  round {rnd + 1} {name:>9} c={level:<3} {sample.calls:>6} calls "
                            f"{sample.cpu_us:8.1f} µs CPU/call {sample.rate:9.0f} calls/s "
                            f"redis {sample.redis_usec_per_call:6.1f} µs/call",
                            flush=True,
                        )
            await w.engine.client.aclose(close_connection_pool=True)
        finally:
            proc.stop()
    print_table(names, levels, results, errors)
    return 0 if not errors or args.allow_missing else 1


def print_table(
    names: Sequence[str],
    levels: Sequence[int],
    results: dict[tuple[str, int], list[Sample]],
    errors: dict[str, str],
) -> None:
    print()
    header = (
        f"{'client':>10} {'c':>3} {'calls':>7} {'CPU µs/call':>12} {'x minimal':>10} "
        f"{'calls/s':>9} {'x minimal':>10} {'redis µs/call':>14}"
    )
    print(header)
    print("-" * len(header))
    for level in levels:
        base = results.get((BASELINE, level))
        base_cpu = median(base, "cpu_us") if base else None
        base_rate = median(base, "rate") if base else None
        for name in names:
            samples = results.get((name, level))
            if not samples:
                continue
            cpu, rate = median(samples, "cpu_us"), median(samples, "rate")
            cpu_x = f"{cpu / base_cpu:9.2f}x" if base_cpu else f"{'-':>10}"
            rate_x = f"{rate / base_rate:9.2f}x" if base_rate else f"{'-':>10}"
            calls = int(median(samples, "calls"))
            print(
                f"{name:>10} {level:>3} {calls:>7} {cpu:12.1f} {cpu_x} {rate:9.0f} {rate_x} "
                f"{median(samples, 'redis_usec_per_call'):14.1f}"
            )
    for name, err in errors.items():
        measured = any(results.get((name, level)) for level in levels)
        print(f"{name}: {'a run FAILED' if measured else 'NOT MEASURED'} ({err})")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--calls", type=int, default=20_000, help="calls per run (default 20000)")
    p.add_argument("--seconds", type=float, default=20.0, help="time bound per run (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; medians shown (default 3)")
    p.add_argument("--concurrency", default="1,64", help="levels (default 1,64)")
    p.add_argument(
        "--clients",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)}",
    )
    p.add_argument(
        "--allow-missing", action="store_true", help="exit 0 even if a client could not run"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks of failures")
    args = p.parse_args(argv)
    unknown = set(args.clients.split(",")) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown clients: {', '.join(sorted(unknown))}")
    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
