"""`stockhold snapshot` and `stockhold reconcile`: stock counters checked against the events.

A **cut** is one consistent read of the store: every stream's last entry id (its position, as
in the event feed's cursor), every stock hash, and, on Redis Cluster, every part record (and
every HELD hold, for the cross-check). What "consistent" means:

- **One node**: the whole cut is ONE script call. A single-slot order's event (in the order's
  partition) and its stock change (in the SKUs' partitions) come from one script call too, so
  the cut's counters are exactly the effect of every event up to its positions. (Per-partition
  reads would not be: the event and the stock are in different partitions.)
- **Redis Cluster**: one script call per partition (its slot). A single-slot order's event and
  stock are in that one slot, so the partition's counters match its position exactly. A
  cross-slot order's stock moves in its *part* records, each in the stock's slot, in the same
  call as the counter, while its events are at home and are written before (commit, release,
  expiry) or after (reserve) the parts move. So for the units of a partition, cross-slot
  orders are accounted from the part records read in the same call as the counters, not from
  the events. The call follows the partition's parts index, which holds every HELD part, so
  it sees every part held at that instant (`Store._placed_new_parts` for the rest).

Reconcile takes a second cut of the live store and computes, per (unit, warehouse), the
snapshot's counters plus the effect of every event between the two cuts' positions (and, on
a cluster, of every part that changed between them), then compares with the live cut. So
load running meanwhile is neither missed nor counted twice: events after the live cut's
positions are not replayed, and the live counters are read at those positions.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final, TextIO

import orjson
import redis
from redis.cluster import RedisCluster

from stockhold import constants as c
from stockhold.events import StreamId, decode_cursor, encode_cursor, parse_entry, parse_id
from stockhold.resolver import KeyResolver
from stockhold.secretfile import redis_kwargs
from stockhold.settings import ConfigError, Settings, mask_url

SNAPSHOT_VERSION: Final = 1
SCAN_COUNT: Final = 500
XRANGE_COUNT: Final = 1000
# A cut is read again when keys appeared between the key scan and the read (bounded).
CUT_ATTEMPTS: Final = 5

Counter = tuple[str, str]
"""(stock key, warehouse)."""

# KEYS: the streams of the partitions read, their expiry indexes, their parts indexes, then the
# stock hashes, then the part records found by SCAN. ARGV[1] number of partitions, ARGV[2]
# number of stock keys, then per partition its record key prefix and its part key prefix.
# Returns {TIME, heads, stock hashes, parts, HELD records}, every value as read in this one
# call. Record and part keys are also derived from the index members (same slot: a record and
# its expiry index share a partition, a part and its parts index too): every HELD part is in
# its parts index from the call that wrote it until after it is finished, so a part created
# after the SCAN is read all the same.
_CUT = """
local ns, nk = tonumber(ARGV[1]), tonumber(ARGV[2])
local esc = {['%'] = '%25', [':'] = '%3A', ['{'] = '%7B', ['}'] = '%7D'}
local heads, stock, parts, held, seen = {}, {}, {}, {}, {}
local function part(key)
  if seen[key] then return end
  seen[key] = true
  local row = redis.call('HMGET', key, 'st', 'units', 'alloc', 'cr', 'up')
  if row[1] then parts[#parts + 1] = {key, row[1], row[2], row[3], row[4], row[5]} end
end
for i = 1, ns do
  local last = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
  heads[i] = last[1] and last[1][1] or '0-0'
  local rprefix, pprefix = ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  for _, oid in ipairs(redis.call('ZRANGE', KEYS[ns + i], 0, -1)) do
    local rec = redis.call('HMGET', rprefix .. string.gsub(oid, '[%%:{}]', esc),
      'st', 'units', 'alloc', 'parts')
    if rec[1] == 'H' and not rec[4] then held[#held + 1] = {rec[2], rec[3]} end
  end
  for _, oid in ipairs(redis.call('ZRANGE', KEYS[2 * ns + i], 0, -1)) do
    part(pprefix .. string.gsub(oid, '[%%:{}]', esc))
  end
end
for i = 3 * ns + 1, 3 * ns + nk do stock[#stock + 1] = redis.call('HGETALL', KEYS[i]) end
for i = 3 * ns + nk + 1, #KEYS do part(KEYS[i]) end
return {redis.call('TIME'), heads, stock, parts, held}
"""

# KEYS[1] a stock hash, KEYS[2] the event stream of its partition. ARGV: field ("a:<wh>" or
# "r:<wh>"), the value it had when reconcile read it, the value it must have, the event's data
# (JSON), maxlen, the event's actor. Sets it only when it still holds the value read: 1
# repaired, 0 changed since.
_REPAIR = """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
if cur ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
local t = redis.call('TIME')
local now = t[1] .. string.sub('00000' .. t[2], -6, -4)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'type', 'STOCK_REPAIRED',
  'adjustment_id', '', 'ts', now, 'data', ARGV[4], 'actor', ARGV[6])
return 1
"""


class Refused(Exception):
    """Why the command does not run: one line for the operator, an exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True, slots=True)
class Part:
    """A part record as read in a cut: state, holds [(stock key, warehouse, qty)], times."""

    state: str
    holds: tuple[tuple[str, str, int], ...]
    created_ms: int
    updated_ms: int

    def effect(self) -> tuple[int, int]:
        """(available, reserved) change per hold this part stands for, relative to none."""
        if self.state == "H":
            return -1, 1
        if self.state == "C":
            return -1, 0
        return 0, 0


@dataclasses.dataclass
class Cut:
    """One consistent read (see the module docstring)."""

    positions: list[StreamId]
    time_ms: int
    counters: dict[Counter, list[int]]
    units: dict[str, str]  # stock key -> unit id (escaped, as in the key)
    parts: dict[str, Part]
    held: dict[Counter, int]
    times: dict[int, int] = dataclasses.field(default_factory=dict)  # partition -> read ms


def _pattern(text: str) -> str:
    """A literal for a SCAN MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _holds(
    resolver: KeyResolver, units_json: str | None, alloc_json: str | None
) -> Iterator[tuple[str, str, int]]:
    if not units_json or not alloc_json:
        return
    units, alloc = orjson.loads(units_json), orjson.loads(alloc_json)
    for index, wh, qty in alloc:
        sku, spec, barcode = units[int(index) - 1][:3]
        yield resolver.unit(sku, spec, barcode).stock_key, wh, int(qty)


class Store:
    """The Redis of one deployment, read with redis-py (sync), standalone or cluster."""

    def __init__(self, settings: Settings, url: str) -> None:
        self.settings = settings
        self.url = url
        self.cluster = settings.redis_cluster
        self.resolver = KeyResolver(settings.key_prefix, settings.partitions)
        self.partitions = settings.partitions
        kw: dict[str, Any] = {
            "socket_connect_timeout": 5.0,
            "socket_timeout": 60.0,
            **redis_kwargs(settings),  # the password of redis_password_file
        }
        self.client: redis.Redis | RedisCluster = (
            RedisCluster.from_url(url, **kw) if self.cluster else redis.Redis.from_url(url, **kw)
        )
        self._cut = self.client.register_script(_CUT)
        self._repair = self.client.register_script(_REPAIR)

    def close(self) -> None:
        self.client.close()

    def tag(self, p: int) -> str:
        return f"{self.settings.key_prefix}:{{p{p}}}:"

    def _scan(self, kind: str) -> dict[int, set[str]]:
        """Keys `<prefix>:{p<N>}:<kind>:*` by partition."""
        out: dict[int, set[str]] = {}
        pattern = _pattern(self.settings.key_prefix) + ":{p*}:" + kind + ":*"
        head = re.compile(re.escape(self.settings.key_prefix) + r":\{p(\d+)\}:")
        for raw in self.client.scan_iter(match=pattern, count=SCAN_COUNT):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            m = head.match(key)
            if m and int(m.group(1)) < self.partitions:
                out.setdefault(int(m.group(1)), set()).add(key)
        return out

    def cut(self) -> Cut:
        """Read a cut: one script on one node, one per partition on a cluster; read again
        when a stock key appeared between the key scan and the read."""
        groups = (
            [[p] for p in range(self.partitions)]
            if self.cluster
            else [list(range(self.partitions))]
        )
        stock_keys = self._scan(c.STOCK)
        part_keys = self._scan(c.PART) if self.cluster else {}
        for _ in range(CUT_ATTEMPTS):
            cut = Cut([(0, 0)] * self.partitions, 0, {}, {}, {}, {})
            for group in groups:
                self._read(cut, group, stock_keys, part_keys)
            # A unit created between the scan and its partition's read (a first AdjustStock)
            # would be missing: read again with it (rare: units are created once).
            again = self._scan(c.STOCK)
            fresh = any(not keys <= stock_keys.get(p, set()) for p, keys in again.items())
            for p, keys in again.items():
                stock_keys.setdefault(p, set()).update(keys)
            if self.cluster and not self._placed_new_parts(cut, part_keys):
                fresh = True
            if not fresh:
                return cut
        raise Refused(f"new units kept appearing during {CUT_ATTEMPTS} reads; try again", code=1)

    def _placed_new_parts(self, cut: Cut, part_keys: dict[int, set[str]]) -> bool:
        """Parts that appeared after the key scan and are not in the cut. A HELD part is in
        its parts index from the call that writes it to the call that settles it (which moves
        it out), so the read saw every part HELD at that instant; a part it did not see either
        did not exist yet, or was settled before it (its counters then include it). Which one
        is told by its settle time against the read's (Redis's clock of the same slot): HELD
        now, or settled after the read: created after it, nothing; settled before the read (or
        in its millisecond, having been created before it): its final state. False when it
        was created and settled in the very millisecond of the read: read again."""
        placed = True
        for p, keys in self._scan(c.PART).items():
            new = sorted(keys - part_keys.get(p, set()) - cut.parts.keys())
            part_keys.setdefault(p, set()).update(keys)
            at = cut.times[p]
            for key in new:
                row: list[Any] = self.client.hmget(key, "st", "units", "alloc", "cr", "up")
                st, units, alloc, cr, up = row
                if st is None or st == b"H":
                    continue  # given back since (counted nowhere), or created after the read
                created, updated = int(cr or 0), int(up or cr or 0)
                if updated > at:
                    continue  # HELD at the read had it existed, so it was created after it
                if updated == at and created == at:
                    placed = False  # created and settled in the read's millisecond
                    continue
                holds = tuple(_holds(self.resolver, _s(units), _s(alloc)))
                cut.parts[key] = Part(st.decode(), holds, created, updated)
        return placed

    def _read(
        self,
        cut: Cut,
        group: list[int],
        stock_keys: dict[int, set[str]],
        part_keys: dict[int, set[str]],
    ) -> None:
        stock = sorted(k for p in group for k in stock_keys.get(p, ()))
        parts = sorted(k for p in group for k in part_keys.get(p, ()))
        keys = [self.resolver.events_key(p) for p in group]
        keys += [self.resolver.expiry_key(p) for p in group]
        keys += [self.tag(p) + c.PARTS for p in group]
        args: list[Any] = [len(group), len(stock)]
        for p in group:
            args += [self.tag(p) + c.ORDER + ":", self.tag(p) + c.PART + ":"]
        (secs, micros), heads, hashes, part_rows, held = self._cut(
            keys=keys + stock + parts, args=args
        )
        cut.time_ms = max(cut.time_ms, int(secs) * 1000 + int(micros) // 1000)
        for p in group:
            cut.times[p] = int(secs) * 1000 + int(micros) // 1000
        for p, head in zip(group, heads, strict=True):
            cut.positions[p] = parse_id(head)
        for key, flat in zip(stock, hashes, strict=True):
            cut.units[key] = key.split(":" + c.STOCK + ":", 1)[1]
            for i in range(0, len(flat), 2):
                field, value = flat[i].decode(), int(flat[i + 1])
                kind, _, wh = field.partition(":")
                if kind in ("a", "r"):
                    cut.counters.setdefault((key, wh), [0, 0])[kind == "r"] = value
        for raw_key, st, units, alloc, cr, up in part_rows:
            holds = tuple(_holds(self.resolver, _s(units), _s(alloc)))
            cut.parts[raw_key.decode()] = Part(st.decode(), holds, int(cr or 0), int(up or cr or 0))
            if st == b"H":
                for counter_key, wh, qty in holds:
                    cut.held[(counter_key, wh)] = cut.held.get((counter_key, wh), 0) + qty
        for units, alloc in held:
            for counter_key, wh, qty in _holds(self.resolver, _s(units), _s(alloc)):
                cut.held[(counter_key, wh)] = cut.held.get((counter_key, wh), 0) + qty

    def events(self, p: int, after: StreamId, upto: StreamId) -> Iterator[tuple[StreamId, Any]]:
        """The entries of partition p's stream in (after, upto], in order."""
        key, start = self.resolver.events_key(p), f"({after[0]}-{after[1]}"
        end = f"{upto[0]}-{upto[1]}"
        while True:
            batch: list[Any] = self.client.xrange(key, start, end, count=XRANGE_COUNT) or []
            for entry_id, fields in batch:
                yield parse_id(entry_id), parse_entry(p, entry_id, fields)
            if len(batch) < XRANGE_COUNT:
                return
            last = parse_id(batch[-1][0])
            start = f"({last[0]}-{last[1]}"

    def trimmed_after(self, p: int, position: StreamId) -> bool:
        """Whether the stream dropped (trimmed) an entry after `position`."""
        info = self.client.xinfo_stream(self.resolver.events_key(p))
        deleted = info.get("max-deleted-entry-id") or b"0-0"
        return parse_id(deleted) > position

    def repair(self, key: str, wh: str, field: str, was: int, to: int, unit_id: str) -> bool:
        p = int(key.split("{p", 1)[1].split("}", 1)[0])
        sku, spec, barcode = unit_triple(unit_id)
        data = orjson.dumps(
            {"sku": sku, "spec": spec, "barcode": barcode, "unit": unit_id, "warehouse": wh}
            | {"counter": field, "from": was, "to": to}
        ).decode()
        args: list[str | int] = [f"{field[0]}:{wh}", str(was), str(to), data]
        args += (self.settings.event_stream_maxlen, c.ACTOR_RECONCILE)
        return bool(self._repair(keys=[key, self.resolver.events_key(p)], args=args))


