"""The hot-path client in cluster mode (stockhold.store.cluster) against a local 3-master
Redis Cluster (tests/redis_cluster.py): routing by slot, MOVED, ASK, bounded redirects.

Whether a call was redirected is read from the nodes themselves (INFO errorstats counts the
MOVED/ASK replies a node gave, INFO commandstats the ASKING commands it got).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from typing import Any

import pytest
import redis.exceptions
from redis.crc import key_slot
from redis_cluster import RedisCluster
from redis_proc import RedisProc

from stockhold.errors import Reason
from stockhold.settings import Settings
from stockhold.store.calls import backend_error
from stockhold.store.cluster import TRYAGAIN_RETRIES, ClusterHotClient, command_slot
from stockhold.store.hotclient import HotClient, ScriptDef

# A script that writes its key and answers with its argument.
ECHO = ScriptDef("echo", "redis.call('INCR', KEYS[1]) return ARGV[1]")
SETTINGS = Settings(redis_connect_timeout_seconds=5.0, redis_socket_timeout_seconds=5.0)


def stat(proc: RedisProc, section: str, name: str, field: str) -> int:
    """One counter of INFO errorstats / commandstats (0 when absent)."""
    entry = proc.info(section).get(name)
    return int(entry.get(field, 0)) if isinstance(entry, dict) else 0


def moved_replies(proc: RedisProc) -> int:
    return stat(proc, "errorstats", "errorstat_MOVED", "count")


def ask_replies(proc: RedisProc) -> int:
    return stat(proc, "errorstats", "errorstat_ASK", "count")


def asking_received(proc: RedisProc) -> int:
    return stat(proc, "commandstats", "cmdstat_asking", "calls")


def cluster_client(cluster: RedisCluster, **kwargs: Any) -> ClusterHotClient:
    client = HotClient.from_url(cluster.url, SETTINGS, cluster=True, **kwargs)
    assert isinstance(client, ClusterHotClient)
    return client


def test_command_slot_picks_the_first_key() -> None:
    assert command_slot(("GET", "a{t}")) == key_slot(b"t")
    assert command_slot((b"evalsha", "sha", 2, "x{t}", "y{t}", "arg")) == key_slot(b"t")
    assert command_slot(("EVALSHA", "sha", 0, "arg")) is None
    assert command_slot(("PING",)) is None
    assert command_slot(("WAIT", 1, 100)) is None
    # stream commands whose key is not the first argument (consumer groups, issue 12)
    assert command_slot(("XGROUP", "CREATE", "s{t}", "g", "0", "MKSTREAM")) == key_slot(b"t")
    assert command_slot(("XINFO", "GROUPS", "s{t}")) == key_slot(b"t")
    read = ("XREADGROUP", "GROUP", "g", "c", "COUNT", 10, "STREAMS", "s{t}", ">")
    assert command_slot(read) == key_slot(b"t")


async def test_calls_reach_every_master(redis_cluster: RedisCluster) -> None:
    client = cluster_client(redis_cluster)
    try:
        keys = [redis_cluster.key_in(m) for m in redis_cluster.masters]
        replies = await asyncio.gather(*(client.evalsha(ECHO, [k], [k]) for k in keys))
        assert replies == [k.encode() for k in keys]
        for master, key in zip(redis_cluster.masters, keys, strict=True):
            # Each call ran on the master of its key's slot, and nowhere else.
            assert master.client().get(key) == b"1"
            assert stat(master, "commandstats", "cmdstat_evalsha", "calls") >= 1
            assert moved_replies(master) == 0
            slot = key_slot(key.encode())
            assert client.slot_owner(slot) == f"127.0.0.1:{master.port}"
            assert await client.execute("GET", key) == b"1"
            assert await client.pipeline([("INCR", key), ("GET", key)]) == [2, b"2"]
        # One bounded pool per node (one connection each is plenty here), none elsewhere.
        assert len(client.nodes) == 3
        assert client.connection_count() <= 3 * SETTINGS.redis_max_connections
        with pytest.raises(ValueError, match="one slot"):
            await client.pipeline([("GET", keys[0]), ("GET", keys[1])])
        # CROSSSLOT is Redis's own refusal, raised as redis-py raises it.
        with pytest.raises(redis.exceptions.ClusterCrossSlotError):
            await client.evalsha(ECHO, [keys[0], keys[1]], [b"x"])
    finally:
        await client.aclose()


async def test_any_node_seeds_the_topology(redis_cluster: RedisCluster) -> None:
    seed = redis_cluster.masters[2]
    client = HotClient.from_url(seed.url, SETTINGS, cluster=True)
    try:
        key = redis_cluster.key_in(redis_cluster.masters[0])
        assert await client.evalsha(ECHO, [key], [b"ok"]) == b"ok"
        assert redis_cluster.masters[0].client().get(key) == b"1"
        assert moved_replies(seed) == 0  # routed by the map, not by redirection
    finally:
        await client.aclose()


async def test_a_moved_slot_is_followed_and_the_map_updated(redis_cluster: RedisCluster) -> None:
    client = cluster_client(redis_cluster)
    try:
        source, target = redis_cluster.masters[0], redis_cluster.masters[1]
        key = redis_cluster.key_in(source)
        slot = key_slot(key.encode())
        assert await client.evalsha(ECHO, [key], [b"1"]) == b"1"
        assert client.slot_owner(slot) == f"127.0.0.1:{source.port}"

        redis_cluster.migrate_slot(slot, target)  # the key moves with its slot
        assert await client.evalsha(ECHO, [key], [b"2"]) == b"2"
        assert moved_replies(source) == 1  # the stale route was refused once ...
        assert target.client().get(key) == b"2"  # ... and the call ran where the slot went
        assert client.slot_owner(slot) == f"127.0.0.1:{target.port}"
        # Later calls go straight to the new owner.
        assert await client.evalsha(ECHO, [key], [b"3"]) == b"3"
        assert await client.execute("GET", key) == b"3"
        assert moved_replies(source) == 1
    finally:
        await client.aclose()


async def test_a_call_during_migration_follows_ask(redis_cluster: RedisCluster) -> None:
    client = cluster_client(redis_cluster)
    try:
        source, target = redis_cluster.masters[0], redis_cluster.masters[2]
        key = redis_cluster.key_in(source)
        slot = key_slot(key.encode())
        await client.execute("PING")
        await client.refresh_topology()
        assert client.slot_owner(slot) == f"127.0.0.1:{source.port}"

        assert redis_cluster.begin_migration(slot, target) is source
        # The key is not on the source: it answers ASK; the client sends ASKING + the call
        # to the target (which has never seen the script: NOSCRIPT is answered there too).
        assert await client.evalsha(ECHO, [key], [b"asked"]) == b"asked"
        assert ask_replies(source) == 1
        assert asking_received(target) >= 1
        counts = target.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
        assert counts == 1
        # ASK is a one-off: the map still names the source until the migration finishes.
        assert client.slot_owner(slot) == f"127.0.0.1:{source.port}"

        redis_cluster.finish_migration(slot, source, target)
        assert await client.evalsha(ECHO, [key], [b"after"]) == b"after"
        assert client.slot_owner(slot) == f"127.0.0.1:{target.port}"
        assert target.client().get(key) == b"2"
    finally:
        await client.aclose()


async def test_a_pipeline_follows_ask_with_its_keyless_commands(
    redis_cluster: RedisCluster,
) -> None:
    client = cluster_client(redis_cluster)
    try:
        source, target = redis_cluster.masters[1], redis_cluster.masters[0]
        key = redis_cluster.key_in(source)
        slot = key_slot(key.encode())
        await client.refresh_topology()
        redis_cluster.begin_migration(slot, target)
        # INCR of a missing key on a migrating slot: ASK; the PING after it goes along.
        assert await client.pipeline([("INCR", key), ("PING",)]) == [1, b"PONG"]
        assert ask_replies(source) == 1
        assert target.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 1
        redis_cluster.finish_migration(slot, source, target)
    finally:
        await client.aclose()


async def test_redirections_are_bounded(redis_cluster: RedisCluster) -> None:
    """A broken migration (the target does not import) sends a call back and forth."""
    client = cluster_client(redis_cluster)
    source, target = redis_cluster.masters[0], redis_cluster.masters[1]
    key = redis_cluster.key_in(source)
    slot = key_slot(key.encode())
    try:
        await client.refresh_topology()
        # MIGRATING without IMPORTING: the source says ASK, the target says MOVED back.
        source.client().execute_command(
            "CLUSTER", "SETSLOT", slot, "MIGRATING", redis_cluster.node_id(target)
        )
        with pytest.raises(redis.exceptions.ClusterError, match="redirections") as info:
            await client.evalsha(ECHO, [key], [b"x"])
        assert backend_error(info.value).reason == Reason.BACKEND_UNAVAILABLE
        assert ask_replies(source) + moved_replies(target) <= 6
    finally:
        source.client().execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        await client.aclose()


async def test_tryagain_is_retried_a_bounded_number_of_times(redis_cluster: RedisCluster) -> None:
    """Keys of one call split by a migration in progress: TRYAGAIN, retried, then raised."""
    both = ScriptDef("both", "redis.call('INCR', KEYS[1]) redis.call('INCR', KEYS[2]) return 1")
    client = cluster_client(redis_cluster)
    try:
        source, target = redis_cluster.masters[0], redis_cluster.masters[1]
        tag = redis_cluster.key_in(source)
        keys = [f"{{{tag}}}:a", f"{{{tag}}}:b"]
        slot = key_slot(tag.encode())
        assert await client.evalsha(both, keys, []) == 1
        redis_cluster.begin_migration(slot, target)
        source.client().execute_command(
            "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", keys[0]
        )
        with pytest.raises(redis.exceptions.TryAgainError):
            await client.evalsha(both, keys, [])
        tries = stat(source, "errorstats", "errorstat_TRYAGAIN", "count")
        assert tries == 1 + TRYAGAIN_RETRIES
        redis_cluster.finish_migration(slot, source, target)
        assert await client.evalsha(both, keys, []) == 1
        assert target.client().mget(keys) == [b"2", b"2"]
    finally:
        await client.aclose()


async def test_the_pool_of_each_node_is_bounded(redis_cluster: RedisCluster) -> None:
    settings = Settings(
        redis_max_connections=1,
        redis_connect_timeout_seconds=5.0,
        redis_socket_timeout_seconds=5.0,
    )
    client = HotClient.from_url(redis_cluster.url, settings, cluster=True, pipeline_depth=1)
    try:
        keys = [redis_cluster.key_in(m, f"k{i}") for m in redis_cluster.masters for i in range(3)]
        calls = [client.evalsha(ECHO, [k], [b"v"]) for k in keys for _ in range(20)]
        assert await asyncio.gather(*calls) == [b"v"] * len(calls)
        assert client.connection_count() <= 3
    finally:
        await client.aclose()


async def test_calls_follow_a_failover_to_the_promoted_replica(make_redis_cluster: Any) -> None:
    """A master dies (SIGKILL); once its replica is promoted, calls reach it. Meanwhile
    every call fails with ConnectionError or TimeoutError (BACKEND_UNAVAILABLE), never hangs."""
    cluster: RedisCluster = make_redis_cluster(masters=3, replicas=1)
    client = cluster_client(cluster)
    try:
        victim = cluster.masters[0]
        [replica] = cluster.replicas_of(victim)
        key = cluster.key_in(victim)
        slot = key_slot(key.encode())
        assert await client.evalsha(ECHO, [key], [b"before"]) == b"before"
        victim.kill()
        give_up = time.monotonic() + 30
        failures: list[BaseException] = []
        for _ in range(1000):
            try:
                assert await client.evalsha(ECHO, [key], [b"after"]) == b"after"
                break
            except redis.exceptions.RedisError as exc:
                failures.append(exc)
                assert time.monotonic() < give_up, f"no failover within 30 s: {failures[-3:]}"
                await asyncio.sleep(0.1)
        assert client.slot_owner(slot) == f"127.0.0.1:{replica.port}"
        for exc in failures:
            assert isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)
            assert backend_error(exc).reason == Reason.BACKEND_UNAVAILABLE
    finally:
        await client.aclose()


async def test_a_pipeline_to_a_stuck_node_leaves_no_exception_unretrieved(
    redis_cluster: RedisCluster,
) -> None:
    """A pipeline to a master stalled past the socket timeout raises TimeoutError once; its
    other commands' failures are not logged as "Future exception was never retrieved"."""
    loop = asyncio.get_running_loop()
    lost: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, ctx: lost.append(str(ctx.get("message"))))
    settings = Settings(redis_connect_timeout_seconds=5.0, redis_socket_timeout_seconds=0.3)
    client = HotClient.from_url(redis_cluster.url, settings, cluster=True)
    node = redis_cluster.masters[0]
    key = redis_cluster.key_in(node)
    assert node.pid is not None
    try:
        await client.pipeline([("GET", key)])
        os.kill(node.pid, signal.SIGSTOP)
        try:
            results = await asyncio.gather(
                *(client.pipeline([("GET", key)] * 5) for _ in range(5)),
                return_exceptions=True,
            )
        finally:
            os.kill(node.pid, signal.SIGCONT)
        assert all(isinstance(r, redis.exceptions.TimeoutError) for r in results), results
        del results
        gc.collect()  # an unretrieved exception is reported when its future is collected
        await asyncio.sleep(0)
        assert not [m for m in lost if "never retrieved" in m], lost
    finally:
        loop.set_exception_handler(previous)
        await client.aclose()
