"""Failover and resharding under Reserve load on Redis Cluster (issue 11), through gRPC.

A real cluster (tests/redis_cluster.py) and an in-process stockhold server on it; several
clients send Reserves (single-slot orders, whose units share the order's partition, and
cross-slot ones) over units spread across every master, with ample stock.

Failover: a master is SIGKILLed, its replica promoted, then the dead node restarted (it
rejoins as the new master's replica, which `--redis-wait-replicas 1` needs to write again).
Resharding: the slots of several partitions' hash tags `{p<N>}` (and their neighbours) move
between masters (MIGRATE of the keys + SETSLOT) while the load runs.

Either way every call either succeeds or answers UNAVAILABLE, and retrying an UNAVAILABLE
Reserve with the same order id and lines succeeds (bounded); afterwards, past the recovery
window, the invariants of tests/test_cluster_crash.py hold. With WAIT no acknowledged Reserve
is lost; without it the acknowledged Reserves lost are counted (not asserted: Redis's
replication is asynchronous) and written with the failover figures to
bench/results/cluster_failover_<UTC>.json.

The long instances (`-m cluster_long`, `make test-cluster`) repeat these runs; `make test`
runs one short instance of each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from redis.crc import key_slot
from redis_cluster import RedisCluster
from redis_proc import RedisProc
from stockhold_fixtures import TEST_SETTINGS, add_stock, line
from test_cluster_crash import check_invariants

from stockhold import constants as c
from stockhold.engine import Engine
from stockhold.resolver import KeyResolver
from stockhold.server import StockholdServer
from stockhold.settings import Settings
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

WAREHOUSES = ("east", "west")
STOCK = 1_000_000  # ample: no Reserve is refused for stock
SKUS_PER_PARTITION = 2
RECOVERY_WINDOW_S = 1.0
CALL_DEADLINE_S = 30.0  # a server that hangs shows as DEADLINE_EXCEEDED (a failure)
RETRY_PAUSE_S = 0.1
RETRY_LIMIT_S = 90.0  # how long one order is retried after UNAVAILABLE
CLUSTER_LIMIT_S = 60.0  # promotion, rejoin, a slot's migration
LOAD_LIMIT_S = 180.0  # a load phase reaching its count of acknowledged orders
CUT_S = 0.3  # the replica misses this much of the writes before the kill
# An Inventory stub on a grpc.aio channel (the generated types describe the blocking stub).
Stub = Any
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


@dataclasses.dataclass(frozen=True)
class Shape:
    """How much load a run puts on the cluster."""

    clients: int
    before: int  # acknowledged orders before the fault
    after: int  # ... and after the cluster is whole again


SHORT = Shape(clients=4, before=60, after=60)
LONG = Shape(clients=6, before=200, after=200)


@dataclasses.dataclass
class Load:
    """What the clients saw."""

    acked: dict[str, pb.ReserveRequest] = dataclasses.field(default_factory=dict)
    cross: set[str] = dataclasses.field(default_factory=set)  # cross-slot order ids
    calls: int = 0
    unavailable: list[float] = dataclasses.field(default_factory=list)  # monotonic times
    retried: set[str] = dataclasses.field(default_factory=set)  # ids that saw UNAVAILABLE
    bad: list[str] = dataclasses.field(default_factory=list)  # any other outcome
    progress: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


# -- the deployment --------------------------------------------------------------------------
def server_settings(url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        **TEST_SETTINGS,
        "redis_url": url,
        "redis_cluster": True,
        "recovery_window_seconds": RECOVERY_WINDOW_S,
    }
    return Settings(**{**base, **overrides})


@contextlib.asynccontextmanager
async def serving(cluster: RedisCluster, **overrides: Any) -> AsyncIterator[tuple[Settings, str]]:
    """A stockhold server on `cluster` (seeded by its first master): (settings, address)."""
    settings = server_settings(cluster.url, **overrides)
    server = StockholdServer(settings, cluster.url)
    port = await server.start()
    try:
        yield settings, f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=0)


def skus_by_partition(resolver: KeyResolver) -> dict[int, list[str]]:
    """SKUS_PER_PARTITION SKU names in every partition (so on every master)."""
    found: dict[int, list[str]] = {p: [] for p in range(resolver.partitions)}
    for i in range(100_000):
        sku = f"fo-sku-{i}"
        names = found[resolver.unit(sku, "", "").partition]
        if len(names) < SKUS_PER_PARTITION:
            names.append(sku)
        if all(len(v) == SKUS_PER_PARTITION for v in found.values()):
            return found
    raise AssertionError("no SKU names for every partition")


async def stock_all(
    stub: Stub, resolver: KeyResolver, skus: dict[int, list[str]]
) -> dict[tuple[str, str], int]:
    stocked: dict[tuple[str, str], int] = {}
    for names in skus.values():
        for sku in names:
            for wh in WAREHOUSES:
                await add_stock(stub, sku, wh, STOCK, adjustment_id=f"init-{sku}-{wh}")
                stocked[(resolver.unit(sku, "", "").stock_key, wh)] = STOCK
    return stocked


def make_order(
    rng: random.Random, resolver: KeyResolver, skus: dict[int, list[str]], order_id: str
) -> tuple[pb.ReserveRequest, bool]:
    """A Reserve of 1..4 lines: half single-slot (units in the order's partition), half
    cross-slot (units of 1..3 other partitions, maybe the home one too)."""
    home = resolver.order(order_id).partition
    if rng.random() < 0.5:
        chosen = rng.sample(skus[home], rng.randint(1, len(skus[home])))
    else:
        others = rng.sample([p for p in skus if p != home], rng.randint(1, 3))
        chosen = [rng.choice(skus[p]) for p in others]
        if rng.random() < 0.3:
            chosen.append(rng.choice(skus[home]))
    lines = [line(s, rng.randint(1, 3), rng.choice(("", *WAREHOUSES))) for s in chosen]
    cross = any(resolver.unit(s, "", "").partition != home for s in chosen)
    return pb.ReserveRequest(order_id=order_id, lines=lines), cross


# -- the clients -----------------------------------------------------------------------------
async def reserve_until_ok(stub: Stub, req: pb.ReserveRequest, load: Load) -> None:
    """Reserve; after UNAVAILABLE the same request again (bounded in time and count)."""
    oid = req.order_id
    give_up = time.monotonic() + RETRY_LIMIT_S
    for _ in range(int(RETRY_LIMIT_S / RETRY_PAUSE_S) + 10):
        load.calls += 1
        try:
            reply = await stub.Reserve(req, timeout=CALL_DEADLINE_S)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                load.bad.append(f"{oid}: {err.code().name} {err.details()}")
                return
            load.unavailable.append(time.monotonic())
            load.retried.add(oid)
            if time.monotonic() > give_up:
                break
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        res = reply.reservation
        if res.order_id != oid or res.state != pb.RESERVATION_STATE_HELD:
            load.bad.append(f"{oid}: answered {res.order_id} in state {res.state}")
            return
        load.acked[oid] = req
        load.progress.set()
        return
    load.bad.append(f"{oid}: still UNAVAILABLE after {RETRY_LIMIT_S} s of retries")


async def client(
    stub: Stub,
    name: str,
    resolver: KeyResolver,
    skus: dict[int, list[str]],
    load: Load,
    stop: asyncio.Event,
) -> None:
    rng = random.Random(name)
    for i in range(1_000_000):
        if stop.is_set():
            return
        req, cross = make_order(rng, resolver, skus, f"{name}-{i}")
        if cross:
            load.cross.add(req.order_id)
        await reserve_until_ok(stub, req, load)


async def until_acked(load: Load, count: int, what: str) -> None:
    """Wait (bounded) until `count` orders were acknowledged in all."""
    give_up = time.monotonic() + LOAD_LIMIT_S
    while len(load.acked) < count:
        assert not load.bad, load.bad[:5]
        assert time.monotonic() < give_up, f"{what}: {len(load.acked)} of {count} acknowledged"
        load.progress.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(load.progress.wait(), 1.0)


@contextlib.asynccontextmanager
async def running_load(
    address: str, resolver: KeyResolver, skus: dict[int, list[str]], clients: int, tag: str
) -> AsyncIterator[Load]:
    """`clients` Reserve loops on their own channels; stopped (bounded) on exit."""
    load, stop = Load(), asyncio.Event()
    channels = [grpc.aio.insecure_channel(address) for _ in range(clients)]
    tasks = [
        asyncio.create_task(
            client(pb_grpc.InventoryStub(ch), f"{tag}-c{i}", resolver, skus, load, stop)
        )
        for i, ch in enumerate(channels)
    ]
    try:
        yield load
    finally:
        stop.set()
        # a client finishes its order in hand, retries included
        done, pending = await asyncio.wait(tasks, timeout=RETRY_LIMIT_S + CALL_DEADLINE_S + 10)
        for t in pending:
            t.cancel()
        for ch in channels:
            await ch.close()
        assert not pending, "a client did not stop"
        for t in done:
            t.result()


# -- checks ----------------------------------------------------------------------------------
def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def _hash(client: Any, key: str) -> dict[str, str]:
    return {_s(f): _s(v) for f, v in (await client.hgetall(key)).items()}


async def lost_acked(engine: Engine, load: Load) -> dict[str, list[str]]:
    """Acknowledged orders whose record, or one of whose parts, is not in Redis: order id ->
    what is missing ("record", "part <partition>")."""
    client: Any = engine.client
    cross = engine.cross
    assert cross is not None
    lost: dict[str, list[str]] = {}
    for oid in load.acked:
        home = await _hash(client, engine.resolver.order(oid).order_key)
        if home.get("st") != c.STATE_HELD:
            lost[oid] = [f"record {home.get('st', 'missing')}"]
            continue
        for p, nonce in orjson.loads(home.get("parts") or "[]"):
            got = await _hash(client, cross.part_key(int(p), oid))
            if got.get("nc") != str(nonce) or got.get("st") != c.STATE_HELD:
                lost.setdefault(oid, []).append(f"part {p} {got.get('st', 'missing')}")
    return lost


async def orphan_parts(engine: Engine, load: Load, oids: list[str]) -> int:
    """HELD parts of these orders whose record is missing (they hold stock until the hold's
    deadline + the recovery window, when recovery gives them back)."""
    client: Any = engine.client
    cross = engine.cross
    assert cross is not None
    count = 0
    for oid in oids:
        if await client.exists(engine.resolver.order(oid).order_key):
            continue
        for ln in load.acked[oid].lines:
            p = engine.resolver.unit(ln.unit.sku, "", "").partition
            got = await _hash(client, cross.part_key(p, oid))
            count += got.get("st") == c.STATE_HELD
    return count


async def found_by_grpc(stub: Stub, load: Load) -> list[str]:
    """Acknowledged orders GetReservation does not answer HELD with the same units."""
    missing: list[str] = []
    for oid, req in load.acked.items():
        try:
            res = await stub.GetReservation(
                pb.GetReservationRequest(order_id=oid), timeout=CALL_DEADLINE_S
            )
        except grpc.aio.AioRpcError as err:
            missing.append(f"{oid}: {err.code().name}")
            continue
        got: Counter[str] = Counter()
        for a in res.allocations:
            got[a.unit.sku] += a.quantity
        wanted = Counter({ln.unit.sku: ln.quantity for ln in req.lines})
        if res.state != pb.RESERVATION_STATE_HELD or got != wanted:
            missing.append(f"{oid}: {res.state} {dict(got)}")
    return missing


async def recover_until_quiet(engine: Engine) -> None:
    """Recovery passes until one finds nothing, after the window has passed (bounded)."""
    cross = engine.cross
    assert cross is not None
    await asyncio.sleep(RECOVERY_WINDOW_S + 0.2)
    give_up = time.monotonic() + 60
    while time.monotonic() < give_up:
        counts = await cross.recover()
        if not any(counts.values()):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("recovery did not settle within 60 s")


async def wait_for(check: Callable[[], bool], what: str) -> None:
    """Poll a blocking check in a thread (the server shares this loop), bounded."""
    give_up = time.monotonic() + CLUSTER_LIMIT_S
    while True:
        with contextlib.suppress(Exception):
            if await asyncio.to_thread(check):
                return
        assert time.monotonic() < give_up, f"timed out waiting until {what}"
        await asyncio.sleep(0.1)


def role(proc: RedisProc) -> dict[str, Any]:
    return proc.info("replication")


def cut_replication(master: RedisProc, replica: RedisProc) -> None:
    """Drop the replica's link and keep it down: the replica's reconnection fails (it sends a
    password the master has none for); its cluster bus stays up, so it can still be promoted.
    The master goes on answering its clients."""
    replica.client().config_set("masterauth", "cut-by-the-test")
    admin: Any = master.client()
    admin.execute_command("CLIENT", "KILL", "TYPE", "replica")


def cluster_ok(procs: list[RedisProc]) -> bool:
    return all(RedisCluster.info(p)["cluster_state"] == "ok" for p in procs)


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{name}_{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


# -- failover --------------------------------------------------------------------------------
async def failover_run(
    make_redis_cluster: Callable[..., RedisCluster],
    wait_replicas: int,
    shape: Shape,
    tag: str,
    victim_index: int = 0,
    cut_s: float = 0.0,
) -> dict[str, Any]:
    """One failover under load (of masters[victim_index]; the server's seed is masters[0]);
    asserts what must hold, returns the figures. With `cut_s` the replica's link is cut that
    long before the kill (`cut_replication`): writes acknowledged meanwhile reach no replica,
    as with a replication link that lags or drops."""
    cluster = make_redis_cluster(masters=3, replicas=1)
    try:
        return await _failover(cluster, wait_replicas, shape, tag, victim_index, cut_s)
    finally:
        await asyncio.to_thread(cluster.stop)


async def _failover(
    cluster: RedisCluster,
    wait_replicas: int,
    shape: Shape,
    tag: str,
    victim_index: int,
    cut_s: float,
) -> dict[str, Any]:
    victim = cluster.masters[victim_index]
    [heir] = cluster.replicas_of(victim)
    async with serving(cluster, redis_wait_replicas=wait_replicas) as (settings, address):
        resolver = KeyResolver(settings.key_prefix, settings.partitions)
        skus = skus_by_partition(resolver)
        assert {cluster.owner_of(key_slot(f"p{p}".encode())).port for p in skus} == {
            m.port for m in cluster.masters
        }
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            stocked = await stock_all(stub, resolver, skus)
            async with running_load(address, resolver, skus, shape.clients, tag) as load:
                await until_acked(load, shape.before, "before the kill")
                if cut_s:
                    await asyncio.to_thread(cut_replication, victim, heir)
                    await asyncio.sleep(cut_s)
                killed_at = time.monotonic()
                await asyncio.to_thread(victim.kill)
                if cut_s:
                    await asyncio.to_thread(heir.client().config_set, "masterauth", "")
                await wait_for(lambda: role(heir)["role"] == "master", "the replica is promoted")
                promoted_at = time.monotonic()
                live = [p for p in cluster.nodes if p is not victim]
                await wait_for(lambda: cluster_ok(live), "the cluster is ok without the victim")
                # The dead node comes back and rejoins as the new master's replica.
                await asyncio.to_thread(victim.restart)
                await wait_for(
                    lambda: (
                        role(victim).get("master_link_status") == "up" and cluster_ok(cluster.nodes)
                    ),
                    "the restarted node is the new master's replica",
                )
                rejoined_at = time.monotonic()
                await until_acked(load, len(load.acked) + shape.after, "after the rejoin")
            assert not load.bad, load.bad[:10]
            assert load.unavailable, "the failover failed no call: did it happen under load?"
            figures: dict[str, Any] = {
                "wait_replicas": wait_replicas,
                "victim": victim_index,
                "replication_cut_s": cut_s,
                "clients": shape.clients,
                "calls": load.calls,
                "acked": len(load.acked),
                "acked_cross_slot": len(load.cross & set(load.acked)),
                "failed_calls": len(load.unavailable),
                "orders_retried": len(load.retried),
                "failover_window_s": round(max(load.unavailable) - min(load.unavailable), 3),
                "kill_to_first_failure_s": round(min(load.unavailable) - killed_at, 3),
                "kill_to_promotion_s": round(promoted_at - killed_at, 3),
                "kill_to_rejoin_s": round(rejoined_at - killed_at, 3),
            }
            seed = next(m for m in cluster.masters if m is not victim)
            engine = Engine.connect(seed.url, settings)
            try:
                lost = await lost_acked(engine, load)
                figures["acked_lost"] = len(lost)
                figures["acked_lost_records"] = sum(
                    w[0].startswith("record") for w in lost.values()
                )
                figures["acked_lost_parts_only"] = len(lost) - figures["acked_lost_records"]
                figures["acked_lost_orders"] = {k: ", ".join(v) for k, v in lost.items()}
                if wait_replicas:
                    assert not lost, list(lost.items())[:10]
                    missing = await found_by_grpc(stub, load)
                    assert not missing, missing[:10]
                await recover_until_quiet(engine)
                try:
                    await check_invariants(engine, stocked)
                    figures["invariants"] = "hold"
                except AssertionError as err:
                    # Acknowledged writes lost (no WAIT): what it left behind is measured.
                    if not lost:
                        raise
                    figures["invariants"] = f"broken by the loss: {str(err).splitlines()[0]}"
                figures["orphan_parts_after_recovery"] = await orphan_parts(
                    engine, load, list(lost)
                )
            finally:
                await engine.close()
    print(f"failover run {tag}: {json.dumps(figures)}")
    return figures


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def dist(key: str) -> dict[str, float]:
        values = [r[key] for r in runs]
        return {
            "min": min(values),
            "median": statistics.median(values),
            "max": max(values),
            "total": sum(values),
        }

    keys = (
        "failover_window_s",
        "failed_calls",
        "acked",
        "acked_lost",
        "acked_lost_records",
        "acked_lost_parts_only",
        "orphan_parts_after_recovery",
        "kill_to_promotion_s",
    )
    return {"runs": len(runs), **{k: dist(k) for k in keys}}


async def test_failover_without_wait_short(
    make_redis_cluster: Callable[..., RedisCluster],
) -> None:
    figures = await failover_run(make_redis_cluster, 0, SHORT, "nowait")
    write_results("cluster_failover", {"short": True, "without_wait": {"runs": [figures]}})


async def test_failover_with_wait_loses_no_acknowledged_reserve_short(
    make_redis_cluster: Callable[..., RedisCluster],
) -> None:
    # The replica misses the last writes before the kill: WAIT must not acknowledge them.
    figures = await failover_run(make_redis_cluster, 1, SHORT, "wait", cut_s=CUT_S)
    assert figures["acked_lost"] == 0
    write_results("cluster_failover", {"short": True, "with_wait_1_cut": {"runs": [figures]}})


@pytest.mark.cluster_long
@pytest.mark.timeout(3600)
async def test_failover_repeated_long(make_redis_cluster: Callable[..., RedisCluster]) -> None:
    """Without WAIT: five plain kills and five with the replication link cut first (acked
    writes lost: measured); with WAIT 1 and the link cut: three runs, none lost. Each master
    dies in turn (the first is the server's seed)."""
    runs: dict[str, list[dict[str, Any]]] = {"without_wait": [], "without_wait_cut": []}
    runs["with_wait_1_cut"] = []
    for i in range(5):
        runs["without_wait"].append(
            await failover_run(make_redis_cluster, 0, LONG, f"nowait{i}", i % 3)
        )
    for i in range(5):
        runs["without_wait_cut"].append(
            await failover_run(make_redis_cluster, 0, LONG, f"nowait-cut{i}", i % 3, CUT_S)
        )
    for i in range(3):
        runs["with_wait_1_cut"].append(
            await failover_run(make_redis_cluster, 1, LONG, f"wait-cut{i}", i % 3, CUT_S)
        )
    assert all(r["acked_lost"] == 0 for r in runs["with_wait_1_cut"])
    report: dict[str, Any] = {
        name: {"summary": summary(rs), "runs": rs} for name, rs in runs.items()
    }
    path = write_results("cluster_failover", {"short": False, **report})
    print(f"failover summary ({path}):")
    print(json.dumps({name: r["summary"] for name, r in report.items()}, indent=1))


# -- resharding ------------------------------------------------------------------------------
def slot_range(cluster: RedisCluster, partition: int, width: int) -> list[int]:
    """The slot of `{p<partition>}` and up to `width` neighbours each side, same owner."""
    slot = key_slot(f"p{partition}".encode())
    owner = cluster.owner_of(slot)
    return [
        s
        for s in range(max(0, slot - width), min(16383, slot + width) + 1)
        if cluster.owner_of(s) is owner
    ]


def redirections(cluster: RedisCluster) -> dict[str, int]:
    """MOVED / ASK / TRYAGAIN replies the masters gave (INFO errorstats), summed."""
    out = {"MOVED": 0, "ASK": 0, "TRYAGAIN": 0}
    for proc in cluster.masters:
        stats = proc.info("errorstats")
        for name in out:
            entry = stats.get(f"errorstat_{name}")
            out[name] += int(entry.get("count", 0)) if isinstance(entry, dict) else 0
    return out


def migrate_range(cluster: RedisCluster, slots: list[int], target: RedisProc, pause: float) -> int:
    """Begin every slot's migration, let calls meet ASK for `pause`, then MIGRATE each slot's
    keys and hand the slot over; returns the keys the range held."""
    sources = [cluster.begin_migration(s, target) for s in slots]
    time.sleep(pause)
    keys = 0
    for s, source in zip(slots, sources, strict=True):
        admin: Any = source.client()
        keys += int(admin.execute_command("CLUSTER", "COUNTKEYSINSLOT", s))
        cluster.finish_migration(s, source, target)
    return keys


async def resharding_run(
    make_redis_cluster: Callable[..., RedisCluster],
    shape: Shape,
    moves: list[tuple[int, int]],
    width: int,
    tag: str,
) -> dict[str, Any]:
    """Reserves run while each (partition, target master index) move happens in turn."""
    cluster = make_redis_cluster(masters=3)
    try:
        async with serving(cluster) as (settings, address):
            resolver = KeyResolver(settings.key_prefix, settings.partitions)
            skus = skus_by_partition(resolver)
            async with grpc.aio.insecure_channel(address) as channel:
                stocked = await stock_all(pb_grpc.InventoryStub(channel), resolver, skus)
            moved_keys = 0
            async with running_load(address, resolver, skus, shape.clients, tag) as load:
                await until_acked(load, shape.before, "before the resharding")
                for partition, target_index in moves:
                    target = cluster.masters[target_index]
                    slots = slot_range(cluster, partition, width)
                    assert cluster.owner_of(slots[0]) is not target
                    acked = len(load.acked)
                    moved_keys += await asyncio.to_thread(
                        migrate_range, cluster, slots, target, 0.5
                    )
                    assert cluster.owner_of(key_slot(f"p{partition}".encode())) is target
                    # the load goes on against the new owner before the next move
                    await until_acked(load, acked + shape.after // len(moves), "after a move")
            assert not load.bad, load.bad[:10]
            assert moved_keys > 0, "the migrations moved no live key"
            figures = {
                "moves": len(moves),
                "keys_moved": moved_keys,
                "calls": load.calls,
                "acked": len(load.acked),
                "failed_calls": len(load.unavailable),
                "orders_retried": len(load.retried),
                "redirections": await asyncio.to_thread(redirections, cluster),
            }
            engine = Engine.connect(cluster.url, settings)
            try:
                assert not await lost_acked(engine, load)
                await recover_until_quiet(engine)
                await check_invariants(engine, stocked)
            finally:
                await engine.close()
    finally:
        await asyncio.to_thread(cluster.stop)
    print(f"resharding run {tag}: {json.dumps(figures)}")
    return figures


async def test_resharding_under_load_short(
    make_redis_cluster: Callable[..., RedisCluster],
) -> None:
    # {p3} and {p7} leave the first master for the second; {p2} the second for the third.
    await resharding_run(make_redis_cluster, SHORT, [(3, 1), (7, 1), (2, 2)], 2, "reshard")


@pytest.mark.cluster_long
@pytest.mark.timeout(1800)
async def test_resharding_under_load_long(
    make_redis_cluster: Callable[..., RedisCluster],
) -> None:
    # Slots of partitions on every master move, then some move back to where they were.
    moves = [(3, 1), (7, 2), (2, 0), (6, 2), (0, 1), (9, 0), (3, 0), (2, 1), (0, 2)]
    await resharding_run(make_redis_cluster, LONG, moves, 8, "reshard-long")
