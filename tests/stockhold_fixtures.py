"""Fixtures that run a real stockhold server in-process against a private redis-server.

Registered from conftest.py through `pytest_plugins`; the helpers below are imported by tests.

Stores: a module marked `pytestmark = pytest.mark.stores("standalone", "cluster")` runs each
test that uses Redis (`redis_proc`, hence `make_stockhold`, `stockhold`, `stub`) once per
store, with ids `[standalone]` and `[cluster]`. On "cluster", `redis_proc` is a ClusterStore:
one 3-master cluster for the session (tests/redis_cluster.py), flushed before each test, seen
through RedisProc's interface (url, client(), dump(), flush()), and stockhold servers get
`redis_cluster=True`, so Redis itself refuses any cross-slot call. `redis_any` gets a
`[cluster]` run beside its Redis versions. A test narrows it with its own marker
(`stores("standalone")`, with the reason in a comment); `cluster_bug(reason)` makes its
`[cluster]` run a strict xfail. Unmarked modules run on a standalone Redis only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import redis
import redis.asyncio
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from redis_cluster import RedisCluster
from redis_proc import redis_binaries

from stockhold import constants as c
from stockhold.server import StockholdServer
from stockhold.settings import Settings
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

TEST_SETTINGS = {
    "listen": "127.0.0.1:0",
    "partitions": 16,
    "sweep_interval_seconds": 0.2,
    "health_interval_seconds": 0.2,
    "shutdown_grace_seconds": 1.0,
}


STORES = ("standalone", "cluster")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "stores(*names): run the tests that use Redis once per store "
        "(standalone, cluster; tests/stockhold_fixtures.py)",
    )
    config.addinivalue_line(
        "markers",
        "cluster_bug(reason): the [cluster] run is a strict xfail (a known product bug)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("stores")
    names = marker.args or STORES if marker is not None else ("standalone",)
    bug = metafunc.definition.get_closest_marker("cluster_bug")

    def param(value: str, ident: str) -> Any:
        if bug is None or ident != "cluster":
            return pytest.param(value, id=ident)
        xfail = pytest.mark.xfail(strict=True, reason=f"cluster bug: {bug.args[0]}")
        return pytest.param(value, id=ident, marks=xfail)

    if marker is not None and "store" in metafunc.fixturenames:
        metafunc.parametrize("store", [param(n, n) for n in names], indirect=True)
    if "redis_any" in metafunc.fixturenames:
        # Once per Redis version on a standalone Redis (conftest.py), and once on the cluster.
        params = [param(path, ident) for ident, path in redis_binaries()] * ("standalone" in names)
        params += [param("cluster", "cluster")] * ("cluster" in names)
        metafunc.parametrize("redis_any", params, indirect=True)


@pytest.fixture
def store(request: pytest.FixtureRequest) -> str:
    """The kind of Redis behind `redis_proc`: "standalone" unless the module's `stores`
    marker parametrises it."""
    name: str = getattr(request, "param", "standalone")
    if name not in STORES:
        raise ValueError(f"unknown store {name!r}")
    return name


class _ClusterClient(redis.RedisCluster):
    """redis-py's RedisCluster whose KEYS and DBSIZE cover every master, as on one node
    (redis-py 8 sends them to one node unless target_nodes says otherwise)."""

    def keys(self, pattern: Any = "*", **kwargs: Any) -> Any:
        kwargs.setdefault("target_nodes", self.PRIMARIES)
        return super().keys(pattern, **kwargs)

    def dbsize(self, **kwargs: Any) -> Any:
        kwargs.setdefault("target_nodes", self.PRIMARIES)
        return super().dbsize(**kwargs)


class ClusterStore:
    """A Redis Cluster behind RedisProc's interface, for tests that run on both stores."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self._clients: list[redis.RedisCluster] = []
        self.servers: list[StockholdServer] = []  # started on it in this test (make_stockhold)

    @property
    def url(self) -> str:
        """A seed URL (the first master's)."""
        return self.cluster.url

    @property
    def masters(self) -> list[Any]:
        """The masters' RedisProcs (each serves a third of the slots)."""
        return self.cluster.masters

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        """A new sync cluster client (bytes responses; KEYS, DBSIZE and SCAN cover every
        master); closed after the test."""
        kwargs.setdefault("decode_responses", False)
        kwargs.setdefault("socket_timeout", 10.0)
        client = _ClusterClient(host="127.0.0.1", port=self.masters[0].port, **kwargs)
        self._clients.append(client)
        return client

    def flush(self) -> None:
        """FLUSHALL and SCRIPT FLUSH on every master: what a fresh standalone Redis holds."""
        for proc in self.masters:
            client = proc.client()
            client.flushall()
            client.script_flush()

    def dump(self, db: int = 0, with_ttl: bool = False) -> dict[bytes, object]:
        """RedisProc.dump() of every master, merged (a key lives on one master), less the
        abort sets that have a lifetime: the tombstones a refused cross-slot attempt leaves
        (crossslot.py) so that a late finish.lua is refused; one without a lifetime stays."""
        out: dict[bytes, object] = {}
        for proc in self.masters:
            for key, entry in proc.dump(db, with_ttl=True).items():
                kind, value, has_ttl = cast(tuple[str, object, bool], entry)
                if f":{c.ABORT}:".encode() in key and has_ttl:
                    continue
                out[key] = (kind, value, has_ttl) if with_ttl else (kind, value)
        return out

    def close(self) -> None:
        """Close the clients this test made; forget its servers."""
        self.servers.clear()
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()

    def healthy(self) -> bool:
        """Every master runs and says cluster_state:ok (a test may have broken it)."""
        try:
            return all(
                p.running and self.cluster.info(p)["cluster_state"] == "ok" for p in self.masters
            )
        except (redis.RedisError, OSError):
            return False


