"""The test infrastructure itself: private Redis processes and the uvloop event loop."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import redis
import redis.asyncio
import uvloop
from redis_proc import RedisProc, free_port, redis_binaries


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_free_port() -> None:
    ports = {free_port() for _ in range(20)}
    assert 6379 not in ports
    assert all(1024 <= p <= 65535 for p in ports)


def test_binaries_are_distinct_and_recent() -> None:
    found = redis_binaries()
    assert found, "no redis-server >= 6.2 available"
    ids = [ident for ident, _ in found]
    assert len(ids) == len(set(ids))
    for ident, path in found:
        major, minor = (int(x) for x in ident.removeprefix("redis-").split("."))
        assert (major, minor) >= (6, 2)
        assert os.access(path, os.X_OK)


def test_redis_proc_basic(redis_proc: RedisProc) -> None:
    assert redis_proc.port != 6379
    assert redis_proc.url == f"redis://127.0.0.1:{redis_proc.port}/0"
    c = redis_proc.client()
    assert c.ping()
    c.set(b"k", b"v")
    assert c.get(b"k") == b"v"
    assert redis_proc.info("persistence")["aof_enabled"] == 0
    redis_proc.flush()
    assert redis_proc.dump() == {}


def test_stop_is_idempotent_and_reaps(redis_binary: str, tmp_path: Path) -> None:
    proc = RedisProc(redis_binary, tmp_path).start()
    pid = proc.pid
    assert pid is not None
    proc.stop()
    assert not _alive(pid)
    assert proc.pid is None
    proc.stop()


def test_restart_with_aof_keeps_data(redis_proc_aof: RedisProc) -> None:
    c = redis_proc_aof.client()
    c.set(b"survivor", b"1")
    c.hset(b"h", mapping={b"a": b"1"})
    before = redis_proc_aof.dump()
    port = redis_proc_aof.port
    redis_proc_aof.restart()
    assert redis_proc_aof.port == port
    assert redis_proc_aof.dump() == before
    # the URL did not change, so a fresh client on it sees the data
    fresh = redis.Redis.from_url(redis_proc_aof.url)
    try:
        assert fresh.get(b"survivor") == b"1"
    finally:
        fresh.close()


def test_kill_then_start_reloads_aof(redis_proc_aof: RedisProc) -> None:
    c = redis_proc_aof.client()
    c.set(b"k", b"v")
    pid = redis_proc_aof.pid
    assert pid is not None
    redis_proc_aof.kill()
    assert not _alive(pid)
    redis_proc_aof.start()
    # An acknowledged write reached the kernel before the reply, so a process crash keeps it.
    assert redis_proc_aof.client().get(b"k") == b"v"


def test_restart_without_aof_loses_data(redis_proc: RedisProc) -> None:
    redis_proc.client().set(b"k", b"v")
    redis_proc.restart()
    assert redis_proc.dump() == {}


def test_dump_sees_every_type(redis_proc: RedisProc) -> None:
    c = redis_proc.client()
    c.set(b"s", b"str")
    c.hset(b"h", mapping={b"f1": b"1", b"f2": b"2"})
    c.sadd(b"set", b"a", b"b")
    c.zadd(b"z", {b"m1": 1.5, b"m2": -2})
    c.rpush(b"l", b"x", b"y")
    eid = c.xadd(b"st", {b"f": b"v"})
    c.xgroup_create(b"st", b"g", id=b"0")
    c.xreadgroup(b"g", b"consumer", {b"st": b">"})
    c.set(b"exp", b"1", ex=100)

    d = redis_proc.dump()
    assert d[b"s"] == ("string", b"str")
    assert d[b"h"] == ("hash", {b"f1": b"1", b"f2": b"2"})
    assert d[b"set"] == ("set", frozenset({b"a", b"b"}))
    assert d[b"z"] == ("zset", [(b"m2", -2.0), (b"m1", 1.5)])
    assert d[b"l"] == ("list", [b"x", b"y"])
    kind, stream = d[b"st"]  # type: ignore[misc]
    assert kind == "stream"
    assert stream["entries"] == [(eid, {b"f": b"v"})]
    assert stream["groups"] == [("g", eid.decode(), 1, (("consumer", 1),))]
    assert d[b"exp"] == ("string", b"1")

    # TTL-insensitive by default; with_ttl only records whether an expiry exists
    assert redis_proc.dump(with_ttl=True)[b"exp"] == ("string", b"1", True)
    assert redis_proc.dump(with_ttl=True)[b"s"] == ("string", b"str", False)

    # any change shows up
    before = redis_proc.dump()
    c.xack(b"st", b"g", eid)
    assert redis_proc.dump() != before
    before = redis_proc.dump()
    c.zincrby(b"z", 1, b"m1")
    assert redis_proc.dump() != before
    # ...but a TTL ticking down does not
    before = redis_proc.dump()
    c.expire(b"exp", 50)
    assert redis_proc.dump() == before


def test_redis_any_runs_each_version(redis_any: RedisProc, request: pytest.FixtureRequest) -> None:
    version = redis_any.info("server")["redis_version"]
    ident = request.node.callspec.id
    assert ident == f"redis-{'.'.join(str(version).split('.')[:2])}"
    assert tuple(int(x) for x in str(version).split(".")) == redis_any.version
    # GETDEL is 6.2+: stockhold's scripts rely on 6.2 commands being present
    c = redis_any.client()
    c.set(b"k", b"v")
    assert c.getdel(b"k") == b"v"


async def test_async_tests_run_on_uvloop(redis_proc: RedisProc) -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, uvloop.Loop)
    client = redis.asyncio.Redis.from_url(redis_proc.url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
