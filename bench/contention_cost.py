"""What contention bookkeeping costs per request and per publish: before issue 10 and now.

    .venv/bin/python bench/contention_cost.py [--requests 150000] [--rounds 3]

One workload, generated once and replayed through every path in the same run, rounds
interleaved (this box is shared: the minimum over rounds is the figure to read):

* Reserve requests at `--rate` per second of a simulated clock, 1 line each (`--lines`): a
  hot unit takes `--hot-share` of them, the rest spread uniformly over `--units` units;
* sent in batches of 1-16 orders; a request waits in the queue up to the previous call's
  time (sometimes longer), and its batch's call takes 0.1-3 ms; outcomes mostly ok, some
  insufficient on the hot unit, a few timeouts;
* the contended flags come from a ContentionTracker, begun on arrival and ended when the
  batch is answered, as Engine.reserve does;
* each batch's unit objects and strings are made anew just before it is replayed (not
  timed), as the resolver makes them per request: in cache, hashes not yet computed.

Paths:

* `before`: stockhold/contention.py as of `--baseline` (the code issue 10 measured, read from
  git): ContentionStats.record once per unit per request, as Engine._record did, and a
  whole `snapshot(limit)` published every `--publish-s`;
* `now`: Engine.reserve + Engine._record now: the compiled tracker's `begin_units` and
  `end_units`, `record_request` once per request (the compiled sketch), and a
  `publication(limit)` every `--publish-s`, of which the store sends the head and the pieces
  not sent before;
* `now-py`: the same with the pure-Python tracker and sketch (no compiled extension).

Reported: recording cost in µs per request (tracker included, the replay loop's own cost
subtracted), the publish cost per publish (ms, bytes sent), both together per request at
`--rate`, and whether every figure came out identical (since start and window, all keys).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from stockhold import contention
from stockhold.contention import ContentionStats, new_tracker

ROOT = Path(__file__).resolve().parent.parent
# contention.py as issue 10 measured it (unchanged since 2f45269, issue 4).
BASELINE_REV = "4344954"
SNAPSHOT_KEYS = 256  # Settings.contention_snapshot_keys


class Unit(NamedTuple):
    """What the paths read of a resolved unit (stockhold.resolver.Unit has these fields)."""

    unit_id: str
    sku: str


class Request(NamedTuple):
    units: tuple[Unit, ...]
    queued_s: float
    outcome: str

    def fresh(self) -> Request:
        """The same request with new unit objects and strings, as the resolver makes them
        for each request (just allocated, so in cache; their hashes not computed yet)."""
        units = tuple(Unit("".join(u.unit_id), "".join(u.sku)) for u in self.units)
        return Request(units, self.queued_s, self.outcome)


class Batch(NamedTuple):
    at: float  # simulated clock when it is answered
    call_s: float
    requests: tuple[Request, ...]


def load_baseline(rev: str = BASELINE_REV) -> types.ModuleType | None:
    """stockhold/contention.py at `rev`, as a module; None without git or that revision."""
    try:
        source = subprocess.run(
            ["git", "show", f"{rev}:src/stockhold/contention.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("contention_baseline")
    module.__file__ = f"{rev}:src/stockhold/contention.py"
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def workload(
    requests: int,
    units: int = 10_000,
    hot_share: float = 0.1,
    lines: int = 1,
    rate: float = 2000.0,
    seed: int = 7,
) -> list[Batch]:
    """The replayed requests, in batches (see the module docstring)."""
    rng = random.Random(seed)
    pool = [(f"SKU-{i:05d}:red-L:690{i:07d}", f"SKU-{i:05d}") for i in range(units)]
    hot = ("PHONE:128GB:6901234567890", "PHONE")
    batches: list[Batch] = []
    now = 1000.0
    call_s = 0.0005
    made = 0
    while made < requests:
        size = min(rng.randint(1, 16), requests - made)
        previous = call_s
        call_s = min(0.003, 0.0001 + rng.expovariate(1 / 0.0006))
        reqs = []
        for _ in range(size):
            picked = []
            for _ in range(lines):
                uid, sku = hot if rng.random() < hot_share else pool[rng.randrange(units)]
                picked.append(Unit(uid, sku))
            is_hot = picked[0].sku == "PHONE"
            queued = rng.uniform(0, previous) * (20 if rng.random() < 0.01 else 1)
            roll = rng.random()
            outcome = (
                "timeout" if roll < 0.002 else "insufficient" if is_hot and roll < 0.05 else "ok"
            )
            reqs.append(Request(tuple(picked), queued, outcome))
        made += size
        now += size / rate
        batches.append(Batch(now, call_s, tuple(reqs)))
    return batches


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + 1_700_000_000.0


@dataclasses.dataclass
class Result:
    record_s: float = 0.0
    publishes: list[float] = dataclasses.field(default_factory=list)
    sent: list[int] = dataclasses.field(default_factory=list)
    stats: Any = None


def run_before(module: types.ModuleType, batches: Sequence[Batch], publish_s: float) -> Result:
    """Engine.reserve + Engine._record before issue 10, and the whole snapshot published."""
    clock = Clock()
    stats = module.ContentionStats(clock=clock, wall_clock=clock.wall)
    tracker = module.ContentionTracker()
    record, begin, end = stats.record, tracker.begin, tracker.end
    out = Result(stats=stats)
    next_publish = clock.now + publish_s
    spent = 0.0
    for batch in batches:
        clock.now = batch.at
        requests = [r.fresh() for r in batch.requests]
        t0 = time.process_time()
        flags = [[begin(u.unit_id) for u in r.units] for r in requests]
        for r, contended in zip(requests, flags, strict=True):
            for u, busy in zip(r.units, contended, strict=True):
                record(u.unit_id, u.sku, r.queued_s, batch.call_s, busy, r.outcome)
            for u in r.units:
                end(u.unit_id)
        spent += time.process_time() - t0
        if clock.now >= next_publish:
            next_publish += publish_s
            t0 = time.process_time()
            blob = stats.snapshot(limit=SNAPSHOT_KEYS)
            out.publishes.append(time.process_time() - t0)
            out.sent.append(len(blob))
    out.record_s = spent
    return out


def run_now(batches: Sequence[Batch], publish_s: float, native: bool) -> Result:
    """Engine.reserve + Engine._record now, and the store's publish (head + new pieces)."""
    clock = Clock()
    stats = ContentionStats(clock=clock, wall_clock=clock.wall, native=native)
    tracker = new_tracker(native)
    record, begin, end = stats.record_request, tracker.begin_units, tracker.end_units
    out = Result(stats=stats)
    stored: set[int] = set()
    next_publish = clock.now + publish_s
    spent = 0.0
    for batch in batches:
        clock.now = batch.at
        requests = [r.fresh() for r in batch.requests]
        t0 = time.process_time()
        flags = [begin(r.units) for r in requests]
        for r, contended in zip(requests, flags, strict=True):
            record(r.units, contended, r.queued_s, batch.call_s, r.outcome)  # type: ignore[arg-type]
            end(r.units)
        spent += time.process_time() - t0
        if clock.now >= next_publish:
            next_publish += publish_s
            t0 = time.process_time()
            pub = stats.publication(limit=SNAPSHOT_KEYS)
            new = [piece for i, piece in pub.closed.items() if i not in stored]
            stored = set(pub.closed)
            out.publishes.append(time.process_time() - t0)
            out.sent.append(len(pub.head) + sum(len(p) for p in new))
    out.record_s = spent
    return out


