"""Delivering again (issue 12, docs/events.md "Replay"): ReplayFailed and ReplayFrom.

ReplayFailed reads every partition's failed set (stream id -> entry ms) and the stored POST
bodies, merges them in their original time order (entry ms, then partition, then sequence),
keeps those the filter accepts (by the body's type, warehouses and SKUs) and POSTs each as it
was first sent (same body, same Idempotency-Key, signed with the current secret). One the WMS
takes leaves the failed set (ZREM + HDEL, one slot); the first one refused stops the replay,
so what stays failed is still in time order. ReplayFrom moves every partition's group back
(or forward) to a cursor's positions: the deliverer then reads what follows again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from stockhold.delivery import wire
from stockhold.delivery.subscriptions import StoredSubscription, Subscription, SubscriptionStore
from stockhold.events import EventFilter, StreamId, parse_id


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a ReplayFailed did: delivered (and cleared), still failed (matching), why it
    stopped early ("" when it did not)."""

    delivered: int
    remaining: int
    error: str


@dataclass(frozen=True, slots=True)
class RewindResult:
    """What a ReplayFrom did: partitions moved, and those whose stream no longer holds the
    cursor's position (trimmed: they restart at their oldest kept event)."""

    partitions: int
    truncated: int


@dataclass(frozen=True, slots=True)
class FailedEvent:
    """One entry of a failed set, with the body stored when it failed."""

    partition: int
    stream_id: str
    body: bytes | None

    @property
    def order(self) -> tuple[int, int, int]:
        ms, seq = parse_id(self.stream_id)
        return ms, self.partition, seq

    @property
    def key(self) -> str:
        return f"{self.partition}:{self.stream_id}"


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _body(stored: Any) -> bytes | None:
    """The POSTed body of a failedev value (JSON {"body": text, ...}); None if unreadable."""
    if stored is None:
        return None
    try:
        record = orjson.loads(stored)
    except orjson.JSONDecodeError:
        return None
    body = record.get("body") if isinstance(record, dict) else None
    return body.encode() if isinstance(body, str) else None


def accepted(wanted: EventFilter, body: bytes | None) -> bool:
    """Whether the filter accepts the event a body carries (an unreadable body passes only an
    empty filter, so it is never silently skipped by an unfiltered replay)."""
    try:
        e = orjson.loads(body) if body is not None else None
    except orjson.JSONDecodeError:
        e = None
    if not isinstance(e, dict):
        return wanted == EventFilter()

    def texts(name: str) -> list[str]:
        values = e.get(name)
        return [v for v in values if isinstance(v, str)] if isinstance(values, list) else []

    etype = e.get("type")
    return wanted.accepts(
        etype if isinstance(etype, str) else "", texts("warehouses"), texts("skus")
    )


async def failed_events(store: SubscriptionStore, name: str) -> list[FailedEvent]:
    """Every failed event of the subscription, in time order (ms, partition, seq)."""
    parts = range(store.partitions)
    cmds: list[tuple[Any, ...]] = []
    for p in parts:
        cmds += [
            ("ZRANGE", store.failed_key(name, p), 0, -1),
            ("HGETALL", store.failed_events_key(name, p)),
        ]
    replies = await store.calls.pipeline(cmds)
    found: list[FailedEvent] = []
    for p in parts:
        members, stored = replies[2 * p], replies[2 * p + 1]
        if isinstance(stored, dict):
            bodies = {_text(k): v for k, v in stored.items()}
        else:
            items = list(stored or ())
            bodies = {_text(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}
        for m in members or ():
            sid = _text(m)
            found.append(FailedEvent(p, sid, _body(bodies.get(sid))))
    found.sort(key=lambda f: f.order)
    return found


async def replay_failed(
    store: SubscriptionStore, stored: StoredSubscription, wanted: EventFilter, max_events: int
) -> ReplayResult:
    """POST the matching failed events in time order, clearing each the WMS takes; stop at
    the first refused (or after `max_events`, 0: no bound)."""
    name = stored.sub.name
    todo = [f for f in await failed_events(store, name) if accepted(wanted, f.body)]
    delivered = 0
    error = ""
    async with aiohttp.ClientSession() as session:
        for f in todo:
            if max_events and delivered >= max_events:
                break
            if f.body is None:
                error = f"event {f.key}: no stored body to send"
                break
            result = await wire.post(session, stored, f.key, f.body)
            if not result.ok:
                error = f"event {f.key}: {result.error}"
                break
            await store.calls.pipeline(
                [
                    ("ZREM", store.failed_key(name, f.partition), f.stream_id),
                    ("HDEL", store.failed_events_key(name, f.partition), f.stream_id),
                ]
            )
            delivered += 1
    return ReplayResult(delivered, len(todo) - delivered, error)


async def replay_from(
    store: SubscriptionStore, sub: Subscription, positions: Sequence[StreamId]
) -> RewindResult:
    """Set every partition's group to its position ((0, 0): the oldest kept event)."""
    firsts = await store.set_position(sub, [f"{ms}-{seq}" for ms, seq in positions])
    truncated = sum(
        1
        for pos, first in zip(positions, firsts, strict=True)
        if first and pos != (0, 0) and parse_id(first) > pos
    )
    return RewindResult(len(positions), truncated)
