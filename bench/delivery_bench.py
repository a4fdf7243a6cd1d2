"""Event delivery to a fast local WMS under a steady Reserve load (issue 12, "Measured";
`make bench-delivery`, docs/events.md "Measured").

One run:

1. starts a private redis-server (bench/loadbench.py's PrivateRedis: free 127.0.0.1 port, never
   6379, no persistence), the fake WMS of tests/fake_wms.py in a process of its own (it answers
   200 at once, records every POST and checks its signature), and `stockhold serve --workers 2`
   from the venv exactly as an operator would (STOCKHOLD_* from the clean environment plus
   STOCKHOLD_DELIVERY_ENABLED=true and any --env);
2. creates a subscription of every warehouse and type pointing at the WMS (CreateSubscription,
   from now), loads stock through AdjustStock, and waits for that backlog to drain;
3. offers Reserve at a fixed open-loop rate (`--rate`, default 2,000/s, for `--seconds`, default
   30) from `--drivers` driver processes (grpc.aio; each sends its share on a fixed schedule,
   whatever the answers do): one-line orders, uniform over `--units` sales units, each with
   its own order id. Each driver records, per order, its answer code and answer time
   (time.time()) and how late each send left against its schedule;
4. samples GetSubscriptionLag every `--sample` s (backlog, status, rate, WMS p50/p99) during
   the window and until the backlog is 0 again (at most `--drain-timeout` s);
5. stops the WMS, which hands over what it received (event key, type, order id, arrival time);
   checks that every event of every partition's stream reached the WMS with a 2xx and that
   every order answered OK has its ORDER_RESERVED event there, counts duplicates (the same
   event key taken twice) and bad signatures; the end-to-end delay of an order is the WMS's
   arrival time of its ORDER_RESERVED minus the driver's answer time (same host, same clock);
6. reports the CPU of the server (its process tree), Redis, the WMS and the drivers over the
   window (/proc/<pid>/stat, as loadbench does) and writes bench/results/delivery-<UTC>.json.

    .venv/bin/python bench/delivery_bench.py                      # 2,000/s for 30 s
    .venv/bin/python bench/delivery_bench.py --rate 500 --seconds 5
    .venv/bin/python bench/delivery_bench.py --env STOCKHOLD_DELIVERY_BATCH=500
    .venv/bin/python bench/delivery_bench.py --producer xadd --rate 3000   # delivery alone

`--producer xadd` measures delivery apart from what a Reserve costs: instead of the drivers,
one cheap producer process (redis-py, no gRPC, no scripts) appends the events itself at the
rate, straight to the partitions' streams: each one a copy of a real ORDER_RESERVED entry (the
fields of one real Reserve's event, read back from its stream) with its own order id, in that
order id's partition as a Reserve would put it, `ts` the producer's clock (same host) and the
unit spread over `--units`, with the MAXLEN ~ cap the scripts use; each ~1 ms tick goes out
as one pipeline with one PUBLISH of the partitions touched on the events-hint channel, as a
server's HintPublisher does. The server, the WMS and the checks are the same; the "answer"
time of an event is when its XADD pipeline returned.

Exit status: 1 when a correctness check failed (an event or an order's event missing at the
WMS, a bad signature, a process that did not start) or the run aborted; the targets (the rate
offered, backlog below 50 throughout) are reported, and fail the run only with --strict.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import orjson

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))  # loadbench's process and CPU helpers
sys.path.insert(0, str(ROOT / "tests"))  # the fake WMS

import loadbench as lb  # noqa: E402
from fake_wms import FakeWMS  # noqa: E402

from stockhold.constants import DEFAULT_PARTITIONS, EVENT_RESERVED, SUB_LEASE  # noqa: E402
from stockhold.resolver import KeyResolver, partition_tag  # noqa: E402
from stockhold.v1 import inventory_pb2 as pb  # noqa: E402
from stockhold.v1 import inventory_pb2_grpc as pb_grpc  # noqa: E402

SUBSCRIPTION = "bench"
SECRET = "delivery-bench-secret-0123456789"
WAREHOUSE = "wh-1"
SPEC = "std"
UNIT_STOCK = 10**9
BACKLOG_TARGET = 50  # the "healthy below 50"
LATE_S = 0.010  # a send more than this behind its schedule is late
CALL_TIMEOUT_S = 30.0
STATUS = {v.number: v.name for v in pb.LagStatus.DESCRIPTOR.values}


def sku(i: int) -> str:
    return f"DB-{i:05d}"


def barcode(i: int) -> str:
    return str(3_000_000_000_000 + i)


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile of `values` (nearest rank), None when empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


# -- the fake WMS, in a process of its own ----------------------------------------------------
async def wms_main(port: int) -> list[list[Any]]:
    """Serve tests/fake_wms.FakeWMS on `port` until SIGTERM, then return what it received:
    [key, type, order_id, arrival time.time(), status, signature ok, event ts_ms] per POST."""
    wms = await FakeWMS(SECRET, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await wms.stop()
    offset = time.time() - time.monotonic()  # arrival times are monotonic: to wall clock
    rows = []
    for r in wms.received:
        try:
            e = r.event
            etype, order_id = str(e.get("type", "")), str(e.get("order_id", ""))
            ts_ms = int(e.get("ts_ms") or 0)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            etype, order_id, ts_ms = "?", "?", 0
        rows.append([r.key, etype, order_id, r.at + offset, r.status, r.signature_ok, ts_ms])
    return rows


# -- a driver process -------------------------------------------------------------------------
async def driver_main(a: argparse.Namespace) -> dict[str, Any]:
    """Offer `a.count` Reserves at `a.rate`/s from wall time `a.start_at`, open loop; return
    {orders: [[order_id, code, answer time]], lateness ...}."""
    opts = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(a.target, options=opts) for _ in range(a.channels)]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), 30)
    stubs = [pb_grpc.InventoryStub(ch) for ch in channels]
    rng = random.Random(a.seed)
    requests = []
    for i in range(a.count):
        u = rng.randrange(a.units)
        line = pb.ReserveLine(
            unit=pb.SalesUnit(sku=sku(u), spec=SPEC, barcode=barcode(u)),
            warehouse=WAREHOUSE,
            quantity=1,
        )
        requests.append(pb.ReserveRequest(order_id=f"{a.prefix}-{i:07d}", lines=[line]))
    answers: list[list[Any]] = []
    lateness: list[float] = []

    async def one(i: int) -> None:
        req = requests[i]
        try:
            await stubs[i % len(stubs)].Reserve(req, timeout=CALL_TIMEOUT_S)
            code = "OK"
        except grpc.aio.AioRpcError as err:
            code = err.code().name
            if "RST_STREAM with error code 7" in (err.details() or ""):
                # refused by grpc-core (per-connection stream limit), never seen by a handler
                code += " (REFUSED_STREAM)"
        answers.append([req.order_id, code, time.time()])

    tasks: set[asyncio.Task[None]] = set()
    t0 = time.monotonic() + (a.start_at - time.time())
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    first_sent = time.time()
    interval = 1.0 / a.rate
    i = 0
    while i < a.count:
        now = time.monotonic()
        due = min(a.count, int((now - t0) * a.rate) + 1)
        while i < due:
            lateness.append(now - (t0 + i * interval))
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.sleep(max(0.0, t0 + i * interval - time.monotonic()))
    last_sent = time.time()
    if tasks:
        await asyncio.wait(set(tasks), timeout=CALL_TIMEOUT_S + 5)
    for ch in channels:
        await ch.close()
    return sender_report(answers, a.count, first_sent, last_sent, lateness)


def sender_report(
    answers: list[list[Any]],
    sent: int,
    first_sent: float,
    last_sent: float,
    lateness: list[float],
) -> dict[str, Any]:
    """What a sender (driver or xadd producer) reports: its answers, how many it sent, when,
    and how late against the schedule; unanswered = sent without an answer."""
    return {
        "orders": answers,
        "sent": sent,
        "first_sent": first_sent,
        "last_sent": last_sent,
        "late": sum(1 for x in lateness if x > LATE_S),
        "lateness_p50_ms": ms(pct(lateness, 0.5)),
        "lateness_p99_ms": ms(pct(lateness, 0.99)),
        "lateness_max_ms": ms(max(lateness, default=None)),
        "unanswered": sent - len(answers),
    }


# -- the xadd producer process (--producer xadd) -------------------------------------------------
def producer_main(a: argparse.Namespace) -> dict[str, Any]:
    """Append `a.count` copies of the template ORDER_RESERVED entry (`a.template`: its fields
    as JSON) at `a.rate`/s from wall time `a.start_at`, ~1 ms ticks, one pipeline a tick (the
    XADDs and one PUBLISH of the partitions touched); the same result shape as a driver's."""
    import redis

    from stockhold.constants import DEFAULT_KEY_PREFIX
    from stockhold.delivery.wake import HINT_INTERVAL, hint_channel
    from stockhold.settings import Settings

    template: dict[str, str] = orjson.loads(a.template)
    if a.hint_interval is None:
        a.hint_interval = HINT_INTERVAL  # as a server's HintPublisher does
    client = redis.Redis.from_url(a.target, socket_timeout=30)
    resolver = KeyResolver(partitions=a.partitions)
    maxlen = Settings().event_stream_maxlen
    channel = hint_channel(DEFAULT_KEY_PREFIX)
    rng = random.Random(a.seed)
    data0, sku0, bc0 = template["data"], sku(0), barcode(0)
    plan = []  # (order id, stream key, partition, data) of each event, made before the clock
    for i in range(a.count):
        oid = f"{a.prefix}-{i:07d}"
        keys = resolver.order(oid)
        u = rng.randrange(a.units)
        data = data0.replace(sku0, sku(u)).replace(bc0, barcode(u))
        plan.append((oid, keys.events_key, keys.partition, data))
    answers: list[list[Any]] = []
    lateness: list[float] = []
    interval = 1.0 / a.rate
    t0 = time.monotonic() + (a.start_at - time.time())
    time.sleep(max(0.0, t0 - time.monotonic()))
    first_sent = time.time()
    i = 0
    pipe = client.pipeline(transaction=False)
    touched: set[int] = set()  # partitions not yet hinted (one PUBLISH per HINT_INTERVAL)
    hinted = 0.0
    while i < a.count:
        now = time.monotonic()
        due = min(a.count, int((now - t0) * a.rate) + 1)
        batch = []
        ts = str(int(time.time() * 1000))
        while i < due:
            lateness.append(now - (t0 + i * interval))
            oid, stream, partition, data = plan[i]
            fields = {**template, "order_id": oid, "ts": ts, "data": data}
            pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
            touched.add(partition)
            batch.append(oid)
            i += 1
        if touched and now - hinted >= a.hint_interval:
            pipe.publish(channel, ",".join(map(str, sorted(touched))))
            touched, hinted = set(), now
        if len(pipe):
            pipe.execute()
            done = time.time()
            answers.extend([oid, "OK", done] for oid in batch)
        time.sleep(max(0.0, min(0.001, t0 + i * interval - time.monotonic())))
    last_sent = time.time()
    client.close()
    return sender_report(answers, a.count, first_sent, last_sent, lateness)


