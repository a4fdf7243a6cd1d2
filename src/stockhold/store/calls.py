"""The script-call layer: the Redis clients, the registered scripts, the key resolver.

Everything that runs a Lua script or a plain Redis command stands on `ScriptCalls`, which
turns every Redis failure into the DomainError a client sees. The engine and the policy store
are both built on it; neither imports the other's layer upwards.

Two clients, one rule: every script call (the hot path: Reserve, Commit, Release, ...) goes
through the hot-path client (store/hotclient.py: a pipelined asyncio Protocol on hiredis,
chosen by measurement in issue 10); plain commands off the hot path (availability reads,
policy pages, contention snapshots, the sweeper's hints) stay on redis-py. Without a hot client
(`redis_hot_client = False`) scripts run through redis-py's `Script` objects, as before.

On Redis Cluster (`redis_cluster`, issue 11) the redis-py client is its asyncio `RedisCluster`
and the hot client routes by slot (store/cluster.py); `connect` builds the right pair.

With `redis_wait_replicas` N > 0 every writing script call is followed, in the same write on
the same connection, by `WAIT N timeout`: fewer acknowledgements than N is BACKEND_UNAVAILABLE
(cause "replication"), safe to retry with the same ids. Scripts that only read (`READ_ONLY`)
skip it. With N = 0 nothing is added to a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Final, TypeAlias, TypeVar, cast

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import PipelineCommand
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from stockhold.errors import DomainError, Reason
from stockhold.resolver import KeyResolver
from stockhold.scripts import Scripts
from stockhold.secretfile import redis_kwargs
from stockhold.settings import Settings
from stockhold.store.cluster import (
    MAX_REDIRECTS,
    TRYAGAIN_PAUSE,
    ClusterHotClient,
    command_slot,
)
from stockhold.store.hotclient import HotClient, ReplicationError, ScriptDef, acked_reply

log = logging.getLogger(__name__)

T = TypeVar("T")

RedisClient: TypeAlias = Redis | RedisCluster
"""The redis-py client off the hot path: one node, or a Redis Cluster."""

# Scripts (by their name in stockhold.scripts) that write nothing a client is answered about:
# no WAIT after them.
READ_ONLY: Final = frozenset({"get", "health", "policy_get"})

# Error replies that mean "Redis cannot serve right now", not "the script is wrong": by the
# class redis-py's parser gives them (it strips the code from the message of the ones it
# knows: READONLY, TRYAGAIN, CLUSTERDOWN, MASTERDOWN, OOM), else by the code in the message.
_TRANSIENT_CLASSES = (ReadOnlyError, TryAgainError, ClusterDownError, OutOfMemoryError)
_TRANSIENT = ("BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS")
# redis-py's cluster client raises RedisClusterException (not a RedisError) both for a cluster
# it cannot reach or whose slots are not all served, and for a call it refuses to send
# (keys of several slots: a bug). These words mark the first kind.
_CLUSTER_UNREACHABLE = ("cannot be connected", "not covered", "could not agree")


def make_client(url: str, settings: Settings) -> Redis:
    """A Redis client on a bounded, blocking connection pool with short, bounded retries.

    Retrying a script after a broken connection is safe: every script is idempotent by its
    order or adjustment id.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        **redis_kwargs(settings),
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


class _RedisCluster(RedisCluster):
    """redis-py's cluster client, re-routed after a lost node or CLUSTERDOWN, but never sent
    again after a timeout: a Redis that does not answer is UNAVAILABLE within the socket
    timeout, as with `make_client` (redis-py retries timeouts too by default)."""

    ERRORS_ALLOW_RETRY = (  # type: ignore[assignment]
        RedisConnectionError,
        ClusterDownError,
        SlotNotCoveredError,
    )


def make_cluster_client(url: str, settings: Settings) -> RedisCluster:
    """redis-py's asyncio RedisCluster seeded by `url`: at most `redis_max_connections` per
    node, the timeouts of `settings`, short bounded retries (see _RedisCluster).

    Unlike `make_client`'s pool, a node's full pool does not wait: the call fails at once
    with MaxConnectionsError (BACKEND_UNAVAILABLE). Reads go to masters only.
    """
    return _RedisCluster.from_url(
        url,
        **redis_kwargs(settings),
        max_connections=settings.redis_max_connections,
        socket_connect_timeout=settings.redis_connect_timeout_seconds,
        socket_timeout=settings.redis_socket_timeout_seconds,
        # A slot without a master (a failover under way) fails only the calls on that slot.
        require_full_coverage=False,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=2),
        health_check_interval=0,
    )


