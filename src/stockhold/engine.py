"""The engine: every operation is one atomic Lua script call against Redis.

The engine holds no locks and no state beyond its Redis client: it turns validated commands
into script calls and script replies into domain objects or DomainErrors.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Sequence
from typing import Any, NamedTuple, TypeVar

import orjson

from stockhold import constants as c
from stockhold import metrics, scripts
from stockhold.batcher import Batcher, NotSent
from stockhold.contention import ContentionStats, Outcome, new_tracker
from stockhold.crossslot import CrossSlot, PartOrder, distinct_skus
from stockhold.errors import DomainError, FieldViolation, Reason, invalid
from stockhold.model import PaymentReport, PendingPayment, PollClaim, Reservation, StockLevel
from stockhold.policies import PolicyStore
from stockhold.resolver import (
    OrderKeys,
    ResolvedOrder,
    Unit,
    check_int,
    check_text,
    escape,
    partition_tag,
)
from stockhold.settings import Settings
from stockhold.store.calls import RedisClient, ScriptCalls, connect, redis_errors
from stockhold.store.hotclient import HotClient

log = logging.getLogger(__name__)

T = TypeVar("T")
# A shed Reserve must be answered before the client's own deadline passes, with room for a
# busy event loop and the trip back (docs/api.md, "SKU policies and reserve thresholds").
DEADLINE_MARGIN_S = 0.02

# Redis Cluster: batches of the reserve and transition batchers in flight, per
# batch_max_inflight (see Engine.__init__).
CLUSTER_INFLIGHT = 8

# How often a commit/release re-reads a record whose stock keys changed under it.
_KEYS_CHANGED_RETRIES = 3


class Transition(NamedTuple):
    """One commit, release, payment report or expiry of a due hold for the transition batcher."""

    op: str
    keys: OrderKeys
    arg: str
    actor: str  # who causes it: the actor of its events (constants.ACTOR_*)


class PaidOrder(NamedTuple):
    """A Reserve that carries an amount and/or a payment to poll (issue 5).

    ResolvedOrder stays the resolver's (and its compiled twin's) plain 5-tuple; what a payment
    adds travels next to it, with the fingerprint extended by `payment_fingerprint`.
    """

    order: ResolvedOrder
    amount: int
    payment: PendingPayment | None
    fingerprint: str


# An order as queued in the reserve batcher (and a part in a cross-slot partition's): the
# order and who reserves it (the ORDER_RESERVED event's actor).
Queued = tuple[ResolvedOrder | PaidOrder, str]


class _PendingReserve(NamedTuple):
    """An order queued in the reserve batcher, with what its answer needs."""

    entry: Any  # batcher._Entry of the order
    units: Sequence[Unit]
    contended: Sequence[bool]
    threshold_ms: int
    sku: str
    hot: bool
    by_deadline: bool
    shed: bool


class PartitionMismatch(RuntimeError):
    """The configured partition count (or the key layout) differs from the one this Redis was
    set up with."""


# A new deployment records its partition count and layout together; an existing one without a
# layout was written by a stockhold from before layouts were recorded (layout 1). Both keys
# are in the {meta} slot. Returns [partition count, layout or false].
_RECORD_LAYOUT = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[2], ARGV[2], 'NX') end
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])}
"""


class ReserveResult(NamedTuple):
    """One order's answer from reserve.lua (`reserve_results`)."""

    reservation: Reservation | None  # None when refused
    replayed: bool
    err: str | None  # the refusal's reason
    meta: dict[str, Any]  # the refusal's details
    pol: Sequence[int]  # flat (timeout ms, hot 0|1, pinned 0|1) per distinct SKU, maybe empty


# Small counts and indexes as ARGV text, formatted once.
_TEXT = tuple(str(i) for i in range(c.MAX_LINES + 2))


def _text(i: int) -> str:
    return _TEXT[i] if i < len(_TEXT) else str(i)


_NO_META: dict[str, Any] = {}


def _payment_ident(provider: str, out_trade_no: str) -> str:
    """The id of a payment's out_trade_no map: `<provider>:<out_trade_no>`, escaped."""
    return f"{escape(provider)}:{escape(out_trade_no)}"


def _unpack(
    item: ResolvedOrder | PaidOrder,
) -> tuple[ResolvedOrder, str, int, PendingPayment | None]:
    """(order, fingerprint, amount, payment) of an order as queued."""
    if isinstance(item, PaidOrder):
        return item.order, item.fingerprint, item.amount, item.payment
    return item, item.fingerprint, 0, None


def reserve_results(orders: Sequence[Queued], reply: bytes | str) -> list[ReserveResult]:
    """Read reserve.lua's reply (one JSON text, see its header) for the orders of its call: a
    fresh hold is built from what the call sent plus the reply, a replay from the stored
    record."""
    now, *entries = orjson.loads(reply)
    out: list[ReserveResult] = []
    for (item, _actor), entry in zip(orders, entries, strict=True):
        kind, pol = entry[0], entry[1]
        if kind == 1:
            if isinstance(item, PaidOrder):
                order, amount, payment = item.order, item.amount, item.payment
            else:
                order, amount, payment = item, 0, None
            held = Reservation.held(
                order.keys.order_id, order.units, entry[3], now, entry[2], amount, payment, entry[4]
            )
            out.append(ReserveResult(held, False, None, _NO_META, pol))
        elif kind == 2:
            flat = entry[2]
            rec = dict(zip(flat[::2], flat[1::2], strict=True))
            out.append(ReserveResult(Reservation.from_record(rec), True, None, _NO_META, pol))
        else:
            out.append(ReserveResult(None, False, entry[2], entry[3] or {}, pol))
    return out


