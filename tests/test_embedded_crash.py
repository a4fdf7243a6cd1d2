"""An owner killed with SIGKILL: its embedded Redis follows it, and the next start serves.

Real processes throughout: `stockhold serve --data-dir D` (or a small Python owner of an
EmbeddedRedis) is killed with SIGKILL; the redis-server must not outlive it for long, and a new
start on the same data directory must serve every acknowledged hold with balanced counters.
Every wait polls with a bounded deadline; nothing depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis_proc import free_port, redis_binaries
from stockhold_fixtures import add_stock, line, unit
from test_process import STOCKHOLD, _alive, child_env
from test_workers import _children

from stockhold.embedded import EmbeddedRedis
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the parent-death signal is Linux-only"
)

BINARIES = redis_binaries()
START_TIMEOUT = 30.0  # a start on a loaded machine: generous, the test does not time it
GONE_TIMEOUT = 10.0  # a redis-server whose owner was killed exits within this
SERVING = health_pb2.HealthCheckResponse.SERVING

SKUS = ("crash-a", "crash-b", "crash-c")
WAREHOUSES = ("w1", "w2")
STOCK = 1_000_000  # per sku and warehouse: no reserve runs out
CLIENTS = 6
ACKED_BEFORE_KILL = 200  # acknowledged holds wanted before the kill (the load goes on)
MAX_CALLS_PER_CLIENT = 20_000


def _wait_gone(pid: int, within: float) -> float:
    """Poll until `pid` is gone; the seconds it took (fails after `within`)."""
    t0 = time.monotonic()
    while _alive(pid):
        if time.monotonic() - t0 > within:
            raise AssertionError(f"pid {pid} still runs {within} s after its owner was killed")
        time.sleep(0.05)
    return time.monotonic() - t0


def _redis_pid(data_dir: Path) -> int:
    return int((data_dir / "redis.pid").read_text().strip())


class Group:
    """`stockhold serve --data-dir D --workers N` as its own process group."""

    def __init__(self, data_dir: Path, log_path: Path, workers: int = 2) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.log_path = log_path
        cmd = [*STOCKHOLD, "serve", "--data-dir", str(data_dir), "--listen", self.address]
        cmd += ["--workers", str(workers)]
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=child_env(),
                start_new_session=True,  # pgid == pid: the supervisor and its workers
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_serving(self, within: float = START_TIMEOUT) -> float:
        """Poll health until SERVING; the seconds it took (fails after `within`)."""
        t0 = time.monotonic()
        async with grpc.aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() - t0 < within:
                if self.proc.poll() is not None:
                    raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == SERVING:
                        return time.monotonic() - t0
                await asyncio.sleep(0.1)
        raise AssertionError(f"not SERVING within {within} s:\n{self.log}")

    def kill_group(self) -> None:
        """SIGKILL to the supervisor and every worker at once, as an OOM killer would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(GONE_TIMEOUT)

    def stop(self) -> None:
        """Graceful stop (SIGTERM), else SIGKILL to the whole group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(GONE_TIMEOUT)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data directory (short path: unix sockets); a redis-server left on it is killed."""
    path = tmp_path / "d"
    yield path
    with contextlib.suppress(OSError, ValueError):
        pid = _redis_pid(path)
        if _alive(pid) and "redis" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def groups(tmp_path: Path) -> Iterator[list[Group]]:
    """Every Group a test starts is stopped when it ends."""
    started: list[Group] = []
    yield started
    for group in started:
        group.stop()


# -- the owner alone is killed ----------------------------------------------------------------

