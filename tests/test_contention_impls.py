"""Both live sketches, compiled (`c`, stockhold._contention_c) and pure (`py`, Sketch), agree.

The request path records into the compiled one (native/_contention_c.pyx); the pure Sketch is
the reference. For any stream they must keep the same keys with the same figures, evict the
same keys, and carry the same floor and total, so every figure GetContentionStats gives is
the same whichever is built. `stockhold.contention` must have picked the compiled one unless
STOCKHOLD_NO_EXTENSIONS is set.

Also here: `record_request` (one call per request, the engine's) counts exactly what `record`
counts unit by unit, and the snapshot forms (cached limited sub-windows, publications joined
again by `assemble`) merge into the same figures as a whole snapshot.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockhold import contention
from stockhold.contention import (
    SNAPSHOT_VERSION_SPLIT,
    ContentionStats,
    LiveSketch,
    Outcome,
    Sketch,
    WaitGrid,
    assemble,
    new_live_sketch,
)

try:
    from stockhold import _contention_c
except ImportError:
    _contention_c = None  # type: ignore[assignment]

NO_EXTENSIONS = bool(os.environ.get("STOCKHOLD_NO_EXTENSIONS"))
BUCKETS = WaitGrid(200_000).buckets
WALL_OFFSET = 1_700_000_000.0
OUTCOMES: list[Outcome] = ["ok", "insufficient", "timeout", "error"]
props = settings(database=None, max_examples=200, deadline=None)


def need_native() -> None:
    if NO_EXTENSIONS:
        pytest.skip("STOCKHOLD_NO_EXTENSIONS is set")
    if _contention_c is None:
        pytest.fail("stockhold._contention_c is not built (make native)")


def test_the_compiled_sketch_is_the_one_in_use() -> None:
    need_native()
    assert contention.NATIVE
    assert type(ContentionStats()._since_start).__module__ == "stockhold._contention_c"


def live(native: bool, capacity: int) -> LiveSketch:
    if native:
        need_native()
    return new_live_sketch(capacity, BUCKETS, native)


class U(NamedTuple):
    """A sales unit as record_request reads it."""

    unit_id: str
    sku: str


def normal(data: dict[str, Any]) -> tuple[int, int, list[Any]]:
    """A sketch's JSON with rows sorted and histograms as dicts: order is not a figure."""
    rows = sorted(
        (*row[:11], sorted(zip(row[11][::2], row[11][1::2], strict=True))) for row in data["keys"]
    )
    return data["floor"], data["total"], rows


# Few keys (evictions at small capacities), many equal weights (zero waits tie often).
keys = st.sampled_from([f"s{i % 3}/k{i}" for i in range(12)])
waits = st.one_of(st.just(0), st.integers(0, 3), st.integers(0, 5_000_000))
requests = st.lists(
    st.tuples(
        st.lists(keys, min_size=1, max_size=4, unique=True),
        waits,
        st.integers(0, 50_000),
        st.integers(0, BUCKETS - 1),
        st.sampled_from([*OUTCOMES, "odd"]),
        st.integers(0, 15),  # contended flags, one bit per unit
    ),
    max_size=200,
)


