"""The subscription RPCs (issue 12, docs/events.md): CreateSubscription .. ReplayFrom.

`SubscriptionRpc` is mixed into `InventoryServicer`: wire messages <-> the store
(subscriptions.py), lag (lag.py) and replay (replay.py). Every request is validated in full
before anything is read or written, so a refusal changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

import grpc

from stockhold.delivery import lag, replay
from stockhold.delivery.subscriptions import (
    StoredSubscription,
    SubscriptionStore,
    check_name,
    check_secret,
    check_subscription,
)
from stockhold.errors import FieldViolation, invalid, rich_errors
from stockhold.events import (
    EARLIEST,
    EventReader,
    StreamId,
    check_not_ahead,
    cursor_positions,
    event_filter,
)
from stockhold.resolver import check_int
from stockhold.settings import Settings
from stockhold.store.calls import ScriptCalls
from stockhold.v1 import inventory_pb2 as pb

_ON_FAILURE_NAME: Final = {pb.ON_FAILURE_UNSPECIFIED: "", pb.FLOW: "FLOW", pb.WAIT: "WAIT"}
_ON_FAILURE: Final = {"FLOW": pb.FLOW, "WAIT": pb.WAIT}
_STATUS: Final = {"HEALTHY": pb.HEALTHY, "WARN": pb.WARN, "ALERT": pb.ALERT}
MAX_REPLAY_EVENTS: Final = 2**31 - 1


def subscription_pb(stored: StoredSubscription) -> pb.Subscription:
    """A stored subscription -> wire message (the secret as its fingerprint only)."""
    s = stored.sub
    msg = pb.Subscription(
        name=s.name,
        url=s.url,
        warehouses=s.warehouses,
        types=s.types,
        skus=s.skus,
        timeout_ms=s.timeout_ms,
        retry=pb.RetryPolicy(
            max_attempts=s.max_attempts,
            initial_backoff_ms=s.initial_backoff_ms,
            max_backoff_ms=s.max_backoff_ms,
        ),
        on_failure=_ON_FAILURE[s.on_failure],
        secret_fingerprint=stored.secret_fingerprint,
    )
    msg.created_at.FromMilliseconds(stored.created_ms)
    return msg


def lag_pb(s: lag.SubscriptionLag) -> pb.SubscriptionLag:
    """One subscription's lag -> wire message."""
    return pb.SubscriptionLag(
        name=s.name,
        backlog=s.backlog,
        oldest_age_ms=s.oldest_age_ms,
        failed=s.failed,
        rate_per_second=s.rate,
        wms_p50_ms=s.p50_ms,
        wms_p99_ms=s.p99_ms,
        status=_STATUS[s.status],
        slow_consumer=s.slow_consumer,
        lost=s.lost,
        partitions=[
            pb.PartitionLag(
                partition=p.partition,
                backlog=p.backlog,
                oldest_age_ms=p.oldest_age_ms,
                failed=p.failed,
                rate_per_second=p.rate,
                wms_p50_ms=p.p50_ms,
                wms_p99_ms=p.p99_ms,
                status=_STATUS[p.status],
                owner=p.owner,
                lost=p.lost,
            )
            for p in s.partitions
        ],
    )


def _raise_if(out: list[FieldViolation]) -> None:
    if out:
        raise invalid(out)


