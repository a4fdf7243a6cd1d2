"""What the metrics interceptor costs per call (docs/operations.md, "Metrics").

    .venv/bin/python bench/metrics_overhead.py [--calls 10000] [--rounds 5]

1. The timed handler alone: `await timed(request, context)` against `await handler(...)`,
   in-memory values and prometheus_client multiprocess (mmap) values, each in a fresh
   interpreter (prometheus_client picks its value class when it is first imported).
2. End to end over loopback gRPC: a server whose Inventory/GetReservation handler answers at
   once, with and without the interceptor; `--calls` sequential calls, then the same number
   with 64 in flight; rounds alternate between the two servers, medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import grpc
import uvloop

from stockhold import metrics
from stockhold.v1 import inventory_pb2 as pb

METHOD = "/stockhold.v1.Inventory/GetReservation"


class _Context:
    """Enough of a grpc.aio.ServicerContext for the timed handler's OK path."""

    def code(self) -> None:
        return None

    def time_remaining(self) -> None:
        return None


async def _answer(request: Any, context: Any) -> pb.Reservation:
    return pb.Reservation(order_id="o")


def _handler() -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        _answer,
        request_deserializer=pb.GetReservationRequest.FromString,
        response_serializer=pb.Reservation.SerializeToString,
    )


async def _wrapper_ns(calls: int, rounds: int) -> tuple[float, float]:
    """ns per call of the bare handler and of its timed twin (best round of each)."""
    handler = _handler()

    async def resolve(details: Any) -> Any:
        return handler

    details: Any = type("Details", (), {"method": METHOD, "invocation_metadata": ()})()
    timed = await metrics.MetricsInterceptor().intercept_service(resolve, details)
    assert timed is not None and timed is not handler
    request, context = pb.GetReservationRequest(order_id="o"), _Context()
    best = {"bare": float("inf"), "timed": float("inf")}
    for _ in range(rounds):
        for name, fn in (("bare", handler.unary_unary), ("timed", timed.unary_unary)):
            assert fn is not None
            start = time.perf_counter_ns()
            for _ in range(calls):
                await fn(request, context)
            best[name] = min(best[name], (time.perf_counter_ns() - start) / calls)
    return best["bare"], best["timed"]


async def _serve(intercept: bool) -> tuple[grpc.aio.Server, int]:
    interceptors = [metrics.MetricsInterceptor()] if intercept else []
    server = grpc.aio.server(interceptors=interceptors)
    service = grpc.method_handlers_generic_handler(
        "stockhold.v1.Inventory", {"GetReservation": _handler()}
    )
    server.add_generic_rpc_handlers((service,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _round(port: int, calls: int, inflight: int) -> float:
    """µs per call over `calls` calls, `inflight` at a time."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            METHOD,
            request_serializer=pb.GetReservationRequest.SerializeToString,
            response_deserializer=pb.Reservation.FromString,
        )
        request = pb.GetReservationRequest(order_id="o")
        await call(request)  # connected
        per_worker = calls // inflight

        async def worker() -> None:
            for _ in range(per_worker):
                await call(request)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        return (time.perf_counter() - start) / (per_worker * inflight) * 1e6


async def _end_to_end(calls: int, rounds: int) -> None:
    servers = {name: await _serve(name == "timed") for name in ("bare", "timed")}
    try:
        for inflight in (1, 64):
            seen: dict[str, list[float]] = {"bare": [], "timed": []}
            for _ in range(rounds):
                for name, (_, port) in servers.items():
                    seen[name].append(await _round(port, calls, inflight))
            bare, timed = (statistics.median(seen[n]) for n in ("bare", "timed"))
            print(
                f"end to end, {calls} calls, {inflight:>2} in flight: "
                f"{bare:7.1f} µs/call without, {timed:7.1f} with "
                f"(+{timed - bare:.1f} µs, {100 * (timed - bare) / bare:+.1f} %)"
            )
    finally:
        for server, _ in servers.values():
            await server.stop(0)


def _child(mode: str, calls: int, rounds: int) -> None:
    bare, timed = uvloop.run(_wrapper_ns(calls, rounds))
    print(
        f"timed handler alone, {mode:>12} values: {bare:6.0f} ns bare, {timed:6.0f} ns timed "
        f"(+{(timed - bare) / 1000:.2f} µs per call)"
    )


def main() -> None:
    """Print the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--child", choices=["in-memory", "multiprocess"])
    args = p.parse_args()
    if args.child:
        _child(args.child, args.calls * 10, args.rounds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("in-memory", "multiprocess"):
            env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV}
            if mode == "multiprocess":
                env[metrics.MULTIPROC_ENV] = tmp
            argv = [__file__, "--child", mode, "--calls", str(args.calls)]
            subprocess.run(
                [sys.executable, *argv, "--rounds", str(args.rounds)], env=env, check=True
            )
    uvloop.run(_end_to_end(args.calls, args.rounds))


if __name__ == "__main__":
    main()
