"""Key resolver, pure-Python implementation: the reference behaviour.

It normalises (Unicode NFC) and validates user text, escapes it so that it can never change
key syntax or cluster slot, picks the partition by a stable hash (CRC-32 of the canonical id,
mod the partition count) and builds every key.

`stockhold.resolver` chooses between this module and its compiled twin
`stockhold._resolver_c` (native/_resolver_c.pyx), which must give the same answer, the same
violations and the same errors for every input. The result types (Unit, OrderKeys, ...) are
defined here only; the twin returns these very classes. Import `stockhold.resolver`, not this.
"""

from __future__ import annotations

import hashlib
import unicodedata
import zlib
from collections.abc import Sequence
from typing import NamedTuple

from stockhold import constants as c
from stockhold.errors import FieldViolation, invalid

# Characters that are key syntax: the separator, hash-tag braces, and the escape itself.
_ESCAPES = str.maketrans({"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D"})


class Unit(NamedTuple):
    """A resolved sales unit: normalised text, canonical id, partition and stock key."""

    sku: str
    spec: str
    barcode: str
    unit_id: str
    partition: int
    stock_key: str


class OrderKeys(NamedTuple):
    """Keys of an order's home partition (by hash of its order id)."""

    order_id: str
    partition: int
    order_key: str
    expiry_key: str
    events_key: str


class AdjustmentKeys(NamedTuple):
    """Keys of an adjustment's home partition (by hash of its adjustment id)."""

    adjustment_id: str
    partition: int
    record_key: str
    events_key: str


class ResolvedOrder(NamedTuple):
    """A validated Reserve: keys, distinct units and lines referring to them by index."""

    keys: OrderKeys
    units: tuple[Unit, ...]  # distinct, in first-appearance order
    lines: tuple[tuple[int, str, int], ...]  # (index into units, warehouse or "", quantity)
    hold_seconds: int  # as requested; 0 means the default
    fingerprint: str  # identifies the request's contents for idempotent replays


def escape(text: str) -> str:
    """Percent-encode the characters that are key syntax (`%`, `:`, `{`, `}`)."""
    return text.translate(_ESCAPES)


def check_text(
    value: str, path: str, lo: int, hi: int, out: list[FieldViolation], normalise: bool = True
) -> str:
    """Validate printable text of lo..hi characters; NFC-normalise it; record any violation."""
    if normalise and not value.isascii():
        value = unicodedata.normalize("NFC", value)
    n = len(value)
    if n < lo:
        out.append(FieldViolation(path, "must not be empty" if lo == 1 else f"at least {lo} chars"))
    elif n > hi:
        out.append(FieldViolation(path, f"at most {hi} characters (got {n})"))
    elif not value.isprintable():
        out.append(FieldViolation(path, "must be printable text (no control characters)"))
    return value


def check_int(value: int, path: str, lo: int, hi: int, out: list[FieldViolation]) -> None:
    """Record a violation unless lo <= value <= hi."""
    if not lo <= value <= hi:
        out.append(FieldViolation(path, f"must be within {lo}..{hi} (got {value})"))