@props
@given(capacity=st.integers(1, 8), stream=requests, single=st.booleans())
def test_both_sketches_keep_the_same_keys_and_figures(
    capacity: int, stream: list[tuple[list[str], int, int, int, str, int]], single: bool
) -> None:
    sketches = [live(True, capacity), live(False, capacity)]
    for names, wait_us, script_us, bucket, outcome, bits in stream:
        units = [U(n, n.split("/")[0]) for n in names]
        busy = [bool(bits >> i & 1) for i in range(len(units))]
        for sk in sketches:
            if single:
                for u, b in zip(units, busy, strict=True):
                    sk.add(u.unit_id, u.sku, wait_us, script_us, bucket, b, outcome)  # type: ignore[arg-type]
            else:
                sk.add_units(units, busy, wait_us, script_us, bucket, outcome)  # type: ignore[arg-type]
    c, py = sketches
    assert len(c) == len(py) <= capacity
    assert (c.floor, c.total) == (py.floor, py.total)
    assert normal(c.to_json()) == normal(py.to_json())
    for limit in (0, 1, capacity // 2, capacity + 1):
        if limit < len(py):  # then heaviest first, in the same order
            c_rows, py_rows = c.to_json(limit)["keys"], py.to_json(limit)["keys"]
            assert [r[0] for r in c_rows] == [r[0] for r in py_rows]
        assert normal(c.to_json(limit)) == normal(py.to_json(limit))


def test_the_compiled_sketch_evicts_the_lightest_key_ties_by_key() -> None:
    need_native()
    sketches = [live(True, 2), live(False, 2)]
    for sk in sketches:
        # Zero waits: weights tie, and the smallest key goes first. c evicts a (1 < b),
        # a evicts b, and d evicts a again (weight 2, a < c).
        for key in ("b", "a", "c", "a", "d"):
            sk.add(key, "s", 0, 0, 0, False, "ok")
    assert normal(sketches[0].to_json()) == normal(sketches[1].to_json())
    assert sorted(row[0] for row in sketches[0].to_json()["keys"]) == ["c", "d"]


def test_the_compiled_sketch_refuses_what_it_cannot_hold() -> None:
    need_native()
    sk = live(True, 4)
    with pytest.raises(ValueError):
        sk.add("k", "s", 0, 0, BUCKETS, False, "ok")
    with pytest.raises(ValueError):
        sk.add("k", "s", -1, 0, 0, False, "ok")
    with pytest.raises(TypeError):
        sk.add(b"k", "s", 0, 0, 0, False, "ok")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        new_live_sketch(0, BUCKETS, True)
    with pytest.raises(ValueError):
        new_live_sketch(4, 10_000, True)
    assert len(sk) == 0 and sk.total == 0


@pytest.mark.parametrize("native", [True, False], ids=["c", "py"])
def test_add_units_wants_one_flag_per_unit(native: bool) -> None:
    sk = live(native, 4)
    with pytest.raises(ValueError):
        sk.add_units([U("a", "s"), U("b", "s")], [False], 0, 0, 0, "ok")
    assert len(sk) == 0


# -- ContentionStats: record_request, both implementations, snapshot forms -----------------------


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + WALL_OFFSET


timed_requests = st.lists(
    st.tuples(
        st.lists(keys, min_size=1, max_size=3, unique=True),
        st.integers(0, 3_000_000),
        st.sampled_from(OUTCOMES),
        st.floats(0, 9),
        st.booleans(),
    ),
    max_size=120,
)


def view(stats: ContentionStats, limit: int | None = None) -> Any:
    """Everything a reader gets from a process: its merged snapshot and its local reports."""
    merged = stats.merge([stats.snapshot(limit)])
    return (
        [(s.key, s.requests, s.wait_us, s.error) for s in merged.since_start.top()],
        [(s.key, s.requests, s.wait_us, s.error) for s in merged.window.top()],
        [normal(sk.to_json()) for sk in (merged.since_start, merged.window)],
        stats.top(100),
        stats.top(100, window=False),
        stats.tracked(),
    )


@props
@given(capacity=st.integers(1, 6), stream=timed_requests)
def test_record_request_counts_what_record_counts_unit_by_unit_in_both_implementations(
    capacity: int, stream: list[tuple[list[str], int, Outcome, float, bool]]
) -> None:
    clock = Clock()
    natives = [True, False] if not NO_EXTENSIONS and _contention_c is not None else [False]
    by_request = [
        ContentionStats(capacity=capacity, clock=clock, wall_clock=clock.wall, native=n)
        for n in natives
    ]
    by_unit = ContentionStats(capacity=capacity, clock=clock, wall_clock=clock.wall, native=False)
    for names, wait_us, outcome, dt, busy in stream:
        clock.now += dt
        units = [U(n, n.split("/")[0]) for n in names]
        flags = [busy] * len(units)
        for stats in by_request:
            stats.record_request(units, flags, wait_us / 1e6, 3e-4, outcome)
        for u in units:
            by_unit.record(u.unit_id, u.sku, wait_us / 1e6, 3e-4, busy, outcome)
    clock.now += 1
    expected = view(by_unit)
    for stats in by_request:
        assert view(stats) == expected
        assert view(stats, limit=2) == view(by_unit, limit=2)


def fill(stats: ContentionStats, clock: Clock, seconds: int, keys_per_second: int) -> None:
    for t in range(seconds):
        for i in range(keys_per_second):
            unit = U(f"s{i % 5}/k{(t * 7 + i) % 40}", f"s{i % 5}")
            stats.record_request([unit], [i % 3 == 0], (i * 997 % 5000) / 1e6, 2e-4, "ok")
        clock.now += 1


@pytest.mark.parametrize("native", [True, False], ids=["c", "py"])
def test_limited_snapshots_equal_re_limiting_the_whole_one(native: bool) -> None:
    if native:
        need_native()
    clock = Clock()
    stats = ContentionStats(capacity=16, clock=clock, wall_clock=clock.wall, native=native)
    fill(stats, clock, 30, 25)
    stats.snapshot(limit=4)  # from now on, closing sub-windows encode the limited form too
    fill(stats, clock, 40, 25)
    whole = orjson.loads(stats.snapshot())
    for limit in (4, 5, 4):  # the hint, another limit, the hint again
        limited = orjson.loads(stats.snapshot(limit=limit))
        assert limited["start"] == Sketch.from_json(whole["start"], 16, BUCKETS).to_json(limit)
        assert [start for start, _ in limited["slots"]] == [start for start, _ in whole["slots"]]
        for (_, got), (_, full) in zip(limited["slots"], whole["slots"], strict=True):
            relimited = Sketch.from_json(full, 16, BUCKETS).to_json(limit)
            assert normal(got) == normal(relimited)


@pytest.mark.parametrize("native", [True, False], ids=["c", "py"])
def test_a_publication_joined_again_merges_like_a_snapshot(native: bool) -> None:
    if native:
        need_native()
    clock = Clock()
    stats = ContentionStats(capacity=16, clock=clock, wall_clock=clock.wall, native=native)
    fill(stats, clock, 32, 20)
    pub = stats.publication(limit=8)
    head = orjson.loads(pub.head)
    assert head["v"] == SNAPSHOT_VERSION_SPLIT
    assert len(head["slots"]) == 1  # only the live sub-window rides with the head
    assert len(pub.closed) == 6  # 32 s of 5 s sub-windows: 6 closed, within the window
    assert all(orjson.loads(piece)[2] == i for i, piece in pub.closed.items())
    expected = stats.merge([stats.snapshot(limit=8)])
    pieces = list(pub.closed.values())
    joined = stats.merge([assemble(pub.head, pieces)])
    assert joined.skipped == 0
    assert normal(joined.window.to_json()) == normal(expected.window.to_json())
    assert joined.since_start.top() == expected.since_start.top()

    # A reader that sees a piece twice, or a piece of the sub-window still live in the head
    # (a publish between its two reads), counts each sub-window once.
    other_piece = orjson.dumps([*head["slots"][0][:2], 999])
    again = stats.merge([assemble(pub.head, pieces + pieces[:2])])
    assert normal(again.window.to_json()) == normal(expected.window.to_json())
    head_index = head["slots"][0][2]
    dup_live = orjson.dumps([*head["slots"][0][:2], head_index])
    twice = stats.merge([assemble(pub.head, [*pieces, dup_live])])
    assert normal(twice.window.to_json()) == normal(expected.window.to_json())
    assert stats.merge([assemble(pub.head, [*pieces, other_piece])]).window.total > (
        expected.window.total
    )  # another index is another sub-window: counted

    # Pieces of sub-windows that left the reader's window are ignored.
    clock.now += 60
    assert len(stats.merge([assemble(pub.head, pieces)]).window) == 0

    # A head with no pieces, a head alone, and what is not ours.
    assert assemble(pub.head, []) == pub.head
    assert stats.merge([assemble(pub.head, [b"{broken"])]).skipped == 1
    bad_index = orjson.dumps([head["slots"][0][0], head["slots"][0][1], "x"])
    assert stats.merge([assemble(pub.head, [bad_index])]).skipped == 1
    assert assemble(b"not ours", pieces) == b"not ours"


def test_a_head_without_a_live_sub_window_joins_its_pieces() -> None:
    clock = Clock()
    stats = ContentionStats(capacity=8, clock=clock, wall_clock=clock.wall, native=False)
    fill(stats, clock, 12, 5)
    stats._advance(clock.now + 5)  # close the live sub-window: the head has none
    pub = stats.publication()
    assert orjson.loads(pub.head)["slots"] == []
    joined = stats.merge([assemble(pub.head, list(pub.closed.values()))])
    assert joined.skipped == 0
    assert joined.window.total == stats.window_sketch().total > 0


def test_old_and_new_snapshot_versions_merge_together() -> None:
    clock = Clock()
    old, new = (
        ContentionStats(capacity=8, clock=clock, wall_clock=clock.wall, native=False)
        for _ in range(2)
    )
    fill(old, clock, 12, 4)
    fill(new, clock, 12, 4)
    pub = new.publication()
    merged = new.merge([old.snapshot(), assemble(pub.head, list(pub.closed.values()))])
    both = new.merge([old.snapshot(), new.snapshot()])
    assert merged.skipped == 0
    assert normal(merged.window.to_json()) == normal(both.window.to_json())
    assert merged.since_start.total == both.since_start.total


# -- the compiled request path: waits to µs and buckets, the contended tracker -------------------


@pytest.mark.parametrize(
    "seconds",
    [-1.0, -0.0, 0.0, 5e-7, 4.999e-7, 1.5e-6, 2.5e-6, 0.2, 0.2000005, 0.200001, 59.9, 1e6 - 1],
)
def test_the_compiled_request_path_converts_and_buckets_waits_as_the_pure_one(
    seconds: float,
) -> None:
    need_native()
    odd = [seconds, float("nan"), float("inf"), 1e300, 1e6]
    clock = Clock()
    pair = [
        ContentionStats(capacity=8, clock=clock, wall_clock=clock.wall, native=n)
        for n in (True, False)
    ]
    for i, wait in enumerate(odd):
        for stats in pair:
            stats.record_request([U(f"s/k{i}", "s")], [False], wait, seconds, "ok")
    c, py = (normal(orjson.loads(stats.snapshot())["start"]) for stats in pair)
    assert c == py


@props
@given(st.lists(st.tuples(st.integers(0, 3), st.lists(st.sampled_from("abcd"), max_size=3))))
def test_both_trackers_flag_the_same_requests(ops: list[tuple[int, list[str]]]) -> None:
    need_native()
    trackers = [contention.new_tracker(True), contention.new_tracker(False)]
    for op, names in ops:
        units = [U(n, "s") for n in names]
        answers = []
        for tracker in trackers:
            if op == 0:
                answers.append(tracker.begin_units(units))
            elif op == 1:
                answers.append(tracker.end_units(units))
            elif op == 2:
                answers.append([tracker.begin(n) for n in names])
            else:
                answers.append([tracker.end(n) for n in names])
        assert answers[0] == answers[1]
        assert len(trackers[0]) == len(trackers[1])
    assert type(trackers[0]).__module__ == "stockhold._contention_c"
