"""Per-SKU policies: reserve timeout threshold, default hold, line limit, hot flag.

A policy is stored in the SKU's hash in Redis (constants: `POLICY_*` fields), next to the
SKU's trailing sales buckets that the commit script maintains. Whether a SKU is hot is
decided on Redis's clock whenever a script reads the hash: pinned policies keep the
operator's flag, others are hot while more than `hot_threshold_units` units were committed
over the trailing `hot_window_seconds`.

The reserve path needs each SKU's threshold *before* it sends anything, so every process
keeps a bounded cache (`PolicyCache`) of effective thresholds. It is refreshed for free by
every reserve reply (reserve.lua returns the state of each SKU it read), by every
SetSkuPolicy in this process, and by a background pass over stored policies and hot SKUs
(`PolicyStore.refresh`), so another process's change arrives within
`policy_refresh_seconds` or the next reserve reply, whichever comes first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from stockhold import constants as c
from stockhold.resolver import escape, partition_tag
from stockhold.scripts import policy_window
from stockhold.settings import Settings
from stockhold.store.calls import ScriptCalls

# Most SKUs one refresh pass or one ListSkuPolicies page reads from Redis.
REFRESH_BATCH = 500
MAX_PAGE = 1000
# ListSkuPolicies(hot_only) reads at most this many index entries per page looking for hot ones.
MAX_SCAN = 5000


def effective_timeout_ms(stored_ms: int, hot: bool, pinned: bool, settings: Settings) -> int:
    """The reserve threshold that applies to a SKU.

    Pinned: the stored threshold, else the hot or the default one by the operator's flag.
    Not pinned: the stored threshold, else the default; automatic hotness only tightens it to
    the hot threshold, never loosens it.
    """
    if pinned:
        if stored_ms:
            return stored_ms
        return settings.hot_reserve_timeout_ms if hot else settings.reserve_timeout_ms
    base = stored_ms or settings.reserve_timeout_ms
    return min(base, settings.hot_reserve_timeout_ms) if hot else base


@dataclass(frozen=True, slots=True)
class SkuPolicy:
    """A SKU's stored policy (0: default) and its state on Redis's clock when read."""

    sku: str
    reserve_timeout_ms: int
    hold_seconds: int
    max_line_quantity: int
    hot: bool  # the operator's flag (applies while pinned)
    pinned: bool
    stored: bool
    effective_hot: bool
    committed_window: int
    updated_ms: int | None

    @classmethod
    def from_state(cls, sku: str, st: dict[str, Any] | None) -> SkuPolicy:
        """From a script's sku_state table (None: nothing stored, nothing sold)."""
        if not st:
            return cls(sku, 0, 0, 0, False, False, False, False, 0, None)
        up = int(st.get("up") or 0)
        return cls(
            sku=sku,
            reserve_timeout_ms=int(st["to"]),
            hold_seconds=int(st["hold"]),
            max_line_quantity=int(st["maxq"]),
            hot=bool(st["hot_flag"]),
            pinned=bool(st["pin"]),
            stored=bool(st["stored"]),
            effective_hot=bool(st["hot"]),
            committed_window=int(st["sold"]),
            updated_ms=up or None,
        )

    def timeout_ms(self, settings: Settings) -> int:
        """The reserve threshold that applies now."""
        return effective_timeout_ms(
            self.reserve_timeout_ms, self.effective_hot, self.pinned, settings
        )


