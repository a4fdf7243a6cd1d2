"""Lock-contention statistics per sales-unit key, in bounded memory whatever the number of keys.

No Redis and no asyncio: the request path calls `ContentionStats.record_request` once per
request, for all its sales-unit keys (with the wait in the batcher queue, the script time,
whether another request for each key was ahead of it, from a `new_tracker()`, and the
outcome); a publisher calls `publication()` (or `snapshot()`) and stores the bytes in Redis;
`GetContentionStats` reads every process's figures back, `merge()`s them and turns the result
into `KeyReport`s and `SkuHint`s. `record(key, ...)` counts one key at a time, the same way.

Design (and why):

* Ranking: weighted space-saving (Metwally, Agrawal, El Abbadi, 2005). Each request adds
  weight `wait_us + 1` to its key (the +1 makes zero-wait requests count). A sketch holds at
  most `capacity` keys; when a new key arrives at a full sketch, the key with the smallest
  weight is evicted and the newcomer inherits that weight as its `error`. A key's `weight`
  (own weight + error) is then an upper bound of its true weight, `weight - error` a lower
  bound, and every key whose true weight exceeds `total / capacity` is always present.
* The figures of a key (requests, waits, histogram, ...) are its own, observed since it was
  last admitted, never the evicted key's: they are exact while `error == 0` and lower bounds
  otherwise (`KeyReport.estimated`). Only the ranking weight carries the inherited error.
* The minimum is found through a heap of `(weight, key)` entries with lazy repair instead of
  one heap update per request: weights only grow, so every heap entry is a lower bound of its
  key's weight, and an entry whose key has grown since is pushed back with the current weight
  when it reaches the top. A record for a tracked key touches no heap at all (O(1)); an
  eviction costs amortised O(log K). Each tracked key has exactly one heap entry.
* `floor` is the weight of the last evicted key (0 while nothing was evicted): an upper bound
  of the true weight of every key the sketch does not hold. Sketches merge (sub-windows into
  a window, processes into a deployment) by the parallel space-saving rule (Cafaro et al.,
  2016): a key's weight and error are summed over the sketches, and a sketch that lacks the
  key adds its floor to both; the result keeps the `capacity` heaviest. The kept sum stays
  <= the merged total, so the `total / capacity` guarantee survives any number of merges, and
  merges of sketches that never evicted are exact (floors are 0), whatever the order.
* Wait histograms are sparse (bucket -> count): most tracked keys of a busy sketch have one or
  two requests, and the bound below is what keeps 13 sketches of 1024 keys in a few MB.
  Buckets are log-scale, `BUCKETS_PER_OCTAVE` per doubling, from about 50 µs to about 60 s,
  *anchored on the flag threshold*: `flag_ms` is a bucket edge, so "p99 > flag_ms" is decided
  exactly (`flagged`), and the p99 estimate is always on the same side of the threshold as
  the flag. A quantile is estimated as the geometric middle of its bucket, capped by the
  exact maximum: relative error <= 2**(1/8) - 1 (9.05 %) between the lowest edge (~58 µs for
  200 ms) and the highest (~61 s); below the lowest edge the absolute error is at most half
  of it (~29 µs); above the highest the estimate is the exact maximum. Quantiles are nearest
  rank (the ceil(q * n)-th smallest wait).
* Times are integer microseconds, so sums are exact and merging in any order gives the same
  figures as recording everything in one process.
* Windows: since-start is one sketch; the sliding window is a ring of `window_s / slot_s`
  sub-window sketches aligned on multiples of `slot_s` of the injected clock, merged on query.
  Each record goes into both the since-start sketch and the current sub-window: twice a small
  cost, but since-start stays a true single-stream sketch and no merge ever runs on the
  request path. The window holds the current (partial) sub-window and the complete ones
  before it: data is kept at least `window_s - slot_s` and at most `window_s`.
* The two live sketches are compiled (native/_contention_c.pyx, `NATIVE`): per-key counters
  and a dense histogram in C arrays, a key -> slot dict, a C heap with the same lazy repair,
  and one C call records a whole request into both. They give the pure `Sketch`'s answers
  for every stream (same keys, figures, evictions, floor, total; tests/test_contention_impls.py)
  and `Sketch` stays the reference and the fallback (`STOCKHOLD_NO_EXTENSIONS=1`, or not
  built). The contended tracker is compiled the same way (`new_tracker`).
* A closed sub-window never changes again, so it is kept frozen as its JSON (about 70 bytes a
  key instead of about 650 for a live entry): that is what keeps 13 sketches of 1024 keys
  near 2 MB, and `snapshot()` splices the frozen bytes in as they are. Freezing costs one
  encode of the closed sketch (~0.5 ms for 1024 keys) once per `slot_s`, in the record that
  crosses the boundary, plus one of its heaviest `limit` keys, the form the last snapshot
  asked for: no snapshot decodes and re-encodes it again. A window query decodes the frozen
  sub-windows again.
* Publishing: a closed sub-window is stored once. `publication()` gives a head (since start
  and the live sub-window, format version 2: sub-windows carry their index) and one piece per
  closed sub-window; the store writes the head each time and a piece once
  (contention_store.py); a reader joins them with `assemble()`, and `merge()` takes each
  sub-window once, so a read between two writes never counts one twice.
* Snapshots carry absolute wall-clock sub-window starts (the monotonic clock offset by the
  wall clock at snapshot time), so the reader picks, across processes, the sub-windows inside
  its own window, and a dead process's data ages out by itself. `merge()` returns `Merged`
  (since_start, window, skipped): snapshots of another format version or histogram grid
  (another `flag_ms`), or unreadable ones, are skipped and counted rather than raised, so a
  rolling deploy or one corrupt entry never breaks the query.

Memory: two live sketches (since start, current sub-window) of at most `capacity` keys at
~750 bytes a key compiled (counters and all 82 histogram buckets), ~650 pure, plus
`window_s / slot_s - 1` frozen ones at ~70 bytes a key; each distinct wait bucket a key has
adds ~30-60 bytes live in the pure sketch, ~8 frozen (at most 82 buckets). Measured with the
defaults and 1,000,000 distinct keys: 2.1 MB held, 2.6 MB peak pure, 1.9 MB and 2.7 MB
compiled (tests/test_contention.py).

Cost (bench/contention_cost.py: 10,000 uniform units and a hot one, 2,000 requests/s): about
3 µs per request with the compiled tracker and sketches, 14-17 µs for the pure ones (and for
the per-unit `record()` this replaced), mostly cache misses on a big sketch; a publish (256
keys a sketch) about 2 ms and 43 KB, against 45-80 ms and 190 KB when every snapshot carried
and re-encoded every sub-window. Reading is slower and belongs off the hot path: a local
window query ~40 ms, merging 8 full snapshots (~1 MB each) ~0.5 s; `snapshot(limit=...)`
trades the guarantee (total / limit) for smaller snapshots.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from heapq import heapify, heappush, heapreplace
from typing import Any, Final, Literal, NamedTuple, Protocol

import orjson

log = logging.getLogger(__name__)

Outcome = Literal["ok", "insufficient", "timeout", "error"]


class UnitLike(Protocol):
    """What `record_request` reads of a sales unit (stockhold.resolver.Unit has both)."""

    @property
    def unit_id(self) -> str: ...

    @property
    def sku(self) -> str: ...


DEFAULT_CAPACITY: Final = 1024
DEFAULT_WINDOW_SECONDS: Final = 60.0
DEFAULT_SLOT_SECONDS: Final = 5.0
DEFAULT_FLAG_MS: Final = 200.0

# The wait histogram grid: BUCKETS_PER_OCTAVE log-scale buckets per doubling, edges from
# about LOWEST_EDGE_US to about HIGHEST_EDGE_US, one edge exactly on the flag threshold.
BUCKETS_PER_OCTAVE: Final = 4
LOWEST_EDGE_US: Final = 50
HIGHEST_EDGE_US: Final = 60_000_000
# Worst relative error of a quantile estimate between the lowest and the highest edge.
QUANTILE_RELATIVE_ERROR: Final = 2 ** (1 / (2 * BUCKETS_PER_OCTAVE)) - 1

SNAPSHOT_VERSION: Final = 1
# A snapshot whose sub-windows carry their index, [start, sketch, index], so that the closed
# ones can be stored apart and joined again (`Publication`, `assemble`): each sub-window once.
SNAPSHOT_VERSION_SPLIT: Final = 2
_SNAPSHOT_VERSIONS: Final = (SNAPSHOT_VERSION, SNAPSHOT_VERSION_SPLIT)
# Longer waits or script times are recorded as this (a clock gone wrong, not a real wait).
_MAX_SECONDS: Final = 1e6
_MAX_US: Final = 1_000_000_000_000


class WaitGrid:
    """Log-scale wait buckets (µs), anchored so that the flag threshold is a bucket edge.

    Bucket 0 is [0, edges[0]], bucket i is (edges[i-1], edges[i]], and bucket len(edges)
    holds everything above the last edge.
    """

    __slots__ = ("_middles", "edges", "flag_bucket", "flag_us")

    def __init__(self, flag_us: int) -> None:
        if not LOWEST_EDGE_US <= flag_us <= HIGHEST_EDGE_US:
            raise ValueError(f"flag threshold must be within {LOWEST_EDGE_US} µs..60 s")
        below = math.floor(BUCKETS_PER_OCTAVE * math.log2(flag_us / LOWEST_EDGE_US))
        above = math.ceil(BUCKETS_PER_OCTAVE * math.log2(HIGHEST_EDGE_US / flag_us))
        self.flag_us = flag_us
        # edges[flag_bucket] is exactly flag_us: a wait is above the threshold iff its
        # bucket is above flag_bucket.
        self.flag_bucket = below
        self.edges: tuple[float, ...] = tuple(
            flag_us * 2 ** (j / BUCKETS_PER_OCTAVE) for j in range(-below, above + 1)
        )
        edges = self.edges
        self._middles: tuple[float, ...] = (
            edges[0] / 2,
            *(math.sqrt(lo * hi) for lo, hi in itertools.pairwise(edges)),
            math.inf,  # above the last edge: the exact maximum
        )

    @property
    def signature(self) -> list[int]:
        """What two processes must share for their histograms to merge."""
        return [self.flag_us, BUCKETS_PER_OCTAVE, LOWEST_EDGE_US, HIGHEST_EDGE_US]

    @property
    def buckets(self) -> int:
        """Number of buckets."""
        return len(self.edges) + 1

    def bucket(self, wait_us: int) -> int:
        """The bucket of a wait in µs."""
        return bisect_left(self.edges, wait_us)

    def quantile_buckets(self, hist: dict[int, int], n: int, percents: Sequence[int]) -> list[int]:
        """Bucket of the nearest-rank quantile for each percent (ascending), given n samples."""
        ranks = [(n * p + 99) // 100 for p in percents]  # ceil(n * p / 100), in integers
        found: list[int] = []
        seen = 0
        for b in sorted(hist):
            seen += hist[b]
            while len(found) < len(ranks) and seen >= ranks[len(found)]:
                found.append(b)
        return found + [0] * (len(ranks) - len(found))  # only when n is 0

    def estimate_us(self, bucket: int, max_us: int) -> float:
        """A quantile's estimate: the geometric middle of its bucket, capped by the maximum."""
        return min(self._middles[bucket], float(max_us))


