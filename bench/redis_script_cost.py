"""Redis's own cost of the Reserve path's script call (reserve.lua), per call and per order.

    .venv/bin/python bench/redis_script_cost.py                     # this tree: Ir and µs
    .venv/bin/python bench/redis_script_cost.py --baseline HEAD~5   # ... side by side with a rev
    .venv/bin/python bench/redis_script_cost.py --mode usec --calls 3000
    .venv/bin/python bench/redis_script_cost.py --script trivial=/tmp/return1.lua --mode ir

Two measures, each on private redis-servers (free 127.0.0.1 ports, never 6379, no
persistence), one server per variant and batch size:

    Ir      instructions Redis executes inside EVALSHA (valgrind's callgrind, collecting only
            within `evalShaCommand`): exact and independent of the machine's load, so one run
            says what a change saves. Needs `valgrind` on PATH.
    usec    Redis's own `INFO commandstats` usec_per_call of EVALSHA (what issue 10 asks for).
            Noisy on a loaded box, so every variant runs in the same run, call after call in
            turn (variant A's call i, variant B's call i, ...), and shares whatever load there is.

A variant is the KEYS/ARGV its tree's `Engine.reserve_call` builds and the reserve.lua source
its tree registers (configuration included): this tree, `--baseline REV` (a git revision of
this repository, unpacked to a temporary directory), `--tree NAME=SRC_DIR` (a `src` directory),
or `--script NAME=FILE` (this tree's KEYS/ARGV, or `--script-tree`'s, with another script
source, for subtractive experiments). Each tree builds its calls in a subprocess of its own
(`PYTHONPATH=<src>`), so two versions of stockhold never meet in one interpreter.

The workload is loadbench's uniform Reserve: orders of `--lines` distinct lines of quantity 1
in one named warehouse, over 1,000 sales units with ample stock (seeded with plain HSET, so
every variant starts from the same data), a distinct order id per order: every call is real
holds, never replays. Each batch size (`--batches`, orders per call) runs `--calls` calls; a
variant's figures are per EVALSHA call and per order. The run checks that every tree variant
held exactly the units it was asked to (sum of `r:<warehouse>` over the stock hashes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # redis_proc: the tests' private redis-server helper

from redis_proc import free_port, redis_binaries  # noqa: E402

UNITS = 1_000
WAREHOUSE = "wh-1"
SPEC = "std"
STOCK = 10**12


# -- the generator: runs under the variant's own tree -------------------------------------------
def generate(out: str, batches: Sequence[int], calls: int, lines: int) -> None:
    """Build every call of every batch size with the stockhold found on sys.path; pickle
    {"source", "stock_keys", "calls": {batch: [(keys, args), ...]}} to `out`."""
    from stockhold.engine import Engine
    from stockhold.settings import Settings

    settings = Settings(redis_url="redis://127.0.0.1:1")
    engine = Engine.connect(settings.redis_url, settings)
    script = engine.scripts.reserve
    source = next(
        s for s in (getattr(script, a, None) for a in ("script", "source")) if s is not None
    )
    units = engine.resolver.units([(f"sku-{i:05d}", SPEC, f"2{i:012d}") for i in range(UNITS)])
    plan: dict[int, list[tuple[list[str], list[bytes]]]] = {}
    n = 0
    for batch in batches:
        plan[batch] = []
        for i in range(calls):
            orders = []
            for j in range(batch):
                picked = [units[(n * lines + k) % UNITS] for k in range(lines)]
                n += 1
                orders.append(
                    engine.resolver.resolve_order(
                        f"cost-{batch}-{i}-{j}",
                        [(u.sku, u.spec, u.barcode, WAREHOUSE, 1) for u in picked],
                        0,
                        settings.max_hold_seconds,
                    )
                )
            keys, args = engine.reserve_call([(o, "bench") for o in orders])
            plan[batch].append(
                (list(keys), [a if isinstance(a, bytes) else str(a).encode() for a in args])
            )
    with open(out, "wb") as f:
        pickle.dump(
            {
                "source": source if isinstance(source, str) else source.decode(),
                "stock_keys": [u.stock_key for u in units],
                "calls": plan,
            },
            f,
        )


def live_commits(url: str, batch: int, calls: int, lines: int) -> None:
    """Commit's script call, with the stockhold found on sys.path, against a running Redis:
    hold `calls` batches of `batch` orders (reserve.lua through EVAL, so that only the commits
    are EVALSHA), reset the statistics, then commit them batch by batch through the engine's
    own transition batch (one transition.lua EVALSHA per batch)."""
    import asyncio

    from stockhold.engine import Engine, Transition
    from stockhold.settings import Settings

    async def run() -> None:
        settings = Settings(redis_url=url)
        engine = Engine.connect(url, settings)
        admin = redis.Redis.from_url(url)
        units = engine.resolver.units([(f"sku-{i:05d}", SPEC, f"2{i:012d}") for i in range(UNITS)])
        pipe = admin.pipeline(transaction=False)
        for u in units:
            pipe.hset(u.stock_key, f"a:{WAREHOUSE}", STOCK)
        pipe.execute()
        script = engine.scripts.reserve
        source = next(
            s for s in (getattr(script, a, None) for a in ("script", "source")) if s is not None
        )
        transition = engine.scripts.transition
        admin.script_load(
            next(s for s in (getattr(transition, a, None) for a in ("script", "source")) if s)
        )
        held = []
        n = 0
        for i in range(calls):
            orders = []
            for j in range(batch):
                picked = [units[(n * lines + k) % UNITS] for k in range(lines)]
                n += 1
                orders.append(
                    engine.resolver.resolve_order(
                        f"commit-{batch}-{i}-{j}",
                        [(u.sku, u.spec, u.barcode, WAREHOUSE, 1) for u in picked],
                        0,
                        settings.max_hold_seconds,
                    )
                )
            keys, args = engine.reserve_call([(o, "bench") for o in orders])
            admin.eval(source, len(keys), *keys, *args)
            held.append(orders)
        admin.config_resetstat()
        for orders in held:
            results = await engine._transition_batch(
                [Transition("commit", o.keys, f"pay-{o.keys.order_id}", "bench") for o in orders]
            )
            for r in results:
                if r.get("err") or r.get("rec", {}).get("st") != "C":
                    raise RuntimeError(f"commit failed: {r}")
        await engine.close()
        admin.close()

    asyncio.run(run())


# -- the driver -------------------------------------------------------------------------------
@dataclass
class Variant:
    """One protocol version: where its calls come from and what they cost."""

    name: str
    src: Path | None = None  # a tree's src dir (None: this tree)
    script: str | None = None  # a script source replacing the tree's
    plan: dict[str, Any] = field(default_factory=dict)


@dataclass
class Server:
    """One private redis-server (maybe under callgrind) for one variant and batch size."""

    variant: Variant
    batch: int
    proc: subprocess.Popen[bytes]
    port: int
    client: redis.Redis
    cg_out: str | None
    sha: str = ""
    # µs per EVALSHA call spent in each command the script ran (INFO commandstats)
    inner: dict[str, float] = field(default_factory=dict)


def build_plans(
    variants: Sequence[Variant], batches: Sequence[int], calls: int, lines: int
) -> None:
    """Run each tree's generator in its own subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            out = os.path.join(tmp, f"{v.name}.pickle")
            env = dict(os.environ, PYTHONPATH=str(v.src or ROOT / "src"))
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--gen",
                    out,
                    "--batches",
                    ",".join(map(str, batches)),
                    "--calls",
                    str(calls),
                    "--lines",
                    str(lines),
                ],
                env=env,
                check=True,
                cwd=tmp,
            )
            with open(out, "rb") as f:
                v.plan = pickle.load(f)
            if v.script is not None:
                v.plan["source"] = v.script


