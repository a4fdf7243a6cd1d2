"""WeChat Pay API v3: notification verifier, resource decryption, signed order-query client.

What is checked, in this order, before a notification's result is believed (docs/wechatpay.md):

1. the four `Wechatpay-*` headers are there and well formed;
2. `Wechatpay-Timestamp` is within `window_seconds` (300) of this host's clock;
3. `Wechatpay-Serial` names a platform key we hold: a platform certificate (by its serial
   number, uppercase hex) or a platform public key (`PUB_KEY_ID_...`);
4. `Wechatpay-Signature` is RSA-SHA256 (PKCS#1 v1.5) over `timestamp\\nnonce\\nbody\\n`;
5. only then is the nonce claimed in Redis (SET NX EX), so a forged request cannot burn a
   genuine nonce, and a replay inside the window is refused;
6. `resource` is decrypted with AEAD_AES_256_GCM and the APIv3 key, and the transaction in it
   parsed (`success_time` must carry an offset).

The order-query client signs its requests with the merchant key
(`WECHATPAY2-SHA256-RSA2048`) and verifies the platform's signature on every 2xx answer the
same way as a notification's, so a forged "SUCCESS" is never believed.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol
from urllib.parse import quote

import aiohttp
import orjson
import redis.asyncio
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from yarl import URL

from stockhold.constants import DEFAULT_KEY_PREFIX, MAX_WECHATPAY_NONCE, WECHATPAY_NONCE
from stockhold.errors import DomainError
from stockhold.payments.provider import PaymentResult, PaymentStatus, ProviderError
from stockhold.timeparse import parse_rfc3339

log = logging.getLogger(__name__)

PROVIDER: Final = "wechatpay"
DEFAULT_BASE_URL: Final = "https://api.mch.weixin.qq.com"
AUTH_SCHEMA: Final = "WECHATPAY2-SHA256-RSA2048"
PUBLIC_KEY_ID_PREFIX: Final = "PUB_KEY_ID_"
ALGORITHM: Final = "AEAD_AES_256_GCM"
DEFAULT_WINDOW_SECONDS: Final = 300

HEADER_TIMESTAMP: Final = "Wechatpay-Timestamp"
HEADER_NONCE: Final = "Wechatpay-Nonce"
HEADER_SIGNATURE: Final = "Wechatpay-Signature"
HEADER_SERIAL: Final = "Wechatpay-Serial"
SIGNED_HEADERS: Final = (HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE, HEADER_SERIAL)

# WeChat trade_state -> stockhold. REFUND: the order was paid (a refund comes later and is
# not a reason to give the stock back by itself). NOTPAY/USERPAYING: nothing to do yet.
TRADE_STATES: Final[Mapping[str, PaymentStatus]] = {
    "SUCCESS": PaymentStatus.PAID,
    "REFUND": PaymentStatus.PAID,
    "CLOSED": PaymentStatus.CLOSED,
    "REVOKED": PaymentStatus.CLOSED,
    "PAYERROR": PaymentStatus.FAILED,
    "NOTPAY": PaymentStatus.PENDING,
    "USERPAYING": PaymentStatus.PENDING,
}

# WeChat sends 32 alphanumerics; the bound and the alphabet keep a Redis key sane whatever
# arrives (the nonce becomes part of a key name).
_NONCE_RE: Final = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_WECHATPAY_NONCE}}}", re.ASCII)
_TIMESTAMP_RE: Final = re.compile(r"\d{1,12}", re.ASCII)
_MAX_SERIAL: Final = 64
# RSA-4096 signatures are 684 base64 characters; anything much longer is not a signature.
_MAX_SIGNATURE: Final = 1024
# The nonce must outlive every moment at which its (signed, fixed) timestamp is still
# accepted: a nonce first seen at timestamp - window stays replayable until timestamp +
# window, so twice the window, plus a margin for clock differences between our processes.
_NONCE_TTL_MARGIN: Final = 60
# Order-query answers are a few hundred bytes; bound what we read from the network.
MAX_RESPONSE_BYTES: Final = 1 << 20
_TOKEN_RE: Final = re.compile(r"[0-9A-Za-z_-]{1,64}", re.ASCII)
# WeChat's out_trade_no: 6-32 of [0-9A-Za-z_-|*]; we allow 1-32 so tests may use short ones.
_OUT_TRADE_NO_RE: Final = re.compile(r"[0-9A-Za-z_\-|*]{1,32}", re.ASCII)


class VerificationReason(StrEnum):
    """Why a notification was refused (the webhook's FAIL message carries it)."""

    MISSING_HEADER = "MISSING_HEADER"
    UNKNOWN_SERIAL = "UNKNOWN_SERIAL"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    STALE_TIMESTAMP = "STALE_TIMESTAMP"
    REPLAYED_NONCE = "REPLAYED_NONCE"
    DECRYPT_FAILED = "DECRYPT_FAILED"
    BAD_PAYLOAD = "BAD_PAYLOAD"
    # Genuine and verified, but not a TRANSACTION.* event: acknowledge it and do nothing.
    IGNORED_EVENT = "IGNORED_EVENT"


class VerificationError(Exception):
    """A notification (or a signed response) that must not be believed; `.reason` says why."""

    def __init__(self, reason: VerificationReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else str(reason))


# -- keys --------------------------------------------------------------------------------------


def _public_key(key: object, what: str) -> rsa.RSAPublicKey:
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"{what}: WeChat Pay v3 signs with RSA; got {type(key).__name__}")
    return key