@dataclass(slots=True)
class KeyStats:
    """The figures of one tracked key; `error` is the weight inherited on admission."""

    key: str
    sku: str
    requests: int = 0
    contended: int = 0
    timeouts: int = 0
    insufficient: int = 0
    errors: int = 0
    wait_us: int = 0
    wait_max_us: int = 0
    script_us: int = 0
    error: int = 0
    hist: dict[int, int] = field(default_factory=dict)

    @property
    def weight(self) -> int:
        """Space-saving count: an upper bound of the key's true weight (wait µs + requests)."""
        return self.wait_us + self.requests + self.error

    def merge(self, other: KeyStats) -> None:
        """Add another sketch's figures for the same key into these."""
        self.requests += other.requests
        self.contended += other.contended
        self.timeouts += other.timeouts
        self.insufficient += other.insufficient
        self.errors += other.errors
        self.wait_us += other.wait_us
        self.wait_max_us = max(self.wait_max_us, other.wait_max_us)
        self.script_us += other.script_us
        self.error += other.error
        hist = self.hist
        for b, count in other.hist.items():
            hist[b] = hist.get(b, 0) + count

    def copy(self) -> KeyStats:
        """An independent copy."""
        dup = KeyStats(self.key, self.sku)
        dup.merge(self)
        return dup

    def __add__(self, other: KeyStats) -> KeyStats:
        dup = self.copy()
        dup.merge(other)
        return dup

    def to_row(self) -> list[Any]:
        """Compact JSON form: fields in order, the histogram as flat [bucket, count, ...]."""
        return [
            self.key,
            self.sku,
            self.requests,
            self.contended,
            self.timeouts,
            self.insufficient,
            self.errors,
            self.wait_us,
            self.wait_max_us,
            self.script_us,
            self.error,
            [x for item in self.hist.items() for x in item],
        ]

    @classmethod
    def from_row(cls, row: Sequence[Any], buckets: int) -> KeyStats:
        """Inverse of to_row (histogram of `buckets` buckets); ValueError or TypeError if bad."""
        key, sku, *counts, flat = row
        if type(key) is not str or type(sku) is not str or len(counts) != 9:
            raise ValueError("malformed key row")
        for x in counts:  # orjson gives int, float, bool, str, ...: only int >= 0 will do
            if type(x) is not int or x < 0:
                raise ValueError("malformed key row")
        stats = cls(key, sku, *counts)
        hist = stats.hist
        pairs = iter(flat)
        for b, count in zip(pairs, pairs, strict=True):
            if type(b) is not int or type(count) is not int or not 0 <= b < buckets or count < 0:
                raise ValueError("malformed histogram")
            hist[b] = hist.get(b, 0) + count
        return stats