def _s(raw: bytes | None) -> str | None:
    return raw.decode() if raw is not None else None


def _unescape(part: str) -> str:
    return re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), part)


def unit_triple(unit_id: str) -> tuple[str, str, str]:
    """The (sku, spec, barcode) of an escaped unit id."""
    sku, spec, barcode = (_unescape(x) for x in unit_id.split(":"))
    return sku, spec, barcode


# -- the snapshot file --------------------------------------------------------------------------


def write_snapshot(store: Store, cut: Cut, out: TextIO) -> int:
    """Header line, then one line per (unit, warehouse), then (cluster) one per part."""
    header = {
        "snapshot": SNAPSHOT_VERSION,
        "cursor": encode_cursor(cut.positions),
        "partitions": store.partitions,
        "key_prefix": store.settings.key_prefix,
        "cluster": store.cluster,
        "redis_time_ms": cut.time_ms,
    }
    out.write(orjson.dumps(header).decode() + "\n")
    for (key, wh), (a, r) in sorted(cut.counters.items()):
        row = {"unit": cut.units[key], "warehouse": wh, "available": a, "reserved": r}
        out.write(orjson.dumps(row).decode() + "\n")
    for key, part in sorted(cut.parts.items()):
        row2: dict[str, Any] = {"part": key, "state": part.state, "holds": part.holds}
        row2 |= {"created_ms": part.created_ms, "updated_ms": part.updated_ms}
        out.write(orjson.dumps(row2).decode() + "\n")
    return len(cut.counters)


