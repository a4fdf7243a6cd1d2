"""Contention statistics: exact while small, bounded whatever the keys, mergeable across processes.

Pure computation, no Redis: the clocks are driven by the tests.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import random
import tracemalloc
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockhold.contention import (
    QUANTILE_RELATIVE_ERROR,
    ContentionStats,
    ContentionTracker,
    KeyReport,
    KeyStats,
    Outcome,
    Sketch,
    WaitGrid,
    sku_hints,
)

# No example database: it would leave a .hypothesis/ folder in the repository root.
props = settings(database=None, max_examples=150, deadline=None)

# Wall clock = monotonic clock + this, as on a real host.
WALL_OFFSET = 1_700_000_000.0
OUTCOMES: list[Outcome] = ["ok", "insufficient", "timeout", "error"]


class Clock:
    """A monotonic clock the test moves by hand, and the wall clock that goes with it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + WALL_OFFSET


def make_stats(clock: Clock, **kwargs: Any) -> ContentionStats:
    return ContentionStats(clock=clock, wall_clock=clock.wall, **kwargs)


class Rec(NamedTuple):
    """One request as the tests feed it: waits in whole µs, so the truth is exact."""

    key: str
    wait_us: int
    script_us: int = 300
    contended: bool = False
    outcome: Outcome = "ok"

    @property
    def sku(self) -> str:
        return self.key.split("/")[0]


def feed(stats: ContentionStats, recs: Iterable[Rec]) -> None:
    for r in recs:
        stats.record(r.key, r.sku, r.wait_us / 1e6, r.script_us / 1e6, r.contended, r.outcome)


def true_weights(recs: Iterable[Rec]) -> Counter[str]:
    weights: Counter[str] = Counter()
    for r in recs:
        weights[r.key] += r.wait_us + 1
    return weights


def nearest_rank(values: Sequence[int], percent: int) -> int:
    ordered = sorted(values)
    return ordered[math.ceil(len(ordered) * percent / 100) - 1]


def within_bound(estimate_ms: float, true_us: int, grid: WaitGrid) -> bool:
    """The documented error bound of a quantile estimate."""
    error_us = abs(estimate_ms * 1000 - true_us)
    if true_us <= grid.edges[0]:
        return error_us <= grid.edges[0] / 2 + 1e-6
    return error_us <= QUANTILE_RELATIVE_ERROR * true_us * (1 + 1e-9)


keys = st.sampled_from([f"sku{s}/unit{u}" for s in range(3) for u in range(4)])
recs = st.builds(
    Rec,
    key=keys,
    wait_us=st.integers(0, 2_000_000),
    script_us=st.integers(0, 50_000),
    contended=st.booleans(),
    outcome=st.sampled_from(OUTCOMES),
)


# -- exact figures ----------------------------------------------------------------------------


@props
@given(st.lists(recs, max_size=200))
def test_figures_are_exact_while_under_capacity(stream: list[Rec]) -> None:
    clock = Clock()
    stats = make_stats(clock, capacity=64)
    feed(stats, stream)
    by_key: defaultdict[str, list[Rec]] = defaultdict(list)
    for r in stream:
        by_key[r.key].append(r)
    for reports in (stats.top(100), stats.top(100, window=False)):
        assert {r.key for r in reports} == set(by_key)
        for report in reports:
            mine = by_key[report.key]
            waits = [r.wait_us for r in mine]
            assert report.sku == mine[0].sku
            assert report.requests == len(mine)
            assert report.contended == sum(r.contended for r in mine)
            assert report.timeouts == sum(r.outcome == "timeout" for r in mine)
            assert report.insufficient == sum(r.outcome == "insufficient" for r in mine)
            assert report.errors == sum(r.outcome == "error" for r in mine)
            assert report.wait_total_ms == sum(waits) / 1000
            assert report.wait_max_ms == max(waits) / 1000
            assert report.wait_mean_ms == pytest.approx(sum(waits) / len(waits) / 1000)
            assert report.script_mean_ms == pytest.approx(
                sum(r.script_us for r in mine) / len(mine) / 1000
            )
            assert not report.estimated and report.error_ms == 0
        # Heaviest first: total wait, plus 1 µs per request.
        weights = [r.wait_total_ms * 1000 + r.requests for r in reports]
        assert weights == sorted(weights, reverse=True)


