"""Redis connections come from a bounded, blocking pool: exhausting it is never a client error."""

from __future__ import annotations

import asyncio

from stockhold_fixtures import Factory, add_stock, line, unit

from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc


async def test_far_more_concurrent_calls_than_connections_all_succeed(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold(redis_max_connections=3)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "pool", "w1", 1_000)
        reads = [
            stub.GetAvailability(pb.GetAvailabilityRequest(units=[unit("pool")]))
            for _ in range(300)
        ]
        reserves = [
            stub.Reserve(pb.ReserveRequest(order_id=f"p-{i}", lines=[line("pool", 1)]))
            for i in range(300)
        ]
        replies = await asyncio.gather(*reads, *reserves)
    assert len(replies) == 600
    pool = running.server.engine.client.connection_pool
    assert pool.max_connections == 3
    # The script calls went through the hot-path client, bounded the same way.
    hot = running.server.engine.calls.hot
    assert hot is not None and 1 <= hot.connection_count() <= 3
    assert all(r.levels[0].on_hand == 1_000 for r in replies[:300])
    assert sum(1 for r in replies[300:] if not r.replayed) == 300