def start(binary: str, variant: Variant, batch: int, callgrind: bool, tmp: str) -> Server:
    """A private redis-server for one variant and batch size, seeded and with the script."""
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    cmd += ["--dir", tmp, "--dbfilename", f"{variant.name}-{batch}.rdb"]
    cg_out = None
    if callgrind:
        cg_out = os.path.join(tmp, f"cg.{variant.name}.{batch}.out")
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--toggle-collect=evalShaCommand",
            f"--callgrind-out-file={cg_out}",
            *cmd,
        ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=120)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"redis-server did not start: {cmd}") from None
            time.sleep(0.1)
    pipe = client.pipeline(transaction=False)
    for key in variant.plan["stock_keys"]:
        pipe.hset(key, f"a:{WAREHOUSE}", STOCK)
    pipe.execute()
    server = Server(variant, batch, proc, port, client, cg_out)
    if "source" in variant.plan:
        server.sha = client.script_load(variant.plan["source"])
    return server


def stop(server: Server) -> int | None:
    """Stop a server; under callgrind, the instructions it executed inside EVALSHA."""
    with contextlib.suppress(redis.RedisError):
        server.client.close()
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
    if server.cg_out is None:
        return None
    text = subprocess.run(
        ["callgrind_annotate", server.cg_out], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"^\s*([\d,]+)\s+(?:\(\s*[\d.]+%\)\s+)?PROGRAM TOTALS", text, re.M)
    if m is None:
        raise RuntimeError(f"no totals in {server.cg_out}")
    return int(m.group(1).replace(",", ""))