def template_event(stub: pb_grpc.InventoryStub, red: lb.PrivateRedis, partitions: int) -> str:
    """One real Reserve of unit 0; its ORDER_RESERVED entry's fields, as JSON text."""
    oid = "db-template"
    line = pb.ReserveLine(
        unit=pb.SalesUnit(sku=sku(0), spec=SPEC, barcode=barcode(0)),
        warehouse=WAREHOUSE,
        quantity=1,
    )
    stub.Reserve(pb.ReserveRequest(order_id=oid, lines=[line]), timeout=CALL_TIMEOUT_S)
    stream = KeyResolver(partitions=partitions).order(oid).events_key
    for _, raw in red.client.xrevrange(stream, count=10) or []:
        fields = {lb_text(k): lb_text(v) for k, v in raw.items()}
        if fields.get("type") == EVENT_RESERVED and fields.get("order_id") == oid:
            return orjson.dumps(fields).decode()
    raise lb.Abort("the template Reserve's event is not in its stream")


# -- the orchestrator -------------------------------------------------------------------------
@dataclass
class Run:
    """What one run started and gathered."""

    args: argparse.Namespace
    workdir: Path
    red: lb.PrivateRedis | None = None
    wms: lb.Child | None = None
    srv: lb.ServerUnderTest | None = None
    drivers: list[lb.Child] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def child_python(name: str, args: list[str], workdir: Path) -> lb.Child:
    """This script again as a child (`--wms-child` / `--driver-child`), dying with us."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    return lb.Child(name, cmd, workdir / f"{name}.log", env=lb.clean_env())


def start_wms(workdir: Path, name: str = "wms") -> tuple[lb.Child, int, Path]:
    """The fake WMS in a process of its own: (its child, port, the file it writes on SIGTERM)."""
    port = lb.free_port()
    out = workdir / f"{name}-received.json"
    child = child_python(name, ["--wms-child", "--port", str(port), "--out", str(out)], workdir)
    deadline = time.monotonic() + 30
    while lb.listeners(port) < 1:
        if not child.alive() or time.monotonic() > deadline:
            raise lb.Abort(f"the fake WMS did not start; see {child.log}")
        time.sleep(0.05)
    return child, port, out


def subscribe(stub: pb_grpc.InventoryStub, wms_port: int) -> None:
    """CreateSubscription: every warehouse and type, from now, to the fake WMS."""
    stub.CreateSubscription(
        pb.CreateSubscriptionRequest(
            subscription=pb.Subscription(
                name=SUBSCRIPTION, url=f"http://127.0.0.1:{wms_port}/hook", timeout_ms=5000
            ),
            secret=SECRET,
        ),
        timeout=10,
    )


def lag(stub: pb_grpc.InventoryStub) -> pb.SubscriptionLag:
    reply = stub.GetSubscriptionLag(pb.GetSubscriptionLagRequest(name=SUBSCRIPTION), timeout=10)
    return reply.subscriptions[0]


def sample(stub: pb_grpc.InventoryStub, t0: float, phase: str) -> dict[str, Any]:
    """One GetSubscriptionLag reading (an error is recorded as such, and the run goes on)."""
    try:
        s = lag(stub)
    except grpc.RpcError as err:
        code = err.code().name if isinstance(err, grpc.Call) else "?"
        return {"t": round(time.monotonic() - t0, 3), "phase": phase, "error": code}
    return {
        "t": round(time.monotonic() - t0, 3),
        "phase": phase,
        "backlog": s.backlog,
        "oldest_age_ms": s.oldest_age_ms,
        "status": STATUS.get(s.status, str(s.status)),
        "slow_consumer": s.slow_consumer,
        "failed": s.failed,
        "rate": round(s.rate_per_second, 1),
        "wms_p50_ms": round(s.wms_p50_ms, 2),
        "wms_p99_ms": round(s.wms_p99_ms, 2),
    }


def wait_drained(stub: pb_grpc.InventoryStub, seconds: float) -> float | None:
    """Seconds until the subscription's backlog is 0 (None: not within `seconds`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        with contextlib.suppress(grpc.RpcError):
            if lag(stub).backlog == 0:
                return time.monotonic() - t0
        time.sleep(0.1)
    return None


