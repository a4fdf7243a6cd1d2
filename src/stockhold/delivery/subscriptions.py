"""Durable subscriptions (issue 12, docs/events.md): what a WMS wants pushed, stored in Redis.

A subscription is a name, a webhook URL, filters (types, warehouses, SKUs), a secret (the
HMAC-SHA256 key of each POST's signature), a timeout, a retry policy and what a partition does
with an event that used up its attempts (FLOW: it goes to the failed set and the next events
follow; WAIT: the partition retries it until the WMS takes it).

Keys (constants.py names the parts; this module alone builds them):

    <prefix>:{meta}:subs                 set   subscription names
    <prefix>:{meta}:sub:<name>           hash  def (JSON), secret, created (ms, Redis clock)
    per partition, in its slot (tag <prefix>:{p<N>}:):
    consumer group "sub:<name>" on <tag>events
    <tag>lease:<name>                    string  the process delivering this partition (PX)
    <tag>failed:<name>                   zset  stream id -> entry ms, events that used up their
                                               attempts (FLOW)
    <tag>failedev:<name>                 hash  stream id -> JSON {body, error, attempts, at}
    <tag>dstat:<name>                    hash  delivery statistics written by the lease owner

Creation claims the name (HSETNX def), creates the group on every partition at the start
position (an existing group is left as it is), then lists the name: a deliverer never sees a
subscription whose groups are missing. Deletion unlists the name first, then drops the config,
the groups and the per-partition keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Final, Literal
from urllib.parse import urlsplit

import orjson

from stockhold import constants as c
from stockhold.errors import DomainError, FieldViolation, Reason
from stockhold.events import EventFilter, StreamId, event_filter
from stockhold.resolver import partition_tag
from stockhold.store.calls import ScriptCalls

OnFailure = Literal["FLOW", "WAIT"]

NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_URL: Final = 2048
MIN_SECRET_BYTES: Final = 16
MAX_SECRET_BYTES: Final = 1024
DEFAULT_TIMEOUT_MS: Final = 5000
MAX_TIMEOUT_MS: Final = 60_000
DEFAULT_MAX_ATTEMPTS: Final = 8
MAX_ATTEMPTS: Final = 100
DEFAULT_INITIAL_BACKOFF_MS: Final = 200
DEFAULT_MAX_BACKOFF_MS: Final = 30_000
MAX_BACKOFF_MS: Final = 3_600_000
GROUP_PREFIX: Final = "sub:"


@dataclass(frozen=True, slots=True)
class Subscription:
    """One subscription as stored (the secret apart: `StoredSubscription.secret`)."""

    name: str
    url: str
    types: tuple[str, ...] = ()
    warehouses: tuple[str, ...] = ()
    skus: tuple[str, ...] = ()
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    initial_backoff_ms: int = DEFAULT_INITIAL_BACKOFF_MS
    max_backoff_ms: int = DEFAULT_MAX_BACKOFF_MS
    on_failure: OnFailure = "FLOW"

    @property
    def filter(self) -> EventFilter:
        """The events it wants (an empty field matches everything)."""
        return EventFilter(frozenset(self.types), frozenset(self.warehouses), frozenset(self.skus))

    @property
    def group(self) -> str:
        """Its consumer group on every partition's stream."""
        return GROUP_PREFIX + self.name

    def definition(self) -> bytes:
        """The stored definition: JSON, keys sorted (two equal definitions, equal bytes)."""
        return orjson.dumps(asdict(self), option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_definition(cls, raw: bytes | str) -> Subscription:
        d = orjson.loads(raw)
        for name in ("types", "warehouses", "skus"):
            d[name] = tuple(d.get(name) or ())
        return cls(**d)


@dataclass(frozen=True, slots=True)
class StoredSubscription:
    """A subscription with what the store adds: its secret and when it was created."""

    sub: Subscription
    secret: str = field(repr=False)
    created_ms: int

    @property
    def secret_fingerprint(self) -> str:
        """SHA-256 of the secret, hex, first 12 digits: tells two secrets apart, reveals none."""
        return fingerprint(self.secret)


def fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def new_secret() -> str:
    """A random secret (32 bytes, base64url): what the server makes when none is given."""
    return secrets.token_urlsafe(32)


# -- validation ----------------------------------------------------------------------------------


def check_name(name: str, where: str, out: list[FieldViolation]) -> str:
    if not NAME_RE.fullmatch(name):
        out.append(FieldViolation(where, "1 to 64 of A-Z a-z 0-9 . _ -"))
    return name


def check_url(url: str, where: str, out: list[FieldViolation]) -> str:
    """An absolute http(s) URL with a host, at most MAX_URL characters, no credentials."""
    if not url or len(url) > MAX_URL or any(ch.isspace() or ord(ch) < 0x20 for ch in url):
        out.append(FieldViolation(where, f"an http:// or https:// URL of 1..{MAX_URL} characters"))
        return url
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when not a number in range
    except ValueError:
        out.append(FieldViolation(where, "not a valid URL (bad host or port)"))
        return url
    if parts.scheme not in ("http", "https") or not parts.hostname:
        out.append(FieldViolation(where, "an http:// or https:// URL with a host"))
    elif parts.username is not None or parts.password is not None:
        out.append(FieldViolation(where, "credentials in the URL are refused; use the secret"))
    elif port == 0:
        out.append(FieldViolation(where, "port 0 is not a port"))
    return url


def _bounded(
    value: int, default: int, low: int, high: int, where: str, out: list[FieldViolation]
) -> int:
    if value == 0:
        return default
    if not low <= value <= high:
        out.append(FieldViolation(where, f"{low}..{high} (0: default {default})"))
    return value


def check_subscription(
    *,
    name: str,
    url: str,
    types: Sequence[str],
    warehouses: Sequence[str],
    skus: Sequence[str],
    timeout_ms: int,
    max_attempts: int,
    initial_backoff_ms: int,
    max_backoff_ms: int,
    on_failure: str,
    out: list[FieldViolation],
    where: str = "subscription.",
) -> Subscription:
    """A Subscription from request fields, defaults applied (0 or "" means the default);
    violations appended to `out` with field paths under `where`."""
    check_name(name, where + "name", out)
    check_url(url, where + "url", out)
    bad: list[FieldViolation] = []
    f = event_filter(types, warehouses, skus, bad)
    out.extend(FieldViolation(where + v.field, v.description) for v in bad)
    timeout = _bounded(timeout_ms, DEFAULT_TIMEOUT_MS, 1, MAX_TIMEOUT_MS, where + "timeout_ms", out)
    retry = where + "retry."
    attempts = _bounded(
        max_attempts, DEFAULT_MAX_ATTEMPTS, 1, MAX_ATTEMPTS, retry + "max_attempts", out
    )
    initial = _bounded(
        initial_backoff_ms,
        DEFAULT_INITIAL_BACKOFF_MS,
        1,
        MAX_BACKOFF_MS,
        retry + "initial_backoff_ms",
        out,
    )
    cap = _bounded(
        max_backoff_ms, DEFAULT_MAX_BACKOFF_MS, 1, MAX_BACKOFF_MS, retry + "max_backoff_ms", out
    )
    if cap < initial:
        out.append(FieldViolation(retry + "max_backoff_ms", "at least initial_backoff_ms"))
    policy = on_failure or "FLOW"
    if policy not in ("FLOW", "WAIT"):
        out.append(FieldViolation(where + "on_failure", "FLOW or WAIT"))
        policy = "FLOW"
    return Subscription(
        name=name,
        url=url,
        types=tuple(sorted(f.types)),
        warehouses=tuple(sorted(f.warehouses)),
        skus=tuple(sorted(f.skus)),
        timeout_ms=timeout,
        max_attempts=attempts,
        initial_backoff_ms=initial,
        max_backoff_ms=cap,
        on_failure="WAIT" if policy == "WAIT" else "FLOW",
    )


def check_secret(secret: str, where: str, out: list[FieldViolation]) -> str:
    """A given secret: MIN..MAX bytes of UTF-8. Empty is allowed here (the server makes one)."""
    size = len(secret.encode())
    if secret and not MIN_SECRET_BYTES <= size <= MAX_SECRET_BYTES:
        out.append(FieldViolation(where, f"{MIN_SECRET_BYTES}..{MAX_SECRET_BYTES} bytes"))
    return secret


def not_found(name: str) -> DomainError:
    return DomainError(Reason.SUBSCRIPTION_NOT_FOUND, metadata={"subscription": name})


# -- the store -----------------------------------------------------------------------------------


class SubscriptionStore:
    """Subscriptions in Redis, and the name of every per-partition key of one."""

    def __init__(self, calls: ScriptCalls):
        self.calls = calls
        self.partitions = calls.settings.partitions
        prefix = calls.settings.key_prefix
        self.names_key = f"{prefix}:{c.META_SUBSCRIPTIONS}"
        self._config_prefix = f"{prefix}:{c.META_SUBSCRIPTION}:"
        self._tags = [partition_tag(calls.resolver, p) for p in range(self.partitions)]

    # keys
    def config_key(self, name: str) -> str:
        return self._config_prefix + name

    def stream_key(self, partition: int) -> str:
        return self._tags[partition] + c.EVENTS

    def lease_key(self, name: str, partition: int) -> str:
        return f"{self._tags[partition]}{c.SUB_LEASE}:{name}"

    def failed_key(self, name: str, partition: int) -> str:
        return f"{self._tags[partition]}{c.SUB_FAILED}:{name}"

    def failed_events_key(self, name: str, partition: int) -> str:
        return f"{self._tags[partition]}{c.SUB_FAILED_EVENTS}:{name}"

    def stats_key(self, name: str, partition: int) -> str:
        return f"{self._tags[partition]}{c.SUB_STATS}:{name}"

    def partition_keys(self, name: str, partition: int) -> list[str]:
        """Every key of the subscription in one partition, but the stream (deleted with it)."""
        return [
            self.lease_key(name, partition),
            self.failed_key(name, partition),
            self.failed_events_key(name, partition),
            self.stats_key(name, partition),
        ]

    # operations
    async def create(
        self, sub: Subscription, secret: str, start: Sequence[StreamId] | Literal["now", "earliest"]
    ) -> tuple[StoredSubscription, bool]:
        """Store `sub` and create its groups at `start` (per-partition positions, "now" or
        "earliest"). Returns (the stored subscription, created); the name holding another
        definition (or another given secret) is SUBSCRIPTION_EXISTS, nothing changed."""
        key = self.config_key(sub.name)
        now = await self.calls.redis_time_ms()
        claimed, stored = await self.calls.pipeline(
            [
                ("HSETNX", key, "def", sub.definition()),
                ("HMGET", key, "def", "secret", "created"),
            ]
        )
        if not claimed:
            found = _stored(stored)
            if found is None:  # deleted between the two commands: a rare race, say so
                raise DomainError(Reason.SUBSCRIPTION_EXISTS, metadata={"subscription": sub.name})
            if found.sub != sub or (secret and secret != found.secret):
                raise DomainError(Reason.SUBSCRIPTION_EXISTS, metadata={"subscription": sub.name})
            await self._create_groups(sub, start)  # a retry after a crash mid-create finishes it
            await self.calls.pipeline([("SADD", self.names_key, sub.name)])
            return found, False
        secret = secret or new_secret()
        await self.calls.pipeline([("HSET", key, "secret", secret, "created", now)])
        await self._create_groups(sub, start)
        await self.calls.pipeline([("SADD", self.names_key, sub.name)])
        return StoredSubscription(sub, secret, now), True

    async def _create_groups(
        self, sub: Subscription, start: Sequence[StreamId] | Literal["now", "earliest"]
    ) -> None:
        def position(p: int) -> str:
            if start == "now":
                return "$"
            if start == "earliest":
                return "0"
            ms, seq = start[p]
            return f"{ms}-{seq}"

        await asyncio.gather(
            *(
                self.calls.call_script(
                    self.calls.scripts.group,
                    [self.stream_key(p)],
                    ["create", sub.group, position(p)],
                )
                for p in range(self.partitions)
            )
        )

    async def get(self, name: str) -> StoredSubscription | None:
        """The subscription named so, or None (a name claimed by a create still under way is
        returned: its groups may still be being created)."""
        (stored,) = await self.calls.pipeline(
            [("HMGET", self.config_key(name), "def", "secret", "created")]
        )
        return _stored(stored)

    async def require(self, name: str) -> StoredSubscription:
        found = await self.get(name)
        if found is None:
            raise not_found(name)
        return found

    async def names(self) -> list[str]:
        """Listed subscription names, sorted."""
        (members,) = await self.calls.pipeline([("SMEMBERS", self.names_key)])
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def all(self) -> list[StoredSubscription]:
        """Every listed subscription, by name."""
        names = await self.names()
        if not names:
            return []
        replies = await self.calls.pipeline(
            [("HMGET", self.config_key(n), "def", "secret", "created") for n in names]
        )
        return [s for s in (_stored(r) for r in replies) if s is not None]

    async def delete(self, name: str) -> bool:
        """Unlist, drop the config, then the groups and per-partition keys. False when there
        was no such subscription (deleting again is not an error)."""
        removed, existed = await self.calls.pipeline(
            [("SREM", self.names_key, name), ("DEL", self.config_key(name))]
        )
        group = GROUP_PREFIX + name
        await asyncio.gather(
            *(
                self.calls.call_script(
                    self.calls.scripts.group,
                    [self.stream_key(p), *self.partition_keys(name, p)],
                    ["destroy", group],
                )
                for p in range(self.partitions)
            )
        )
        return bool(removed) or bool(existed)

    async def set_position(self, sub: Subscription, positions: Sequence[str]) -> list[str]:
        """Rewind (or move) the groups: partition p's last-delivered id becomes positions[p].
        Returns each stream's first entry id ("" when empty) after the change."""
        replies = await asyncio.gather(
            *(
                self.calls.call_script(
                    self.calls.scripts.group, [self.stream_key(p)], ["setid", sub.group, position]
                )
                for p, position in enumerate(positions)
            )
        )
        return [f.decode() if isinstance(f, bytes) else str(f) for _, f in replies]


def _stored(reply: Sequence[bytes | None]) -> StoredSubscription | None:
    definition, secret, created = reply
    if definition is None:
        return None
    return StoredSubscription(
        Subscription.from_definition(definition),
        secret.decode() if secret is not None else "",
        int(created) if created is not None else 0,
    )
