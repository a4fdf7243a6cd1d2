"""The deliverer's webhook POST: the hand-written HTTP/1.1 client (wire.Connection, setting
delivery_http_client = "builtin") against aiohttp (wire.post on one keep-alive ClientSession,
"aiohttp"), measured in the client process (docs/performance.md "Webhook client").

The fake WMS of tests/fake_wms.py runs in a process of its own (bench/delivery_bench.py's
start_wms: answers 200 at once, checks every signature). This process POSTs `--posts` events
(the same headers and bodies for both clients: wire.event_body of synthetic stream events,
signed) with `--concurrency` tasks, each POSTing its share one after another, as the
deliverer's partitions do (builtin: one connection per task; aiohttp: one session whose
connector allows every task a connection). Rounds alternate the clients (`--rounds`, the order
flipped each round) after one warm-up round each; per round it records this process's CPU
(time.process_time) and wall time. Reported per client and concurrency: CPU µs per POST and
POSTs/s (medians over the rounds), and the ratio builtin / aiohttp.

    .venv/bin/python bench/webhook_clients.py                      # c = 1 and 64, 5 rounds
    .venv/bin/python bench/webhook_clients.py --posts 2000 --rounds 3 --concurrency 1 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from delivery_bench import SECRET, start_wms  # noqa: E402

from stockhold.delivery import wire  # noqa: E402
from stockhold.delivery.subscriptions import StoredSubscription, check_subscription  # noqa: E402
from stockhold.errors import FieldViolation  # noqa: E402
from stockhold.events import parse_entry  # noqa: E402

CLIENTS = ("builtin", "aiohttp")


def subscription(url: str) -> StoredSubscription:
    out: list[FieldViolation] = []
    sub = check_subscription(
        name="bench",
        url=url,
        types=(),
        warehouses=(),
        skus=(),
        timeout_ms=5000,
        max_attempts=0,
        initial_backoff_ms=0,
        max_backoff_ms=0,
        on_failure="",
        out=out,
    )
    assert not out, out
    return StoredSubscription(sub, SECRET, 0)


def events(n: int) -> list[tuple[str, bytes]]:
    """(key, body) of n synthetic ORDER_RESERVED events, like the deliverer POSTs."""
    out = []
    for i in range(n):
        fields = {
            b"type": b"ORDER_RESERVED",
            b"order_id": f"wc-{i:07d}".encode(),
            b"skus": b"DB-00042",
            b"warehouses": b"wh-1",
            b"actor": b"anonymous",
            b"data": b'{"allocations": [["DB-00042", "std", "3000000000042", "wh-1", 1]]}',
        }
        e = parse_entry(i % 64, f"1796234574567-{i}", fields)
        out.append((wire.event_key(e), wire.event_body(e)))
    return out


Runner = Callable[[StoredSubscription, list[list[tuple[str, bytes]]]], Awaitable[int]]


async def run_builtin(stored: StoredSubscription, shares: list[list[tuple[str, bytes]]]) -> int:
    async def one(share: list[tuple[str, bytes]]) -> int:
        conn = wire.Connection(stored.sub.url)
        ok = 0
        for key, body in share:
            ok += (await conn.post(stored, key, body)).ok
        conn.close()
        return ok

    return sum(await asyncio.gather(*(one(s) for s in shares)))


async def run_aiohttp(stored: StoredSubscription, shares: list[list[tuple[str, bytes]]]) -> int:
    session = wire.client_session(stored, len(shares))
    timeout = session.timeout

    async def one(share: list[tuple[str, bytes]]) -> int:
        ok = 0
        for key, body in share:
            ok += (await wire.post(session, stored, key, body, timeout)).ok
        return ok

    try:
        return sum(await asyncio.gather(*(one(s) for s in shares)))
    finally:
        await session.close()


RUNNERS: dict[str, Runner] = {"builtin": run_builtin, "aiohttp": run_aiohttp}


async def measure(
    client: str, stored: StoredSubscription, posts: list[tuple[str, bytes]], c: int
) -> dict[str, float]:
    shares = [posts[i::c] for i in range(c)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    ok = await RUNNERS[client](stored, shares)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    assert ok == len(posts), f"{client}: {len(posts) - ok} POSTs failed"
    return {"cpu_us_per_post": cpu / len(posts) * 1e6, "posts_per_s": len(posts) / wall}


async def bench(a: argparse.Namespace, url: str) -> dict[str, Any]:
    stored = subscription(url)
    posts = events(a.posts)
    results: dict[str, Any] = {}
    for c in a.concurrency:
        rounds: dict[str, list[dict[str, float]]] = {k: [] for k in CLIENTS}
        for client in CLIENTS:  # warm-up
            await measure(client, stored, posts[: max(c * 10, 200)], c)
        for r in range(a.rounds):
            order = CLIENTS if r % 2 == 0 else CLIENTS[::-1]
            for client in order:
                rounds[client].append(await measure(client, stored, posts, c))
        row: dict[str, Any] = {}
        for client in CLIENTS:
            row[client] = {
                k: round(statistics.median(x[k] for x in rounds[client]), 1)
                for k in ("cpu_us_per_post", "posts_per_s")
            }
        b, h = row["builtin"], row["aiohttp"]
        row["cpu_ratio_aiohttp_over_builtin"] = round(
            h["cpu_us_per_post"] / b["cpu_us_per_post"], 2
        )
        row["rate_ratio_builtin_over_aiohttp"] = round(b["posts_per_s"] / h["posts_per_s"], 2)
        results[f"c={c}"] = row
        print(f"c={c}: {json.dumps(row)}", flush=True)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--posts", type=int, default=5000, help="POSTs per client per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="webhook-clients-") as tmp:
        child, port, _ = start_wms(Path(tmp))
        try:
            out = asyncio.run(bench(a, f"http://127.0.0.1:{port}/hook"))
        finally:
            child.stop()
    print(json.dumps({"args": vars(a), "results": out, "aiohttp": aiohttp.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