def read_snapshot(store: Store, path: Path) -> Cut:
    """A snapshot file -> the cut it holds; Refused for a file of another deployment."""
    lines = path.read_bytes().splitlines()
    try:
        header = orjson.loads(lines[0])
        if header.get("snapshot") != SNAPSHOT_VERSION:
            raise ValueError("not a stockhold snapshot (version)")
        if header["key_prefix"] != store.settings.key_prefix or header["cluster"] != store.cluster:
            raise ValueError("a snapshot of another key prefix or store kind")
        positions = decode_cursor(header["cursor"], store.partitions)
        cut = Cut(positions, int(header["redis_time_ms"]), {}, {}, {}, {})
        for line in lines[1:]:
            row = orjson.loads(line)
            if "part" in row:
                holds = tuple((k, w, int(q)) for k, w, q in row["holds"])
                part = Part(row["state"], holds, row["created_ms"], row["updated_ms"])
                cut.parts[row["part"]] = part
                continue
            key = store.resolver.unit(*unit_triple(row["unit"])).stock_key
            cut.units[key] = row["unit"]
            cut.counters[(key, row["warehouse"])] = [int(row["available"]), int(row["reserved"])]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise Refused(f"{path}: {err}") from None
    return cut


# -- replay --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Drift:
    unit: str
    warehouse: str
    counter: str  # "available" | "reserved"
    expected: int
    actual: int
    source: str  # "events" | "holds"