def test_top_returns_the_n_heaviest_keys_in_order() -> None:
    stats = make_stats(Clock())
    feed(stats, [Rec(f"s/k{i}", wait_us=1000 * i) for i in range(10)])
    assert [r.key for r in stats.top(3)] == ["s/k9", "s/k8", "s/k7"]
    assert [r.key for r in stats.top(3, window=False)] == ["s/k9", "s/k8", "s/k7"]
    assert stats.top(0) == []


def test_odd_times_are_clamped_and_never_raise() -> None:
    stats = make_stats(Clock())
    for wait in (-1.0, math.nan, math.inf, 1e300):
        stats.record("s/k", "s", wait, -5.0, False, "ok")
    (report,) = stats.top(1)
    assert report.requests == 4
    assert report.wait_max_ms == 1e9  # capped at 10**6 s
    assert report.script_mean_ms == 0


# -- space-saving -----------------------------------------------------------------------------


def test_the_heavy_hitter_ranks_first_among_many_light_keys() -> None:
    stats = make_stats(Clock(), capacity=64)
    stream: list[Rec] = []
    for i in range(20_000):
        stream.append(Rec(f"light/{i}", wait_us=1000))
        if i % 200 == 100:
            stream.append(Rec("heavy/1", wait_us=50_000))
    feed(stats, stream)
    for top in (stats.top(5), stats.top(5, window=False)):
        assert top[0].key == "heavy/1"
        # Admitted into a full sketch (so estimated), then never evicted: all its requests.
        assert top[0].requests == 100 and top[0].estimated
        assert top[0].wait_total_ms == 100 * 50
    assert stats.tracked() == [64, 64]


def check_space_saving(sketch: Sketch, truth: Counter[str], capacity: int) -> None:
    """The space-saving guarantees against the true weights of the stream."""
    total = sum(truth.values())
    assert sketch.total == total
    assert len(sketch) <= capacity
    for key, weight in truth.items():
        if weight * capacity > total:
            assert key in sketch, f"{key} ({weight} of {total}) missing"
    for stats in sketch.entries.values():
        true = truth[stats.key]
        assert stats.weight - stats.error <= true <= stats.weight
        # The figures are the key's own requests since admission: lower bounds.
        assert stats.wait_us + stats.requests <= true
    if sketch.entries:
        assert sketch.floor <= min(s.weight for s in sketch.entries.values())
    for key, weight in truth.items():
        if key not in sketch:
            assert weight <= sketch.floor


skewed_key = st.integers(0, 40).map(lambda i: f"s{i % 3}/k{min(i, i * i % 41)}")
timed_recs = st.lists(
    st.tuples(skewed_key, st.integers(0, 5_000), st.floats(0, 12)),
    max_size=300,
)


@props
@given(capacity=st.integers(1, 8), stream=timed_recs)
def test_space_saving_guarantee_since_start_and_over_the_window(
    capacity: int, stream: list[tuple[str, int, float]]
) -> None:
    clock = Clock()
    stats = make_stats(clock, capacity=capacity)
    timed: list[tuple[float, Rec]] = []
    for key, wait_us, dt in stream:
        clock.now += dt
        timed.append((clock.now, Rec(key, wait_us)))
        feed(stats, [Rec(key, wait_us)])
    check_space_saving(stats.since_start, true_weights(r for _, r in timed), capacity)
    # The window: requests of the sub-windows that start within the last 60 s.
    in_window = [r for t, r in timed if math.floor(t / 5) * 5 > clock.now - 60]
    check_space_saving(stats.window_sketch(), true_weights(in_window), capacity)


@props
@given(
    capacity=st.integers(1, 8),
    stream=st.lists(st.tuples(skewed_key, st.integers(0, 3)), max_size=300),
)
def test_space_saving_guarantee_survives_merging_processes(
    capacity: int, stream: list[tuple[str, int]]
) -> None:
    clock = Clock()
    processes = [make_stats(clock, capacity=capacity) for _ in range(3)]
    everything: list[Rec] = []
    for key, process in stream:
        rec = Rec(key, wait_us=100 * len(key))
        everything.append(rec)
        feed(processes[process % 3], [rec])
    merged = processes[0].merge([p.snapshot() for p in processes])
    truth = true_weights(everything)
    check_space_saving(merged.since_start, truth, capacity)
    check_space_saving(merged.window, truth, capacity)