def _rank(stats: KeyStats) -> tuple[int, str]:
    return stats.wait_us + stats.requests + stats.error, stats.key


class Sketch:
    """Weighted space-saving summary of at most `capacity` keys, ranked by total wait."""

    __slots__ = ("_heap", "capacity", "entries", "floor", "total")

    def __init__(
        self,
        capacity: int,
        entries: Iterable[KeyStats] = (),
        floor: int = 0,
        total: int = 0,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.entries: dict[str, KeyStats] = {s.key: s for s in entries}
        # Upper bound of the true weight of any key not held (0: nothing was ever dropped).
        self.floor = floor
        # Sum of every weight recorded (tracked or not): wait µs + requests.
        self.total = total
        # Min-heap of (weight when pushed, key), one per tracked key; built on first need
        # (merged and decoded sketches are mostly read, never added to).
        self._heap: list[tuple[int, str]] | None = None if self.entries else []

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def get(self, key: str) -> KeyStats | None:
        """The figures of a key, None when it is not tracked."""
        return self.entries.get(key)

    def add(
        self,
        key: str,
        sku: str,
        wait_us: int,
        script_us: int,
        bucket: int,
        contended: bool,
        outcome: Outcome,
    ) -> None:
        """Count one request of `key` (the hot path: keep it lean)."""
        weight = wait_us + 1
        s = self.entries.get(key)
        if s is None:
            s = self._admit(key, sku, weight)
        s.requests += 1
        s.wait_us += wait_us
        if wait_us > s.wait_max_us:
            s.wait_max_us = wait_us
        s.script_us += script_us
        hist = s.hist
        hist[bucket] = hist.get(bucket, 0) + 1
        if contended:
            s.contended += 1
        if outcome != "ok":
            if outcome == "timeout":
                s.timeouts += 1
            elif outcome == "insufficient":
                s.insufficient += 1
            else:
                s.errors += 1
        self.total += weight

    def add_units(
        self,
        units: Sequence[UnitLike],
        contended: Sequence[bool],
        wait_us: int,
        script_us: int,
        bucket: int,
        outcome: Outcome,
    ) -> None:
        """Count one request for each of its units; `contended[i]` is units[i]'s flag."""
        if len(units) != len(contended):
            raise ValueError("one contended flag per unit")
        add = self.add
        for u, busy in zip(units, contended, strict=True):
            add(u.unit_id, u.sku, wait_us, script_us, bucket, busy, outcome)

    def _admit(self, key: str, sku: str, weight: int) -> KeyStats:
        """Track a new key whose first request weighs `weight`, evicting the lightest if full."""
        entries = self.entries
        heap = self._heap
        if heap is None:
            heap = self._heap = [(s.weight, s.key) for s in entries.values()]
            heapify(heap)
        if len(entries) < self.capacity:
            s = KeyStats(key, sku)
            heappush(heap, (weight, key))
        else:
            while True:  # repair entries of keys that grew since they were pushed
                low, victim = heap[0]
                v = entries[victim]
                current = v.wait_us + v.requests + v.error
                if current == low:
                    break
                heapreplace(heap, (current, victim))
            del entries[victim]
            self.floor = low
            s = KeyStats(key, sku)
            s.error = low
            heapreplace(heap, (low + weight, key))
        entries[key] = s
        return s

    def top(self, n: int | None = None) -> list[KeyStats]:
        """The `n` (default all) heaviest keys, heaviest first (ties: key descending)."""
        ordered = sorted(self.entries.values(), key=_rank, reverse=True)
        return ordered if n is None else ordered[: max(n, 0)]

    @classmethod
    def merged(cls, sketches: Iterable[Sketch], capacity: int) -> Sketch:
        """Merge sketches (parallel space-saving), keeping the `capacity` heaviest keys.

        The inputs are left unchanged. A sketch lacking a key adds its floor to that key's
        weight (as error): the key may have weighed that much there.
        """
        return _combine(list(sketches), (), capacity)

    def to_json(self, limit: int | None = None) -> dict[str, Any]:
        """Compact JSON form; with `limit`, only the heaviest `limit` keys (floor raised)."""
        floor = self.floor
        rows: Iterable[KeyStats] = self.entries.values()
        if limit is not None and limit < len(self.entries):
            ordered = self.top()
            keep = max(limit, 0)
            rows = ordered[:keep]
            floor = max(floor, ordered[keep].weight)
        return {"floor": floor, "total": self.total, "keys": [s.to_row() for s in rows]}

    @classmethod
    def from_json(cls, data: dict[str, Any], capacity: int, buckets: int) -> Sketch:
        """Inverse of to_json; ValueError, TypeError or KeyError when malformed."""
        entries = [KeyStats.from_row(row, buckets) for row in data["keys"]]
        floor, total = data["floor"], data["total"]
        if type(floor) is not int or type(total) is not int:
            raise ValueError("malformed sketch")
        return cls(max(capacity, len(entries)), entries, floor, total)


def _to_us(seconds: float) -> int:
    """Integer µs (exact sums); negative or NaN reads as 0, absurd values are capped."""
    if seconds > 0.0:
        return int(seconds * 1e6 + 0.5) if seconds < _MAX_SECONDS else _MAX_US
    return 0


class LiveSketch(Protocol):
    """What `ContentionStats` records into: `Sketch` or the compiled twin of its recording
    half (stockhold._contention_c.LiveSketch), which gives the same answers."""

    @property
    def capacity(self) -> int: ...

    @property
    def floor(self) -> int: ...

    @property
    def total(self) -> int: ...

    def __len__(self) -> int: ...

    def add(
        self,
        key: str,
        sku: str,
        wait_us: int,
        script_us: int,
        bucket: int,
        contended: bool,
        outcome: Outcome,
    ) -> None: ...

    def add_units(
        self,
        units: Sequence[UnitLike],
        contended: Sequence[bool],
        wait_us: int,
        script_us: int,
        bucket: int,
        outcome: Outcome,
    ) -> None: ...

    def to_json(self, limit: int | None = None) -> dict[str, Any]: ...


# The compiled live sketch, unless STOCKHOLD_NO_EXTENSIONS is set (non-empty) or it is not
# built; NATIVE says which one `new_live_sketch` makes by default.
NO_EXTENSIONS: Final = bool(os.environ.get("STOCKHOLD_NO_EXTENSIONS"))
try:
    from stockhold import _contention_c
except ImportError:  # not built (no compiler or no Cython at install time)
    _contention_c = None  # type: ignore[assignment]
_NativeLiveSketch: Callable[[int, int], LiveSketch] | None = (
    None if NO_EXTENSIONS or _contention_c is None else _contention_c.LiveSketch
)
NATIVE: Final = _NativeLiveSketch is not None


class _RecordPair(Protocol):
    def __call__(
        self,
        since: Any,
        current: Any,
        units: Sequence[UnitLike],
        contended: Sequence[bool],
        waited_s: float,
        script_s: float,
        outcome: Outcome,
        edges: tuple[float, ...],
    ) -> None: ...


def _record_pair_py(
    since: LiveSketch,
    current: LiveSketch,
    units: Sequence[UnitLike],
    contended: Sequence[bool],
    waited_s: float,
    script_s: float,
    outcome: Outcome,
    edges: tuple[float, ...],
) -> None:
    """One request into both sketches: waits to µs, the wait's bucket, then each sketch."""
    if len(units) != len(contended):
        raise ValueError("one contended flag per unit")
    wait_us = _to_us(waited_s)
    script_us = _to_us(script_s)
    bucket = bisect_left(edges, wait_us)
    add_since, add_current = since.add, current.add
    for u, busy in zip(units, contended, strict=True):
        key, sku = u.unit_id, u.sku
        add_since(key, sku, wait_us, script_us, bucket, busy, outcome)
        add_current(key, sku, wait_us, script_us, bucket, busy, outcome)


def _record_pair_for(native: bool) -> _RecordPair:
    """The compiled `_record_pair_py` (whole request in C) for compiled sketches."""
    if native and _contention_c is not None:
        return _contention_c.record_pair
    return _record_pair_py


def new_live_sketch(capacity: int, buckets: int, native: bool | None = None) -> LiveSketch:
    """An empty sketch to record into: compiled when `native` (default: NATIVE), else pure."""
    if native is None:
        native = NATIVE
    if native:
        if _NativeLiveSketch is None:
            raise RuntimeError("stockhold._contention_c is not available")
        return _NativeLiveSketch(capacity, buckets)
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    return Sketch(capacity)


def _as_sketch(live: LiveSketch, buckets: int) -> Sketch:
    """A live sketch as a (pure) Sketch: itself, or a copy of the compiled one's figures."""
    if isinstance(live, Sketch):
        return live
    return Sketch.from_json(live.to_json(), live.capacity, buckets)


def _combine(borrowed: Sequence[Sketch], owned: Sequence[Sketch], capacity: int) -> Sketch:
    """Sketch.merged; the entries of `owned` sketches (decoded, throwaway) are reused as-is."""
    floors = sum(sk.floor for sk in (*borrowed, *owned))
    combined: dict[str, KeyStats] = {}
    for sketches, copy in ((borrowed, True), (owned, False)):
        for sk in sketches:
            for key, stats in sk.entries.items():
                acc = combined.get(key)
                if acc is None:
                    combined[key] = acc = stats.copy() if copy else stats
                    acc.error += floors - sk.floor
                else:
                    acc.merge(stats)
                    acc.error -= sk.floor
    floor = floors
    kept: Iterable[KeyStats] = combined.values()
    if len(combined) > capacity:
        ordered = sorted(combined.values(), key=_rank, reverse=True)
        kept = ordered[:capacity]
        floor = max(floor, ordered[capacity].weight)
    total = sum(sk.total for sk in (*borrowed, *owned))
    return Sketch(capacity, kept, floor, total)


@dataclass(frozen=True, slots=True)
class KeyReport:
    """One key's contention figures, as GetContentionStats reports them (times in ms)."""

    key: str
    sku: str
    requests: int
    contended: int
    timeouts: int
    insufficient: int
    errors: int
    wait_total_ms: float
    wait_mean_ms: float
    wait_p50_ms: float
    wait_p99_ms: float
    wait_max_ms: float
    script_mean_ms: float
    # Ranking weight (total wait + 1 µs per request) that may belong to keys evicted before
    # this one was admitted; 0 when every figure is exact.
    error_ms: float
    # Wait p99 above the flag threshold (decided exactly, see WaitGrid).
    flagged: bool
    # The key was admitted in place of an evicted one: figures are lower bounds.
    estimated: bool

    @classmethod
    def from_stats(cls, s: KeyStats, grid: WaitGrid) -> KeyReport:
        """Report one key's figures, quantiles estimated on `grid`."""
        n = s.requests
        p50, p99 = grid.quantile_buckets(s.hist, n, (50, 99))
        per = 1 / (1000 * n) if n else 0.0
        return cls(
            key=s.key,
            sku=s.sku,
            requests=n,
            contended=s.contended,
            timeouts=s.timeouts,
            insufficient=s.insufficient,
            errors=s.errors,
            wait_total_ms=s.wait_us / 1000,
            wait_mean_ms=s.wait_us * per,
            wait_p50_ms=grid.estimate_us(p50, s.wait_max_us) / 1000 if n else 0.0,
            wait_p99_ms=grid.estimate_us(p99, s.wait_max_us) / 1000 if n else 0.0,
            wait_max_ms=s.wait_max_us / 1000,
            script_mean_ms=s.script_us * per,
            error_ms=s.error / 1000,
            flagged=n > 0 and p99 > grid.flag_bucket,
            estimated=s.error > 0,
        )


@dataclass(frozen=True, slots=True)
class SkuHint:
    """A SKU several of whose sales units (specs/barcodes) are hot at once."""

    sku: str
    # Its hot keys, heaviest first.
    keys: tuple[str, ...]
    wait_total_ms: float
    # How many of those keys are flagged.
    flagged: int


def sku_hints(reports: Sequence[KeyReport], min_hot_keys: int = 2) -> list[SkuHint]:
    """SKUs with at least `min_hot_keys` hot keys among `reports` (heaviest first).

    A key is hot when it is flagged or in the top quarter of `reports` (which must be sorted
    by wait, heaviest first, as `top()` returns them). Heaviest SKU first.
    """
    quarter = math.ceil(len(reports) / 4)
    hot: dict[str, list[KeyReport]] = {}
    for i, r in enumerate(reports):
        if r.sku and (r.flagged or i < quarter):
            hot.setdefault(r.sku, []).append(r)
    hints = [
        SkuHint(
            sku=sku,
            keys=tuple(r.key for r in rs),
            wait_total_ms=sum(r.wait_total_ms for r in rs),
            flagged=sum(r.flagged for r in rs),
        )
        for sku, rs in hot.items()
        if len(rs) >= max(min_hot_keys, 1)
    ]
    hints.sort(key=lambda h: (-h.wait_total_ms, h.sku))
    return hints


class Merged(NamedTuple):
    """Snapshots of many processes combined; `skipped` counts unreadable or foreign ones."""

    since_start: Sketch
    window: Sketch
    skipped: int


class Publication(NamedTuple):
    """What a process publishes (`ContentionStats.publication`), in two parts.

    `head` is a version-2 snapshot: since start and the live sub-window. `closed` maps the
    index of each closed sub-window in the window to its piece, `[start, sketch, index]`
    (JSON). A closed sub-window never changes, so its piece is stored once, not with every
    head; `assemble(head, pieces)` rebuilds a whole snapshot for `merge()`.
    """

    head: bytes
    closed: dict[int, bytes]


class _Closed:
    """A closed sub-window: frozen into its JSON form, plus its last limited form."""

    __slots__ = ("frozen", "index", "keys", "limit", "limited")

    def __init__(self, index: int, keys: int, frozen: bytes) -> None:
        self.index = index
        self.keys = keys
        self.frozen = frozen
        self.limit: int | None = None
        self.limited = frozen

    def sketch_json(self, limit: int | None, capacity: int, buckets: int) -> bytes:
        """Its sketch's JSON, only the heaviest `limit` keys if given (cached: it never
        changes, so every snapshot after the first splices the same bytes)."""
        if limit is None or limit >= self.keys:
            return self.frozen
        if limit != self.limit:
            sketch = Sketch.from_json(orjson.loads(self.frozen), capacity, buckets)
            self.limited = bytes(memoryview(orjson.dumps(sketch.to_json(limit))))
            self.limit = limit
        return self.limited


class ContentionStats:
    """Per-key contention figures of one process: since start and over a sliding window.

    `native` picks the live sketches' implementation: the compiled one (default when it is
    built, see NATIVE) or the pure `Sketch`; both give the same figures.
    """

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        window_s: float = DEFAULT_WINDOW_SECONDS,
        slot_s: float = DEFAULT_SLOT_SECONDS,
        flag_ms: float = DEFAULT_FLAG_MS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        native: bool | None = None,
    ) -> None:
        slots = round(window_s / slot_s) if slot_s > 0 else 0
        if slots < 1 or not math.isclose(slots * slot_s, window_s):
            raise ValueError("window_s must be a positive whole multiple of slot_s")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.window_s = window_s
        self.slot_s = slot_s
        self.grid = WaitGrid(round(flag_ms * 1000))
        self.native = NATIVE if native is None else native
        self._buckets = self.grid.buckets
        self._edges = self.grid.edges
        self._slots = slots
        self._clock = clock
        self._wall_clock = wall_clock
        self._since_start = self._new_live()
        self._record_pair = _record_pair_for(self.native)
        # The sliding window: the current sub-window, live, and the closed ones before it,
        # frozen into their JSON form (oldest first) since they never change again.
        self._closed: deque[_Closed] = deque()
        self._current = self._new_live()
        # The `limit` of the last snapshot: a sub-window closing encodes that form of itself
        # at once, from the live sketch, so that no snapshot has to decode it again.
        self._limit_hint: int | None = None
        self._index = math.floor(clock() / slot_s)
        self._slot_end = (self._index + 1) * slot_s

    def _new_live(self) -> LiveSketch:
        return new_live_sketch(self.capacity, self._buckets, self.native)

    @property
    def since_start(self) -> Sketch:
        """The since-start sketch (a copy of its figures when the live one is compiled)."""
        return _as_sketch(self._since_start, self._buckets)

    def _advance(self, now: float) -> None:
        """Close the current sub-window and open the one holding `now`."""
        index = math.floor(now / self.slot_s)
        current = self._current
        if len(current):
            # orjson's result keeps its over-allocated buffer (~3x); keep a tight copy.
            frozen = bytes(memoryview(orjson.dumps(current.to_json())))
            closed = _Closed(self._index, len(current), frozen)
            hint = self._limit_hint
            if hint is not None and hint < len(current):
                closed.limit = hint
                closed.limited = bytes(memoryview(orjson.dumps(current.to_json(hint))))
            self._closed.append(closed)
        while self._closed and self._closed[0].index <= index - self._slots:
            self._closed.popleft()
        self._current = self._new_live()
        self._index = index
        self._slot_end = (index + 1) * self.slot_s

    def record(
        self,
        key: str,
        sku: str,
        waited_s: float,
        script_s: float,
        contended: bool,
        outcome: Outcome,
    ) -> None:
        """Count one request for `key`: its batcher-queue wait, script time and outcome."""
        now = self._clock()
        if now >= self._slot_end:
            self._advance(now)
        wait_us = _to_us(waited_s)
        script_us = _to_us(script_s)
        bucket = bisect_left(self._edges, wait_us)
        self._since_start.add(key, sku, wait_us, script_us, bucket, contended, outcome)
        self._current.add(key, sku, wait_us, script_us, bucket, contended, outcome)

    def record_request(
        self,
        units: Sequence[UnitLike],
        contended: Sequence[bool],
        waited_s: float,
        script_s: float,
        outcome: Outcome,
    ) -> None:
        """Count one request for each of its units, as `record` would unit by unit.

        The request path's call (Engine.reserve): one clock read, one conversion and one
        call per sketch for the whole request. `contended[i]` says whether another request
        for units[i] was under way when this one arrived (`ContentionTracker.begin`).
        """
        now = self._clock()
        if now >= self._slot_end:
            self._advance(now)
        self._record_pair(
            self._since_start,
            self._current,
            units,
            contended,
            waited_s,
            script_s,
            outcome,
            self._edges,
        )

    def tracked(self) -> list[int]:
        """Keys held per sketch: since start, then each sub-window kept, oldest first."""
        closed = [slot.keys for slot in self._closed]
        return [len(self._since_start), *closed, len(self._current)]

    def _window_slots(self, now: float, span: float) -> list[tuple[int, LiveSketch | _Closed]]:
        """Sub-windows (index, live sketch or closed one) that start within `span` of now."""
        start = now - span
        slots: list[tuple[int, LiveSketch | _Closed]] = [
            (slot.index, slot) for slot in self._closed if slot.index * self.slot_s > start
        ]
        if self._index * self.slot_s > start and len(self._current):
            slots.append((self._index, self._current))
        return slots

    def _thaw(self, slot: LiveSketch | _Closed) -> Sketch:
        if isinstance(slot, _Closed):
            return Sketch.from_json(orjson.loads(slot.frozen), self.capacity, self._buckets)
        return _as_sketch(slot, self._buckets)

    def window_sketch(self, window_s: float | None = None) -> Sketch:
        """The sliding window (default `window_s`, at most it) merged into one new sketch."""
        span = self.window_s if window_s is None else min(window_s, self.window_s)
        slots = [slot for _, slot in self._window_slots(self._clock(), span)]
        # A pure live sketch is read where it is; anything decoded is a throwaway copy.
        live = [slot for slot in slots if isinstance(slot, Sketch)]
        thawed = [self._thaw(slot) for slot in slots if not isinstance(slot, Sketch)]
        return _combine(live, thawed, self.capacity)

    def top(self, n: int, window: bool = True) -> list[KeyReport]:
        """The `n` keys with the most wait, in the sliding window or since start."""
        return self.report(self.window_sketch() if window else self.since_start, n)

    def report(self, sketch: Sketch, n: int | None = None) -> list[KeyReport]:
        """Reports of a sketch's `n` heaviest keys (e.g. of `merge()`'s result)."""
        return [KeyReport.from_stats(s, self.grid) for s in sketch.top(n)]

    def _encode(
        self, version: int, limit: int | None, closed: bool
    ) -> tuple[bytes, dict[int, bytes]]:
        """A snapshot of `version`, with the closed sub-windows inline when `closed`, else
        apart (index -> piece); `limit` keeps the heaviest keys of each sketch."""
        self._limit_hint = limit
        now = self._clock()
        wall = self._wall_clock()
        offset = wall - now
        inline: list[bytes] = []
        apart: dict[int, bytes] = {}
        for i, slot in self._window_slots(now, self.window_s):
            start = orjson.dumps(i * self.slot_s + offset)
            if isinstance(slot, _Closed):
                # Closed sub-windows are spliced in as they are, never decoded again.
                body = slot.sketch_json(limit, self.capacity, self._buckets)
            else:
                body = orjson.dumps(slot.to_json(limit))
            if version == 1:
                inline.append(b"[%s,%s]" % (start, body))
            elif closed or not isinstance(slot, _Closed):
                inline.append(b"[%s,%s,%d]" % (start, body, i))
            else:
                apart[i] = b"[%s,%s,%d]" % (start, body, i)
        head = {
            "v": version,
            "grid": self.grid.signature,
            "at": wall,
            "slot_s": self.slot_s,
            "start": self._since_start.to_json(limit),
        }
        return b'%s,"slots":[%s]}' % (orjson.dumps(head)[:-1], b",".join(inline)), apart

    def snapshot(self, limit: int | None = None) -> bytes:
        """This process's sketches as compact JSON, for `merge()` in any process.

        Sub-windows carry absolute wall-clock starts. `limit` keeps only the heaviest keys
        of each sketch: smaller snapshots, weaker guarantee (total / limit).
        """
        return self._encode(1, limit, closed=True)[0]

    def publication(self, limit: int | None = None) -> Publication:
        """This process's figures as `snapshot()` has them, the closed sub-windows apart.

        A publisher stores each closed piece once and the head every time; a reader gives
        `assemble(head, pieces)` to `merge()`. The pieces it may hold that left the window,
        or a piece of the sub-window the head still has live, are harmless: `merge()` takes
        only sub-windows inside its window, and each sub-window once (the head's first).
        """
        head, closed = self._encode(SNAPSHOT_VERSION_SPLIT, limit, closed=False)
        return Publication(head, closed)

    def merge(
        self,
        snapshots: Iterable[bytes],
        now_wall: float | None = None,
        window_s: float | None = None,
    ) -> Merged:
        """Combine snapshots of many processes (this one's included only if passed).

        The window takes every sub-window that starts within the last `window_s` (default
        the configured window) before `now_wall` (default: the wall clock now). Each result
        is re-bounded to `capacity` keys. Unreadable snapshots, and those of another format
        version or histogram grid, are skipped and counted. Snapshots are `snapshot()`s or
        `assemble()`d publications (either version).
        """
        now_wall = self._wall_clock() if now_wall is None else now_wall
        start = now_wall - (self.window_s if window_s is None else window_s)
        since: list[Sketch] = []
        window: list[Sketch] = []
        skipped = 0
        buckets = self.grid.buckets
        for blob in snapshots:
            try:
                data = orjson.loads(blob)
                version = data["v"]
                if version not in _SNAPSHOT_VERSIONS or data["grid"] != self.grid.signature:
                    raise ValueError("another snapshot version or histogram grid")
                one = Sketch.from_json(data["start"], self.capacity, buckets)
                slots: list[Sketch] = []
                seen: set[int] = set()
                for entry in data["slots"]:
                    if version == SNAPSHOT_VERSION:
                        slot_start, sk = entry
                    else:
                        slot_start, sk, index = entry
                        if type(index) is not int:
                            raise ValueError("malformed sub-window index")
                        if index in seen:  # stored apart and still in the head: once
                            continue
                        seen.add(index)
                    if float(slot_start) > start:
                        slots.append(Sketch.from_json(sk, self.capacity, buckets))
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                log.warning("contention snapshot skipped: %s", exc)
                skipped += 1
                continue
            since.append(one)
            window.extend(slots)
        return Merged(
            _combine((), since, self.capacity), _combine((), window, self.capacity), skipped
        )


