"""The gRPC servicer: wire messages <-> domain objects, validation, rich errors. Kept thin."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import deque
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from urllib.parse import unquote

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import status_pb2
from grpc_status import rpc_status

from stockhold import constants as c
from stockhold import counts
from stockhold.auth import current_caller
from stockhold.contention import KeyReport, sku_hints
from stockhold.contention_store import ContentionStore
from stockhold.delivery.rpc import SubscriptionRpc
from stockhold.delivery.subscriptions import SubscriptionStore
from stockhold.engine import Engine, check_payment, payment_report_violations
from stockhold.errors import (
    DomainError,
    FieldViolation,
    Reason,
    invalid,
    log_refusal,
    rich_errors,
    to_rpc_status,
    under,
)
from stockhold.events import (
    EARLIEST,
    EventFilter,
    EventReader,
    StreamEvent,
    StreamId,
    check_not_ahead,
    cursor_positions,
    encode_cursor,
    event_filter,
)
from stockhold.model import PaymentInfo, PaymentReport, PendingPayment, Reservation, StockLevel
from stockhold.policies import MAX_PAGE, SkuPolicy, parse_page_token
from stockhold.resolver import ResolvedOrder, check_int, check_text
from stockhold.settings import Settings
from stockhold.timeparse import parse_rfc3339
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


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
        oversold=s.oversold,
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


def actor_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Who is calling: the actor recorded on every event the call writes (Event.actor).

    Every RPC that writes asks here, once. It is the identity auth.AuthInterceptor
    authenticated for this call (a token's name or a client certificate's identity, set in a
    contextvar before the handler ran); ACTOR_ANONYMOUS when the server runs without an auth
    file (loopback only, or --allow-unauthenticated). `context` is not read: the identity is
    the call's, whichever task of the call asks.
    """
    return current_caller()