def wait_balanced(red: lb.PrivateRedis, partitions: int, workers: int) -> list[int]:
    """Wait (at most 30 s) until every partition's lease is held and the processes share
    them evenly, as the deliverers settle a few lease rounds after the subscription appears
    (a partition handed over meanwhile waits up to a round, ~1.7 s): the leases per owner."""
    resolver = KeyResolver(partitions=partitions)
    keys = [f"{partition_tag(resolver, p)}{SUB_LEASE}:{SUBSCRIPTION}" for p in range(partitions)]
    counts: list[int] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        owners = Counter(lb_text(v) for v in red.client.mget(keys) or [] if v is not None)
        counts = sorted(owners.values())
        if sum(counts) == partitions and len(counts) == workers and counts[-1] - counts[0] <= 1:
            break
        time.sleep(0.2)
    return counts


async def load_stock(target: str, units: int) -> None:
    """One receipt per unit through AdjustStock, 64 at a time. UNAVAILABLE is retried (at
    most 5 times; the same adjustment id, so at most once applied): with delivery on, a
    connection's bursts are refused now and then by grpc-core ("RST_STREAM with error code
    7", REFUSED_STREAM) under the default max_streams_per_connection."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InventoryStub(ch)
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            request = pb.AdjustStockRequest(
                adjustment_id=f"db-stock-{i:05d}",
                unit=pb.SalesUnit(sku=sku(i), spec=SPEC, barcode=barcode(i)),
                warehouse=WAREHOUSE,
                delta=UNIT_STOCK,
                reason="delivery bench",
            )
            for attempt in range(6):
                async with sem:
                    try:
                        await stub.AdjustStock(request, timeout=CALL_TIMEOUT_S)
                        return
                    except grpc.aio.AioRpcError as err:
                        if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == 5:
                            raise
                await asyncio.sleep(0.05 * 2**attempt)

        await asyncio.gather(*(one(i) for i in range(units)))


@dataclass
class Cpu:
    t: float
    parts: dict[str, float]
    busy: float
    wall: float = field(default_factory=time.time)


def cpu_now(run: Run) -> Cpu:
    assert run.srv is not None and run.red is not None and run.wms is not None
    children = lb._children()
    server = sum(lb.proc_cpu_s(p) for p in lb.proc_tree(run.srv.child.pid, children))
    return Cpu(
        time.monotonic(),
        {
            "server": server,
            "redis": sum(lb.proc_cpu_s(p) for p in run.red.pids),
            "wms": lb.proc_cpu_s(run.wms.pid),
            "drivers": sum(lb.proc_cpu_s(d.pid) for d in run.drivers),
        },
        lb.machine_cpu_s()[0],
    )


def server_workers(run: Run) -> list[int]:
    """The pids of the server's processes that serve (the supervisor's children, or itself)."""
    assert run.srv is not None
    tree = lb.proc_tree(run.srv.child.pid, lb._children())
    return [p for p in tree if p != run.srv.child.pid] or [run.srv.child.pid]


def spy(pid: int, workdir: Path, a: argparse.Namespace) -> lb.Child:
    """py-spy record of one server process over the window (--profile): collapsed stacks."""
    out = workdir / f"profile-{pid}.txt"
    cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid)]
    cmd += ["--duration", str(int(a.seconds)), "--rate", "200", "--format", "raw"]
    cmd += ["--output", str(out), "--nonblocking"]
    return lb.Child(f"py-spy-{pid}", cmd, workdir / f"py-spy-{pid}.log")


def cpu_between(a: Cpu, b: Cpu) -> dict[str, float]:
    """% of one core of each party (100 = one core busy) between two snapshots."""
    wall = max(1e-9, b.t - a.t)
    out = {f"{k}_pct": round(100 * (b.parts[k] - a.parts[k]) / wall, 1) for k in a.parts}
    ours = sum(b.parts[k] - a.parts[k] for k in a.parts)
    out["machine_busy_pct"] = round(100 * (b.busy - a.busy) / wall, 1)
    out["other_pct"] = round(100 * max(0.0, b.busy - a.busy - ours) / wall, 1)
    out["wall_s"] = round(wall, 3)
    return out


def run_bench(run: Run) -> dict[str, Any]:
    a = run.args
    run.red = lb.PrivateRedis(run.workdir / "redis")
    print(f"redis-server {run.red.version} on port {run.red.port}")
    run.wms, wms_port, wms_out = start_wms(run.workdir)
    print(f"fake WMS on 127.0.0.1:{wms_port} (pid {run.wms.pid})")
    env = {"STOCKHOLD_DELIVERY_ENABLED": "true", **a.env}
    run.srv = lb.start_server("stockhold", a.workers, run.red, run.workdir, lb.Variant("d", env))
    target = run.srv.target
    print(f"stockhold serve --workers {a.workers} on {target} (pid {run.srv.child.pid}); {env}")
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.InventoryStub(channel)
    subscribe(stub, wms_port)
    t = time.monotonic()
    xadd = a.producer == "xadd"
    asyncio.run(load_stock(target, 1 if xadd else a.units))
    partitions = int(env.get("STOCKHOLD_PARTITIONS", DEFAULT_PARTITIONS))
    template = template_event(stub, run.red, partitions) if xadd else ""
    # (a run with STOCKHOLD_DELIVERY_ENABLED=false, for reference, delivers nothing)
    delivering = env["STOCKHOLD_DELIVERY_ENABLED"].strip().lower() in ("1", "true", "yes", "on")
    drained = wait_drained(stub, 120) if delivering else 0.0
    print(
        f"stock: {1 if xadd else a.units} receipt(s) in {time.monotonic() - t:.1f} s; "
        "their events delivered " + ("(drained)" if drained is not None else "NOT drained in 120 s")
    )
    if drained is None:
        raise lb.Abort("the stock load's events did not drain within 120 s")
    if delivering:
        print(f"leases per process: {wait_balanced(run.red, partitions, a.workers)}")

    # drivers: each its share of the rate, starting together (or the xadd producer)
    count = round(a.rate * a.seconds)
    n_drivers = 1 if xadd else a.drivers
    shares = [count // n_drivers + (1 if k < count % n_drivers else 0) for k in range(n_drivers)]
    start_at = time.time() + 3.0 + 0.5 * n_drivers
    outs = []
    if xadd:
        out = run.workdir / "producer.json"
        outs.append(out)
        args = ["--producer-child", "--target", run.red.url, "--rate", str(a.rate)]
        args += ["--count", str(count), "--start-at", repr(start_at), "--prefix", "db-x"]
        args += ["--units", str(a.units), "--partitions", str(partitions), "--out", str(out)]
        args += ["--seed", str(a.seed), "--template", template]
        if a.hint_interval is not None:
            args += ["--hint-interval", str(a.hint_interval)]
        run.drivers.append(child_python("producer", args, run.workdir))
        shares = []
    for k, n in enumerate(shares):
        out = run.workdir / f"driver-{k}.json"
        outs.append(out)
        args = ["--driver-child", "--target", target, "--rate", str(a.rate / a.drivers)]
        args += ["--count", str(n), "--start-at", repr(start_at), "--prefix", f"db-d{k}"]
        args += ["--units", str(a.units), "--channels", str(a.channels), "--out", str(out)]
        args += ["--seed", str(a.seed + k)]
        run.drivers.append(child_python(f"driver-{k}", args, run.workdir))
    while time.time() < start_at:
        time.sleep(0.01)
    t0 = time.monotonic()
    c0 = cpu_now(run)
    what = "xadd producer" if xadd else f"{a.drivers} driver(s)"
    print(f"offering {a.rate:g} events/s for {a.seconds:g} s from the {what}")
    spies = [spy(pid, run.workdir, a) for pid in server_workers(run)] if a.profile else []
    while time.monotonic() - t0 < a.seconds:
        run.samples.append(sample(stub, t0, "load"))
        time.sleep(max(0.0, a.sample - (time.monotonic() - t0) % a.sample))
    c1 = cpu_now(run)
    for child in spies:
        with contextlib.suppress(Exception):
            child.proc.wait(15)
    drain_t0 = time.monotonic()
    drain_s = None
    while time.monotonic() - drain_t0 < a.drain_timeout:
        s = sample(stub, t0, "drain")
        run.samples.append(s)
        if s.get("backlog") == 0 and not any(d.alive() for d in run.drivers):
            drain_s = round(time.monotonic() - drain_t0, 2)
            break
        time.sleep(a.sample)
    for d in run.drivers:
        with contextlib.suppress(Exception):
            d.proc.wait(CALL_TIMEOUT_S + 10)
        if d.proc.returncode != 0:
            run.problems.append(f"{d.name} exited with {d.proc.returncode}; see {d.log}")
    final = sample(stub, t0, "end")
    channel.close()
    slowlog = [
        {"ms": round(x["duration"] / 1000, 1), "command": lb_text(x["command"])[:120]}
        for x in run.red.client.slowlog_get(32)
    ]
    # the WMS hands over what it received
    run.wms.stop()
    received = orjson.loads(wms_out.read_bytes()) if wms_out.exists() else []
    if not wms_out.exists():
        run.problems.append("the fake WMS wrote nothing")
    drv = [orjson.loads(p.read_bytes()) for p in outs if p.exists()]
    streams = stream_keys(run.red, partitions)
    result = analyse(a, drv, received, streams, run.samples)
    result["cpu"] = cpu_between(c0, c1)
    # what the server spent per event the WMS took within the window (delivery alone with
    # --producer xadd: the server does nothing else then)
    in_window = sum(1 for r in received if 200 <= r[4] < 300 and c0.wall <= r[3] < c1.wall)
    server_s = c1.parts["server"] - c0.parts["server"]
    result["cpu"]["delivered_in_window"] = in_window
    result["cpu"]["server_us_per_delivered"] = (
        round(1e6 * server_s / in_window, 1) if in_window else None
    )
    result["drain_after_window_s"] = drain_s
    result["final_lag"] = final
    result["redis_slowlog"] = slowlog  # the slowest calls (>10 ms), if any
    result["server_log_warnings"] = warnings(run.srv.child.log)
    return result


def warnings(log: Path, limit: int = 20) -> list[str]:
    """The server's WARNING lines (first `limit`, and how many of each message)."""
    seen: Counter[str] = Counter()
    with contextlib.suppress(OSError), log.open(errors="replace") as f:
        for line in f:
            if '"level":"WARNING"' in line or '"level":"ERROR"' in line:
                with contextlib.suppress(orjson.JSONDecodeError):
                    seen[str(orjson.loads(line).get("msg", ""))[:100]] += 1
    return [f"{n} x {m}" for m, n in seen.most_common(limit)]