def connect(url: str, settings: Settings) -> tuple[RedisClient, HotClient | None]:
    """The clients of one deployment (both connect lazily): redis-py's `Redis` for one node
    or `RedisCluster` with `settings.redis_cluster`, and the hot-path client for script calls
    (routed by slot on a cluster) unless `settings.redis_hot_client` is off."""
    cluster = settings.redis_cluster
    client = make_cluster_client(url, settings) if cluster else make_client(url, settings)
    hot = HotClient.from_url(url, settings, cluster=cluster) if settings.redis_hot_client else None
    return client, hot


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Turn Redis client failures inside the block into the DomainError a client sees."""
    try:
        yield
    except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
        raise backend_error(exc) from exc


def backend_error(exc: BaseException) -> DomainError:
    """Translate a Redis client failure into the domain error a client sees."""
    if isinstance(exc, ReplicationError):
        return DomainError(
            Reason.BACKEND_UNAVAILABLE,
            metadata={"cause": "replication", "acked": exc.acked, "wanted": exc.wanted},
        )
    if isinstance(exc, RedisClusterException) and not (
        isinstance(exc, SlotNotCoveredError) or any(m in str(exc) for m in _CLUSTER_UNREACHABLE)
    ):
        log.error("the cluster client refused a call: %s", exc)
        return DomainError(Reason.INTERNAL, "the stock store refused the operation")
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

    def __init__(
        self, client: RedisClient, settings: Settings, hot: HotClient | None = None
    ) -> None:
        self.client = client
        self.hot = hot
        self.settings = settings
        self.resolver = KeyResolver(settings.key_prefix, settings.partitions)
        # redis-py's Script objects run on either client.
        self.scripts = Scripts(cast(Redis, client), settings)
        self.wait_replicas = settings.redis_wait_replicas
        self._hot_cluster = isinstance(hot, ClusterHotClient)
        # Called with (script, keys) after each script call Redis answered, when set
        # (stockhold.delivery.wake.HintPublisher: only while a subscription exists).
        self.on_script: Callable[[Any, Sequence[str]], None] | None = None
        # The hot client's view of each registered script (same source, same SHA), with its
        # WAIT unless it only reads.
        self._defs: dict[int, ScriptDef] = {
            id(script): self._new_def(name, cast(str, script.script))
            for name, script in vars(self.scripts).items()
            if isinstance(script, AsyncScript)
        }

    def _new_def(self, name: str, source: str) -> ScriptDef:
        replicas = 0 if name in READ_ONLY else self.wait_replicas
        timeout = self.settings.redis_wait_timeout_ms if replicas else 0
        return ScriptDef(name, source, replicas, timeout)

    def _def(self, script: Any) -> ScriptDef:
        found = self._defs.get(id(script))
        if found is None:  # not one of self.scripts: counted as writing
            found = self._defs[id(script)] = self._new_def("script", script.script)
        return found

    async def call_script(
        self, script: Any, keys: Sequence[str], args: Sequence[bytes | str]
    ) -> Any:
        """Run one registered script; Redis failures become the DomainError a client sees.

        With `redis_wait_replicas` > 0 a writing script is acknowledged by that many replicas
        or fails BACKEND_UNAVAILABLE (cause "replication")."""
        with redis_errors():
            if self.hot is not None:
                reply = await self.hot.evalsha(self._def(script), keys, args)
            elif self.wait_replicas:
                reply = await self._script_wait(script, keys, args)
            else:
                reply = await script(keys=keys, args=args)
        if self.on_script is not None:  # events hints (delivery/wake.py), while subscribed
            self.on_script(script, keys)
        return reply

    async def _script_wait(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """redis-py without the hot client: EVALSHA then WAIT on one connection."""
        d = self._def(script)
        if not d.wait:
            return await script(keys=keys, args=args)
        if isinstance(self.client, RedisCluster):
            reply, acked = await _cluster_evalsha_wait(self.client, d, keys, args)
        else:
            reply, acked = await _evalsha_wait(self.client, d, keys, args, load=False)
            if isinstance(reply, NoScriptError):
                reply, acked = await _evalsha_wait(self.client, d, keys, args, load=True)
        return acked_reply(d, reply, acked)

    async def hmget_many(
        self, keys: Sequence[str], fields: tuple[str, ...]
    ) -> list[list[bytes | None]]:
        """HMGET of the same fields from many hashes, in one pipeline (see `pipeline`)."""
        return await self.pipeline([("HMGET", k, *fields) for k in keys])

    async def pipeline(self, cmds: Sequence[Sequence[Any]]) -> list[Any]:
        """Plain commands in one pipeline (hot client if any); on a cluster one pipeline per
        slot, all at once, the replies in the commands' order."""
        with redis_errors():
            hot = self.hot
            if hot is not None:
                if self._hot_cluster and len(cmds) > 1:
                    return await self._by_slot(hot, cmds)
                return list(await hot.pipeline(cmds))
            async with self.client.pipeline(transaction=False) as pipe:
                for cmd in cmds:
                    pipe.execute_command(*cmd)
                return list(await pipe.execute())

    @staticmethod
    async def _by_slot(hot: HotClient, cmds: Sequence[Sequence[Any]]) -> list[Any]:
        # the hot client's cluster pipelines stay in one slot
        by_slot: dict[int | None, list[int]] = {}
        for i, cmd in enumerate(cmds):
            by_slot.setdefault(command_slot(cmd), []).append(i)
        groups = list(by_slot.values())
        answers = await asyncio.gather(*(hot.pipeline([cmds[i] for i in g]) for g in groups))
        out: list[Any] = [None] * len(cmds)
        for group, replies in zip(groups, answers, strict=True):
            for i, reply in zip(group, replies, strict=True):
                out[i] = reply
        return out

    async def redis_time_ms(self) -> int:
        """Redis's clock in ms (TIME of any master on a cluster)."""
        with redis_errors():
            if self.hot is not None:
                seconds, micros = await self.hot.execute("TIME")
            else:
                seconds, micros = await self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def aclose(self) -> None:
        """Close both clients and their pools."""
        try:
            if self.hot is not None:
                await self.hot.aclose()
        finally:
            if isinstance(self.client, RedisCluster):
                await self.client.aclose()
            else:
                await self.client.aclose(close_connection_pool=True)

    async def run(self, command: Awaitable[T]) -> T:
        """Await one plain Redis command, translating failures as `call_script` does."""
        with redis_errors():
            return await command


