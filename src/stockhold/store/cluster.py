"""Redis Cluster routing for the hot-path client: one bounded pool per master, by slot.

`HotClient.from_url(url, settings, cluster=True)` returns a `ClusterHotClient`. Each call goes
to the master that serves the slot of its first key (redis.crc.key_slot, hash tags honoured);
the slot map comes from CLUSTER SLOTS, asked of any node known (the URL's node first of all).

- MOVED: the slot's owner is updated at once, the call goes there, and the whole map is
  refreshed in the background (a MOVED usually means a resharding moved more).
- ASK: ASKING then the call, on the named node, in one write; the map is not changed.
- At most `MAX_REDIRECTS` redirections per call, then redis.exceptions.ClusterError.
- A node that cannot be reached (refused, reset) triggers a refresh; a call that was never
  written is routed once more on the refreshed map (a failover promotes a replica), one that
  was in flight fails with ConnectionError as on a single node.
- NOSCRIPT is answered per node: the script is loaded where the call landed.
- WAIT (a ScriptDef with `replicas` > 0) goes in the same write as each try of the script,
  so it runs on the node that finally ran it, after any MOVED, ASK or NOSCRIPT.
- TRYAGAIN (a multi-key call whose keys a migration has split) is retried a few times after
  short pauses (`TRYAGAIN_RETRIES`), then raised.

A call whose keys span slots is refused by Redis (CROSSSLOT); routing never splits a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from typing import Any, Final

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import (
    AskError,
    ClusterError,
    MovedError,
    NoScriptError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stockhold.store.hotclient import (
    Address,
    Arg,
    Connection,
    HotClient,
    NodePool,
    Options,
    ScriptDef,
    acked_reply,
    pack_command,
    raise_first_error,
    replies_of,
)

log = logging.getLogger(__name__)

MAX_REDIRECTS: Final = 5
# TRYAGAIN (keys of one call split by a migration in progress): retried this many times,
# pausing TRYAGAIN_PAUSE, then twice that, ... (seconds), then raised (redis-py TryAgainError).
TRYAGAIN_RETRIES: Final = 3
TRYAGAIN_PAUSE: Final = 0.01
_MAX_ATTEMPTS: Final = 2 * MAX_REDIRECTS + TRYAGAIN_RETRIES + 2
# A background refresh of the slot map starts at most this often (seconds).
REFRESH_MIN_INTERVAL: Final = 0.1
_ASKING: Final = pack_command(("ASKING",))
_CLUSTER_SLOTS: Final = pack_command(("CLUSTER", "SLOTS"))
# Commands without keys (sent to any master); scripts and functions name theirs after numkeys.
_KEYLESS: Final = frozenset(
    {b"PING", b"ECHO", b"TIME", b"INFO", b"CLUSTER", b"SCRIPT", b"FUNCTION", b"WAIT", b"DBSIZE"}
)
_NUMKEYS: Final = frozenset({b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL", b"FCALL_RO"})
# Commands whose key follows a subcommand (XGROUP CREATE <key> ..., XINFO GROUPS <key>).
_SUBCOMMAND_KEY: Final = frozenset({b"XGROUP", b"XINFO"})
# Commands whose keys follow a STREAMS token (XREAD / XREADGROUP ... STREAMS <key> ... <id> ...).
_STREAMS_KEY: Final = frozenset({b"XREAD", b"XREADGROUP"})


def _bytes(value: Arg) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def command_slot(cmd: Sequence[Arg]) -> int | None:
    """The slot a command is routed by: its first key's, or None for a command without keys.

    The first key is the argument after the name; for EVAL/EVALSHA/FCALL the one after
    numkeys (none when numkeys is 0); for XGROUP/XINFO the one after the subcommand; for
    XREAD/XREADGROUP the one after STREAMS.
    """
    name = _bytes(cmd[0]).upper()
    if name in _NUMKEYS:
        return key_slot(_bytes(cmd[3])) if len(cmd) > 3 and int(cmd[2]) > 0 else None
    if name in _SUBCOMMAND_KEY:
        return key_slot(_bytes(cmd[2])) if len(cmd) > 2 else None
    if name in _STREAMS_KEY:
        words = [_bytes(a).upper() for a in cmd]
        at = words.index(b"STREAMS") + 1 if b"STREAMS" in words else len(cmd)
        return key_slot(_bytes(cmd[at])) if at < len(cmd) else None
    if name in _KEYLESS or len(cmd) < 2:
        return None
    return key_slot(_bytes(cmd[1]))


class ClusterHotClient(HotClient):
    """HotClient over a Redis Cluster: evalsha, execute and pipeline routed by slot."""

    def __init__(self, seeds: Sequence[Address], options: Options) -> None:
        self.options = options
        self.seeds = list(seeds)
        self.nodes: dict[tuple[str, int], NodePool] = {}
        self.slots: list[NodePool | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._refreshing: asyncio.Future[None] | None = None
        self._last_refresh = -REFRESH_MIN_INTERVAL
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # HotClient's single pool: the first seed's (keyless calls before any map is known).
        self.pool = self.node(seeds[0].host, seeds[0].port)

    # -- topology ----------------------------------------------------------------------------
    def node(self, host: str, port: int) -> NodePool:
        """The pool of the node at host:port (created on first use)."""
        pool = self.nodes.get((host, port))
        if pool is None:
            pool = self.nodes[(host, port)] = NodePool(Address(host, port), self.options)
        return pool

    def slot_owner(self, slot: int) -> str | None:
        """`host:port` of the master this client routes `slot` to (None: not known yet)."""
        pool = self.slots[slot]
        return None if pool is None else str(pool.address)

    async def refresh_topology(self) -> None:
        """Read CLUSTER SLOTS from a node that answers and replace the slot map.

        Concurrent callers share one refresh. Raises ConnectionError when no known node
        (nor the URL's) answers.
        """
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._refreshing = done
        self._last_refresh = loop.time()
        try:
            await self._load_topology()
            done.set_result(None)
        except BaseException as exc:
            done.set_exception(exc)
            done.exception()  # retrieved: the waiters raise it, nobody else must log it
            raise
        finally:
            self._refreshing = None

    def _refresh_soon(self) -> None:
        """Refresh the map in the background, unless one ran very recently or is running."""
        if self._closed or self._refreshing is not None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_refresh < REFRESH_MIN_INTERVAL:
            return
        task = loop.create_task(self._refresh_quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh_topology()
        except RedisError as exc:
            log.warning("cluster topology refresh failed: %s", exc)

    async def _load_topology(self) -> None:
        # Known masters first (in random order, so many processes spread out), then the seeds.
        known = [p for p in self.nodes.values() if not p.is_closed]
        random.shuffle(known)
        candidates = known + [self.node(a.host, a.port) for a in self.seeds]
        errors: list[str] = []
        for pool in dict.fromkeys(candidates):
            try:
                conn = pool.pick() or await pool.acquire()
                reply = await conn.send(_CLUSTER_SLOTS)
            except RedisError as exc:
                errors.append(f"{pool.address}: {exc}")
                continue
            if isinstance(reply, RedisError):
                errors.append(f"{pool.address}: {reply}")
                continue
            self._apply_slots(reply, pool.address.host)
            return
        raise RedisConnectionError(f"no cluster node answered CLUSTER SLOTS: {'; '.join(errors)}")

    def _apply_slots(self, reply: list[Any], asked_host: str) -> None:
        slots: list[NodePool | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for entry in reply:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            if host in ("", "?"):  # the node asked does not know its own address
                host = asked_host
            pool = self.node(host, int(master[1]))
            slots[start : end + 1] = [pool] * (end - start + 1)
        self.slots = slots

    async def _pool_for(self, slot: int | None) -> NodePool:
        """The pool a call for `slot` goes to, reading the map first if it is not known."""
        if slot is None:
            masters = [p for p in dict.fromkeys(self.slots) if p is not None]
            if masters:
                return random.choice(masters)
            await self.refresh_topology()
            masters = [p for p in dict.fromkeys(self.slots) if p is not None]
            return masters[0] if masters else self.pool
        pool = self.slots[slot]
        if pool is None:
            await self.refresh_topology()
            pool = self.slots[slot]
            if pool is None:
                raise ClusterError(f"slot {slot} is not served by any master")
        return pool

    # -- calls -------------------------------------------------------------------------------
    async def evalsha(
        self, script: ScriptDef, keys: Sequence[str | bytes], args: Sequence[Arg]
    ) -> Any:
        """EVALSHA on the master of the first key's slot (any master without keys)."""
        packed = pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))
        slot = key_slot(_bytes(keys[0])) if keys else None
        return await self._routed(slot, packed, script)

    async def execute(self, *cmd: Arg) -> Any:
        """Run one command on the master of its first key's slot (see `command_slot`)."""
        return await self._routed(command_slot(cmd), pack_command(cmd), None)

    async def _routed(self, slot: int | None, packed: bytes, script: ScriptDef | None) -> Any:
        pool = self.slots[slot] if slot is not None else None
        if pool is None:
            pool = await self._pool_for(slot)
        # WAIT (ScriptDef.wait) follows the script in each write, so it lands on the node
        # that finally ran it, after any MOVED, ASK or NOSCRIPT.
        waiting = script if script is not None and script.wait else None
        acked: Any = None
        asking = False
        rerouted = False
        tryagain = redirects = 0
        # Every way round the loop is bounded on its own (one re-route, MAX_REDIRECTS,
        # TRYAGAIN_RETRIES, a script load per node asked); this bounds them all together.
        for _ in range(_MAX_ATTEMPTS):
            try:
                conn = pool.pick() or await pool.acquire()
            except RedisConnectionError:
                # Never written: the node is gone or failing over. Read the map again and
                # route once more.
                if rerouted:
                    self._refresh_soon()
                    raise
                rerouted = True
                await self._refresh_after_failure()
                pool = await self._pool_for(slot)
                asking = False
                continue
            except RedisTimeoutError:
                self._refresh_soon()
                raise
            try:
                if waiting is not None:
                    reply, acked = await self._send_wait(conn, packed, asking, waiting.wait)
                else:
                    reply = await self._send(conn, packed, asking)
            except (RedisConnectionError, RedisTimeoutError):
                self._refresh_soon()  # the node died or hangs: a failover may follow
                raise
            if not isinstance(reply, RedisError):
                if waiting is not None:
                    return acked_reply(waiting, reply, acked)
                return reply
            if isinstance(reply, AskError):  # MOVED too (a subclass)
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise ClusterError(f"too many cluster redirections (more than {MAX_REDIRECTS})")
                target = self.node(reply.host, reply.port)
                if isinstance(reply, MovedError):
                    self.slots[reply.slot_id] = target
                    self._refresh_soon()
                    asking = False
                else:
                    asking = True
                pool = target
                continue
            if script is not None and isinstance(reply, NoScriptError):
                await self._load(pool, script)
                continue
            if isinstance(reply, TryAgainError) and tryagain < TRYAGAIN_RETRIES:
                # A multi-key call on a slot being migrated, its keys split between the two
                # nodes: Redis asks to try again once the keys moved.
                await asyncio.sleep(TRYAGAIN_PAUSE * 2**tryagain)
                tryagain += 1
                continue
            raise reply
        raise ClusterError(f"the call found no node to run it in {_MAX_ATTEMPTS} attempts")

    @staticmethod
    async def _send(conn: Connection, packed: bytes, asking: bool) -> Any:
        if not asking:
            return await conn.send(packed)
        # +OK to ASKING; an error there shows up in the call's own reply
        _, reply = await replies_of(conn.send_many([_ASKING, packed]))
        return reply

    @staticmethod
    async def _send_wait(
        conn: Connection, packed: bytes, asking: bool, wait: bytes
    ) -> tuple[Any, Any]:
        """The call and its WAIT in one write (ASKING first when asked): both replies."""
        if not asking:
            reply, acked = await replies_of(conn.send_many([packed, wait]))
        else:
            _, reply, acked = await replies_of(conn.send_many([_ASKING, packed, wait]))
        return reply, acked

    async def _refresh_after_failure(self) -> None:
        with contextlib.suppress(RedisError):
            await self.refresh_topology()

    async def _load(self, pool: NodePool, script: ScriptDef) -> None:
        conn = pool.pick() or await pool.acquire()
        reply = await conn.send(pack_command(("SCRIPT", "LOAD", script.source)))
        if isinstance(reply, RedisError):
            raise reply

    async def pipeline(
        self, cmds: Sequence[Sequence[Arg]], raise_on_error: bool = True
    ) -> list[Any]:
        """Send commands of ONE slot (plus keyless ones, e.g. WAIT) in one write to its master.

        Commands redirected by MOVED/ASK are sent again to the node named, each with the
        keyless commands that follow it (so a WAIT goes where its write went). Keyed
        commands of different slots raise ValueError.
        """
        if not cmds:
            return []
        slots = {s for s in (command_slot(c) for c in cmds) if s is not None}
        if len(slots) > 1:
            raise ValueError(f"a cluster pipeline must stay in one slot, got {sorted(slots)}")
        slot = slots.pop() if slots else None
        packed = [pack_command(tuple(c)) for c in cmds]
        keyed = [command_slot(c) is not None for c in cmds]
        replies: list[Any] = [None] * len(cmds)
        todo = list(range(len(cmds)))
        pool = await self._pool_for(slot)
        asking = False
        for _ in range(MAX_REDIRECTS + 1):
            conn = pool.pick() or await pool.acquire()
            batch: list[bytes] = []
            for i in todo:
                if asking and keyed[i]:
                    batch.append(_ASKING)
                batch.append(packed[i])
            try:
                got = await replies_of(conn.send_many(batch))
            except (RedisConnectionError, RedisTimeoutError):
                self._refresh_soon()
                raise
            if asking:  # drop the ASKING replies
                got = [r for r, b in zip(got, batch, strict=True) if b is not _ASKING]
            redirect: AskError | None = None
            again: list[int] = []
            for i, reply in zip(todo, got, strict=True):
                if isinstance(reply, AskError):
                    redirect = redirect or reply
                    again.append(i)
                elif again and not keyed[i]:
                    again.append(i)  # a WAIT after a redirected write follows it
                else:
                    replies[i] = reply
            if redirect is None:
                if raise_on_error:
                    raise_first_error(replies)
                return replies
            pool = self.node(redirect.host, redirect.port)
            asking = not isinstance(redirect, MovedError)
            if not asking:
                self.slots[redirect.slot_id] = pool
                self._refresh_soon()
            todo = again
        raise ClusterError(f"too many cluster redirections (more than {MAX_REDIRECTS})")

    def connection_count(self) -> int:
        """Connections open now, over every node."""
        return sum(len(p.conns) for p in self.nodes.values())

    def inflight(self) -> int:
        """Calls written and not yet answered, over every node."""
        return sum(p.inflight() for p in self.nodes.values())

    async def aclose(self) -> None:
        """Close every node's pool; stop background refreshes. Idempotent."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        for pool in list(self.nodes.values()):
            await pool.aclose()
