"""Payment providers from Settings: clients for the poller and the notification verifier.

Nothing is loaded unless configured: WeChat Pay when `wechatpay_mchid` is set. Then the
merchant serial and key give the order-query client (active channel), and an APIv3 key (file
or STOCKHOLD_WECHATPAY_API_V3_KEY) gives the notification verifier (callback channel); both
need the platform certificate(s) and/or public key. See docs/payments.md.

The merchant private key and the APIv3 key are secrets: their files must not be readable by
group or others (stockhold.secretfile: ConfigError with the path and the mode). Platform
certificates and public keys are public and read as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import redis.asyncio

from stockhold.payments.provider import ProviderClient
from stockhold.payments.wechatpay import (
    PROVIDER,
    NotificationVerifier,
    PlatformKeys,
    RedisNonceGuard,
    WeChatPayClient,
)
from stockhold.secretfile import read_secret
from stockhold.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class PaymentProviders:
    """What a server process polls with (`clients`, by provider name) and verifies with."""

    clients: dict[str, ProviderClient] = field(default_factory=dict)
    verifier: NotificationVerifier | None = None

    async def aclose(self) -> None:
        """Close the clients' HTTP sessions."""
        for client in self.clients.values():
            close = getattr(client, "aclose", None)
            if close is not None:
                await close()


def load_providers(
    settings: Settings, client: redis.asyncio.Redis | redis.asyncio.RedisCluster
) -> PaymentProviders:
    """The providers configured in `settings`; ValueError when a configuration is incomplete."""
    providers = PaymentProviders()
    s = settings
    if not s.wechatpay_mchid:
        return providers
    public_keys = {}
    if s.wechatpay_platform_public_key_id or s.wechatpay_platform_public_key_path:
        if not (s.wechatpay_platform_public_key_id and s.wechatpay_platform_public_key_path):
            raise ValueError(
                "WeChat Pay: give both wechatpay_platform_public_key_id and _path, or neither"
            )
        public_keys[s.wechatpay_platform_public_key_id] = s.wechatpay_platform_public_key_path
    keys = PlatformKeys.from_files(s.wechatpay_platform_certificate_paths, public_keys)
    if not (s.wechatpay_merchant_serial and s.wechatpay_merchant_key_path):
        raise ValueError(
            "WeChat Pay: wechatpay_merchant_serial and wechatpay_merchant_key_path are required"
        )
    providers.clients[PROVIDER] = WeChatPayClient(
        mchid=s.wechatpay_mchid,
        merchant_serial=s.wechatpay_merchant_serial,
        merchant_private_key=read_secret(
            s.wechatpay_merchant_key_path, "wechatpay_merchant_key_path"
        ),
        platform_keys=keys,
        base_url=s.wechatpay_base_url,
        timeout_seconds=s.wechatpay_timeout_seconds,
    )
    api_v3_key = s.wechatpay_api_v3_key.encode()
    if s.wechatpay_api_v3_key_path:
        api_v3_key = read_secret(s.wechatpay_api_v3_key_path, "wechatpay_api_v3_key_path").strip()
    if api_v3_key:
        providers.verifier = NotificationVerifier(
            keys, api_v3_key=api_v3_key, nonce_guard=RedisNonceGuard(client, s.key_prefix)
        )
    log.info(
        "WeChat Pay configured",
        extra={
            "mchid": s.wechatpay_mchid,
            "platform_keys": list(keys.serials),
            "notifications": providers.verifier is not None,
        },
    )
    return providers
