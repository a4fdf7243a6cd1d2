"""Per-call cost of auth.AuthInterceptor's guard (no grpc; a fake context): a bare coroutine
handler against the same handler wrapped by the guard, with and without a rate limit.

    .venv/bin/python bench/auth_guard_cost.py
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from stockhold import auth

CALLS = 200_000
TOKENS = 100


def auth_text(limited: bool) -> str:
    """An auth file of TOKENS checkout tokens (and a limit too high to refuse anything)."""
    entries = [
        f'[[token]]\nname = "t{i}"\nhash = "{auth.hash_token(token(i))}"\nroles = ["checkout"]\n'
        for i in range(TOKENS)
    ]
    if limited:
        entries.append("[rate_limit.checkout]\nper_second = 1e9\nburst = 1e9\n")
    return "\n".join(entries)


def token(i: int) -> str:
    return f"tok-{i}-" + "x" * 32


class Context:
    """What the guard reads of a grpc.aio ServicerContext."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


async def inner(request: Any, context: Any) -> None:
    return None


async def per_call_us(fn: Any, context: Context) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        await fn(None, context)
    return (time.perf_counter() - start) / CALLS * 1e6


async def main() -> None:
    handler: Any = grpc.unary_unary_rpc_method_handler(inner)
    context = Context((("user-agent", "grpc-c++/1.51"), ("authorization", f"Bearer {token(7)}")))
    for limited in (False, True):
        config = auth.parse_auth(auth_text(limited), "bench.toml")
        interceptor = auth.AuthInterceptor(config, "loopback")
        guarded = auth._wrap(handler, interceptor._guard("Reserve")).unary_unary
        bare = await per_call_us(inner, context)
        wrapped = await per_call_us(guarded, context)
        label = "rate limit" if limited else "no limit"
        print(f"{label:10s} bare {bare:.2f} us/call, guarded {wrapped:.2f} us/call")


if __name__ == "__main__":
    asyncio.run(main())