def load_private_key(pem: bytes) -> rsa.RSAPrivateKey:
    """The merchant's RSA private key (`apiclient_key.pem`, unencrypted PKCS#8 or PKCS#1)."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"merchant key: WeChat Pay v3 needs RSA; got {type(key).__name__}")
    return key


def certificate_serial(cert: x509.Certificate) -> str:
    """A certificate's serial number as WeChat writes it in `Wechatpay-Serial` (uppercase hex)."""
    return format(cert.serial_number, "X")


def _normalize_serial(serial: str) -> str:
    # Certificate serials are hex; compare them as numbers so case and leading zeros do not
    # matter. Public key ids are opaque strings.
    if serial.startswith(PUBLIC_KEY_ID_PREFIX):
        return serial
    try:
        return format(int(serial, 16), "X")
    except ValueError:
        return serial


@dataclass(frozen=True, slots=True)
class _PlatformKey:
    key: rsa.RSAPublicKey
    not_before: float | None  # seconds since the epoch; None: no validity period (public key)
    not_after: float | None


class PlatformKeys:
    """WeChat Pay platform keys by serial: what `Wechatpay-Serial` names, the key to verify.

    Hold the current and the next key during a rotation: WeChat picks which one signs.
    """

    def __init__(self) -> None:
        self._keys: dict[str, _PlatformKey] = {}

    def add_certificate(self, pem: bytes) -> tuple[str, ...]:
        """Add every platform certificate in a PEM blob; returns their serials (uppercase hex).

        A certificate's key is only used within its validity period.
        """
        certs = x509.load_pem_x509_certificates(pem)
        serials = []
        for cert in certs:
            serial = certificate_serial(cert)
            self._keys[serial] = _PlatformKey(
                _public_key(cert.public_key(), f"certificate {serial}"),
                cert.not_valid_before_utc.timestamp(),
                cert.not_valid_after_utc.timestamp(),
            )
            serials.append(serial)
        return tuple(serials)

    def add_public_key(self, key_id: str, pem: bytes) -> str:
        """Add a platform public key ("WeChat Pay public key" mode), id `PUB_KEY_ID_...`."""
        if not key_id.startswith(PUBLIC_KEY_ID_PREFIX) or len(key_id) > _MAX_SERIAL:
            raise ValueError(f"a platform public key id starts with {PUBLIC_KEY_ID_PREFIX}")
        key = serialization.load_pem_public_key(pem)
        self._keys[key_id] = _PlatformKey(_public_key(key, key_id), None, None)
        return key_id

    @classmethod
    def from_files(
        cls,
        certificates: Iterable[str | os.PathLike[str]] = (),
        public_keys: Mapping[str, str | os.PathLike[str]] | None = None,
    ) -> PlatformKeys:
        """Load platform certificates (PEM files) and public keys (`{key_id: PEM file}`)."""
        keys = cls()
        for path in certificates:
            with open(path, "rb") as f:
                keys.add_certificate(f.read())
        for key_id, path in (public_keys or {}).items():
            with open(path, "rb") as f:
                keys.add_public_key(key_id, f.read())
        if not keys._keys:
            raise ValueError("no WeChat Pay platform certificate or public key given")
        return keys

    @property
    def serials(self) -> tuple[str, ...]:
        """The serials / key ids held."""
        return tuple(self._keys)

    def __contains__(self, serial: object) -> bool:
        return isinstance(serial, str) and _normalize_serial(serial) in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, serial: str, now: float | None = None) -> rsa.RSAPublicKey | None:
        """The key for `serial`, or None if unknown (or, given `now`, outside its validity)."""
        entry = self._keys.get(_normalize_serial(serial))
        if entry is None:
            return None
        if now is not None and (
            (entry.not_before is not None and now < entry.not_before)
            or (entry.not_after is not None and now > entry.not_after)
        ):
            return None
        return entry.key