def held_units(server: Server) -> int:
    """Units held on this server: the sum of r:<warehouse> over the stock hashes."""
    pipe = server.client.pipeline(transaction=False)
    for key in server.variant.plan["stock_keys"]:
        pipe.hget(key, f"r:{WAREHOUSE}")
    return sum(int(v or 0) for v in pipe.execute())


def run_calls(servers: Sequence[Server], calls: int) -> dict[str, tuple[float, int, int]]:
    """Every server's calls, one call per server in turn; per server: (EVALSHA µs per call,
    ARGV bytes per call, reply bytes per call), from INFO commandstats."""
    for s in servers:
        s.client.config_resetstat()
    sizes = {s.variant.name: [0, 0] for s in servers}
    for i in range(calls):
        for s in servers:
            keys, args = s.variant.plan["calls"][s.batch][i]
            reply = s.client.evalsha(s.sha, len(keys), *keys, *args)
            size = sizes[s.variant.name]
            size[0] += sum(len(a) for a in args)
            size[1] += len(reply) if isinstance(reply, bytes) else len(repr(reply))
    out = {}
    for s in servers:
        everything = s.client.info("commandstats")
        s.inner = {
            k.removeprefix("cmdstat_"): float(v["usec"]) / calls
            for k, v in everything.items()
            if k != "cmdstat_evalsha" and k.startswith("cmdstat_")
        }
        stats = everything["cmdstat_evalsha"]
        if stats["calls"] != calls:
            raise RuntimeError(f"{s.variant.name}: {stats['calls']} EVALSHA, expected {calls}")
        if stats.get("failed_calls") or stats.get("rejected_calls"):
            raise RuntimeError(f"{s.variant.name}: failed script calls: {stats}")
        arg_bytes, reply_bytes = sizes[s.variant.name]
        out[s.variant.name] = (
            float(stats["usec_per_call"]),
            arg_bytes // calls,
            reply_bytes // calls,
        )
    return out


def run_commits(servers: Sequence[Server], batch: int, calls: int, lines: int) -> dict[str, float]:
    """Each server's commits, every variant's driver at the same time (they share the load);
    per server: EVALSHA µs per call (transition.lua only, INFO commandstats)."""
    procs = []
    for s in servers:
        env = dict(os.environ, PYTHONPATH=str(s.variant.src or ROOT / "src"))
        cmd = [sys.executable, __file__, "--live", f"redis://127.0.0.1:{s.port}"]
        cmd += ["--batches", str(batch), "--calls", str(calls), "--lines", str(lines)]
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"commit driver failed: {p.args}")
    out = {}
    for s in servers:
        everything = s.client.info("commandstats")
        stats = everything["cmdstat_evalsha"]
        if stats["calls"] != calls or stats.get("failed_calls"):
            raise RuntimeError(f"{s.variant.name}: {stats}, expected {calls} calls")
        s.inner = {
            k.removeprefix("cmdstat_"): float(v["usec"]) / calls
            for k, v in everything.items()
            if k.startswith("cmdstat_") and k not in ("cmdstat_evalsha", "cmdstat_hmget")
        }
        out[s.variant.name] = float(stats["usec_per_call"])
    return out


