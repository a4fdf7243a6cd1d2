"""Domain errors and the one table that maps them onto gRPC status codes.

Every failure a client can see is a DomainError with a stable ErrorInfo reason (domain
`stockhold`); the servicer turns it into a google.rpc.Status with ErrorInfo (and BadRequest
field violations for malformed requests) through `to_rpc_status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from stockhold.constants import ERROR_DOMAIN


class Reason(StrEnum):
    """ErrorInfo reasons; the scripts return these names verbatim."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    INSUFFICIENT_STOCK = "INSUFFICIENT_STOCK"
    ORDER_CONFLICT = "ORDER_CONFLICT"
    ADJUSTMENT_CONFLICT = "ADJUSTMENT_CONFLICT"
    COUNT_CONFLICT = "COUNT_CONFLICT"
    STALE_COUNT = "STALE_COUNT"
    RESERVATION_NOT_FOUND = "RESERVATION_NOT_FOUND"
    RESERVATION_RELEASED = "RESERVATION_RELEASED"
    RESERVATION_EXPIRED = "RESERVATION_EXPIRED"
    RESERVATION_COMMITTED = "RESERVATION_COMMITTED"
    RESERVE_TIMEOUT = "RESERVE_TIMEOUT"
    STREAM_BACKPRESSURE = "STREAM_BACKPRESSURE"
    PAYMENT_AMOUNT_MISMATCH = "PAYMENT_AMOUNT_MISMATCH"
    PAYMENT_CONFLICT = "PAYMENT_CONFLICT"
    SUBSCRIPTION_NOT_FOUND = "SUBSCRIPTION_NOT_FOUND"
    SUBSCRIPTION_EXISTS = "SUBSCRIPTION_EXISTS"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RATE_LIMITED = "RATE_LIMITED"
    INTERNAL = "INTERNAL"


# The one table: domain reason -> gRPC status code.
STATUS_FOR_REASON: Final[Mapping[Reason, grpc.StatusCode]] = {
    Reason.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.INSUFFICIENT_STOCK: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.ORDER_CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    Reason.ADJUSTMENT_CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    Reason.COUNT_CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    Reason.STALE_COUNT: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.RESERVATION_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.RESERVATION_RELEASED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.RESERVATION_EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.RESERVATION_COMMITTED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.RESERVE_TIMEOUT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.STREAM_BACKPRESSURE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.PAYMENT_AMOUNT_MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.PAYMENT_CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    Reason.SUBSCRIPTION_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.SUBSCRIPTION_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Reason.BACKEND_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Reason.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Reason.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.INTERNAL: grpc.StatusCode.INTERNAL,
}