def stream_keys(red: lb.PrivateRedis, partitions: int) -> set[str]:
    """Every event key "<partition>:<ms>-<seq>" in every partition's stream."""
    resolver = KeyResolver(partitions=partitions)
    keys: set[str] = set()
    for p in range(partitions):
        stream = resolver.events_key(p)
        last = "-"
        while True:
            got: list[Any] = list(red.client.xrange(stream, min=last, max="+", count=10_000) or [])
            if last != "-":
                got = got[1:]
            if not got:
                break
            keys.update(f"{p}:{lb_text(eid)}" for eid, _ in got)
            last = lb_text(got[-1][0])
    return keys


def lb_text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def compare(received: list[list[Any]], streams: set[str]) -> dict[str, Any]:
    """What the WMS took (2xx) against every event key in the streams."""
    taken = Counter(r[0] for r in received if 200 <= r[4] < 300)
    missing = sorted(streams - set(taken))
    return {
        "stream_events": len(streams),
        "posts": len(received),
        "posts_2xx": sum(taken.values()),
        "distinct_events_taken": len(taken),
        "duplicates": sum(n - 1 for n in taken.values() if n > 1),
        "bad_signatures": sum(1 for r in received if not r[5]),
        "missing_events": len(missing),
        "missing_events_sample": missing[:10],
        "unknown_events": len(set(taken) - streams),
    }