@contextlib.contextmanager
def servers_for(
    binary: str, variants: Sequence[Variant], batch: int, callgrind: bool, tmp: str
) -> Iterator[list[Server]]:
    """One started server per variant for one batch size; stopped (and read) by the caller."""
    started: list[Server] = []
    try:
        for v in variants:
            started.append(start(binary, v, batch, callgrind, tmp))
        yield started
    except BaseException:
        for s in started:
            with contextlib.suppress(Exception):
                s.proc.kill()
        raise


def measure(
    binary: str,
    variants: Sequence[Variant],
    batches: Sequence[int],
    calls: int,
    lines: int,
    callgrind: bool,
    keep: str = "",
    op: str = "reserve",
) -> dict[tuple[str, int], dict[str, float]]:
    """Per (variant, batch): usec and (under callgrind) Ir per call, plus sizes."""
    results: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = keep or tmp_dir
        for batch in batches:
            if op == "commit":
                with servers_for(binary, variants, batch, callgrind, tmp) as servers:
                    stats = run_commits(servers, batch, calls, lines)
                    for s in servers:
                        usec = stats[s.variant.name]
                        ir = stop(s)
                        results[s.variant.name, batch] = {
                            **{f"cmd:{k}": v for k, v in s.inner.items()},
                            "usec": usec,
                            "ir": (ir / calls) if ir is not None else float("nan"),
                            "arg_bytes": float("nan"),
                            "reply_bytes": float("nan"),
                        }
                continue
            with servers_for(binary, variants, batch, callgrind, tmp) as servers:
                stats = run_calls(servers, calls)
                for s in servers:
                    held = held_units(s)
                    # A --script variant is an experiment: it may hold nothing on purpose.
                    if s.variant.script is None and held != calls * batch * lines:
                        raise RuntimeError(
                            f"{s.variant.name}: {held} units held, expected {calls * batch * lines}"
                        )
                for s in servers:
                    usec, arg_bytes, reply_bytes = stats[s.variant.name]
                    ir = stop(s)
                    results[s.variant.name, batch] = {
                        **{f"cmd:{k}": v for k, v in s.inner.items()},
                        "usec": usec,
                        "ir": (ir / calls) if ir is not None else float("nan"),
                        "arg_bytes": arg_bytes,
                        "reply_bytes": reply_bytes,
                    }
    return results


def report(
    results: dict[tuple[str, int], dict[str, float]],
    variants: Sequence[Variant],
    batches: Sequence[int],
    callgrind: bool,
) -> None:
    """Print one row per variant and batch size, with ratios to the first variant."""
    first = variants[0].name
    head = f"{'variant':<14}{'batch':>6}"
    if callgrind:
        head += f"{'kIr/call':>10}{'kIr/order':>11}"
    else:
        head += f"{'µs/call':>9}{'µs/order':>10}"
    head += f"{'ratio':>7}{'ARGV B/call':>12}{'reply B/call':>13}"
    print(head)
    key = "ir" if callgrind else "usec"
    for batch in batches:
        for v in variants:
            r = results[v.name, batch]
            per_call = r[key] / 1000 if callgrind else r[key]
            ratio = r[key] / results[first, batch][key]
            print(
                f"{v.name:<14}{batch:>6}{per_call:>10.1f}{per_call / batch:>11.1f}"
                f"{ratio:>7.2f}{_size(r['arg_bytes']):>12}{_size(r['reply_bytes']):>13}"
            )
            if not callgrind:
                inner = sorted(
                    ((k[4:], x) for k, x in r.items() if k.startswith("cmd:")),
                    key=lambda kv: -kv[1],
                )
                total = sum(x for _, x in inner)
                print(
                    f"{'':<20}inside: commands {total / batch:.1f} µs/order ("
                    + ", ".join(f"{k} {x / batch:.1f}" for k, x in inner if x >= 0.05 * batch)
                    + f"), the rest (Lua, arguments, reply) {(per_call - total) / batch:.1f}"
                )


