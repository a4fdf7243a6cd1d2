"""The gRPC servicer: wire messages <-> domain objects, validation, rich errors. Kept thin."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import unquote

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_status import rpc_status

from stockhold import constants as c
from stockhold.contention import KeyReport, sku_hints
from stockhold.contention_store import ContentionStore
from stockhold.engine import Engine, check_payment, payment_report_violations
from stockhold.errors import DomainError, FieldViolation, Reason, invalid, to_rpc_status
from stockhold.model import PaymentInfo, PaymentReport, PendingPayment, Reservation, StockLevel
from stockhold.policies import MAX_PAGE, SkuPolicy, parse_page_token
from stockhold.resolver import check_int, check_text
from stockhold.settings import Settings
from stockhold.timeparse import parse_rfc3339
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
        # shedding is the policy working as meant; counted in metrics and contention stats
        Reason.RESERVE_TIMEOUT,
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
    msg.amount = r.amount
    if r.payment is not None:
        msg.payment.CopyFrom(payment_pb(r.payment))
    return msg


_PAYMENT_STATUS = {
    "PAID": pb.PAYMENT_STATUS_PAID,
    "FAILED": pb.PAYMENT_STATUS_FAILED,
    "CLOSED": pb.PAYMENT_STATUS_CLOSED,
    "PENDING": pb.PAYMENT_STATUS_PENDING,
}
_STATUS_NAME = {v: k for k, v in _PAYMENT_STATUS.items()}


def payment_pb(p: PaymentInfo) -> pb.PaymentInfo:
    """Domain payment info -> wire message."""
    msg = pb.PaymentInfo(
        provider=p.provider,
        out_trade_no=p.out_trade_no,
        transaction_id=p.transaction_id,
        status=_PAYMENT_STATUS.get(p.status, pb.PAYMENT_STATUS_UNSPECIFIED),
        polls=p.polls,
        flag=p.flag,
    )
    for field, ms in (
        ("next_poll_at", p.next_poll_ms),
        ("recommitted_at", p.recommitted_ms),
        ("paid_at", p.paid_at_ms),
    ):
        if ms is not None:
            getattr(msg, field).CopyFrom(timestamp(ms))
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

# SetSkuPolicy integer fields: (request field, stored field, upper bound; -1: max_hold_seconds).
_POLICY_LIMITS = (
    ("reserve_timeout_ms", c.POLICY_TIMEOUT, 60_000),
    ("hold_seconds", c.POLICY_HOLD, -1),
    ("max_line_quantity", c.POLICY_MAX_QTY, c.MAX_QUANTITY),
)
DEFAULT_PAGE = 100
DEFAULT_TOP = 20
MAX_TOP = 1000


def _key_pb(r: KeyReport) -> pb.KeyContention:
    """One key's contention report -> wire message (the key is the unit's canonical id)."""
    sku, spec, barcode = (unquote(part) for part in r.key.split(":", 2))
    return pb.KeyContention(
        unit=pb.SalesUnit(sku=sku, spec=spec, barcode=barcode),
        key=r.key,
        requests=r.requests,
        contended=r.contended,
        timeouts=r.timeouts,
        insufficient=r.insufficient,
        errors=r.errors,
        wait_total_ms=r.wait_total_ms,
        wait_mean_ms=r.wait_mean_ms,
        wait_p50_ms=r.wait_p50_ms,
        wait_p99_ms=r.wait_p99_ms,
        wait_max_ms=r.wait_max_ms,
        script_mean_ms=r.script_mean_ms,
        flagged=r.flagged,
        estimated=r.estimated,
    )


def _raise_if(out: list[FieldViolation]) -> None:
    if out:
        raise invalid(out)


class InventoryServicer(pb_grpc.InventoryServicer):
    """stockhold.v1.Inventory over an Engine."""

    def __init__(
        self, engine: Engine, settings: Settings, contention: ContentionStore | None = None
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.resolver = engine.resolver
        self.contention = contention

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
        # Amount and payment are reported with the lines' violations in one BadRequest.
        extra: list[FieldViolation] = []
        check_int(request.amount, "amount", 0, c.MAX_AMOUNT, extra)
        pending = _pending(request)
        if pending is not None:
            check_payment(pending, "payment", extra)
        try:
            order = self.resolver.resolve_order(
                request.order_id, lines, request.hold_seconds, self.settings.max_hold_seconds
            )
        except DomainError as err:
            if extra and err.reason is Reason.INVALID_ARGUMENT:
                raise invalid([*err.violations, *extra]) from None
            raise
        _raise_if(extra)
        reservation, replayed = await self.engine.reserve(
            order, context.time_remaining(), request.amount, pending
        )
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

    # -- SKU policies (issue 4) ------------------------------------------------------------
    def _sku(self, sku: str, out: list[FieldViolation]) -> str:
        return check_text(sku, "sku", 1, c.MAX_SKU, out)

    @rich_errors
    async def SetSkuPolicy(
        self, request: pb.SetSkuPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SkuPolicy:
        """Store the fields present in the request (or reset the policy)."""
        out: list[FieldViolation] = []
        sku = self._sku(request.sku, out)
        fields: dict[str, int] = {}
        for name, key, hi in _POLICY_LIMITS:
            if request.HasField(name):  # type: ignore[arg-type]
                value = int(getattr(request, name))
                if value != 0:
                    check_int(value, name, 1, self._policy_max(hi), out)
                fields[key] = value
        for name, key in (("hot", c.POLICY_HOT), ("pinned", c.POLICY_PINNED)):
            if request.HasField(name):  # type: ignore[arg-type]
                fields[key] = int(getattr(request, name))
        if request.reset and fields:
            out.append(FieldViolation("reset", "reset deletes the policy: set no other field"))
        elif not request.reset and not fields:
            out.append(FieldViolation("sku", "nothing to change: set a field, or reset"))
        _raise_if(out)
        policy, _ = await self.engine.policies.set(sku, fields, reset=request.reset)
        return self._policy_pb(policy)

    def _policy_max(self, bound: int) -> int:
        return self.settings.max_hold_seconds if bound < 0 else bound

    @rich_errors
    async def GetSkuPolicy(
        self, request: pb.GetSkuPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SkuPolicy:
        """A SKU's policy with its effective values."""
        out: list[FieldViolation] = []
        sku = self._sku(request.sku, out)
        _raise_if(out)
        (policy,) = await self.engine.policies.get_many([sku])
        return self._policy_pb(policy)

    @rich_errors
    async def ListSkuPolicies(
        self, request: pb.ListSkuPoliciesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListSkuPoliciesResponse:
        """SKUs with a stored policy or recent sales, by SKU, a page at a time."""
        out: list[FieldViolation] = []
        size = request.page_size or DEFAULT_PAGE
        check_int(size, "page_size", 1, MAX_PAGE, out)
        after = ""
        if request.page_token:
            after = parse_page_token(request.page_token) or ""
            if not after:
                out.append(FieldViolation("page_token", "not a token from ListSkuPolicies"))
        _raise_if(out)
        policies, token = await self.engine.policies.list(size, after, request.hot_only)
        return pb.ListSkuPoliciesResponse(
            policies=[self._policy_pb(p) for p in policies], next_page_token=token
        )

    def _policy_pb(self, p: SkuPolicy) -> pb.SkuPolicy:
        s = self.settings
        msg = pb.SkuPolicy(
            sku=p.sku,
            reserve_timeout_ms=p.reserve_timeout_ms,
            hold_seconds=p.hold_seconds,
            max_line_quantity=p.max_line_quantity,
            hot=p.hot,
            pinned=p.pinned,
            stored=p.stored,
            effective_hot=p.effective_hot,
            effective_reserve_timeout_ms=p.timeout_ms(s),
            effective_hold_seconds=p.hold_seconds or s.default_hold_seconds,
            effective_max_line_quantity=p.max_line_quantity or c.MAX_QUANTITY,
            committed_24h=p.committed_window,
        )
        if p.updated_ms is not None:
            msg.updated_at.CopyFrom(timestamp(p.updated_ms))
        return msg

    # -- contention statistics (issue 4) ---------------------------------------------------
    @rich_errors
    async def GetContentionStats(
        self, request: pb.GetContentionStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetContentionStatsResponse:
        """The most-waited-on sales units over every process, with SKU-level hints."""
        out: list[FieldViolation] = []
        top_n = request.top_n or DEFAULT_TOP
        check_int(top_n, "top_n", 1, MAX_TOP, out)
        window_s: float | None = None
        configured = self.settings.contention_window_seconds
        if request.HasField("window"):
            if request.since_start:
                out.append(FieldViolation("window", "give a window or since_start, not both"))
            window_s = request.window.ToTimedelta().total_seconds()
            if not 0 < window_s <= configured:
                out.append(FieldViolation("window", f"must be within (0, {configured:g}] seconds"))
        _raise_if(out)
        if self.contention is None:
            raise DomainError(Reason.INTERNAL, "contention statistics are not running")
        merged, processes = await self.contention.merged(window_s)
        sketch = merged.since_start if request.since_start else merged.window
        stats = self.engine.contention
        reports = stats.report(sketch, top_n)
        resp = pb.GetContentionStatsResponse(
            keys=[_key_pb(r) for r in reports],
            sku_hints=[
                pb.SkuContentionHint(
                    sku=h.sku, keys=h.keys, wait_total_ms=h.wait_total_ms, flagged=h.flagged
                )
                for h in sku_hints(reports)
            ],
            processes=processes,
            skipped=merged.skipped,
            flag_ms=self.settings.contention_flag_ms,
        )
        if not request.since_start:
            resp.window.FromTimedelta(timedelta(seconds=window_s or configured))
        resp.generated_at.GetCurrentTime()
        return resp

    @rich_errors
    async def ExtendReservation(
        self, request: pb.ExtendReservationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExtendReservationResponse:
        """HELD only: the deadline becomes Redis's now + hold_seconds (the engine validates)."""
        reservation = await self.engine.extend(request.order_id, request.hold_seconds)
        return pb.ExtendReservationResponse(reservation=reservation_pb(reservation))

    # -- payment sync (issue 5) ------------------------------------------------------------
    @rich_errors
    async def ReportPayment(
        self, request: pb.ReportPaymentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReportPaymentResponse:
        """A provider's result: PAID commits, FAILED/CLOSED release; idempotent by transaction."""
        report = PaymentReport(
            provider=request.provider,
            transaction_id=request.transaction_id,
            status=_STATUS_NAME.get(request.status, "") if request.status else "",
            amount=request.amount,
        )
        out = payment_report_violations(request.order_id, report)
        if report.status == "PENDING":
            out = [v for v in out if v.field != "status"]
            out.append(FieldViolation("status", "must be PAID, FAILED or CLOSED (not PENDING)"))
        paid_at_ms: int | None = None
        if request.paid_at:
            try:
                paid_at_ms = parse_rfc3339(request.paid_at, "paid_at")
            except DomainError as err:
                out += err.violations
        _raise_if(out)
        if paid_at_ms is not None:
            report = dataclasses.replace(report, paid_at_ms=paid_at_ms)
        reservation, replayed = await self.engine.report_payment(request.order_id, report)
        return pb.ReportPaymentResponse(reservation=reservation_pb(reservation), replayed=replayed)

    @rich_errors
    async def MarkPaymentPending(
        self, request: pb.MarkPaymentPendingRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MarkPaymentPendingResponse:
        """HELD only: poll the provider for this order's payment (active channel)."""
        out: list[FieldViolation] = []
        self.resolver.order(request.order_id, out=out)
        pending = PendingPayment(request.payment.provider, request.payment.out_trade_no)
        check_payment(pending, "payment", out)
        _raise_if(out)
        reservation = await self.engine.mark_payment_pending(request.order_id, pending)
        return pb.MarkPaymentPendingResponse(reservation=reservation_pb(reservation))


def _pending(request: pb.ReserveRequest) -> PendingPayment | None:
    if not request.HasField("payment"):
        return None
    return PendingPayment(request.payment.provider, request.payment.out_trade_no)