def assemble(head: bytes, pieces: Iterable[bytes]) -> bytes:
    """A whole snapshot for `merge()` from a `Publication`'s head and closed pieces.

    Bytes are joined, nothing is decoded: a head or piece that is not what `publication()`
    wrote makes the result unreadable, and `merge()` skips and counts it.
    """
    extra = b",".join(pieces)
    if not extra or not head.endswith(b"]}"):
        return head
    body = head[:-2]
    return b"%s%s%s]}" % (body, b"" if body.endswith(b"[") else b",", extra)


class Tracker(Protocol):
    """What the request path uses to flag contended requests (`new_tracker`)."""

    def __len__(self) -> int: ...

    def begin(self, key: str) -> bool: ...

    def end(self, key: str) -> None: ...

    def begin_units(self, units: Sequence[UnitLike]) -> list[bool]: ...

    def end_units(self, units: Sequence[UnitLike]) -> None: ...


def new_tracker(native: bool | None = None) -> Tracker:
    """A tracker for the request path: compiled when `native` (default: NATIVE), else pure."""
    if native is None:
        native = NATIVE
    if native:
        if _contention_c is None:
            raise RuntimeError("stockhold._contention_c is not available")
        return _contention_c.ContentionTracker()
    return ContentionTracker()


class ContentionTracker:
    """Which keys have a request queued or in flight in this process, for `contended`.

    A request is contended when, as it arrives, another request for the same key is already
    queued or in flight. Only keys with requests under way are held. The reference for the
    compiled twin that `new_tracker` gives the request path.
    """

    __slots__ = ("_inflight",)

    def __init__(self) -> None:
        self._inflight: dict[str, int] = {}

    def __len__(self) -> int:
        """Keys with requests under way."""
        return len(self._inflight)

    def begin(self, key: str) -> bool:
        """A request for `key` starts; True when another one for it is already under way."""
        count = self._inflight.get(key, 0)
        self._inflight[key] = count + 1
        return count > 0

    def end(self, key: str) -> None:
        """A request for `key` is done (an unmatched end is ignored: stats never raise)."""
        count = self._inflight.get(key, 0)
        if count > 1:
            self._inflight[key] = count - 1
        elif count == 1:
            del self._inflight[key]

    def begin_units(self, units: Sequence[UnitLike]) -> list[bool]:
        """`begin` for each unit's `unit_id`: the request's contended flags, in order."""
        begin = self.begin
        return [begin(u.unit_id) for u in units]

    def end_units(self, units: Sequence[UnitLike]) -> None:
        """`end` for each unit's `unit_id`."""
        end = self.end
        for u in units:
            end(u.unit_id)


__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_FLAG_MS",
    "DEFAULT_SLOT_SECONDS",
    "DEFAULT_WINDOW_SECONDS",
    "NATIVE",
    "QUANTILE_RELATIVE_ERROR",
    "ContentionStats",
    "ContentionTracker",
    "KeyReport",
    "KeyStats",
    "LiveSketch",
    "Merged",
    "Outcome",
    "Publication",
    "Sketch",
    "SkuHint",
    "Tracker",
    "UnitLike",
    "WaitGrid",
    "assemble",
    "new_live_sketch",
    "new_tracker",
    "sku_hints",
]