def analyse(
    a: argparse.Namespace,
    drivers: list[dict[str, Any]],
    received: list[list[Any]],
    streams: set[str],
    samples: list[dict[str, Any]],
) -> dict[str, Any]:
    """Rates, lag, end-to-end delay and the correctness checks."""
    orders = [o for d in drivers for o in d["orders"]]
    codes = Counter(o[1] for o in orders)
    sent = sum(d["sent"] for d in drivers)
    first = min((d["first_sent"] for d in drivers), default=0.0)
    last = max((d["last_sent"] for d in drivers), default=0.0)
    span = max(1e-9, last - first)
    ok_2xx = [r for r in received if 200 <= r[4] < 300]
    delivery = compare(received, streams)
    reserved_at: dict[str, float] = {}
    for r in ok_2xx:
        if r[1] == EVENT_RESERVED and r[2] not in reserved_at:
            reserved_at[r[2]] = r[3]
    ok_orders = [o for o in orders if o[1] == "OK"]
    delays = [reserved_at[o[0]] - o[2] for o in ok_orders if o[0] in reserved_at]
    # from the event's own time (Redis TIME in the Reserve's script: same host, same clock)
    # to its arrival: independent of how late the drivers saw their answers
    from_event = [r[3] - r[6] / 1000 for r in ok_2xx if r[1] == EVENT_RESERVED and r[6]]
    missing_orders = [o[0] for o in ok_orders if o[0] not in reserved_at]
    load = [s for s in samples if s["phase"] == "load" and "error" not in s]
    backlogs = [float(s["backlog"]) for s in load]
    checks = {
        "every_stream_event_delivered": delivery["missing_events"] == 0,
        "every_ok_order_has_its_event": not missing_orders,
        "signatures_ok": delivery["bad_signatures"] == 0,
        "no_unknown_events": delivery["unknown_events"] == 0,
    }
    return {
        "offered": {
            "rate_per_s": a.rate,
            "seconds": a.seconds,
            "drivers": a.drivers,
            "producer": a.producer,
            "sent": sent,
            "achieved_rate_per_s": round(sent / span, 1),
            "late_sends": sum(d["late"] for d in drivers),
            "late_threshold_ms": LATE_S * 1000,
            "lateness_p99_ms": max((d["lateness_p99_ms"] or 0 for d in drivers), default=None),
            "lateness_max_ms": max((d["lateness_max_ms"] or 0 for d in drivers), default=None),
            "unanswered": sum(d["unanswered"] for d in drivers),
            "answers": dict(codes),
            "ok_per_s": round(codes.get("OK", 0) / span, 1),
        },
        "lag": {
            "samples_in_window": len(load),
            "failed_samples": Counter(
                s["error"] for s in samples if s["phase"] == "load" and "error" in s
            ),
            "backlog_max": max(backlogs, default=None),
            "backlog_p99": pct(backlogs, 0.99),
            "backlog_p50": pct(backlogs, 0.5),
            "statuses_seen": sorted({s["status"] for s in load}),
            "slow_consumer_seen": any(s["slow_consumer"] for s in load),
            "stayed_below_50": bool(backlogs) and max(backlogs) < BACKLOG_TARGET,
            "wms_p99_ms_max": max((s["wms_p99_ms"] for s in load), default=None),
        },
        "e2e_delay_ms": {
            "orders": len(delays),
            "p50": ms(pct(delays, 0.5)),
            "p99": ms(pct(delays, 0.99)),
            "max": ms(max(delays, default=None)),
            "min": ms(min(delays, default=None)),
        },
        "event_ts_to_wms_ms": {
            "events": len(from_event),
            "p50": ms(pct(from_event, 0.5)),
            "p99": ms(pct(from_event, 0.99)),
            "max": ms(max(from_event, default=None)),
        },
        "delivery": {
            **delivery,
            "ok_orders_without_event": len(missing_orders),
            "ok_orders_without_event_sample": missing_orders[:10],
        },
        "checks": checks,
    }