class KeyResolver:
    """Builds every Redis key; the only place that knows the key layout (see constants)."""

    def __init__(self, prefix: str = c.DEFAULT_KEY_PREFIX, partitions: int = c.DEFAULT_PARTITIONS):
        self.prefix = prefix
        self.partitions = partitions
        self._tags = [f"{prefix}:{{p{p}}}:" for p in range(partitions)]

    # -- partitions ---------------------------------------------------------------------------
    def partition_of(self, ident: str) -> int:
        """Stable partition of a canonical id: CRC-32 of its UTF-8 bytes, mod the count."""
        return zlib.crc32(ident.encode()) % self.partitions

    def expiry_key(self, partition: int) -> str:
        """The expiry index (zset of order id -> deadline) of a partition."""
        return self._tags[partition] + c.EXPIRY

    def events_key(self, partition: int) -> str:
        """The event stream of a partition."""
        return self._tags[partition] + c.EVENTS

    def meta_partitions_key(self) -> str:
        """Where the deployment's partition count is recorded."""
        return f"{self.prefix}:{c.META_PARTITIONS}"

    def sku_key(self, sku: str) -> str:
        """The policy + sales-bucket hash of a (normalised) SKU, in the SKU's own partition."""
        sid = escape(sku)
        return f"{self._tags[self.partition_of(sid)]}{c.SKU}:{sid}"

    def meta_key(self, name: str) -> str:
        """A deployment-wide key such as `constants.META_CONTENTION` (the `{meta}` slot)."""
        return f"{self.prefix}:{name}"

    # -- sales units --------------------------------------------------------------------------
    def unit(
        self,
        sku: str,
        spec: str,
        barcode: str,
        path: str = "unit",
        out: list[FieldViolation] | None = None,
    ) -> Unit:
        """Resolve one sales unit.

        Violations go to `out` when given (the caller raises once for all fields); without
        it, any violation raises INVALID_ARGUMENT at once.
        """
        found: list[FieldViolation] = [] if out is None else out
        unit = self._unit(sku, spec, barcode, path, found)
        if out is None and found:
            raise invalid(found)
        return unit

    def _unit(
        self, sku: str, spec: str, barcode: str, path: str, out: list[FieldViolation]
    ) -> Unit:
        sku = check_text(sku, f"{path}.sku", 1, c.MAX_SKU, out)
        spec = check_text(spec, f"{path}.spec", 0, c.MAX_SPEC, out)
        barcode = check_text(barcode, f"{path}.barcode", 0, c.MAX_BARCODE, out)
        esku = escape(sku)
        unit_id = f"{esku}:{escape(spec)}:{escape(barcode)}"
        # A unit lives in its SKU's partition, beside the SKU's policy hash: on Redis Cluster
        # stock and policy of one SKU share a slot (issue 11).
        p = self.partition_of(esku)
        return Unit(sku, spec, barcode, unit_id, p, f"{self._tags[p]}{c.STOCK}:{unit_id}")

    def units(self, triples: Sequence[tuple[str, str, str]], path: str = "units") -> list[Unit]:
        """Resolve many units at once (availability reads), collecting every violation."""
        out: list[FieldViolation] = []
        units = [self._unit(s, sp, b, f"{path}[{i}]", out) for i, (s, sp, b) in enumerate(triples)]
        if out:
            raise invalid(out)
        return units

    # -- orders and adjustments ---------------------------------------------------------------
    def order(
        self, order_id: str, path: str = "order_id", out: list[FieldViolation] | None = None
    ) -> OrderKeys:
        """Resolve an order id (opaque: validated, not normalised); `out` as for `unit`."""
        found: list[FieldViolation] = [] if out is None else out
        keys = self._order(order_id, path, found)
        if out is None and found:
            raise invalid(found)
        return keys

    def _order(self, order_id: str, path: str, out: list[FieldViolation]) -> OrderKeys:
        check_text(order_id, path, 1, c.MAX_ORDER_ID, out, normalise=False)
        oid = escape(order_id)
        p = self.partition_of(oid)
        tag = self._tags[p]
        return OrderKeys(order_id, p, f"{tag}{c.ORDER}:{oid}", tag + c.EXPIRY, tag + c.EVENTS)

    def adjustment(
        self,
        adjustment_id: str,
        path: str = "adjustment_id",
        out: list[FieldViolation] | None = None,
    ) -> AdjustmentKeys:
        """Resolve an adjustment id (opaque: validated, not normalised); `out` as for `unit`."""
        found: list[FieldViolation] = [] if out is None else out
        check_text(adjustment_id, path, 1, c.MAX_ADJUSTMENT_ID, found, normalise=False)
        if out is None and found:
            raise invalid(found)
        aid = escape(adjustment_id)
        p = self.partition_of(aid)
        tag = self._tags[p]
        return AdjustmentKeys(adjustment_id, p, f"{tag}{c.ADJUSTMENT}:{aid}", tag + c.EVENTS)

    def resolve_order(
        self,
        order_id: str,
        lines: Sequence[tuple[str, str, str, str, int]],
        hold_seconds: int,
        max_hold_seconds: int,
    ) -> ResolvedOrder:
        """Validate and resolve a whole Reserve in one call.

        `lines` holds (sku, spec, barcode, warehouse, quantity) tuples. Every violation is
        collected and raised together as INVALID_ARGUMENT.
        """
        out: list[FieldViolation] = []
        keys = self._order(order_id, "order_id", out)
        if not 1 <= len(lines) <= c.MAX_LINES:
            out.append(
                FieldViolation("lines", f"must hold 1..{c.MAX_LINES} lines (got {len(lines)})")
            )
        if hold_seconds != 0:
            check_int(hold_seconds, "hold_seconds", 1, max_hold_seconds, out)
        index: dict[str, int] = {}
        units: list[Unit] = []
        resolved: list[tuple[int, str, int]] = []
        canon: list[str] = []
        for i, (sku, spec, barcode, warehouse, qty) in enumerate(lines[: c.MAX_LINES]):
            unit = self._unit(sku, spec, barcode, f"lines[{i}].unit", out)
            wh = check_text(warehouse, f"lines[{i}].warehouse", 0, c.MAX_WAREHOUSE, out)
            check_int(qty, f"lines[{i}].quantity", 1, c.MAX_QUANTITY, out)
            k = index.get(unit.unit_id)
            if k is None:
                k = index[unit.unit_id] = len(units)
                units.append(unit)
            resolved.append((k, wh, qty))
            canon.append(f"{unit.unit_id}\x00{escape(wh)}\x00{qty}")
        if out:
            raise invalid(out)
        canon.sort()
        canon.append(str(hold_seconds))
        fp = hashlib.blake2b("\x01".join(canon).encode(), digest_size=16).hexdigest()
        return ResolvedOrder(keys, tuple(units), tuple(resolved), hold_seconds, fp)


__all__ = [
    "AdjustmentKeys",
    "KeyResolver",
    "OrderKeys",
    "ResolvedOrder",
    "Unit",
    "check_int",
    "check_text",
    "escape",
]