# An owner that starts its Redis from a short-lived thread (as asyncio.to_thread would): the
# parent-death signal follows the thread that forked, so this thread's exit must not stop it.
_OWNER = """
import sys, threading, time
from pathlib import Path
import redis
from stockhold.embedded import EmbeddedRedis
er = EmbeddedRedis(Path(sys.argv[1]), binary=sys.argv[2])
starter = threading.Thread(target=er.start)
starter.start()
starter.join()
client = redis.Redis.from_url(er.url, password=er.password)
client.set(b"k", b"v")
client.close()
print(er.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("binary", [p for _, p in BINARIES], ids=[i for i, _ in BINARIES])
def test_redis_exits_cleanly_when_its_owner_is_killed(
    data_dir: Path, tmp_path: Path, binary: str, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "owner.out"
    with out.open("wb") as f:
        owner = subprocess.Popen(
            [sys.executable, "-c", _OWNER, str(data_dir), binary],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not out.read_text().strip():
            assert owner.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "the owner never started its Redis"
            time.sleep(0.05)
        pid = int(out.read_text().split()[0])
        # The thread that started it has ended; Redis still serves its owner.
        assert _alive(pid)
        password = (data_dir / "redis.pass").read_text().strip()
        client = redis.Redis(unix_socket_path=str(data_dir / "redis.sock"), password=password)
        try:
            assert client.get(b"k") == b"v"
        finally:
            client.close()

        owner.kill()  # SIGKILL: the owner runs no cleanup at all
        owner.wait(GONE_TIMEOUT)
        _wait_gone(pid, GONE_TIMEOUT)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(GONE_TIMEOUT)

    # It got SIGTERM, which Redis handles as SHUTDOWN: AOF fsynced, socket and pid file gone.
    redis_log = (data_dir / "redis.log").read_text(errors="replace")
    assert "Received SIGTERM" in redis_log, redis_log[-2000:]
    assert not (data_dir / "redis.sock").exists()
    assert not (data_dir / "redis.pid").exists()

    # The data directory is free again: no orphan to stop, and the write is there.
    with caplog.at_level(logging.WARNING, logger="stockhold.embedded"):
        er = EmbeddedRedis(data_dir, binary=binary)
        er.start()
    try:
        assert not [r for r in caplog.records if getattr(r, "stopped_with", None)]
        client = redis.Redis.from_url(er.url, password=er.password)
        try:
            assert client.get(b"k") == b"v"
        finally:
            client.close()
    finally:
        er.stop()


# -- the supervisor and its workers are killed under load -------------------------------------


class Load:
    """Reserve calls from several clients; what was acknowledged and what was only tried."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.tried: set[str] = set()
        self.acked: dict[str, list[tuple[str, str, int]]] = {}  # id -> (sku, warehouse, qty)
        self.errors: dict[grpc.StatusCode, int] = defaultdict(int)
        self.killed = asyncio.Event()

    @staticmethod
    def request(client: int, n: int) -> pb.ReserveRequest:
        order_id = f"crash-{client}-{n}"
        first = SKUS[n % len(SKUS)]
        # Some lines name a warehouse, some let stockhold allocate; some orders have two lines.
        lines = [line(first, 1 + n % 3, warehouse=("", *WAREHOUSES)[n % 3])]
        if n % 4 == 0:
            lines.append(line(SKUS[(n + 1) % len(SKUS)], 1, warehouse=WAREHOUSES[n % 2]))
        return pb.ReserveRequest(order_id=order_id, lines=lines, hold_seconds=3600)

    async def client(self, client: int) -> None:
        # Its own channel, so the clients' connections spread over both workers.
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            for n in range(MAX_CALLS_PER_CLIENT):
                if self.killed.is_set():
                    return
                request = self.request(client, n)
                self.tried.add(request.order_id)
                try:
                    reply = await stub.Reserve(request, timeout=10.0)
                except grpc.aio.AioRpcError as err:
                    self.errors[err.code()] += 1
                    continue
                assert reply.reservation.state == pb.RESERVATION_STATE_HELD
                self.acked[request.order_id] = [
                    (a.unit.sku, a.warehouse, a.quantity) for a in reply.reservation.allocations
                ]


