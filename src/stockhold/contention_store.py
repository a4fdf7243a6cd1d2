"""Contention snapshots in Redis: every process publishes its own, any process merges them all.

Layout (constants.py):

* the hash `{meta}:contention` maps a process id to the head of that process's latest
  `ContentionStats.publication()`: since start and the live sub-window (JSON);
* the hash `{meta}:contention:slots:<process id>` maps the index of each of that process's
  closed sub-windows still in the window to its piece (JSON). A closed sub-window never
  changes, so it is stored once, when it closes, not with every head: a publish sends the
  head (two sketches of at most `contention_snapshot_keys` keys) and, once per
  `contention_slot_seconds`, one piece. Its expiry (the window, plus a sub-window and two
  publishes) is renewed by each publish, so a dead process's pieces go by themselves;
* the zset `{meta}:contention:seen` maps a process id to the Redis time of its last publish
  (ms). Readers take the processes seen within `contention_stale_seconds`; the publisher drops
  older ones as it goes, so a process that died stops counting by itself (its sliding-window
  figures age out sooner: sub-windows carry absolute start times).

A publish writes the new pieces before the head, and a reader joins each head with that
process's pieces (`contention.assemble`); `merge()` takes each sub-window once, the head's
first, so a read that falls between two writes never counts a sub-window twice. If the pieces
are lost (Redis restarted or flushed), the next publish notices (its renewal finds no key)
and stores them all again.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

from stockhold import constants as c
from stockhold.contention import Merged, Publication, assemble

if TYPE_CHECKING:
    from stockhold.engine import Engine


def process_id() -> str:
    """host:pid:random, unique per process start (pids are reused; hosts are shared)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _text(member: Any) -> str:
    return member.decode() if isinstance(member, bytes) else str(member)


class ContentionStore:
    """Publishes this process's contention figures and merges everyone's."""

    def __init__(self, engine: Engine, proc_id: str | None = None) -> None:
        self.engine = engine
        self.stats = engine.contention
        self.settings = engine.settings
        self.proc_id = proc_id or process_id()
        self.hash_key = engine.resolver.meta_key(c.META_CONTENTION)
        self.seen_key = engine.resolver.meta_key(c.META_CONTENTION_SEEN)
        self.slots_key = self.pieces_key(self.proc_id)
        # Pieces kept at least the window after the last publish (see the module docstring).
        settings = self.settings
        self.pieces_ttl_ms = int(
            1000
            * (
                settings.contention_window_seconds
                + settings.contention_slot_seconds
                + 2 * settings.contention_flush_seconds
            )
        )
        # Closed sub-windows (indexes) stored under slots_key by a publish that succeeded.
        self._stored: set[int] = set()
        # Bytes written by the last publish (head + new pieces), for the docs and benchmarks.
        self.last_publish_bytes = 0

    def pieces_key(self, proc_id: str) -> str:
        """The hash of a process's closed sub-windows."""
        return self.engine.resolver.meta_key(f"{c.META_CONTENTION_SLOTS}:{proc_id}")

    def _snapshot(self) -> bytes:
        return self.stats.snapshot(limit=self.settings.contention_snapshot_keys)

    def _publication(self) -> Publication:
        return self.stats.publication(limit=self.settings.contention_snapshot_keys)

    async def publish(self) -> None:
        """Store this process's head and new closed pieces; forget silent processes."""
        pub = self._publication()
        new = {str(i): piece for i, piece in pub.closed.items() if i not in self._stored}
        old = [str(i) for i in self._stored if i not in pub.closed]
        now_ms = int(time.time() * 1000)
        stale_ms = now_ms - int(self.settings.contention_stale_seconds * 1000)
        client = self.engine.client
        async with client.pipeline(transaction=False) as pipe:
            # 0 when the key is gone: pieces this process stored earlier were lost.
            pipe.pexpire(self.slots_key, self.pieces_ttl_ms)
            if new:  # before the head: a reader never misses a sub-window
                pipe.hset(self.slots_key, mapping=new)  # type: ignore[arg-type]
                pipe.pexpire(self.slots_key, self.pieces_ttl_ms)
            if old:
                pipe.hdel(self.slots_key, *old)
            pipe.hset(self.hash_key, self.proc_id, pub.head)
            pipe.zadd(self.seen_key, {self.proc_id: now_ms})
            pipe.zrangebyscore(self.seen_key, "-inf", f"({stale_ms}")
            replies = await self.engine.run(pipe.execute())
        self.last_publish_bytes = len(pub.head) + sum(len(p) for p in new.values())
        lost = not replies[0] and bool(self._stored.intersection(pub.closed))
        self._stored = set(pub.closed)
        gone = [_text(m) for m in replies[-1]]
        if lost or gone:
            async with client.pipeline(transaction=False) as pipe:
                if lost:  # store every piece again
                    pieces = {str(i): piece for i, piece in pub.closed.items()}
                    pipe.hset(self.slots_key, mapping=pieces)  # type: ignore[arg-type]
                    pipe.pexpire(self.slots_key, self.pieces_ttl_ms)
                    self.last_publish_bytes += sum(len(p) for p in pieces.values())
                if gone:
                    pipe.hdel(self.hash_key, *gone)
                    pipe.zrem(self.seen_key, *gone)
                    pipe.delete(*(self.pieces_key(g) for g in gone))
                await self.engine.run(pipe.execute())

    async def merged(self, window_s: float | None = None) -> tuple[Merged, int]:
        """Every live process's figures merged (this one's as of now); (merged, processes)."""
        stale_ms = int((time.time() - self.settings.contention_stale_seconds) * 1000)
        client = self.engine.client
        ids = await self.engine.run(client.zrangebyscore(self.seen_key, stale_ms, "+inf"))
        others = [i for i in (_text(m) for m in ids) if i != self.proc_id]
        blobs: list[bytes] = [self._snapshot()]
        if others:
            async with client.pipeline(transaction=False) as pipe:
                pipe.hmget(self.hash_key, others)
                for other in others:
                    pipe.hvals(self.pieces_key(other))
                replies = await self.engine.run(pipe.execute())
            for head, pieces in zip(replies[0], replies[1:], strict=True):
                if isinstance(head, bytes):
                    blobs.append(assemble(head, [p for p in pieces if isinstance(p, bytes)]))
        return self.stats.merge(blobs, window_s=window_s), len(blobs)


__all__ = ["ContentionStore", "process_id"]