class InventoryServicer(SubscriptionRpc, pb_grpc.InventoryServicer):
    """stockhold.v1.Inventory over an Engine."""

    def __init__(
        self, engine: Engine, settings: Settings, contention: ContentionStore | None = None
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.resolver = engine.resolver
        self.contention = contention
        self.subscriptions = SubscriptionStore(engine.calls)  # the SubscriptionRpc methods
        # WatchEvents calls running now; set when the server shuts down (they end UNAVAILABLE).
        self.watches = 0
        self._closing = asyncio.Event()

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
        return await self.reserve_order(request, context.time_remaining(), actor_of(context))

    async def reserve_order(
        self, request: pb.ReserveRequest, time_remaining: float | None, actor: str
    ) -> pb.ReserveResponse:
        """One order, as every call shape reserves it: validate, reserve, build the answer.

        Reserve and each ReserveStream message come through here, and ReserveBatch through
        the same `resolve_request` and engine path (`Engine.reserve_many`), so they share
        validation, idempotency, thresholds (`time_remaining`: seconds left of the call's
        deadline) and errors, and their orders share the engine's script calls. `actor`: the
        caller (actor_of). Raises DomainError; BadRequest paths are relative to the
        ReserveRequest.
        """
        order, amount, pending = self.resolve_request(request)
        reservation, replayed = await self.engine.reserve(
            order, time_remaining, amount, pending, actor=actor
        )
        return pb.ReserveResponse(reservation=reservation_pb(reservation), replayed=replayed)

    def resolve_request(
        self, request: pb.ReserveRequest
    ) -> tuple[ResolvedOrder, int, PendingPayment | None]:
        """Validate a ReserveRequest: (order, amount, payment to poll); DomainError if bad."""
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
        return order, request.amount, pending

    async def answer_order(
        self,
        method: str,
        request: pb.ReserveRequest,
        time_remaining: float | None,
        prefix: str,
        actor: str,
    ) -> pb.ReserveResponse | status_pb2.Status:
        """`reserve_order` with a refusal returned as the google.rpc.Status a unary Reserve
        would carry (field paths under `prefix`), for a stream's messages."""
        try:
            return await self.reserve_order(request, time_remaining, actor)
        except DomainError as err:
            log_refusal(method, err)
            return to_rpc_status(under(err, prefix))
        except Exception as exc:  # one order's bug must not take the others' answers along
            log.exception("%s: an order failed", method)
            return to_rpc_status(
                DomainError(Reason.INTERNAL, metadata={"cause": type(exc).__name__})
            )

    @rich_errors
    async def ReserveBatch(
        self, request: pb.ReserveBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReserveBatchResponse:
        """1..100 orders, each all or nothing on its own; one result per order, in order.

        A repeated order_id is answered as a retry of its first occurrence in the batch: it is
        reserved after it, so the same contents get the same reservation (`replayed`), and
        other contents ORDER_CONFLICT.
        """
        n = len(request.orders)
        if not 1 <= n <= c.MAX_BATCH_ORDERS:
            bound = f"must hold 1..{c.MAX_BATCH_ORDERS} orders (got {n})"
            raise invalid([FieldViolation("orders", bound)])
        remaining, actor = context.time_remaining(), actor_of(context)
        answers: list[pb.ReserveBatchResult | None] = [None] * n
        todo = list(range(n))
        # Rounds: each round holds the first occurrence of every order id still to do, all
        # queued at once (Engine.reserve_many: no task per order); a repeated id waits for
        # the next round, after its earlier occurrence was answered.
        while todo:
            seen: set[str] = set()
            now: list[int] = []
            later: list[int] = []
            for i in todo:
                oid = request.orders[i].order_id
                (later if oid and oid in seen else now).append(i)
                seen.add(oid)
            sent: list[int] = []
            resolved = []
            for i in now:
                try:
                    resolved.append(self.resolve_request(request.orders[i]))
                    sent.append(i)
                except DomainError as err:
                    answers[i] = _batch_refusal(err, i)
            if resolved:
                results = await self.engine.reserve_many(resolved, remaining, actor=actor)
                for i, r in zip(sent, results, strict=True):
                    if isinstance(r, DomainError):
                        answers[i] = _batch_refusal(r, i)
                    else:
                        reservation, replayed = r
                        reserved = pb.ReserveResponse(
                            reservation=reservation_pb(reservation), replayed=replayed
                        )
                        answers[i] = pb.ReserveBatchResult(reserved=reserved)
            todo = later
        return pb.ReserveBatchResponse(results=[a for a in answers if a is not None])

    # grpc.aio also takes a coroutine that answers with context.write (typed stubs only know
    # response iterators): its try/finally then runs however the call ends.
    async def ReserveStream(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.ReserveStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Reserves over a bidirectional stream: one answer per message, in any order."""
        await _ReserveStream(self, context).run(request_iterator)

    @rich_errors
    async def Commit(
        self, request: pb.CommitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CommitResponse:
        """HELD -> COMMITTED."""
        self._check_order_and_note(request.order_id, "payment_ref", request.payment_ref)
        reservation = await self.engine.commit(
            request.order_id, request.payment_ref, actor=actor_of(context)
        )
        return pb.CommitResponse(reservation=reservation_pb(reservation))

    @rich_errors
    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReleaseResponse:
        """HELD -> RELEASED."""
        self._check_order_and_note(request.order_id, "reason", request.reason)
        reservation = await self.engine.release(
            request.order_id, request.reason, actor=actor_of(context)
        )
        return pb.ReleaseResponse(reservation=reservation_pb(reservation))

    @rich_errors
    async def GetReservation(
        self, request: pb.GetReservationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Reservation:
        """The reservation as it stands (a due hold is expired first, by the caller)."""
        self.resolver.order(request.order_id)
        found = await self.engine.get_reservation(request.order_id, actor=actor_of(context))
        return reservation_pb(found)

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
            request.adjustment_id,
            unit,
            warehouse,
            request.delta,
            request.reason,
            actor=actor_of(context),
        )
        return pb.AdjustStockResponse(level=level_pb(level), replayed=replayed)

    @rich_errors
    async def SetOnHand(
        self, request: pb.SetOnHandRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SetOnHandResponse:
        """A cycle count: available := on_hand - reserved (negative: oversold, stored as is)."""
        u = request.unit
        count = counts.check_count(
            self.resolver,
            request.count_id,
            u.sku,
            u.spec,
            u.barcode,
            request.warehouse,
            request.on_hand,
            request.counted_at,
        )
        done = await counts.set_on_hand(self.engine.calls, count, actor_of(context))
        return pb.SetOnHandResponse(
            level=level_pb(done.level),
            replayed=done.replayed,
            previous_on_hand=done.previous_on_hand,
            oversold=done.oversold,
        )

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
        policy, _ = await self.engine.policies.set(
            sku, fields, reset=request.reset, actor=actor_of(context)
        )
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
            # Not ToTimedelta(): a Duration beyond timedelta's range (any int64 seconds on
            # the wire) would raise OverflowError (UNKNOWN) instead of being refused.
            window_s = request.window.seconds + request.window.nanos / 1e9
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
        """HELD only: the deadline becomes max(itself, Redis's now + hold_seconds), never
        closer; `extended` says whether it moved (the engine validates)."""
        reservation, extended = await self.engine.extend(
            request.order_id, request.hold_seconds, actor=actor_of(context)
        )
        return pb.ExtendReservationResponse(
            reservation=reservation_pb(reservation), extended=extended
        )

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
        reservation, replayed = await self.engine.report_payment(
            request.order_id, report, actor=actor_of(context)
        )
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
        reservation = await self.engine.mark_payment_pending(
            request.order_id, pending, actor=actor_of(context)
        )
        return pb.MarkPaymentPendingResponse(reservation=reservation_pb(reservation))

    # -- events (issue 12) -----------------------------------------------------------------
    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Event]:
        """Every partition's events from the request's cursor, filtered, until cancelled."""
        self.watches += 1
        try:
            async for event in self._watch(request):
                yield event
        except DomainError as err:
            log_refusal("WatchEvents", err)
            await context.abort_with_status(rpc_status.to_status(to_rpc_status(err)))
        finally:
            self.watches -= 1

    async def _watch(self, request: pb.WatchEventsRequest) -> AsyncIterator[pb.Event]:
        """The watch loop: read every partition after its position (a bounded batch each),
        deliver what passes the filter with the cursor after it, and wait a poll interval
        when no partition had a full batch. Cancellation (the client) stops it at an await."""
        s = self.settings
        reader = EventReader(self.engine.client, self.resolver, s.partitions, s.watch_batch_size)
        positions, wanted = await self._watch_start(request, reader)
        while not self._closing.is_set():
            full = False
            for events in await reader.read(positions):
                for e in events:
                    positions[e.partition] = e.id
                    if wanted.matches(e):
                        yield event_pb(e, encode_cursor(positions))
                full = full or len(events) >= reader.batch
            if not full:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), s.watch_poll_interval_seconds)
        raise DomainError(
            Reason.BACKEND_UNAVAILABLE,
            "the server is shutting down: reconnect with the last event's cursor",
            metadata={"cause": "shutdown"},
        )

    async def _watch_start(
        self, request: pb.WatchEventsRequest, reader: EventReader
    ) -> tuple[list[StreamId], EventFilter]:
        """Validate the request: the start positions and the filter; DomainError if bad."""
        out: list[FieldViolation] = []
        wanted = event_filter(request.types, request.warehouses, request.skus, out)
        positions = cursor_positions(request.cursor, self.settings.partitions, "cursor", out)
        _raise_if(out)
        if positions is not None and request.cursor != EARLIEST:
            check_not_ahead(positions, await reader.heads(), "cursor")
        if positions is None:
            positions = await reader.heads()
        return positions, wanted

    def close_watches(self) -> None:
        """Server shutdown: every WatchEvents call ends UNAVAILABLE within a poll interval."""
        self._closing.set()


def event_pb(e: StreamEvent, cursor: str) -> pb.Event:
    """A stream entry -> wire message, with the cursor that resumes right after it."""
    return pb.Event(
        id=e.id_text,
        type=e.type,
        order_id=e.order_id,
        adjustment_id=e.adjustment_id,
        sku=e.sku,
        skus=e.skus,
        warehouses=e.warehouses,
        ts=timestamp(e.ts_ms),
        data_json=e.data_json,
        partition=e.partition,
        cursor=cursor,
        actor=e.actor,
    )


def _batch_refusal(err: DomainError, i: int) -> pb.ReserveBatchResult:
    """A refused order of a ReserveBatch: its google.rpc.Status, field paths under orders[i]."""
    log_refusal("ReserveBatch", err)
    return pb.ReserveBatchResult(error=to_rpc_status(under(err, f"orders[{i}].")))


def _pending(request: pb.ReserveRequest) -> PendingPayment | None:
    if not request.HasField("payment"):
        return None
    return PendingPayment(request.payment.provider, request.payment.out_trade_no)


class _ReserveStream:
    """One ReserveStream call: a reader task takes messages, one task reserves each, and
    the call's own task writes the answers as they come (so they may be out of order).

    Flow control: at most `stream_max_outstanding` messages are being reserved at once; a
    message beyond it is answered RESOURCE_EXHAUSTED / STREAM_BACKPRESSURE at once, unsent.
    While as many answers wait to be written (the client is not reading), no more messages
    are read: HTTP/2 flow control then holds the client back. After the client half-closes,
    every message still outstanding is answered, then the call ends OK. If the call is
    cancelled (or its deadline passes), the reserves still queued are dropped unsent and
    those already sent to Redis complete unanswered, exactly as a cancelled unary Reserve.
    """

    def __init__(self, servicer: InventoryServicer, context: grpc.aio.ServicerContext[Any, Any]):
        self.servicer = servicer
        self.context = context
        self.actor = actor_of(context)  # the caller of every message's reserve
        self.limit = servicer.settings.stream_max_outstanding
        self.answers: deque[pb.ReserveStreamResponse] = deque()
        self.reserving: set[asyncio.Task[None]] = set()  # to cancel them with the call
        self.outstanding = 0  # messages taken whose answer is not queued yet
        self.reading = True
        self.wake = asyncio.Event()  # an answer is ready, or the reader is done
        self.room = asyncio.Event()  # the answer queue is below the limit again
        self.room.set()

    async def run(self, requests: AsyncIterator[pb.ReserveStreamRequest]) -> None:
        """Answer every message until the client half-closes and all are answered."""
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                while self.answers:
                    await self.context.write(self.answers.popleft())
                    if len(self.answers) < self.limit:
                        self.room.set()
                if not self.reading and not self.outstanding:
                    break
                self.wake.clear()
                await self.wake.wait()
            await reader  # a failed read fails the call
        finally:
            reader.cancel()
            for task in self.reserving:
                task.cancel()

    async def _read(self, requests: AsyncIterator[pb.ReserveStreamRequest]) -> None:
        try:
            async for msg in requests:
                if len(self.answers) >= self.limit:
                    self.room.clear()
                    await self.room.wait()
                if self.outstanding >= self.limit:
                    self._answer(msg.correlation_id, to_rpc_status(self._backpressure()))
                    continue
                self.outstanding += 1
                task = asyncio.create_task(self._reserve(msg))
                self.reserving.add(task)
                task.add_done_callback(self._finished)
        finally:
            self.reading = False
            self.wake.set()

    def _backpressure(self) -> DomainError:
        return DomainError(Reason.STREAM_BACKPRESSURE, metadata={"max_outstanding": self.limit})

    async def _reserve(self, msg: pb.ReserveStreamRequest) -> None:
        """Answer one message (unless the call is cancelled first)."""
        out: list[FieldViolation] = []
        check_text(msg.correlation_id, "correlation_id", 1, c.MAX_CORRELATION_ID, out, False)
        if not msg.HasField("request"):
            out.append(FieldViolation("request", "required: the order to reserve"))
        result: pb.ReserveResponse | status_pb2.Status
        if out:
            err = invalid(out)
            log_refusal("ReserveStream", err)
            result = to_rpc_status(err)
        else:
            # answer_order turns every failure but a cancel into this message's answer.
            result = await self.servicer.answer_order(
                "ReserveStream", msg.request, self.context.time_remaining(), "request.", self.actor
            )
        self.outstanding -= 1
        self._answer(msg.correlation_id, result)

    def _answer(self, correlation_id: str, result: pb.ReserveResponse | status_pb2.Status) -> None:
        if isinstance(result, pb.ReserveResponse):
            answer = pb.ReserveStreamResponse(correlation_id=correlation_id, reserved=result)
        else:
            answer = pb.ReserveStreamResponse(correlation_id=correlation_id, error=result)
        self.answers.append(answer)
        self.wake.set()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.reserving.discard(task)
