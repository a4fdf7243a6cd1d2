"""The optional HTTP endpoint for WeChat Pay v3 payment notifications (aiohttp.web).

It answers in WeChat's protocol: received -> HTTP 204, no body; not received -> 4xx/5xx with
`{"code": "FAIL", "message": "..."}`, after which WeChat delivers the notification again
(15 s, 15 s, 30 s, 3 min, ... for about 24 h). Only a result that passed every check in
NotificationVerifier reaches `on_result`.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Final

import orjson
from aiohttp import web

from stockhold.payments.provider import PaymentResult, RetryLater
from stockhold.payments.wechatpay import NotificationVerifier, VerificationError, VerificationReason
from stockhold.settings import split_listen

log = logging.getLogger(__name__)

DEFAULT_PATH: Final = "/wechatpay/notify"
# WeChat's notifications are about 1 KiB; anything far larger is not one.
MAX_BODY_BYTES: Final = 64 * 1024

OnResult = Callable[[PaymentResult], Awaitable[None]]

__all__ = ["DEFAULT_PATH", "MAX_BODY_BYTES", "RetryLater", "make_app", "start_webhook"]


def _fail(status: int, message: str) -> web.Response:
    body = orjson.dumps({"code": "FAIL", "message": message[:64]})
    return web.Response(status=status, body=body, content_type="application/json")


def make_app(
    verifier: NotificationVerifier,
    on_result: OnResult,
    path: str = DEFAULT_PATH,
) -> web.Application:
    """An aiohttp application that verifies notifications POSTed to `path` and hands each
    genuine TRANSACTION.* result to `on_result` (which must be idempotent: WeChat redelivers).

    204: handled (or a verified non-transaction event, ignored). 401 FAIL: refused by the
    verifier, with its reason as the message. 413 FAIL: body over 64 KiB. 500 FAIL:
    `on_result` raised RetryLater or failed, or the nonce store is down; WeChat retries.
    """

    async def notify(request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _fail(413, "BODY_TOO_LARGE")
        try:
            result = await verifier.verify(request.headers, body)
        except VerificationError as exc:
            if exc.reason is VerificationReason.IGNORED_EVENT:
                log.info("WeChat Pay notification ignored", extra={"event_type": exc.detail})
                return web.Response(status=204)
            log.warning(
                "WeChat Pay notification refused",
                extra={"reason": str(exc.reason), "detail": exc.detail, "peer": request.remote},
            )
            return _fail(401, str(exc.reason))
        except Exception:
            # Most likely Redis (the nonce guard) is unreachable: not the sender's fault.
            log.exception("WeChat Pay notification could not be verified")
            return _fail(500, "TEMPORARILY_UNAVAILABLE")
        try:
            await on_result(result)
        except Exception as exc:
            # Not handled: un-claim the nonce so the redelivery is not taken for a replay.
            await verifier.release(request.headers)
            if isinstance(exc, RetryLater):
                log.warning(
                    "WeChat Pay notification deferred",
                    extra={"out_trade_no": result.out_trade_no, "detail": str(exc)},
                )
                return _fail(500, "RETRY_LATER")
            log.exception(
                "WeChat Pay notification handler failed",
                extra={"out_trade_no": result.out_trade_no},
            )
            return _fail(500, "INTERNAL")
        return web.Response(status=204)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post(path, notify)
    return app


async def start_webhook(
    listen: str,
    app: web.Application,
    reuse_port: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve `app` on `listen` (`HOST:PORT`, `[::1]:PORT`; port 0 picks a free one).

    Returns the runner (`await runner.cleanup()` stops it) and the port actually bound.
    `reuse_port`: SO_REUSEPORT, so that the worker processes of `serve --workers N` all bind
    the same port (the kernel spreads connections over them). `ssl_context`: HTTPS (the
    server's tls.ContextTLS.live, reloaded in place on SIGHUP).
    """
    try:
        host, port = split_listen(listen)
    except ValueError:
        raise ValueError(
            f"listen must be HOST:PORT (port 0: any free port), got {listen!r}"
        ) from None
    # A short shutdown grace: WeChat redelivers whatever a stop cuts off.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(
            runner, host, port, reuse_port=reuse_port or None, ssl_context=ssl_context
        )
        await site.start()
        bound: int = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound
