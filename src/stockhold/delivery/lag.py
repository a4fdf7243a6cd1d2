"""How far each subscription is behind (issue 12, docs/events.md "Lag and alerts").

Per subscription and partition, read from Redis in two pipelines (ScriptCalls.pipeline: one
per slot on a cluster):

* backlog: events not yet acknowledged = the group's pending entries + the entries after its
  last-delivered id. Redis 7 keeps the second figure (XINFO GROUPS `lag`); on Redis 6.2, or
  when Redis cannot tell (`lag` nil after a trim or a SETID), the entries are counted with a
  bounded XRANGE (at most COUNT_CAP: the backlog is then a lower bound);
* oldest_age_ms: Redis's clock minus the id time of the oldest unacknowledged entry (the
  smallest pending id, else the first entry after the last-delivered id);
* failed: the size of the failed set;
* rate, p50, p99, owner: the delivery statistics hash the lease owner writes about once a
  second (`up`: when); statistics older than STALE_MS say nobody delivers now: rate 0;
* lost: the statistics' `lost` field (events the stream's hard cap dropped unreceived).

A subscription sums backlog, failed, lost and rate over its partitions; its oldest age and
p99 are the partitions' largest, its p50 the mean of theirs weighted by their sample counts.
Its status is HEALTHY below `lag_warn_events`, ALERT at `lag_alert_events` or more, WARN in
between (each partition's likewise on its own backlog); `slow_consumer` when p99 is above
`slow_consumer_ms`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from stockhold.delivery.subscriptions import GROUP_PREFIX, SubscriptionStore
from stockhold.events import parse_id
from stockhold.settings import Settings

Status = Literal["HEALTHY", "WARN", "ALERT"]

COUNT_CAP: Final = 10_000
STALE_MS: Final = 10_000


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The backlog thresholds and the slow-consumer line in force."""

    warn_events: int = 50
    alert_events: int = 150
    slow_consumer_ms: int = 800

    @classmethod
    def of(cls, settings: Settings) -> Thresholds:
        return cls(settings.lag_warn_events, settings.lag_alert_events, settings.slow_consumer_ms)

    def status(self, backlog: int) -> Status:
        if backlog >= self.alert_events:
            return "ALERT"
        return "WARN" if backlog >= self.warn_events else "HEALTHY"


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """One partition of one subscription."""

    partition: int
    backlog: int
    oldest_age_ms: int
    failed: int
    rate: float
    p50_ms: float
    p99_ms: float
    samples: int
    status: Status
    owner: str
    lost: int


@dataclass(frozen=True, slots=True)
class SubscriptionLag:
    """One subscription, over every partition (`partitions`: each one, in order)."""

    name: str
    backlog: int
    oldest_age_ms: int
    failed: int
    rate: float
    p50_ms: float
    p99_ms: float
    status: Status
    slow_consumer: bool
    lost: int
    partitions: tuple[PartitionLag, ...]


