"""SKU policies (issue 4): storage, validation, enforcement on Reserve, automatic hot detection."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import orjson
import pytest
from stockhold_fixtures import (
    Factory,
    Running,
    add_stock,
    expect_error,
    levels,
    line,
    snapshot,
    unit,
)

from stockhold.policies import PolicyCache, effective_timeout_ms
from stockhold.settings import Settings
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stores("standalone", "cluster")

HELD = pb.RESERVATION_STATE_HELD


def reserve(order_id: str, *lines: pb.ReserveLine, hold: int = 0) -> pb.ReserveRequest:
    return pb.ReserveRequest(order_id=order_id, lines=list(lines), hold_seconds=hold)


async def sell(
    stub: pb_grpc.InventoryStub, sku: str, units: int, spec: str = "", barcode: str = ""
) -> None:
    """Reserve and commit `units` of a unit (stock must be there), 100 at a time."""
    left = units
    while left > 0:
        q = min(100, left)
        oid = f"sale-{uuid.uuid4()}"
        await stub.Reserve(reserve(oid, line(sku, q, spec=spec, barcode=barcode)))
        await stub.Commit(pb.CommitRequest(order_id=oid))
        left -= q


# -- effective values -----------------------------------------------------------------------------


def test_effective_threshold_rules() -> None:
    s = Settings(reserve_timeout_ms=1000, hot_reserve_timeout_ms=300)
    assert effective_timeout_ms(0, hot=False, pinned=False, settings=s) == 1000
    assert effective_timeout_ms(0, hot=True, pinned=False, settings=s) == 300  # auto-hot
    assert effective_timeout_ms(800, hot=True, pinned=False, settings=s) == 300  # tightens
    assert effective_timeout_ms(200, hot=True, pinned=False, settings=s) == 200  # never loosens
    assert effective_timeout_ms(0, hot=True, pinned=True, settings=s) == 300  # operator's hot
    assert effective_timeout_ms(0, hot=False, pinned=True, settings=s) == 1000  # pinned cold
    assert effective_timeout_ms(700, hot=True, pinned=True, settings=s) == 700  # pinned explicit


def test_policy_cache_is_bounded_and_takes_the_strictest_sku() -> None:
    cache = PolicyCache(Settings(policy_cache_size=1000))
    for i in range(1_000_000):
        cache.update(f"sku-{i}", 0, False, False)
    assert len(cache) == 1000
    cache.update("hot", 0, True, False)
    cache.update("slow", 5000, False, True)
    assert cache.limit(["never-seen", "hot", "slow"]) == (300, "hot", True)
    assert cache.limit(["never-seen", "slow"]) == (1000, "never-seen", False)


# -- the RPCs -----------------------------------------------------------------------------------


async def test_set_get_keeps_fields_not_given_and_reset_deletes(
    stub: pb_grpc.InventoryStub, stockhold: Running
) -> None:
    empty = await stub.GetSkuPolicy(pb.GetSkuPolicyRequest(sku="TEE"))
    assert not empty.stored and not empty.effective_hot
    assert empty.effective_reserve_timeout_ms == 1000
    assert empty.effective_hold_seconds == stockhold.settings.default_hold_seconds

    p = await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="TEE", reserve_timeout_ms=450))
    assert (p.stored, p.reserve_timeout_ms, p.effective_reserve_timeout_ms) == (True, 450, 450)
    assert p.HasField("updated_at")
    p = await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="TEE", hold_seconds=600))
    assert (p.reserve_timeout_ms, p.hold_seconds, p.effective_hold_seconds) == (450, 600, 600)
    p = await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="TEE", hot=True, pinned=True))
    assert (p.hot, p.pinned, p.effective_hot, p.effective_reserve_timeout_ms) == (
        True,
        True,
        True,
        450,
    )
    p = await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="TEE", reserve_timeout_ms=0))
    assert p.effective_reserve_timeout_ms == 300  # pinned hot, no own threshold
    got = await stub.GetSkuPolicy(pb.GetSkuPolicyRequest(sku="TEE"))
    assert got == p

    gone = await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="TEE", reset=True))
    assert not gone.stored and not gone.pinned and gone.effective_reserve_timeout_ms == 1000
    listed = await stub.ListSkuPolicies(pb.ListSkuPoliciesRequest())
    assert [q.sku for q in listed.policies] == []

    # Every change is one event in the SKU's partition stream.
    r = stockhold.redis.client()
    kinds = []
    for key in r.keys("sh:*:events"):
        for _, fields in r.xrange(key):
            if fields[b"type"] == b"SKU_POLICY_CHANGED":
                kinds.append(orjson.loads(fields[b"data"])["reset"])
    assert kinds == [False, False, False, False, True]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.SetSkuPolicyRequest(sku="", reserve_timeout_ms=5), "sku"),
        (pb.SetSkuPolicyRequest(sku="T", reserve_timeout_ms=-1), "reserve_timeout_ms"),
        (pb.SetSkuPolicyRequest(sku="T", reserve_timeout_ms=60_001), "reserve_timeout_ms"),
        (pb.SetSkuPolicyRequest(sku="T", hold_seconds=31 * 86400), "hold_seconds"),
        (pb.SetSkuPolicyRequest(sku="T", max_line_quantity=-5), "max_line_quantity"),
        (pb.SetSkuPolicyRequest(sku="T"), "sku"),
        (pb.SetSkuPolicyRequest(sku="T", reset=True, hot=True), "reset"),
        (pb.SetSkuPolicyRequest(sku="T\x00", hot=True), "sku"),
    ],
)
async def test_bad_policy_is_refused_with_field_details_and_changes_nothing(
    stub: pb_grpc.InventoryStub, stockhold: Running, request_: pb.SetSkuPolicyRequest, field: str
) -> None:
    before = await snapshot(stockhold.redis)
    err = await expect_error(stub.SetSkuPolicy(request_))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.violations
    assert await snapshot(stockhold.redis) == before


async def test_list_pages_by_sku_and_filters_hot(stub: pb_grpc.InventoryStub) -> None:
    skus = [f"S{i:02d}" for i in range(25)]
    for i, sku in enumerate(skus):
        await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku=sku, hot=i % 5 == 0, pinned=True))
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = await stub.ListSkuPolicies(pb.ListSkuPoliciesRequest(page_size=10, page_token=token))
        seen += [p.sku for p in page.policies]
        token = page.next_page_token
        if not token:
            break
    assert seen == skus
    hot = await stub.ListSkuPolicies(pb.ListSkuPoliciesRequest(hot_only=True))
    assert [p.sku for p in hot.policies] == skus[::5]
    err = await expect_error(stub.ListSkuPolicies(pb.ListSkuPoliciesRequest(page_token="!!")))
    assert "page_token" in err.violations


# -- enforcement on Reserve --------------------------------------------------------------------


async def test_line_above_the_skus_max_quantity_is_refused_and_writes_nothing(
    stub: pb_grpc.InventoryStub, stockhold: Running
) -> None:
    await add_stock(stub, "TV", "w1", 100)
    await add_stock(stub, "CABLE", "w1", 100)
    await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="TV", max_line_quantity=2))
    before = await snapshot(stockhold.redis)
    err = await expect_error(stub.Reserve(reserve("o-1", line("CABLE", 5), line("TV", 3))))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "lines[1].quantity" in err.violations
    assert await snapshot(stockhold.redis) == before
    ok = await stub.Reserve(reserve("o-1", line("CABLE", 5), line("TV", 2)))
    assert ok.reservation.state == HELD


async def test_hold_length_request_then_strictest_sku_policy_then_default(
    stub: pb_grpc.InventoryStub, stockhold: Running
) -> None:
    for sku in ("A", "B", "C"):
        await add_stock(stub, sku, "w1", 10)
    await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="A", hold_seconds=900))
    await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="B", hold_seconds=600))

    def hold_of(r: pb.ReserveResponse) -> int:
        res = r.reservation
        return res.expires_at.seconds - res.created_at.seconds

    assert hold_of(await stub.Reserve(reserve("o-own", line("A", 1), hold=120))) == 120
    assert hold_of(await stub.Reserve(reserve("o-pol", line("A", 1), line("B", 1)))) == 600
    assert hold_of(await stub.Reserve(reserve("o-one", line("A", 1)))) == 900
    default = stockhold.settings.default_hold_seconds
    assert hold_of(await stub.Reserve(reserve("o-def", line("C", 1)))) == default


# -- automatic hot detection -------------------------------------------------------------------


async def test_committing_more_than_the_threshold_makes_a_sku_hot_until_sales_fall(
    make_stockhold: Factory,
) -> None:
    # A 3 s trailing window (3 buckets of 1 s) so that sales can fall out within the test.
    running = await make_stockhold(hot_window_seconds=3)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "HOT", "w1", 10_000, spec="red", barcode="1")
        await add_stock(stub, "HOT", "w1", 10_000, spec="blue", barcode="2")
        # Reserved but not committed units do not count.
        await stub.Reserve(reserve("held", line("HOT", 900, spec="red", barcode="1")))
        await sell(stub, "HOT", 500, spec="red", barcode="1")
        p = await stub.GetSkuPolicy(pb.GetSkuPolicyRequest(sku="HOT"))
        assert (p.committed_24h, p.effective_hot) == (500, False)  # not more than 500
        # One more unit, on another barcode of the same SKU: the SKU is what is counted.
        oid = "one-more"
        await stub.Reserve(reserve(oid, line("HOT", 1, spec="blue", barcode="2")))
        await stub.Commit(pb.CommitRequest(order_id=oid))
        p = await stub.GetSkuPolicy(pb.GetSkuPolicyRequest(sku="HOT"))
        assert (p.committed_24h, p.effective_hot, p.effective_reserve_timeout_ms) == (
            501,
            True,
            300,
        )
        # This process's reserve path knows it at once (the reserve reply carried it).
        await stub.Reserve(reserve("probe", line("HOT", 1, spec="red", barcode="1")))
        assert running.server.engine.policies.cache.limit(["HOT"]) == (300, "HOT", True)
        listed = await stub.ListSkuPolicies(pb.ListSkuPoliciesRequest(hot_only=True))
        assert [q.sku for q in listed.policies] == ["HOT"]

        # Pinning overrides: pinned not-hot stays cold whatever the sales.
        p = await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="HOT", hot=False, pinned=True))
        assert (p.effective_hot, p.effective_reserve_timeout_ms) == (False, 1000)
        await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="HOT", pinned=False))

        # Sales fall out of the trailing window bucket by bucket (they may span two 1 s
        # buckets): the SKU is cold as soon as at most 500 are left, and at last nothing is.
        seen: list[tuple[int, bool]] = []
        for _ in range(80):  # the window (3 s) plus a bucket, with room to spare
            await asyncio.sleep(0.1)
            p = await stub.GetSkuPolicy(pb.GetSkuPolicyRequest(sku="HOT"))
            seen.append((p.committed_24h, p.effective_hot))
            if p.committed_24h == 0:
                break
        assert seen[-1] == (0, False)
        assert all(hot == (sold > 500) for sold, hot in seen), seen
        assert await levels(stub, unit("HOT", "red", "1")) == {
            ("HOT", "red", "1", "w1"): (10_000 - 500, 10_000 - 500 - 901, 901)
        }


async def test_auto_hot_counts_committed_units_only_for_its_sku_and_survives_restart_of_cache(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold(hot_threshold_units=10)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "A", "w1", 100)
        await add_stock(stub, "B", "w1", 100)
        oid = "ab"
        await stub.Reserve(reserve(oid, line("A", 11), line("B", 3)))
        released = "released"
        await stub.Reserve(reserve(released, line("B", 50)))
        await stub.Release(pb.ReleaseRequest(order_id=released))
        await stub.Commit(pb.CommitRequest(order_id=oid))
        a = await stub.GetSkuPolicy(pb.GetSkuPolicyRequest(sku="A"))
        b = await stub.GetSkuPolicy(pb.GetSkuPolicyRequest(sku="B"))
        assert (a.committed_24h, a.effective_hot) == (11, True)
        assert (b.committed_24h, b.effective_hot) == (3, False)
    # A second process learns of the hot SKU from the background refresh, before any reserve.
    other = await make_stockhold(hot_threshold_units=10, policy_refresh_seconds=0.1)
    for _ in range(50):
        if other.server.engine.policies.cache.limit(["A"])[0] == 300:
            break
        await asyncio.sleep(0.1)
    assert other.server.engine.policies.cache.limit(["A", "B"]) == (300, "A", True)


@pytest.mark.stores("standalone")  # no Redis call: per-process memory, the same on a cluster
def test_per_process_sku_state_stays_bounded_with_a_million_distinct_skus(redis_proc: Any) -> None:
    """The reserve path's per-SKU memos (keys, thresholds) never grow past their bound."""
    from redis.asyncio import Redis

    from stockhold.engine import Engine

    engine = Engine(Redis.from_url(redis_proc.url), Settings(policy_cache_size=5000))
    for i in range(1_000_000):
        sku = f"sku-{i}"
        engine.sku_key(sku)
        engine.policies.cache.update(sku, 0, i % 2 == 0, False)
    assert len(engine._sku_keys) <= 5000
    assert len(engine.policies.cache) == 5000
    assert engine.sku_key("sku-999999") == engine.resolver.sku_key("sku-999999")