class PolicyCache:
    """Effective reserve thresholds per SKU, bounded (oldest entry out first)."""

    __slots__ = ("_capacity", "_entries", "_settings")

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._capacity = max(1, settings.policy_cache_size)
        self._entries: dict[str, tuple[int, bool]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def update(self, sku: str, stored_ms: int, hot: bool, pinned: bool) -> None:
        """Record what a script just read for `sku`."""
        entries = self._entries
        if sku not in entries and len(entries) >= self._capacity:
            del entries[next(iter(entries))]
        entries[sku] = (effective_timeout_ms(stored_ms, hot, pinned, self._settings), hot)

    def put(self, policy: SkuPolicy) -> None:
        """Record a policy read in full (SetSkuPolicy, GetSkuPolicy, refresh)."""
        self.update(policy.sku, policy.reserve_timeout_ms, policy.effective_hot, policy.pinned)

    def limit(self, skus: Iterable[str]) -> tuple[int, str, bool]:
        """(threshold ms, SKU, hot) of the strictest of `skus`; unknown SKUs get the default."""
        default = self._settings.reserve_timeout_ms
        best, best_sku, best_hot = -1, "", False
        get = self._entries.get
        for sku in skus:
            ms, hot = get(sku, (default, False))
            if best < 0 or ms < best:
                best, best_sku, best_hot = ms, sku, hot
        return best, best_sku, best_hot


def _page_token(sku: str) -> str:
    return base64.urlsafe_b64encode(sku.encode()).decode().rstrip("=")


def parse_page_token(token: str) -> str | None:
    """The last SKU of the previous page, or None when the token is not one of ours."""
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


class PolicyStore:
    """Policy reads and writes over the script-call layer."""

    def __init__(self, calls: ScriptCalls) -> None:
        self.calls = calls
        self.settings = settings = calls.settings
        self.cache = PolicyCache(settings)
        self.window = policy_window(settings)
        resolver = calls.resolver
        # One SKU index per partition, in the slot of the SKU hashes it lists (constants.py).
        self.index_keys = [
            partition_tag(resolver, p) + c.SKU_INDEX for p in range(settings.partitions)
        ]
        self._refresh_after = ""  # the refresh pass's cursor over the SKU index

    async def set(
        self, sku: str, fields: dict[str, int], reset: bool = False, *, actor: str
    ) -> tuple[SkuPolicy, int]:
        """Store the given fields of a SKU's policy (or reset it) as `actor` (the event's
        actor); (policy, Redis now ms)."""
        key = self.calls.resolver.sku_key(sku)
        partition = self.calls.resolver.partition_of(key.rsplit(":", 1)[-1])
        events = self.calls.resolver.events_key(partition)
        index_key = self.index_keys[partition]
        arg = orjson.dumps(
            {
                "sku": sku,
                "reset": reset,
                "set": fields,
                "maxlen": self.settings.event_stream_maxlen,
                "pol": self.window,
                "actor": actor,
            }
        )
        result = orjson.loads(
            await self.calls.call_script(
                self.calls.scripts.policy_set, (key, index_key, events), (arg,)
            )
        )
        policy = SkuPolicy.from_state(sku, result["state"])
        self.cache.put(policy)
        return policy, int(result["now"])

    async def get_many(self, skus: Sequence[str], prune: bool = False) -> list[SkuPolicy]:
        """Policies of many SKUs (missing ones come back as defaults): one script call, or on
        Redis Cluster one per partition, at once."""
        if not skus:
            return []
        resolver = self.calls.resolver
        groups: dict[int, list[str]] = {}
        if self.settings.redis_cluster:
            for s in skus:
                groups.setdefault(resolver.partition_of(escape(s)), []).append(s)
        else:
            groups[0] = list(skus)

        async def one(group: list[str]) -> list[Any]:
            keys = [resolver.sku_key(s) for s in group]
            arg = orjson.dumps({"skus": group, "prune": prune, "pol": self.window})
            result = orjson.loads(
                await self.calls.call_script(self.calls.scripts.policy_get, keys, (arg,))
            )
            return list(result["states"] or [])

        found: dict[str, Any] = {}
        for group, states in zip(
            groups.values(), await asyncio.gather(*(one(g) for g in groups.values())), strict=True
        ):
            found.update(zip(group, states, strict=True))
        policies = [SkuPolicy.from_state(s, found[s] or None) for s in skus]
        for p in policies:
            self.cache.put(p)
        return policies

    async def _index_page(self, after: str, count: int) -> list[str]:
        """The first `count` SKUs after `after` over every partition's index (one pipeline:
        each partition's first `count`, merged)."""
        start = f"({after}" if after else "-"
        pages = await self.calls.pipeline(
            [("ZRANGEBYLEX", key, start, "+", "LIMIT", 0, count) for key in self.index_keys]
        )
        merged = sorted({m.decode() if isinstance(m, bytes) else m for page in pages for m in page})
        return merged[:count]

    async def list(self, page_size: int, after: str, hot_only: bool) -> tuple[list[SkuPolicy], str]:
        """One page of SKUs with a stored policy or recent sales, by SKU; (page, next token)."""
        found: list[SkuPolicy] = []
        scanned = 0
        last = after
        while len(found) < page_size and scanned < MAX_SCAN:
            want = page_size - len(found) if not hot_only else min(MAX_PAGE, MAX_SCAN - scanned)
            skus = await self._index_page(last, want)
            if not skus:
                return found, ""
            scanned += len(skus)
            for p in await self.get_many(skus, prune=True):
                last = p.sku
                if (p.stored or p.committed_window > 0) and (p.effective_hot or not hot_only):
                    found.append(p)
                    if len(found) == page_size:
                        break
        more = await self._index_page(last, 1)
        return found, _page_token(last) if more else ""

    async def refresh(self) -> int:
        """Re-read one batch of indexed SKUs into the cache, continuing where the last left off."""
        skus = await self._index_page(self._refresh_after, REFRESH_BATCH)
        self._refresh_after = skus[-1] if len(skus) == REFRESH_BATCH else ""
        await self.get_many(skus)
        return len(skus)


__all__ = [
    "PolicyCache",
    "PolicyStore",
    "SkuPolicy",
    "effective_timeout_ms",
    "parse_page_token",
]