def is_cluster(store: Any) -> bool:
    """Whether a test's Redis (`redis_proc`, `Running.redis`) is a ClusterStore."""
    return isinstance(store, ClusterStore)


def store_settings(store: Any) -> dict[str, Any]:
    """The Settings fields that aim a stockhold server at a test's Redis."""
    return {"redis_url": store.url, "redis_cluster": is_cluster(store)}


def async_client(store: Any) -> redis.asyncio.Redis | redis.asyncio.RedisCluster:
    """An asyncio client of a test's Redis (the caller awaits its aclose())."""
    if is_cluster(store):
        return redis.asyncio.RedisCluster.from_url(store.url)
    return redis.asyncio.Redis.from_url(store.url)


# Each server publishes its contention figures every contention_flush_seconds (2 s) whatever
# the calls (contention_store.py: a heartbeat score and its head): not a write by any call.
# The prefix of META_CONTENTION, META_CONTENTION_SEEN and META_CONTENTION_SLOTS.
_HEARTBEAT = c.META_CONTENTION.encode()


async def snapshot(store: Any, with_ttl: bool = False) -> dict[bytes, object]:
    """`store.dump()` once every stockhold server on it has done its bookkeeping after its
    answers (on a cluster a cross-slot order's index moves follow the reply, within ms:
    CrossSlot.drain), less the contention publication (_HEARTBEAT: on a loaded box a test's
    refused calls outlast its 2 s period); what a "writes nothing" comparison needs."""
    for server in getattr(store, "servers", ()):
        if server.engine.cross is not None:
            await server.engine.cross.drain()
    return without_heartbeat(store.dump(with_ttl=with_ttl))


def without_heartbeat(dump: dict[bytes, object]) -> dict[bytes, object]:
    """A dump less the contention publication (_HEARTBEAT), which no call writes."""
    return {k: v for k, v in dump.items() if _HEARTBEAT not in k}


def spans_slots(running: Running, order_id: str, *skus: str) -> bool:
    """Whether, on a cluster, the order's record and some SKU's stock are in different
    partitions (a cross-slot order: crossslot.py); never on a standalone Redis."""
    if not is_cluster(running.redis):
        return False
    resolver = running.server.engine.resolver
    home = resolver.order(order_id).partition
    return any(u.partition != home for u in resolver.units([(s, "", "") for s in skus]))


async def wait_settled(store: Any, limit_s: float = 10.0) -> None:
    """Poll (bounded) until no cross-slot order waits for its parts to follow its record
    (every settle index empty; crossslot.py); at once on a standalone Redis. The limit is
    past the recovery window (5 s by default), which settles what a failed call left."""
    if not is_cluster(store):
        return
    client = store.client()
    give_up = time.monotonic() + limit_s
    for _ in range(1000):
        if not client.keys(f"*:{c.SETTLE}"):
            return
        assert time.monotonic() < give_up, f"parts still unsettled after {limit_s} s"
        await asyncio.sleep(0.02)
    raise AssertionError("parts still unsettled")


class _SharedCluster:
    """The session's cluster (starting one takes about 2 s), started by the first test that
    needs it; restarted if a test left it broken."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.started = 0
        self.current: ClusterStore | None = None

    def get(self) -> ClusterStore:
        if self.current is not None and not self.current.healthy():
            self.current.cluster.stop()
            self.current = None
        if self.current is None:
            cluster = RedisCluster(self.binary, self.workdir / f"cluster-{self.started}")
            self.started += 1
            self.current = ClusterStore(cluster.start())
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            self.current.cluster.stop()
            self.current = None


@pytest.fixture(scope="session")
def _shared_cluster(
    redis_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[_SharedCluster]:
    shared = _SharedCluster(redis_binary, tmp_path_factory.mktemp("cluster"))
    try:
        yield shared
    finally:
        shared.stop()


@pytest.fixture
def cluster_store(_shared_cluster: _SharedCluster) -> Iterator[ClusterStore]:
    """The session's 3-master cluster, empty (flushed) for this test."""
    current = _shared_cluster.get()
    current.flush()
    try:
        yield current
    finally:
        current.close()


