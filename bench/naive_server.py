"""The naive Reserve, kept in bench/ only: the lock-based design stockhold replaced.

A separate grpc.aio + uvloop server (the same stack as stockhold, run the same way:
`--workers N` processes on one SO_REUSEPORT port) whose Inventory.Reserve does what the old
design did, per request:

1. `SET lock NX PX 200` on every SKU+warehouse of the order (sorted, so two orders never wait
   on each other crosswise); a busy lock is retried after a short async sleep, bounded in
   attempts and time, after which the call fails with ABORTED;
2. read-modify-write: read the available stock (and whether the order exists), check it, then
   `HINCRBY` available -q / reserved +q and write the order record;
3. `DEL` the locks.

It exists only so that bench/loadbench.py can report "stockhold vs the naive lock" on the same
hardware. Nothing else here is implemented (other RPCs answer UNIMPLEMENTED), and stock is
seeded directly into Redis by the driver. Its keys (`naive:...`) never meet stockhold's.

    .venv/bin/python bench/naive_server.py --workers 2 --listen 127.0.0.1:50061 \
        --redis-url redis://127.0.0.1:6380/0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from types import FrameType
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from redis.asyncio import BlockingConnectionPool, Redis

from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

KEY_PREFIX = "naive"
LOCK_TTL_MS = 200
# A busy lock is retried after a random 1..3 ms sleep, at most LOCK_MAX_ATTEMPTS times and
# LOCK_MAX_WAIT_S seconds; then the call fails with ABORTED.
LOCK_RETRY_S = (0.001, 0.003)
LOCK_MAX_ATTEMPTS = 5000
LOCK_MAX_WAIT_S = 3.0
# Enough connections per worker that the pool is never what limits the naive design.
REDIS_MAX_CONNECTIONS = 256
STOP_GRACE_S = 10.0


def stock_key(sku: str, spec: str, barcode: str) -> str:
    """The naive design's stock hash: `a:<warehouse>` available, `r:<warehouse>` reserved."""
    return f"{KEY_PREFIX}:stock:{sku}:{spec}:{barcode}"


def lock_key(sku: str, spec: str, barcode: str, warehouse: str) -> str:
    """The per SKU+warehouse lock."""
    return f"{KEY_PREFIX}:lock:{sku}:{spec}:{barcode}:{warehouse}"


def order_key(order_id: str) -> str:
    """The naive order record."""
    return f"{KEY_PREFIX}:order:{order_id}"


class NaiveInventory(pb_grpc.InventoryServicer):
    """Inventory.Reserve with a Redis lock per SKU+warehouse; nothing else."""

    def __init__(self, client: Redis) -> None:
        self.client = client

    async def Reserve(
        self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReserveResponse:
        """Lock, read, check, write, unlock."""
        if not request.order_id or not request.lines:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "order_id and lines required")
        need: dict[tuple[str, str, str, str], int] = {}
        for ln in request.lines:
            if ln.quantity < 1 or not ln.warehouse or not ln.unit.sku:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad line")
            k = (ln.unit.sku, ln.unit.spec, ln.unit.barcode, ln.warehouse)
            need[k] = need.get(k, 0) + ln.quantity
        token = os.urandom(8).hex()
        locks = sorted(lock_key(*k) for k in need)
        held: list[str] = []
        try:
            for lk in locks:
                if not await self._acquire(lk, token):
                    await context.abort(grpc.StatusCode.ABORTED, "lock busy: gave up waiting")
                held.append(lk)
            ok = order_key(request.order_id)
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.exists(ok)
                for sku, spec, barcode, wh in need:
                    pipe.hget(stock_key(sku, spec, barcode), f"a:{wh}")
                exists, *avail = await pipe.execute()
            if exists:
                return self._response(request, replayed=True)
            for (sku, spec, barcode, wh), a in zip(need, avail, strict=True):
                if int(a or 0) < need[(sku, spec, barcode, wh)]:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not enough stock")
            async with self.client.pipeline(transaction=False) as pipe:
                for (sku, spec, barcode, wh), q in need.items():
                    sk = stock_key(sku, spec, barcode)
                    pipe.hincrby(sk, f"a:{wh}", -q)
                    pipe.hincrby(sk, f"r:{wh}", q)
                pipe.hset(ok, mapping={"st": "H", "created": int(time.time() * 1000)})
                await pipe.execute()
            return self._response(request, replayed=False)
        finally:
            if held:
                await self.client.delete(*held)

    async def _acquire(self, key: str, token: str) -> bool:
        """SET NX PX with bounded retries."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + LOCK_MAX_WAIT_S
        for _ in range(LOCK_MAX_ATTEMPTS):
            if await self.client.set(key, token, nx=True, px=LOCK_TTL_MS):
                return True
            if loop.time() >= give_up:
                return False
            await asyncio.sleep(random.uniform(*LOCK_RETRY_S))
        return False

    @staticmethod
    def _response(request: pb.ReserveRequest, replayed: bool) -> pb.ReserveResponse:
        allocations = [
            pb.Allocation(unit=ln.unit, warehouse=ln.warehouse, quantity=ln.quantity)
            for ln in request.lines
        ]
        reservation = pb.Reservation(
            order_id=request.order_id,
            state=pb.RESERVATION_STATE_HELD,
            allocations=allocations,
        )
        return pb.ReserveResponse(reservation=reservation, replayed=replayed)


async def serve(listen: str, redis_url: str) -> None:
    """One worker: serve until SIGTERM/SIGINT."""
    pool = BlockingConnectionPool.from_url(
        redis_url, max_connections=REDIS_MAX_CONNECTIONS, timeout=5.0, socket_timeout=5.0
    )
    client = Redis(connection_pool=pool)
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 1), ("grpc.max_concurrent_streams", 10_000)]
    )
    # Only Reserve is implemented; the other RPCs answer UNIMPLEMENTED (the base class).
    pb_grpc.add_InventoryServicer_to_server(NaiveInventory(client), server)  # type: ignore[abstract]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    await client.ping()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(STOP_GRACE_S)
    await client.aclose(close_connection_pool=True)


def supervise(args: argparse.Namespace) -> int:
    """Run `--workers` single-worker processes on one port; stop them all on SIGTERM/SIGINT."""
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cmd = [sys.executable, os.path.abspath(__file__), "--workers", "1"]
    cmd += ["--listen", args.listen, "--redis-url", args.redis_url]
    procs = [subprocess.Popen(cmd) for _ in range(args.workers)]
    code = 0
    while not stopping:
        time.sleep(0.1)
        if any(p.poll() is not None for p in procs):
            print("naive_server: a worker exited; stopping", file=sys.stderr)
            code = 1
            break
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S + 5.0
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return code


def main(argv: list[str] | None = None) -> int:
    """Command line: `--workers N --listen HOST:PORT --redis-url URL`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args(argv)
    if args.workers > 1:
        return supervise(args)
    uvloop.run(serve(args.listen, args.redis_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