def _transition_result(entry: Sequence[Any]) -> dict[str, Any]:
    """One entry of transition.lua's reply (see its header) as a result dict: {"ok": 1,
    "changed", "replayed", "stuck", "rec": record} or {"err": REASON, "meta": {...}}."""
    if entry[0] == 0:
        return {"err": entry[1], "meta": entry[2]}
    flat = entry[2]
    rec = dict(zip(flat[::2], flat[1::2], strict=True))
    return {
        "ok": 1,
        "changed": entry[1],
        "replayed": entry[3],
        "stuck": entry[4],
        "settling": entry[5],
        "rec": rec,
    }


def _raise_for(result: dict[str, Any]) -> None:
    err = result.get("err")
    if err is not None:
        meta = result.get("meta") or {}
        raise DomainError(Reason(err), metadata=meta)


class Engine:
    """Reservation operations over one Redis deployment."""

    def __init__(
        self, client: RedisClient, settings: Settings, hot: HotClient | None = None
    ) -> None:
        self.calls = calls = ScriptCalls(client, settings, hot)
        self.client = client
        self.settings = settings
        self.resolver = calls.resolver
        self.scripts = calls.scripts
        self.policies = PolicyStore(calls)
        # The scripts carry the configuration in their source; a call names the one it was
        # built for (stockhold.scripts): ARGV[1] of reserve.lua and transition.lua.
        self._config_id = scripts.config_id(settings)
        self._sku_keys: dict[str, str] = {}
        # Contention figures of this process (published to Redis by the server).
        self.contention = ContentionStats(
            capacity=settings.contention_capacity,
            window_s=settings.contention_window_seconds,
            slot_s=settings.contention_slot_seconds,
            flag_ms=settings.contention_flag_ms,
        )
        self.tracker = new_tracker()
        # Concurrent reserves and commits/releases are coalesced into few script calls.
        # On Redis Cluster a batch waits for its cross-slot orders' several round trips, and
        # the calls inside it are coalesced again per partition (crossslot.py): more batches
        # may be in flight there, CLUSTER_INFLIGHT times the setting.
        inflight = settings.batch_max_inflight * (CLUSTER_INFLIGHT if settings.redis_cluster else 1)
        self.reserves: Batcher[Queued, ReserveResult] = Batcher(
            self._reserve_batch, settings.batch_max_orders, inflight
        )
        self.transitions: Batcher[Transition, dict[str, Any]] = Batcher(
            self._transition_batch, settings.batch_max_orders, inflight
        )
        # Redis Cluster: every call in one slot; orders spanning slots go through parts.
        self.cross: CrossSlot | None = None
        if settings.redis_cluster:
            self.cross = CrossSlot(
                calls, settings, self._config_id, self.reserve_call, self.sku_key
            )

    @classmethod
    def connect(cls, url: str, settings: Settings) -> Engine:
        """An engine on new clients for `url`: redis-py, and the hot-path client for scripts
        unless `settings.redis_hot_client` is off (both connect lazily); on Redis Cluster
        (`settings.redis_cluster`) both route by slot."""
        client, hot = connect(url, settings)
        return cls(client, settings, hot)

    async def close(self) -> None:
        """Let calls in flight finish, then close the clients and their pools."""
        await self.reserves.drain()
        await self.transitions.drain()
        if self.cross is not None:
            await self.cross.drain()
        await self.calls.aclose()

    async def _call(self, script: Any, keys: Sequence[str], args: Sequence[bytes | str]) -> Any:
        return await self.calls.call_script(script, keys, args)

    async def run(self, command: Awaitable[T]) -> T:
        """Await one plain Redis command, translating failures as the script calls do."""
        return await self.calls.run(command)

    # -- set-up and health -------------------------------------------------------------------
    async def check_partitions(self) -> None:
        """Record the partition count and key layout on first use; refuse to run with another
        count, or on data an earlier stockhold wrote in another key layout."""
        key = self.resolver.meta_partitions_key()
        layout_key = self.resolver.meta_key(c.META_LAYOUT)
        with redis_errors():
            stored_raw, layout_raw = await self.client.eval(
                _RECORD_LAYOUT, 2, key, layout_key, str(self.settings.partitions), c.LAYOUT
            )
        stored = int(stored_raw or 0)
        if stored != self.settings.partitions:
            raise PartitionMismatch(
                f"this Redis holds data for {stored} partitions; "
                f"stockhold is configured with {self.settings.partitions}"
            )
        layout = layout_raw.decode() if isinstance(layout_raw, bytes) else str(layout_raw or "1")
        if layout != c.LAYOUT:
            raise PartitionMismatch(
                f"this Redis holds data in key layout {layout} (an earlier stockhold: stock by "
                f"sales unit id); this version uses layout {c.LAYOUT} (stock in its SKU's "
                "partition): stop every stockhold process and run `stockhold migrate-layout`"
            )

    async def ping(self) -> int:
        """Run the health script; returns Redis's clock in ms."""
        return int(await self._call(self.scripts.health, (), ()))

    # -- reservations ------------------------------------------------------------------------
    async def reserve(
        self,
        order: ResolvedOrder,
        time_remaining: float | None = None,
        amount: int = 0,
        payment: PendingPayment | None = None,
        *,
        actor: str,
    ) -> tuple[Reservation, bool]:
        """Hold stock for every line of the order, all or nothing; idempotent by order id.

        The order may wait in this process's queue at most the strictest reserve threshold
        of its SKUs, or until shortly before the client's deadline (`time_remaining`, in
        seconds), whichever is sooner; past that it is shed unsent with RESERVE_TIMEOUT.
        Once sent, the script's true result is returned, whatever the wait. `amount` (minor
        units, 0: not given) and `payment` (mark it payment-pending) are stored with the hold
        and are part of what a replay must match. `actor`: who reserves (the event's actor).
        """
        pending = self._reserve_enqueue(order, time_remaining, amount, payment, actor)
        try:
            await pending.entry.fut
        except BaseException:
            if not pending.entry.fut.done():
                pending.entry.fut.cancel()  # never sent, if still queued
            # Records the outcome; raises the DomainError (or the cancellation) it stands for.
            self._reserve_finish(pending)
            raise
        return self._reserve_finish(pending)

    async def reserve_many(
        self,
        orders: Sequence[tuple[ResolvedOrder, int, PendingPayment | None]],
        time_remaining: float | None = None,
        *,
        actor: str,
    ) -> list[tuple[Reservation, bool] | DomainError]:
        """`reserve` for many orders at once (ReserveBatch): the same limits, results and
        errors, each order on its own, one result per order in order (a refusal as its
        DomainError); all are queued together, with no task per order.

        Orders with the same order id are sent as they come: give repeated ids in a later
        call if the earlier one must decide first.
        """
        pendings = [self._reserve_enqueue(o, time_remaining, a, p, actor) for o, a, p in orders]
        # Futures, not coroutines: gather wraps none of them in a task.
        await asyncio.gather(*(p.entry.fut for p in pendings), return_exceptions=True)
        out: list[tuple[Reservation, bool] | DomainError] = []
        for pending in pendings:
            try:
                out.append(self._reserve_finish(pending))
            except DomainError as err:
                out.append(err)
            except Exception as exc:  # one order's bug must not take the others' answers
                log.exception("reserve_many: an order failed")
                out.append(DomainError(Reason.INTERNAL, metadata={"cause": type(exc).__name__}))
        return out

    def _reserve_enqueue(
        self,
        order: ResolvedOrder,
        time_remaining: float | None,
        amount: int,
        payment: PendingPayment | None,
        actor: str,
    ) -> _PendingReserve:
        item: ResolvedOrder | PaidOrder = order
        if amount or payment is not None:  # validated by the servicer, with the lines
            item = PaidOrder(order, amount, payment, payment_fingerprint(order, amount, payment))
        units = order.units
        threshold_ms, sku, hot = self.policies.cache.limit([u.sku for u in units])
        limit = threshold_ms / 1000
        by_deadline = False
        if time_remaining is not None and time_remaining - DEADLINE_MARGIN_S < limit:
            limit = max(0.0, time_remaining - DEADLINE_MARGIN_S)
            by_deadline = True
        backend_limit = self.settings.redis_socket_timeout_seconds
        shed = limit < backend_limit
        contended = self.tracker.begin_units(units)
        entry = self.reserves.enqueue((item, actor), limit if shed else backend_limit)
        return _PendingReserve(entry, units, contended, threshold_ms, sku, hot, by_deadline, shed)

    def _reserve_finish(self, p: _PendingReserve) -> tuple[Reservation, bool]:
        """The answer of an order whose future is done (a cancellation is re-raised)."""
        entry, units = p.entry, p.units
        if entry.timer is not None:
            entry.timer.cancel()
        self.tracker.end_units(units)
        fut = entry.fut
        if fut.cancelled():
            self._record(units, p.contended, time.perf_counter() - entry.queued_at, 0.0, "error")
            fut.result()  # raises CancelledError
        exc = fut.exception()
        if isinstance(exc, NotSent):
            waited = time.perf_counter() - entry.queued_at
            self._record(units, p.contended, waited, 0.0, "timeout" if p.shed else "error")
            if not p.shed:
                raise DomainError(Reason.BACKEND_UNAVAILABLE, metadata={"cause": "queued"}) from exc
            metrics.record_shed(p.hot)
            raise DomainError(
                Reason.RESERVE_TIMEOUT,
                metadata={
                    "sku": p.sku,
                    "threshold_ms": p.threshold_ms,
                    "waited_ms": round(waited * 1000),
                    "limit": "deadline" if p.by_deadline else "sku_threshold",
                },
            ) from exc
        if exc is not None:
            self._record(units, p.contended, time.perf_counter() - entry.queued_at, 0.0, "error")
            raise exc
        timed = entry.timed()
        result = timed.result
        pol = result.pol
        if pol:
            update = self.policies.cache.update
            for j, s in enumerate(distinct_skus(units)):
                update(s, pol[3 * j], bool(pol[3 * j + 1]), bool(pol[3 * j + 2]))
        err = result.err
        outcome: Outcome = (
            "ok" if err is None else "insufficient" if err == Reason.INSUFFICIENT_STOCK else "error"
        )
        self._record(units, p.contended, timed.queued_s, timed.call_s, outcome)
        if err == Reason.INVALID_ARGUMENT:
            meta = result.meta
            raise invalid(
                [
                    FieldViolation(
                        f"lines[{int(meta['line'])}].quantity",
                        f"at most {int(meta['max'])} for SKU {meta['sku']!r} by its policy "
                        f"(got {int(meta['requested'])})",
                    )
                ]
            )
        if err is not None or result.reservation is None:
            raise DomainError(Reason(err or Reason.INTERNAL.value), metadata=result.meta)
        return result.reservation, result.replayed

    def _record(
        self,
        units: Sequence[Unit],
        contended: Sequence[bool],
        waited_s: float,
        script_s: float,
        outcome: Outcome,
    ) -> None:
        self.contention.record_request(units, contended, waited_s, script_s, outcome)

    def sku_key(self, sku: str) -> str:
        """The policy hash of a SKU (memoised: the reserve path asks for it per order)."""
        key = self._sku_keys.get(sku)
        if key is None:
            if len(self._sku_keys) >= self.settings.policy_cache_size:
                self._sku_keys.clear()
            key = self._sku_keys[sku] = self.resolver.sku_key(sku)
        return key

    async def _reserve_batch(self, orders: Sequence[Queued]) -> list[ReserveResult]:
        """One reserve.lua call for a batch of orders; one result per order. On Redis Cluster
        one call per partition of single-slot orders, and the cross-slot protocol for the
        others (crossslot.py), all at once."""
        if self.cross is None:
            keys, args = self.reserve_call(orders)
            return reserve_results(orders, await self._call(self.scripts.reserve, keys, args))
        return await self._reserve_batch_cluster(orders)

    def _home_only(self, item: ResolvedOrder | PaidOrder) -> bool:
        """Whether every key of an order is in its home partition (one slot)."""
        order, _fp, _amount, payment = _unpack(item)
        home = order.keys.partition
        if any(u.partition != home for u in order.units):
            return False
        return payment is None or self._payment_partition(*payment) == home

    async def _reserve_batch_cluster(self, orders: Sequence[Queued]) -> list[ReserveResult]:
        cross = self.cross
        assert cross is not None
        results: list[ReserveResult | None] = [None] * len(orders)
        groups: dict[int, list[int]] = {}
        spanning: list[int] = []
        for i, (item, _actor) in enumerate(orders):
            if self._home_only(item):
                groups.setdefault(_unpack(item)[0].keys.partition, []).append(i)
            else:
                spanning.append(i)

        def refused(err: DomainError) -> ReserveResult:
            return ReserveResult(None, False, err.reason.value, dict(err.metadata), ())

        async def group(idxs: list[int]) -> None:
            batch = [orders[i] for i in idxs]
            try:
                keys, args = self.reserve_call(batch)
                found = reserve_results(batch, await self._call(self.scripts.reserve, keys, args))
            except DomainError as err:
                found = [refused(err)] * len(batch)
            for i, r in zip(idxs, found, strict=True):
                results[i] = r

        async def one(i: int) -> None:
            item, actor = orders[i]
            order, fp, amount, payment = _unpack(item)
            map_key = self.payment_map_key(*payment) if payment is not None else ""
            try:
                r = await cross.reserve(order, fp, amount, payment, map_key, actor)
                results[i] = ReserveResult(*r)
            except DomainError as err:
                results[i] = refused(err)

        await asyncio.gather(
            *(group(idxs) for idxs in groups.values()), *(one(i) for i in spanning)
        )
        return [r for r in results if r is not None]

    def reserve_call(
        self, orders: Sequence[tuple[ResolvedOrder | PaidOrder | PartOrder, str]]
    ) -> tuple[list[str], list[bytes | str]]:
        """KEYS and ARGV of one reserve.lua call for a batch of (order, actor) pairs (its
        header says what each field is); `reserve_results` reads the reply."""
        keys: list[str] = []
        args: list[bytes | str] = [self._config_id]
        for item, actor in orders:
            nonce = None
            if isinstance(item, PaidOrder):
                order, fp, amount, payment = item.order, item.fingerprint, item.amount, item.payment
            elif isinstance(item, PartOrder):
                order, fp, amount, payment = item.order, item.order.fingerprint, 0, None
                nonce = item.nonce
            else:  # the common case, unpacked inline on the hot path
                order, fp, amount, payment = item, item.fingerprint, 0, None
            k = order.keys
            units = order.units
            skus = distinct_skus(units)
            stock_keys = [u.stock_key for u in units]
            sku_keys = [self.sku_key(s) for s in skus]
            keys += (k.order_key, k.expiry_key, k.events_key, *stock_keys, *sku_keys)
            lines = order.lines
            flags = 4 if nonce else (1 if amount else 0) | (2 if payment is not None else 0)
            args += (
                k.order_id,
                fp,
                str(order.hold_seconds),
                bytes((len(units), len(skus), len(lines), flags)),
                orjson.dumps(stock_keys),
                orjson.dumps(sku_keys),
                orjson.dumps([skus.index(u.sku) + 1 for u in units]),
                actor,
            )
            if amount:
                args.append(str(amount))
            if nonce:
                args.append(nonce)
            if payment is not None:
                args += payment
                keys += (self.polls_key(k.partition), self.payment_map_key(*payment))
            # each unit as JSON without its array's brackets (reserve.lua splices it)
            args += (orjson.dumps((u.sku, u.spec, u.barcode))[1:-1] for u in units)
            for i, wh, q in lines:
                args += (_text(i + 1), wh, str(q))
        return keys, args

    async def commit(self, order_id: str, payment_ref: str = "", *, actor: str) -> Reservation:
        """HELD -> COMMITTED; a COMMITTED reservation is returned unchanged.

        At or past the deadline the hold is expired in the same call (stock back, one
        ORDER_EXPIRED event) and the commit refused with RESERVATION_EXPIRED. `actor`: who
        commits (the actor of the events written, the expiry's too).
        """
        k = self.resolver.order(order_id)
        return await self._transition(Transition("commit", k, payment_ref, actor))

    async def release(self, order_id: str, reason: str = "", *, actor: str) -> Reservation:
        """HELD -> RELEASED (EXPIRED at or past the deadline); a finished release is unchanged.
        `actor`: who releases (the event's actor)."""
        k = self.resolver.order(order_id)
        return await self._transition(Transition("release", k, reason, actor))

    async def _submit(self, batcher: Batcher[Any, dict[str, Any]], item: Any) -> dict[str, Any]:
        """Submit to a batcher; a request stuck in its queue (Redis stuck) is refused unsent."""
        try:
            return await batcher.submit(item, self.settings.redis_socket_timeout_seconds)
        except NotSent as exc:
            raise DomainError(Reason.BACKEND_UNAVAILABLE, metadata={"cause": "queued"}) from exc

    async def _transition(self, t: Transition) -> Reservation:
        return Reservation.from_record((await self._transition_result(t))["rec"])

    async def _transition_result(self, t: Transition) -> dict[str, Any]:
        for _ in range(_KEYS_CHANGED_RETRIES):
            result = await self._submit(self.transitions, t)
            if result.get("err") == "KEYS_CHANGED":
                continue
            if result.get("err") == Reason.RESERVATION_NOT_FOUND:
                result["meta"] = {"order_id": t.keys.order_id}
            _raise_for(result)
            return result
        raise DomainError(Reason.INTERNAL, "the reservation kept changing under the call")

    async def _transition_batch(self, items: Sequence[Transition]) -> list[dict[str, Any]]:
        """Read each record's stock and SKU keys (one pipeline), then one transition.lua call
        (its header says what each field is). On Redis Cluster one call per partition, then
        the parts of cross-slot orders that moved follow their home record (crossslot.py)."""
        fields = ("keys", "skeys", "parts") if self.cross else ("keys", "skeys")
        stored = await self.calls.hmget_many([t.keys.order_key for t in items], fields)
        results: list[dict[str, Any]] = [{"err": Reason.RESERVATION_NOT_FOUND.value} for _ in items]
        live = [i for i, s in enumerate(stored) if s[0] is not None]
        if self.cross is None:
            await self._transition_call(items, stored, live, results)
            return results
        groups: dict[int, list[int]] = {}
        for i in live:
            groups.setdefault(items[i].keys.partition, []).append(i)
        await asyncio.gather(
            *(self._transition_call(items, stored, g, results) for g in groups.values())
        )
        # Cross-slot orders that moved: their parts follow (from the record returned, or read
        # when the answer is a refusal, e.g. a commit refused after expiring the hold).
        moved = [
            (items[i].keys, results[i].get("rec"), items[i].actor)
            for i in live
            if stored[i][2]
            and (
                results[i].get("settling")
                or not (results[i].get("ok") and not results[i].get("changed"))
            )
        ]
        if moved:
            await asyncio.gather(*(self.cross.settle(k, a, rec) for k, rec, a in moved))
        return results

    async def _transition_call(
        self,
        items: Sequence[Transition],
        stored: Sequence[Sequence[bytes | None]],
        sent: Sequence[int],
        results: list[dict[str, Any]],
    ) -> None:
        """One transition.lua call for the items at `sent` (records found); fills results."""
        if not sent:
            return
        keys: list[str] = []
        args: list[bytes | str] = [self._config_id]
        for i in sent:
            t = items[i]
            raw, raw_skus = stored[i][0], stored[i][1]
            assert raw is not None
            stock_keys = orjson.loads(raw)
            # Records written before SKU policies existed name no SKU keys.
            sku_keys = orjson.loads(raw_skus) if raw_skus else []
            k = t.keys
            # ReportPayment stops the order's polls: its partition's poll index.
            extra = (self.polls_key(k.partition),) if t.op == "pay" else ()
            keys += (k.order_key, k.expiry_key, k.events_key, *stock_keys, *sku_keys, *extra)
            # The texts KEYS were built from go along: the script checks them against the
            # record's by equality, without decoding.
            counts = bytes((len(stock_keys), len(sku_keys), len(extra)))
            args += (t.op, k.order_id, counts, raw, raw_skus or b"", t.arg, t.actor)
        replies = orjson.loads(await self._call(self.scripts.transition, keys, args))
        for i, reply in zip(sent, replies, strict=True):
            results[i] = _transition_result(reply)

    async def get_reservation(self, order_id: str, *, actor: str) -> Reservation:
        """The reservation as it stands; a HELD one at or past its deadline is expired first,
        by `actor` (the reader: the ORDER_EXPIRED event's actor).

        get.lua reads the record alone (one key) with Redis's clock. A HELD record whose
        deadline has passed is then expired for real, as the sweeper would (transition op
        "expire"), and the answer is the record after that: EXPIRED is never read while the
        hold still counts as reserved. Costs one transition call, once per due hold.
        """
        k = self.resolver.order(order_id)
        result = orjson.loads(await self._call(self.scripts.get, (k.order_key,), ()))
        if "rec" not in result:
            raise DomainError(Reason.RESERVATION_NOT_FOUND, metadata={"order_id": order_id})
        rec = result["rec"]
        if rec["st"] == c.STATE_HELD and int(result["now"]) >= int(rec["dl"]):
            rec = await self._expire_held(k, actor)
        elif result.get("settling") and self.cross is not None:
            # finished, but its parts may still count as reserved: they follow first
            await self.cross.settle(k, actor, rec)
        return Reservation.from_record(rec)

    async def _expire_held(self, k: OrderKeys, actor: str) -> dict[str, Any]:
        """Expire a HELD reservation found at or past its deadline, exactly as the sweeper
        would (stock back, one ORDER_EXPIRED event by `actor`, updated_at = its ts); the record
        after.

        transition.lua re-checks state and deadline in the call, so racing the sweeper or
        another reader writes one expiry at most; a record no longer HELD is returned as is.
        """
        result = await self._transition_result(Transition("expire", k, "", actor))
        if result.get("stuck"):
            log.error("expiry refused", extra={"orders": [k.order_id]})
        rec: dict[str, Any] = result["rec"]
        return rec

    # -- stock -------------------------------------------------------------------------------
    async def availability(self, units: Sequence[Unit]) -> list[StockLevel]:
        """Stock levels, one per unit and warehouse (units without stock give none)."""
        with redis_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                for u in units:
                    pipe.hgetall(u.stock_key)
                hashes = await pipe.execute()
        levels: list[StockLevel] = []
        for u, h in zip(units, hashes, strict=True):
            fields = {f.decode(): int(v) for f, v in h.items()}
            prefix = len(c.FIELD_AVAILABLE)
            for wh in sorted(f[prefix:] for f in fields if f.startswith(c.FIELD_AVAILABLE)):
                avail = fields[c.FIELD_AVAILABLE + wh]
                held = fields.get(c.FIELD_RESERVED + wh, 0)
                levels.append(StockLevel(u.sku, u.spec, u.barcode, wh, avail, held))
        return levels

    async def adjust(
        self, adjustment_id: str, unit: Unit, warehouse: str, delta: int, reason: str, *, actor: str
    ) -> tuple[StockLevel, bool]:
        """Receipt (+) or shrinkage (-) of available stock; idempotent by adjustment id.
        `actor`: who adjusts (the event's actor; not part of what a replay must match)."""
        k = self.resolver.adjustment(adjustment_id)
        fp = hashlib.blake2b(
            "\x00".join((unit.unit_id, escape(warehouse), str(delta), reason)).encode(),
            digest_size=16,
        ).hexdigest()
        arg = orjson.dumps(
            {
                "aid": adjustment_id,
                "fp": fp,
                "wh": warehouse,
                "delta": delta,
                "reason": reason,
                "unit": (unit.sku, unit.spec, unit.barcode),
                "maxlen": self.settings.event_stream_maxlen,
                "retention": self.settings.record_retention_seconds * 1000,
                "actor": actor,
            }
        )
        keys = (k.record_key, k.events_key, unit.stock_key)
        claimed = self.cross is not None and k.partition != unit.partition
        if claimed:
            # Redis Cluster: the id is claimed in its own partition (its fingerprint: another
            # adjustment under the same id conflicts), the record kept beside the stock.
            retention = str(self.settings.record_retention_seconds * 1000)
            other = await self._call(self.scripts.claim, (k.record_key,), (fp, retention))
            if other and not isinstance(other, int):  # 1: claimed now
                raise DomainError(
                    Reason.ADJUSTMENT_CONFLICT, metadata={"adjustment_id": adjustment_id}
                )
            tag = self._tag(unit.partition)
            keys = (f"{tag}{c.ADJUSTMENT}:{escape(adjustment_id)}", tag + c.EVENTS, unit.stock_key)
        result = orjson.loads(await self._call(self.scripts.adjust, keys, (arg,)))
        if claimed and result.get("err"):
            # refused, nothing written: the id is free again, as on one node
            await self._call(self.scripts.claim, (k.record_key,), (fp, "release"))
        _raise_for(result)
        level = StockLevel(
            unit.sku,
            unit.spec,
            unit.barcode,
            warehouse,
            int(result["available"]),
            int(result["reserved"]),
        )
        return level, bool(result["replayed"])

    # -- expiry ------------------------------------------------------------------------------
    async def expire_due(self, max_rounds: int = 20, *, actor: str) -> int:
        """Expire every due hold in every partition; returns how many this call expired.
        `actor`: who sweeps (the events' actor; the server's sweeper: ACTOR_SWEEPER).

        If a call fails after earlier ones expired holds, the sweep stops there and returns
        what it did (the failure is logged); a failure before anything expired is raised.

        Each expire.lua call claims at most `sweep_batch` due holds of one partition by
        Redis's clock and expires them in the same call, so every process may sweep at once.
        A round gives every due partition one call, in random order (concurrent sweepers
        spread out); rounds repeat while they make progress, at most `max_rounds`, so holds
        that fell due during a long round do not wait for the next sweep.
        """
        expired = 0
        for _ in range(max_rounds):
            try:
                due = await self._due_partitions()
                random.shuffle(due)
                progressed = False
                for p in due:
                    keys, args = self.expire_call(p, actor)
                    result = orjson.loads(await self._call(self.scripts.expire, keys, args))
                    expired += int(result["expired"])
                    if self.cross is not None and result.get("settle"):
                        # cross-slot orders: their parts follow (recovery would, later)
                        await asyncio.gather(
                            *(
                                self.cross.settle(self.resolver.order(o), actor)
                                for o in result["settle"]
                            )
                        )
                    if result.get("stuck"):
                        log.error(
                            "expiry refused", extra={"partition": p, "orders": result["stuck"]}
                        )
                    if result["expired"] or result["stale"] or result["repaired"]:
                        progressed = True
            except DomainError as err:
                if not expired:
                    raise
                # What the earlier calls expired is done: report it, not the failure alone.
                log.warning(
                    "sweep stopped early", extra={"expired": expired, "reason": err.reason.value}
                )
                return expired
            if not progressed:  # nothing due, or only holds that are stuck
                break
        return expired

    async def _due_partitions(self) -> list[int]:
        """Partitions whose earliest deadline has passed on Redis's clock, in one pipeline.

        Only a hint that spares a script call per idle partition: expire.lua decides. The
        expire calls themselves are not pipelined: Redis runs a client's pipelined commands
        back to back, so a pipeline of full claims would hold it for all of them at once.
        """
        return await self._due_in(
            [self.resolver.expiry_key(p) for p in range(self.settings.partitions)]
        )

    async def _due_in(self, indexes: Sequence[str]) -> list[int]:
        """Positions of the zsets whose first score has passed on Redis's clock (one pipeline
        with TIME; on Redis Cluster TIME is one node's: the nodes' clocks agree closely enough
        for a hint)."""
        with redis_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.execute_command("TIME")
                for key in indexes:
                    pipe.zrange(key, 0, 0, withscores=True)
                replies = await pipe.execute()
        seconds, micros = replies[0]
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        return [p for p, first in enumerate(replies[1:]) if first and first[0][1] <= now_ms]

    def expire_call(self, partition: int, actor: str) -> tuple[tuple[str, str], tuple[str, ...]]:
        """KEYS and ARGV of one expire.lua call for a partition, expiring as `actor`."""
        expiry_key = self.resolver.expiry_key(partition)
        # The partition's record key prefix: its tag (shared by every key of the partition)
        # followed by the order template of constants.py.
        record_prefix = f"{partition_tag(self.resolver, partition)}{c.ORDER}:"
        keys = (expiry_key, self.resolver.events_key(partition))
        args = (
            str(self.settings.sweep_batch),
            str(self.settings.record_retention_seconds * 1000),
            str(self.settings.event_stream_maxlen),
            record_prefix,
            actor,
        )
        return keys, args

    async def extend(
        self, order_id: str, hold_seconds: int, *, actor: str
    ) -> tuple[Reservation, bool]:
        """HELD only: push the deadline out to Redis's now + hold_seconds, never in.

        The new deadline is max(current deadline, now + hold_seconds). Returns the reservation
        and whether the deadline moved: a move writes one ORDER_EXTENDED event, a call that
        moves nothing writes nothing (shortening a hold is what Release is for). A HELD
        reservation at or past its deadline is expired for real (as GetReservation does) and
        refused with RESERVATION_EXPIRED, like an EXPIRED one. `actor`: who extends (the
        actor of the event written, the expiry's too).
        """
        out: list[FieldViolation] = []
        k = self.resolver.order(order_id, out=out)
        check_int(hold_seconds, "hold_seconds", 1, self.settings.max_hold_seconds, out)
        if out:
            raise invalid(out)
        keys = (k.order_key, k.expiry_key, k.events_key)
        args = (
            k.order_id,
            str(hold_seconds),
            str(self.settings.max_hold_seconds),
            str(self.settings.event_stream_maxlen),
            actor,
        )
        result = orjson.loads(await self._call(self.scripts.extend, keys, args))
        if result.get("due"):  # extend.lua has no stock keys: the expiry is transition.lua's
            await self._expire_held(k, actor)
        _raise_for(result)
        return Reservation.from_record(result["rec"]), bool(result["changed"])

    # -- payments (issue 5, docs/payments.md) --------------------------------------------------
    def _poll_schedule(self) -> dict[str, Any]:
        """The poll schedule as the scripts take it (reserve.lua, payment_mark.lua)."""
        return scripts.poll_schedule(self.settings)

    def _tag(self, partition: int) -> str:
        """A partition's key tag, `<prefix>:{p<N>}:` (resolver.partition_tag)."""
        return partition_tag(self.resolver, partition)

    def polls_key(self, partition: int) -> str:
        """The poll index of a partition: order id -> next payment poll (ms, Redis clock)."""
        return self._tag(partition) + c.POLLS

    def payment_map_key(self, provider: str, out_trade_no: str) -> str:
        """Where the order id paid under `out_trade_no` at `provider` is kept."""
        ident = _payment_ident(provider, out_trade_no)
        return f"{self._tag(self.resolver.partition_of(ident))}{c.OUT_TRADE_NO}:{ident}"

    def _payment_partition(self, provider: str, out_trade_no: str) -> int:
        """The partition of that key (payment_map_key)."""
        return self.resolver.partition_of(_payment_ident(provider, out_trade_no))

    async def report_payment(
        self, order_id: str, report: PaymentReport, *, actor: str
    ) -> tuple[Reservation, bool]:
        """A provider's result: PAID commits, FAILED/CLOSED release; one transition.lua call.

        Idempotent by (provider, transaction id): a report seen before gets the stored answer
        (replayed = True) and changes nothing. A PAID amount that differs from the order's is
        refused (PAYMENT_AMOUNT_MISMATCH) and flagged. See transition.lua's report_one.
        `actor`: who reports (a caller, the poller or the webhook: the events' actor).
        """
        out = payment_report_violations(order_id, report)
        if out:
            raise invalid(out)
        k = self.resolver.order(order_id)
        arg = orjson.dumps(
            {
                "prov": report.provider,
                "tx": report.transaction_id,
                "status": report.status,
                "amount": report.amount,
                "paid_at": report.paid_at_ms or 0,
            }
        ).decode()
        result = await self._transition_result(Transition("pay", k, arg, actor))
        return Reservation.from_record(result["rec"]), bool(result.get("replayed"))

    async def mark_payment_pending(
        self, order_id: str, payment: PendingPayment, *, actor: str
    ) -> Reservation:
        """HELD only: poll `payment` on the configured schedule until it is decided.

        A HELD reservation at or past its deadline is expired for real (as GetReservation
        does) and refused with RESERVATION_EXPIRED. `actor`: who marks it (the events' actor).
        """
        out: list[FieldViolation] = []
        k = self.resolver.order(order_id, out=out)
        check_payment(payment, "payment", out)
        if out:
            raise invalid(out)
        keys: tuple[str, ...] = (
            k.order_key,
            self.polls_key(k.partition),
            k.events_key,
            self.payment_map_key(*payment),
        )
        claimed_now = False
        if self.cross is not None and self._payment_partition(*payment) != k.partition:
            # the map is in another slot: claimed there first, then the script goes without it
            claimed_now = await self.cross.claim_payment(order_id, payment, keys[3])
            keys = keys[:3]
        arg = orjson.dumps(
            {
                "oid": order_id,
                "prov": payment.provider,
                "otn": payment.out_trade_no,
                "maxlen": self.settings.event_stream_maxlen,
                "pay": self._poll_schedule(),
                "actor": actor,
            }
        )
        result = orjson.loads(await self._call(self.scripts.payment_mark, keys, (arg,)))
        if result.get("due"):  # payment_mark.lua has no stock keys: transition.lua expires
            await self._expire_held(k, actor)
        if claimed_now and result.get("err"):
            await self._unclaim_payment(k, payment, self.payment_map_key(*payment))
        _raise_for(result)
        return Reservation.from_record(result["rec"])

    async def _unclaim_payment(self, k: OrderKeys, payment: PendingPayment, map_key: str) -> None:
        """A refused MarkPaymentPending gives back the out_trade_no it claimed in another slot
        (Redis Cluster), as one node writes nothing: unless the order's record names this
        payment by now (a concurrent call for the same order and payment that succeeded)."""
        pprov, potn = await self.run(self.client.hmget(k.order_key, "pprov", "potn"))
        if pprov == payment.provider.encode() and potn == payment.out_trade_no.encode():
            return
        await self._call(self.scripts.claim, (map_key,), (k.order_id, "release"))

    async def order_for_payment(self, provider: str, out_trade_no: str) -> str:
        """The order id paid under a provider's out_trade_no: the one recorded by Reserve or
        MarkPaymentPending, else the out_trade_no itself."""
        raw = await self.run(self.client.get(self.payment_map_key(provider, out_trade_no)))
        if not raw:
            return out_trade_no
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def claim_polls(self, limit: int, *, actor: str) -> list[PollClaim]:
        """Claim at most `limit` due payment polls over every partition (payment_poll.lua),
        as `actor` (the poller: the actor of the POLLS_EXHAUSTED flags written).

        Each claim is an atomic move of the order's poll entry to its next step on Redis's
        clock, so with every process polling each order is queried once per step.
        """
        claims: list[PollClaim] = []
        due = await self._due_poll_partitions()
        random.shuffle(due)
        steps = list(self.settings.payment_poll_steps_ms)
        margin = round(self.settings.payment_final_poll_margin_seconds * 1000)
        for p in due:
            room = min(limit - len(claims), self.settings.payment_poll_batch)
            if room <= 0:
                break
            arg = orjson.dumps(
                {
                    "steps": steps,
                    "margin": margin,
                    "maxlen": self.settings.event_stream_maxlen,
                    "prefix": f"{self._tag(p)}{c.ORDER}:",
                    "actor": actor,
                }
            )
            keys = (self.polls_key(p), self.resolver.events_key(p))
            result = orjson.loads(
                await self._call(self.scripts.payment_poll, keys, (str(room), arg))
            )
            if result["flagged"]:
                log.info("payment polls exhausted", extra={"count": result["flagged"]})
            # cjson writes an empty list as {}
            for oid, prov, otn, poll, final in result["claims"] or ():
                claims.append(PollClaim(oid, prov, otn, int(poll), bool(final)))
        return claims

    async def _due_poll_partitions(self) -> list[int]:
        """Partitions whose earliest poll is due on Redis's clock (a hint: the script decides)."""
        return await self._due_in([self.polls_key(p) for p in range(self.settings.partitions)])


