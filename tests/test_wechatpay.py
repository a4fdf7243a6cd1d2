"""WeChat Pay v3 adapter: notification verifier, webhook and order-query client, against the
local fake (tests/fake_wechatpay.py) on 127.0.0.1 and a private Redis for the nonce guard."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import orjson
import pytest
import redis.asyncio
from fake_wechatpay import FakeWeChatPay, Notification
from multidict import CIMultiDict
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from stockhold.constants import WECHATPAY_NONCE
from stockhold.payments import PaymentResult, PaymentStatus, ProviderError, RetryLater
from stockhold.payments.webhook import make_app, start_webhook
from stockhold.payments.wechatpay import (
    TRADE_STATES,
    NotificationVerifier,
    PlatformKeys,
    RedisNonceGuard,
    VerificationError,
    VerificationReason,
    nonce_key,
    payment_result,
)
from stockhold.timeparse import parse_rfc3339

NOW = float(int(time.time()))  # a fixed, whole-second clock: window edges are exact
NONCE_PATTERN = f"sh:{WECHATPAY_NONCE}:*"


@pytest.fixture
async def fake() -> AsyncIterator[FakeWeChatPay]:
    async with FakeWeChatPay(wall_clock=lambda: NOW) as f:
        yield f


@pytest.fixture
async def rds(redis_proc: Any) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_proc.url)
    yield client
    await client.aclose()


@pytest.fixture
def verifier(fake: FakeWeChatPay, rds: redis.asyncio.Redis) -> NotificationVerifier:
    return fake.verifier(RedisNonceGuard(rds), clock=lambda: NOW)


async def nonce_keys(rds: redis.asyncio.Redis) -> list[bytes]:
    keys = await rds.keys(NONCE_PATTERN)
    return sorted(k if isinstance(k, bytes) else k.encode() for k in keys)


async def refused(verifier: NotificationVerifier, notification: Notification) -> VerificationReason:
    with pytest.raises(VerificationError) as info:
        await verifier.verify(*notification)
    return info.value.reason


# -- notifications -----------------------------------------------------------------------------


async def test_a_valid_notification_decrypts_to_the_payment_result(
    fake: FakeWeChatPay, verifier: NotificationVerifier, rds: redis.asyncio.Redis
) -> None:
    order = fake.set_order("order-1001", amount=4200, success_time="2026-11-26T22:28:16+08:00")
    note = fake.notification("order-1001")
    assert note.headers["Wechatpay-Serial"] == fake.platform_serial

    result = await verifier.verify(*note)

    assert result == PaymentResult(
        provider="wechatpay",
        out_trade_no="order-1001",
        transaction_id=order["transaction_id"],
        status=PaymentStatus.PAID,
        amount=4200,
        currency="CNY",
        paid_at_ms=parse_rfc3339("2026-11-26T14:28:16Z"),
    )
    key = nonce_key(note.nonce).encode()
    assert await nonce_keys(rds) == [key]
    assert 600 < await rds.ttl(key) <= verifier.nonce_ttl_seconds


async def test_a_public_key_mode_notification_verifies(
    fake: FakeWeChatPay, rds: redis.asyncio.Redis
) -> None:
    # A merchant in "WeChat Pay public key" mode holds only the PUB_KEY_ID_ key.
    verifier = fake.verifier(
        RedisNonceGuard(rds), keys=fake.platform_keys(certificate=False), clock=lambda: NOW
    )
    note = fake.notification("order-1", use_public_key=True)
    assert note.headers["Wechatpay-Serial"].startswith("PUB_KEY_ID_")
    assert (await verifier.verify(*note)).status is PaymentStatus.PAID
    # ...and a certificate-signed one is then an unknown serial.
    assert await refused(verifier, fake.notification("order-1")) is (
        VerificationReason.UNKNOWN_SERIAL
    )


async def test_header_names_are_case_insensitive(
    fake: FakeWeChatPay, verifier: NotificationVerifier
) -> None:
    headers, body = fake.notification("order-1")
    lower = {k.lower(): v for k, v in headers.items()}
    assert (await verifier.verify(lower, body)).out_trade_no == "order-1"


async def test_a_signature_header_given_twice_with_two_values_is_refused(
    fake: FakeWeChatPay, verifier: NotificationVerifier
) -> None:
    headers, body = fake.notification("order-1")
    doubled = CIMultiDict(headers)
    doubled.add("wechatpay-serial", fake.public_key_id)
    with pytest.raises(VerificationError) as info:
        await verifier.verify(doubled, body)
    assert info.value.reason is VerificationReason.BAD_PAYLOAD


@pytest.mark.parametrize(
    ("knobs", "reason"),
    [
        pytest.param({"tamper_body": True}, VerificationReason.BAD_SIGNATURE, id="tampered-body"),
        pytest.param({"forge": True}, VerificationReason.BAD_SIGNATURE, id="forged-signature"),
        pytest.param(
            {"serial": "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"},
            VerificationReason.UNKNOWN_SERIAL,
            id="unknown-serial",
        ),
        pytest.param(
            {"timestamp_offset": 301}, VerificationReason.STALE_TIMESTAMP, id="301s-ahead"
        ),
        pytest.param(
            {"timestamp_offset": -301}, VerificationReason.STALE_TIMESTAMP, id="301s-behind"
        ),
        pytest.param({"flip_tag": True}, VerificationReason.DECRYPT_FAILED, id="flipped-gcm-tag"),
        pytest.param(
            {"transaction": {"success_time": "2026-11-26T14:28:16"}},
            VerificationReason.BAD_PAYLOAD,
            id="naive-success-time",
        ),
        pytest.param(
            {"transaction": {"trade_state": "WHATEVER"}},
            VerificationReason.BAD_PAYLOAD,
            id="unknown-trade-state",
        ),
        pytest.param(
            {"transaction": {"amount": {"total": "100", "currency": "CNY"}}},
            VerificationReason.BAD_PAYLOAD,
            id="amount-not-an-integer",
        ),
        pytest.param({"nonce": "a:b{c}"}, VerificationReason.BAD_PAYLOAD, id="odd-nonce"),
        pytest.param({"nonce": "n" * 65}, VerificationReason.BAD_PAYLOAD, id="long-nonce"),
    ],
)
async def test_a_bad_notification_is_refused_and_claims_no_nonce(
    fake: FakeWeChatPay,
    verifier: NotificationVerifier,
    rds: redis.asyncio.Redis,
    knobs: dict[str, Any],
    reason: VerificationReason,
) -> None:
    assert await refused(verifier, fake.notification("order-1", **knobs)) is reason
    assert await nonce_keys(rds) == []


@pytest.mark.parametrize("offset", [299, -299, 300, -300])
async def test_a_timestamp_within_the_window_is_accepted(
    fake: FakeWeChatPay, verifier: NotificationVerifier, offset: int
) -> None:
    note = fake.notification("order-1", timestamp=int(NOW), timestamp_offset=offset)
    assert (await verifier.verify(*note)).status is PaymentStatus.PAID


@pytest.mark.parametrize("missing", ["Timestamp", "Nonce", "Signature", "Serial"])
async def test_a_missing_header_is_refused(
    fake: FakeWeChatPay, verifier: NotificationVerifier, rds: redis.asyncio.Redis, missing: str
) -> None:
    headers, body = fake.notification("order-1")
    del headers[f"Wechatpay-{missing}"]
    assert await refused(verifier, Notification(headers, body)) is (
        VerificationReason.MISSING_HEADER
    )
    assert await nonce_keys(rds) == []


async def test_a_wechat_signature_probe_is_refused(
    fake: FakeWeChatPay, verifier: NotificationVerifier
) -> None:
    # WeChat checks that merchants verify by sending deliberately broken signatures.
    headers, body = fake.notification("order-1")
    headers["Wechatpay-Signature"] = "WECHATPAY/SIGNTEST/" + headers["Wechatpay-Signature"]
    assert await refused(verifier, Notification(headers, body)) is (
        VerificationReason.BAD_SIGNATURE
    )


async def test_a_replayed_notification_is_refused(
    fake: FakeWeChatPay, verifier: NotificationVerifier, rds: redis.asyncio.Redis
) -> None:
    note = fake.notification("order-1")
    await verifier.verify(*note)
    assert await refused(verifier, note) is VerificationReason.REPLAYED_NONCE
    # A fresh, correctly signed notification that reuses the nonce is a replay too.
    reuse = fake.notification("order-2", nonce=note.nonce)
    assert await refused(verifier, reuse) is VerificationReason.REPLAYED_NONCE
    assert await nonce_keys(rds) == [nonce_key(note.nonce).encode()]


async def test_a_replay_is_refused_by_another_process_too(
    fake: FakeWeChatPay, rds: redis.asyncio.Redis, redis_proc: Any
) -> None:
    other_client = redis.asyncio.Redis.from_url(redis_proc.url)
    try:
        first = fake.verifier(RedisNonceGuard(rds), clock=lambda: NOW)
        second = fake.verifier(RedisNonceGuard(other_client), clock=lambda: NOW)
        note = fake.notification("order-1")
        await first.verify(*note)
        assert await refused(second, note) is VerificationReason.REPLAYED_NONCE
    finally:
        await other_client.aclose()


async def test_a_forged_notification_does_not_burn_the_nonce(
    fake: FakeWeChatPay, verifier: NotificationVerifier
) -> None:
    genuine = fake.notification("order-1")
    forged = fake.notification("order-1", nonce=genuine.nonce, forge=True)
    assert await refused(verifier, forged) is VerificationReason.BAD_SIGNATURE
    assert (await verifier.verify(*genuine)).status is PaymentStatus.PAID


async def test_a_notification_that_failed_decryption_does_not_burn_the_nonce(
    fake: FakeWeChatPay, verifier: NotificationVerifier
) -> None:
    broken = fake.notification("order-1", flip_tag=True)
    assert await refused(verifier, broken) is VerificationReason.DECRYPT_FAILED
    fixed = fake.notification("order-1", nonce=broken.nonce)
    assert (await verifier.verify(*fixed)).status is PaymentStatus.PAID


async def test_a_non_transaction_event_is_ignored_but_verified(
    fake: FakeWeChatPay, verifier: NotificationVerifier, rds: redis.asyncio.Redis
) -> None:
    note = fake.notification("order-1", event_type="REFUND.SUCCESS")
    assert await refused(verifier, note) is VerificationReason.IGNORED_EVENT
    assert len(await nonce_keys(rds)) == 1  # genuine: a replay of it is still a replay
    forged = fake.notification("order-1", event_type="REFUND.SUCCESS", forge=True)
    assert await refused(verifier, forged) is VerificationReason.BAD_SIGNATURE


async def test_a_wrong_apiv3_key_fails_decryption(
    fake: FakeWeChatPay, rds: redis.asyncio.Redis
) -> None:
    verifier = fake.verifier(RedisNonceGuard(rds), api_v3_key=b"0" * 32, clock=lambda: NOW)
    assert await refused(verifier, fake.notification("order-1")) is (
        VerificationReason.DECRYPT_FAILED
    )


async def test_an_expired_platform_certificate_is_not_trusted(
    fake: FakeWeChatPay, rds: redis.asyncio.Redis
) -> None:
    later = NOW + timedelta(days=400).total_seconds()
    verifier = fake.verifier(RedisNonceGuard(rds), clock=lambda: later)
    note = fake.notification("order-1", timestamp=int(later))
    assert await refused(verifier, note) is VerificationReason.UNKNOWN_SERIAL


async def test_the_apiv3_key_must_be_32_bytes(
    fake: FakeWeChatPay, rds: redis.asyncio.Redis
) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        NotificationVerifier(fake.platform_keys(), b"short", RedisNonceGuard(rds))


async def test_the_nonce_guard_claims_once(rds: redis.asyncio.Redis) -> None:
    guard = RedisNonceGuard(rds, key_prefix="shx")
    assert await guard.claim("ABC123", 30) is True
    assert await guard.claim("ABC123", 30) is False
    assert 0 < await rds.ttl(f"shx:{WECHATPAY_NONCE}:ABC123") <= 30
    await guard.release("ABC123")
    assert await guard.claim("ABC123", 30) is True
    with pytest.raises(VerificationError) as info:
        await guard.claim("x}{y", 30)
    assert info.value.reason is VerificationReason.BAD_PAYLOAD


def test_platform_keys_match_serials_regardless_of_case_and_leading_zeros(
    fake: FakeWeChatPay, tmp_path: Any
) -> None:
    cert = tmp_path / "wechatpay_cert.pem"
    cert.write_bytes(fake.platform_certificate_pem)
    pub = tmp_path / "pub_key.pem"
    pub.write_bytes(fake.platform_public_key_pem)
    keys = PlatformKeys.from_files([cert], {fake.public_key_id: pub})
    assert set(keys.serials) == {fake.platform_serial, fake.public_key_id}
    assert fake.platform_serial.lower() in keys
    assert "00" + fake.platform_serial in keys
    assert keys.get("PUB_KEY_ID_nope") is None
    with pytest.raises(ValueError, match="PUB_KEY_ID_"):
        keys.add_public_key("1234", fake.platform_public_key_pem)


@pytest.mark.parametrize(("state", "status"), sorted(TRADE_STATES.items()))
def test_every_trade_state_maps(state: str, status: PaymentStatus) -> None:
    doc = {
        "out_trade_no": "o-1",
        "trade_state": state,
        "amount": {"total": 1},
        **({"transaction_id": "42"} if status is PaymentStatus.PAID else {}),
    }
    result = payment_result(doc)
    assert result.status is status
    assert result.currency == "CNY"
    assert result.paid_at_ms is None


def test_an_unpaid_answer_without_an_amount_reads_as_zero_but_a_paid_one_is_refused() -> None:
    assert payment_result({"out_trade_no": "o-1", "trade_state": "NOTPAY"}).amount == 0
    with pytest.raises(ValueError, match="amount"):
        payment_result({"out_trade_no": "o-1", "trade_state": "SUCCESS", "transaction_id": "4"})


# -- webhook over HTTP on 127.0.0.1 ------------------------------------------------------------


Handler = Callable[[PaymentResult], Any]


@pytest.fixture
async def webhook(verifier: NotificationVerifier) -> AsyncIterator[Callable[[Handler], Any]]:
    runners = []

    async def start(on_result: Handler) -> str:
        runner, port = await start_webhook("127.0.0.1:0", make_app(verifier, on_result))
        runners.append(runner)
        assert port > 0
        return f"http://127.0.0.1:{port}/wechatpay/notify"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_the_webhook_answers_204_and_hands_over_the_result_once(
    fake: FakeWeChatPay, webhook: Any
) -> None:
    seen: list[PaymentResult] = []

    async def on_result(result: PaymentResult) -> None:
        seen.append(result)

    url = await webhook(on_result)
    note = fake.notification("order-1")
    assert await fake.deliver(url, note) == (204, "")
    assert [r.out_trade_no for r in seen] == ["order-1"]
    # The same delivery again is a replay: refused, and the handler is not called again.
    status, text = await fake.deliver(url, note)
    assert (status, orjson.loads(text)) == (401, {"code": "FAIL", "message": "REPLAYED_NONCE"})
    assert len(seen) == 1


async def test_the_webhook_answers_401_fail_on_a_bad_signature(
    fake: FakeWeChatPay, webhook: Any
) -> None:
    seen: list[PaymentResult] = []

    async def on_result(result: PaymentResult) -> None:
        seen.append(result)

    url = await webhook(on_result)
    status, text = await fake.deliver(url, fake.notification("order-1", tamper_body=True))
    assert status == 401
    assert orjson.loads(text) == {"code": "FAIL", "message": "BAD_SIGNATURE"}
    assert seen == []


async def test_the_webhook_answers_500_on_retry_later_and_takes_the_redelivery(
    fake: FakeWeChatPay, webhook: Any
) -> None:
    calls: list[PaymentResult] = []

    async def on_result(result: PaymentResult) -> None:
        calls.append(result)
        if len(calls) == 1:
            raise RetryLater("redis down")

    url = await webhook(on_result)
    note = fake.notification("order-1")
    status, text = await fake.deliver(url, note)
    assert (status, orjson.loads(text)) == (500, {"code": "FAIL", "message": "RETRY_LATER"})
    # The nonce was given back, so WeChat's redelivery (even with the same nonce) is handled.
    assert await fake.deliver(url, note) == (204, "")
    assert len(calls) == 2


async def test_the_webhook_answers_500_when_the_handler_fails(
    fake: FakeWeChatPay, webhook: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def on_result(result: PaymentResult) -> None:
        raise RuntimeError("bug")

    url = await webhook(on_result)
    status, text = await fake.deliver(url, fake.notification("order-1"))
    assert (status, orjson.loads(text)) == (500, {"code": "FAIL", "message": "INTERNAL"})
    assert "handler failed" in caplog.text


async def test_the_webhook_answers_500_when_redis_is_down(
    fake: FakeWeChatPay, redis_proc: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.asyncio.Redis.from_url(
        redis_proc.url, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    verifier = fake.verifier(RedisNonceGuard(client), clock=lambda: NOW)
    runner, port = await start_webhook("127.0.0.1:0", make_app(verifier, _unreachable))
    try:
        redis_proc.stop()
        url = f"http://127.0.0.1:{port}/wechatpay/notify"
        status, text = await fake.deliver(url, fake.notification("order-1"))
        assert (status, orjson.loads(text)["message"]) == (500, "TEMPORARILY_UNAVAILABLE")
        assert "could not be verified" in caplog.text
    finally:
        await runner.cleanup()
        await client.aclose()


async def _unreachable(result: PaymentResult) -> None:
    raise AssertionError("on_result must not be called")


async def test_the_webhook_acknowledges_other_events_without_handling_them(
    fake: FakeWeChatPay, webhook: Any
) -> None:
    seen: list[PaymentResult] = []

    async def on_result(result: PaymentResult) -> None:
        seen.append(result)

    url = await webhook(on_result)
    note = fake.notification("order-1", event_type="REFUND.SUCCESS")
    assert await fake.deliver(url, note) == (204, "")
    assert seen == []


async def test_the_webhook_refuses_a_huge_body(fake: FakeWeChatPay, webhook: Any) -> None:
    async def on_result(result: PaymentResult) -> None:
        raise AssertionError("not reached")

    url = await webhook(on_result)
    headers, _ = fake.notification("order-1")
    status, text = await fake.deliver(url, Notification(headers, b"x" * (65 * 1024)))
    assert status == 413
    assert orjson.loads(text)["code"] == "FAIL"


async def test_start_webhook_rejects_a_bad_listen_address(verifier: NotificationVerifier) -> None:
    async def on_result(result: PaymentResult) -> None:
        return None

    with pytest.raises(ValueError, match="HOST:PORT"):
        await start_webhook("8080", make_app(verifier, on_result))


# -- the order-query client --------------------------------------------------------------------


@pytest.fixture
async def client(fake: FakeWeChatPay) -> AsyncIterator[Any]:
    c = fake.client(clock=lambda: NOW)
    yield c
    await c.aclose()


@pytest.mark.parametrize(
    ("state", "status"),
    [
        ("SUCCESS", PaymentStatus.PAID),
        ("REFUND", PaymentStatus.PAID),
        ("NOTPAY", PaymentStatus.PENDING),
        ("USERPAYING", PaymentStatus.PENDING),
        ("CLOSED", PaymentStatus.CLOSED),
        ("REVOKED", PaymentStatus.CLOSED),
        ("PAYERROR", PaymentStatus.FAILED),
    ],
)
async def test_the_client_maps_the_trade_state(
    fake: FakeWeChatPay, client: Any, state: str, status: PaymentStatus
) -> None:
    order = fake.set_order("order-7", trade_state=state, amount=990)
    result = await client.query("order-7")
    assert result is not None
    assert (result.status, result.amount, result.out_trade_no) == (status, 990, "order-7")
    assert result.transaction_id == order.get("transaction_id", "")
    if status is PaymentStatus.PAID:
        assert result.paid_at_ms == parse_rfc3339(order["success_time"])
    else:
        assert result.paid_at_ms is None
    # The fake accepted the merchant signature and recorded the query.
    assert fake.auth_failures == 0
    assert len(fake.queries["order-7"]) == 1


async def test_an_unknown_order_is_none(fake: FakeWeChatPay, client: Any) -> None:
    assert await client.query("order-unknown") is None
    fake.unsigned_answers = True  # WeChat does not promise to sign error answers
    assert await client.query("order-unknown") is None


async def test_a_badly_signed_not_found_is_not_trusted(fake: FakeWeChatPay, client: Any) -> None:
    fake.tamper_answers = True
    with pytest.raises(ProviderError, match="not trusted"):
        await client.query("order-unknown")


@pytest.mark.parametrize(
    "knob",
    [
        pytest.param({"tamper_answers": True}, id="tampered"),
        pytest.param({"unsigned_answers": True}, id="unsigned"),
        pytest.param({"answer_serial": "PUB_KEY_ID_0000000000"}, id="unknown-serial"),
    ],
)
async def test_an_answer_without_a_valid_signature_is_a_provider_error(
    fake: FakeWeChatPay, client: Any, knob: dict[str, Any]
) -> None:
    fake.set_order("order-1")
    for name, value in knob.items():
        setattr(fake, name, value)
    with pytest.raises(ProviderError, match="not trusted"):
        await client.query("order-1")


async def test_a_stale_answer_is_a_provider_error(fake: FakeWeChatPay, client: Any) -> None:
    fake.set_order("order-1")
    fake.answer_timestamp_offset = -301  # e.g. an answer replayed from five minutes ago
    with pytest.raises(ProviderError, match="STALE_TIMESTAMP"):
        await client.query("order-1")


async def test_a_5xx_is_a_provider_error_and_the_next_query_works(
    fake: FakeWeChatPay, client: Any
) -> None:
    fake.set_order("order-1")
    fake.fail(500, times=1)
    with pytest.raises(ProviderError, match="500"):
        await client.query("order-1")
    assert (await client.query("order-1")).status is PaymentStatus.PAID
    assert len(fake.queries["order-1"]) == 2


async def test_a_dropped_connection_is_a_provider_error(fake: FakeWeChatPay, client: Any) -> None:
    fake.set_order("order-1")
    fake.drop()
    with pytest.raises(ProviderError, match="ServerDisconnected"):
        await client.query("order-1")
    # aiohttp resends an idempotent GET once when the server hung up: two attempts.
    assert len(fake.queries["order-1"]) == 2
    fake.heal()
    assert (await client.query("order-1")).status is PaymentStatus.PAID


async def test_a_slow_answer_times_out_as_a_provider_error(fake: FakeWeChatPay) -> None:
    fake.set_order("order-1")
    fake.delay_seconds = 0.5
    client = fake.client(timeout_seconds=0.1)
    try:
        with pytest.raises(ProviderError, match="Timeout"):
            await client.query("order-1")
    finally:
        await client.aclose()


async def test_a_wrong_merchant_key_is_refused_by_wechat(fake: FakeWeChatPay) -> None:
    fake.set_order("order-1")
    # Signed with a key that is not the merchant's registered one.
    client = fake.client(merchant_private_key=fake.public_key_private)
    try:
        with pytest.raises(ProviderError, match="401 SIGN_ERROR"):
            await client.query("order-1")
    finally:
        await client.aclose()
    assert fake.auth_failures == 1
    assert fake.queries["order-1"] == []


async def test_an_answer_for_another_order_is_a_provider_error(
    fake: FakeWeChatPay, client: Any
) -> None:
    fake.set_order("order-1")["out_trade_no"] = "order-2"
    with pytest.raises(ProviderError, match="another order"):
        await client.query("order-1")


async def test_a_malformed_order_number_is_refused_before_sending(
    fake: FakeWeChatPay, client: Any
) -> None:
    with pytest.raises(ValueError, match="out_trade_no"):
        await client.query("../../v3/refund")
    assert fake.queries == {}


async def test_a_closed_port_is_a_provider_error(fake: FakeWeChatPay) -> None:
    client = fake.client()
    await fake.stop()
    try:
        with pytest.raises(ProviderError):
            await client.query("order-1")
    finally:
        await client.aclose()
