"""Redis Cluster: orders whose keys span slots, all or nothing, with recovery (issue 11).

On one Redis node every operation is one script call. Redis Cluster refuses a call whose keys
span slots (CROSSSLOT), and an order's keys do: its record is in its order id's partition
(its home, where GetReservation finds it with no lookup) and its stock in each SKU's
partition. A single-slot order (every unit in its home partition) stays one reserve.lua
call; the engine sends only the others here. docs/cluster.md tells the whole protocol:

Reserve
  1. claim the payment's out_trade_no in its own slot (claim.lua), if any;
  2. hold each partition's lines in that partition: a *part* (reserve.lua, flag 4), keyed by
     order id so a repeat is idempotent, tagged with the attempt's nonce, and indexed in the
     partition's parts index at now + the recovery window;
  3. write the home record (finish.lua), listing the parts, unless one of their nonces was
     aborted; then move the parts' index entries to the record's deadline + the window.
  A refusal or failure in 2 or 3 aborts the attempt's nonces at home (abort.lua: unless the
  record exists, finish.lua will now refuse them) and gives the parts back (transition.lua op
  "undo").
Commit, Release, expiry, ReportPayment
  the home record moves first (one event, as on one node) and queues the order in its
  partition's settle index at now + the window; then each part follows (op "part": its
  stock leaves reserved, back to available or sold) and the queue entry goes.
Recovery (`recover`, every process, every half window)
  a settle entry past its time: the parts follow the home record's state; a part past its
  time: confirmed (home HELD and listing it), settled (home finished), or given back (no home
  record: aborted first, so a late finish.lua cannot use it).

A process may die between any two steps: after the window, every unit's reserved counter is
the sum of the HELD records and parts holding it, and no part exists without its record.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import orjson

from stockhold import constants as c
from stockhold import scripts
from stockhold.batcher import Batcher, NotSent
from stockhold.errors import DomainError, Reason
from stockhold.model import PendingPayment, Reservation
from stockhold.resolver import (
    KeyResolver,
    OrderKeys,
    ResolvedOrder,
    Unit,
    escape,
    partition_tag,
)
from stockhold.settings import Settings
from stockhold.store.calls import ScriptCalls

log = logging.getLogger(__name__)

# An abort set outlives any call that could still be in flight by far (finish.lua checks it).
ABORT_TTL_MS = 3_600_000
# Index bookkeeping after answers (parts confirmed, settle entries removed) is sent in one
# pipeline per slot for what queued within this long.
LATER_S = 0.002
# Most index entries one recovery pass takes of one partition's parts or settle index.
RECOVER_BATCH = 200


class PartOrder(NamedTuple):
    """The lines of an order held in one partition (reserve.lua flag 4)."""

    order: ResolvedOrder  # keys: the part's record, parts index and events of the partition
    nonce: str


class Crash(BaseException):
    """Raised by a test's fault hook to stop a protocol between two steps, as kill -9 would:
    no compensation runs (it is not an Exception)."""


class _Part(NamedTuple):
    partition: int
    idxs: tuple[int, ...]  # the order's unit indexes held in this part
    lines: tuple[int, ...]  # the order's line indexes held in this part, in the part's order
    order: PartOrder


class _Held(NamedTuple):
    """A part that holds its lines: the nonce it has (this attempt's or an earlier one's)."""

    part: _Part
    nonce: str
    fresh: bool  # made by this attempt
    hold_s: int
    alloc: list[list[Any]]  # [[unit index in the part, warehouse, quantity], ...]


ReserveCall = Callable[[Sequence[Any]], tuple[list[str], list[bytes | str]]]


def _listed(parts: str | bytes) -> set[tuple[int, str]]:
    """A record's "parts" field ([[partition, nonce], ...]) as a set of pairs."""
    return {(int(p), str(n)) for p, n in orjson.loads(parts)}


def distinct_skus(units: Sequence[Unit]) -> list[str]:
    """The SKUs of units, distinct, in first-appearance order (reserve.lua's m)."""
    skus: list[str] = []
    for u in units:
        if u.sku not in skus:
            skus.append(u.sku)
    return skus