# -- payment input (issue 5) -------------------------------------------------------------------
PAYMENT_STATUSES = ("PAID", "FAILED", "CLOSED")
_PROVIDER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")


def check_provider(provider: str, path: str, out: list[FieldViolation]) -> None:
    """A provider name: 1-32 of lowercase letters, digits, `_` and `-` (e.g. `wechatpay`)."""
    n = len(provider)
    if not 1 <= n <= c.MAX_PROVIDER or not set(provider) <= _PROVIDER_CHARS:
        out.append(
            FieldViolation(path, f"1-{c.MAX_PROVIDER} of a-z, 0-9, _ and - (e.g. wechatpay)")
        )


def check_payment(payment: PendingPayment, path: str, out: list[FieldViolation]) -> None:
    """Validate a payment to poll (`path`: the field holding it, e.g. `payment`)."""
    check_provider(payment.provider, f"{path}.provider", out)
    check_text(payment.out_trade_no, f"{path}.out_trade_no", 1, c.MAX_OUT_TRADE_NO, out, False)


def payment_report_violations(order_id: str, report: PaymentReport) -> list[FieldViolation]:
    """Every malformed field of a ReportPayment."""
    out: list[FieldViolation] = []
    check_text(order_id, "order_id", 1, c.MAX_ORDER_ID, out, normalise=False)
    check_provider(report.provider, "provider", out)
    if report.status not in PAYMENT_STATUSES:
        out.append(FieldViolation("status", "must be PAID, FAILED or CLOSED"))
    lo = 1 if report.status == "PAID" else 0
    check_text(report.transaction_id, "transaction_id", lo, c.MAX_TRANSACTION_ID, out, False)
    check_int(report.amount, "amount", 0, c.MAX_AMOUNT, out)
    return out


def payment_fingerprint(order: ResolvedOrder, amount: int, payment: PendingPayment | None) -> str:
    """The replay fingerprint of a Reserve with an amount and/or a payment.

    The resolver's fingerprint covers lines and hold; this extends it outside the resolver (and
    its compiled twin, which stay as they are). A Reserve with neither keeps the resolver's
    fingerprint, so records written before payments existed still replay.
    """
    pay = "\x00".join(payment) if payment is not None else "-"
    text = f"{order.fingerprint}\x02{amount}\x02{pay}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
