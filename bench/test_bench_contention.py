"""Micro-benchmarks of contention bookkeeping (issue 10): per request, and per publish.

    .venv/bin/python -m pytest bench/test_bench_contention.py --benchmark-only

The workload is bench/contention_cost.py's (10,000 uniform units and one hot unit, batches of
1-16 orders, queue waits and call times, 2,000 requests per simulated second). Each round of
the recording benchmarks replays `CHUNK` requests with the engine's bookkeeping around them:
the contended tracker begun and ended, and the figures recorded, into sketches already
warmed up past the window (every sub-window full). `before` is contention.py as issue 10
measured it (read from git; skipped without it), `c` the compiled path, `py` its pure twin.
The publish benchmarks time one publish at that steady state: the whole limited snapshot
before, a publication (head + closed pieces, cached) now. `extra_info` has the µs per
request, and the bytes a publish sends. bench/contention_cost.py is the side-by-side run.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from contention_cost import (
    SNAPSHOT_KEYS,
    Batch,
    Clock,
    Request,
    load_baseline,
    workload,
)

from stockhold import contention
from stockhold.contention import ContentionStats, new_tracker

CHUNK = 1000
WARM = 150_000  # 75 s at 2,000 requests/s: past the 60 s window

_batches = workload(WARM + 20 * CHUNK)
_requests: list[tuple[Batch, Request]] = [(b, r) for b in _batches for r in b.requests]


@pytest.fixture(scope="module")
def baseline() -> types.ModuleType:
    module = load_baseline()
    if module is None:
        pytest.skip("git cannot show the baseline contention.py")
    return module


def impl(name: str, baseline: types.ModuleType | None) -> tuple[Any, Callable[..., None]]:
    """Warmed-up (stats, clock), and a function recording one request as the engine does."""
    clock = Clock()
    if name == "before":
        assert baseline is not None
        stats = baseline.ContentionStats(clock=clock, wall_clock=clock.wall)
        tracker = baseline.ContentionTracker()

        def one(batch: Batch, r: Request) -> None:
            contended = [tracker.begin(u.unit_id) for u in r.units]
            for u, busy in zip(r.units, contended, strict=True):
                stats.record(u.unit_id, u.sku, r.queued_s, batch.call_s, busy, r.outcome)
            for u in r.units:
                tracker.end(u.unit_id)

    else:
        native = name == "c"
        if native and not contention.NATIVE:
            pytest.skip("stockhold._contention_c is not built or disabled")
        stats = ContentionStats(clock=clock, wall_clock=clock.wall, native=native)
        new = new_tracker(native)

        def one(batch: Batch, r: Request) -> None:
            contended = new.begin_units(r.units)
            stats.record_request(r.units, contended, r.queued_s, batch.call_s, r.outcome)  # type: ignore[arg-type]
            new.end_units(r.units)

    for batch, r in _requests[:WARM]:
        clock.now = batch.at
        one(batch, r)
    return (stats, clock), one


def chunks() -> Iterator[list[tuple[Batch, Request]]]:
    """Fresh request objects, CHUNK at a time, cycling over what follows the warm-up."""
    rest = _requests[WARM:]
    for start in itertools.cycle(range(0, len(rest), CHUNK)):
        part = [(b, r.fresh()) for b, r in rest[start : start + CHUNK]]
        yield part


@pytest.mark.parametrize("name", ["before", "c", "py"])
def test_record_requests(benchmark: Any, name: str, request: pytest.FixtureRequest) -> None:
    base = request.getfixturevalue("baseline") if name == "before" else None
    _, one = impl(name, base)
    source = chunks()

    def setup() -> tuple[tuple[list[tuple[Batch, Request]]], dict[str, Any]]:
        return (next(source),), {}

    def run(part: list[tuple[Batch, Request]]) -> None:
        # The clock stays where the warm-up left it: every request goes into the current
        # sub-window, full like the others (a steady state).
        for batch, r in part:
            one(batch, r)

    benchmark.pedantic(run, setup=setup, rounds=40, iterations=1)
    benchmark.extra_info["us_per_request"] = benchmark.stats.stats.median / CHUNK * 1e6


@pytest.mark.parametrize("name", ["before", "c"])
def test_publish(benchmark: Any, name: str, request: pytest.FixtureRequest) -> None:
    base = request.getfixturevalue("baseline") if name == "before" else None
    (stats, _), _ = impl(name, base)
    if name == "before":
        blob = benchmark(stats.snapshot, limit=SNAPSHOT_KEYS)
        sent = len(blob)
    else:
        pub = benchmark(stats.publication, limit=SNAPSHOT_KEYS)
        sent = len(pub.head)  # the closed pieces went with earlier publishes
    benchmark.extra_info["bytes_sent"] = sent