def test_sketch_merge_leaves_its_inputs_unchanged_and_keystats_add() -> None:
    a, b = Sketch(4), Sketch(4)
    for i in range(10):
        a.add(f"k{i % 6}", "s", 10 * i, 1, 3, i % 2 == 0, "ok")
        b.add(f"k{i % 3}", "s", 7 * i, 2, 4, False, "timeout")
    before = (orjson.dumps(a.to_json()), orjson.dumps(b.to_json()))
    merged = Sketch.merged([a, b], 4)
    assert (orjson.dumps(a.to_json()), orjson.dumps(b.to_json())) == before
    assert len(merged) == 4 and merged.total == a.total + b.total
    x, y = KeyStats("k", "s", requests=1, wait_us=5, hist={1: 1}), KeyStats("k", "s", requests=2)
    assert x + y == KeyStats("k", "s", requests=3, wait_us=5, wait_max_us=0, hist={1: 1})
    assert x.requests == 1 and y.requests == 2


# -- quantiles and the flag -------------------------------------------------------------------


def quantiles_of(waits_us: Sequence[int], **kwargs: float) -> KeyReport:
    stats = make_stats(Clock(), **kwargs)
    feed(stats, [Rec("s/k", w) for w in waits_us])
    (report,) = stats.top(1)
    return report


@pytest.mark.parametrize(
    "draw",
    [
        pytest.param(lambda rng: rng.lognormvariate(math.log(2_000), 1.2), id="lognormal"),
        pytest.param(lambda rng: rng.uniform(0, 800_000), id="uniform"),
        pytest.param(lambda rng: rng.expovariate(1 / 30_000), id="exponential"),
        pytest.param(
            lambda rng: rng.choice((rng.uniform(50, 500), rng.uniform(150_000, 400_000))),
            id="bimodal",
        ),
    ],
)
def test_p50_and_p99_are_within_the_documented_bound(draw: object) -> None:
    rng = random.Random(7)
    waits = [int(draw(rng)) for _ in range(20_000)]  # type: ignore[operator]
    report = quantiles_of(waits)
    grid = WaitGrid(200_000)
    assert within_bound(report.wait_p50_ms, nearest_rank(waits, 50), grid)
    assert within_bound(report.wait_p99_ms, nearest_rank(waits, 99), grid)
    assert report.wait_max_ms == max(waits) / 1000


@props
@given(st.lists(st.integers(0, 59_000_000), min_size=1, max_size=300))
def test_quantile_estimates_stay_within_the_bound_for_any_sample(waits: list[int]) -> None:
    report = quantiles_of(waits)
    grid = WaitGrid(200_000)
    assert within_bound(report.wait_p50_ms, nearest_rank(waits, 50), grid)
    assert within_bound(report.wait_p99_ms, nearest_rank(waits, 99), grid)
    # The flag is exact, and the p99 estimate always sides with it.
    assert report.flagged == (nearest_rank(waits, 99) > 200_000) == (report.wait_p99_ms > 200)


def test_the_bucket_grid_spans_50_us_to_60_s_with_the_threshold_on_an_edge() -> None:
    grid = WaitGrid(200_000)
    assert 50 <= grid.edges[0] < 50 * 2 ** (1 / 4)
    assert 60_000_000 <= grid.edges[-1] < 60_000_000 * 2 ** (1 / 4)
    assert grid.edges[grid.flag_bucket] == 200_000
    assert grid.bucket(200_000) == grid.flag_bucket
    assert grid.bucket(200_001) == grid.flag_bucket + 1
    assert abs(QUANTILE_RELATIVE_ERROR - 0.0905) < 1e-4


def test_a_key_is_flagged_when_its_wait_p99_exceeds_200_ms() -> None:
    two_slow = quantiles_of([1_000] * 98 + [250_000] * 2)  # the 99th of 100 is 250 ms
    assert two_slow.flagged and two_slow.wait_p99_ms > 200
    one_slow = quantiles_of([1_000] * 99 + [250_000])  # the 99th of 100 is 1 ms
    assert not one_slow.flagged and one_slow.wait_p99_ms < 200
    assert one_slow.wait_max_ms == 250
    assert not quantiles_of([200_000] * 100).flagged  # p99 == 200 ms is not above it
    assert quantiles_of([200_001] * 100).flagged


