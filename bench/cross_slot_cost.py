"""What a cross-slot order costs on Redis Cluster against a single-slot one (issue 11).

    .venv/bin/python bench/cross_slot_cost.py                 # about 60 s of blocks
    .venv/bin/python bench/cross_slot_cost.py --seconds 15    # shorter

Engine level, no gRPC: `Engine.connect(url, Settings(redis_cluster=True, partitions=64))`
on a local 3-master cluster (tests/redis_cluster.py, free 127.0.0.1 ports, never 6379), and
the same engine on a standalone redis-server (`redis_cluster=False`) for reference. Both
run in this one process and event loop, one block at a time.

Order kinds (lines of quantity 1 on distinct sales units; a unit lives in its SKU's
partition; the order id is drawn so that its home partition is the first unit's):

    1p-1l   single-slot, 1 line     (every key in the home partition: one reserve.lua)
    1p-3l   single-slot, 3 lines    (3 units of the home partition)
    2p-2l   cross-slot, 2 lines     (the home's unit and one of another partition)
    3p-3l   cross-slot, 3 lines     (the home's unit and two of two other partitions)

On the standalone server every kind is one reserve.lua call (its cross kinds are plain
multi-line orders: the reference for the same order on one node). Each kind is reserved,
then committed (`Engine.reserve`, `Engine.commit`), at concurrency 1 (sequential) and at
`--concurrency` (16) orders in flight. Blocks of `--block` orders (x4 at the higher
concurrency) go round-robin over (deployment, kind), the order of the turn reversed every
round, until `--seconds` is spent: every kind sees the same machine load.

Round trips, two views:
- client side, at concurrency 1: the engine's hot-path client is wrapped; every request
  (a script call, a pipeline, a command) is timed. A request that ended before the answer is
  on the answer's path; the path's *stages* are its requests grouped by overlap in time (the
  parts of a cross-slot Reserve go out at once: one stage). After each answer the cross-slot
  background work is drained (not timed): the parts' index confirmation (ZADD XX) is counted
  as background;
- server side: INFO commandstats summed over the deployment's masters, the delta of each
  block: EVALSHA calls (every script call is one request), every command Redis ran (inside
  scripts too) and its µs, per order.

Latency p50/p99 per order at each concurrency, orders/s at the higher one (the engine's
batcher coalesces orders: one reserve.lua per partition in flight on a cluster, one for all
on one node), and this process's CPU µs per order. At the end every order must have been
held then committed, and on each deployment the stock counters must add up (reserved 0,
available = stocked - committed lines). Writes bench/results/cross-slot-cost-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cluster_capacity as cc  # bench/: its cluster start-up, cleanup and percentiles
import redis_proc
from redis_cluster import RedisCluster
from redis_proc import RedisProc, redis_binaries

from stockhold.engine import Engine
from stockhold.model import State
from stockhold.resolver import KeyResolver, ResolvedOrder, Unit
from stockhold.settings import Settings
from stockhold.store.hotclient import HotClient

RESULTS = cc.RESULTS
WAREHOUSE = "wh-1"
SPEC = "std"
STOCK = 10**9
PARTITIONS = 64
UNITS_PER_PARTITION = 3
SOCKET_TIMEOUT_S = 30.0
# (name, partitions the order touches, lines)
KINDS = (("1p-1l", 1, 1), ("1p-3l", 1, 3), ("2p-2l", 2, 2), ("3p-3l", 3, 3))
OPS = ("reserve", "commit")


# -- client-side request log ----------------------------------------------------------------------
@dataclass
class Request:
    """One request the hot client sent: a script call, a pipeline or a command."""

    what: str  # "script <name>", "pipeline <first command> x<n>", "command <name>"
    commands: int
    t0: float
    t1: float


class Tally:
    """Wraps a hot client's evalsha, pipeline and execute; logs each request while `on`."""

    def __init__(self, hot: HotClient) -> None:
        self.log: list[Request] = []
        self.on = False
        for name in ("evalsha", "pipeline", "execute"):
            setattr(hot, name, self._wrap(name, getattr(hot, name)))

    def _wrap(self, name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                if self.on:
                    if name == "evalsha":
                        what, n = f"script {args[0].name}", 1
                    elif name == "pipeline":
                        cmds = args[0]
                        what, n = f"pipeline {_name(cmds[0][0])} x{len(cmds)}", len(cmds)
                    else:
                        what, n = f"command {_name(args[0])}", 1
                    self.log.append(Request(what, n, t0, time.perf_counter()))

        return call


def _name(cmd: Any) -> str:
    return (cmd.decode() if isinstance(cmd, bytes) else str(cmd)).upper()


def stages(requests: Sequence[Request]) -> int:
    """Sequential round trips: requests grouped while they overlap in time."""
    n = 0
    end = -1.0
    for r in sorted(requests, key=lambda r: r.t0):
        if r.t0 >= end:
            n += 1
            end = r.t1
        else:
            end = max(end, r.t1)
    return n


# -- deployments ---------------------------------------------------------------------------------
@dataclass
class Figures:
    """What the blocks of one (deployment, kind, op, concurrency) measured."""

    orders: int = 0
    seconds: float = 0.0  # wall time of the blocks
    cpu_s: float = 0.0  # this process's CPU over the blocks
    latencies: list[float] = field(default_factory=list)
    commandstats: Counter[str] = field(default_factory=Counter)  # command -> calls
    usec: Counter[str] = field(default_factory=Counter)  # command -> µs
    # concurrency 1 only: per order, requests on the answer's path / in the background
    path_stages: Counter[int] = field(default_factory=Counter)
    path_requests: Counter[str] = field(default_factory=Counter)
    background: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)


