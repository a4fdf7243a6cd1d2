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

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any, Final

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


def event_body(e: StreamEvent) -> bytes:
    """The JSON object POSTed for the event (keys sorted: the same event, the same bytes)."""
    try:
        data: Any = orjson.loads(e.data_json) if e.data_json else {}
    except orjson.JSONDecodeError:
        data = {"raw": e.data_json}  # delivered as stored, never dropped
    return orjson.dumps(
        {
            "id": event_key(e),
            "partition": e.partition,
            "stream_id": e.id_text,
            "type": e.type,
            "order_id": e.order_id,
            "adjustment_id": e.adjustment_id,
            "sku": e.sku,
            "skus": list(e.skus),
            "warehouses": list(e.warehouses),
            "ts": format_rfc3339(e.ts_ms),
            "ts_ms": e.ts_ms,
            "actor": getattr(e, "actor", ""),
            "data": data,
        },
        option=orjson.OPT_SORT_KEYS,
    )


def sign(secret: str, body: bytes) -> str:
    """The X-Stockhold-Signature value: "sha256=" + hex HMAC-SHA256 of the body by the secret."""
    return SIGNATURE_PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def headers(stored: StoredSubscription, key: str, body: bytes) -> dict[str, str]:
    """Every header of one POST."""
    return {
        "Content-Type": "application/json",
        "Idempotency-Key": key,
        "X-Stockhold-Event-Id": key,
        "X-Stockhold-Subscription": stored.sub.name,
        "X-Stockhold-Signature": sign(stored.secret, body),
    }


async def post(
    session: aiohttp.ClientSession, stored: StoredSubscription, event_key: str, body: bytes
) -> PostResult:
    """POST one event to the subscription's URL; never raises for what the WMS or the network
    does (cancellation apart)."""
    timeout = aiohttp.ClientTimeout(total=stored.sub.timeout_ms / 1000)
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


__all__ = ["PostResult", "event_body", "event_key", "headers", "post", "sign"]
