"""Both channels of payment sync end here: a provider's result becomes one ReportPayment.

The webhook (callback channel) and the poller (active channel) hand each decided
PaymentResult to `report_result`, which finds the order (the out_trade_no -> order id map that
Reserve / MarkPaymentPending recorded, else out_trade_no itself) and calls
`Engine.report_payment`: the same idempotent script path as the ReportPayment RPC. See
docs/payments.md.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from stockhold import constants as c
from stockhold.errors import DomainError, Reason
from stockhold.model import PaymentReport, Reservation
from stockhold.payments.provider import PaymentResult, PaymentStatus, RetryLater
from stockhold.payments.webhook import OnResult

if TYPE_CHECKING:
    from stockhold.engine import Engine

log = logging.getLogger(__name__)

# Refusals a redelivery may get past (Redis back, the order written by then): the webhook
# answers 500 and the provider delivers again. Anything else is final and acknowledged.
RETRYABLE: Final = frozenset(
    {Reason.BACKEND_UNAVAILABLE, Reason.INTERNAL, Reason.RESERVATION_NOT_FOUND}
)


async def report_result(
    engine: Engine, result: PaymentResult, actor: str, order_id: str | None = None
) -> tuple[Reservation, bool]:
    """Apply a decided (PAID, FAILED, CLOSED) provider result as `actor` (the channel:
    ACTOR_POLLER or ACTOR_WEBHOOK, the events' actor); returns (reservation, replayed).

    Raises DomainError as ReportPayment does (e.g. PAYMENT_AMOUNT_MISMATCH).
    """
    if result.status is PaymentStatus.PENDING:
        raise ValueError("a PENDING result decides nothing")
    if order_id is None:
        order_id = await engine.order_for_payment(result.provider, result.out_trade_no)
    report = PaymentReport(
        provider=result.provider,
        transaction_id=result.transaction_id,
        status=str(result.status),
        amount=result.amount,
        paid_at_ms=result.paid_at_ms,
    )
    return await engine.report_payment(order_id, report, actor=actor)


def notification_handler(engine: Engine) -> OnResult:
    """The webhook's `on_result`: verified notifications go through `report_result`.

    Transient failures raise RetryLater (answered 500: the provider redelivers); a final
    refusal such as an amount mismatch is logged and acknowledged, since redelivering the same
    notification cannot change the answer (it is stored by transaction id).
    """

    async def on_result(result: PaymentResult) -> None:
        if result.status is PaymentStatus.PENDING:
            return
        try:
            reservation, replayed = await report_result(engine, result, c.ACTOR_WEBHOOK)
        except DomainError as err:
            if err.reason in RETRYABLE:
                raise RetryLater(str(err)) from err
            log.warning(
                "payment notification refused",
                extra={"out_trade_no": result.out_trade_no, "reason": str(err.reason)},
            )
            return
        log.info(
            "payment notification applied",
            extra={
                "order_id": reservation.order_id,
                "status": str(result.status),
                "replayed": replayed,
            },
        )

    return on_result
