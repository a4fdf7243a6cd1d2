"""Retention of the event streams (issue 12, docs/events.md "Retention and the hard cap").

Every `event_trim_interval_seconds` each server process runs trim.lua on every partition's
stream: entries older than `event_retention_seconds` are trimmed (XTRIM MINID ~), never one a
consumer group still needs (its oldest pending entry, or anything after its last-delivered id).
The scripts' XADD MAXLEN ~ `event_stream_maxlen` stays the hard cap: a stream at 90 % of it is
a WARNING (and the gauge stockhold_event_stream_fill_ratio says how full each one is); a
subscription that lost entries to it is an ERROR and stockhold_subscription_events_lost_total
(also the statistics' `lost`, shown by GetSubscriptionLag).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Final

from stockhold import metrics
from stockhold.delivery.subscriptions import GROUP_PREFIX, SubscriptionStore
from stockhold.store.calls import ScriptCalls

log = logging.getLogger(__name__)

FILL_WARNING: Final = 0.9


@dataclass(frozen=True, slots=True)
class PartitionTrim:
    """What one pass did to one partition's stream."""

    partition: int
    length: int
    first_id: str
    trimmed: int
    lost: dict[str, int]  # subscription name -> entries lost to the hard cap


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class Trimmer:
    """Runs the retention pass over every partition (see the module docstring)."""

    def __init__(self, calls: ScriptCalls, store: SubscriptionStore) -> None:
        self.calls = calls
        self.store = store
        settings = calls.settings
        self.retention_ms = settings.event_retention_seconds * 1000
        self.cap = settings.event_stream_maxlen
        self._full: set[int] = set()  # partitions at FILL_WARNING or more (logged once)

    async def run_once(self) -> list[PartitionTrim]:
        """One pass over every partition; logs and metrics as the module docstring says."""
        names = await self.store.names()
        groups = [GROUP_PREFIX + n for n in names]
        replies = await asyncio.gather(
            *(
                self.calls.call_script(
                    self.calls.scripts.trim,
                    [
                        self.store.stream_key(p),
                        *(self.store.stats_key(n, p) for n in names),
                    ],
                    [str(self.retention_ms), *groups],
                )
                for p in range(self.store.partitions)
            )
        )
        out = [self._report(p, reply) for p, reply in enumerate(replies)]
        return out

    def _report(self, partition: int, reply: list[Any]) -> PartitionTrim:
        length, first, trimmed, flat = reply
        lost = {
            _text(flat[i]).removeprefix(GROUP_PREFIX): int(flat[i + 1])
            for i in range(0, len(flat), 2)
        }
        fill = int(length) / self.cap
        metrics.set_stream_fill(partition, fill)
        if fill >= FILL_WARNING and partition not in self._full:
            self._full.add(partition)
            log.warning(
                "event stream near its hard cap: the oldest entries will be dropped, "
                "delivered or not",
                extra={"partition": partition, "length": int(length), "cap": self.cap},
            )
        elif fill < FILL_WARNING:
            self._full.discard(partition)
        for name, n in lost.items():
            metrics.record_events_lost(name, n)
            log.error(
                "subscription lost events to the event stream's hard cap",
                extra={"subscription": name, "partition": partition, "lost": n},
            )
        return PartitionTrim(partition, int(length), _text(first), int(trimmed), lost)
