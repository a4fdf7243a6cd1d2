"""What a subscription's webhook receives (issue 12, docs/events.md "Pushing to a WMS").

One event per POST, a JSON object (`event_body`), with headers:

    Content-Type: application/json
    Idempotency-Key: <partition>:<ms>-<seq>       the event's key, the same on every retry
    X-Stockhold-Event-Id: <partition>:<ms>-<seq>  the same value
    X-Stockhold-Subscription: <name>
    X-Stockhold-Signature: sha256=<hex HMAC-SHA256(secret, body)>

Success is any 2xx status within the subscription's timeout; anything else (another status, a
refused connection, a timeout) is a failure the caller retries by its policy.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ssl
import time
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import orjson

from stockhold.delivery.subscriptions import StoredSubscription
from stockhold.events import StreamEvent
from stockhold.timeparse import format_rfc3339

SIGNATURE_PREFIX: Final = "sha256="
MAX_ERROR_TEXT: Final = 200


@dataclass(frozen=True, slots=True)
class PostResult:
    """One attempt: ok (a 2xx in time), how long it took, what went wrong ("" when ok), and
    the HTTP status (0 when there was none: refused, reset, timed out)."""

    ok: bool
    seconds: float
    error: str = ""
    status: int = 0


def event_key(e: StreamEvent) -> str:
    """The event's key, unique across partitions: "<partition>:<ms>-<seq>"."""
    return f"{e.partition}:{e.id[0]}-{e.id[1]}"


@functools.lru_cache(maxsize=1024)
def _second(seconds: int) -> str:
    """`YYYY-MM-DDTHH:MM:SS` of a whole second (events of one second share it)."""
    return format_rfc3339(seconds * 1000)[:-5]


def _ts(ms: int) -> str:
    """format_rfc3339(ms), the date part cached per second."""
    return f"{_second(ms // 1000)}.{ms % 1000:03d}Z"


def event_body(e: StreamEvent) -> bytes:
    """The JSON object POSTed for the event (keys sorted: the same event, the same bytes).
    `data` is the stored JSON text embedded as it is (not parsed and written again); text
    that is not JSON goes as {"raw": text}, delivered as stored, never dropped."""
    data: Any
    if not e.data_json:
        data = {}
    elif e.data_valid:
        data = orjson.Fragment(e.data_json)
    else:
        data = {"raw": e.data_json}
    return orjson.dumps(
        {
            "actor": e.actor,
            "adjustment_id": e.adjustment_id,
            "data": data,
            "id": event_key(e),
            "order_id": e.order_id,
            "partition": e.partition,
            "sku": e.sku,
            "skus": e.skus,
            "stream_id": e.id_text,
            "ts": _ts(e.ts_ms),
            "ts_ms": e.ts_ms,
            "type": e.type,
            "warehouses": e.warehouses,
        }
    )


def sign(secret: str, body: bytes) -> str:
    """The X-Stockhold-Signature value: "sha256=" + hex HMAC-SHA256 of the body by the secret."""
    return SIGNATURE_PREFIX + hmac.digest(secret.encode(), body, "sha256").hex()


def headers(stored: StoredSubscription, key: str, body: bytes) -> dict[str, str]:
    """Every header of one POST."""
    return {
        "Content-Type": "application/json",
        "Idempotency-Key": key,
        "X-Stockhold-Event-Id": key,
        "X-Stockhold-Subscription": stored.sub.name,
        "X-Stockhold-Signature": sign(stored.secret, body),
    }


