"""The provider-neutral side of payment sync: what a payment provider tells stockhold.

Both channels (verified callbacks and active polling) reduce a provider's answer to one
PaymentResult; the core then commits (PAID) or releases (FAILED, CLOSED) through the same
idempotent path as ReportPayment. PENDING changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class PaymentStatus(StrEnum):
    """Where a payment stands, in stockhold's terms (the providers' states map onto these)."""

    PAID = "PAID"
    FAILED = "FAILED"
    CLOSED = "CLOSED"
    PENDING = "PENDING"


@dataclass(frozen=True, slots=True)
class PaymentResult:
    """One provider's word on one order's payment."""

    provider: str  # e.g. "wechatpay"
    out_trade_no: str  # the merchant's order number at the provider
    transaction_id: str  # the provider's payment id; "" while it has none (PENDING)
    status: PaymentStatus
    amount: int  # the order total in minor units (fen for CNY)
    currency: str
    paid_at_ms: int | None  # the provider's success time (ms since the epoch), if paid


class ProviderError(Exception):
    """A transient failure talking to a provider: network, timeout, 5xx, a bad response
    signature. The caller retries later; nothing may be concluded from it."""


class RetryLater(Exception):
    """Raised by an `on_result` handler that could not apply a verified result now (e.g. Redis
    is down): the webhook answers 500 so the provider delivers the notification again."""


class ProviderClient(Protocol):
    """Asks a payment provider where an order's payment stands (the active channel)."""

    name: str

    async def query(self, out_trade_no: str) -> PaymentResult | None:
        """The order's payment as the provider sees it; None if the provider does not know
        the order. Raises ProviderError on a transient failure."""
        ...
