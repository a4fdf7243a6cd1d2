"""Wake-ups for the deliverer (issue 12, docs/events.md "Pushing to a WMS"): an idle partition
is read again as soon as an event lands in it, not at the next poll.

Writers (`HintPublisher`, one per server process, delivery on or off): while at least one
subscription exists, every script call of the process that can append an event (a script with
an XADD) notes the partitions whose event stream is among its keys, after Redis answered; the
partitions noted within HINT_DELAY are published as one message, the partition numbers joined
by commas ("3,17,42"), on `<prefix>:{meta}:events-hint`, and a process publishes at most one
message every HINT_INTERVAL (what is noted meanwhile waits for the next one: at most 200
messages a second per process however many events it appends; each message costs every
listener a redis-py parse, measured ~40 % of a server process's CPU at 1,000 messages a second
in docs/events.md "Measured"), through ScriptCalls.pipeline (a
classic PUBLISH: on a cluster every node forwards it to its own subscribers). With no
subscription the hook is not installed (a script call tests one attribute) and nothing is
published. Writers that are not server processes (`stockhold reconcile --repair`) publish
nothing: the fallback poll covers their events.

Readers (`HintListener`, in each Deliverer): a dedicated redis-py connection (on a cluster to
one node, any) SUBSCRIBEd to the channel hands each message's partitions to the deliverer,
which sets the wake-up event of each partition it delivers. A partition clears its event before
each read and, finding nothing, waits on it at most `delivery_poll_interval_seconds`, so a
hint arriving between the read and the wait is not lost, and while the connection is down
(it reconnects with backoff) the partitions simply poll at that interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.commands.core import AsyncScript

from stockhold import constants as c
from stockhold.delivery.subscriptions import SubscriptionStore
from stockhold.errors import DomainError
from stockhold.store.calls import ScriptCalls

log = logging.getLogger(__name__)

HINT_DELAY: Final = 0.001  # s: partitions noted within it go out in one PUBLISH
HINT_INTERVAL: Final = 0.005  # s: at least this between two PUBLISHes of one process
RECONNECT_MIN: Final = 0.2  # s: first pause after the listener's connection failed
RECONNECT_MAX: Final = 5.0
PING_EVERY: Final = 5.0  # s: the listener pings; silent for 3 pings: reconnect
READ_TIMEOUT: Final = 1.0


def hint_channel(prefix: str) -> str:
    """The channel of the hints: `<prefix>:{meta}:events-hint`."""
    return f"{prefix}:{c.META_EVENTS_HINT}"


def parse_hint(data: bytes | str) -> list[int]:
    """The partitions of one hint message ("3,17,42"); what is not a number is ignored."""
    text = data.decode() if isinstance(data, bytes) else data
    return [int(p) for p in text.split(",") if p.isdigit()]


class HintPublisher:
    """The writers' side (see the module docstring): `start()` once, `await stop()` once."""

    def __init__(self, calls: ScriptCalls, store: SubscriptionStore, refresh: float) -> None:
        self.calls = calls
        self.store = store
        self.refresh_seconds = refresh
        self.channel = hint_channel(calls.settings.key_prefix)
        self.streams = {store.stream_key(p): p for p in range(store.partitions)}
        # the scripts that can append an event (the deliverer's own scripts cannot)
        self.appending = {
            id(s)
            for s in vars(calls.scripts).values()
            if isinstance(s, AsyncScript) and "'XADD'" in str(s.script)
        }
        self.pending: set[int] = set()
        self.published = 0  # messages, for tests and curiosity
        self._timer: asyncio.TimerHandle | None = None
        self._last = -HINT_INTERVAL  # loop time of the last PUBLISH
        self._sending: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self.calls.on_script = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._timer is not None:
            self._timer.cancel()
            self._flush()
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=1.0)

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except DomainError as err:
                log.debug("events hint refresh skipped: %s", err)
            await asyncio.sleep(self.refresh_seconds)

    async def refresh(self) -> None:
        """Install the hook while a subscription exists, remove it when none does."""
        (exists,) = await self.calls.pipeline([("EXISTS", self.store.names_key)])
        self.calls.on_script = self.note if int(exists) else None

    def note(self, script: Any, keys: Sequence[str]) -> None:
        """ScriptCalls' hook, after a script call that Redis answered."""
        if id(script) not in self.appending:
            return
        streams = self.streams
        found = False
        for key in keys:
            p = streams.get(key)
            if p is not None:
                self.pending.add(p)
                found = True
        if found and self._timer is None:
            loop = asyncio.get_running_loop()
            at = max(loop.time() + HINT_DELAY, self._last + HINT_INTERVAL)
            self._timer = loop.call_at(at, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if not self.pending:
            return
        self._last = asyncio.get_running_loop().time()
        parts, self.pending = self.pending, set()
        task = asyncio.create_task(self._publish(",".join(map(str, sorted(parts)))))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _publish(self, message: str) -> None:
        with contextlib.suppress(DomainError):  # a lost hint: the fallback poll covers it
            await self.calls.pipeline([("PUBLISH", self.channel, message)])
            self.published += 1


def listener_client(client: Redis | RedisCluster) -> Redis:
    """A client of its own (its own pool) for the subscription: to the same server, or on a
    cluster to one node, any (a classic PUBLISH reaches every node's subscribers). No socket
    timeout: the listener waits for messages; it pings to notice a dead connection."""
    cls: type[Any]
    if isinstance(client, RedisCluster):
        node = client.get_random_node()
        kwargs = {**node.connection_kwargs, "host": node.host, "port": node.port}
        kwargs.pop("retry", None)
        cls = node.connection_class
    else:
        kwargs = dict(client.connection_pool.connection_kwargs)
        cls = client.connection_pool.connection_class
    kwargs["socket_timeout"] = None
    kwargs.pop("retry", None)
    return Redis(connection_pool=ConnectionPool(connection_class=cls, max_connections=2, **kwargs))


class HintListener:
    """The readers' side: `run()` (a task) hands the partitions of every hint to `wake` while
    `wanted()` is true; `connected` says whether hints are being received."""

    def __init__(
        self,
        calls: ScriptCalls,
        wake: Callable[[Iterable[int]], None],
        wanted: Callable[[], bool],
    ) -> None:
        self.calls = calls
        self.wake = wake
        self.wanted = wanted
        self.channel = hint_channel(calls.settings.key_prefix)
        self.connected = False

    async def run(self) -> None:
        pause = RECONNECT_MIN
        while True:
            if not self.wanted():
                await asyncio.sleep(1.0)
                continue
            try:
                await self._listen()
                pause = RECONNECT_MIN
            except asyncio.CancelledError:
                raise
            except Exception as err:  # any failure: poll meanwhile, reconnect
                log.debug("events hint listener down (polling meanwhile): %r", err)
            finally:
                self.connected = False
            await asyncio.sleep(pause)
            pause = min(pause * 2, RECONNECT_MAX)

    async def _listen(self) -> None:
        """One connection's life: subscribe, hand over hints until it fails, or until no
        subscription is left."""
        client = self.calls.client
        if isinstance(client, RedisCluster):
            await client.initialize()
        redis = listener_client(client)
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            self.connected = True
            heard = pinged = time.monotonic()
            while self.wanted():
                message = await pubsub.get_message(timeout=READ_TIMEOUT)
                now = time.monotonic()
                if message is not None:
                    heard = now
                    if message.get("type") == "message":
                        self.wake(parse_hint(message["data"]))
                if now - pinged >= PING_EVERY:
                    await pubsub.ping()
                    pinged = now
                if now - heard > 3 * PING_EVERY:
                    raise ConnectionError("no answer to the listener's pings")
        finally:
            self.connected = False
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            with contextlib.suppress(Exception):
                await redis.aclose(close_connection_pool=True)