# -- signatures --------------------------------------------------------------------------------


def sign(private_key: rsa.RSAPrivateKey, message: bytes) -> str:
    """base64(RSA-SHA256 PKCS#1 v1.5 signature): what WeChat Pay v3 puts in its signatures."""
    raw = private_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(raw).decode("ascii")


def signed_message(*parts: str | bytes) -> bytes:
    """WeChat's signed string: every part followed by `\\n` (the body last, even if empty)."""
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\n" for p in parts)


@dataclass(frozen=True, slots=True)
class SignedHeaders:
    """The four `Wechatpay-*` headers of a notification or an API answer, well formed."""

    timestamp: int
    nonce: str
    signature: str
    serial: str


_SIGNED_LOWER: Final = frozenset(h.lower() for h in SIGNED_HEADERS)


def _signed_header_values(headers: Mapping[str, str]) -> dict[str, str]:
    # Header names are case-insensitive. A signature header repeated with two values is
    # ambiguous (which one did the signer mean?): refuse it rather than pick one. A multidict
    # (aiohttp's request.headers) yields every repetition from items().
    out: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if key not in _SIGNED_LOWER:
            continue
        if key in out and out[key] != value:
            raise VerificationError(VerificationReason.BAD_PAYLOAD, f"{name} given twice")
        out[key] = value
    return out


def parse_signed_headers(headers: Mapping[str, str]) -> SignedHeaders:
    """The `Wechatpay-*` headers, or VerificationError(MISSING_HEADER / BAD_PAYLOAD)."""
    lower = _signed_header_values(headers)
    values = {}
    for name in SIGNED_HEADERS:
        value = lower.get(name.lower(), "").strip()
        if not value:
            raise VerificationError(VerificationReason.MISSING_HEADER, name)
        values[name] = value
    timestamp, nonce = values[HEADER_TIMESTAMP], values[HEADER_NONCE]
    if not _TIMESTAMP_RE.fullmatch(timestamp):
        raise VerificationError(VerificationReason.BAD_PAYLOAD, f"{HEADER_TIMESTAMP} not digits")
    if not _NONCE_RE.fullmatch(nonce):
        raise VerificationError(
            VerificationReason.BAD_PAYLOAD,
            f"{HEADER_NONCE} must be 1-{MAX_WECHATPAY_NONCE} of [A-Za-z0-9_-]",
        )
    if len(values[HEADER_SERIAL]) > _MAX_SERIAL:
        raise VerificationError(VerificationReason.UNKNOWN_SERIAL, "serial too long")
    return SignedHeaders(int(timestamp), nonce, values[HEADER_SIGNATURE], values[HEADER_SERIAL])


