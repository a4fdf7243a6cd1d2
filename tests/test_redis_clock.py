"""Deadlines come from Redis's clock only: shifting the app host's clock changes nothing.

The host clock (`time.time`, `time.monotonic`) is moved ten years ahead or back for the whole
test, server included; reserve, extend, GetReservation and the sweeper still follow Redis TIME.
The event loop (uvloop) keeps its own clock, so timers and Redis socket timeouts still work.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from stockhold_fixtures import Factory, add_stock, line

from stockhold import constants as c
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

# Bounds of this test's own loops, measured on the real clock (captured before patching).
_real_monotonic = time.monotonic
_real_time = time.time
TEN_YEARS = 10 * 365 * 86_400.0


def redis_ms(client: Any) -> int:
    """Redis's clock in ms (sync client)."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def expired_events(client: Any, order_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for key in client.scan_iter(match="*:events"):
        for _, fields in client.xrange(key):
            e = {k.decode(): v.decode() for k, v in fields.items()}
            if e["type"] == c.EVENT_EXPIRED and e["order_id"] == order_id:
                e["data"] = orjson.loads(e["data"])
                out.append(e)
    return out


@pytest.mark.parametrize("shift", [TEN_YEARS, -TEN_YEARS], ids=["ahead", "behind"])
async def test_shifting_the_host_clock_changes_no_deadline_and_no_expiry(
    make_stockhold: Factory, redis_proc: Any, monkeypatch: pytest.MonkeyPatch, shift: float
) -> None:
    monkeypatch.setattr(time, "time", lambda: _real_time() + shift)
    monkeypatch.setattr(time, "monotonic", lambda: _real_monotonic() + shift)
    assert abs(time.time() - _real_time() - shift) < 1  # the patch is in effect
    admin = redis_proc.client()
    running = await make_stockhold(sweep_interval_seconds=0.1)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "tee", "w1", 10)

        before = redis_ms(admin)
        held = (
            await stub.Reserve(
                pb.ReserveRequest(order_id="o-1", lines=[line("tee", 2, "w1")], hold_seconds=2)
            )
        ).reservation
        after = redis_ms(admin)
        created = held.created_at.ToMilliseconds()
        assert before <= created <= after
        assert held.expires_at.ToMilliseconds() - created == 2000

        before = redis_ms(admin)
        extended = (
            await stub.ExtendReservation(
                pb.ExtendReservationRequest(order_id="o-1", hold_seconds=2)
            )
        ).reservation
        after = redis_ms(admin)
        deadline = extended.expires_at.ToMilliseconds()
        assert before + 2000 <= deadline <= after + 2000

        # An engine sweep now (host clock far off either way) expires nothing.
        assert await running.server.engine.expire_due(actor="test") == 0

        # Poll (bounded by the real clock) until the sweeper expired it; HELD before.
        give_up = _real_monotonic() + 6
        seen_held = False
        for _ in range(300):
            sent_at = redis_ms(admin)
            r = await stub.GetReservation(pb.GetReservationRequest(order_id="o-1"))
            if redis_ms(admin) < deadline:
                assert r.state == pb.RESERVATION_STATE_HELD
                seen_held = True
            elif sent_at >= deadline:
                assert r.state == pb.RESERVATION_STATE_EXPIRED
            if expired_events(admin, "o-1"):
                break
            assert _real_monotonic() < give_up, "never swept"
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("never swept")

        assert seen_held
        (e,) = expired_events(admin, "o-1")
        assert deadline <= int(e["ts"]) <= deadline + 2000
        r = await stub.GetReservation(pb.GetReservationRequest(order_id="o-1"))
        assert r.state == pb.RESERVATION_STATE_EXPIRED
        assert r.expires_at.ToMilliseconds() == deadline
        assert deadline <= r.updated_at.ToMilliseconds() <= deadline + 2000