def test_the_flag_threshold_is_configurable() -> None:
    waits = [60_000] * 100
    assert quantiles_of(waits, flag_ms=50).flagged
    assert not quantiles_of(waits).flagged
    with pytest.raises(ValueError):
        make_stats(Clock(), flag_ms=0.01)


# -- windows ----------------------------------------------------------------------------------


def test_the_window_forgets_old_requests_and_since_start_keeps_them() -> None:
    clock = Clock(1004.9)  # late in the sub-window [1000, 1005)
    stats = make_stats(clock)
    feed(stats, [Rec("s/old", 5_000)])
    clock.now = 1030.0
    feed(stats, [Rec("s/new", 1_000)])
    clock.now = 1059.9  # 55 s later: still in
    assert {r.key for r in stats.top(10)} == {"s/old", "s/new"}
    clock.now = 1060.0  # its sub-window started 60 s ago: gone
    assert [r.key for r in stats.top(10)] == ["s/new"]
    assert {r.key for r in stats.top(10, window=False)} == {"s/old", "s/new"}
    assert [r.key for r in stats.top(10)] == ["s/new"]
    clock.now = 1100.0
    assert stats.top(10) == []
    assert stats.window_sketch(window_s=5).entries == {}


def test_the_window_restarts_cleanly_after_a_long_idle_time() -> None:
    clock = Clock()
    stats = make_stats(clock)
    for _ in range(30):
        feed(stats, [Rec("s/busy", 1_000)])
        clock.now += 2.5
    clock.now += 3600
    feed(stats, [Rec("s/later", 1_000)])
    assert [r.key for r in stats.top(10)] == ["s/later"]
    assert stats.top(10, window=False)[0].requests == 30
    assert stats.tracked() == [2, 1]


def test_a_shorter_window_takes_only_the_recent_sub_windows() -> None:
    clock = Clock()
    stats = make_stats(clock)
    for i in range(12):
        feed(stats, [Rec(f"s/k{i}", 1_000)])
        clock.now += 5
    clock.now -= 0.1
    assert len(stats.window_sketch(window_s=10)) == 2
    assert len(stats.window_sketch()) == 12
    assert len(stats.window_sketch(window_s=600)) == 12  # never beyond the window


def test_window_must_be_a_whole_number_of_sub_windows() -> None:
    with pytest.raises(ValueError):
        make_stats(Clock(), window_s=60, slot_s=7)
    with pytest.raises(ValueError):
        make_stats(Clock(), capacity=0)


# -- snapshots and merging --------------------------------------------------------------------


def merged_view(sketch: Sketch) -> tuple[int, int, list[KeyStats]]:
    return sketch.floor, sketch.total, sketch.top()


@props
@given(
    st.lists(st.tuples(recs, st.integers(0, 1), st.floats(0, 15)), max_size=150),
    st.floats(0, 30),
    st.floats(0, 70),
)
def test_merging_two_processes_equals_recording_everything_in_one(
    stream: list[tuple[Rec, int, float]], idle: float, staleness: float
) -> None:
    clock = Clock()
    single = make_stats(clock, capacity=64)
    processes = [make_stats(clock, capacity=64), make_stats(clock, capacity=64)]
    for rec, which, dt in stream:
        clock.now += dt
        feed(single, [rec])
        feed(processes[which], [rec])
    clock.now += idle
    snapshots = [p.snapshot() for p in processes]
    clock.now += staleness  # read later than written: older sub-windows drop out
    merged = single.merge(snapshots, now_wall=clock.wall())
    assert merged.skipped == 0
    assert merged_view(merged.since_start) == merged_view(single.since_start)
    assert merged_view(merged.window) == merged_view(single.window_sketch())
    assert single.report(merged.window) == single.top(1000)


def test_merging_adds_the_floor_of_each_sketch_that_lacks_a_key() -> None:
    a = Sketch(2, [KeyStats("both", "s", requests=1, wait_us=99, error=10)], floor=50, total=1000)
    b = Sketch(
        2,
        [
            KeyStats("both", "s", requests=2, wait_us=8, error=3),
            KeyStats("b", "s", requests=1, wait_us=100),
        ],
        floor=7,
        total=500,
    )
    merged = Sketch.merged([a, b], 2)
    both, only_b = merged.entries["both"], merged.entries["b"]
    assert (both.requests, both.wait_us, both.error) == (3, 107, 13)
    assert (only_b.requests, only_b.error) == (1, 50)  # it may have weighed 50 in `a`
    assert merged.floor == 57 and merged.total == 1500
    kept = Sketch.merged([a, b], 1)  # "b" weighs 100 + 1 + 50, "both" 107 + 3 + 13: dropped
    assert list(kept.entries) == ["b"] and kept.floor == 123


