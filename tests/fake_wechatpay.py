"""A local fake of WeChat Pay API v3 for tests: order query server + notification builder.

It listens on 127.0.0.1 only, holds its own keys, and speaks the real wire format, so the
production client and verifier run unchanged against it::

    from fake_wechatpay import FakeWeChatPay

    async def test_something(redis_proc):
        async with FakeWeChatPay() as fake:
            fake.set_order("order-1", trade_state="SUCCESS", amount=100)
            client = fake.client()                 # a WeChatPayClient aimed at the fake
            result = await client.query("order-1")  # -> PaymentResult(status=PAID, ...)
            await client.aclose()
            assert len(fake.queries["order-1"]) == 1

            verifier = fake.verifier(RedisNonceGuard(redis.asyncio.Redis.from_url(redis_proc.url)))
            headers, body = fake.notification("order-1")         # signed + encrypted
            result = await verifier.verify(headers, body)
            status, text = await fake.deliver(webhook_url, fake.notification("order-1"))

Keys: one platform certificate (self-signed, `platform_serial`), one platform public key
(`public_key_id`, "PUB_KEY_ID_..."), one merchant key (`merchant_serial`), and the APIv3 key
(`api_v3_key`). `fake.platform_keys()` holds both platform keys, as a merchant would. The RSA
keys are generated once per test process (key generation is the slow part) and shared.

Orders: `fake.orders[out_trade_no]` is the transaction JSON the fake answers with (edit it
freely); `set_order(...)` fills in realistic defaults. Unknown orders answer 404
ORDER_NOT_EXIST, signed.

The query endpoint checks the merchant's `Authorization` header (mchid, serial, timestamp
within 300 s, RSA signature over `GET\\n<path?query>\\n<ts>\\n<nonce>\\n\\n`) and answers 401
SIGN_ERROR when it is wrong (`fake.auth_failures` counts those). Every query that passed the
check is recorded in `fake.queries[out_trade_no]` as `fake.clock()` (default time.monotonic,
the event loop's clock) BEFORE any failure knob applies, so a failed poll still counts as a
poll. Knobs for the query endpoint:

- `fake.fail(status=500, times=None)`: answer `status` (SYSTEM_ERROR) `times` times (None: until
  `heal()`);
- `fake.drop(times=None)`: close the connection without an answer. Note that aiohttp's client
  resends an idempotent GET once when the server hangs up, so one `client.query()` against a
  dropping fake records two queries, and `drop(times=1)` is invisible to the caller;
- `fake.delay_seconds`: sleep before answering (to exercise client timeouts);
- `fake.tamper_answers = True`: sign the answer, then change its body (signature invalid);
- `fake.unsigned_answers = True`: answer without the `Wechatpay-*` signature headers;
- `fake.answer_timestamp_offset`: seconds added to the answers' `Wechatpay-Timestamp`;
- `fake.answer_serial`: which platform key signs answers (`platform_serial` by default).
- `fake.heal()`: back to normal.

Notifications: `fake.notification(out_trade_no, ...)` -> `Notification(headers, body)` (a
NamedTuple, so `headers, body = ...` works) for the order's current state (created as
SUCCESS if absent). Knobs: `use_public_key` (sign with the PUB_KEY_ID_ key), `serial` (the
header's serial, e.g. one the merchant does not know), `timestamp` / `timestamp_offset`,
`nonce` (reuse one), `flip_tag` (corrupt the GCM tag BEFORE signing: the signature is valid,
decryption fails), `tamper_body` (change the body AFTER signing), `forge` (signed by a key
that is not WeChat's), `event_type`, and `transaction` (fields merged into the encrypted
transaction, e.g. a naive `success_time`).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, NamedTuple

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from yarl import URL

from stockhold.payments.wechatpay import (
    AUTH_SCHEMA,
    NonceGuard,
    NotificationVerifier,
    PlatformKeys,
    WeChatPayClient,
    certificate_serial,
    sign,
    signed_message,
)

CHINA = timezone(timedelta(hours=8))
AUTH_WINDOW_SECONDS = 300
_AUTH_PARAM = re.compile(r'(\w+)="([^"]*)"')


class Notification(NamedTuple):
    """What WeChat POSTs to the notify URL: headers and the JSON body."""

    headers: dict[str, str]
    body: bytes

    @property
    def nonce(self) -> str:
        """The `Wechatpay-Nonce` header."""
        return self.headers["Wechatpay-Nonce"]


@dataclass(frozen=True)
class _Keys:
    platform: rsa.RSAPrivateKey
    certificate: x509.Certificate
    public_key_mode: rsa.RSAPrivateKey
    merchant: rsa.RSAPrivateKey
    forger: rsa.RSAPrivateKey


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def _keys() -> _Keys:
    # Generated once per test process: RSA key generation is most of a fake's start-up cost.
    platform = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "Tenpay.com Root CA (fake)"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stockhold tests"),
        ]
    )
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(platform.public_key())
        # 159 bits: a 40-hex-digit serial like WeChat's, never with a leading zero digit.
        .serial_number(secrets.randbits(159) | (1 << 158))
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .sign(platform, hashes.SHA256())
    )
    return _Keys(platform, certificate, _new_key(), _new_key(), _new_key())


def _pem_public(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _json(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


class FakeWeChatPay:
    """A fake WeChat Pay v3 on 127.0.0.1 (see the module docstring for the whole tour)."""

    def __init__(
        self,
        mchid: str = "1900000001",
        appid: str = "wxd678efh567hg6787",
        api_v3_key: bytes | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        keys = _keys()
        self.mchid = mchid
        self.appid = appid
        self.api_v3_key = api_v3_key or secrets.token_hex(16).encode()  # 32 ASCII characters
        self.wall_clock = wall_clock  # timestamps in signatures and success_time
        self.clock = clock  # what `queries` records
        self.platform_private_key = keys.platform
        self.platform_certificate = keys.certificate
        self.platform_serial = certificate_serial(keys.certificate)
        self.public_key_private = keys.public_key_mode
        self.public_key_id = "PUB_KEY_ID_0119" + "".join(
            secrets.choice("0123456789") for _ in range(22)
        )
        self.merchant_private_key = keys.merchant
        self.merchant_serial = secrets.token_hex(20).upper()
        self._forger = keys.forger

        self.orders: dict[str, dict[str, Any]] = {}
        self.queries: defaultdict[str, list[float]] = defaultdict(list)
        self.auth_failures = 0
        self.answer_serial = self.platform_serial
        self.delay_seconds = 0.0
        self.tamper_answers = False
        self.unsigned_answers = False
        self.answer_timestamp_offset = 0
        self._fail_status: int | None = None
        self._fail_times: int | None = None
        self._drop_times: int | None = None
        self._dropping = False

        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> FakeWeChatPay:
        """Listen on 127.0.0.1 on a free port."""
        app = web.Application()
        app.router.add_get("/v3/pay/transactions/out-trade-no/{out_trade_no}", self._query)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeWeChatPay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:<port>`: the base_url to give WeChatPayClient."""
        return f"http://127.0.0.1:{self.port}"

    # -- what a merchant configures ------------------------------------------------------------

    @property
    def platform_certificate_pem(self) -> bytes:
        """The platform certificate (PEM), as downloaded from WeChat."""
        return self.platform_certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def platform_public_key_pem(self) -> bytes:
        """The platform public key (PEM) of "WeChat Pay public key" mode."""
        return _pem_public(self.public_key_private)

    @property
    def merchant_private_key_pem(self) -> bytes:
        """The merchant's private key (`apiclient_key.pem`)."""
        return self.merchant_private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def platform_keys(self, certificate: bool = True, public_key: bool = True) -> PlatformKeys:
        """A PlatformKeys holding the certificate and/or the PUB_KEY_ID_ key."""
        keys = PlatformKeys()
        if certificate:
            keys.add_certificate(self.platform_certificate_pem)
        if public_key:
            keys.add_public_key(self.public_key_id, self.platform_public_key_pem)
        return keys

    def client(self, **overrides: Any) -> WeChatPayClient:
        """A WeChatPayClient configured for this fake (the caller closes it: `aclose()`)."""
        kwargs: dict[str, Any] = {
            "mchid": self.mchid,
            "merchant_serial": self.merchant_serial,
            "merchant_private_key": self.merchant_private_key,
            "platform_keys": self.platform_keys(),
            "base_url": self.base_url,
            "timeout_seconds": 2.0,
            # The fake's clock: a fixed clock (tests/test_wechatpay.py) must not fall out of
            # the signature window however long the suite ran before this test.
            "clock": self.wall_clock,
        }
        kwargs.update(overrides)
        return WeChatPayClient(**kwargs)

    def verifier(self, nonce_guard: NonceGuard, **overrides: Any) -> NotificationVerifier:
        """A NotificationVerifier with this fake's platform keys and APIv3 key."""
        kwargs: dict[str, Any] = {
            "keys": self.platform_keys(),
            "api_v3_key": self.api_v3_key,
            "nonce_guard": nonce_guard,
        }
        kwargs.update(overrides)
        return NotificationVerifier(**kwargs)

    # -- orders --------------------------------------------------------------------------------

    def set_order(
        self,
        out_trade_no: str,
        trade_state: str = "SUCCESS",
        amount: int = 100,
        currency: str = "CNY",
        transaction_id: str | None = None,
        success_time: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Create or replace an order; returns its transaction JSON (also `orders[no]`).

        SUCCESS and REFUND orders get a transaction_id and a success_time (now, +08:00)
        unless given; other states get neither unless given.
        """
        paid = trade_state in ("SUCCESS", "REFUND")
        doc: dict[str, Any] = {
            "appid": self.appid,
            "mchid": self.mchid,
            "out_trade_no": out_trade_no,
            "trade_type": "NATIVE",
            "trade_state": trade_state,
            "trade_state_desc": trade_state.lower(),
            "bank_type": "OTHERS",
            "attach": "",
            "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
            "amount": {
                "total": amount,
                "payer_total": amount,
                "currency": currency,
                "payer_currency": currency,
            },
        }
        if transaction_id is None and paid:
            transaction_id = "4200" + "".join(secrets.choice("0123456789") for _ in range(24))
        if transaction_id:
            doc["transaction_id"] = transaction_id
        if success_time is None and paid:
            success_time = self.china_time()
        if success_time:
            doc["success_time"] = success_time
        doc.update(extra)
        self.orders[out_trade_no] = doc
        return doc

    def china_time(self, offset_seconds: float = 0) -> str:
        """Now (the fake's wall clock) as WeChat writes times: `2026-11-26T22:28:16+08:00`."""
        moment = datetime.fromtimestamp(self.wall_clock() + offset_seconds, CHINA)
        return moment.isoformat(timespec="seconds")

    # -- failure knobs -------------------------------------------------------------------------

    def fail(self, status: int = 500, times: int | None = None) -> None:
        """Answer queries with HTTP `status` `times` times (None: until heal())."""
        self._fail_status, self._fail_times = status, times

    def drop(self, times: int | None = None) -> None:
        """Close query connections without answering, `times` times (None: until heal())."""
        self._dropping, self._drop_times = True, times

    def heal(self) -> None:
        """Undo every failure knob."""
        self._fail_status = self._fail_times = self._drop_times = None
        self._dropping = False
        self.delay_seconds = 0.0
        self.tamper_answers = self.unsigned_answers = False
        self.answer_timestamp_offset = 0
        self.answer_serial = self.platform_serial

    # -- notifications -------------------------------------------------------------------------

    def _signing_key(self, serial: str) -> rsa.RSAPrivateKey:
        if serial == self.public_key_id:
            return self.public_key_private
        return self.platform_private_key

    def signature_headers(
        self,
        body: bytes,
        serial: str | None = None,
        timestamp: int | None = None,
        nonce: str | None = None,
        key: rsa.RSAPrivateKey | None = None,
    ) -> dict[str, str]:
        """The `Wechatpay-*` headers signing `body` (answers and notifications alike)."""
        serial = serial or self.platform_serial
        ts = str(int(self.wall_clock()) if timestamp is None else timestamp)
        nonce = nonce or secrets.token_hex(16).upper()
        signer = key or self._signing_key(serial)
        return {
            "Wechatpay-Timestamp": ts,
            "Wechatpay-Nonce": nonce,
            "Wechatpay-Signature": sign(signer, signed_message(ts, nonce, body)),
            "Wechatpay-Serial": serial,
            "Wechatpay-Signature-Type": AUTH_SCHEMA,
        }

    def notification(
        self,
        out_trade_no: str,
        *,
        event_type: str = "TRANSACTION.SUCCESS",
        use_public_key: bool = False,
        serial: str | None = None,
        timestamp: int | None = None,
        timestamp_offset: int = 0,
        nonce: str | None = None,
        flip_tag: bool = False,
        tamper_body: bool = False,
        forge: bool = False,
        transaction: Mapping[str, Any] | None = None,
    ) -> Notification:
        """A signed, encrypted payment notification for the order's current state."""
        if out_trade_no not in self.orders:
            self.set_order(out_trade_no)
        plaintext = _json({**self.orders[out_trade_no], **(transaction or {})})
        gcm_nonce = secrets.token_hex(6)  # WeChat uses 12 characters
        associated = "transaction"
        sealed = bytearray(
            AESGCM(self.api_v3_key).encrypt(gcm_nonce.encode(), plaintext, associated.encode())
        )
        if flip_tag:
            sealed[-1] ^= 0x01  # the last byte belongs to the 16-byte tag
        body = _json(
            {
                "id": str(uuid.uuid4()),
                "create_time": self.china_time(),
                "resource_type": "encrypt-resource",
                "event_type": event_type,
                "summary": "支付成功",
                "resource": {
                    "original_type": "transaction",
                    "algorithm": "AEAD_AES_256_GCM",
                    "ciphertext": base64.b64encode(bytes(sealed)).decode(),
                    "associated_data": associated,
                    "nonce": gcm_nonce,
                },
            }
        )
        signing_serial = self.public_key_id if use_public_key else self.platform_serial
        if timestamp is None:
            timestamp = int(self.wall_clock())
        headers = self.signature_headers(
            body,
            serial=signing_serial,
            timestamp=timestamp + timestamp_offset,
            nonce=nonce,
            key=self._forger if forge else None,
        )
        if serial is not None:
            headers["Wechatpay-Serial"] = serial
        headers["Content-Type"] = "application/json"
        if tamper_body:
            body = body.replace(b'"summary"', b'"Summary"', 1)
        return Notification(headers, body)

    async def deliver(self, url: str, notification: Notification) -> tuple[int, str]:
        """POST a notification to a webhook on 127.0.0.1; returns (HTTP status, body text)."""
        if URL(url).host != "127.0.0.1":
            raise ValueError("the fake only delivers to 127.0.0.1")
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                url,
                data=notification.body,
                headers=notification.headers,
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp,
        ):
            return resp.status, await resp.text()

    # -- the query endpoint --------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> str | None:
        # None if the merchant's signature is right, else why not.
        header = request.headers.get("Authorization", "")
        schema, _, params = header.partition(" ")
        if schema != AUTH_SCHEMA:
            return "schema"
        fields = dict(_AUTH_PARAM.findall(params))
        if fields.get("mchid") != self.mchid or request.query.get("mchid") != self.mchid:
            return "mchid"
        if fields.get("serial_no") != self.merchant_serial:
            return "serial_no"
        ts, nonce = fields.get("timestamp", ""), fields.get("nonce_str", "")
        if not ts.isdigit() or abs(self.wall_clock() - int(ts)) > AUTH_WINDOW_SECONDS:
            return "timestamp"
        message = signed_message(request.method, request.raw_path, ts, nonce, b"")
        try:
            self.merchant_private_key.public_key().verify(
                base64.b64decode(fields.get("signature", ""), validate=True),
                message,
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (ValueError, InvalidSignature):
            return "signature"
        return None

    def _answer(self, status: int, doc: Any) -> web.Response:
        body = _json(doc)
        headers = {}
        if not self.unsigned_answers:
            ts = int(self.wall_clock()) + self.answer_timestamp_offset
            headers = self.signature_headers(body, self.answer_serial, timestamp=ts)
        if self.tamper_answers:
            body = body.replace(b"}", b',"x":1}', 1) if body.endswith(b"}") else body + b" "
        headers["Request-ID"] = secrets.token_hex(16)
        return web.Response(
            status=status, body=body, headers=headers, content_type="application/json"
        )

    async def _query(self, request: web.Request) -> web.StreamResponse:
        why = self._authorized(request)
        if why is not None:
            self.auth_failures += 1
            return self._answer(401, {"code": "SIGN_ERROR", "message": f"bad {why}"})
        out_trade_no = request.match_info["out_trade_no"]
        self.queries[out_trade_no].append(self.clock())
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        if self._dropping:
            if self._drop_times is not None:
                self._drop_times -= 1
                self._dropping = self._drop_times > 0
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=204)  # never reaches the client
        if self._fail_status is not None:
            status = self._fail_status
            if self._fail_times is not None:
                self._fail_times -= 1
                if self._fail_times <= 0:
                    self._fail_status = self._fail_times = None
            return self._answer(status, {"code": "SYSTEM_ERROR", "message": "系统错误"})
        order = self.orders.get(out_trade_no)
        if order is None:
            return self._answer(404, {"code": "ORDER_NOT_EXIST", "message": "订单不存在"})
        return self._answer(200, order)