_EFFECTS: Final = {
    c.EVENT_RESERVED: (-1, 1),
    c.EVENT_COMMITTED: (0, -1),
    c.EVENT_RELEASED: (1, -1),
    c.EVENT_EXPIRED: (1, -1),
}


Change = tuple[Counter, int, int, int | None, int | None, int | None]
"""One counter's change by an event or a part: (counter, available delta, reserved delta,
available set to, reserved set to, on hand set to: available := it - reserved as rebuilt)."""


def replay(store: Store, old: Cut, new: Cut) -> dict[Counter, list[int]]:
    """The counters `old` plus every change between the two cuts, at `new`'s positions."""
    expected = {k: list(v) for k, v in old.counters.items()}
    steps: list[tuple[int, int, int, list[Change]]] = []
    for p in range(store.partitions):
        if new.positions[p] <= old.positions[p]:
            continue
        for (ms, seq), e in store.events(p, old.positions[p], new.positions[p]):
            changes = _event_changes(store, p, e)
            if changes:
                steps.append((ms, seq, p, changes))
    for key in old.parts.keys() | new.parts.keys():
        was, now = old.parts.get(key), new.parts.get(key)
        if was == now:
            continue
        some = now or was
        holds = some.holds if some else ()
        before = was.effect() if was else (0, 0)
        # a part gone since: undone (nothing), or expired after retention (a sale stays sold)
        after = now.effect() if now else (was.effect() if was and was.state == "C" else (0, 0))
        da, dr = after[0] - before[0], after[1] - before[1]
        at = now.updated_ms if now else new.time_ms
        moved: list[Change] = [((k, wh), da * q, dr * q, None, None, None) for k, wh, q in holds]
        steps.append((at, 2**63, -1, moved))
    steps.sort(key=lambda s: (s[0], s[1], s[2]))
    for _, _, _, changes in steps:
        for counter, da, dr, set_a, set_r, on_hand in changes:
            values = expected.setdefault(counter, [0, 0])
            values[0] = set_a if set_a is not None else values[0] + da
            values[1] = set_r if set_r is not None else values[1] + dr
            if on_hand is not None:
                values[0] = on_hand - values[1]
    return expected


