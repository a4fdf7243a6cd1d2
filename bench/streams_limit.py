"""What grpc does with calls beyond a connection's MAX_CONCURRENT_STREAMS (issue 13's
`max_streams_per_connection`): one grpc.aio server (a no-op Health service, stockhold's
pending-request options), one client channel, a burst of N concurrent calls, for each limit.

    .venv/bin/python bench/streams_limit.py [--calls 2000] [--limits 10000,1000,100]

grpc-core does not reliably queue the calls above the limit in the client: part of a burst is
refused with RST_STREAM REFUSED_STREAM (UNAVAILABLE "error code 7"), on a fresh channel and on
one that is already connected alike. Hence stockhold's default stays high (docs/security.md).
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


async def burst(limit: int, calls: int, connected: bool) -> Counter[str]:
    pending = 2 * calls + 1000
    server = grpc.aio.server(
        options=[
            ("grpc.max_concurrent_streams", limit),
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", pending * 2),
        ]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            if connected:
                await asyncio.wait_for(channel.channel_ready(), 10)
            stub = health_pb2_grpc.HealthStub(channel)

            async def one() -> str:
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                    return "OK"
                except grpc.aio.AioRpcError as err:
                    return err.code().name

            return Counter(await asyncio.gather(*(one() for _ in range(calls))))
    finally:
        await server.stop(0)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--limits", default="10000,1000,100")
    args = parser.parse_args()
    for limit in (int(x) for x in args.limits.split(",")):
        for connected in (False, True):
            counts = await burst(limit, args.calls, connected)
            state = "connected" if connected else "fresh"
            print(f"limit {limit:>6}  {state:<9}  {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    asyncio.run(main())