async def test_kill_9_under_load_then_restart_serves_every_acknowledged_hold(
    data_dir: Path, tmp_path: Path, groups: list[Group]
) -> None:
    first = Group(data_dir, tmp_path / "first.log")
    groups.append(first)
    print(f"first start SERVING after {await first.wait_serving():.2f} s")
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = pb_grpc.InventoryStub(channel)
        for sku in SKUS:
            for warehouse in WAREHOUSES:
                await add_stock(stub, sku, warehouse, STOCK)
    redis_pid = _redis_pid(data_dir)
    workers = [p for p in _children(first.proc.pid) if p != redis_pid]
    assert len(workers) == 2, workers

    load = Load(first.address)
    clients = [asyncio.create_task(load.client(c)) for c in range(CLIENTS)]
    try:
        deadline = time.monotonic() + 60.0
        while len(load.acked) < ACKED_BEFORE_KILL:
            assert time.monotonic() < deadline, f"load too slow: {len(load.acked)} acked"
            assert not any(t.done() for t in clients), [t for t in clients if t.done()]
            await asyncio.sleep(0.02)
        assert not any(t.done() for t in clients)  # mid-load: every client is still calling
        first.kill_group()
        load.killed.set()
        await asyncio.wait_for(asyncio.gather(*clients), timeout=60.0)
    finally:
        load.killed.set()
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)

    for pid in workers:
        _wait_gone(pid, GONE_TIMEOUT)
    took = _wait_gone(redis_pid, GONE_TIMEOUT)  # the parent-death signal, not a person
    print(
        f"redis-server exited {took:.2f} s after the kill; {len(load.acked)} holds acked, "
        f"{len(load.tried) - len(load.acked)} cut off by the kill; errors {dict(load.errors)}"
    )

    second = Group(data_dir, tmp_path / "second.log")
    groups.append(second)
    serving_after = await second.wait_serving()
    print(f"second start SERVING after {serving_after:.2f} s")
    assert "already answers" not in second.log

    held: dict[tuple[str, str], int] = defaultdict(int)
    async with grpc.aio.insecure_channel(second.address) as channel:
        stub = pb_grpc.InventoryStub(channel)

        async def get(order_id: str) -> pb.Reservation | None:
            try:
                return await stub.GetReservation(
                    pb.GetReservationRequest(order_id=order_id), timeout=10.0
                )
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND, (order_id, err)
                return None

        ids = sorted(load.tried)
        found: dict[str, pb.Reservation | None] = {}
        for i in range(0, len(ids), 50):  # 50 in flight at most
            batch = ids[i : i + 50]
            found.update(zip(batch, await asyncio.gather(*map(get, batch)), strict=True))
        for order_id, allocations in load.acked.items():
            reservation = found[order_id]
            assert reservation is not None, f"acknowledged hold {order_id} is gone"
            assert reservation.state == pb.RESERVATION_STATE_HELD, order_id
            got = [(a.unit.sku, a.warehouse, a.quantity) for a in reservation.allocations]
            assert sorted(got) == sorted(allocations), order_id
        # A call cut off by the kill may or may not have taken effect; either way the
        # counters must agree with the holds that exist.
        for reservation in found.values():
            if reservation is not None:
                assert reservation.state == pb.RESERVATION_STATE_HELD
                for a in reservation.allocations:
                    held[a.unit.sku, a.warehouse] += a.quantity
        reply = await stub.GetAvailability(
            pb.GetAvailabilityRequest(units=[unit(sku) for sku in SKUS])
        )
    levels = {(s.unit.sku, s.warehouse): s for s in reply.levels}
    assert set(levels) == {(sku, w) for sku in SKUS for w in WAREHOUSES}
    for key, level in levels.items():
        assert level.reserved == held[key], key
        assert level.available + level.reserved == STOCK, key
        assert level.on_hand == STOCK, key


async def test_orphan_of_a_killed_server_is_stopped_and_logged(
    data_dir: Path, tmp_path: Path, groups: list[Group]
) -> None:
    # An orphan the parent-death signal cannot end by itself: its Redis is stopped (SIGSTOP)
    # when the server is killed, so the SIGTERM waits. The next start must stop it and say so.
    first = Group(data_dir, tmp_path / "first.log", workers=1)
    groups.append(first)
    await first.wait_serving()
    redis_pid = _redis_pid(data_dir)
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        first.kill_group()
        assert _alive(redis_pid)

        second = Group(data_dir, tmp_path / "second.log", workers=1)
        groups.append(second)
        await second.wait_serving()
        _wait_gone(redis_pid, GONE_TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(redis_pid, signal.SIGCONT)
    lines = [text for text in second.log.splitlines() if '"stopped_with"' in text]
    assert len(lines) == 1, second.log
    record: dict[str, Any] = json.loads(lines[0])
    assert record["redis_pid"] == redis_pid
    assert record["data_dir"] == str(data_dir)
    assert record["stopped_with"] == "SIGTERM"
    assert record["previous_owner_pid"] == first.proc.pid
    assert f"pid {redis_pid}" in record["msg"]