def _event_changes(store: Store, p: int, e: Any) -> list[Change]:
    try:
        data = orjson.loads(e.data_json) if e.data_json else {}
    except orjson.JSONDecodeError:
        return []
    if not isinstance(data, dict):
        return []
    if e.type == c.EVENT_ADJUSTED:
        key = store.resolver.unit(data["sku"], data["spec"], data["barcode"]).stock_key
        return [((key, data["warehouse"]), int(data["delta"]), 0, None, None, None)]
    if e.type == c.EVENT_COUNTED:
        return _counted(store, data)
    if e.type == c.EVENT_REPAIRED:
        key = store.resolver.unit(*unit_triple(data["unit"])).stock_key
        to = int(data["to"])
        avail = data["counter"] == "available"
        set_a, set_r = (to, None) if avail else (None, to)
        return [((key, data["warehouse"]), 0, 0, set_a, set_r, None)]
    effect = _EFFECTS.get(e.type)
    if e.type == c.EVENT_PAYMENT_AFTER_EXPIRY and data.get("recommitted") is True:
        effect = (-1, 0)
    if effect is None or not isinstance(data.get("allocations"), list):
        return []
    out: list[Change] = []
    for sku, spec, barcode, wh, qty in data["allocations"]:
        unit = store.resolver.unit(sku, spec, barcode)
        if store.cluster and unit.partition != p:
            return []  # a cross-slot order: its stock moved in parts (see Cut)
        da, dr = effect[0] * int(qty), effect[1] * int(qty)
        out.append(((unit.stock_key, wh), da, dr, None, None, None))
    return out


def _counted(store: Store, data: dict[str, Any]) -> list[Change]:
    """A cycle count (STOCK_COUNTED) sets on hand: available := on_hand - reserved, with
    reserved as rebuilt at that point (a hold taken or given back keeps on hand, so the result
    does not depend on where a part settled in the same millisecond lands)."""
    key = store.resolver.unit(data["sku"], data["spec"], data["barcode"]).stock_key
    return [((key, data["warehouse"]), 0, 0, None, None, int(data["on_hand"]))]


def drifts(old: Cut | None, new: Cut, expected: dict[Counter, list[int]] | None) -> list[Drift]:
    """Every (unit, warehouse) counter that differs from what the events (or the holds) say."""
    out: list[Drift] = []
    units = dict(old.units if old else {}) | new.units
    keys = set(new.counters) | set(new.held) | set(expected or ())
    for counter in sorted(keys):
        key, wh = counter
        unit = units.get(key, key)
        actual = new.counters.get(counter, [0, 0])
        if expected is not None:
            want = expected.get(counter, [0, 0])
            for i, name in enumerate(("available", "reserved")):
                if want[i] != actual[i]:
                    out.append(Drift(unit, wh, name, want[i], actual[i], "events"))
            if want[1] != actual[1]:
                continue
        held = new.held.get(counter, 0)
        if held != actual[1]:
            out.append(Drift(unit, wh, "reserved", held, actual[1], "holds"))
    return out


