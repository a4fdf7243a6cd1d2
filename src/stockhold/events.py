"""The partitions' event streams read as one feed (WatchEvents): cursors, filters, the reader.

Every state change appends one entry, in its script call, to its partition's stream
(`<prefix>:{p<N>}:events`: fields `type`, one of `order_id` / `adjustment_id` / `sku`, `ts`,
`data`). A watcher keeps a *position* per partition: the id of the last entry it has passed
(delivered, or skipped by its filter). A read asks each stream for the entries after its
position (`XRANGE key (<position> + COUNT n`), one command per partition, all in one pipeline:
each stream is in its own slot, so this works on Redis Cluster (redis-py sends one pipeline
per node). Entry ids only grow within a stream, so positions that only move forward give no
gap and no duplicate, and each partition's entries come in their order.

A cursor is the positions of every partition, packed: version byte, partition count, then
per partition its id's milliseconds (zigzag delta from the previous partition's) and sequence,
as varints, then a CRC-32 of all that; base64url without padding. A cursor is checked
strictly: a text that is not exactly such an encoding, for another partition count, or ahead
of a stream, is refused and changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import orjson

from stockhold import constants as c
from stockhold.errors import FieldViolation, invalid
from stockhold.resolver import KeyResolver, check_text
from stockhold.store.calls import RedisClient, redis_errors

StreamId: TypeAlias = tuple[int, int]
"""A stream entry id as (milliseconds, sequence); (0, 0) is before every entry."""

EARLIEST: Final = "earliest"
CURSOR_VERSION: Final = 1
MAX_FILTER_VALUES: Final = 100
_MAX_ID_PART: Final = 2**64 - 1
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One stream entry, with the SKUs and warehouses it touches read from its data."""

    partition: int
    id: StreamId
    type: str
    order_id: str
    adjustment_id: str
    sku: str
    skus: tuple[str, ...]
    warehouses: tuple[str, ...]
    ts_ms: int
    data_json: str
    actor: str  # who caused it (field "actor"; "" in entries written before actors existed)
    data_valid: bool = True  # data_json is "" or JSON text (what a WMS body may embed as is)

    @property
    def id_text(self) -> str:
        """The id as Redis writes it."""
        return f"{self.id[0]}-{self.id[1]}"


def parse_id(raw: bytes | str) -> StreamId:
    """Stream entry id text "<ms>-<seq>" -> (ms, seq)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(fields: dict[bytes, bytes], name: bytes) -> str:
    value = fields.get(name)
    return value.decode("utf-8", "replace") if value is not None else ""


def _distinct(values: Sequence[Any]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in values if isinstance(v, str) and v))


def parse_entry(partition: int, entry_id: bytes | str, fields: dict[bytes, bytes]) -> StreamEvent:
    """A raw stream entry -> StreamEvent. Data that is not the JSON the scripts write touches
    nothing (the event is still delivered, as stored)."""
    data_json = _text(fields, b"data")
    valid = True
    try:
        data = orjson.loads(data_json) if data_json else {}
    except orjson.JSONDecodeError:
        data, valid = {}, False
    if not isinstance(data, dict):
        data = {}
    skus: list[Any] = []
    warehouses: list[Any] = []
    allocations = data.get("allocations")
    if isinstance(allocations, list):  # [[sku, spec, barcode, warehouse, quantity], ...]
        for a in allocations:
            if isinstance(a, list) and len(a) >= 4:
                skus.append(a[0])
                warehouses.append(a[3])
    for key, out in (("sku", skus), ("warehouse", warehouses)):
        if isinstance(data.get(key), str):  # STOCK_ADJUSTED
            out.append(data[key])
    sku = _text(fields, b"sku")  # SKU_POLICY_CHANGED
    if sku:
        skus.append(sku)
    try:
        ts_ms = int(_text(fields, b"ts") or 0)
    except ValueError:
        ts_ms = 0
    return StreamEvent(
        partition=partition,
        id=parse_id(entry_id),
        type=_text(fields, b"type"),
        order_id=_text(fields, b"order_id"),
        adjustment_id=_text(fields, b"adjustment_id"),
        sku=sku,
        skus=_distinct(skus),
        warehouses=_distinct(warehouses),
        ts_ms=ts_ms,
        data_json=data_json,
        actor=_text(fields, b"actor"),
        data_valid=valid,
    )


# -- cursors -------------------------------------------------------------------------------------


def _varint(n: int, out: bytearray) -> None:
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _read_varint(raw: bytes, at: int) -> tuple[int, int]:
    """(value, next offset); ValueError past the end, or beyond 10 bytes (64 bits)."""
    value = shift = 0
    for i in range(10):
        if at + i >= len(raw):
            raise ValueError("truncated")
        byte = raw[at + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if i and not byte:
                raise ValueError("not minimal")  # one value, one encoding
            return value, at + i + 1
        shift += 7
    raise ValueError("varint too long")


def _zigzag(n: int) -> int:
    return n * 2 if n >= 0 else -n * 2 - 1


def _unzigzag(n: int) -> int:
    return n // 2 if not n & 1 else -(n + 1) // 2


def encode_cursor(positions: Sequence[StreamId]) -> str:
    """Positions of every partition -> the opaque cursor text."""
    out = bytearray([CURSOR_VERSION])
    _varint(len(positions), out)
    previous = 0
    for ms, seq in positions:
        _varint(_zigzag(ms - previous), out)
        _varint(seq, out)
        previous = ms
    out += struct.pack(">I", zlib.crc32(out))
    return base64.urlsafe_b64encode(bytes(out)).rstrip(b"=").decode()


def decode_cursor(text: str, partitions: int) -> list[StreamId]:
    """The cursor text -> positions; ValueError (with what is wrong) unless it is exactly a
    cursor `encode_cursor` writes for this partition count."""
    if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not a cursor from WatchEvents (not base64url)")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not a cursor from WatchEvents (not base64url)") from None
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != text or len(raw) < 6:
        raise ValueError("not a cursor from WatchEvents")
    body, (crc,) = raw[:-4], struct.unpack(">I", raw[-4:])
    if zlib.crc32(body) != crc:
        raise ValueError("not a cursor from WatchEvents (checksum mismatch)")
    if body[0] != CURSOR_VERSION:
        raise ValueError(f"unknown cursor version {body[0]}")
    count, at = _read_varint(body, 1)
    if count != partitions:
        raise ValueError(f"a cursor for {count} partitions; this deployment has {partitions}")
    positions: list[StreamId] = []
    previous = 0
    for _ in range(count):
        delta, at = _read_varint(body, at)
        seq, at = _read_varint(body, at)
        ms = previous + _unzigzag(delta)
        if not 0 <= ms <= _MAX_ID_PART or seq > _MAX_ID_PART:
            raise ValueError("not a cursor from WatchEvents (an id out of range)")
        positions.append((ms, seq))
        previous = ms
    if at != len(body):
        raise ValueError("not a cursor from WatchEvents (trailing bytes)")
    return positions


def cursor_positions(
    text: str, partitions: int, field: str, out: list[FieldViolation]
) -> list[StreamId] | None:
    """A request's cursor field: None for "" (from now), (0, 0) everywhere for "earliest",
    else the decoded positions; a bad cursor is a violation appended to `out` (None)."""
    if text == EARLIEST:
        return [(0, 0)] * partitions
    if not text:
        return None
    try:
        return decode_cursor(text, partitions)
    except ValueError as err:
        out.append(FieldViolation(field, str(err)))
        return None


def check_not_ahead(positions: Sequence[StreamId], heads: Sequence[StreamId], field: str) -> None:
    """Refuse (INVALID_ARGUMENT, nothing changed) positions past a stream's last entry."""
    ahead = [p for p, (pos, head) in enumerate(zip(positions, heads, strict=True)) if pos > head]
    if ahead:
        raise invalid(
            [
                FieldViolation(
                    field,
                    f"ahead of partition {ahead[0]}'s stream: "
                    "a cursor of another deployment, or of data this one lost",
                )
            ]
        )


