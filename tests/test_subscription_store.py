"""The subscription store (issue 12, stockhold.delivery.subscriptions): definitions and consumer
groups in Redis, on one node and on a cluster.

What is pinned: a created subscription has its group on every partition's stream at the start
position; creating it again with the same definition changes nothing, with another is
SUBSCRIPTION_EXISTS; deleting drops the config, the name, the groups and the per-partition keys,
and deleting again is not an error; the validation of request fields names each bad field.
"""

from __future__ import annotations

import pytest
from stockhold_fixtures import Factory, async_client

from stockhold.delivery.subscriptions import (
    Subscription,
    SubscriptionStore,
    check_secret,
    check_subscription,
)
from stockhold.errors import DomainError, FieldViolation, Reason

pytestmark = pytest.mark.stores("standalone", "cluster")


def _sub(name: str = "wms-east", **overrides: object) -> Subscription:
    fields: dict[str, object] = {
        "name": name,
        "url": "http://127.0.0.1:9/hook",
        "types": (),
        "warehouses": ("wh-east",),
        "skus": (),
        "timeout_ms": 0,
        "max_attempts": 0,
        "initial_backoff_ms": 0,
        "max_backoff_ms": 0,
        "on_failure": "",
    }
    fields.update(overrides)
    out: list[FieldViolation] = []
    sub = check_subscription(**fields, out=out)  # type: ignore[arg-type]
    assert out == []
    return sub


async def _groups(store: SubscriptionStore, redis: object, group: str) -> dict[int, str]:
    """partition -> the group's last-delivered id, for partitions where the group exists."""
    client = async_client(redis)
    found: dict[int, str] = {}
    try:
        for p in range(store.partitions):
            for g in await client.xinfo_groups(store.stream_key(p)):
                name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                if name == group:
                    last = g["last-delivered-id"]
                    found[p] = last.decode() if isinstance(last, bytes) else last
    finally:
        await client.aclose()
    return found


async def test_create_get_list_delete(make_stockhold: Factory) -> None:
    running = await make_stockhold()
    store = SubscriptionStore(running.server.engine.calls)
    sub = _sub()
    stored, created = await store.create(sub, "", "now")
    assert created and stored.sub == sub and len(stored.secret) >= 32
    assert stored.created_ms > 0 and len(stored.secret_fingerprint) == 12
    assert (await store.get(sub.name)) == stored
    assert [s.sub.name for s in await store.all()] == [sub.name]
    groups = await _groups(store, running.redis, sub.group)
    assert sorted(groups) == list(range(store.partitions))

    again, created = await store.create(sub, "", "now")  # the same definition: a replay
    assert not created and again == stored
    with pytest.raises(DomainError) as err:
        await store.create(_sub(url="http://127.0.0.1:10/other"), "", "now")
    assert err.value.reason is Reason.SUBSCRIPTION_EXISTS
    with pytest.raises(DomainError):  # the same definition, another given secret
        await store.create(sub, "another-secret-of-16+", "now")
    assert (await store.get(sub.name)) == stored

    assert await store.delete(sub.name)
    assert await store.get(sub.name) is None and await store.all() == []
    assert await _groups(store, running.redis, sub.group) == {}
    assert not await store.delete(sub.name)


async def test_start_positions(make_stockhold: Factory) -> None:
    running = await make_stockhold()
    store = SubscriptionStore(running.server.engine.calls)
    positions = [(1000 + p, p) for p in range(store.partitions)]
    await store.create(_sub("from-cursor"), "s" * 16, positions)
    groups = await _groups(store, running.redis, "sub:from-cursor")
    assert groups == {p: f"{1000 + p}-{p}" for p in range(store.partitions)}
    await store.create(_sub("from-earliest"), "s" * 16, "earliest")
    assert set((await _groups(store, running.redis, "sub:from-earliest")).values()) == {"0-0"}
    firsts = await store.set_position(_sub("from-cursor"), ["0-0"] * store.partitions)
    assert len(firsts) == store.partitions
    assert set((await _groups(store, running.redis, "sub:from-cursor")).values()) == {"0-0"}


def test_validation_names_each_bad_field() -> None:
    out: list[FieldViolation] = []
    check_subscription(
        name="bad name!",
        url="ftp://x",
        types=("NOPE",),
        warehouses=("",),
        skus=(),
        timeout_ms=-1,
        max_attempts=1000,
        initial_backoff_ms=500,
        max_backoff_ms=100,
        on_failure="SOMETIMES",
        out=out,
    )
    check_secret("short", "secret", out)
    fields = {v.field for v in out}
    assert fields == {
        "subscription.name",
        "subscription.url",
        "subscription.types[0]",
        "subscription.warehouses[0]",
        "subscription.timeout_ms",
        "subscription.retry.max_attempts",
        "subscription.retry.max_backoff_ms",
        "subscription.on_failure",
        "secret",
    }


@pytest.mark.parametrize(
    "url",
    [
        "",
        "127.0.0.1:80/x",
        "http://",
        "http://u:p@127.0.0.1/x",
        "http://127.0.0.1:99999/x",
        "javascript:alert(1)",
        "http://127.0.0.1/a b",
    ],
)
def test_refused_urls(url: str) -> None:
    out: list[FieldViolation] = []
    check_subscription(
        name="n",
        url=url,
        types=(),
        warehouses=(),
        skus=(),
        timeout_ms=0,
        max_attempts=0,
        initial_backoff_ms=0,
        max_backoff_ms=0,
        on_failure="",
        out=out,
    )
    assert [v.field for v in out] == ["subscription.url"]