# -- the commands --------------------------------------------------------------------------------


def _open(settings: Settings) -> Store:
    if settings.redis_url is None:
        raise Refused("--redis-url is required (the Redis of the running deployment)")
    try:
        return Store(settings, settings.redis_url)
    except ConfigError as err:  # a password file refused: its path and mode
        raise Refused(str(err), 2) from None


def snapshot(settings: Settings, path: Path, out: TextIO = sys.stdout) -> int:
    """`stockhold snapshot --out FILE`: the exit status."""
    store = _open(settings)
    try:
        cut = store.cut()
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            rows = write_snapshot(store, cut, f)
        tmp.replace(path)
    except redis.RedisError as err:
        raise Refused(f"redis at {mask_url(store.url)}: {type(err).__name__}: {err}", 1) from None
    finally:
        store.close()
    print(
        f"stockhold snapshot: {rows} counters, {len(cut.parts)} parts, cursor "
        f"{encode_cursor(cut.positions)} -> {path}",
        file=out,
    )
    return 0


def reconcile(settings: Settings, path: Path | None, repair: bool, out: TextIO = sys.stdout) -> int:
    """`stockhold reconcile [--snapshot FILE] [--repair]`: 0 no drift (or all repaired),
    1 drift, 2 a setting or a snapshot it cannot use."""
    store = _open(settings)
    try:
        old = read_snapshot(store, path) if path else None
        new = store.cut()
        expected = None
        if old is not None:
            for p in range(store.partitions):
                if old.positions[p] > new.positions[p]:
                    raise Refused(f"{path}: ahead of partition {p}'s stream (another store?)")
                if old.positions[p] < new.positions[p] and store.trimmed_after(p, old.positions[p]):
                    raise Refused(
                        f"{path}: partition {p}'s stream was trimmed past the snapshot; "
                        "take a new snapshot"
                    )
            expected = replay(store, old, new)
        found = drifts(old, new, expected)
        checked = "available and reserved" if old else "reserved against the HELD holds"
        print(
            f"stockhold reconcile: {len(new.counters)} counters checked ({checked}); "
            f"{len(found)} drifting",
            file=out,
        )
        for d in found:
            print(orjson.dumps(dataclasses.asdict(d)).decode(), file=out)
        if not found:
            return 0
        if not repair:
            return 1
        return _repair(store, new, found, out, with_events=old is not None)
    except redis.RedisError as err:
        raise Refused(f"redis at {mask_url(store.url)}: {type(err).__name__}: {err}", 1) from None
    finally:
        store.close()


def _repair(store: Store, new: Cut, found: Iterable[Drift], out: TextIO, with_events: bool) -> int:
    keys = {unit: key for key, unit in new.units.items()}
    done = missed = left = 0
    seen: set[tuple[str, str, str]] = set()
    for d in found:
        if with_events and d.source == "holds":
            left += 1  # the counter agrees with the events, the records do not: for a person
            continue
        if (d.unit, d.warehouse, d.counter) in seen:
            continue  # the events' figure wins over the holds' for the same counter
        seen.add((d.unit, d.warehouse, d.counter))
        key = keys.get(d.unit) or store.resolver.unit(*unit_triple(d.unit)).stock_key
        if store.repair(key, d.warehouse, d.counter, d.actual, d.expected, d.unit):
            done += 1
        else:
            missed += 1
    print(
        f"repaired {done} counter(s), one STOCK_REPAIRED event each"
        + (f"; {missed} changed since the read: run reconcile again" if missed else "")
        + (f"; {left} left (HELD records disagree with counter and events)" if left else ""),
        file=out,
    )
    return 1 if missed or left else 0


def run(
    settings: Settings,
    command: str,
    path: Path | None,
    repair: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """Entry point of both commands; a refusal is one line on stderr."""
    started = time.monotonic()
    try:
        if command == "snapshot":
            assert path is not None
            code = snapshot(settings, path, out)
        else:
            code = reconcile(settings, path, repair, out)
    except Refused as err:
        print(f"stockhold {command}: {err}", file=sys.stderr)
        return err.code
    print(f"({time.monotonic() - started:.1f} s)", file=sys.stderr)
    return code
