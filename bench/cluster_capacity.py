"""Redis-tier reservation capacity: a 1-master against a 3-master Redis Cluster (issue 11).

    .venv/bin/python bench/cluster_capacity.py                      # 2 rounds of 10 s each
    .venv/bin/python bench/cluster_capacity.py --seconds 5 --rounds 1 --drivers 2

No gRPC and no stockhold server: driver processes call reserve.lua, the script stockhold
runs, through stockhold's hot-path client (`HotClient.from_url(url, settings, cluster=True)`,
routed by slot), each on its own event loop with `--inflight` calls in flight.

Two clusters of private redis-servers (free 127.0.0.1 ports, never 6379, no persistence),
built by tests/redis_cluster.py: one master holding all 16384 slots, and three masters with a
third of the slots each. Both run in the same run, in alternating rounds (1, 3, then 3, 1,
...), every round for `--seconds` on each cluster, so that both see the same machine load.

The workload is single-slot, so both clusters run the same script calls: 1-line orders of
quantity 1 over `--units` sales units with ample stock (seeded with plain HSET), fresh order
ids, `--batch` orders per call (KEYS/ARGV from `Engine.reserve_call`), every order of a call
in one partition. Order ids are drawn in sequence (`<round>-<driver>-<n>`) and each goes to
a unit of its own partition (`resolver.order(id).partition == unit.partition`); a unit is
used only if an order of it is one slot (stock, policy and order keys, whatever the key
layout). Both clusters of a round get the same calls, generated before the round starts.

Reported per cluster: reservations/s (held orders counted from the replies), p50/p99 of one
call, the ratio 3 masters / 1 master, each master's Redis CPU (INFO cpu, user + sys) per
reservation and its share of the reservations. The measured rate is bounded by this machine
(masters and drivers share its cores); the capacity implied by Redis CPU per reservation
assumes one core per master. At the end the sum of the reserved counters `r:<warehouse>`
over the stock hashes must equal the held orders on each cluster. Writes
bench/results/cluster-capacity-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import datetime as dt
import gc
import itertools
import json
import math
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "tests"))  # the tests' private redis-server and cluster helpers

import redis_proc  # noqa: E402
from redis_cluster import RedisCluster  # noqa: E402
from redis_proc import RedisProc, redis_binaries  # noqa: E402

from stockhold.engine import Engine  # noqa: E402
from stockhold.resolver import ResolvedOrder, Unit  # noqa: E402
from stockhold.settings import Settings  # noqa: E402
from stockhold.store.hotclient import HotClient, ScriptDef  # noqa: E402

WAREHOUSE = "wh-1"
SPEC = "std"
STOCK = 10**12
# A call's reply must come back within this (a loaded 2-core box may stall for a while).
SOCKET_TIMEOUT_S = 30.0
# Orders per second a driver's first (warm-up) round is generated for, before any is measured.
GUESS_RATE = 60_000
# Bytes values kept shared between calls (see `_compact`): bounds the table.
SHARED_LIMIT = 100_000

Call = tuple[int, list[str], list[bytes | str]]  # (slot, KEYS, ARGV)


# -- processes ---------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In a child: get SIGTERM when the parent dies, so nothing outlives the run."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


class _DeathSignalSubprocess:
    """tests/redis_proc.py's `subprocess`, whose Popen children die with this process."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("preexec_fn", _die_with_parent)
        return subprocess.Popen(*args, **kwargs)


# -- the workload (built the same way in every process) ---------------------------------------
def make_settings() -> Settings:
    """The settings both the calls and the client are built with (cluster mode when this
    tree has it; the URL is never used: each driver gets a cluster's own)."""
    extra: dict[str, Any] = {}
    if "redis_cluster" in {f.name for f in dataclasses.fields(Settings)}:
        extra["redis_cluster"] = True
    return Settings(
        redis_url="redis://127.0.0.1:1",
        redis_socket_timeout_seconds=SOCKET_TIMEOUT_S,
        redis_pool_timeout_seconds=SOCKET_TIMEOUT_S,
        **extra,
    )


