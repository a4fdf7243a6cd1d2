"""The gRPC servicer: wire messages <-> domain objects, validation, rich errors. Kept thin."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_status import rpc_status

from stockhold import constants as c
from stockhold.engine import Engine
from stockhold.errors import DomainError, FieldViolation, Reason, invalid, to_rpc_status
from stockhold.model import Reservation, StockLevel
from stockhold.resolver import check_int, check_text
from stockhold.settings import Settings
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


def rich_errors(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Answer a DomainError with google.rpc.Status (ErrorInfo, BadRequest) and its code."""

    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        try:
            return await fn(self, request, context)
        except DomainError as err:
            if err.reason not in _QUIET:
                log.warning("%s refused: %s", fn.__name__, err, extra={"meta": err.metadata})
            await context.abort_with_status(rpc_status.to_status(to_rpc_status(err)))
            raise AssertionError("abort_with_status returned") from err  # pragma: no cover

    return wrapper


# Refusals that are part of normal business: not worth a log line each.
_QUIET = frozenset(
    {
        Reason.INSUFFICIENT_STOCK,
        Reason.INVALID_ARGUMENT,
        Reason.RESERVATION_NOT_FOUND,
        Reason.ORDER_CONFLICT,
        Reason.ADJUSTMENT_CONFLICT,
        Reason.RESERVATION_EXPIRED,
        Reason.RESERVATION_RELEASED,
        Reason.RESERVATION_COMMITTED,
    }
)


def timestamp(ms: int) -> Timestamp:
    """Milliseconds since the epoch -> protobuf Timestamp."""
    return Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def reservation_pb(r: Reservation) -> pb.Reservation:
    """Domain reservation -> wire message."""
    msg = pb.Reservation(
        order_id=r.order_id,
        state=pb.ReservationState.ValueType(r.state.value),
        allocations=[
            pb.Allocation(
                unit=pb.SalesUnit(sku=a.sku, spec=a.spec, barcode=a.barcode),
                warehouse=a.warehouse,
                quantity=a.quantity,
            )
            for a in r.allocations
        ],
        created_at=timestamp(r.created_ms),
        expires_at=timestamp(r.expires_ms),
        payment_ref=r.payment_ref,
        release_reason=r.release_reason,
    )
    if r.updated_ms is not None:
        msg.updated_at.CopyFrom(timestamp(r.updated_ms))
    return msg


def level_pb(s: StockLevel) -> pb.StockLevel:
    """Domain stock level -> wire message."""
    return pb.StockLevel(
        unit=pb.SalesUnit(sku=s.sku, spec=s.spec, barcode=s.barcode),
        warehouse=s.warehouse,
        on_hand=s.on_hand,
        available=s.available,
        reserved=s.reserved,
    )


_NOTE_BOUNDS = {"payment_ref": c.MAX_PAYMENT_REF, "reason": c.MAX_REASON}


def _raise_if(out: list[FieldViolation]) -> None:
    if out:
        raise invalid(out)


class InventoryServicer(pb_grpc.InventoryServicer):
    """stockhold.v1.Inventory over an Engine."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.resolver = engine.resolver

    def _check_order_and_note(self, order_id: str, field: str, note: str) -> None:
        """Validate an order id and the free-text field of a Commit or Release, together."""
        out: list[FieldViolation] = []
        self.resolver.order(order_id, out=out)
        check_text(note, field, 0, _NOTE_BOUNDS[field], out, normalise=False)
        _raise_if(out)

    @rich_errors
    async def Reserve(
        self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReserveResponse:
        """Hold stock for an order, all or nothing."""
        lines = [
            (ln.unit.sku, ln.unit.spec, ln.unit.barcode, ln.warehouse, ln.quantity)
            for ln in request.lines
        ]
        order = self.resolver.resolve_order(
            request.order_id, lines, request.hold_seconds, self.settings.max_hold_seconds
        )
        reservation, replayed = await self.engine.reserve(order)
        return pb.ReserveResponse(reservation=reservation_pb(reservation), replayed=replayed)

    @rich_errors
    async def Commit(
        self, request: pb.CommitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CommitResponse:
        """HELD -> COMMITTED."""
        self._check_order_and_note(request.order_id, "payment_ref", request.payment_ref)
        reservation = await self.engine.commit(request.order_id, request.payment_ref)
        return pb.CommitResponse(reservation=reservation_pb(reservation))

    @rich_errors
    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReleaseResponse:
        """HELD -> RELEASED."""
        self._check_order_and_note(request.order_id, "reason", request.reason)
        reservation = await self.engine.release(request.order_id, request.reason)
        return pb.ReleaseResponse(reservation=reservation_pb(reservation))

    @rich_errors
    async def GetReservation(
        self, request: pb.GetReservationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Reservation:
        """The reservation as it stands."""
        self.resolver.order(request.order_id)
        return reservation_pb(await self.engine.get_reservation(request.order_id))

    @rich_errors
    async def GetAvailability(
        self, request: pb.GetAvailabilityRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetAvailabilityResponse:
        """Stock levels per unit and warehouse."""
        n = len(request.units)
        if not 1 <= n <= c.MAX_AVAILABILITY_UNITS:
            bound = f"must hold 1..{c.MAX_AVAILABILITY_UNITS} units (got {n})"
            raise invalid([FieldViolation("units", bound)])
        units = self.resolver.units([(u.sku, u.spec, u.barcode) for u in request.units])
        levels = await self.engine.availability(units)
        return pb.GetAvailabilityResponse(levels=[level_pb(s) for s in levels])

    @rich_errors
    async def AdjustStock(
        self, request: pb.AdjustStockRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AdjustStockResponse:
        """Receipt (+) or shrinkage (-)."""
        out: list[FieldViolation] = []
        self.resolver.adjustment(request.adjustment_id, out=out)
        u = request.unit
        unit = self.resolver.unit(u.sku, u.spec, u.barcode, "unit", out=out)
        warehouse = check_text(request.warehouse, "warehouse", 1, c.MAX_WAREHOUSE, out)
        if request.delta == 0:
            out.append(FieldViolation("delta", "must not be 0"))
        else:
            check_int(abs(request.delta), "delta", 1, c.MAX_DELTA, out)
        check_text(request.reason, "reason", 0, c.MAX_REASON, out, normalise=False)
        _raise_if(out)
        level, replayed = await self.engine.adjust(
            request.adjustment_id, unit, warehouse, request.delta, request.reason
        )
        return pb.AdjustStockResponse(level=level_pb(level), replayed=replayed)
