"""Domain objects returned by the engine (independent of the wire format)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

import orjson

from stockhold import constants as c


class State(IntEnum):
    """Reservation states; values equal the proto enum's numbers."""

    HELD = 1
    COMMITTED = 2
    RELEASED = 3
    EXPIRED = 4


_STATE_BY_CODE = {
    c.STATE_HELD: State.HELD,
    c.STATE_COMMITTED: State.COMMITTED,
    c.STATE_RELEASED: State.RELEASED,
    c.STATE_EXPIRED: State.EXPIRED,
}


@dataclass(frozen=True, slots=True)
class Allocation:
    """Stock held for one sales unit in one warehouse."""

    sku: str
    spec: str
    barcode: str
    warehouse: str
    quantity: int


@dataclass(frozen=True, slots=True)
class PaymentInfo:
    """What stockhold knows of a reservation's payment (issue 5, docs/payments.md)."""

    provider: str
    out_trade_no: str
    transaction_id: str  # of the payment that decided the reservation
    status: str  # PENDING, PAID, FAILED, CLOSED ("" if only a flag was recorded)
    polls: int  # provider queries claimed by the active channel
    next_poll_ms: int | None
    flag: str  # "" or AMOUNT_MISMATCH, POLLS_EXHAUSTED, REFUND
    recommitted_ms: int | None  # paid after expiry: when the stock was taken again
    paid_at_ms: int | None

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> PaymentInfo | None:
        """The payment fields of a record; None when it has none."""
        if not any(rec.get(f) for f in ("pprov", "pst", "pflag")):
            return None
        return cls(
            provider=rec.get("pprov") or "",
            out_trade_no=rec.get("potn") or "",
            transaction_id=rec.get("ptx") or "",
            status=rec.get("pst") or "",
            polls=int(rec.get("polls") or 0),
            next_poll_ms=_ms(rec.get("pnext")),
            flag=rec.get("pflag") or "",
            recommitted_ms=_ms(rec.get("plate")),
            paid_at_ms=_ms(rec.get("ppaid")),
        )


def _ms(value: Any) -> int | None:
    return int(value) if value not in (None, "", 0, "0") else None


@dataclass(frozen=True, slots=True)
class Reservation:
    """A reservation as stored; times are milliseconds on Redis's clock."""

    order_id: str
    state: State
    allocations: tuple[Allocation, ...]
    created_ms: int
    expires_ms: int
    updated_ms: int | None
    payment_ref: str
    release_reason: str
    amount: int = 0  # from Reserve, minor units (0: not given)
    payment: PaymentInfo | None = None

    @classmethod
    def held(
        cls,
        order_id: str,
        units: Sequence[Sequence[Any]],
        alloc: Sequence[Sequence[Any]],
        created_ms: int,
        expires_ms: int,
        amount: int = 0,
        payment: PendingPayment | None = None,
        next_poll_ms: int = 0,
    ) -> Reservation:
        """A hold just made, from what the caller sent and what reserve.lua answered: equal
        to `from_record` of the record it wrote, without reading that record back.

        `units` are the order's (sku, spec, barcode, ...) in KEYS order, `alloc` the record's
        allocations ([unit index from 1, warehouse, quantity], ...), `payment` the payment
        marked pending (first poll at `next_poll_ms`).
        """
        allocations = []
        for u, wh, q in alloc:
            unit = units[u - 1]
            allocations.append(Allocation(unit[0], unit[1], unit[2], wh, int(q)))
        info = None
        if payment is not None:
            info = PaymentInfo(
                provider=payment.provider,
                out_trade_no=payment.out_trade_no,
                transaction_id="",
                status="PENDING",
                polls=0,
                next_poll_ms=next_poll_ms or None,
                flag="",
                recommitted_ms=None,
                paid_at_ms=None,
            )
        return cls(
            order_id=order_id,
            state=State.HELD,
            allocations=tuple(allocations),
            created_ms=created_ms,
            expires_ms=expires_ms,
            updated_ms=None,
            payment_ref="",
            release_reason="",
            amount=amount,
            payment=info,
        )

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Reservation:
        """Build from a record as the scripts return it: it reads as what it is stored as.

        A HELD record past its deadline reads HELD; whoever finds one expires it for real
        (Engine.get_reservation) before answering, so EXPIRED always means the stock is back.
        """
        units = orjson.loads(rec["units"])
        allocations = tuple(
            Allocation(units[u - 1][0], units[u - 1][1], units[u - 1][2], wh, int(q))
            for u, wh, q in orjson.loads(rec["alloc"])
        )
        up = rec.get("up")
        return cls(
            order_id=rec["oid"],
            state=_STATE_BY_CODE[rec["st"]],
            allocations=allocations,
            created_ms=int(rec["cr"]),
            expires_ms=int(rec["dl"]),
            updated_ms=int(up) if up is not None else None,
            payment_ref=rec.get("pref") or "",
            release_reason=rec.get("why") or "",
            amount=int(rec.get("amt") or 0),
            payment=PaymentInfo.from_record(rec),
        )


@dataclass(frozen=True, slots=True)
class StockLevel:
    """Counters of one sales unit in one warehouse; on_hand = available + reserved."""

    sku: str
    spec: str
    barcode: str
    warehouse: str
    available: int
    reserved: int

    @property
    def on_hand(self) -> int:
        """Physical stock not yet shipped: what is free plus what is held."""
        return self.available + self.reserved

    @property
    def oversold(self) -> bool:
        """A cycle count found fewer units than are reserved: available is negative (stored as
        counted, never clamped) until receipts or releases bring it back to >= 0."""
        return self.available < 0


class PendingPayment(NamedTuple):
    """A payment to poll: the provider and the merchant's order number there."""

    provider: str
    out_trade_no: str


@dataclass(frozen=True, slots=True)
class PaymentReport:
    """One provider's word on one payment (ReportPayment, the webhook and the poller)."""

    provider: str
    transaction_id: str  # "" allowed unless PAID
    status: str  # PAID, FAILED or CLOSED
    amount: int  # minor units
    paid_at_ms: int | None = None


class PollClaim(NamedTuple):
    """One claimed provider query of the active channel."""

    order_id: str
    provider: str
    out_trade_no: str
    poll: int  # 1-based: the how-many-th query of this payment
    final: bool  # the last query before the hold's deadline