def run_empty(batches: Sequence[Batch]) -> float:
    """The replay loop alone (same shape, no bookkeeping): subtracted from every path."""
    spent = 0.0
    for batch in batches:
        requests = [r.fresh() for r in batch.requests]
        t0 = time.process_time()
        flags = [[u.unit_id for u in r.units] for r in requests]
        for r, contended in zip(requests, flags, strict=True):
            for _u in r.units:
                pass
            del contended
        spent += time.process_time() - t0
    return spent


def figures(stats: Any) -> tuple[Any, Any]:
    """Every key's report, since start and over the window, as plain tuples."""
    return (
        [dataclasses.astuple(r) for r in stats.top(10_000, window=False)],
        [dataclasses.astuple(r) for r in stats.top(10_000)],
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=150_000)
    p.add_argument("--units", type=int, default=10_000)
    p.add_argument("--hot-share", type=float, default=0.1)
    p.add_argument("--lines", type=int, default=1)
    p.add_argument("--rate", type=float, default=2000.0, help="requests per simulated second")
    p.add_argument("--publish-s", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", default=BASELINE_REV, help="git revision of 'before'")
    args = p.parse_args(argv)

    baseline = load_baseline(args.baseline)
    if baseline is None:
        print(f"cannot read src/stockhold/contention.py at {args.baseline} (git)", file=sys.stderr)
        return 2
    batches = workload(args.requests, args.units, args.hot_share, args.lines, args.rate)
    n = sum(len(b.requests) for b in batches)
    paths: dict[str, Callable[[], Result]] = {
        "before": lambda: run_before(baseline, batches, args.publish_s),
    }
    if contention.NATIVE:
        paths["now"] = lambda: run_now(batches, args.publish_s, native=True)
    paths["now-py"] = lambda: run_now(batches, args.publish_s, native=False)
    results: dict[str, list[Result]] = {name: [] for name in paths}
    empty: list[float] = []
    for _ in range(args.rounds):
        empty.append(run_empty(batches))
        for name, run in paths.items():
            results[name].append(run())
    loop_us = min(empty) / n * 1e6
    simulated = batches[-1].at - 1000.0
    print(
        f"{n} requests ({args.lines} line(s), {args.units} units + 1 hot at "
        f"{args.hot_share:.0%}), {len(batches)} batches, {simulated:.0f} s simulated at "
        f"{args.rate:g}/s, publish every {args.publish_s:g} s; min (median) of "
        f"{args.rounds} rounds; replay loop {loop_us:.2f} µs/request subtracted"
    )
    print(
        f"{'path':8} {'record µs/req':>16} {'publish ms':>16} {'publish bytes':>14} "
        f"{'total µs/req':>13}"
    )
    reference = figures(results["before"][0].stats)
    for name, runs in results.items():
        rec = [r.record_s / n * 1e6 - loop_us for r in runs]
        pub_ms = [statistics.median(r.publishes) * 1e3 for r in runs]
        steady = [statistics.median(r.sent) for r in runs]
        total = [(r.record_s + sum(r.publishes)) / n * 1e6 - loop_us for r in runs]
        same = figures(runs[0].stats) == reference
        print(
            f"{name:8} {min(rec):7.2f} ({statistics.median(rec):6.2f}) "
            f"{min(pub_ms):7.2f} ({statistics.median(pub_ms):6.2f}) "
            f"{int(statistics.median(steady)):14d} "
            f"{min(total):6.2f} ({statistics.median(total):5.2f})"
            f"  figures {'identical' if same else 'DIFFER'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