class CrossSlot:
    """The multi-slot protocols of one engine (see the module docstring)."""

    def __init__(
        self,
        calls: ScriptCalls,
        settings: Settings,
        config_id: str,
        reserve_call: ReserveCall,
        sku_key: Callable[[str], str],
    ) -> None:
        self.calls = calls
        self.settings = settings
        self.resolver: KeyResolver = calls.resolver
        self.scripts = calls.scripts
        self._config_id = config_id
        self._reserve_call = reserve_call
        self._sku_key = sku_key
        self.window_ms = round(settings.recovery_window_seconds * 1000)
        # Tests stop a protocol between two steps with this (it raises Crash).
        self.fault: Callable[[str], None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._pending: list[tuple[Any, ...]] = []  # bookkeeping commands for _send_later
        self._flush: asyncio.TimerHandle | None = None
        # (part, actor) pairs, as the engine's reserve batcher queues (order, actor)
        self._batchers: dict[int, Batcher[tuple[PartOrder, str], tuple[int, Any]]] = {}

    # -- keys ------------------------------------------------------------------------------
    def tag(self, partition: int) -> str:
        return partition_tag(self.resolver, partition)

    def part_key(self, partition: int, order_id: str) -> str:
        return f"{self.tag(partition)}{c.PART}:{escape(order_id)}"

    def parts_index(self, partition: int) -> str:
        return self.tag(partition) + c.PARTS

    def settle_index(self, partition: int) -> str:
        return self.tag(partition) + c.SETTLE

    def abort_key(self, k: OrderKeys) -> str:
        return f"{self.tag(k.partition)}{c.ABORT}:{escape(k.order_id)}"

    def _step(self, name: str) -> None:
        if self.fault is not None:
            self.fault(name)

    async def _script(self, script: Any, keys: Sequence[str], args: Sequence[bytes | str]) -> Any:
        return await self.calls.call_script(script, keys, args)

    # -- Reserve ---------------------------------------------------------------------------
    def parts_of(self, order: ResolvedOrder, nonce: str) -> list[_Part]:
        """The order's lines per partition of their units, as part orders."""
        groups: dict[int, list[int]] = {}
        for i, u in enumerate(order.units):
            groups.setdefault(u.partition, []).append(i)
        oid = order.keys.order_id
        parts = []
        for p, idxs in groups.items():
            local = {g: j for j, g in enumerate(idxs)}
            mine = [n for n, (i, _wh, _q) in enumerate(order.lines) if i in local]
            lines = tuple((local[order.lines[n][0]], *order.lines[n][1:]) for n in mine)
            keys = OrderKeys(
                oid, p, self.part_key(p, oid), self.parts_index(p), self.resolver.events_key(p)
            )
            sub = ResolvedOrder(
                keys,
                tuple(order.units[i] for i in idxs),
                lines,
                order.hold_seconds,
                order.fingerprint,
            )
            parts.append(_Part(p, tuple(idxs), tuple(mine), PartOrder(sub, nonce)))
        return parts

    async def reserve(
        self,
        order: ResolvedOrder,
        fingerprint: str,
        amount: int,
        payment: PendingPayment | None,
        payment_key: str,
        actor: str,
    ) -> tuple[Reservation | None, bool, str | None, dict[str, Any], list[Any]]:
        """Hold a cross-slot order: (reservation or None, replayed, refusal reason, its meta,
        pol) as reserve.lua answers one order (pol: flat per distinct SKU, maybe empty); a
        payment whose out_trade_no another order holds raises PAYMENT_CONFLICT. `actor`: who
        reserves (the ORDER_RESERVED event's actor)."""
        k = order.keys
        if fingerprint != order.fingerprint:
            order = order._replace(fingerprint=fingerprint)
        if payment is not None:
            await self.claim_payment(k.order_id, payment, payment_key)
            self._step("claimed")
        nonce = secrets.token_hex(8)
        parts = self.parts_of(order, nonce)
        replies = await asyncio.gather(
            *(self._hold(p, actor) for p in parts), return_exceptions=True
        )
        for r in replies:
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r
        held: list[_Held] = []
        pol: dict[str, tuple[int, int, int]] = {}
        refusal: tuple[str, dict[str, Any]] | None = None
        failure: Exception | None = None
        for part, reply in zip(parts, replies, strict=True):
            if isinstance(reply, BaseException):
                failure = failure or (reply if isinstance(reply, Exception) else None)
                continue
            h, part_pol, err = reply
            if part_pol:
                for j, s in enumerate(distinct_skus(part.order.order.units)):
                    pol[s] = (part_pol[3 * j], part_pol[3 * j + 1], part_pol[3 * j + 2])
            if h is not None:
                held.append(h)
            elif refusal is None and err is not None:
                refusal = err
        flat_pol: list[Any] = []
        if len(pol) == len(distinct_skus(order.units)):
            for s in distinct_skus(order.units):
                flat_pol.extend(pol[s])
        if refusal is not None or failure is not None:
            exists = await self._abort(k, held, actor, always=payment is not None)
            if payment is not None and not exists:
                # refused, no order: its out_trade_no is free again, as on one node
                await self._script(self.scripts.claim, (payment_key,), (k.order_id, "release"))
            if refusal is not None:
                return None, False, refusal[0], refusal[1], flat_pol
            assert failure is not None
            raise failure
        self._step("held")
        # the order's allocations: each part's, its unit indexes mapped to the order's
        alloc = [[h.part.idxs[a[0] - 1] + 1, a[1], a[2]] for h in held for a in h.alloc]
        try:
            result = await self._finish(order, held, alloc, amount, payment, actor)
        except DomainError:
            await self._abort(k, held, actor)
            raise
        kind = result[0]
        if kind == 1:
            _, now, dl, first = result
            reservation = Reservation.held(
                k.order_id, order.units, alloc, now, dl, amount, payment, first
            )
            self._step("finished")
            self._confirm_soon(k.order_id, held, dl)
            return reservation, False, None, {}, flat_pol
        if kind == 2:
            flat = result[1]
            rec = dict(zip(flat[::2], flat[1::2], strict=True))
            # parts this attempt made that the record does not list go back
            await self._undo_unlisted(k, held, rec.get("parts") or "[]", actor)
            return Reservation.from_record(rec), True, None, {}, flat_pol
        reason = result[1]
        await self._abort(k, held, actor)
        if reason == "ABORTED":
            raise DomainError(Reason.BACKEND_UNAVAILABLE, metadata={"cause": "aborted"})
        return None, False, reason, {"order_id": k.order_id}, flat_pol

    def _parts_batcher(self, partition: int) -> Batcher[tuple[PartOrder, str], tuple[int, Any]]:
        """The partition's batcher: concurrent orders' parts there share a reserve.lua call."""
        found = self._batchers.get(partition)
        if found is None:
            s = self.settings
            found = Batcher(self._send_parts, s.batch_max_orders, s.batch_max_inflight)
            self._batchers[partition] = found
        return found

    async def _send_parts(self, items: Sequence[tuple[PartOrder, str]]) -> list[tuple[int, Any]]:
        keys, args = self._reserve_call(items)
        now, *entries = orjson.loads(await self._script(self.scripts.reserve, keys, args))
        return [(now, e) for e in entries]

    async def claim_payment(self, order_id: str, payment: PendingPayment, key: str) -> bool:
        """Claim a payment's out_trade_no (its map `key`, in its own slot) for an order
        (claim.lua), for as long as the map would live (scripts.poll_schedule's ttl); raises
        PAYMENT_CONFLICT when another order holds it. True when claimed by this call (the
        order did not hold it before)."""
        ttl = str(scripts.poll_schedule(self.settings)["ttl"])
        other = await self._script(self.scripts.claim, (key,), (order_id, ttl))
        if isinstance(other, int):
            return bool(other)
        if other:
            other_id = other.decode() if isinstance(other, bytes) else str(other)
            raise DomainError(
                Reason.PAYMENT_CONFLICT,
                metadata={"out_trade_no": payment.out_trade_no, "order_id": other_id},
            )
        return False

    async def _hold(
        self, part: _Part, actor: str
    ) -> tuple[_Held | None, list[Any], tuple[str, dict[str, Any]] | None]:
        batcher = self._parts_batcher(part.partition)
        try:
            now, entry = await batcher.submit(
                (part.order, actor), self.settings.redis_socket_timeout_seconds
            )
        except NotSent as exc:  # Redis stuck: refused unsent
            raise DomainError(Reason.BACKEND_UNAVAILABLE, metadata={"cause": "queued"}) from exc
        self._step("part")
        kind, pol = entry[0], entry[1]
        if kind == 1:
            hold_s = (entry[2] - now) // 1000
            return _Held(part, part.order.nonce, True, hold_s, entry[3]), pol, None
        if kind == 2:
            flat = entry[2]
            rec = dict(zip(flat[::2], flat[1::2], strict=True))
            # a finished order's part holds nothing: its record answers the replay (finish.lua)
            alloc = orjson.loads(rec["alloc"]) if rec.get("st") == c.STATE_HELD else []
            return _Held(part, rec.get("nc", ""), False, int(rec["hold"]), alloc), pol, None
        meta = dict(entry[3] or {})
        if "line" in meta:  # a line above its SKU's max: its index in the part's lines
            meta["line"] = part.lines[int(meta["line"])]
        return None, pol, (entry[2], meta)

    async def _finish(
        self,
        order: ResolvedOrder,
        held: list[_Held],
        alloc: list[list[Any]],
        amount: int,
        payment: PendingPayment | None,
        actor: str,
    ) -> list[Any]:
        k = order.keys
        units = order.units
        payload = [[*units[i - 1][:3], wh, q] for i, wh, q in alloc]
        hold = order.hold_seconds or min(h.hold_s for h in held)
        keys = [k.order_key, k.expiry_key, k.events_key, self.abort_key(k)]
        if payment is not None:
            keys.append(self.tag(k.partition) + c.POLLS)
        args: list[bytes | str] = [
            self._config_id,
            k.order_id,
            order.fingerprint,
            str(hold),
            orjson.dumps([[u.sku, u.spec, u.barcode] for u in units]),
            orjson.dumps(alloc),
            orjson.dumps([[h.part.partition, h.nonce] for h in held]),
            orjson.dumps(payload),
            str(amount),
            payment.provider if payment is not None else "",
            payment.out_trade_no if payment is not None else "",
            actor,
            *(h.nonce for h in held),
        ]
        result: list[Any] = orjson.loads(await self._script(self.scripts.finish, keys, args))
        return result

    def _confirm_soon(self, order_id: str, held: list[_Held], deadline_ms: int) -> None:
        """Move the parts' index entries to the deadline + the window, after the answer (a
        part left unconfirmed is confirmed by recovery: this only spares it the work)."""
        score = str(deadline_ms + self.window_ms)
        cmds = [("ZADD", self.parts_index(h.part.partition), "XX", score, order_id) for h in held]
        self._later(cmds)

    def _later(self, cmds: Sequence[tuple[Any, ...]]) -> None:
        """Send index bookkeeping after the answer, coalesced: what many orders queue within
        LATER_S goes in one pipeline per slot. Recovery does it if this fails."""
        self._pending.extend(cmds)
        if self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(LATER_S, self._send_later)

    def _send_later(self) -> None:
        self._flush = None
        cmds, self._pending = self._pending, []

        async def send() -> None:
            try:
                await self.calls.pipeline(cmds)
            except Exception as exc:
                log.debug("index bookkeeping deferred to recovery: %s", exc)

        task = asyncio.get_running_loop().create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Let parts in flight and background confirmations finish (engine close)."""
        for batcher in self._batchers.values():
            await batcher.drain()
        if self._flush is not None:
            self._flush.cancel()
            self._send_later()
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # -- giving parts back -----------------------------------------------------------------
    async def _abort(
        self, k: OrderKeys, held: list[_Held], actor: str, always: bool = False
    ) -> bool:
        """Abort the nonces of held parts at home, then give back those no record lists (as
        `actor`). Returns whether the order's record exists (asked even with no parts when
        `always`)."""
        if not held and not always:
            return False
        reply = await self._abort_nonces(k, sorted({h.nonce for h in held}))
        self._step("aborted")
        listed = reply[2] if reply[0] == 1 else "[]"
        await self._undo_unlisted(k, held, listed, actor)
        return bool(reply[0] == 1)

    async def _abort_nonces(self, k: OrderKeys, nonces: Sequence[str]) -> list[Any]:
        """abort.lua at the order's home: [0] aborted, or [1, state, parts] the record exists."""
        keys = (k.order_key, self.abort_key(k))
        reply: list[Any] = orjson.loads(
            await self._script(self.scripts.abort, keys, (str(ABORT_TTL_MS), *nonces))
        )
        return reply

    async def _undo_unlisted(
        self, k: OrderKeys, held: list[_Held], listed: str | bytes, actor: str
    ) -> None:
        keep = _listed(listed)
        todo = [h for h in held if (h.part.partition, h.nonce) not in keep and h.alloc]
        if todo:
            await asyncio.gather(
                *(
                    self._part_op(
                        h.part.partition,
                        k.order_id,
                        "undo",
                        h.nonce,
                        h.part.order.order.units,
                        actor,
                    )
                    for h in todo
                )
            )

    async def _part_op(
        self, partition: int, order_id: str, op: str, arg: str, units: Sequence[Unit], actor: str
    ) -> dict[str, Any]:
        """One transition.lua op ("part" or "undo") on the part of an order in a partition, by
        `actor` (transition.lua takes one per op; these two append no event). Its stock and
        SKU keys, and their texts, are what reserve_call built for the part."""
        stock_keys = [u.stock_key for u in units]
        sku_keys = [self._sku_key(s) for s in distinct_skus(units)]
        raw, raw_skus = orjson.dumps(stock_keys), orjson.dumps(sku_keys)
        for _ in range(2):
            keys = [
                self.part_key(partition, order_id),
                self.parts_index(partition),
                self.resolver.events_key(partition),
                *stock_keys,
                *sku_keys,
            ]
            args: list[bytes | str] = [
                self._config_id,
                op,
                order_id,
                bytes((len(stock_keys), len(sku_keys), 0)),
                raw,
                raw_skus,
                arg,
                actor,
            ]
            (entry,) = orjson.loads(await self._script(self.scripts.transition, keys, args))
            if entry[0] == 0 and entry[1] == "KEYS_CHANGED":
                # written under another unit order: read the part's own texts, once
                stored = await self.calls.hmget_many(
                    [self.part_key(partition, order_id)], ("keys", "skeys")
                )
                raw, raw_skus = stored[0][0] or b"[]", stored[0][1] or b""
                stock_keys = orjson.loads(raw)
                sku_keys = orjson.loads(raw_skus) if raw_skus else []
                continue
            if entry[0] == 0:
                if entry[1] == Reason.RESERVATION_NOT_FOUND.value:
                    if op == "part":
                        # listed by its record but not there: lost with an unreplicated write
                        # (a failover without --redis-wait-replicas, docs/cluster.md)
                        log.error(
                            "a part of order %s is missing in partition %d", order_id, partition
                        )
                    return {"ok": 1, "changed": 0}  # given back or gone already
                log.error("part %s of %s refused: %s", op, order_id, entry[1:])
                raise DomainError(Reason.INTERNAL, f"a part of order {order_id} was refused")
            return {"ok": 1, "changed": entry[1]}
        raise DomainError(Reason.INTERNAL, "a part kept changing under the call")

    # -- settling parts after the home record moved ---------------------------------------
    async def settle(self, k: OrderKeys, actor: str, rec: dict[str, Any] | None = None) -> None:
        """Make every part of an order follow its home record's final state (`rec`: the
        record as a transition just returned it, else read), then drop the order from its
        settle index, after the answer (nothing to settle while HELD or gone). `actor`: who
        moved the home record (or ACTOR_RECOVERY)."""
        if rec is None:
            raw = (await self.calls.hmget_many([k.order_key], ("st", "units", "parts")))[0]
            fields = ("st", "units", "parts")
            rec = {f: v.decode() for f, v in zip(fields, raw, strict=True) if v is not None}
        state, parts_raw = rec.get("st"), rec.get("parts")
        if parts_raw and state is not None and state != c.STATE_HELD:
            await self._settle_parts(k, state, rec.get("units") or "[]", parts_raw, actor)
            self._step("settled")
        self._later([("ZREM", self.settle_index(k.partition), k.order_id)])

    def _units_of(self, units_raw: bytes | str) -> list[Unit]:
        return [self.resolver.unit(s, sp, b) for s, sp, b in orjson.loads(units_raw)]

    async def _settle_parts(
        self,
        k: OrderKeys,
        state: str,
        units_raw: bytes | str,
        parts_raw: bytes | str,
        actor: str,
    ) -> None:
        units = self._units_of(units_raw)
        ops = []
        for p, _nonce in orjson.loads(parts_raw):
            part_units = [u for u in units if u.partition == p]
            ops.append(self._part_op(int(p), k.order_id, "part", state, part_units, actor))
        await asyncio.gather(*ops)

    # -- recovery --------------------------------------------------------------------------
    async def recover(self, partitions: Sequence[int] | None = None) -> dict[str, int]:
        """One recovery pass over every partition (or those given): settle entries and parts
        whose time has passed are settled, confirmed or given back (module docstring).
        Returns counts by outcome."""
        counts = {"settled": 0, "confirmed": 0, "undone": 0, "stale": 0}
        parts_of = list(range(self.settings.partitions)) if partitions is None else partitions
        now = await self.calls.redis_time_ms()
        cmds: list[tuple[Any, ...]] = []
        for p in parts_of:
            cmds.append(
                ("ZRANGEBYSCORE", self.settle_index(p), "-inf", now, "LIMIT", 0, RECOVER_BATCH)
            )
            cmds.append(
                ("ZRANGEBYSCORE", self.parts_index(p), "-inf", now, "LIMIT", 0, RECOVER_BATCH)
            )
        replies = await self.calls.pipeline(cmds)
        for i, p in enumerate(parts_of):
            for raw in replies[2 * i]:
                oid = raw.decode() if isinstance(raw, bytes) else str(raw)
                await self.settle(self.resolver.order(oid), c.ACTOR_RECOVERY)
                counts["settled"] += 1
            for raw in replies[2 * i + 1]:
                oid = raw.decode() if isinstance(raw, bytes) else str(raw)
                counts[await self._recover_part(p, oid)] += 1
        return counts

    async def _recover_part(self, partition: int, order_id: str) -> str:
        """A part whose index time has passed: confirm, settle or give it back."""
        k = self.resolver.order(order_id)
        part_key = self.part_key(partition, order_id)
        (part, home) = await self.calls.hmget_many(
            [part_key, k.order_key], ("st", "nc", "units", "parts", "dl")
        )
        if part[0] is None or part[0] != c.STATE_HELD.encode():
            # settled or gone: only the index entry is left
            await self.calls.pipeline([("ZREM", self.parts_index(partition), order_id)])
            return "stale"
        nonce = part[1].decode() if part[1] else ""
        part_units = self._units_of(part[2] or b"[]")
        listed: set[tuple[int, str]] = set()
        state: str | None = None
        if home[0] is None:
            reply = await self._abort_nonces(k, [nonce])
            if reply[0] == 1:
                state = str(reply[1])
                listed = _listed(reply[2])
        else:
            state = home[0].decode()
            listed = _listed(home[3] or b"[]")
        if state is None or (partition, nonce) not in listed:
            await self._part_op(partition, order_id, "undo", nonce, part_units, c.ACTOR_RECOVERY)
            return "undone"
        if state == c.STATE_HELD:
            score = str(int(home[4] or 0) + self.window_ms)
            await self.calls.pipeline(
                [("ZADD", self.parts_index(partition), "XX", score, order_id)]
            )
            return "confirmed"
        await self._part_op(partition, order_id, "part", state, part_units, c.ACTOR_RECOVERY)
        return "settled"