class Workload:
    """The sales units and the script calls of the benchmark (deterministic)."""

    def __init__(self, settings: Settings, units: int, batch: int) -> None:
        self.settings = settings
        self.batch = batch
        # Never connected: only its key resolver and reserve_call are used.
        self.engine = Engine.connect("redis://127.0.0.1:1", settings)
        self.resolver = self.engine.resolver
        self._probes: dict[int, str] = {}
        self.units = [self._unit(i) for i in range(units)]
        self.by_partition: dict[int, list[Unit]] = {}
        for u in self.units:
            self.by_partition.setdefault(u.partition, []).append(u)
        self._shared: dict[bytes, bytes] = {}

    def _probe_id(self, partition: int) -> str:
        """The first of probe-0, probe-1, ... whose partition is `partition` (bounded)."""
        for k in range(100 * self.settings.partitions):
            oid = f"probe-{k}"
            if self.resolver.order(oid).partition == partition:
                return oid
        raise RuntimeError(f"no order id of partition {partition} found")

    def _unit(self, i: int) -> Unit:
        """Unit i: the first SKU name sku-<i>[-k] whose order (an id of the unit's partition,
        one line) is one slot, so that a cluster runs it."""
        for k in range(100 * self.settings.partitions):
            sku = f"sku-{i:05d}" if k == 0 else f"sku-{i:05d}-{k}"
            unit = self.resolver.units([(sku, SPEC, f"2{i:012d}")])[0]
            oid = self._probes.get(unit.partition) or self._probe_id(unit.partition)
            self._probes[unit.partition] = oid
            keys, _ = self.engine.reserve_call([(self._order(oid, unit), "bench")])
            if len({key_slot(key.encode()) for key in keys}) == 1:
                return unit
        raise RuntimeError(f"no single-slot sales unit found for unit {i}")

    def _order(self, oid: str, unit: Unit) -> ResolvedOrder:
        return self.resolver.resolve_order(
            oid, [(unit.sku, unit.spec, unit.barcode, WAREHOUSE, 1)], 0, 0
        )

    def _compact(self, value: bytes | str) -> bytes | str:
        # orjson's bytes keep a 4 KiB buffer each: thousands of calls held in memory would
        # take gigabytes. Equal values share one exact-size copy.
        if not isinstance(value, bytes):
            return value
        shared = self._shared.get(value)
        if shared is None:
            shared = bytes(memoryview(value))
            if len(self._shared) < SHARED_LIMIT:
                self._shared[shared] = shared
        return shared

    def calls(self, tag: str) -> Iterator[Call]:
        """Endless fresh calls: order ids `<tag>-<n>` in sequence, each queued for its own
        partition, a call per `batch` orders of one partition, each order on the next unit
        of that partition (in turn)."""
        pending: dict[int, list[str]] = {}
        turn: dict[int, int] = {}
        for n in itertools.count():
            oid = f"{tag}-{n}"
            p = self.resolver.order(oid).partition
            units = self.by_partition.get(p)
            if units is None:
                continue
            queue = pending.setdefault(p, [])
            queue.append(oid)
            if len(queue) < self.batch:
                continue
            orders = []
            for o in queue:
                t = turn.get(p, 0)
                turn[p] = t + 1
                orders.append(self._order(o, units[t % len(units)]))
            queue.clear()
            keys, args = self.engine.reserve_call([(o, "bench") for o in orders])
            slot = key_slot(keys[0].encode())
            yield slot, list(keys), [self._compact(a) for a in args]