# -- filters -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Types, warehouses, SKUs: each non-empty set must match (any of its values)."""

    types: frozenset[str] = frozenset()
    warehouses: frozenset[str] = frozenset()
    skus: frozenset[str] = frozenset()

    def matches(self, e: StreamEvent) -> bool:
        """Whether the event passes: an event touching no warehouse (or no SKU) does not pass
        a warehouse (or SKU) filter."""
        return self.accepts(e.type, e.warehouses, e.skus)

    def accepts(self, etype: str, warehouses: Sequence[str], skus: Sequence[str]) -> bool:
        """`matches` for an event known by its type and what it touches (a POSTed body)."""
        if self.types and etype not in self.types:
            return False
        if self.warehouses and self.warehouses.isdisjoint(warehouses):
            return False
        return not self.skus or not self.skus.isdisjoint(skus)


def event_filter(
    types: Sequence[str],
    warehouses: Sequence[str],
    skus: Sequence[str],
    out: list[FieldViolation],
) -> EventFilter:
    """Validate the filter fields of a WatchEventsRequest (violations appended to `out`);
    warehouse and SKU names are normalised as everywhere else (NFC)."""
    for name, values in (("types", types), ("warehouses", warehouses), ("skus", skus)):
        if len(values) > MAX_FILTER_VALUES:
            out.append(FieldViolation(name, f"at most {MAX_FILTER_VALUES} values"))
    for i, t in enumerate(types[:MAX_FILTER_VALUES]):
        if t not in c.EVENT_TYPES:
            one_of = ", ".join(c.EVENT_TYPES)
            out.append(FieldViolation(f"types[{i}]", f"unknown event type; one of {one_of}"))
    return EventFilter(
        types=frozenset(types),
        warehouses=frozenset(
            check_text(w, f"warehouses[{i}]", 1, c.MAX_WAREHOUSE, out)
            for i, w in enumerate(warehouses[:MAX_FILTER_VALUES])
        ),
        skus=frozenset(
            check_text(s, f"skus[{i}]", 1, c.MAX_SKU, out)
            for i, s in enumerate(skus[:MAX_FILTER_VALUES])
        ),
    )


# -- the reader ----------------------------------------------------------------------------------


class EventReader:
    """Reads every partition's stream after given positions, a bounded batch per partition."""

    def __init__(self, client: RedisClient, resolver: KeyResolver, partitions: int, batch: int):
        self.client = client
        self.keys = [resolver.events_key(p) for p in range(partitions)]
        self.batch = batch

    async def heads(self) -> list[StreamId]:
        """The id of each stream's last entry ((0, 0) for an empty stream): "from now"."""
        with redis_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                for key in self.keys:
                    pipe.xrevrange(key, "+", "-", count=1)
                replies = await pipe.execute()
        return [parse_id(r[0][0]) if r else (0, 0) for r in replies]

    async def read(self, positions: Sequence[StreamId]) -> list[list[StreamEvent]]:
        """Per partition, at most `batch` entries after its position, in stream order."""
        with redis_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                for key, (ms, seq) in zip(self.keys, positions, strict=True):
                    pipe.xrange(key, f"({ms}-{seq}", "+", count=self.batch)
                replies = await pipe.execute()
        return [
            [parse_entry(p, entry_id, fields) for entry_id, fields in reply]
            for p, reply in enumerate(replies)
        ]