@dataclasses.dataclass
class Running:
    """A started stockhold server and what a test needs to reach it."""

    server: StockholdServer
    settings: Settings
    redis: Any  # tests.redis_proc.RedisProc, or a ClusterStore
    address: str

    def channel(self) -> grpc.aio.Channel:
        """A new client channel (the caller closes it)."""
        return grpc.aio.insecure_channel(self.address)


Factory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def make_stockhold(redis_proc: Any) -> AsyncIterator[Factory]:
    """Start stockhold servers on free ports: `await make_stockhold(redis=..., **settings)`."""
    started: list[StockholdServer] = []

    async def start(redis: Any = None, **overrides: Any) -> Running:
        redis = redis or redis_proc
        settings = Settings(**{**TEST_SETTINGS, **store_settings(redis), **overrides})
        server = StockholdServer(settings, redis.url)
        port = await server.start()
        started.append(server)
        if is_cluster(redis):
            redis.servers.append(server)
        return Running(server, settings, redis, f"127.0.0.1:{port}")

    yield start
    for server in started:
        await server.stop(grace=0)


@pytest.fixture
async def stockhold(make_stockhold: Factory) -> Running:
    """One stockhold server on the default test Redis."""
    return await make_stockhold()


@pytest.fixture
async def stub(stockhold: Running) -> AsyncIterator[pb_grpc.InventoryStub]:
    """An Inventory client stub connected to `stockhold`."""
    async with stockhold.channel() as channel:
        yield pb_grpc.InventoryStub(channel)


@dataclasses.dataclass
class RichError:
    """What a client learns from a failed call."""

    code: grpc.StatusCode
    message: str
    reason: str | None
    metadata: dict[str, str]
    violations: dict[str, str]  # field -> description


def rich_error(err: grpc.aio.AioRpcError) -> RichError:
    """Decode google.rpc.Status details (ErrorInfo, BadRequest) from a failed call."""
    status = rpc_status.from_call(err)
    reason, metadata, violations = None, {}, {}
    for detail in status.details if status else ():
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            assert info.domain == "stockhold"
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Unpack(bad):
            violations = {v.field: v.description for v in bad.field_violations}
    return RichError(err.code(), err.details() or "", reason, metadata, violations)


async def expect_error(call: Awaitable[Any]) -> RichError:
    """Await a call that must fail; return its decoded error."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return rich_error(err)
    raise AssertionError("the call succeeded but was expected to fail")


def unit(sku: str, spec: str = "", barcode: str = "") -> pb.SalesUnit:
    """A SalesUnit message."""
    return pb.SalesUnit(sku=sku, spec=spec, barcode=barcode)


def line(
    sku: str, qty: int, warehouse: str = "", spec: str = "", barcode: str = ""
) -> pb.ReserveLine:
    """A ReserveLine message."""
    return pb.ReserveLine(unit=unit(sku, spec, barcode), warehouse=warehouse, quantity=qty)


async def add_stock(
    stub: pb_grpc.InventoryStub,
    sku: str,
    warehouse: str,
    delta: int,
    spec: str = "",
    barcode: str = "",
    adjustment_id: str | None = None,
) -> pb.AdjustStockResponse:
    """AdjustStock with a fresh adjustment id unless one is given."""
    import uuid

    return await stub.AdjustStock(
        pb.AdjustStockRequest(
            adjustment_id=adjustment_id or f"adj-{uuid.uuid4()}",
            unit=unit(sku, spec, barcode),
            warehouse=warehouse,
            delta=delta,
            reason="test",
        )
    )


async def levels(
    stub: pb_grpc.InventoryStub, *units: pb.SalesUnit
) -> dict[tuple[str, str, str, str], tuple[int, int, int]]:
    """(sku, spec, barcode, warehouse) -> (on_hand, available, reserved)."""
    reply = await stub.GetAvailability(pb.GetAvailabilityRequest(units=list(units)))
    return {
        (s.unit.sku, s.unit.spec, s.unit.barcode, s.warehouse): (s.on_hand, s.available, s.reserved)
        for s in reply.levels
    }


def records(running: Running) -> set[str]:
    """Order ids with a reservation record in Redis."""
    r = running.redis.client()
    return {k.decode().rsplit(":", 1)[1] for k in r.keys("sh:*:order:*")}


def reserved_events(running: Running) -> list[str]:
    """Order ids of every ORDER_RESERVED event, repeats included."""
    r = running.redis.client()
    return [
        f[b"order_id"].decode()
        for key in r.keys("sh:*:events")
        for _, f in r.xrange(key)
        if f[b"type"] == b"ORDER_RESERVED"
    ]
