"""The deliverer: every server process pushes events to the subscriptions' webhooks (issue 12,
docs/events.md "Pushing to a WMS").

One lease per (subscription, partition) says which process delivers it (lease.lua: SET NX PX
`delivery_lease_seconds`, renewed every third of it while the owner is the same, released on
a clean stop). Processes share the pairs fairly: each one registers in `<prefix>:{meta}:
deliverers` (owner -> expiry) and takes free leases only while it holds fewer than
ceil(pairs / live deliverers); one holding more than that gives the extra ones back.

A partition taken over first claims the group's pending entries (XAUTOCLAIM: the lease proves
their old owner gone), then delivers its own pending entries in id order, then new ones. One
task per owned partition handles its events one after the other, so a partition's events
reach the WMS in their order: an event the subscription's filter does not pass is acknowledged
without a POST; the others are POSTed (wire.post) until a 2xx, with exponential backoff
(initial * 2^k capped at max, some jitter). FLOW (the default): after max_attempts the event
goes to the failed set (fail.lua: XACK + failed zset + its body) and the next ones follow;
WAIT: the head is retried at the max backoff until the WMS takes it. Acknowledgements are
sent with the next read (consume.lua: XACK then read, only while the lease is ours), at once
before a retry waits. Delivery is at least once: only events read but not yet acknowledged
when a process died are delivered again, by the next owner.

Statistics per owned partition are written about once a second to `<tag>dstat:<name>`
(owner, up: Redis time of the write, delivered: total, rate: events handled per second over
the last 10 s, p50 / p99: ms of the WMS's answers over the last 60 s or 1000 attempts, every
attempt counted, failures and timeouts included; n: that sample count), read by lag.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import secrets
import socket
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import orjson

from stockhold import constants as c
from stockhold import metrics
from stockhold.delivery import wire
from stockhold.delivery.subscriptions import GROUP_PREFIX, StoredSubscription, SubscriptionStore
from stockhold.delivery.trim import Trimmer
from stockhold.delivery.wake import HintListener
from stockhold.errors import DomainError
from stockhold.events import StreamEvent, parse_entry
from stockhold.settings import Settings
from stockhold.store.calls import ScriptCalls

log = logging.getLogger(__name__)

STATS_INTERVAL: Final = 1.0
RATE_WINDOW: Final = 10.0
LATENCY_WINDOW: Final = 60.0
LATENCY_SAMPLES: Final = 1000
JITTER: Final = 0.1
WARN_EVERY: Final = 10.0  # seconds between WMS failure warnings of one subscription
CLAIM_ROUNDS: Final = 10_000
RETRY_PAUSE: Final = 0.5  # s: a partition's pause after a Redis failure


def owner_id() -> str:
    """This process's deliverer id: "<host>:<pid>:<random>"."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def backoff(sub_initial_ms: int, sub_max_ms: int, attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): initial * 2^(attempt-1),
    capped at max, with +-10 % jitter."""
    ms: int = min(sub_initial_ms << min(attempt - 1, 40), sub_max_ms)
    return ms / 1000 * random.uniform(1 - JITTER, 1 + JITTER)


@dataclass
class _Stats:
    """Recent figures of one owned partition (kept in memory, written by the stats loop)."""

    attempts: deque[tuple[float, float]] = field(
        default_factory=lambda: deque(maxlen=LATENCY_SAMPLES)
    )  # (monotonic time, seconds)
    handled: deque[tuple[float, int]] = field(default_factory=deque)  # (time, events)
    delivered: int = 0  # since the last write

    def attempt(self, seconds: float) -> None:
        self.attempts.append((time.monotonic(), seconds))

    def done(self, events: int) -> None:
        self.handled.append((time.monotonic(), events))

    def figures(self, now: float) -> dict[str, Any]:
        while self.handled and self.handled[0][0] < now - RATE_WINDOW:
            self.handled.popleft()
        recent = sorted(s for t, s in self.attempts if t >= now - LATENCY_WINDOW)

        def pct(q: float) -> float:
            if not recent:
                return 0.0
            return round(recent[min(len(recent) - 1, int(q * len(recent)))] * 1000, 1)

        rate = sum(n for _, n in self.handled) / RATE_WINDOW
        return {"rate": round(rate, 2), "p50": pct(0.5), "p99": pct(0.99), "n": len(recent)}


@dataclass
class _Partition:
    """One (subscription, partition) this process holds the lease of."""

    name: str
    partition: int
    renewed: float  # monotonic time of the last renewal (or the taking)
    task: asyncio.Task[None] | None = None
    stats: _Stats = field(default_factory=_Stats)
    acks: list[str] = field(default_factory=list)
    lost: bool = False  # the lease is gone: stop at once
    conn: wire.Connection | None = None  # keep-alive, to the subscription's URL
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # set by a hint (wake.py)


class _Lost(Exception):
    """The lease of the partition is no longer ours."""


class Deliverer:
    """This process's deliverer (see the module docstring): start() once, stop() once."""

    def __init__(self, calls: ScriptCalls, store: SubscriptionStore, settings: Settings) -> None:
        self.calls = calls
        self.store = store
        self.settings = settings
        self.owner = owner_id()
        self.lease_ms = round(settings.delivery_lease_seconds * 1000)
        self.poll = settings.delivery_poll_interval_seconds
        self.batch = settings.delivery_batch
        self.registry = f"{settings.key_prefix}:{c.META_DELIVERERS}"
        self.trimmer = Trimmer(calls, store)
        self.subs: dict[str, StoredSubscription] = {}
        self.parts: dict[tuple[str, int], _Partition] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._over = 0  # consecutive rounds above the fair share
        self._warned: dict[str, float] = {}
        self.hints = HintListener(calls, self._wake, lambda: bool(self.parts))
        self.builtin_http = settings.delivery_http_client == "builtin"
        # delivery_http_client "aiohttp": one session per subscription (its URL and timeout)
        self.sessions: dict[str, tuple[StoredSubscription, aiohttp.ClientSession]] = {}

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._every(self.lease_ms / 3000, self._round)),
            asyncio.create_task(self._every(STATS_INTERVAL, self._write_stats)),
            asyncio.create_task(self._every(self.settings.event_trim_interval_seconds, self._trim)),
            asyncio.create_task(self.hints.run()),
        ]

    async def stop(self) -> None:
        """Stop delivering: each partition finishes (acknowledges) what it has done, its lease
        is released, the process leaves the registry."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        parts = list(self.parts.values())
        await asyncio.gather(*(self._drop(p, release=True) for p in parts))
        for _, session in self.sessions.values():
            await session.close()
        self.sessions.clear()
        with contextlib.suppress(DomainError):
            await self._write_stats(parts)  # the last second's figures
            await self.calls.call_script(
                self.calls.scripts.lease, [self.registry], ["unregister", self.owner]
            )

    async def _every(self, seconds: float, step: Any) -> None:
        while True:
            try:
                await step()
            except DomainError as err:
                log.debug("delivery step skipped: %s", err)
            except Exception:  # a bug must not end delivery for good
                log.exception("delivery step failed")
            await asyncio.sleep(seconds)

    async def _trim(self) -> None:
        await self.trimmer.run_once()

    # -- leases -----------------------------------------------------------------------------

    async def _lease(self, op: str, name: str, partition: int) -> bool:
        reply = await self.calls.call_script(
            self.calls.scripts.lease,
            [self.store.lease_key(name, partition)],
            [op, self.owner, str(self.lease_ms)],
        )
        return bool(int(reply))

    async def _round(self) -> None:
        """Refresh the subscriptions, register, renew what we hold, take or give back leases.
        With no subscription nothing is written (not even the registry)."""
        self.subs = {s.sub.name: s for s in await self.store.all()}
        for part in list(self.parts.values()):
            if part.name not in self.subs:
                await self._drop(part, release=False)
        for name in [n for n in self.sessions if n not in self.subs]:
            await self.sessions.pop(name)[1].close()
        if not self.subs:
            return
        live = int(
            await self.calls.call_script(
                self.calls.scripts.lease,
                [self.registry],
                ["register", self.owner, str(self.lease_ms * 2)],
            )
        )
        await self._renew()
        pairs = [(n, p) for n in sorted(self.subs) for p in range(self.store.partitions)]
        share = math.ceil(len(pairs) / max(live, 1)) if pairs else 0
        held = len(self.parts)
        if held < share:
            await self._take([k for k in pairs if k not in self.parts], share - held)
            self._over = 0
        elif held > share:
            self._over += 1
            if self._over >= 2:  # not on one round's view: the registry may be settling
                extra = sorted(self.parts.values(), key=lambda x: (x.name, x.partition))
                for part in extra[share:]:
                    await self._drop(part, release=True)
                self._over = 0
        else:
            self._over = 0

    async def _renew(self) -> None:
        parts = list(self.parts.values())
        results = await asyncio.gather(
            *(self._lease("renew", p.name, p.partition) for p in parts), return_exceptions=True
        )
        now = time.monotonic()
        for part, ok in zip(parts, results, strict=True):
            if ok is True:
                part.renewed = now
            elif ok is False or now - part.renewed > self.lease_ms / 1000:
                # taken by another, or unconfirmed for a whole lease: another may hold it
                await self._drop(part, release=False)

    async def _take(self, candidates: list[tuple[str, int]], wanted: int) -> None:
        holders = await self.calls.pipeline(
            [("GET", self.store.lease_key(n, p)) for n, p in candidates]
        )
        free = [k for k, h in zip(candidates, holders, strict=True) if h is None]
        random.shuffle(free)  # processes starting together rarely race for the same pairs
        for name, partition in free:
            if wanted <= 0:
                break
            if not await self._lease("acquire", name, partition):
                continue
            wanted -= 1
            part = _Partition(name, partition, time.monotonic())
            self.parts[(name, partition)] = part
            log.info(
                "delivery lease taken",
                extra={"subscription": name, "partition": partition, "owner": self.owner},
            )
            part.task = asyncio.create_task(self._deliver(part))

    async def _drop(self, part: _Partition, release: bool) -> None:
        """Stop delivering one partition (its acknowledgements flushed while the lease is
        ours), then release the lease if asked."""
        if self.parts.pop((part.name, part.partition), None) is None:
            return
        if not release:
            part.lost = True
        task = part.task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=5.0)
        if release:
            with contextlib.suppress(DomainError):
                await self._lease("release", part.name, part.partition)
        log.info(
            "delivery lease %s",
            "released" if release else "lost",
            extra={"subscription": part.name, "partition": part.partition, "owner": self.owner},
        )

    # -- one partition ----------------------------------------------------------------------

    async def _consume(self, part: _Partition, op: str, position: str, count: int) -> list[Any]:
        """consume.lua with the acknowledgements gathered so far (kept if the call fails)."""
        acks, part.acks = part.acks, []
        try:
            reply = await self.calls.call_script(
                self.calls.scripts.consume,
                [
                    self.store.stream_key(part.partition),
                    self.store.lease_key(part.name, part.partition),
                ],
                [self.owner, GROUP_PREFIX + part.name, op, position, str(count), *acks],
            )
        except DomainError:
            part.acks = acks + part.acks
            raise
        if not int(reply[0]):
            raise _Lost
        return list(reply)

    async def _flush(self, part: _Partition) -> None:
        if part.acks:
            await self._consume(part, "ack", "", 0)

    async def _deliver(self, part: _Partition) -> None:
        """The partition's task: takeover, then its events in order, until the lease goes.
        After a Redis failure it starts again from the takeover (nothing is skipped: what
        was read and not acknowledged is read again from our pending entries)."""
        try:
            while not part.lost:
                try:
                    await self._claim(part)
                    await self._stream(part)
                except DomainError as err:
                    log.debug("delivery paused by a Redis failure: %s", err)
                except (_Lost, asyncio.CancelledError):
                    raise
                except Exception:
                    log.exception("delivery failed", extra={"subscription": part.name})
                await asyncio.sleep(RETRY_PAUSE)
        except _Lost:
            part.lost = True
            if self.parts.get((part.name, part.partition)) is part:
                del self.parts[(part.name, part.partition)]
                log.info(
                    "delivery lease lost",
                    extra={"subscription": part.name, "partition": part.partition},
                )
        except asyncio.CancelledError:
            if not part.lost:
                with contextlib.suppress(DomainError, _Lost, TimeoutError):
                    await asyncio.wait_for(self._flush(part), timeout=2.0)
            raise
        finally:
            if part.conn is not None:
                part.conn.close()

    async def _stream(self, part: _Partition) -> None:
        position = "0"  # our own pending entries first, then new ones (">")
        while not part.lost:
            part.wake.clear()  # a hint from now on is for what this read may not see
            reply = await self._consume(part, "read", position, self.batch)
            entries: Sequence[Any] = reply[1]
            if not entries:
                if position == ">":
                    await self._idle(part)
                position = ">"
                continue
            await self._batch(part, entries)
            if position != ">":
                position = _text(entries[-1][0])

    async def _idle(self, part: _Partition) -> None:
        """Wait for a hint naming the partition, at most the poll interval (the fallback)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.poll):
                await part.wake.wait()

    def _wake(self, partitions: Iterable[int]) -> None:
        """The hint listener's callback: wake the owned partitions named."""
        parts = self.parts
        names = self.subs.keys()
        for p in partitions:
            for name in names:
                part = parts.get((name, p))
                if part is not None:
                    part.wake.set()

    async def _claim(self, part: _Partition) -> None:
        """Move the group's pending entries of this partition to us (XAUTOCLAIM)."""
        cursor = "0-0"
        for _ in range(CLAIM_ROUNDS):
            reply = await self._consume(part, "claim", cursor, 1000)
            cursor = _text(reply[1])
            await self._lost_entries(part, int(reply[2]))
            if cursor == "0-0":
                return

    async def _lost_entries(self, part: _Partition, n: int) -> None:
        if n <= 0:
            return
        metrics.record_events_lost(part.name, n)
        log.error(
            "pending events no longer in the stream (trimmed by the hard cap)",
            extra={"subscription": part.name, "partition": part.partition, "lost": n},
        )
        await self.calls.pipeline(
            [("HINCRBY", self.store.stats_key(part.name, part.partition), "lost", n)]
        )

    async def _batch(self, part: _Partition, entries: Sequence[Any]) -> None:
        """Deliver one read batch, in order."""
        skipped = lost = 0
        for raw_id, fields in entries:
            if part.lost:
                raise _Lost
            entry_id = _text(raw_id)
            stored = self.subs.get(part.name)
            if stored is None:
                raise _Lost  # deleted: its lease went with it
            if fields is None:  # pending, trimmed since
                part.acks.append(entry_id)
                lost += 1
                continue
            e = parse_entry(
                part.partition, entry_id, dict(zip(fields[::2], fields[1::2], strict=True))
            )
            if not stored.sub.filter.matches(e):
                part.acks.append(entry_id)
                skipped += 1
                continue
            await self._post(part, stored, e, entry_id)
        part.stats.done(len(entries))
        metrics.record_delivery(part.name, "skipped", skipped)
        await self._lost_entries(part, lost)

    async def _post(
        self, part: _Partition, stored: StoredSubscription, e: StreamEvent, entry_id: str
    ) -> None:
        """POST one event until the WMS takes it, or (FLOW) it goes to the failed set."""
        key = wire.event_key(e)
        body = wire.event_body(e)
        attempt = 0
        while True:
            attempt += 1
            result = await self._send(part, stored, key, body)
            part.stats.attempt(result.seconds)
            if result.ok:
                part.acks.append(entry_id)
                part.stats.delivered += 1
                metrics.record_delivery(part.name, "delivered")
                return
            metrics.record_delivery(part.name, "error")
            self._warn(stored, key, attempt, result)
            sub = stored.sub
            if sub.on_failure == "FLOW" and attempt >= sub.max_attempts:
                await self._fail(part, e, entry_id, body, result.error, attempt)
                return
            if part.lost:
                raise _Lost
            await self._flush(part)
            wait = backoff(sub.initial_backoff_ms, sub.max_backoff_ms, attempt)
            if attempt >= sub.max_attempts:  # WAIT, past the attempts: the max backoff
                wait = backoff(sub.max_backoff_ms, sub.max_backoff_ms, 1)
            await asyncio.sleep(wait)
            latest = self.subs.get(part.name)
            if latest is None or part.lost:
                raise _Lost
            stored = latest

    async def _send(
        self, part: _Partition, stored: StoredSubscription, key: str, body: bytes
    ) -> wire.PostResult:
        """One POST by the configured client (delivery_http_client)."""
        if self.builtin_http:
            conn = part.conn
            if conn is None or conn.url != stored.sub.url:
                if conn is not None:
                    conn.close()
                conn = part.conn = wire.Connection(stored.sub.url)
            return await conn.post(stored, key, body)
        session = await self._session(stored)
        return await wire.post(session, stored, key, body, session.timeout)

    async def _session(self, stored: StoredSubscription) -> aiohttp.ClientSession:
        """The subscription's aiohttp session, new when its URL or timeout changed."""
        name = stored.sub.name
        known = self.sessions.get(name)
        if known is not None:
            old, session = known
            if (old.sub.url, old.sub.timeout_ms) == (stored.sub.url, stored.sub.timeout_ms):
                return session
        session = wire.client_session(stored, self.store.partitions)
        self.sessions[name] = (stored, session)
        if known is not None:
            await known[1].close()
        return session

    async def _fail(
        self,
        part: _Partition,
        e: StreamEvent,
        entry_id: str,
        body: bytes,
        error: str,
        attempts: int,
    ) -> None:
        acks, part.acks = part.acks, []
        now = int(time.time() * 1000)
        record = orjson.dumps(
            {"body": body.decode(), "error": error, "attempts": attempts, "at": now}
        )
        done = await self.calls.call_script(
            self.calls.scripts.fail,
            [
                self.store.stream_key(part.partition),
                self.store.lease_key(part.name, part.partition),
                self.store.failed_key(part.name, part.partition),
                self.store.failed_events_key(part.name, part.partition),
            ],
            [self.owner, GROUP_PREFIX + part.name, entry_id, str(e.id[0]), record, *acks],
        )
        if not int(done):
            raise _Lost
        metrics.record_delivery(part.name, "failed")
        log.warning(
            "event moved to the failed set after its last attempt",
            extra={
                "subscription": part.name,
                "event": wire.event_key(e),
                "attempts": attempts,
                "error": error,
            },
        )

    def _warn(
        self, stored: StoredSubscription, key: str, attempt: int, result: wire.PostResult
    ) -> None:
        now = time.monotonic()
        name = stored.sub.name
        if now - self._warned.get(name, -math.inf) < WARN_EVERY:
            return
        self._warned[name] = now
        log.warning(
            "WMS did not take an event (retried by the subscription's policy; this warning "
            "is shown at most every %.0f s per subscription)",
            WARN_EVERY,
            extra={
                "subscription": name,
                "event": key,
                "attempt": attempt,
                "error": result.error,
                "seconds": round(result.seconds, 3),
            },
        )

    # -- statistics -------------------------------------------------------------------------

    async def _write_stats(self, parts: Sequence[_Partition] | None = None) -> None:
        parts = list(self.parts.values()) if parts is None else parts
        if not parts:
            return
        now_ms = await self.calls.redis_time_ms()
        now = time.monotonic()
        cmds: list[tuple[Any, ...]] = []
        for part in parts:
            key = self.store.stats_key(part.name, part.partition)
            figures = part.stats.figures(now)
            flat = [x for k, v in figures.items() for x in (k, v)]
            cmds.append(("HSET", key, "owner", self.owner, "up", now_ms, *flat))
            cmds.append(("HINCRBY", key, "delivered", part.stats.delivered))
            part.stats.delivered = 0
        await self.calls.pipeline(cmds)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)
