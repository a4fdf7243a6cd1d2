"""Helpers for the payment sync tests (issue 5): servers with payment providers, Redis dumps,
events by order, and reports."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio
from fake_wechatpay import FakeWeChatPay
from stockhold_fixtures import TEST_SETTINGS, Running, store_settings

from stockhold.payments.config import PaymentProviders
from stockhold.server import StockholdServer
from stockhold.settings import Settings
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

PAID = pb.PAYMENT_STATUS_PAID
FAILED = pb.PAYMENT_STATUS_FAILED
CLOSED = pb.PAYMENT_STATUS_CLOSED
WECHATPAY = "wechatpay"

Start = Callable[..., Awaitable[Running]]


async def start_server(
    redis: Any,
    started: list[StockholdServer],
    payments: PaymentProviders | None = None,
    **overrides: Any,
) -> Running:
    """A stockhold server on `redis` (a RedisProc or ClusterStore) with the given payment
    providers (None: from its settings); the caller stops everything in `started`."""
    settings = Settings(**{**TEST_SETTINGS, **store_settings(redis), **overrides})
    server = StockholdServer(settings, redis.url, payments=payments)
    started.append(server)
    port = await server.start()
    return Running(server, settings, redis, f"127.0.0.1:{port}")


def fake_config(fake: FakeWeChatPay, directory: Path) -> dict[str, Any]:
    """Settings that configure WeChat Pay from files, as an operator would, aimed at `fake`."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "apiclient_key.pem": fake.merchant_private_key_pem,
        "wechatpay_cert.pem": fake.platform_certificate_pem,
        "pub_key.pem": fake.platform_public_key_pem,
        "apiv3.key": fake.api_v3_key + b"\n",
    }
    for name, content in files.items():
        (directory / name).write_bytes(content)
    for secret in ("apiclient_key.pem", "apiv3.key"):  # refused if group/world-readable
        (directory / secret).chmod(0o600)
    return {
        "wechatpay_mchid": fake.mchid,
        "wechatpay_merchant_serial": fake.merchant_serial,
        "wechatpay_merchant_key_path": str(directory / "apiclient_key.pem"),
        "wechatpay_platform_certificate_paths": (str(directory / "wechatpay_cert.pem"),),
        "wechatpay_platform_public_key_id": fake.public_key_id,
        "wechatpay_platform_public_key_path": str(directory / "pub_key.pem"),
        "wechatpay_api_v3_key_path": str(directory / "apiv3.key"),
        "wechatpay_base_url": fake.base_url,
        "wechatpay_timeout_seconds": 2.0,
    }


async def dump(client: redis.asyncio.Redis | redis.asyncio.RedisCluster) -> dict[bytes, Any]:
    """Every key with its type and contents, except the contention snapshots that each server
    publishes on its own schedule."""
    out: dict[bytes, Any] = {}
    async for key in client.scan_iter(count=1000):
        if b"contention" in key:
            continue
        kind = (await client.type(key)).decode()
        value: Any
        if kind == "hash":
            value = await client.hgetall(key)
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = await client.xrange(key)
        elif kind == "string":
            value = await client.get(key)
        else:
            value = kind
        out[key] = (kind, value)
    return out


async def events(
    client: redis.asyncio.Redis | redis.asyncio.RedisCluster,
) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """order id -> [(event type, data)] over every partition stream, in stream order."""
    out: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    async for key in client.scan_iter(match="*:events", count=1000):
        for _, fields in await client.xrange(key):
            oid = fields.get(b"order_id")
            if oid is not None:
                out[oid.decode()].append((fields[b"type"].decode(), orjson.loads(fields[b"data"])))
    return out


# Fixtures (registered through conftest.py's pytest_plugins).


@pytest.fixture
async def fake() -> AsyncIterator[FakeWeChatPay]:
    """A fake WeChat Pay API on a free port."""
    async with FakeWeChatPay() as f:
        yield f


@pytest.fixture
async def servers(redis_proc: Any) -> AsyncIterator[Start]:
    """Start stockhold servers with payment providers: `await servers(payments, **settings)`;
    all stopped at the end."""
    started: list[StockholdServer] = []

    async def start(payments: PaymentProviders | None = None, **overrides: Any) -> Any:
        return await start_server(redis_proc, started, payments, **overrides)

    yield start
    for server in started:
        await server.stop(grace=0)


def report(
    order_id: str,
    transaction_id: str,
    status: int = PAID,
    amount: int = 4200,
    paid_at: str = "",
    provider: str = WECHATPAY,
) -> pb.ReportPaymentRequest:
    """A ReportPaymentRequest."""
    return pb.ReportPaymentRequest(
        order_id=order_id,
        provider=provider,
        transaction_id=transaction_id,
        status=status,
        amount=amount,
        paid_at=paid_at,
    )


def pending(out_trade_no: str, provider: str = WECHATPAY) -> pb.PaymentPending:
    """A PaymentPending message."""
    return pb.PaymentPending(provider=provider, out_trade_no=out_trade_no)


async def wait_for(
    check: Callable[[], Awaitable[bool]], within: float = 5.0, step: float = 0.02
) -> bool:
    """Poll `check` until it is true or `within` seconds passed; returns the last answer."""
    give_up = time.monotonic() + within
    while True:
        if await check():
            return True
        if time.monotonic() >= give_up:
            return False
        await asyncio.sleep(step)


async def state_of(stub: pb_grpc.InventoryStub, order_id: str) -> pb.Reservation:
    """GetReservation."""
    return await stub.GetReservation(pb.GetReservationRequest(order_id=order_id))