def test_a_snapshot_round_trips_through_json() -> None:
    clock = Clock()
    stats = make_stats(clock)
    for i in range(40):
        feed(stats, [Rec(f"s{i % 3}/k{i % 7}", 137 * i, 11 * i, i % 2 == 0, OUTCOMES[i % 4])])
        clock.now += 3
    data = orjson.loads(stats.snapshot())
    assert data["v"] == 1 and data["at"] == clock.wall()
    assert [start for start, _ in data["slots"]] == sorted(start for start, _ in data["slots"])
    assert all(start > clock.wall() - 60 for start, _ in data["slots"])
    merged = stats.merge([stats.snapshot()])
    assert merged_view(merged.since_start) == merged_view(stats.since_start)
    assert merged_view(merged.window) == merged_view(stats.window_sketch())


def test_a_limited_snapshot_keeps_the_heaviest_keys_and_raises_the_floor() -> None:
    stats = make_stats(Clock())
    feed(stats, [Rec(f"s/k{i}", 1_000 * i) for i in range(1, 6)])
    merged = stats.merge([stats.snapshot(limit=2)])
    assert [s.key for s in merged.since_start.top()] == ["s/k5", "s/k4"]
    assert merged.since_start.floor == 3_001  # k3 may weigh that much
    assert merged.since_start.total == stats.since_start.total


def test_unreadable_or_foreign_snapshots_are_skipped_and_counted() -> None:
    clock = Clock()
    stats = make_stats(clock)
    feed(stats, [Rec("s/k", 1_000)])
    good = stats.snapshot()
    other_grid = make_stats(clock, flag_ms=100)
    feed(other_grid, [Rec("s/other", 1_000)])
    tampered = orjson.loads(good)
    tampered["start"]["keys"][0][2] = -1
    bad_bucket = orjson.loads(good)
    bad_bucket["start"]["keys"][0][-1] = [10_000, 1]
    snapshots = [
        good,
        b"not json",
        b"[]",
        orjson.dumps({**orjson.loads(good), "v": 2}),
        other_grid.snapshot(),
        orjson.dumps(tampered),
        orjson.dumps(bad_bucket),
    ]
    merged = stats.merge(snapshots)
    assert merged.skipped == 6
    assert [s.key for s in merged.since_start.top()] == ["s/k"]
    empty = stats.merge([])
    assert len(empty.since_start) == len(empty.window) == empty.skipped == 0


def test_merged_results_are_bounded_to_capacity() -> None:
    clock = Clock()
    processes = [make_stats(clock, capacity=16) for _ in range(4)]
    for n, p in enumerate(processes):
        feed(p, [Rec(f"s/p{n}k{i}", 10 * i) for i in range(40)])
    merged = processes[0].merge(p.snapshot() for p in processes)
    assert len(merged.since_start) == len(merged.window) == 16
    assert merged.since_start.total == sum(p.since_start.total for p in processes)


# -- SKU hints --------------------------------------------------------------------------------


def key_report(key: str, wait_ms: float, flagged: bool = False) -> KeyReport:
    return KeyReport(
        key=key,
        sku=key.split("/")[0],
        requests=10,
        contended=5,
        timeouts=0,
        insufficient=0,
        errors=0,
        wait_total_ms=wait_ms,
        wait_mean_ms=wait_ms / 10,
        wait_p50_ms=wait_ms / 10,
        wait_p99_ms=300.0 if flagged else 1.0,
        wait_max_ms=wait_ms,
        script_mean_ms=0.5,
        error_ms=0.0,
        flagged=flagged,
        estimated=False,
    )