# -- a driver process ----------------------------------------------------------------------------
def driver_main(conn: Connection, index: int, units: int, batch: int) -> None:
    """Serve the parent's requests: ("prepare", tag, calls), ("run", url, start, seconds,
    inflight), ("stop",). Every answer is ("ok", ...) or ("error", text)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    settings = make_settings()
    workload = Workload(settings, units, batch)
    plan: list[Call] = []
    source: Iterator[Call] = iter(())
    conn.send(("ok", "started"))
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "stop":
                return
            if msg[0] == "prepare":
                _, tag, n = msg
                started = time.monotonic()
                plan.clear()
                gc.collect()
                gc.disable()
                try:
                    source = workload.calls(f"{tag}-{index}")
                    plan.extend(itertools.islice(source, n))
                finally:
                    gc.enable()
                gc.freeze()  # the plan lives through the round: never scan it
                conn.send(("ok", time.monotonic() - started))
            elif msg[0] == "run":
                _, url, start, seconds, inflight = msg
                stats = asyncio.run(drive(settings, plan, source, url, start, seconds, inflight))
                conn.send(("ok", stats))
            else:
                raise ValueError(f"unknown request {msg[0]!r}")
        except Exception:
            conn.send(("error", f"driver {index}: {traceback.format_exc()}"))


async def drive(
    settings: Settings,
    plan: list[Call],
    source: Iterator[Call],
    url: str,
    start: float,
    seconds: float,
    inflight: int,
) -> dict[str, Any]:
    """Run the plan's calls (from the first) against one cluster from `start` (monotonic)
    for `seconds`, `inflight` at a time; per call its latency, reply and slot."""
    client = HotClient.from_url(url, settings, cluster=True)
    script = ScriptDef.of("reserve", settings)
    refresh = getattr(client, "refresh_topology", None)
    if refresh is not None:
        await refresh()
    latencies: list[float] = []
    replies: list[tuple[int, Any]] = []
    refills = 0
    next_call = 0
    deadline = start + seconds
    last = start

    async def worker() -> None:
        nonlocal next_call, refills, last
        while time.monotonic() < deadline:
            i = next_call
            next_call += 1
            if i >= len(plan):  # pre-generated too few: make one now, on the clock
                plan.append(next(source))
                refills += 1
            slot, keys, args = plan[i]
            t = time.perf_counter()
            reply = await client.evalsha(script, keys, args)
            latencies.append(time.perf_counter() - t)
            replies.append((slot, reply))
        last = max(last, time.monotonic())

    try:
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        cpu0 = time.process_time()
        began = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        cpu = time.process_time() - cpu0
    finally:
        await client.aclose()
    held = refused = replayed = 0
    held_by_slot: Counter[int] = Counter()
    for slot, reply in replies:
        _now, *entries = orjson.loads(reply)
        kinds = [e[0] for e in entries]
        n = kinds.count(1)
        held += n
        held_by_slot[slot] += n
        replayed += kinds.count(2)
        refused += len(kinds) - kinds.count(1) - kinds.count(2)
    return {
        "calls": len(replies),
        "held": held,
        "replayed": replayed,
        "refused": refused,
        "held_by_slot": dict(held_by_slot),
        "latencies": latencies,
        "began": began,
        "ended": last,
        "refills": refills,
        "cpu_s": cpu,
    }


class Drivers:
    """The driver processes and their pipes."""

    def __init__(self, n: int, units: int, batch: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for i in range(n):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=driver_main, args=(theirs, i, units, batch), daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)
        self.ask_all(None, 300)

    def ask_all(self, msg: tuple[Any, ...] | None, limit_s: float) -> list[Any]:
        """Send `msg` to every driver (None: just wait) and collect their answers, bounded."""
        if msg is not None:
            for c in self.conns:
                c.send(msg)
        out = []
        give_up = time.monotonic() + limit_s
        for i, c in enumerate(self.conns):
            if not c.poll(max(0.0, give_up - time.monotonic())):
                raise RuntimeError(f"driver {i} did not answer in {limit_s:.0f} s")
            status, value = c.recv()
            if status != "ok":
                raise RuntimeError(value)
            out.append(value)
        return out

    def stop(self) -> None:
        for c in self.conns:
            with contextlib.suppress(Exception):
                c.send(("stop",))
        give_up = time.monotonic() + 5
        for p in self.procs:
            p.join(max(0.0, give_up - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)


# -- the clusters --------------------------------------------------------------------------------
class Tier:
    """One started cluster, seeded, with its slot -> master table."""

    def __init__(self, name: str, cluster: RedisCluster) -> None:
        self.name = name
        self.cluster = cluster
        self.owner: list[RedisProc] = [cluster.masters[0]] * REDIS_CLUSTER_HASH_SLOTS
        by_port = {p.port: p for p in cluster.masters}
        admin: Any = cluster.masters[0].client()
        for entry in admin.execute_command("CLUSTER", "SLOTS"):
            first, last, port = int(entry[0]), int(entry[1]), int(entry[2][1])
            self.owner[first : last + 1] = [by_port[port]] * (last - first + 1)

    @property
    def masters(self) -> list[RedisProc]:
        return self.cluster.masters

    def seed(self, stock_keys: Sequence[str], script: ScriptDef) -> None:
        """Ample stock in WAREHOUSE on every unit; the script loaded on every master."""
        for master, keys in self._by_master(stock_keys).items():
            pipe = master.client().pipeline(transaction=False)
            for key in keys:
                pipe.hset(key, f"a:{WAREHOUSE}", STOCK)
            pipe.execute()
        for master in self.masters:
            master.client().script_load(script.source)

    def reserved(self, stock_keys: Sequence[str]) -> int:
        """The sum of r:WAREHOUSE over the stock hashes."""
        total = 0
        for master, keys in self._by_master(stock_keys).items():
            pipe = master.client().pipeline(transaction=False)
            for key in keys:
                pipe.hget(key, f"r:{WAREHOUSE}")
            total += sum(int(v or 0) for v in pipe.execute())
        return total

    def _by_master(self, keys: Sequence[str]) -> dict[RedisProc, list[str]]:
        out: dict[RedisProc, list[str]] = {}
        for key in keys:
            out.setdefault(self.owner[key_slot(key.encode())], []).append(key)
        return out

    def cpu(self) -> list[float]:
        """Each master's Redis CPU seconds so far (user + sys, every thread)."""
        out = []
        for m in self.masters:
            info = m.info("cpu")
            out.append(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
        return out


def box_cpu() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def run_round(
    drivers: Drivers, tier: Tier, seconds: float, inflight: int, tag: str
) -> dict[str, Any]:
    """One cluster for `seconds`: every driver's stats merged, with CPU figures."""
    cpu0 = tier.cpu()
    box0 = box_cpu()
    t0 = time.monotonic()
    start = time.monotonic() + 0.5
    stats = drivers.ask_all(
        ("run", tier.cluster.url, start, seconds, inflight), seconds + SOCKET_TIMEOUT_S + 60
    )
    box1 = box_cpu()
    cpu = [b - a for a, b in zip(cpu0, tier.cpu(), strict=True)]
    window = time.monotonic() - t0
    box_cores = (box1[0] - box0[0]) / max(1.0, box1[1] - box0[1]) * (os.cpu_count() or 1)
    driver_cpu = sum(s["cpu_s"] for s in stats)
    held_by_master = [0] * len(tier.masters)
    index = {m.port: i for i, m in enumerate(tier.masters)}
    for s in stats:
        for slot, n in s["held_by_slot"].items():
            held_by_master[index[tier.owner[int(slot)].port]] += n
    held = sum(s["held"] for s in stats)
    elapsed = max(s["ended"] for s in stats) - min(s["began"] for s in stats)
    return {
        "round": tag,
        "cluster": tier.name,
        "masters": len(tier.masters),
        "seconds": elapsed,
        "calls": sum(s["calls"] for s in stats),
        "held": held,
        "replayed": sum(s["replayed"] for s in stats),
        "refused": sum(s["refused"] for s in stats),
        "refills": sum(s["refills"] for s in stats),
        "rate": held / elapsed if elapsed > 0 else 0.0,
        "latencies": sorted(x for s in stats for x in s["latencies"]),
        "redis_cpu_s": cpu,
        "held_by_master": held_by_master,
        "driver_cpu_s": driver_cpu,
        "box_busy": box_cores / (os.cpu_count() or 1),
        # cores in use during the round: the masters, the drivers, and everything else
        "cores_redis": sum(cpu) / window,
        "cores_drivers": driver_cpu / window,
        "cores_other": max(0.0, box_cores - (sum(cpu) + driver_cpu) / window),
    }


def pct(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of sorted values, ms."""
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i] * 1000


# -- the run -------------------------------------------------------------------------------------
def summarize(rounds: list[dict[str, Any]], tier: Tier) -> dict[str, Any]:
    """A cluster's figures over its measured rounds."""
    mine = [r for r in rounds if r["cluster"] == tier.name]
    held = sum(r["held"] for r in mine)
    seconds = sum(r["seconds"] for r in mine)
    lat = sorted(x for r in mine for x in r["latencies"])
    cpu = [sum(r["redis_cpu_s"][i] for r in mine) for i in range(len(tier.masters))]
    per_master = [sum(r["held_by_master"][i] for r in mine) for i in range(len(tier.masters))]
    cpu_per_res = sum(cpu) / held if held else float("nan")
    masters = len(tier.masters)
    # Each master with a core of its own: the one with the most CPU per reservation of the
    # whole tier (its share times its cost) saturates first, at held / its CPU.
    spread_capacity = min(held / c for c in cpu) if held and all(cpu) else float("nan")
    return {
        "cluster": tier.name,
        "masters": masters,
        "held": held,
        "seconds": seconds,
        "rate": held / seconds if seconds else 0.0,
        "p50_ms": pct(lat, 0.50),
        "p99_ms": pct(lat, 0.99),
        "redis_cpu_us_per_reservation": cpu_per_res * 1e6,
        "implied_capacity_even": masters / cpu_per_res,
        "implied_capacity_this_spread": spread_capacity,
        "per_master": [
            {
                "port": m.port,
                "held": n,
                "share": n / held if held else 0.0,
                "cpu_s": c,
                "cpu_us_per_reservation": c / n * 1e6 if n else float("nan"),
                "busy": c / seconds if seconds else 0.0,
            }
            for m, n, c in zip(tier.masters, per_master, cpu, strict=True)
        ],
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, run both clusters in alternating rounds, report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="per cluster and round")
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds (each: both clusters)")
    ap.add_argument("--warmup", type=float, default=2.0, help="s per cluster, not measured")
    ap.add_argument("--drivers", type=int, default=2, help="driver processes")
    ap.add_argument("--inflight", type=int, default=32, help="calls in flight per driver")
    ap.add_argument("--batch", type=int, default=16, help="orders per call")
    ap.add_argument("--units", type=int, default=1000, help="sales units")
    ap.add_argument("--redis-server", default="", help="binary (default: the tests' choice)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if min(args.seconds, args.warmup, args.rounds, args.drivers, args.inflight, args.batch) <= 0:
        ap.error("--seconds, --warmup, --rounds, --drivers, --inflight, --batch must be positive")
    binary = args.redis_server or redis_binaries()[0][1]
    # Our redis-servers get SIGTERM if this process dies, even by SIGKILL; SIGTERM and
    # SIGINT (even when started ignoring it) stop the run through the `finally` below.
    setattr(redis_proc, "subprocess", _DeathSignalSubprocess())  # noqa: B010
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    settings = make_settings()
    workload = Workload(settings, args.units, args.batch)
    stock_keys = [u.stock_key for u in workload.units]
    script = ScriptDef.of("reserve", settings)
    tiers: list[Tier] = []
    drivers: Drivers | None = None
    with tempfile.TemporaryDirectory(prefix="cluster-capacity-") as tmp:
        try:
            for name, n in (("1 master", 1), ("3 masters", 3)):
                cluster = RedisCluster(binary, Path(tmp) / f"m{n}", masters=n)
                tiers.append(Tier(name, cluster.start()))
                tiers[-1].seed(stock_keys, script)
            drivers = Drivers(args.drivers, args.units, args.batch)
            result = measure(args, drivers, tiers)
            result["checks"] = {t.name: t.reserved(stock_keys) for t in tiers}
        finally:
            if drivers is not None:
                drivers.stop()
            for t in tiers:
                t.cluster.stop()
    report(args, binary, stamp, tiers, result)


def measure(args: argparse.Namespace, drivers: Drivers, tiers: list[Tier]) -> dict[str, Any]:
    """The warm-up and measured rounds; every round's figures and the totals held."""
    # calls per second per driver, the highest seen on each cluster (first a guess)
    rate = {t.name: GUESS_RATE / args.batch / args.drivers for t in tiers}
    rounds: list[dict[str, Any]] = []
    total_held = {t.name: 0 for t in tiers}
    plan = [("w", args.warmup, tiers)] + [
        (f"r{i}", args.seconds, tiers if i % 2 == 0 else tiers[::-1]) for i in range(args.rounds)
    ]
    for tag, seconds, order in plan:
        # Enough calls for the faster cluster, by the rates seen so far, with a margin.
        need = math.ceil(max(rate.values()) * seconds * 1.5) + 4 * args.inflight
        gen = drivers.ask_all(("prepare", tag, need), 900)
        print(f"round {tag}: {need} calls per driver generated in {max(gen):.1f} s", flush=True)
        for tier in order:
            r = run_round(drivers, tier, seconds, args.inflight, tag)
            total_held[tier.name] += r["held"]
            if r["refused"] or r["replayed"]:
                raise RuntimeError(f"{tier.name}: {r['refused']} refused, {r['replayed']} replays")
            if r["seconds"] > 0:
                rate[tier.name] = max(rate[tier.name], r["calls"] / r["seconds"] / args.drivers)
            print(
                f"  {tier.name:<10} {r['rate']:>9,.0f} reservations/s"
                f"  p50 {pct(r['latencies'], 0.5):.1f} ms  p99 {pct(r['latencies'], 0.99):.1f} ms"
                f"  cores: Redis {r['cores_redis']:.2f}, drivers {r['cores_drivers']:.2f},"
                f" other {r['cores_other']:.2f}"
                + (f"  ({r['refills']} calls generated on the clock)" if r["refills"] else ""),
                flush=True,
            )
            rounds.append(r)
    measured = [r for r in rounds if r["round"] != "w"]
    return {
        "rounds": rounds,
        "summary": [summarize(measured, t) for t in tiers],
        "total_held": total_held,
    }


def report(
    args: argparse.Namespace,
    binary: str,
    stamp: str,
    tiers: list[Tier],
    result: dict[str, Any],
) -> None:
    """Print the table and the checks; write the JSON."""
    one, three = result["summary"]
    ok = all(result["checks"][t.name] == result["total_held"][t.name] for t in tiers)
    refills = sum(r["refills"] for r in result["rounds"] if r["round"] != "w")
    print(
        f"\nreserve.lua, 1-line orders of quantity 1, {args.batch} orders per call, "
        f"{args.drivers} drivers x {args.inflight} calls in flight, {args.rounds} rounds x "
        f"{args.seconds:g} s per cluster, {binary}, {os.cpu_count()} CPUs"
    )
    head = (
        f"{'cluster':<11}{'reserv./s':>11}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'Redis CPU µs/res':>18}{'implied cap. (even)':>21}{'(this spread)':>15}"
    )
    print(head)
    for s in (one, three):
        print(
            f"{s['cluster']:<11}{s['rate']:>11,.0f}{s['p50_ms']:>8.1f}{s['p99_ms']:>8.1f}"
            f"{s['redis_cpu_us_per_reservation']:>18.1f}{s['implied_capacity_even']:>21,.0f}"
            f"{s['implied_capacity_this_spread']:>15,.0f}"
        )
    measured = three["rate"] / one["rate"] if one["rate"] else float("nan")
    implied = three["implied_capacity_this_spread"] / one["implied_capacity_this_spread"]
    print(
        "implied cap.: reservations/s with a core per master, from Redis CPU per reservation:"
        " masters / CPU per reservation (even), or the first master to fill its core (this"
        " spread)"
    )
    print(f"ratio 3 masters / 1 master: measured {measured:.2f}, implied {implied:.2f}")
    print(
        f"  measured: bounded by this box, whose {os.cpu_count()} cores the masters, the drivers"
        " and any other load share; cores in use on average:"
    )
    for t in tiers:
        mine = [r for r in result["rounds"] if r["round"] != "w" and r["cluster"] == t.name]
        cores = {
            k: sum(r[f"cores_{k}"] for r in mine) / len(mine) for k in ("redis", "drivers", "other")
        }
        print(
            f"    {t.name:<10} Redis {cores['redis']:.2f}, drivers {cores['drivers']:.2f},"
            f" other {cores['other']:.2f}"
        )
    print(
        "  implied: bounded by Redis CPU per reservation and the spread over the masters"
        " (assumes a core per master and drivers that keep up)"
    )
    print("spread over the 3 masters (reservations, share, Redis CPU µs/res, CPU busy):")
    for i, m in enumerate(three["per_master"]):
        print(
            f"  master {i + 1} :{m['port']}  {m['held']:>9,}  {m['share']:>6.1%}"
            f"  {m['cpu_us_per_reservation']:>6.1f}  {m['busy']:>5.0%}"
        )
    for t in tiers:
        held, counted = result["total_held"][t.name], result["checks"][t.name]
        print(
            f"check {t.name}: sum of r:{WAREHOUSE} over stock hashes {counted:,} == "
            f"held orders {held:,}: {'ok' if held == counted else 'MISMATCH'}"
        )
    if refills:
        print(f"note: {refills} calls were generated during measured rounds (too few prepared)")
    rounds = [
        {k: v for k, v in r.items() if k != "latencies"}
        | {"p50_ms": pct(r["latencies"], 0.5), "p99_ms": pct(r["latencies"], 0.99)}
        for r in result["rounds"]
    ]
    out = {
        "benchmark": "cluster_capacity",
        "utc": stamp,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "redis_server": binary,
        "redis_version": ".".join(map(str, redis_proc.binary_version(binary))),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "summary": [one, three],
        "ratio_measured": measured,
        "ratio_implied_by_redis_cpu": implied,
        "rounds": rounds,
        "checks": {
            t.name: {"reserved": result["checks"][t.name], "held": result["total_held"][t.name]}
            for t in tiers
        },
        "ok": ok,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"cluster-capacity-{stamp}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
