"""A fake WMS webhook for delivery tests and benches (issue 12): an aiohttp server on
127.0.0.1 (a free port) that records every POST and checks its signature.

    wms = FakeWMS(secret)
    await wms.start()            # wms.url("/hook") is the subscription's URL
    wms.delay = 0.9              # every answer waits this long (a slow WMS)
    wms.fail_next(5)             # the next 5 POSTs get 500 (fail_next(None): until reset())
    await wms.down() / await wms.up()   # refusing connections, then listening again
    wms.received                 # every POST, in arrival order (Received)
    await wms.stop()

No pytest import: usable from a bench as well.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web


@dataclass(frozen=True, slots=True)
class Received:
    """One POST as the fake WMS got it."""

    key: str  # Idempotency-Key
    body: bytes
    headers: dict[str, str]
    at: float  # monotonic arrival time
    status: int  # what it answered
    signature_ok: bool

    @property
    def event(self) -> dict[str, Any]:
        value: dict[str, Any] = orjson.loads(self.body)
        return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class FakeWMS:
    """See the module docstring."""

    def __init__(self, secret: str = "", port: int = 0) -> None:
        self.secret = secret
        self.port = port or free_port()
        self.delay = 0.0
        self.received: list[Received] = []
        self._fail: int | None = 0  # POSTs still to fail (None: all until reset)
        self._runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def fail_next(self, n: int | None) -> None:
        """Answer 500 to the next `n` POSTs (None: to every POST until reset())."""
        self._fail = n

    def reset(self) -> None:
        """Answer normally again (no failures, no delay)."""
        self._fail = 0
        self.delay = 0.0

    def ok(self) -> list[Received]:
        """The POSTs answered 2xx, in arrival order."""
        return [r for r in self.received if 200 <= r.status < 300]

    def keys(self) -> list[str]:
        """Event keys of the POSTs answered 2xx, in arrival order."""
        return [r.key for r in self.ok()]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        arrived = time.monotonic()
        if self.delay:
            await asyncio.sleep(self.delay)
        status = 200
        if self._fail is None or self._fail > 0:
            status = 500
            if self._fail is not None:
                self._fail -= 1
        expected = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        signature = request.headers.get("X-Stockhold-Signature", "")
        self.received.append(
            Received(
                key=request.headers.get("Idempotency-Key", ""),
                body=body,
                headers=dict(request.headers),
                at=arrived,
                status=status,
                signature_ok=hmac.compare_digest(signature, expected),
            )
        )
        return web.Response(status=status, text="ok" if status == 200 else "failed")

    async def start(self) -> FakeWMS:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def down(self) -> None:
        """Stop listening: connections are refused until up()."""
        await self.stop()

    async def up(self) -> None:
        """Listen again on the same port."""
        if self._runner is None:
            await self.start()