def test_sku_hints_name_skus_with_several_hot_keys() -> None:
    reports = [
        key_report("A/red", 900),  # top quarter (2 of 8)
        key_report("B/x", 800),  # top quarter
        key_report("A/blue", 700, flagged=True),
        key_report("C/1", 600),
        key_report("B/y", 500),  # neither in the top quarter nor flagged
        key_report("C/2", 400, flagged=True),
        key_report("C/3", 300, flagged=True),
        key_report("/nosku", 200, flagged=True),
    ]
    hints = sku_hints(reports)
    assert [(h.sku, h.keys, h.flagged) for h in hints] == [
        ("A", ("A/red", "A/blue"), 1),
        ("C", ("C/2", "C/3"), 2),
    ]
    assert hints[0].wait_total_ms == 1600
    assert [h.sku for h in sku_hints(reports, min_hot_keys=1)] == ["A", "B", "C"]
    assert sku_hints(reports, min_hot_keys=3) == []
    assert sku_hints([]) == []


def test_sku_hints_from_recorded_requests() -> None:
    stats = make_stats(Clock())
    stream = [Rec("T-SHIRT/red-M", 300_000)] * 5 + [Rec("T-SHIRT/blue-L", 250_000)] * 5
    stream += [Rec(f"MUG/{i}", 1_000) for i in range(10)]
    feed(stats, stream)
    (hint,) = sku_hints(stats.top(12))
    assert hint.sku == "T-SHIRT" and hint.flagged == 2
    assert set(hint.keys) == {"T-SHIRT/red-M", "T-SHIRT/blue-L"}


# -- bounded memory ---------------------------------------------------------------------------


@pytest.mark.slow
def test_memory_stays_bounded_with_a_million_distinct_keys() -> None:
    clock = Clock()
    stats = make_stats(clock)  # capacity 1024, 12 sub-windows of 5 s
    record = stats.record

    def run(start: int, stop: int) -> None:
        for i in range(start, stop):
            if i % 5_000 == 0:  # a new sub-window every 5,000 keys: each one overflows
                clock.now += 5
            record(f"sku{i % 7919}/unit-{i}", f"sku{i % 7919}", (i % 997) / 1e4, 3e-4, True, "ok")

    run(0, 930_000)
    # The last 70,000 keys are traced: over 14 sub-windows every sketch of the ring is
    # replaced and every since-start entry evicted, so all the stats hold by the end (all
    # but two containers) was allocated, and is counted, here. Tracing all 1,000,000
    # would take minutes.
    gc.collect()
    tracemalloc.start()
    try:
        run(930_000, 1_000_000)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    sizes = stats.tracked()
    assert len(sizes) == 1 + 12 and all(n == 1024 for n in sizes)
    assert peak < 4_000_000, f"peak {peak / 1e6:.1f} MB"
    assert held > 1_000_000  # 13 full sketches: the footprint really was traced
    assert len(stats.top(10)) == 10


# -- the contended flag -----------------------------------------------------------------------


def test_a_request_is_contended_when_another_for_its_key_is_under_way() -> None:
    tracker = ContentionTracker()
    assert tracker.begin("k") is False
    assert tracker.begin("k") is True  # queued behind the first
    assert tracker.begin("other") is False
    tracker.end("k")
    assert tracker.begin("k") is True  # the second is still under way
    tracker.end("k")
    tracker.end("k")
    tracker.end("other")
    assert len(tracker) == 0
    assert tracker.begin("k") is False
    tracker.end("k")
    tracker.end("k")  # unmatched: ignored
    assert len(tracker) == 0 and tracker.begin("k") is False


@props
@given(st.lists(st.tuples(st.booleans(), st.sampled_from("abcd")), max_size=200))
def test_the_tracker_holds_only_keys_under_way(ops: list[tuple[bool, str]]) -> None:
    tracker = ContentionTracker()
    under_way: Counter[str] = Counter()
    for begin, key in ops:
        if begin:
            assert tracker.begin(key) == (under_way[key] > 0)
            under_way[key] += 1
        else:
            tracker.end(key)
            under_way[key] = max(under_way[key] - 1, 0)
        assert len(tracker) == sum(1 for n in under_way.values() if n > 0)


def test_keystats_rows_survive_a_round_trip() -> None:
    stats = KeyStats("s/k", "s", 3, 1, 1, 0, 1, 1234, 900, 77, 5, {3: 2, 40: 1})
    assert KeyStats.from_row(orjson.loads(orjson.dumps(stats.to_row())), 82) == stats
    assert dataclasses.replace(stats, error=0).weight == 1234 + 3