class Deployment:
    """One Redis deployment (cluster or standalone) and the engine on it."""

    def __init__(self, name: str, masters: list[RedisProc], settings: Settings) -> None:
        self.name = name
        self.masters = masters
        self.settings = settings
        assert settings.redis_url is not None
        self.engine = Engine.connect(settings.redis_url, settings)
        assert self.engine.calls.hot is not None, "the hot client is on by default"
        self.tally = Tally(self.engine.calls.hot)
        self.figures: dict[tuple[str, str, int], Figures] = {}

    def commandstats(self) -> Counter[str]:
        """calls and usec of every command, summed over the masters (keys cmd, cmd:usec)."""
        out: Counter[str] = Counter()
        for m in self.masters:
            for key, stat in m.info("commandstats").items():
                cmd = key.removeprefix("cmdstat_")
                out[cmd] += int(stat["calls"])
                out[cmd + ":usec"] += int(stat["usec"])
        return out

    async def drain(self) -> None:
        if self.engine.cross is not None:
            await self.engine.cross.drain()


# -- the workload --------------------------------------------------------------------------------
class Workload:
    """Sales units by partition, and orders of each kind (deterministic)."""

    def __init__(self, settings: Settings, seed: int) -> None:
        self.resolver = KeyResolver(settings.key_prefix, settings.partitions)
        self.rng = random.Random(seed)
        self.by_partition: dict[int, list[Unit]] = {p: [] for p in range(PARTITIONS)}
        for i in itertools.count():
            if all(len(u) >= UNITS_PER_PARTITION for u in self.by_partition.values()):
                break
            if i > 100_000:
                raise RuntimeError("could not fill every partition with units")
            u = self.resolver.unit(f"sku-{i:05d}", SPEC, f"2{i:012d}")
            if len(self.by_partition[u.partition]) < UNITS_PER_PARTITION:
                self.by_partition[u.partition].append(u)
        self.units = [u for us in self.by_partition.values() for u in us]
        self._turn: Counter[int] = Counter()
        self._ids = itertools.count()

    def _next_unit(self, p: int) -> Unit:
        us = self.by_partition[p]
        self._turn[p] += 1
        return us[self._turn[p] % len(us)]

    def orders(self, kind: str, n: int, tag: str) -> list[ResolvedOrder]:
        """n fresh orders of a kind; ids <tag>-<kind>-<k>."""
        _, parts, lines = next(k for k in KINDS if k[0] == kind)
        out = []
        for _ in range(n):
            oid = f"{tag}-{kind}-{next(self._ids)}"
            home = self.resolver.order(oid).partition
            if parts == 1:
                first = self._turn[home]
                us = self.by_partition[home]
                units = [us[(first + j) % len(us)] for j in range(lines)]
                self._turn[home] += 1
            else:
                others = self.rng.sample([p for p in range(PARTITIONS) if p != home], parts - 1)
                units = [self._next_unit(p) for p in (home, *others)]
            out.append(
                self.resolver.resolve_order(
                    oid, [(u.sku, u.spec, u.barcode, WAREHOUSE, 1) for u in units], 0, 0
                )
            )
            assert len({u.partition for u in units} | {home}) == parts
        return out