def client_session(stored: StoredSubscription, connections: int) -> aiohttp.ClientSession:
    """A keep-alive session for one subscription's POSTs: up to `connections` at once (one per
    owned partition), the subscription's timeout as the session's (see `post`)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max(connections, 1), keepalive_timeout=30),
        timeout=aiohttp.ClientTimeout(total=stored.sub.timeout_ms / 1000),
        auto_decompress=False,
    )


async def post(
    session: aiohttp.ClientSession,
    stored: StoredSubscription,
    event_key: str,
    body: bytes,
    client_timeout: aiohttp.ClientTimeout | None = None,
) -> PostResult:
    """POST one event to the subscription's URL; never raises for what the WMS or the network
    does (cancellation apart). `client_timeout`: the subscription's, when the caller has it
    made already (a session of `client_session`: `session.timeout`)."""
    timeout = client_timeout or aiohttp.ClientTimeout(total=stored.sub.timeout_ms / 1000)
    started = time.monotonic()
    try:
        async with session.post(
            stored.sub.url,
            data=body,
            headers=headers(stored, event_key, body),
            timeout=timeout,
            allow_redirects=False,
        ) as response:
            await response.read()  # the connection goes back to the pool only once read
            status = response.status
    except TimeoutError:
        return PostResult(False, time.monotonic() - started, "timeout", 0)
    except (aiohttp.ClientError, OSError, ValueError) as e:
        text = f"{type(e).__name__}: {e}"[:MAX_ERROR_TEXT]
        return PostResult(False, time.monotonic() - started, text, 0)
    seconds = time.monotonic() - started
    if 200 <= status < 300:
        return PostResult(True, seconds, "", status)
    return PostResult(False, seconds, f"HTTP {status}", status)


__all__ = [
    "Connection",
    "PostResult",
    "client_session",
    "event_body",
    "event_key",
    "headers",
    "post",
    "sign",
]


# -- the deliverer's connection ------------------------------------------------------------------

MAX_HEAD: Final = 64 * 1024


class Connection:
    """One keep-alive HTTP/1.1 connection to a webhook URL carrying one POST at a time: the
    deliverer's fast path (a partition's events go one after another, so a partition needs no
    more than one connection). Several times cheaper per POST than a client session; the same
    requests and the same meaning of success as `post`. Redirects are not followed."""

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        default = parts.port is None
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if default else f"{host}:{self.port}"
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    def _request(self, stored: StoredSubscription, key: str, body: bytes) -> bytes:
        head = [f"POST {self.target} HTTP/1.1", f"Host: {self.authority}"]
        head += [f"{k}: {v}" for k, v in headers(stored, key, body).items()]
        head += [f"Content-Length: {len(body)}", "User-Agent: stockhold", "", ""]
        return "\r\n".join(head).encode("latin-1") + body

    async def post(self, stored: StoredSubscription, key: str, body: bytes) -> PostResult:
        """POST one event; never raises for what the WMS or the network does."""
        started = time.monotonic()
        request = self._request(stored, key, body)
        try:
            async with asyncio.timeout(stored.sub.timeout_ms / 1000):
                reused = self._writer is not None
                try:
                    status = await self._exchange(request)
                except (asyncio.IncompleteReadError, ConnectionError):
                    if not reused:
                        raise
                    # a kept-alive connection the WMS had closed: once more on a new one
                    self.close()
                    status = await self._exchange(request)
        except TimeoutError:
            self.close()
            return PostResult(False, time.monotonic() - started, "timeout", 0)
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            self.close()
            text = f"{type(e).__name__}: {e}"[:MAX_ERROR_TEXT]
            return PostResult(False, time.monotonic() - started, text, 0)
        seconds = time.monotonic() - started
        if 200 <= status < 300:
            return PostResult(True, seconds, "", status)
        return PostResult(False, seconds, f"HTTP {status}", status)

    async def _exchange(self, request: bytes) -> int:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self.host,
                self.port,
                ssl=ssl.create_default_context() if self.tls else None,
                limit=MAX_HEAD,
            )
        reader, writer = self._reader, self._writer
        assert reader is not None
        writer.write(request)
        await writer.drain()
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            version, _, rest = lines[0].partition(" ")
            status = int(rest[:3])
            fields: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    fields[name.strip().lower()] = value.strip().lower()
            if 100 <= status < 200:
                continue  # an interim answer: the final one follows
            break
        keep = version == "HTTP/1.1" and fields.get("connection") != "close"
        if "chunked" in fields.get("transfer-encoding", ""):
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        elif "content-length" in fields:
            await reader.readexactly(int(fields["content-length"]))
        else:
            await reader.read()  # the body runs to the end of the connection
            keep = False
        if not keep:
            self.close()
        return status