def _size(n: float) -> str:
    return "-" if n != n else str(int(n))


def unpack_rev(rev: str, into: str) -> Path:
    """The `src` directory of a git revision of this repository, unpacked under `into`."""
    dest = Path(into) / re.sub(r"[^\w.-]", "_", rev)
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run the measures it asks for."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mode", choices=("ir", "usec", "both"), default="both")
    ap.add_argument("--batches", default="1,4,16", help="orders per call, comma-separated")
    ap.add_argument(
        "--calls",
        type=int,
        default=0,
        help="calls per batch size (default: 300 for Ir, 2000 for µs)",
    )
    ap.add_argument("--lines", type=int, default=1, help="lines per order (distinct units)")
    ap.add_argument("--baseline", action="append", default=[], metavar="REV")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=SRC_DIR")
    ap.add_argument("--script", action="append", default=[], metavar="NAME=FILE")
    ap.add_argument(
        "--script-tree",
        default="",
        metavar="SRC_DIR",
        help="the src directory whose KEYS/ARGV the --script variants get (default: this tree)",
    )
    ap.add_argument("--no-current", action="store_true", help="leave this tree out")
    ap.add_argument(
        "--redis-server", default="", help="redis-server binary (default: the tests' choice)"
    )
    ap.add_argument(
        "--keep",
        default="",
        metavar="DIR",
        help="keep the callgrind outputs (cg.<variant>.<batch>.out) in DIR, for callgrind_annotate",
    )
    ap.add_argument(
        "--op",
        choices=("reserve", "commit"),
        default="reserve",
        help="the script call measured: reserve.lua, or transition.lua committing holds",
    )
    ap.add_argument("--gen", metavar="OUT", help=argparse.SUPPRESS)
    ap.add_argument("--live", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.gen:
        generate(args.gen, batches, args.calls, args.lines)
        return
    if args.live:
        live_commits(args.live, batches[0], args.calls, args.lines)
        return
    binary = args.redis_server or redis_binaries()[0][1]
    with tempfile.TemporaryDirectory() as trees:
        # Baselines first: ratios are to the first variant.
        variants = [Variant(rev, src=unpack_rev(rev, trees)) for rev in args.baseline]
        if not args.no_current:
            variants.append(Variant("current"))
        for spec in args.tree:
            name, _, path = spec.partition("=")
            variants.append(Variant(name, src=Path(path)))
        for spec in args.script:
            name, _, path = spec.partition("=")
            src = Path(args.script_tree) if args.script_tree else None
            variants.append(Variant(name, src=src, script=Path(path).read_text()))
        modes = ["ir", "usec"] if args.mode == "both" else [args.mode]
        if "ir" in modes and shutil.which("valgrind") is None:
            print("valgrind not found: Ir figures skipped")
            modes.remove("ir")
        for mode in modes:
            calls = args.calls or (300 if mode == "ir" else 2000)
            if args.op == "reserve":
                build_plans(variants, batches, calls, args.lines)
            else:
                for v in variants:  # the commit drivers build their own calls and stock
                    v.plan = {"stock_keys": []}
            print(
                f"\n{args.op}, {mode}: {calls} calls per batch size, {args.lines} line(s) "
                f"per order, {binary}"
            )
            results = measure(
                binary, variants, batches, calls, args.lines, mode == "ir", args.keep, args.op
            )
            report(results, variants, batches, mode == "ir")


if __name__ == "__main__":
    main()