_MESSAGES: Final[Mapping[Reason, str]] = {
    Reason.INVALID_ARGUMENT: "the request is malformed",
    Reason.INSUFFICIENT_STOCK: "not enough stock",
    Reason.ORDER_CONFLICT: "order_id was already used for a different reservation",
    Reason.ADJUSTMENT_CONFLICT: "adjustment_id was already used with different contents",
    Reason.COUNT_CONFLICT: "count_id was already used with different contents",
    Reason.STALE_COUNT: (
        "a later count of this unit and warehouse was applied already; nothing changed"
    ),
    Reason.RESERVATION_NOT_FOUND: "no reservation with this order_id",
    Reason.RESERVATION_RELEASED: "the reservation was released",
    Reason.RESERVATION_EXPIRED: "the reservation expired",
    Reason.RESERVATION_COMMITTED: "the reservation was committed",
    Reason.RESERVE_TIMEOUT: "the SKU's reserve queue is too long now; nothing was held, retry",
    Reason.STREAM_BACKPRESSURE: (
        "too many messages of this stream are outstanding; nothing was held, retry after an answer"
    ),
    Reason.PAYMENT_AMOUNT_MISMATCH: "the paid amount differs from the order's; not committed",
    Reason.PAYMENT_CONFLICT: "this out_trade_no is already the payment of another order",
    Reason.SUBSCRIPTION_NOT_FOUND: "no subscription with this name",
    Reason.SUBSCRIPTION_EXISTS: "a subscription with this name exists with another definition",
    Reason.BACKEND_UNAVAILABLE: "the stock store (Redis) is unavailable; retry",
    Reason.UNAUTHENTICATED: "no valid credentials",
    Reason.PERMISSION_DENIED: "the caller's roles do not allow this call",
    Reason.RATE_LIMITED: "the caller is over its rate limit; nothing was done, retry later",
    Reason.INTERNAL: "internal error",
}


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One malformed field: a path such as `lines[2].unit.sku` and what is wrong with it."""

    field: str
    description: str


class DomainError(Exception):
    """A failure with a stable reason, metadata for ErrorInfo, and (for bad input) violations."""

    def __init__(
        self,
        reason: Reason,
        message: str | None = None,
        metadata: Mapping[str, object] | None = None,
        violations: Iterable[FieldViolation] = (),
    ) -> None:
        self.reason = reason
        self.message = message or _MESSAGES[reason]
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self.violations = tuple(violations)
        super().__init__(f"{reason}: {self.message}")

    @property
    def code(self) -> grpc.StatusCode:
        """The gRPC status code from the table."""
        return STATUS_FOR_REASON[self.reason]


def invalid(violations: Iterable[FieldViolation]) -> DomainError:
    """An INVALID_ARGUMENT error carrying BadRequest field violations."""
    vs = tuple(violations)
    summary = "; ".join(f"{v.field}: {v.description}" for v in vs[:5])
    return DomainError(Reason.INVALID_ARGUMENT, f"invalid request: {summary}", violations=vs)


def under(err: DomainError, prefix: str) -> DomainError:
    """The same error with its field paths inside a larger message (`orders[3].` + path).

    ReserveBatch and ReserveStream carry ReserveRequests; a BadRequest names the field of
    the message the client sent, e.g. `orders[3].lines[0].quantity`.
    """
    if not err.violations or not prefix:
        return err
    moved = [FieldViolation(prefix + v.field, v.description) for v in err.violations]
    if err.reason is Reason.INVALID_ARGUMENT:
        return invalid(moved)  # its message names the fields too
    return DomainError(err.reason, err.message, err.metadata, moved)


def to_rpc_status(err: DomainError) -> status_pb2.Status:
    """Pack a DomainError as google.rpc.Status with ErrorInfo and, if any, BadRequest."""
    code = err.code.value[0]
    details: list[any_pb2.Any] = []
    info = error_details_pb2.ErrorInfo(
        reason=err.reason.value, domain=ERROR_DOMAIN, metadata=err.metadata
    )
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if err.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in err.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    return status_pb2.Status(code=code, message=err.message, details=details)


# -- the servicers' side: a refusal answered as a rich status ------------------------------------

# Refusal lines keep the servicer's logger name (what operators filter on).
_refusals = logging.getLogger("stockhold.servicer")

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
            log_refusal(fn.__name__, err)
            await context.abort_with_status(rpc_status.to_status(to_rpc_status(err)))
            raise AssertionError("abort_with_status returned") from err  # pragma: no cover

    return wrapper


def log_refusal(method: str, err: DomainError) -> None:
    """One warning per refusal that is not part of normal business (see _QUIET); calls
    answered UNAVAILABLE are summed up instead (`_unavailable`)."""
    if err.reason is Reason.BACKEND_UNAVAILABLE:
        _unavailable.note(method, err)
    elif err.reason not in _QUIET:
        _refusals.warning("%s refused: %s", method, err, extra={"meta": err.metadata})


UNAVAILABLE_WARN_EVERY: Final = 10.0  # s


class _UnavailableSummary:
    """Calls answered UNAVAILABLE (BACKEND_UNAVAILABLE) with Redis reachable raise no line of
    their own (a Redis outage is logged once by the health loop), yet an operator must see
    them: a Redis call past redis_socket_timeout_seconds (cause TimeoutError, a saturated box
    or a slow Redis), a full pool (queued), replication. One WARNING at most every
    UNAVAILABLE_WARN_EVERY seconds per process sums them up by method and cause since the
    previous one; the first one of a burst at once, the rest of a burst when the period
    ends."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.last = -UNAVAILABLE_WARN_EVERY
        self.timer: asyncio.TimerHandle | None = None
        self.first = 0.0  # when the first call of those counted now was answered

    def note(self, method: str, err: DomainError) -> None:
        cause = str(err.metadata.get("cause", "")) or "unknown"
        key = (method, cause)
        if not self.counts:
            self.first = time.monotonic()
        self.counts[key] = self.counts.get(key, 0) + 1
        wait = self.last + UNAVAILABLE_WARN_EVERY - time.monotonic()
        if wait <= 0:
            self.flush()
        elif self.timer is None:
            with contextlib.suppress(RuntimeError):  # no running loop: the next call logs
                self.timer = asyncio.get_running_loop().call_later(wait, self.flush)

    def flush(self) -> None:
        self.timer = None
        if not self.counts:
            return
        now = time.monotonic()
        counts, self.counts = self.counts, {}
        since = now - self.first
        self.last = now
        _refusals.warning(
            "%d call(s) answered UNAVAILABLE within %.1f s (Redis calls failing or "
            "timing out: Redis slow or down, or this process saturated); by method and cause: "
            "%s",
            sum(counts.values()),
            since,
            ", ".join(f"{m} {c} x{n}" for (m, c), n in sorted(counts.items())),
            extra={"meta": {f"{m}:{c}": n for (m, c), n in counts.items()}},
        )


_unavailable = _UnavailableSummary()


# Refusals that are part of normal business: not worth a log line each.
_QUIET = frozenset(
    {
        Reason.INSUFFICIENT_STOCK,
        Reason.INVALID_ARGUMENT,
        Reason.RESERVATION_NOT_FOUND,
        Reason.SUBSCRIPTION_NOT_FOUND,
        Reason.ORDER_CONFLICT,
        Reason.ADJUSTMENT_CONFLICT,
        Reason.COUNT_CONFLICT,
        Reason.RESERVATION_EXPIRED,
        Reason.RESERVATION_RELEASED,
        Reason.RESERVATION_COMMITTED,
        # shedding is the policy working as meant; counted in metrics and contention stats
        Reason.RESERVE_TIMEOUT,
        # flow control of a stream that sends faster than its answers come back
        Reason.STREAM_BACKPRESSURE,
        # Redis unreachable: the health loop logs the outage once and its end once, not a
        # line per refused call (overload, cause "queued", is counted in metrics)
        Reason.BACKEND_UNAVAILABLE,
    }
)
