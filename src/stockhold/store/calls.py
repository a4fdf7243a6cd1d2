"""The script-call layer: the Redis clients, the registered scripts, the key resolver.

Everything that runs a Lua script or a plain Redis command stands on `ScriptCalls`, which
turns every Redis failure into the DomainError a client sees. The engine and the policy store
are both built on it; neither imports the other's layer upwards.

Two clients, one rule: every script call (the hot path: Reserve, Commit, Release, ...) goes
through the hot-path client (store/hotclient.py: a pipelined asyncio Protocol on hiredis,
chosen by measurement in issue 10); plain commands off the hot path (availability reads,
policy pages, contention snapshots, the sweeper's hints) stay on redis-py. Without a hot client
(`redis_hot_client = False`) scripts run through redis-py's `Script` objects, as before.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from stockhold.errors import DomainError, Reason
from stockhold.resolver import KeyResolver
from stockhold.scripts import Scripts
from stockhold.settings import Settings
from stockhold.store.hotclient import HotClient, ScriptDef

log = logging.getLogger(__name__)

T = TypeVar("T")

# Error replies that mean "Redis cannot serve right now", not "the script is wrong": by the
# class redis-py's parser gives them (it strips the code from the message of the ones it
# knows: READONLY, TRYAGAIN, CLUSTERDOWN, MASTERDOWN, OOM), else by the code in the message.
_TRANSIENT_CLASSES = (ReadOnlyError, TryAgainError, ClusterDownError, OutOfMemoryError)
_TRANSIENT = ("BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS")


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
    if (
        isinstance(exc, ResponseError)
        and not isinstance(exc, _TRANSIENT_CLASSES)
        and not str(exc).startswith(_TRANSIENT)
    ):
        log.error("redis refused a script call: %s", exc)
        return DomainError(Reason.INTERNAL, "the stock store refused the operation")
    return DomainError(Reason.BACKEND_UNAVAILABLE, metadata={"cause": type(exc).__name__})


class ScriptCalls:
    """The Redis clients with the registered scripts, the key resolver and the settings."""

    def __init__(self, client: Redis, settings: Settings, hot: HotClient | None = None) -> None:
        self.client = client
        self.hot = hot
        self.settings = settings
        self.resolver = KeyResolver(settings.key_prefix, settings.partitions)
        self.scripts = Scripts(client, settings)
        # The hot client's view of each registered script (same source, same SHA).
        self._defs: dict[int, ScriptDef] = {}

    def _def(self, script: Any) -> ScriptDef:
        found = self._defs.get(id(script))
        if found is None:
            found = self._defs[id(script)] = ScriptDef("script", script.script)
        return found

    async def call_script(
        self, script: Any, keys: Sequence[str], args: Sequence[bytes | str]
    ) -> Any:
        """Run one registered script; Redis failures become the DomainError a client sees."""
        with redis_errors():
            if self.hot is not None:
                return await self.hot.evalsha(self._def(script), keys, args)
            return await script(keys=keys, args=args)

    async def hmget_many(
        self, keys: Sequence[str], fields: tuple[str, ...]
    ) -> list[list[bytes | None]]:
        """HMGET of the same fields from many hashes, in one pipeline (hot client if any)."""
        with redis_errors():
            if self.hot is not None:
                replies: list[list[bytes | None]] = await self.hot.pipeline(
                    [("HMGET", k, *fields) for k in keys]
                )
                return replies
            async with self.client.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.hmget(k, fields)
                stored: list[list[bytes | None]] = await pipe.execute()
            return stored

    async def aclose(self) -> None:
        """Close both clients and their pools."""
        try:
            if self.hot is not None:
                await self.hot.aclose()
        finally:
            await self.client.aclose(close_connection_pool=True)

    async def run(self, command: Awaitable[T]) -> T:
        """Await one plain Redis command, translating failures as `call_script` does."""
        with redis_errors():
            return await command