async def _evalsha_wait(
    client: Redis, d: ScriptDef, keys: Sequence[str], args: Sequence[Any], load: bool
) -> tuple[Any, Any]:
    """[SCRIPT LOAD,] EVALSHA, WAIT in one non-transactional pipeline (one connection):
    the script's reply and WAIT's, error replies as values."""
    async with client.pipeline(transaction=False) as pipe:
        if load:
            pipe.script_load(d.source)
        pipe.evalsha(d.sha, len(keys), *keys, *args)
        pipe.execute_command("WAIT", d.replicas, d.wait_timeout_ms)
        replies = await pipe.execute(raise_on_error=False)
    if load and isinstance(replies[0], Exception):
        raise replies[0]
    return replies[-2], replies[-1]


async def _cluster_evalsha_wait(
    client: RedisCluster, d: ScriptDef, keys: Sequence[str], args: Sequence[Any]
) -> tuple[Any, Any]:
    """EVALSHA then WAIT on one connection of the node serving the first key's slot.

    redis-py's cluster pipeline would send a redirected call again on its own, without its
    WAIT, so the calls go to the node's connection here, following MOVED / ASK, loading the
    script on NOSCRIPT and pausing on TRYAGAIN, a bounded number of times. A lost node is
    reported as is; redis-py's other calls (the health probe) refresh the topology.
    """
    await client.initialize()
    node = client.get_node_from_key(keys[0]) if keys else client.get_random_primary_node()
    asking = load = False
    if node is None:
        raise SlotNotCoveredError(f"no node serves the slot of {keys[0]!r}")
    for attempt in range(2 * MAX_REDIRECTS + 2):
        cmds = [PipelineCommand(0, "SCRIPT LOAD", d.source)] if load else []
        if asking:
            cmds.append(PipelineCommand(1, "ASKING"))
        call = PipelineCommand(2, "EVALSHA", d.sha, len(keys), *keys, *args)
        wait = PipelineCommand(3, "WAIT", d.replicas, d.wait_timeout_ms)
        await node.execute_pipeline([*cmds, call, wait])
        if load and isinstance(cmds[0].result, Exception):
            raise cmds[0].result
        reply = call.result
        asking = load = False
        if isinstance(reply, MovedError):
            await client.nodes_manager.move_slot(reply)
            node = client.get_node_from_key(keys[0]) or node
        elif isinstance(reply, AskError):
            target = client.get_node(reply.host, reply.port)
            if target is None:
                raise ClusterError(f"ASK to a node not in the slot map: {reply.host}:{reply.port}")
            node, asking = target, True
        elif isinstance(reply, NoScriptError):
            load = True
        elif isinstance(reply, TryAgainError):
            await asyncio.sleep(TRYAGAIN_PAUSE * 2 ** min(attempt, 4))
        else:
            return reply, wait.result
    raise ClusterError(f"the call found no node to run it in {2 * MAX_REDIRECTS + 2} attempts")
