"""Domain objects returned by the engine (independent of the wire format)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

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

    @classmethod
    def from_record(cls, rec: Mapping[str, Any], now_ms: int | None = None) -> Reservation:
        """Build from a record as the scripts return it.

        With `now_ms`, a HELD record at or past its deadline is reported EXPIRED: the deadline
        decides, even before the sweeper has moved the stock back.
        """
        units = orjson.loads(rec["units"])
        allocations = tuple(
            Allocation(units[u - 1][0], units[u - 1][1], units[u - 1][2], wh, int(q))
            for u, wh, q in orjson.loads(rec["alloc"])
        )
        state = _STATE_BY_CODE[rec["st"]]
        expires = int(rec["dl"])
        if state is State.HELD and now_ms is not None and now_ms >= expires:
            state = State.EXPIRED
        up = rec.get("up")
        return cls(
            order_id=rec["oid"],
            state=state,
            allocations=allocations,
            created_ms=int(rec["cr"]),
            expires_ms=expires,
            updated_ms=int(up) if up is not None else None,
            payment_ref=rec.get("pref") or "",
            release_reason=rec.get("why") or "",
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