class SubscriptionRpc:
    """The subscription methods of stockhold.v1.Inventory (InventoryServicer inherits them)."""

    settings: Settings
    subscriptions: SubscriptionStore

    @property
    def _calls(self) -> ScriptCalls:
        return self.subscriptions.calls

    async def _start(
        self, cursor: str, field: str, out: list[FieldViolation]
    ) -> Sequence[StreamId] | Literal["now", "earliest"] | None:
        """A validated cursor field: "now" (""), "earliest", or positions none of which is
        ahead of its stream; None (with a violation in `out`) when it is not a cursor.
        Raises INVALID_ARGUMENT for a cursor ahead of a stream (nothing read but the heads)."""
        positions = cursor_positions(cursor, self.settings.partitions, field, out)
        if cursor == EARLIEST:
            return "earliest"
        if not cursor:
            return "now"
        if positions is None or out:
            return None
        calls = self._calls
        reader = EventReader(calls.client, calls.resolver, self.settings.partitions, 1)
        check_not_ahead(positions, await reader.heads(), field)
        return positions

    @rich_errors
    async def CreateSubscription(
        self, request: pb.CreateSubscriptionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateSubscriptionResponse:
        """Store a subscription and create its groups at the start cursor (idempotent by name)."""
        s = request.subscription
        out: list[FieldViolation] = []
        sub = check_subscription(
            name=s.name,
            url=s.url,
            types=list(s.types),
            warehouses=list(s.warehouses),
            skus=list(s.skus),
            timeout_ms=s.timeout_ms,
            max_attempts=s.retry.max_attempts,
            initial_backoff_ms=s.retry.initial_backoff_ms,
            max_backoff_ms=s.retry.max_backoff_ms,
            on_failure=_ON_FAILURE_NAME.get(s.on_failure, str(s.on_failure)),
            out=out,
        )
        check_secret(request.secret, "secret", out)
        if out:  # the cursor's own violation joins them; no stream is read
            cursor_positions(request.start_cursor, self.settings.partitions, "start_cursor", out)
            _raise_if(out)
        start = await self._start(request.start_cursor, "start_cursor", out)
        _raise_if(out)
        assert start is not None
        stored, created = await self.subscriptions.create(sub, request.secret, start)
        answer = pb.CreateSubscriptionResponse(
            subscription=subscription_pb(stored), created=created
        )
        if created and not request.secret:
            answer.secret = stored.secret  # the one time it is shown
        return answer

    def _name(self, name: str) -> None:
        out: list[FieldViolation] = []
        check_name(name, "name", out)
        _raise_if(out)

    @rich_errors
    async def GetSubscription(
        self, request: pb.GetSubscriptionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Subscription:
        """One subscription; NOT_FOUND (SUBSCRIPTION_NOT_FOUND) when there is none."""
        self._name(request.name)
        return subscription_pb(await self.subscriptions.require(request.name))

    @rich_errors
    async def ListSubscriptions(
        self, request: pb.ListSubscriptionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListSubscriptionsResponse:
        """Every subscription, by name."""
        stored = await self.subscriptions.all()
        return pb.ListSubscriptionsResponse(subscriptions=[subscription_pb(s) for s in stored])

    @rich_errors
    async def DeleteSubscription(
        self, request: pb.DeleteSubscriptionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteSubscriptionResponse:
        """Drop a subscription, its groups, failed set and statistics (again: deleted=false)."""
        self._name(request.name)
        return pb.DeleteSubscriptionResponse(deleted=await self.subscriptions.delete(request.name))

    @rich_errors
    async def GetSubscriptionLag(
        self, request: pb.GetSubscriptionLagRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetSubscriptionLagResponse:
        """Backlog, oldest age, failed, rate, WMS times and status, per subscription and
        partition ("" : every subscription)."""
        if request.name:
            self._name(request.name)
            names = [(await self.subscriptions.require(request.name)).sub.name]
        else:
            names = await self.subscriptions.names()
        limits = lag.Thresholds.of(self.settings)
        figures = await lag.measure(self.subscriptions, names, limits)
        return pb.GetSubscriptionLagResponse(
            subscriptions=[lag_pb(s) for s in figures],
            warn_events=limits.warn_events,
            alert_events=limits.alert_events,
            slow_consumer_ms=limits.slow_consumer_ms,
        )

    @rich_errors
    async def ReplayFailed(
        self, request: pb.ReplayFailedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReplayFailedResponse:
        """POST the failed events matching the filter again, oldest first, clearing each one
        the WMS takes; stop at the first it refuses."""
        out: list[FieldViolation] = []
        check_name(request.name, "name", out)
        wanted = event_filter(request.types, request.warehouses, request.skus, out)
        check_int(request.max_events, "max_events", 0, MAX_REPLAY_EVENTS, out)
        _raise_if(out)
        stored = await self.subscriptions.require(request.name)
        done = await replay.replay_failed(self.subscriptions, stored, wanted, request.max_events)
        return pb.ReplayFailedResponse(
            delivered=done.delivered, remaining=done.remaining, error=done.error
        )

    @rich_errors
    async def ReplayFrom(
        self, request: pb.ReplayFromRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReplayFromResponse:
        """Rewind every partition's group to the cursor: what follows is delivered again."""
        out: list[FieldViolation] = []
        check_name(request.name, "name", out)
        if not request.cursor:
            out.append(FieldViolation("cursor", 'required: an Event\'s cursor or "earliest"'))
            _raise_if(out)
        if out:
            cursor_positions(request.cursor, self.settings.partitions, "cursor", out)
            _raise_if(out)
        start = await self._start(request.cursor, "cursor", out)
        _raise_if(out)
        stored = await self.subscriptions.require(request.name)
        positions = [(0, 0)] * self.settings.partitions if start == "earliest" else start
        assert isinstance(positions, list)
        done = await replay.replay_from(self.subscriptions, stored.sub, positions)
        return pb.ReplayFromResponse(
            partitions=done.partitions, truncated_partitions=done.truncated
        )
