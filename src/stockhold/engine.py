"""The engine: every operation is one atomic Lua script call against Redis.

The engine holds no locks and no state beyond its Redis client: it turns validated commands
into script calls and script replies into domain objects or DomainErrors.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from stockhold import constants as c
from stockhold.batcher import Batcher, NotSent
from stockhold.errors import DomainError, Reason
from stockhold.model import Reservation, StockLevel
from stockhold.resolver import KeyResolver, OrderKeys, ResolvedOrder, Unit, escape
from stockhold.scripts import Scripts
from stockhold.settings import Settings

log = logging.getLogger(__name__)

# ResponseError prefixes that mean "Redis cannot serve right now", not "the script is wrong".
_TRANSIENT = ("BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS")
# How often a commit/release re-reads a record whose stock keys changed under it.
_KEYS_CHANGED_RETRIES = 3


class Transition(NamedTuple):
    """One commit, release or expire request for the transition batcher."""

    op: str
    keys: OrderKeys
    arg: str


class PartitionMismatch(RuntimeError):
    """The configured partition count differs from the one this Redis was set up with."""


def make_client(url: str, settings: Settings) -> Redis:
    """A Redis client on a bounded, blocking connection pool with short, bounded retries.

    Retrying a script after a broken connection is safe: every script is idempotent by its
    order or adjustment id.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout_seconds,
        socket_connect_timeout=settings.redis_connect_timeout_seconds,
        socket_timeout=settings.redis_socket_timeout_seconds,
        # Only broken connections are retried: a timeout means Redis is stuck, and waiting
        # again would break the "UNAVAILABLE within 1 s" promise.
        retry=Retry(
            ExponentialBackoff(cap=0.05, base=0.01),
            retries=2,
            supported_errors=(RedisConnectionError,),
        ),
        retry_on_error=[RedisConnectionError],
        health_check_interval=0,
    )
    return Redis(connection_pool=pool)


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Turn Redis client failures inside the block into the DomainError a client sees."""
    try:
        yield
    except (RedisError, OSError, TimeoutError) as exc:
        raise backend_error(exc) from exc


def backend_error(exc: BaseException) -> DomainError:
    """Translate a Redis client failure into the domain error a client sees."""
    if isinstance(exc, ResponseError) and not str(exc).startswith(_TRANSIENT):
        log.error("redis refused a script call: %s", exc)
        return DomainError(Reason.INTERNAL, "the stock store refused the operation")
    return DomainError(Reason.BACKEND_UNAVAILABLE, metadata={"cause": type(exc).__name__})


def _raise_for(result: dict[str, Any]) -> None:
    err = result.get("err")
    if err is not None:
        meta = result.get("meta") or {}
        raise DomainError(Reason(err), metadata=meta)


class Engine:
    """Reservation operations over one Redis deployment."""

    def __init__(self, client: Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.resolver = KeyResolver(settings.key_prefix, settings.partitions)
        self.scripts = Scripts(client)
        self._reserve_header = orjson.dumps(
            {"maxlen": settings.event_stream_maxlen, "priority": list(settings.warehouse_priority)}
        )
        self._transition_header = orjson.dumps(
            {
                "maxlen": settings.event_stream_maxlen,
                "retention": settings.record_retention_seconds * 1000,
            }
        )
        # Concurrent reserves and commits/releases are coalesced into few script calls.
        self.reserves: Batcher[ResolvedOrder, dict[str, Any]] = Batcher(
            self._reserve_batch, settings.batch_max_orders, settings.batch_max_inflight
        )
        self.transitions: Batcher[Transition, dict[str, Any]] = Batcher(
            self._transition_batch, settings.batch_max_orders, settings.batch_max_inflight
        )

    @classmethod
    def connect(cls, url: str, settings: Settings) -> Engine:
        """An engine on a new client for `url`."""
        return cls(make_client(url, settings), settings)

    async def close(self) -> None:
        """Let calls in flight finish, then close the client and its pool."""
        await self.reserves.drain()
        await self.transitions.drain()
        await self.client.aclose(close_connection_pool=True)

    async def _call(self, script: Any, keys: Sequence[str], args: Sequence[bytes | str]) -> Any:
        with redis_errors():
            return await script(keys=keys, args=args)

    # -- set-up and health -------------------------------------------------------------------
    async def check_partitions(self) -> None:
        """Record the partition count on first use; refuse to run with a different one."""
        key = self.resolver.meta_partitions_key()
        with redis_errors():
            await self.client.set(key, self.settings.partitions, nx=True)
            stored = int(await self.client.get(key) or 0)
        if stored != self.settings.partitions:
            raise PartitionMismatch(
                f"this Redis holds data for {stored} partitions; "
                f"stockhold is configured with {self.settings.partitions}"
            )

    async def ping(self) -> int:
        """Run the health script; returns Redis's clock in ms."""
        return int(await self._call(self.scripts.health, (), ()))

    # -- reservations ------------------------------------------------------------------------
    async def reserve(self, order: ResolvedOrder) -> tuple[Reservation, bool]:
        """Hold stock for every line of the order, all or nothing; idempotent by order id."""
        result = await self._submit(self.reserves, order)
        _raise_for(result)
        return Reservation.from_record(result["rec"]), bool(result["replayed"])

    async def _reserve_batch(self, orders: Sequence[ResolvedOrder]) -> list[dict[str, Any]]:
        """One reserve.lua call for a batch of orders; one result per order."""
        keys, args = self.reserve_call(orders)
        results: list[dict[str, Any]] = orjson.loads(
            await self._call(self.scripts.reserve, keys, args)
        )
        return results

    def reserve_call(self, orders: Sequence[ResolvedOrder]) -> tuple[list[str], list[bytes]]:
        """KEYS and ARGV of one reserve.lua call for a batch of orders."""
        keys: list[str] = []
        args: list[bytes] = [self._reserve_header]
        default_hold = self.settings.default_hold_seconds
        for order in orders:
            k = order.keys
            keys += (k.order_key, k.expiry_key, k.events_key)
            keys += (u.stock_key for u in order.units)
            args.append(
                orjson.dumps(
                    {
                        "oid": k.order_id,
                        "fp": order.fingerprint,
                        "hold": order.hold_seconds or default_hold,
                        "units": [(u.sku, u.spec, u.barcode) for u in order.units],
                        "lines": [(i + 1, wh, q) for i, wh, q in order.lines],
                    }
                )
            )
        return keys, args

    async def commit(self, order_id: str, payment_ref: str = "") -> Reservation:
        """HELD -> COMMITTED; a COMMITTED reservation is returned unchanged."""
        return await self._transition("commit", self.resolver.order(order_id), payment_ref)

    async def release(self, order_id: str, reason: str = "") -> Reservation:
        """HELD -> RELEASED (EXPIRED at or past the deadline); a finished release is unchanged."""
        return await self._transition("release", self.resolver.order(order_id), reason)

    async def _submit(self, batcher: Batcher[Any, dict[str, Any]], item: Any) -> dict[str, Any]:
        """Submit to a batcher; a request stuck in its queue (Redis stuck) is refused unsent."""
        try:
            return await batcher.submit(item, self.settings.redis_socket_timeout_seconds)
        except NotSent as exc:
            raise DomainError(Reason.BACKEND_UNAVAILABLE, metadata={"cause": "queued"}) from exc

    async def _transition(self, op: str, k: OrderKeys, arg: str) -> Reservation:
        for _ in range(_KEYS_CHANGED_RETRIES):
            result = await self._submit(self.transitions, Transition(op, k, arg))
            if result.get("err") == "KEYS_CHANGED":
                continue
            if result.get("err") == Reason.RESERVATION_NOT_FOUND:
                result["meta"] = {"order_id": k.order_id}
            _raise_for(result)
            return Reservation.from_record(result["rec"])
        raise DomainError(Reason.INTERNAL, "the reservation kept changing under the call")

    async def _transition_batch(self, items: Sequence[Transition]) -> list[dict[str, Any]]:
        """Read each record's stock keys (one pipeline), then one transition.lua call."""
        with redis_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                for t in items:
                    pipe.hget(t.keys.order_key, "keys")
                stored: list[bytes | None] = await pipe.execute()
        results: list[dict[str, Any]] = [{"err": Reason.RESERVATION_NOT_FOUND.value} for _ in items]
        keys: list[str] = []
        args: list[bytes] = [self._transition_header]
        sent: list[int] = []
        for i, (t, raw) in enumerate(zip(items, stored, strict=True)):
            if raw is None:
                continue
            stock_keys = orjson.loads(raw)
            k = t.keys
            keys += (k.order_key, k.expiry_key, k.events_key, *stock_keys)
            args.append(
                orjson.dumps({"op": t.op, "oid": k.order_id, "n": len(stock_keys), "arg": t.arg})
            )
            sent.append(i)
        if sent:
            replies = orjson.loads(await self._call(self.scripts.transition, keys, args))
            for i, reply in zip(sent, replies, strict=True):
                results[i] = reply
        return results

    async def get_reservation(self, order_id: str) -> Reservation:
        """The reservation as it stands; HELD past its deadline reads as EXPIRED."""
        k = self.resolver.order(order_id)
        result = orjson.loads(await self._call(self.scripts.get, (k.order_key,), ()))
        if "rec" not in result:
            raise DomainError(Reason.RESERVATION_NOT_FOUND, metadata={"order_id": order_id})
        return Reservation.from_record(result["rec"], now_ms=int(result["now"]))

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
        self, adjustment_id: str, unit: Unit, warehouse: str, delta: int, reason: str
    ) -> tuple[StockLevel, bool]:
        """Receipt (+) or shrinkage (-) of available stock; idempotent by adjustment id."""
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
            }
        )
        keys = (k.record_key, k.events_key, unit.stock_key)
        result = orjson.loads(await self._call(self.scripts.adjust, keys, (arg,)))
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
    async def expire_due(self, max_rounds: int = 20) -> int:
        """Expire every due hold in every partition; returns how many this call expired.

        Safe in every process at once: the transition script re-checks state and deadline.
        """
        batch = self.settings.sweep_batch
        partitions = list(range(self.settings.partitions))
        expired = 0
        for _ in range(max_rounds):
            with redis_errors():
                async with self.client.pipeline(transaction=False) as pipe:
                    for p in partitions:
                        await self.scripts.due(
                            keys=(self.resolver.expiry_key(p),), args=(batch,), client=pipe
                        )
                    due_lists: list[list[bytes]] = await pipe.execute()
            due = [oid.decode() for ids in due_lists for oid in ids]
            for i in range(0, len(due), batch):
                expired += await self._expire_batch(due[i : i + batch])
            # Another round only for partitions that had a full batch (more may be due).
            partitions = [
                p for p, ids in zip(partitions, due_lists, strict=True) if len(ids) >= batch
            ]
            if not partitions:
                break
        return expired

    async def _expire_batch(self, order_ids: Sequence[str]) -> int:
        items = [Transition("expire", self.resolver.order(oid), "") for oid in order_ids]
        results = await self._transition_batch(items)
        for t, r in zip(items, results, strict=True):
            if r.get("err") == Reason.RESERVATION_NOT_FOUND:
                # finished and gone (retention) meanwhile: drop the stale index entry
                await self.client.zrem(t.keys.expiry_key, t.keys.order_id)
            elif r.get("err"):
                log.error("expiry refused", extra={"order_id": t.keys.order_id, "result": r})
        return sum(1 for r in results if r.get("changed"))