def verify_signed(
    keys: PlatformKeys,
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    window_seconds: float = DEFAULT_WINDOW_SECONDS,
) -> SignedHeaders:
    """Check headers, timestamp window, serial and RSA signature over `ts\\nnonce\\nbody\\n`.

    Shared by notifications and API answers; raises VerificationError with the first failure.
    """
    signed = parse_signed_headers(headers)
    skew = now - signed.timestamp
    if abs(skew) > window_seconds:
        raise VerificationError(
            VerificationReason.STALE_TIMESTAMP,
            f"timestamp {signed.timestamp} is {skew:+.0f} s from now (window {window_seconds} s)",
        )
    key = keys.get(signed.serial, now)
    if key is None:
        raise VerificationError(VerificationReason.UNKNOWN_SERIAL, signed.serial[:_MAX_SERIAL])
    try:
        # WeChat probes merchants with deliberately bad signatures (`WECHATPAY/SIGNTEST/...`),
        # which are not base64: they must fail here, like any other bad signature.
        if len(signed.signature) > _MAX_SIGNATURE:
            raise ValueError("too long")
        raw = base64.b64decode(signed.signature, validate=True)
        key.verify(
            raw,
            signed_message(str(signed.timestamp), signed.nonce, body),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except (ValueError, binascii.Error, InvalidSignature):
        raise VerificationError(VerificationReason.BAD_SIGNATURE, signed.serial) from None
    return signed


# -- replay guard ------------------------------------------------------------------------------


class NonceGuard(Protocol):
    """Remembers the nonces of accepted notifications for a while."""

    async def claim(self, nonce: str, ttl_seconds: int) -> bool:
        """Record `nonce` for `ttl_seconds`; True the first time, False if already recorded."""
        ...

    async def release(self, nonce: str) -> None:
        """Forget `nonce`: its notification was refused or not handled, so a redelivery with
        the same nonce must not read as a replay."""
        ...


def nonce_key(nonce: str, key_prefix: str = DEFAULT_KEY_PREFIX) -> str:
    """The Redis key of a notification nonce; VerificationError(BAD_PAYLOAD) for odd nonces."""
    if not _NONCE_RE.fullmatch(nonce):
        raise VerificationError(VerificationReason.BAD_PAYLOAD, "malformed nonce")
    return f"{key_prefix}:{WECHATPAY_NONCE}:{nonce}"


class RedisNonceGuard:
    """The replay guard in Redis: `SET <prefix>:{meta}:wxnonce:<nonce> 1 NX EX ttl`.

    Shared by every stockhold process, so a replay sent to another process is refused too.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis | redis.asyncio.RedisCluster,
        key_prefix: str = DEFAULT_KEY_PREFIX,
    ) -> None:
        self._client = client
        self._prefix = key_prefix

    async def claim(self, nonce: str, ttl_seconds: int) -> bool:
        """True if this is the first claim of `nonce` within `ttl_seconds`."""
        key = nonce_key(nonce, self._prefix)
        return bool(await self._client.set(key, "1", nx=True, ex=max(1, int(ttl_seconds))))

    async def release(self, nonce: str) -> None:
        """Delete the nonce's key."""
        await self._client.delete(nonce_key(nonce, self._prefix))


# -- transactions ------------------------------------------------------------------------------


class _Malformed(ValueError):
    pass


def _str(doc: Mapping[str, Any], name: str, required: bool = True, limit: int = 128) -> str:
    value = doc.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value) or len(value) > limit:
        raise _Malformed(f"{name}: expected a string of 1..{limit} characters")
    return value


