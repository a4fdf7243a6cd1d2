"""Wake-ups of the deliverer (stockhold.delivery.wake; docs/events.md "Pushing to a WMS"), on
both stores, against tests/fake_wms.py.

What is pinned:
- with a fallback poll of 30 s, events written after the partitions went idle reach the WMS
  within a bound far below it: only a hint can have woken them;
- with no subscription the hook is not installed and nothing is published;
- with the hint listener unable to connect, every event still reaches the WMS once, in stream
  order per partition, by the fallback poll; once it can connect again, hints work again.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fake_wms import FakeWMS
from stockhold_fixtures import Factory, Running, add_stock
from test_delivery import SECRET, _create, _events, _per_partition, _sub, _until, _wanted

from stockhold.delivery import wake
from stockhold.delivery.deliverer import Deliverer
from stockhold.settings import ConfigError, Settings
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

HUGE_FALLBACK = {"delivery_lease_seconds": 1.0, "delivery_poll_interval_seconds": 30.0}
WOKEN_WITHIN = 10.0  # s: far below the 30 s fallback, generous on a loaded box


@pytest.fixture
async def wms() -> AsyncIterator[FakeWMS]:
    w = await FakeWMS(SECRET).start()
    yield w
    await w.stop()


def _deliverer(running: Running) -> Deliverer:
    d = running.server.deliverer
    assert d is not None
    return d


async def _listening(running: Running) -> None:
    """Until the deliverer holds every partition and hears hints, and writes publish them."""
    d = _deliverer(running)
    partitions = running.settings.partitions

    async def ready() -> bool:
        return (
            len(d.parts) == partitions
            and d.hints.connected
            and running.server.engine.calls.on_script is not None
        )

    await _until("deliverer listening", ready)
    await asyncio.sleep(0.2)  # every partition past its first reads, waiting


async def test_a_hint_wakes_an_idle_partition_long_before_the_fallback(
    make_stockhold: Factory, wms: FakeWMS
) -> None:
    running = await make_stockhold(**HUGE_FALLBACK)
    sub = _sub("woken", wms.url())
    await _create(running, sub)
    await _listening(running)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        for i in range(3):  # each write after the partitions went idle again
            started = time.monotonic()
            await add_stock(stub, f"W{i}", "wh-1", 5)

            async def arrived(n: int = i + 1) -> bool:
                return len(wms.keys()) >= n

            await _until(f"event {i} delivered", arrived, within=WOKEN_WITHIN)
            assert time.monotonic() - started < WOKEN_WITHIN
    assert running.server.hints.published >= 3
    assert Counter(wms.keys()) == Counter(_wanted(await _events(running), sub))


async def test_nothing_is_published_without_a_subscription(make_stockhold: Factory) -> None:
    running = await make_stockhold(delivery_lease_seconds=0.3)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        for i in range(5):
            await add_stock(stub, f"N{i}", "wh-1", 5)
            await asyncio.sleep(0.1)  # past a refresh of the hook
    assert running.server.engine.calls.on_script is None
    assert running.server.hints.published == 0
    assert running.server.hints.pending == set()


async def test_delivery_falls_back_to_polling_while_the_listener_is_down(
    make_stockhold: Factory, wms: FakeWMS, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = wake.listener_client
    down = True

    def listener_client(client: Any) -> Any:
        if down:
            raise ConnectionError("hint listener made unreachable by the test")
        return real(client)

    monkeypatch.setattr(wake, "listener_client", listener_client)
    running = await make_stockhold(delivery_lease_seconds=1.0, delivery_poll_interval_seconds=0.2)
    sub = _sub("fallback", wms.url())
    await _create(running, sub)
    d = _deliverer(running)

    async def owns_all() -> bool:
        return len(d.parts) == running.settings.partitions

    await _until("leases taken", owns_all)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        for i in range(12):
            await add_stock(stub, f"F{i % 4}", "wh-1", 1)
    assert not d.hints.connected

    async def all_in() -> bool:
        return set(_wanted(await _events(running), sub)) <= set(wms.keys())

    await _until("delivered by polling", all_in)
    wanted = _wanted(await _events(running), sub)
    assert Counter(wms.keys()) == Counter(wanted)  # each once
    assert _per_partition(wms.keys()) == _per_partition(wanted)  # stream order

    down = False  # the listener reconnects (with backoff) and hears hints again

    async def connected() -> bool:
        return d.hints.connected

    await _until("listener back", connected)
    assert running.server.hints.published > 0  # the writes published all along


async def test_aiohttp_client_delivers_every_event_in_order_with_its_headers(
    make_stockhold: Factory, wms: FakeWMS
) -> None:
    """delivery_http_client = "aiohttp": the same requests, retries and order as the builtin."""
    running = await make_stockhold(
        delivery_http_client="aiohttp",
        delivery_lease_seconds=1.0,
        delivery_poll_interval_seconds=0.2,
    )
    sub = _sub("via-aiohttp", wms.url("/in"), max_attempts=5)
    await _create(running, sub)
    wms.fail_next(2)  # retried by the policy, same key and body
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        for i in range(10):
            await add_stock(stub, f"A{i % 3}", "wh-1", 1)

    async def all_in() -> bool:
        return set(_wanted(await _events(running), sub)) <= set(wms.keys())

    await _until("delivered over aiohttp", all_in)
    wanted = _wanted(await _events(running), sub)
    assert Counter(wms.keys()) == Counter(wanted)
    assert _per_partition(wms.keys()) == _per_partition(wanted)
    assert [r.status for r in wms.received[:2]] == [500, 500]
    for r in wms.received:
        assert r.signature_ok and r.key == r.headers["X-Stockhold-Event-Id"] == r.event["id"]
        assert r.headers["X-Stockhold-Subscription"] == "via-aiohttp"


def test_delivery_http_client_is_validated() -> None:
    chosen = Settings.from_env({"STOCKHOLD_DELIVERY_HTTP_CLIENT": "aiohttp"})
    assert chosen.delivery_http_client == "aiohttp"
    with pytest.raises(ConfigError, match="STOCKHOLD_DELIVERY_HTTP_CLIENT"):
        Settings.from_env({"STOCKHOLD_DELIVERY_HTTP_CLIENT": "curl"})
