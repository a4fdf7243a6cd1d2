"""Micro-benchmarks of the per-request work around the script call.

    .venv/bin/python -m pytest bench/test_bench_engine.py --benchmark-only

Each measures real work on real inputs: decoding a Reserve off the wire, resolving it, and
building the KEYS/ARGV of one batched reserve.lua call (no Redis round trip).
"""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from stockhold.engine import Engine
from stockhold.resolver import KeyResolver
from stockhold.settings import Settings
from stockhold.v1 import inventory_pb2 as pb


def reserve_request(order: int, lines: int) -> pb.ReserveRequest:
    """A realistic Reserve of `lines` distinct units."""
    return pb.ReserveRequest(
        order_id=f"order-{order:09d}",
        lines=[
            pb.ReserveLine(
                unit=pb.SalesUnit(sku=f"SKU-{i:05d}", spec="red-L", barcode=f"690123456{i:04d}"),
                quantity=2,
            )
            for i in range(lines)
        ],
    )


def line_tuples(request: pb.ReserveRequest) -> list[tuple[str, str, str, str, int]]:
    """What the servicer hands the resolver."""
    return [
        (ln.unit.sku, ln.unit.spec, ln.unit.barcode, ln.warehouse, ln.quantity)
        for ln in request.lines
    ]


@pytest.mark.parametrize("lines", [1, 10])
def test_decode_reserve_request(benchmark: Any, lines: int) -> None:
    wire = reserve_request(1, lines).SerializeToString()
    decoded = benchmark(lambda: line_tuples(pb.ReserveRequest.FromString(wire)))
    assert len(decoded) == lines


@pytest.mark.parametrize("orders", [1, 16, 64])
def test_build_batched_reserve_call(benchmark: Any, orders: int) -> None:
    settings = Settings()
    # The client is never used: building the call does no I/O.
    engine = Engine(Redis(), settings)
    resolver = KeyResolver(settings.key_prefix, settings.partitions)
    batch = [
        (resolver.resolve_order(r.order_id, line_tuples(r), 0, settings.max_hold_seconds), "bench")
        for r in (reserve_request(i, 3) for i in range(orders))
    ]
    keys, args = benchmark(engine.reserve_call, batch)
    assert len(args) == orders + 1
    assert len(keys) == orders * (3 + 3)