def payment_result(transaction: object) -> PaymentResult:
    """A WeChat Pay transaction (notification resource or query answer) -> PaymentResult.

    Raises ValueError when a field is missing or malformed, or `success_time` is naive.
    """
    if not isinstance(transaction, dict):
        raise _Malformed("transaction: expected a JSON object")
    out_trade_no = _str(transaction, "out_trade_no")
    state = _str(transaction, "trade_state", limit=32)
    status = TRADE_STATES.get(state)
    if status is None:
        raise _Malformed(f"trade_state: unknown value {state!r}")
    transaction_id = _str(transaction, "transaction_id", required=False)
    if status is PaymentStatus.PAID and not transaction_id:
        raise _Malformed("transaction_id: required when paid")
    amount = transaction.get("amount")
    if amount is None and status is not PaymentStatus.PAID:
        # An unpaid or closed order's answer may carry no amount; 0 then, never for PAID.
        amount = {"total": 0}
    if not isinstance(amount, dict):
        raise _Malformed("amount: expected an object")
    total = amount.get("total")
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise _Malformed("amount.total: expected a non-negative integer (fen)")
    # WeChat Pay mainland merchants settle in CNY; the field is optional in some answers.
    currency = _str(amount, "currency", required=False, limit=8) or "CNY"
    paid_at_ms = None
    success_time = transaction.get("success_time")
    if success_time not in (None, ""):
        try:
            paid_at_ms = parse_rfc3339(success_time, "success_time")
        except DomainError as exc:
            raise _Malformed(exc.message) from None
    return PaymentResult(
        provider=PROVIDER,
        out_trade_no=out_trade_no,
        transaction_id=transaction_id,
        status=status,
        amount=total,
        currency=currency,
        paid_at_ms=paid_at_ms,
    )


def decrypt_resource(api_v3_key: bytes, resource: object) -> bytes:
    """Open a notification's `resource` (AEAD_AES_256_GCM with the APIv3 key): the plaintext.

    Raises VerificationError(DECRYPT_FAILED) for another algorithm, bad base64, a wrong key or
    a ciphertext, tag, nonce or associated_data that was changed.
    """
    fail = VerificationReason.DECRYPT_FAILED
    if not isinstance(resource, dict):
        raise VerificationError(VerificationReason.BAD_PAYLOAD, "resource: expected an object")
    if resource.get("algorithm") != ALGORITHM:
        raise VerificationError(fail, f"algorithm must be {ALGORITHM}")
    ciphertext, nonce = resource.get("ciphertext"), resource.get("nonce")
    associated = resource.get("associated_data") or ""
    if not (isinstance(ciphertext, str) and isinstance(nonce, str) and isinstance(associated, str)):
        raise VerificationError(fail, "ciphertext, nonce and associated_data must be strings")
    try:
        # The ciphertext is base64 of ciphertext || 16-byte tag, which is what AESGCM takes.
        raw = base64.b64decode(ciphertext, validate=True)
        return AESGCM(api_v3_key).decrypt(nonce.encode(), raw, associated.encode())
    except (binascii.Error, ValueError, InvalidTag):
        raise VerificationError(fail, "AEAD_AES_256_GCM authentication failed") from None


