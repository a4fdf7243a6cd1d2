"""Fixtures that run a real stockhold server in-process against a private redis-server.

Registered from conftest.py through `pytest_plugins`; the helpers below are imported by tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

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


@dataclasses.dataclass
class Running:
    """A started stockhold server and what a test needs to reach it."""

    server: StockholdServer
    settings: Settings
    redis: Any  # tests.redis_proc.RedisProc
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
        settings = Settings(**{**TEST_SETTINGS, "redis_url": redis.url, **overrides})
        server = StockholdServer(settings, redis.url)
        port = await server.start()
        started.append(server)
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
