"""The lean script protocol (issue 10, item 3): configuration in the script source, plain ARGV,
replies built as text, and a record layout every reader still understands.

- a fresh hold built from reserve.lua's short reply equals the record the script stored (read
  back through the same path a replay takes), for odd text, summed lines, splits, priorities
  given in the configuration, amounts and payments;
- the stored JSON fields and the ORDER_RESERVED event read as before;
- records as the previous reserve.lua wrote them (cjson's escaping, numbers formatted by Redis)
  still commit, release and expire;
- a script built for another configuration refuses the call instead of running with it;
- every operation's source (configuration and prelude cut to what it uses) compiles.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis
from redis_proc import RedisProc

from stockhold import scripts
from stockhold.engine import Engine, reserve_results
from stockhold.model import PendingPayment, Reservation, State
from stockhold.settings import Settings
from stockhold.store.calls import make_client

ODD_WH = '仓 "2"\\'  # quote, backslash and non-ASCII in a warehouse named by the configuration
SETTINGS = Settings(warehouse_priority=(ODD_WH,), redis_connect_timeout_seconds=5.0)


@pytest.fixture
async def engine(redis_proc: RedisProc) -> AsyncIterator[Engine]:
    e = Engine(make_client(redis_proc.url, SETTINGS), SETTINGS)
    try:
        yield e
    finally:
        await e.close()


def stored(redis_proc: RedisProc, key: str) -> dict[str, str]:
    raw = redis_proc.client().hgetall(key)
    return {k.decode(): v.decode() for k, v in raw.items()}


def reserved_events(redis_proc: RedisProc) -> dict[str, dict[str, Any]]:
    c = redis_proc.client()
    out: dict[str, dict[str, Any]] = {}
    for key in c.scan_iter(match="*:events"):
        for _, f in c.xrange(key):
            if f[b"type"] == b"ORDER_RESERVED":
                out[f[b"order_id"].decode()] = orjson.loads(f[b"data"])
    return out


async def test_a_fresh_hold_from_the_reply_equals_the_stored_record(
    engine: Engine, redis_proc: RedisProc
) -> None:
    r = engine.resolver
    odd = r.unit('SKU "q"\\/1', "spec é", "bc-1")
    plain = r.unit("SKU-2", "", "bc-2")
    seed = [(odd, 'wh "x"', 5), (odd, "w2", 2), (odd, ODD_WH, 3), (odd, "big", 100)]
    seed += [(plain, "w1", 10), (plain, "w2", 1)]
    for i, (u, wh, q) in enumerate(seed):
        await engine.adjust(f"seed-{i}", u, wh, q, "test", actor="test")
    max_hold = SETTINGS.max_hold_seconds
    cases = [
        # named warehouses; two lines of one unit and warehouse are held as their sum
        (
            "o-1",
            [(odd, 'wh "x"', 2), (plain, "w1", 1), (odd, 'wh "x"', 1)],
            0,
            0,
            None,
        ),
        # any warehouse: the configured priority first, though "big" has more
        ("o-2", [(odd, "", 2)], 30, 0, None),
        # any warehouse, more than any one has: split, most available first
        ("o-3", [(plain, "", 10)], 0, 0, None),
        # an amount and a payment to poll
        ("o-4", [(odd, "w2", 1)], 0, 1999, PendingPayment("wechatpay", 'otn-"1"')),
    ]
    for oid, lines, hold, amount, payment in cases:
        order = r.resolve_order(
            oid, [(u.sku, u.spec, u.barcode, wh, q) for u, wh, q in lines], hold, max_hold
        )
        fresh, replayed = await engine.reserve(order, amount=amount, payment=payment, actor="test")
        assert not replayed and fresh.state == State.HELD
        rec = stored(redis_proc, order.keys.order_key)
        assert Reservation.from_record(rec) == fresh, oid
        again, replayed = await engine.reserve(order, amount=amount, payment=payment, actor="test")
        assert replayed and again == fresh, oid
        # the JSON fields as readers expect them
        units = order.units
        assert orjson.loads(rec["units"]) == [[u.sku, u.spec, u.barcode] for u in units]
        assert orjson.loads(rec["keys"]) == [u.stock_key for u in units]
        skus = list(dict.fromkeys(u.sku for u in units))
        assert orjson.loads(rec["skeys"]) == [engine.sku_key(s) for s in skus]
        assert orjson.loads(rec["usk"]) == [skus.index(u.sku) + 1 for u in units]
        assert int(rec["cr"]) == fresh.created_ms
        assert int(rec["dl"]) == fresh.expires_ms
        assert int(rec["hold"]) == (hold or SETTINGS.default_hold_seconds)
        assert fresh.expires_ms - fresh.created_ms == int(rec["hold"]) * 1000

    held = {
        oid: {(a.sku, a.warehouse): a.quantity for a in res.allocations}
        for oid, res in [
            (o, Reservation.from_record(stored(redis_proc, r.order(o).order_key)))
            for o in ("o-1", "o-2", "o-3", "o-4")
        ]
    }
    assert held == {
        "o-1": {(odd.sku, 'wh "x"'): 3, (plain.sku, "w1"): 1},
        "o-2": {(odd.sku, ODD_WH): 2},
        "o-3": {(plain.sku, "w1"): 9, (plain.sku, "w2"): 1},
        "o-4": {(odd.sku, "w2"): 1},
    }
    events = reserved_events(redis_proc)
    assert events["o-1"]["allocations"] == [
        [odd.sku, odd.spec, odd.barcode, 'wh "x"', 3],
        [plain.sku, plain.spec, plain.barcode, "w1", 1],
    ]
    o4 = Reservation.from_record(stored(redis_proc, r.order("o-4").order_key))
    assert o4.payment is not None and o4.payment.next_poll_ms is not None
    assert events["o-4"] == {
        "allocations": [[odd.sku, odd.spec, odd.barcode, "w2", 1]],
        "expires_at": o4.expires_ms,
        "amount": 1999,
        "payment": {
            "provider": "wechatpay",
            "out_trade_no": 'otn-"1"',
            "next_poll_at": o4.payment.next_poll_ms,
        },
    }


def _cjson(text: str) -> str:
    """A JSON string as cjson writes it: '/' escaped too."""
    return orjson.dumps(text).decode().replace("/", "\\/")


async def test_records_written_by_the_previous_script_commit_release_and_expire(
    engine: Engine, redis_proc: RedisProc
) -> None:
    unit = engine.resolver.unit("SKU/1", "", "bc")
    await engine.adjust("seed", unit, "w1", 10, "test", actor="test")
    c = redis_proc.client()
    seconds, micros = c.time()
    now = seconds * 1000 + micros // 1000
    for oid, dl in [("legacy-c", now + 60_000), ("legacy-r", now + 60_000), ("legacy-e", now - 1)]:
        k = engine.resolver.order(oid)
        c.hincrby(unit.stock_key, "a:w1", -3)
        c.hincrby(unit.stock_key, "r:w1", 3)
        c.hset(
            k.order_key,
            mapping={
                "st": "H",
                "oid": oid,
                "fp": "0" * 32,
                "cr": now,
                "dl": dl,
                "hold": 60,
                "keys": f"[{_cjson(unit.stock_key)}]",
                "units": f"[[{_cjson(unit.sku)},{_cjson(unit.spec)},{_cjson(unit.barcode)}]]",
                "alloc": '[[1,"w1",3]]',
                "skeys": f"[{_cjson(engine.sku_key(unit.sku))}]",
                "usk": "[1]",
            },
        )
        c.zadd(k.expiry_key, {oid: dl})

    committed = await engine.commit("legacy-c", "pay-1", actor="test")
    assert committed.state == State.COMMITTED and committed.payment_ref == "pay-1"
    assert [(a.sku, a.warehouse, a.quantity) for a in committed.allocations] == [("SKU/1", "w1", 3)]
    released = await engine.release("legacy-r", "changed my mind", actor="test")
    assert released.state == State.RELEASED
    expired = await engine.get_reservation("legacy-e", actor="test")
    assert expired.state == State.EXPIRED
    [level] = await engine.availability([unit])
    # 10 - 3 committed; the released and the expired holds are back
    assert (level.available, level.reserved) == (7, 0)


async def test_a_script_built_for_another_configuration_refuses_the_call(
    engine: Engine, redis_proc: RedisProc
) -> None:
    other = Settings(event_stream_maxlen=1234, redis_connect_timeout_seconds=5.0)
    assert scripts.config_id(other) != scripts.config_id(SETTINGS)
    assert scripts.source("reserve", other) != scripts.source("reserve", SETTINGS)
    # settings the scripts do not read leave them as they are
    same = Settings(warehouse_priority=(ODD_WH,), redis_socket_timeout_seconds=3.0)
    assert scripts.source("reserve", same) == scripts.source("reserve", SETTINGS)

    unit = engine.resolver.unit("SKU-1", "", "bc")
    await engine.adjust("seed", unit, "w1", 10, "test", actor="test")
    order = engine.resolver.resolve_order(
        "o-1", [(unit.sku, unit.spec, unit.barcode, "w1", 1)], 0, SETTINGS.max_hold_seconds
    )
    stranger = Engine(make_client(redis_proc.url, other), other)
    try:
        keys, args = stranger.reserve_call([(order, "test")])
        with pytest.raises(redis.exceptions.ResponseError, match="STOCKHOLD_CONFIG"):
            await engine.scripts.reserve(keys=keys, args=args)
        queued = [(order, "test")]
        keys, args = engine.reserve_call(queued)
        [result] = reserve_results(queued, await engine.scripts.reserve(keys=keys, args=args))
        assert result.err is None and result.reservation is not None
    finally:
        await stranger.close()
    assert stored(redis_proc, order.keys.order_key)["st"] == "H"


def test_every_operation_compiles_with_only_the_helpers_it_uses(redis_proc: RedisProc) -> None:
    c = redis_proc.client()
    for name in scripts.OPERATIONS:
        c.script_load(scripts.source(name, SETTINGS))  # a Lua syntax error would raise here
    reserve = scripts.source("reserve", SETTINGS)
    assert "local function stale_buckets" in reserve  # used by sku_read, which reserve uses
    assert "local function alloc_payload" not in reserve
    assert "local function now_ms" in scripts.source("health", SETTINGS)
    assert "CFG_" not in scripts.source("health", SETTINGS)
