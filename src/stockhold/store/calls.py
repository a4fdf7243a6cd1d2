"""The script-call layer: one Redis client, its registered scripts, the key resolver.

Everything that runs a Lua script or a plain Redis command stands on `ScriptCalls`, which
turns every Redis failure into the DomainError a client sees. The engine and the policy store
are both built on it; neither imports the other's layer upwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from stockhold.errors import DomainError, Reason
from stockhold.resolver import KeyResolver
from stockhold.scripts import Scripts
from stockhold.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# ResponseError prefixes that mean "Redis cannot serve right now", not "the script is wrong".
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
    if isinstance(exc, ResponseError) and not str(exc).startswith(_TRANSIENT):
        log.error("redis refused a script call: %s", exc)
        return DomainError(Reason.INTERNAL, "the stock store refused the operation")
    return DomainError(Reason.BACKEND_UNAVAILABLE, metadata={"cause": type(exc).__name__})


class ScriptCalls:
    """A Redis client with the registered scripts, the key resolver and the settings."""

    def __init__(self, client: Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.resolver = KeyResolver(settings.key_prefix, settings.partitions)
        self.scripts = Scripts(client)

    async def call_script(
        self, script: Any, keys: Sequence[str], args: Sequence[bytes | str]
    ) -> Any:
        """Run one registered script; Redis failures become the DomainError a client sees."""
        with redis_errors():
            return await script(keys=keys, args=args)

    async def run(self, command: Awaitable[T]) -> T:
        """Await one plain Redis command, translating failures as `call_script` does."""
        with redis_errors():
            return await command