# -- reply shapes: redis-py parses some replies into dicts, the hot client leaves RESP2 lists --


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _fields(reply: Any) -> dict[str, Any]:
    """A map reply (dict, or flat [k, v, k, v, ...]) with text keys."""
    if isinstance(reply, Mapping):
        return {_text(k): v for k, v in reply.items()}
    items = list(reply or ())
    return {_text(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _group(reply: Any, group: str) -> dict[str, Any] | None:
    """The group's entry of an XINFO GROUPS reply."""
    for g in reply or ():
        info = _fields(g)
        if _text(info.get("name", "")) == group:
            return info
    return None


def _oldest_pending(reply: Any) -> str:
    """The smallest id of an XPENDING summary ("" when nothing is pending)."""
    if isinstance(reply, Mapping):
        low = reply.get("min")
    else:
        low = reply[1] if reply and len(reply) > 1 else None
    return _text(low) if low else ""


def _number(stats: Mapping[str, Any], name: str) -> float:
    try:
        return float(_text(stats.get(name) or 0))
    except ValueError:
        return 0.0


@dataclass(slots=True)
class _Reading:
    """What the first pipeline tells about one (subscription, partition)."""

    name: str
    partition: int
    pending: int
    last: str
    lag: int | None  # entries after `last`; None: Redis does not know
    failed: int
    stats: dict[str, Any]


async def measure(
    store: SubscriptionStore, names: Sequence[str], limits: Thresholds
) -> list[SubscriptionLag]:
    """The lag of each named subscription (a name whose groups are gone is left out)."""
    if not names:
        return []
    calls = store.calls
    parts = range(store.partitions)
    pairs = [(n, p) for n in names for p in parts]
    first: list[tuple[Any, ...]] = []
    for n, p in pairs:
        first += [
            ("XINFO", "GROUPS", store.stream_key(p)),
            ("ZCARD", store.failed_key(n, p)),
            ("HGETALL", store.stats_key(n, p)),
        ]
    now = await calls.redis_time_ms()
    replies = await calls.pipeline(first)
    readings: list[_Reading | None] = []
    for i, (n, p) in enumerate(pairs):
        groups, failed, stats = replies[3 * i : 3 * i + 3]
        info = _group(groups, GROUP_PREFIX + n)
        if info is None:
            readings.append(None)
            continue
        lag = info.get("lag")
        readings.append(
            _Reading(
                n,
                p,
                int(info.get("pending") or 0),
                _text(info.get("last-delivered-id") or "0-0"),
                None if lag is None else int(lag),
                int(failed or 0),
                {k: _text(v) for k, v in _fields(stats).items()},
            )
        )
    # Second pipeline: the oldest unacknowledged id, and the entries after `last` where
    # Redis does not count them.
    second: list[tuple[Any, ...]] = []
    asked: list[tuple[int, str]] = []  # (reading index, what)
    for i, r in enumerate(readings):
        if r is None:
            continue
        key = store.stream_key(r.partition)
        if r.pending:
            second.append(("XPENDING", key, GROUP_PREFIX + r.name))
            asked.append((i, "pending"))
        if r.lag is None or (r.lag and not r.pending):
            count = COUNT_CAP if r.lag is None else 1
            second.append(("XRANGE", key, f"({r.last}", "+", "COUNT", count))
            asked.append((i, "after"))
    answers = await calls.pipeline(second) if second else []
    oldest: dict[int, str] = {}
    for (i, what), reply in zip(asked, answers, strict=True):
        r = readings[i]
        assert r is not None
        if what == "pending":
            oldest[i] = _oldest_pending(reply) or oldest.get(i, "")
        else:
            entries = list(reply or ())
            if r.lag is None:
                r.lag = len(entries)
            if entries and i not in oldest:
                oldest[i] = _text(entries[0][0])
    by_name: dict[str, list[PartitionLag]] = {n: [] for n in names}
    for i, r in enumerate(readings):
        if r is not None:
            by_name[r.name].append(_partition(r, oldest.get(i, ""), now, limits))
    return [_total(n, ps, limits) for n, ps in by_name.items() if ps]


def _partition(r: _Reading, oldest: str, now: int, limits: Thresholds) -> PartitionLag:
    backlog = r.pending + (r.lag or 0)
    age = max(0, now - parse_id(oldest)[0]) if oldest and backlog else 0
    stats = r.stats
    fresh = now - _number(stats, "up") <= STALE_MS
    return PartitionLag(
        partition=r.partition,
        backlog=backlog,
        oldest_age_ms=age,
        failed=r.failed,
        rate=_number(stats, "rate") if fresh else 0.0,
        p50_ms=_number(stats, "p50"),
        p99_ms=_number(stats, "p99"),
        samples=int(_number(stats, "n")),
        status=limits.status(backlog),
        owner=stats.get("owner", "") if fresh else "",
        lost=int(_number(stats, "lost")),
    )


def _total(name: str, ps: list[PartitionLag], limits: Thresholds) -> SubscriptionLag:
    backlog = sum(p.backlog for p in ps)
    samples = sum(p.samples for p in ps)
    p50 = sum(p.p50_ms * p.samples for p in ps) / samples if samples else 0.0
    p99 = max((p.p99_ms for p in ps), default=0.0)
    return SubscriptionLag(
        name=name,
        backlog=backlog,
        oldest_age_ms=max((p.oldest_age_ms for p in ps), default=0),
        failed=sum(p.failed for p in ps),
        rate=sum(p.rate for p in ps),
        p50_ms=p50,
        p99_ms=p99,
        status=limits.status(backlog),
        slow_consumer=p99 > limits.slow_consumer_ms,
        lost=sum(p.lost for p in ps),
        partitions=tuple(ps),
    )