def print_report(r: dict[str, Any]) -> None:
    o, g, e, d, c = r["offered"], r["lag"], r["e2e_delay_ms"], r["delivery"], r["cpu"]
    print(
        f"\noffered {o['rate_per_s']:g}/s x {o['seconds']:g} s: sent {o['sent']} at "
        f"{o['achieved_rate_per_s']:.0f}/s, late sends (>{o['late_threshold_ms']:g} ms) "
        f"{o['late_sends']}, lateness p99 {o['lateness_p99_ms']} ms max {o['lateness_max_ms']} ms;"
        f" answers {o['answers']} ({o['ok_per_s']:.0f} OK/s)"
    )
    print(
        f"backlog over {g['samples_in_window']} samples: max {g['backlog_max']}, p99 "
        f"{g['backlog_p99']}, p50 {g['backlog_p50']}; statuses {g['statuses_seen']}; "
        f"below 50 throughout: {g['stayed_below_50']}; WMS p99 up to {g['wms_p99_ms_max']} ms; "
        f"drained {r['drain_after_window_s']} s after the window"
    )
    print(
        f"end-to-end (Reserve answer -> WMS got ORDER_RESERVED), {e['orders']} orders: "
        f"p50 {e['p50']} ms, p99 {e['p99']} ms, max {e['max']} ms (min {e['min']} ms)"
    )
    f = r["event_ts_to_wms_ms"]
    print(
        f"event ts (Redis time of the Reserve) -> WMS, {f['events']} events: p50 {f['p50']} ms, "
        f"p99 {f['p99']} ms, max {f['max']} ms"
    )
    print(
        f"delivery: {d['stream_events']} stream events, {d['posts_2xx']} POSTs taken, "
        f"{d['distinct_events_taken']} distinct, duplicates {d['duplicates']}, missing "
        f"{d['missing_events']}, OK orders without event {d['ok_orders_without_event']}, bad "
        f"signatures {d['bad_signatures']}"
    )
    print(
        f"CPU (% of one core) over the window: server {c['server_pct']}, redis {c['redis_pct']}, "
        f"WMS {c['wms_pct']}, drivers {c['drivers_pct']}; machine {c['machine_busy_pct']} of "
        f"{100 * (os.cpu_count() or 1)}, other {c['other_pct']}"
    )
    print(
        f"server CPU per event delivered in the window: {c['server_us_per_delivered']} µs "
        f"({c['delivered_in_window']} events)"
    )
    if g["failed_samples"]:
        print(f"GetSubscriptionLag samples that failed: {dict(g['failed_samples'])}")
    if r["redis_slowlog"]:
        slow = max(r["redis_slowlog"], key=lambda x: x["ms"])
        print(f"Redis slowlog: {len(r['redis_slowlog'])} calls > 10 ms, slowest {slow}")
    for line in r["server_log_warnings"]:
        print(f"server log: {line}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=2000.0, help="Reserve calls offered per second")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the offered load")
    p.add_argument("--drivers", type=int, default=2, help="driver processes sharing the rate")
    p.add_argument("--channels", type=int, default=4, help="gRPC connections per driver")
    p.add_argument("--workers", type=int, default=2, help="stockhold serve --workers")
    p.add_argument("--units", type=int, default=2000, help="sales units the orders spread over")
    p.add_argument("--sample", type=float, default=0.5, help="GetSubscriptionLag period, s")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="after the window, s")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="repeatable: more environment for the server (e.g. STOCKHOLD_DELIVERY_BATCH=500)",
    )
    p.add_argument(
        "--producer",
        choices=("reserve", "xadd"),
        default="reserve",
        help="reserve: driver processes calling Reserve; xadd: one process appending the "
        "events straight to the streams (delivery measured apart from Reserve)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy record each server process over the window (`pip install py-spy`): "
        "collapsed stacks in the work folder, profile-<pid>.txt",
    )
    p.add_argument("--seed", type=int, default=20261202)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument(
        "--strict", action="store_true", help="exit 1 also when a target is missed (backlog < 50)"
    )
    # the children: this script again
    p.add_argument("--wms-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--driver-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--producer-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--partitions", type=int, help=argparse.SUPPRESS)
    p.add_argument("--template", help=argparse.SUPPRESS)
    p.add_argument(
        "--hint-interval",
        type=float,
        default=None,
        help="--producer xadd: s between two hint PUBLISHes (default: the server's, "
        "delivery.wake.HINT_INTERVAL; 0.001 is how often a server published before it)",
    )
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    env = {}
    for item in a.env:
        key, eq, value = item.partition("=")
        if not eq or not key.replace("_", "").isalnum():
            p.error(f"--env {item!r}: NAME=VALUE")
        env[key] = value
    a.env = env
    if not (a.rate > 0 and a.seconds > 0 and 1 <= a.drivers <= 16 and a.units >= 1):
        p.error("--rate and --seconds > 0, --drivers 1..16, --units >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.wms_child:
        a.out.write_bytes(orjson.dumps(asyncio.run(wms_main(a.port))))
        return 0
    if a.driver_child:
        a.out.write_bytes(orjson.dumps(asyncio.run(driver_main(a))))
        return 0
    if a.producer_child:
        a.out.write_bytes(orjson.dumps(producer_main(a)))
        return 0
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    workdir = a.out_dir / f"delivery-{stamp}-work"
    workdir.mkdir()

    def on_signal(signum: int, frame: Any) -> None:
        raise lb.Abort(f"stopped by signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(int(a.seconds + a.drain_timeout + 400))
    busy = lb.idle_check()
    print(f"delivery bench {stamp}: {os.cpu_count()} cores, {busy:.0f}% of one core busy before")
    run = Run(a, workdir)
    result: dict[str, Any] = {}
    failure = None
    try:
        result = run_bench(run)
    except (lb.Abort, KeyboardInterrupt, grpc.RpcError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
        print(f"\nABORTED: {failure}", file=sys.stderr)
    finally:
        signal.alarm(0)
        for d in run.drivers:
            d.stop(5)
        if run.srv is not None:
            rc = run.srv.child.stop()
            if rc not in (0, None):
                run.problems.append(f"stockhold exited with {rc} on SIGTERM")
            run.problems += [f"server log: {x}" for x in run.srv.child.log_problems()[:5]]
        if run.wms is not None:
            run.wms.stop(5)
        if run.red is not None:
            run.red.stop()
    if result:
        print_report(result)
    targets = {
        "rate_offered": bool(result) and result["offered"]["achieved_rate_per_s"] >= 0.98 * a.rate,
        "backlog_below_50": bool(result) and result["lag"]["stayed_below_50"],
    }
    checks = result.get("checks", {})
    ok = failure is None and bool(checks) and all(checks.values())
    print("checks: " + (", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items())))
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    for line in run.problems:
        print(f"  problem: {line}")
    doc = {
        "started_utc": stamp,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "machine": {"cores": os.cpu_count(), "busy_before_pct": round(busy, 1)},
        "redis": {"version": run.red.version if run.red else None},
        **lb.versions(),
        **result,
        "targets": targets,
        "samples": run.samples,
        "problems": run.problems,
        "failure": failure,
    }
    out = a.out_dir / f"delivery-{stamp}.json"
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"JSON: {out}\nlogs: {workdir}")
    if a.strict and not all(targets.values()):
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
