"""Payment sync adapters (issue 5): provider-neutral results and the WeChat Pay v3 adapter.

`provider` holds the interface the core codes against (PaymentResult, ProviderClient);
`wechatpay` the notification verifier and the signed order-query client; `webhook` the
optional HTTP endpoint. See docs/wechatpay.md.
"""

from stockhold.payments.provider import (
    PaymentResult,
    PaymentStatus,
    ProviderClient,
    ProviderError,
    RetryLater,
)

__all__ = ["PaymentResult", "PaymentStatus", "ProviderClient", "ProviderError", "RetryLater"]
