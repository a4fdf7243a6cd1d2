"""Contention snapshots in Redis: every process publishes its own, any process merges them all.

Layout (constants.py): the hash `{meta}:contention` maps a process id to that process's latest
`ContentionStats.snapshot()`, and the zset `{meta}:contention:seen` maps it to the Redis time
of that snapshot (ms). Readers take the snapshots seen within `contention_stale_seconds`; the
publisher drops older ones as it goes, so a process that died stops counting by itself (its
sliding-window figures age out even sooner: sub-windows carry absolute start times).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

from stockhold import constants as c
from stockhold.contention import Merged

if TYPE_CHECKING:
    from stockhold.engine import Engine


def process_id() -> str:
    """host:pid:random, unique per process start (pids are reused; hosts are shared)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _text(member: Any) -> str:
    return member.decode() if isinstance(member, bytes) else str(member)


class ContentionStore:
    """Publishes this process's contention snapshot and merges everyone's."""

    def __init__(self, engine: Engine, proc_id: str | None = None) -> None:
        self.engine = engine
        self.stats = engine.contention
        self.settings = engine.settings
        self.proc_id = proc_id or process_id()
        self.hash_key = engine.resolver.meta_key(c.META_CONTENTION)
        self.seen_key = engine.resolver.meta_key(c.META_CONTENTION_SEEN)

    def _snapshot(self) -> bytes:
        return self.stats.snapshot(limit=self.settings.contention_snapshot_keys)

    async def publish(self) -> None:
        """Store this process's snapshot; forget processes silent for too long."""
        blob = self._snapshot()
        now_ms = int(time.time() * 1000)
        stale_ms = now_ms - int(self.settings.contention_stale_seconds * 1000)
        client = self.engine.client
        async with client.pipeline(transaction=False) as pipe:
            pipe.hset(self.hash_key, self.proc_id, blob)
            pipe.zadd(self.seen_key, {self.proc_id: now_ms})
            pipe.zrangebyscore(self.seen_key, "-inf", f"({stale_ms}")
            replies = await self.engine.run(pipe.execute())
        gone = [_text(m) for m in replies[2]]
        if gone:
            async with client.pipeline(transaction=False) as pipe:
                pipe.hdel(self.hash_key, *gone)
                pipe.zrem(self.seen_key, *gone)
                await self.engine.run(pipe.execute())

    async def merged(self, window_s: float | None = None) -> tuple[Merged, int]:
        """Every live process's figures merged (this one's as of now); (merged, processes)."""
        stale_ms = int((time.time() - self.settings.contention_stale_seconds) * 1000)
        client = self.engine.client
        ids = await self.engine.run(client.zrangebyscore(self.seen_key, stale_ms, "+inf"))
        others = [i for i in (_text(m) for m in ids) if i != self.proc_id]
        blobs: list[bytes] = [self._snapshot()]
        if others:
            stored = await self.engine.run(client.hmget(self.hash_key, others))
            blobs += [b for b in stored if isinstance(b, bytes)]
        return self.stats.merge(blobs, window_s=window_s), len(blobs)


__all__ = ["ContentionStore", "process_id"]