class NotificationVerifier:
    """Verifies and opens WeChat Pay v3 payment notifications (see the module docstring)."""

    def __init__(
        self,
        keys: PlatformKeys,
        api_v3_key: bytes,
        nonce_guard: NonceGuard,
        window_seconds: int = DEFAULT_WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(api_v3_key) != 32:
            raise ValueError("the APIv3 key is 32 bytes (32 ASCII characters)")
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        self._keys = keys
        self._api_v3_key = bytes(api_v3_key)
        self._guard = nonce_guard
        self._window = window_seconds
        self._clock = clock
        self.nonce_ttl_seconds = 2 * window_seconds + _NONCE_TTL_MARGIN

    async def verify(self, headers: Mapping[str, str], body: bytes) -> PaymentResult:
        """The PaymentResult of a genuine, fresh TRANSACTION.* notification.

        Raises VerificationError; a nonce stays claimed only by a notification that passed
        every check (or a genuine non-transaction event, reason IGNORED_EVENT).
        """
        signed = verify_signed(self._keys, headers, body, self._clock(), self._window)
        if not await self._guard.claim(signed.nonce, self.nonce_ttl_seconds):
            raise VerificationError(VerificationReason.REPLAYED_NONCE, signed.nonce)
        try:
            return self._open(body)
        except VerificationError as exc:
            if exc.reason is not VerificationReason.IGNORED_EVENT:
                await self._forget(signed.nonce)
            raise
        except Exception:
            await self._forget(signed.nonce)
            raise

    async def release(self, headers: Mapping[str, str]) -> None:
        """Un-claim the nonce of a notification that `verify` accepted but that could not be
        handled, so that WeChat's redelivery is not refused as a replay."""
        await self._forget(parse_signed_headers(headers).nonce)

    async def _forget(self, nonce: str) -> None:
        try:
            await self._guard.release(nonce)
        except Exception:
            # The key expires by itself; a redelivery with a fresh nonce passes anyway.
            log.warning("could not release a WeChat Pay nonce", exc_info=True)

    def _open(self, body: bytes) -> PaymentResult:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise VerificationError(VerificationReason.BAD_PAYLOAD, "body is not JSON") from None
        if not isinstance(doc, dict):
            raise VerificationError(VerificationReason.BAD_PAYLOAD, "body: expected an object")
        event_type = doc.get("event_type")
        if not isinstance(event_type, str):
            raise VerificationError(VerificationReason.BAD_PAYLOAD, "event_type missing")
        if not event_type.startswith("TRANSACTION."):
            raise VerificationError(VerificationReason.IGNORED_EVENT, event_type[:64])
        plaintext = decrypt_resource(self._api_v3_key, doc.get("resource"))
        try:
            return payment_result(orjson.loads(plaintext))
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError too
            raise VerificationError(VerificationReason.BAD_PAYLOAD, str(exc)) from None


# -- the order-query client --------------------------------------------------------------------


class WeChatPayClient:
    """WeChat Pay v3 order query (`GET /v3/pay/transactions/out-trade-no/{no}`), signed.

    Talks only to `base_url`. Requests carry `Authorization: WECHATPAY2-SHA256-RSA2048 ...`
    signed with the merchant key; 2xx answers must carry a valid platform signature.
    """

    name: str = PROVIDER

    def __init__(
        self,
        mchid: str,
        merchant_serial: str,
        merchant_private_key: rsa.RSAPrivateKey | bytes,
        platform_keys: PlatformKeys,
        base_url: str = DEFAULT_BASE_URL,
        session: aiohttp.ClientSession | None = None,
        timeout_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        base = URL(base_url)
        if base.scheme not in ("https", "http") or not base.host or base.query_string:
            raise ValueError(f"base_url must be http(s)://host[:port], got {base_url!r}")
        # Both go verbatim into the Authorization header: no quotes, commas or newlines.
        if not _TOKEN_RE.fullmatch(mchid) or not _TOKEN_RE.fullmatch(merchant_serial):
            raise ValueError("mchid and merchant_serial: 1-64 of [0-9A-Za-z_-]")
        self.mchid = mchid
        self.merchant_serial = merchant_serial
        self._key = (
            load_private_key(merchant_private_key)
            if isinstance(merchant_private_key, bytes)
            else merchant_private_key
        )
        self._platform_keys = platform_keys
        self._base_url = base_url.rstrip("/")
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._clock = clock

    def authorization(self, method: str, path_qs: str, body: bytes = b"") -> str:
        """The `Authorization` header value for one request (`path_qs`: path and query)."""
        timestamp = str(int(self._clock()))
        nonce = secrets.token_hex(16).upper()
        message = signed_message(method.upper(), path_qs, timestamp, nonce, body)
        return (
            f'{AUTH_SCHEMA} mchid="{self.mchid}",nonce_str="{nonce}",'
            f'signature="{sign(self._key, message)}",timestamp="{timestamp}",'
            f'serial_no="{self.merchant_serial}"'
        )

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Created on first use: a ClientSession belongs to the running event loop.
            self._session = aiohttp.ClientSession()
        return self._session

    async def query(self, out_trade_no: str) -> PaymentResult | None:
        """The order's payment at WeChat Pay; None if WeChat answers ORDER_NOT_EXIST.

        Raises ProviderError on network failures, timeouts, non-2xx answers and answers
        whose platform signature is missing or wrong; ValueError for a malformed order number.
        """
        if not _OUT_TRADE_NO_RE.fullmatch(out_trade_no):
            raise ValueError("out_trade_no: 1-32 of [0-9A-Za-z_-|*]")
        path_qs = (
            f"/v3/pay/transactions/out-trade-no/{quote(out_trade_no, safe='')}"
            f"?mchid={quote(self.mchid, safe='')}"
        )
        # encoded=True: the URL is sent exactly as signed, never re-quoted.
        url = URL(self._base_url + path_qs, encoded=True)
        headers = {
            "Authorization": self.authorization("GET", url.raw_path_qs),
            "Accept": "application/json",
            "User-Agent": "stockhold-wechatpay/1",
        }
        try:
            async with self._get_session().get(
                url, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as resp:
                status = resp.status
                body = await _read_bounded(resp)
                resp_headers = resp.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderError(f"WeChat Pay query failed: {type(exc).__name__}: {exc}") from exc
        if 200 <= status < 300:
            self._check_signature(resp_headers, body, required=True)
            return self._result(out_trade_no, body)
        code, message = _error_code(body)
        if status == 404 and code == "ORDER_NOT_EXIST":
            # WeChat does not promise signatures on error answers; when there is one it must
            # be right. An unsigned "unknown order" can at worst delay a commit, never cause one.
            self._check_signature(resp_headers, body, required=False)
            return None
        raise ProviderError(f"WeChat Pay answered HTTP {status} {code}: {message}"[:300])

    def _check_signature(self, headers: Mapping[str, str], body: bytes, required: bool) -> None:
        lower = {k.lower() for k in headers}
        if not required and not any(h.lower() in lower for h in SIGNED_HEADERS):
            return
        try:
            verify_signed(self._platform_keys, headers, body, self._clock())
        except VerificationError as exc:
            log.warning("WeChat Pay answer refused", extra={"reason": str(exc.reason)})
            raise ProviderError(f"WeChat Pay answer not trusted: {exc}") from None

    def _result(self, out_trade_no: str, body: bytes) -> PaymentResult:
        try:
            doc = orjson.loads(body)
            result = payment_result(doc)
        except ValueError as exc:
            raise ProviderError(f"WeChat Pay answer malformed: {exc}") from None
        if result.out_trade_no != out_trade_no or doc.get("mchid", self.mchid) != self.mchid:
            raise ProviderError("WeChat Pay answered for another order or merchant")
        return result

    async def aclose(self) -> None:
        """Close the HTTP session if this client created it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> WeChatPayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    if resp.content_length is not None and resp.content_length > MAX_RESPONSE_BYTES:
        raise ProviderError(f"WeChat Pay answer too large ({resp.content_length} bytes)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise ProviderError("WeChat Pay answer too large")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_code(body: bytes) -> tuple[str, str]:
    # WeChat error answers: {"code": "ORDER_NOT_EXIST", "message": "..."}.
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", body[:100].decode("utf-8", "replace")
    if not isinstance(doc, dict):
        return "", ""
    return str(doc.get("code", ""))[:64], str(doc.get("message", ""))[:200]