# -- one block -----------------------------------------------------------------------------------
async def run_block(
    dep: Deployment,
    kind: str,
    op: str,
    orders: Sequence[ResolvedOrder],
    concurrency: int,
) -> list[ResolvedOrder]:
    """Reserve or commit `orders` on one deployment; the orders that succeeded."""
    fig = dep.figures.setdefault((kind, op, concurrency), Figures())
    engine = dep.engine
    done: list[ResolvedOrder] = []

    async def one(order: ResolvedOrder) -> None:
        t = time.perf_counter()
        try:
            if op == "reserve":
                res, replayed = await engine.reserve(order, actor="bench")
                ok = res.state == State.HELD and not replayed
            else:
                res = await engine.commit(order.keys.order_id, actor="bench")
                ok = res.state == State.COMMITTED
        except Exception as exc:  # counted, reported; the run goes on
            fig.failures[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
            return
        fig.latencies.append(time.perf_counter() - t)
        if ok:
            done.append(order)
        else:
            fig.failures[f"state {res.state}"] += 1

    stats0 = dep.commandstats()
    cpu0 = time.process_time()
    wall = 0.0
    if concurrency == 1:
        dep.tally.on = True
        try:
            for order in orders:
                mark = len(dep.tally.log)
                t0 = time.perf_counter()
                await one(order)
                t1 = time.perf_counter()
                wall += t1 - t0
                await dep.drain()  # the background work, apart (not timed)
                log = dep.tally.log[mark:]
                path = [r for r in log if r.t1 <= t1]
                fig.path_stages[stages(path)] += 1
                fig.path_requests.update(r.what for r in path)
                fig.background.update(r.what for r in log if r.t1 > t1)
        finally:
            dep.tally.on = False
    else:
        queue = list(reversed(orders))

        async def worker() -> None:
            while queue:
                await one(queue.pop())

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        await dep.drain()
    fig.cpu_s += time.process_time() - cpu0
    fig.seconds += wall
    fig.orders += len(orders)
    delta = dep.commandstats()
    delta.subtract(stats0)
    for key, v in delta.items():
        if key.startswith("info"):
            continue  # our own INFO calls
        if key.endswith(":usec"):
            fig.usec[key.removesuffix(":usec")] += v
        elif v:
            fig.commandstats[key] += v
    return done


# -- the run -------------------------------------------------------------------------------------
async def setup(dep: Deployment, units: Sequence[Unit]) -> None:
    """Layout check (as a server does at start) and ample stock on every unit."""
    await dep.engine.check_partitions()
    sem = asyncio.Semaphore(16)

    async def stock(u: Unit) -> None:
        async with sem:
            await dep.engine.adjust(
                f"stock-{u.unit_id}", u, WAREHOUSE, STOCK, "stock", actor="bench"
            )

    await asyncio.gather(*(stock(u) for u in units))


async def measure(
    args: argparse.Namespace, deps: list[Deployment], workload: Workload
) -> dict[str, Any]:
    """Warm-up, then rounds of blocks until --seconds is spent; the rounds run."""
    for dep in deps:
        await setup(dep, workload.units)
    # warm-up: scripts loaded, topology read, connections open (not measured)
    for kind, _, _ in KINDS:
        orders = workload.orders(kind, 8, "warm")
        for dep in deps:
            for o in orders:
                await dep.engine.reserve(o, actor="bench")
                await dep.engine.commit(o.keys.order_id, actor="bench")
            await dep.drain()
    cells = [(dep, kind) for dep in deps for kind, _, _ in KINDS]
    started = time.monotonic()
    committed_lines = Counter[str]()
    rounds = 0
    box0 = cc.box_cpu()
    while rounds < args.max_rounds and (rounds == 0 or time.monotonic() - started < args.seconds):
        turn = cells if rounds % 2 == 0 else cells[::-1]
        for conc, size in ((1, args.block), (args.concurrency, 4 * args.block)):
            batch = {kind: workload.orders(kind, size, f"r{rounds}c{conc}") for kind, _, _ in KINDS}
            held: dict[tuple[str, str], list[ResolvedOrder]] = {}
            for dep, kind in turn:
                held[(dep.name, kind)] = await run_block(dep, kind, "reserve", batch[kind], conc)
            for dep, kind in turn:
                done = await run_block(dep, kind, "commit", held[(dep.name, kind)], conc)
                committed_lines[dep.name] += sum(len(o.lines) for o in done)
        rounds += 1
        print(f"round {rounds}: {time.monotonic() - started:.0f} s", flush=True)
    box1 = cc.box_cpu()
    busy = (box1[0] - box0[0]) / max(1.0, box1[1] - box0[1]) * (os.cpu_count() or 1)
    checks = {}
    for dep in deps:
        avail = reserved = 0
        for u in workload.units:
            for lv in await dep.engine.availability([u]):
                avail += lv.available
                reserved += lv.reserved
        # warm-up orders were committed too: 8 orders of each kind
        warm = sum(8 * lines for _, _, lines in KINDS)
        want = len(workload.units) * STOCK - committed_lines[dep.name] - warm
        checks[dep.name] = {
            "reserved": reserved,
            "available": avail,
            "available_expected": want,
            "ok": reserved == 0 and avail == want,
        }
    return {
        "rounds": rounds,
        "seconds": time.monotonic() - started,
        "box_cores_busy": busy,
        "checks": checks,
    }


def per_order(counter: Counter[str], orders: int) -> dict[str, float]:
    return {k: v / orders for k, v in sorted(counter.items())} if orders else {}


def summary(dep: Deployment, kind: str, op: str, conc: int) -> dict[str, Any]:
    f = dep.figures.get((kind, op, conc)) or Figures()
    n = max(1, f.orders)
    lat = sorted(f.latencies)
    scripts = sum(v for k, v in f.commandstats.items() if k in ("evalsha", "eval"))
    out: dict[str, Any] = {
        "deployment": dep.name,
        "kind": kind,
        "op": op,
        "concurrency": conc,
        "orders": f.orders,
        "failures": dict(f.failures),
        "p50_ms": cc.pct(lat, 0.50),
        "p99_ms": cc.pct(lat, 0.99),
        "orders_per_s": f.orders / f.seconds if f.seconds else 0.0,
        "client_cpu_us_per_order": f.cpu_s / n * 1e6,
        "script_calls_per_order": scripts / n,
        "redis_commands_per_order": sum(f.commandstats.values()) / n,
        "redis_us_per_order": sum(f.usec.values()) / n,
        "commandstats_per_order": per_order(f.commandstats, n),
        "redis_us_per_order_by_command": per_order(f.usec, n),
    }
    if conc == 1:
        out["path_stages"] = {str(k): v for k, v in sorted(f.path_stages.items())}
        out["path_stages_mean"] = sum(k * v for k, v in f.path_stages.items()) / n
        out["path_requests_per_order"] = per_order(f.path_requests, n)
        out["path_requests_mean"] = sum(f.path_requests.values()) / n
        out["background_requests_per_order"] = per_order(f.background, n)
        out["background_requests_mean"] = sum(f.background.values()) / n
    return out


def report(
    args: argparse.Namespace, binary: str, stamp: str, deps: list[Deployment], run: dict[str, Any]
) -> bool:
    """Print the tables, write the JSON; whether every check passed."""
    conc = args.concurrency
    rows = [
        summary(dep, kind, op, cc_)
        for op in OPS
        for dep in deps
        for kind, _, _ in KINDS
        for cc_ in (1, conc)
    ]
    by = {(r["deployment"], r["kind"], r["op"], r["concurrency"]): r for r in rows}
    print(
        f"\n{run['rounds']} rounds in {run['seconds']:.0f} s, blocks of {args.block} orders at "
        f"c=1 and {4 * args.block} at c={conc}; {binary}; {os.cpu_count()} CPUs, "
        f"{run['box_cores_busy']:.2f} cores busy on average (everything on the box)"
    )
    print(
        "\nround trips per order at c=1 (client: requests on the answer's path, sequential "
        "stages, background after the answer; server: INFO commandstats over the masters)"
    )
    head = (
        f"{'deployment':<11}{'kind':<7}{'op':<8}{'stages':>7}{'path req':>9}{'bg req':>7}"
        f"{'EVALSHA':>8}{'Redis cmds':>11}{'Redis µs':>9}"
    )
    print(head)
    for op in OPS:
        for dep in deps:
            for kind, _, _ in KINDS:
                r = by[(dep.name, kind, op, 1)]
                print(
                    f"{dep.name:<11}{kind:<7}{op:<8}{r['path_stages_mean']:>7.2f}"
                    f"{r['path_requests_mean']:>9.2f}{r['background_requests_mean']:>7.2f}"
                    f"{r['script_calls_per_order']:>8.2f}{r['redis_commands_per_order']:>11.1f}"
                    f"{r['redis_us_per_order']:>9.1f}"
                )
    print("  requests on the path / in the background, per order (cluster, c=1):")
    for op in OPS:
        for kind, _, _ in KINDS:
            r = by[("cluster", kind, op, 1)]
            path = ", ".join(f"{v:g} {k}" for k, v in r["path_requests_per_order"].items())
            bg = ", ".join(f"{v:g} {k}" for k, v in r["background_requests_per_order"].items())
            print(f"    {kind:<6}{op:<8} path: {path or '-'}; background: {bg or '-'}")
    print(
        f"\nlatency per order (ms) and throughput at c={conc}; ratios: / cluster 1p-1l of the "
        "same op, and cluster / standalone for the same kind"
    )
    print(
        f"{'deployment':<11}{'kind':<7}{'op':<8}{'c1 p50':>7}{'c1 p99':>7}{f'c{conc} p50':>8}"
        f"{f'c{conc} p99':>8}{'orders/s':>9}{'EVALSHA/o':>10}{'µs cpu/o':>9}"
        f"{'p50/1p':>7}{'rate/1p':>8}{'c1p50 cl/sa':>12}{'rate cl/sa':>11}"
    )
    for op in OPS:
        for dep in deps:
            base1 = by[("cluster", "1p-1l", op, 1)]
            basec = by[("cluster", "1p-1l", op, conc)]
            for kind, _, _ in KINDS:
                r1, rc = by[(dep.name, kind, op, 1)], by[(dep.name, kind, op, conc)]
                s1 = by.get(("standalone", kind, op, 1))
                sc = by.get(("standalone", kind, op, conc))
                cl = dep.name == "cluster" and s1 is not None and sc is not None
                print(
                    f"{dep.name:<11}{kind:<7}{op:<8}{r1['p50_ms']:>7.2f}{r1['p99_ms']:>7.2f}"
                    f"{rc['p50_ms']:>8.2f}{rc['p99_ms']:>8.2f}{rc['orders_per_s']:>9,.0f}"
                    f"{rc['script_calls_per_order']:>10.2f}"
                    f"{rc['client_cpu_us_per_order']:>9.0f}"
                    + (
                        f"{_ratio(r1['p50_ms'], base1['p50_ms']):>7}"
                        f"{_ratio(rc['orders_per_s'], basec['orders_per_s']):>8}"
                        if dep.name == "cluster"
                        else f"{'':>15}"
                    )
                    + (
                        f"{_ratio(r1['p50_ms'], s1['p50_ms']):>12}"
                        f"{_ratio(rc['orders_per_s'], sc['orders_per_s']):>11}"
                        if cl and s1 is not None and sc is not None
                        else ""
                    )
                )
    failures = {
        f"{r['deployment']} {r['kind']} {r['op']} c={r['concurrency']}": r["failures"]
        for r in rows
        if r["failures"]
    }
    for name, fails in failures.items():
        print(f"FAILURES {name}: {fails}")
    ok = not failures
    for name, ch in run["checks"].items():
        ok = ok and ch["ok"]
        print(
            f"check {name}: reserved {ch['reserved']} == 0, available {ch['available']:,} == "
            f"{ch['available_expected']:,}: {'ok' if ch['ok'] else 'MISMATCH'}"
        )
    print(
        f"  bounded by this process (one event loop: engine, both clients) and the box's "
        f"{os.cpu_count()} cores, shared with the masters and other load; µs cpu/o: this "
        "process's CPU per order"
    )
    out = {
        "benchmark": "cross_slot_cost",
        "utc": stamp,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "redis_server": binary,
        "redis_version": ".".join(map(str, redis_proc.binary_version(binary))),
        "git": git_state(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_end": os.getloadavg(),
        },
        "kinds": [{"kind": k, "partitions": p, "lines": n} for k, p, n in KINDS],
        "run": run,
        "rows": rows,
        "ok": ok,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"cross-slot-cost-{stamp}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return ok


def git_state() -> str:
    """HEAD, with -dirty when src/ has changes not committed (what was measured)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=cc.ROOT,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=cc.ROOT,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + ("-dirty" if dirty else "")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


async def run_all(args: argparse.Namespace, binary: str, tmp: Path) -> dict[str, Any]:
    """Start both deployments, measure, stop everything (whatever happens)."""
    cluster = RedisCluster(binary, tmp / "cluster", masters=3)
    single = RedisProc(binary, tmp / "standalone")
    deps: list[Deployment] = []
    try:
        cluster.start()
        single.start()
        common: dict[str, Any] = {
            "partitions": PARTITIONS,
            "redis_socket_timeout_seconds": SOCKET_TIMEOUT_S,
            "redis_pool_timeout_seconds": SOCKET_TIMEOUT_S,
        }
        cs = Settings(redis_url=cluster.url, redis_cluster=True, **common)
        ss = Settings(redis_url=single.url, **common)
        deps.append(Deployment("cluster", cluster.masters, cs))
        deps.append(Deployment("standalone", [single], ss))
        workload = Workload(cs, args.seed)
        run = await measure(args, deps, workload)
        return {"deps": deps, "run": run}
    finally:
        for dep in deps:
            try:
                await asyncio.wait_for(dep.engine.close(), 10)
            except Exception as exc:
                print(f"closing {dep.name}: {exc}", file=sys.stderr)
        single.stop()
        cluster.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, run, report; exit 1 when a check failed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="rounds start until this is spent")
    ap.add_argument("--max-rounds", type=int, default=1000)
    ap.add_argument("--block", type=int, default=40, help="orders per block at c=1 (x4 above)")
    ap.add_argument("--concurrency", type=int, default=16, help="orders in flight, 2nd level")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--redis-server", default="", help="binary (default: the tests' choice)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if min(args.seconds, args.max_rounds, args.block) <= 0 or args.concurrency < 2:
        ap.error("--seconds, --max-rounds, --block must be positive, --concurrency >= 2")
    binary = args.redis_server or redis_binaries()[0][1]
    # Our redis-servers get SIGTERM if this process dies, even by SIGKILL; SIGTERM and
    # SIGINT stop the run through run_all's `finally`.
    setattr(redis_proc, "subprocess", cc._DeathSignalSubprocess())  # noqa: B010
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, cc._exit_on_signal)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    with tempfile.TemporaryDirectory(prefix="cross-slot-cost-") as tmp:
        result = asyncio.run(run_all(args, binary, Path(tmp)))
    if not report(args, binary, stamp, result["deps"], result["run"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
