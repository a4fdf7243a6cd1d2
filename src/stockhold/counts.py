"""Cycle counts (SetOnHand, issue 12): the WMS's absolute on-hand figure for one sales unit in
one warehouse.

A count sets available to `on_hand - reserved`: the holds stay as they are, so a count below
what is reserved leaves available negative. That is stored as counted, never clamped, and
reported as oversold (the STOCK_COUNTED event's `oversold`, `StockLevel.oversold`, the counter
`stockhold_oversold_counts_total` and a WARNING log line); Reserve refuses while available is
below the quantity asked, and releases or receipts bring it back.

A count is idempotent by its count id (the same count again: the stored answer, `replayed`;
another count under the same id: COUNT_CONFLICT), and a count taken before the last one
applied to the same unit and warehouse is refused (STALE_COUNT): a late delivery of an old
count never overwrites a newer one. One count.lua call does it all, in the unit's SKU
partition (its stock hash's slot): the count record, the event and the stock.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import orjson

from stockhold import constants as c
from stockhold import metrics
from stockhold.errors import DomainError, FieldViolation, Reason, invalid
from stockhold.model import StockLevel
from stockhold.resolver import KeyResolver, Unit, check_int, check_text, escape, partition_tag
from stockhold.store.calls import ScriptCalls
from stockhold.timeparse import format_rfc3339, parse_rfc3339

log = logging.getLogger(__name__)

# counted_at must fall in [1970, 3000): a count dated centuries ahead (a WMS clock gone wrong)
# would make every later count stale, and the scripts' JSON keeps integers exact below 10^14.
_COUNTED_AT_MAX_MS = 32503680000000  # 3000-01-01T00:00:00Z


@dataclass(frozen=True, slots=True)
class Count:
    """A validated cycle count."""

    count_id: str
    unit: Unit
    warehouse: str
    on_hand: int
    counted_at_ms: int

    @property
    def fingerprint(self) -> str:
        """Identifies the count's contents: the same id with another fingerprint conflicts.
        The instant, not its text: one counted_at written in two zones is the same count."""
        parts = (self.unit.unit_id, escape(self.warehouse), str(self.on_hand))
        text = "\x00".join((*parts, str(self.counted_at_ms)))
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class CountResult:
    """What a count left (or, replayed, had left): the level, on hand before it."""

    level: StockLevel
    previous_on_hand: int
    replayed: bool

    @property
    def oversold(self) -> bool:
        """The count found fewer units than were reserved."""
        return self.level.oversold


def check_count(
    resolver: KeyResolver,
    count_id: str,
    sku: str,
    spec: str,
    barcode: str,
    warehouse: str,
    on_hand: int,
    counted_at: str,
) -> Count:
    """Validate a SetOnHand request; every violation at once as INVALID_ARGUMENT."""
    out: list[FieldViolation] = []
    check_text(count_id, "count_id", 1, c.MAX_COUNT_ID, out, normalise=False)
    unit = resolver.unit(sku, spec, barcode, "unit", out=out)
    wh = check_text(warehouse, "warehouse", 1, c.MAX_WAREHOUSE, out)
    check_int(on_hand, "on_hand", 0, c.MAX_DELTA, out)
    at_ms = 0
    if not counted_at:
        out.append(FieldViolation("counted_at", "required: RFC 3339 with an explicit offset"))
    else:
        try:
            at_ms = parse_rfc3339(counted_at, "counted_at")
        except DomainError as err:
            out += err.violations
        else:
            if not 0 <= at_ms < _COUNTED_AT_MAX_MS:
                out.append(FieldViolation("counted_at", "must be within 1970..2999"))
    if out:
        raise invalid(out)
    return Count(count_id, unit, wh, on_hand, at_ms)


def count_key(resolver: KeyResolver, count: Count) -> str:
    """The count record: `<tag of the unit's partition>count:<escaped count id>`."""
    return f"{partition_tag(resolver, count.unit.partition)}{c.COUNT}:{escape(count.count_id)}"


async def set_on_hand(calls: ScriptCalls, count: Count, actor: str) -> CountResult:
    """Apply a cycle count (one count.lua call); DomainError for a conflict or a stale count."""
    settings, resolver, unit = calls.settings, calls.resolver, count.unit
    arg = orjson.dumps(
        {
            "cid": count.count_id,
            "fp": count.fingerprint,
            "wh": count.warehouse,
            "on_hand": count.on_hand,
            "at": count.counted_at_ms,
            "unit": (unit.sku, unit.spec, unit.barcode),
            "maxlen": settings.event_stream_maxlen,
            "retention": settings.record_retention_seconds * 1000,
            "actor": actor,
        }
    )
    keys = (count_key(resolver, count), resolver.events_key(unit.partition), unit.stock_key)
    result = orjson.loads(await calls.call_script(calls.scripts.count, keys, (arg,)))
    err = result.get("err")
    if err is not None:
        meta = dict(result.get("meta") or {})
        if "last_counted_at_ms" in meta:
            meta["last_counted_at"] = format_rfc3339(int(meta["last_counted_at_ms"]))
        raise DomainError(Reason(err), metadata=meta)
    level = StockLevel(
        unit.sku,
        unit.spec,
        unit.barcode,
        count.warehouse,
        int(result["available"]),
        int(result["reserved"]),
    )
    done = CountResult(level, int(result["previous"]), bool(result["replayed"]))
    if done.oversold and not done.replayed:
        metrics.record_oversold_count()
        log.warning(
            "oversold count: on_hand below reserved",
            extra={
                "unit": unit.unit_id,
                "warehouse": count.warehouse,
                "on_hand": count.on_hand,
                "reserved": level.reserved,
                "count_id": count.count_id,
            },
        )
    return done
