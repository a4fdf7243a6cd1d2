"""The hot-path Redis client (stockhold.store.hotclient) against real redis-server processes.

Each guarantee of the module docstring has its own test: bounded pool and pipelining, the
"Redis stuck" deadline, reconnects, NOSCRIPT reload, redis-py's error classes, URLs (TCP,
unix socket, TLS, AUTH, SELECT) and a connect that never blocks the event loop. Where calls
must stay outstanding, Redis holds them (CLIENT PAUSE WRITE, or SIGSTOP for "stuck"), so no
test depends on the machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import ipaddress
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.exceptions
from redis_proc import RedisProc, free_port

from stockhold.engine import Engine, reserve_results
from stockhold.errors import Reason
from stockhold.settings import Settings
from stockhold.store.calls import backend_error, make_client
from stockhold.store.hotclient import HotClient, ScriptDef, parse_url

# A script that writes (so CLIENT PAUSE WRITE holds it) and answers with its argument.
ECHO = ScriptDef("echo", "redis.call('INCR', KEYS[1]) return ARGV[1]")
# The production settings, but a connect bound a loaded test machine always meets (tests of
# the connect bound itself use the production 0.25 s).
RELAXED = Settings(redis_connect_timeout_seconds=5.0)
# Long enough that no paused call below hits the "Redis stuck" bound by accident.
PATIENT = Settings(redis_socket_timeout_seconds=20.0, redis_connect_timeout_seconds=5.0)


def hot_clients(redis_proc: RedisProc) -> list[str]:
    """Names of the connections our clients opened (CLIENT SETNAME stockhold-hot)."""
    listing = redis_proc.client().execute_command("CLIENT", "LIST")
    text = listing.decode() if isinstance(listing, bytes) else str(listing)
    return [line for line in text.splitlines() if " name=stockhold-hot " in line]


def in_db(redis_proc: RedisProc, db: int) -> redis.Redis:
    """A sync redis-py client of one db (closed when Redis stops)."""
    c = redis.Redis(host="127.0.0.1", port=redis_proc.port, db=db, socket_timeout=10)
    redis_proc._clients.append(c)
    return c


@contextlib.contextmanager
def paused_writes(redis_proc: RedisProc) -> Iterator[Callable[[], None]]:
    """Redis holds every writing call until the returned resume() (or the block's end)."""
    admin = redis_proc.client()
    admin.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
    resumed = False

    def resume() -> None:
        nonlocal resumed
        if not resumed:
            admin.execute_command("CLIENT", "UNPAUSE")
            resumed = True

    try:
        yield resume
    finally:
        resume()


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """Redis frozen (SIGSTOP): it accepts connections but answers nothing."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def wait_until(check: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    """Poll `check` (bounded in time and count)."""
    give_up = time.monotonic() + limit_s
    for _ in range(4000):
        if check():
            return
        assert time.monotonic() < give_up, f"timed out waiting until {what}"
        await asyncio.sleep(0.005)
    raise AssertionError(f"gave up waiting until {what}")


# -- calls -----------------------------------------------------------------------------------------
async def test_evalsha_execute_and_pipeline_return_raw_replies(redis_proc: RedisProc) -> None:
    client = HotClient.from_url(redis_proc.url, RELAXED)
    try:
        assert await client.evalsha(ECHO, ["k"], [b"v"]) == b"v"
        assert await client.execute("GET", "k") == b"1"
        assert await client.execute("GET", "missing") is None
        assert await client.pipeline([("INCR", "k"), ("GET", "k"), ("PING",)]) == [
            2,
            b"2",
            b"PONG",
        ]
        # Error replies come back as values without raise_on_error, raise with it.
        replies = await client.pipeline([("HGET", "k", "f"), ("GET", "k")], raise_on_error=False)
        assert isinstance(replies[0], redis.exceptions.ResponseError) and replies[1] == b"2"
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            await client.pipeline([("HGET", "k", "f"), ("GET", "k")])
    finally:
        await client.aclose()


async def test_the_real_reserve_script_holds_stock(redis_proc: RedisProc) -> None:
    """reserve.lua through the hot client answers exactly what redis-py's Script answers."""
    settings = RELAXED
    engine = Engine(make_client(redis_proc.url, settings), settings)
    client = HotClient.from_url(redis_proc.url, settings)
    try:
        unit = engine.resolver.unit("SKU-1", "red-L", "6901234560001")
        await engine.adjust("seed", unit, "wh-1", 10, "test", actor="test")
        order = engine.resolver.resolve_order(
            "order-1", [(unit.sku, unit.spec, unit.barcode, "", 3)], 0, settings.max_hold_seconds
        )
        queued = [(order, "test")]
        keys, args = engine.reserve_call(queued)
        first = reserve_results(queued, await client.evalsha(ScriptDef.of("reserve"), keys, args))
        assert first[0].err is None and not first[0].replayed
        replay = reserve_results(queued, await engine.scripts.reserve(keys=keys, args=args))
        assert replay[0].replayed
        # the hold built from the reply equals the stored record read back
        assert replay[0].reservation == first[0].reservation
        [level] = await engine.availability([unit])
        assert (level.available, level.reserved) == (7, 3)
    finally:
        await client.aclose()
        await engine.client.aclose(close_connection_pool=True)


async def test_a_cancelled_call_does_not_shift_later_replies(redis_proc: RedisProc) -> None:
    client = HotClient.from_url(redis_proc.url, PATIENT)
    try:
        await client.execute("PING")
        with paused_writes(redis_proc) as resume:
            held = [asyncio.ensure_future(client.evalsha(ECHO, ["k"], [str(i)])) for i in range(5)]
            await wait_until(lambda: client.inflight() == 5, "five calls are outstanding")
            held[2].cancel()
            resume()
            results = await asyncio.gather(*held, return_exceptions=True)
        assert isinstance(results[2], asyncio.CancelledError)
        assert [results[i] for i in (0, 1, 3, 4)] == [b"0", b"1", b"3", b"4"]
        assert await client.evalsha(ECHO, ["k"], [b"after"]) == b"after"
    finally:
        await client.aclose()


# -- bounded pool ----------------------------------------------------------------------------------
async def test_many_calls_are_pipelined_over_at_most_max_connections(
    redis_proc: RedisProc,
) -> None:
    settings = Settings(
        redis_max_connections=2,
        redis_socket_timeout_seconds=20.0,
        redis_connect_timeout_seconds=5.0,
        redis_pool_timeout_seconds=20.0,
    )
    client = HotClient.from_url(redis_proc.url, settings, pipeline_depth=2, max_pending=4)
    try:
        await client.execute("PING")
        with paused_writes(redis_proc) as resume:
            calls = [
                asyncio.ensure_future(client.evalsha(ECHO, ["n"], [str(i)])) for i in range(100)
            ]
            # Both connections fill up to max_pending; the other calls wait for room.
            await wait_until(lambda: client.inflight() == 8, "2 x 4 calls are outstanding")
            await asyncio.sleep(0.1)
            assert client.connection_count() == 2
            assert client.inflight() == 8
            assert len(hot_clients(redis_proc)) == 2
            resume()
            results = await asyncio.gather(*calls)
        assert sorted(results) == sorted(str(i).encode() for i in range(100))
        assert client.connection_count() <= 2 and len(hot_clients(redis_proc)) <= 2
        assert int(redis_proc.client().get("n")) == 100
    finally:
        await client.aclose()


async def test_a_burst_opens_no_more_than_one_connection_at_a_time(
    redis_proc: RedisProc,
) -> None:
    """64 first calls at once share the first connection instead of opening 64.

    The pipeline depth (128) is above the burst, so however slowly Redis answers, no call ever
    finds the first connection full: a second one would be this test's failure, not growth.
    """
    client = HotClient.from_url(
        redis_proc.url, Settings(redis_connect_timeout_seconds=5.0), pipeline_depth=128
    )
    try:
        results = await asyncio.gather(*(client.evalsha(ECHO, ["b"], [b"x"]) for _ in range(64)))
        assert results == [b"x"] * 64
        assert client.connection_count() == 1 and len(hot_clients(redis_proc)) == 1
    finally:
        await client.aclose()


async def test_a_call_that_finds_no_room_fails_after_the_pool_timeout(
    redis_proc: RedisProc,
) -> None:
    settings = Settings(
        redis_max_connections=1,
        redis_pool_timeout_seconds=0.3,
        redis_socket_timeout_seconds=20.0,
        redis_connect_timeout_seconds=5.0,
    )
    client = HotClient.from_url(redis_proc.url, settings, max_pending=1)
    try:
        await client.execute("PING")
        with paused_writes(redis_proc) as resume:
            first = asyncio.ensure_future(client.evalsha(ECHO, ["k"], [b"1"]))
            await wait_until(lambda: client.inflight() == 1, "the first call is outstanding")
            t0 = time.monotonic()
            with pytest.raises(redis.exceptions.ConnectionError, match="No connection available"):
                await client.evalsha(ECHO, ["k"], [b"2"])
            waited = time.monotonic() - t0
            resume()
            assert await first == b"1"
        assert 0.25 <= waited < 5.0
        err = backend_error(redis.exceptions.ConnectionError("No connection available."))
        assert err.reason == Reason.BACKEND_UNAVAILABLE
    finally:
        await client.aclose()


# -- Redis stuck -----------------------------------------------------------------------------------
async def test_a_stuck_redis_fails_a_call_after_the_socket_timeout(redis_proc: RedisProc) -> None:
    settings = RELAXED  # the production bound: 0.8 s
    assert settings.redis_socket_timeout_seconds == Settings().redis_socket_timeout_seconds
    client = HotClient.from_url(redis_proc.url, settings)
    pid = redis_proc.pid
    assert pid is not None
    try:
        assert await client.evalsha(ECHO, ["k"], [b"warm"]) == b"warm"
        with stopped(pid):
            t0 = time.monotonic()
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.evalsha(ECHO, ["k"], [b"stuck"])
            elapsed = time.monotonic() - t0
        assert settings.redis_socket_timeout_seconds - 0.01 <= elapsed < 3.0
        assert backend_error(redis.exceptions.TimeoutError()).reason == Reason.BACKEND_UNAVAILABLE
        # The stuck connection was dropped; Redis runs again and a new call goes through.
        assert await client.evalsha(ECHO, ["k"], [b"again"]) == b"again"
    finally:
        await client.aclose()


async def test_every_call_queued_on_a_stuck_connection_fails_by_its_deadline(
    redis_proc: RedisProc,
) -> None:
    settings = Settings(redis_socket_timeout_seconds=0.5, redis_connect_timeout_seconds=5.0)
    client = HotClient.from_url(redis_proc.url, settings)
    pid = redis_proc.pid
    assert pid is not None
    try:
        await client.execute("PING")
        with stopped(pid):
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(client.evalsha(ECHO, ["k"], [str(i)]) for i in range(20)),
                return_exceptions=True,
            )
            elapsed = time.monotonic() - t0
        assert all(isinstance(r, redis.exceptions.TimeoutError) for r in results), results
        assert 0.49 <= elapsed < 3.0
        assert client.connection_count() == 0
    finally:
        await client.aclose()


async def test_a_pipeline_on_a_stuck_redis_leaves_no_exception_unretrieved(
    redis_proc: RedisProc,
) -> None:
    """A pipeline's commands all fail when Redis stalls past the socket timeout; the first
    failure is raised and the others must not be logged by asyncio as "Future exception was
    never retrieved" (a bench on a saturated box logged ~200 of them)."""
    loop = asyncio.get_running_loop()
    lost: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, ctx: lost.append(str(ctx.get("message"))))
    settings = Settings(redis_socket_timeout_seconds=0.3, redis_connect_timeout_seconds=5.0)
    client = HotClient.from_url(redis_proc.url, settings)
    pid = redis_proc.pid
    assert pid is not None
    try:
        await client.execute("PING")
        with stopped(pid):
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.pipeline([("GET", f"k{i}") for i in range(20)])
            results = await asyncio.gather(
                *(client.pipeline([("GET", "a"), ("GET", "b")]) for _ in range(5)),
                return_exceptions=True,
            )
        assert all(isinstance(r, redis.exceptions.TimeoutError) for r in results), results
        assert await client.pipeline([("PING",), ("PING",)]) == [b"PONG", b"PONG"]
        gc.collect()  # an unretrieved exception is reported when its future is collected
        await asyncio.sleep(0)
        assert not [m for m in lost if "never retrieved" in m], lost
    finally:
        loop.set_exception_handler(previous)
        await client.aclose()


async def test_connecting_to_a_stuck_redis_fails_after_the_connect_timeout(
    redis_proc: RedisProc,
) -> None:
    settings = Settings()  # connect timeout 0.25 s
    client = HotClient.from_url(redis_proc.url, settings)
    pid = redis_proc.pid
    assert pid is not None
    try:
        with stopped(pid):
            t0 = time.monotonic()
            with pytest.raises(redis.exceptions.TimeoutError, match="Timeout connecting"):
                await client.execute("PING")
            elapsed = time.monotonic() - t0
        assert 0.24 <= elapsed < 2.5
        # Redis runs again: a later call connects (a loaded machine may need a second try).
        for attempt in range(5):
            try:
                assert await client.execute("PING") == b"PONG"
                break
            except redis.exceptions.TimeoutError:
                assert attempt < 4
    finally:
        await client.aclose()


async def test_connecting_never_blocks_the_event_loop() -> None:
    """A server that accepts (the kernel does) but never answers: the loop keeps running."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        settings = Settings(redis_connect_timeout_seconds=0.5)
        client = HotClient.from_url(f"redis://127.0.0.1:{port}/0", settings)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            for _ in range(10_000):
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.ensure_future(ticker())
        try:
            t0 = time.monotonic()
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.execute("PING")
            elapsed = time.monotonic() - t0
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await client.aclose()
    # The loop ran all along: the ticker ticked while the connect waited.
    assert elapsed >= 0.45 and ticks >= 10


# -- reconnects ------------------------------------------------------------------------------------
async def test_a_later_call_succeeds_after_redis_restarts(redis_proc: RedisProc) -> None:
    client = HotClient.from_url(redis_proc.url, RELAXED)
    try:
        assert await client.evalsha(ECHO, ["k"], [b"before"]) == b"before"
        redis_proc.restart()  # same port; script cache and data are gone (no persistence)
        # The old connection is found closed (or fails once): a later call gets through.
        result: Any = None
        for _ in range(3):
            try:
                result = await client.evalsha(ECHO, ["k"], [b"after"])
                break
            except redis.exceptions.ConnectionError:
                await asyncio.sleep(0.05)
        assert result == b"after"
        assert client.connection_count() == 1 and len(hot_clients(redis_proc)) == 1
    finally:
        await client.aclose()


async def test_a_call_in_flight_when_the_connection_drops_fails_with_connection_error(
    redis_proc: RedisProc,
) -> None:
    client = HotClient.from_url(redis_proc.url, PATIENT)
    try:
        await client.execute("PING")
        admin = redis_proc.client()
        with paused_writes(redis_proc) as resume:
            call = asyncio.ensure_future(client.evalsha(ECHO, ["k"], [b"lost"]))
            await wait_until(lambda: client.inflight() == 1, "the call is outstanding")
            t0 = time.monotonic()
            assert admin.execute_command("CLIENT", "KILL", "SKIPME", "yes", "TYPE", "normal") >= 1
            with pytest.raises(redis.exceptions.ConnectionError):
                await call
            assert time.monotonic() - t0 < 5.0  # at once, not after the socket timeout
            resume()
        assert client.connection_count() == 0
        assert await client.evalsha(ECHO, ["k"], [b"next"]) == b"next"
    finally:
        await client.aclose()


async def test_a_call_to_a_redis_that_is_down_fails_with_connection_error(
    redis_proc: RedisProc,
) -> None:
    client = HotClient.from_url(redis_proc.url, RELAXED)
    try:
        redis_proc.stop()
        t0 = time.monotonic()
        with pytest.raises(redis.exceptions.ConnectionError) as info:
            await client.evalsha(ECHO, ["k"], [b"x"])
        assert time.monotonic() - t0 < 2.0  # refused, tried once more after a short pause
        assert backend_error(info.value).reason == Reason.BACKEND_UNAVAILABLE
        redis_proc.start()
        assert await client.evalsha(ECHO, ["k"], [b"back"]) == b"back"
    finally:
        await client.aclose()


# -- NOSCRIPT --------------------------------------------------------------------------------------
async def test_a_flushed_script_cache_is_reloaded(redis_proc: RedisProc) -> None:
    client = HotClient.from_url(redis_proc.url, RELAXED)
    admin = redis_proc.client()
    try:
        assert await client.evalsha(ECHO, ["k"], [b"1"]) == b"1"
        admin.script_flush()
        assert admin.script_exists(ECHO.sha) == [False]
        assert await client.evalsha(ECHO, ["k"], [b"2"]) == b"2"
        assert admin.script_exists(ECHO.sha) == [True]
        assert int(admin.get("k")) == 2  # the refused EVALSHA ran nothing
    finally:
        await client.aclose()


# -- errors ----------------------------------------------------------------------------------------
ERROR_REPLIES = [
    "ERR something went wrong",
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "BUSY Redis is busy running a script",
    "LOADING Redis is loading the dataset in memory",
    "READONLY You can't write against a read only replica.",
    "NOSCRIPT No matching script.",
    "TRYAGAIN Multiple keys request during rehashing of slot",
    "CLUSTERDOWN The cluster is down",
    "MASTERDOWN Link with MASTER is down",
    "NOPERM this user has no permissions",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "EXECABORT Transaction discarded",
]


@pytest.mark.parametrize("reply", ERROR_REPLIES, ids=[r.split()[0] for r in ERROR_REPLIES])
async def test_error_replies_raise_what_redis_py_raises(redis_proc: RedisProc, reply: str) -> None:
    """Same class, same message, same DomainError as redis-py (the engine's mapping holds)."""
    script = "return redis.error_reply(ARGV[1])"
    client = HotClient.from_url(redis_proc.url, RELAXED)
    theirs = redis.asyncio.Redis.from_url(redis_proc.url)
    try:
        with pytest.raises(redis.exceptions.RedisError) as ours:
            await client.execute("EVAL", script, 0, reply)
        with pytest.raises(redis.exceptions.RedisError) as expected:
            await theirs.eval(script, 0, reply)
        assert type(ours.value) is type(expected.value)
        assert str(ours.value) == str(expected.value)
        a, b = backend_error(ours.value), backend_error(expected.value)
        assert (a.reason, a.metadata) == (b.reason, b.metadata)
        # The connection is fine after an error reply.
        assert await client.execute("PING") == b"PONG"
    finally:
        await client.aclose()
        await theirs.aclose()


# -- URLs ------------------------------------------------------------------------------------------
def test_parse_url() -> None:
    addr, opts = parse_url("redis://alice:p%40ss@10.0.0.5:7000/3")
    assert (addr.host, addr.port, addr.path) == ("10.0.0.5", 7000, "")
    assert opts == {"username": "alice", "password": "p@ss", "db": 3}
    addr, opts = parse_url("unix:///var/run/redis.sock?db=2")
    assert addr.path == "/var/run/redis.sock" and opts == {"db": 2}
    addr, opts = parse_url("redis://:secret@localhost")
    assert (addr.host, addr.port) == ("localhost", 6379) and opts == {"password": "secret"}
    _, opts = parse_url("rediss://h:1/0?ssl_cert_reqs=none")
    assert opts["ssl"].verify_mode.name == "CERT_NONE"
    for bad in ("http://h", "redis://h/x", "redis://h/0?socket_timeout=1", "unix://"):
        with pytest.raises(ValueError):
            parse_url(bad)


@pytest.fixture
def redis_unix(redis_binary: str) -> Iterator[RedisProc]:
    """A private Redis that also listens on a unix socket (a short path: sun_path limit)."""
    with tempfile.TemporaryDirectory(prefix="sh-hot-", dir="/tmp") as tmp:
        sock = Path(tmp) / "r.sock"
        proc = RedisProc(
            redis_binary,
            Path(tmp) / "data",
            extra_args=["--unixsocket", str(sock), "--unixsocketperm", "700"],
        )
        proc.start()
        proc.socket_path = sock  # type: ignore[attr-defined]
        try:
            yield proc
        finally:
            proc.stop()


async def test_unix_socket_url_with_db(redis_unix: RedisProc) -> None:
    sock = redis_unix.socket_path  # type: ignore[attr-defined]
    client = HotClient.from_url(f"unix://{sock}?db=2", RELAXED)
    try:
        assert await client.evalsha(ECHO, ["k"], [b"unix"]) == b"unix"
        assert await client.execute("SET", "where", "db2") == b"OK"
        assert in_db(redis_unix, 2).get("where") == b"db2"
        assert in_db(redis_unix, 0).get("where") is None
    finally:
        await client.aclose()


async def test_username_and_password_from_the_url(redis_proc: RedisProc) -> None:
    admin = redis_proc.client()
    admin.execute_command("ACL", "SETUSER", "alice", "on", ">s3cret", "~*", "&*", "+@all")
    client = HotClient.from_url(f"redis://alice:s3cret@127.0.0.1:{redis_proc.port}/1", RELAXED)
    wrong = HotClient.from_url(f"redis://alice:nope@127.0.0.1:{redis_proc.port}/0", RELAXED)
    try:
        assert await client.execute("ACL", "WHOAMI") == b"alice"
        assert await client.execute("SET", "k", "db1") == b"OK"
        assert in_db(redis_proc, 1).get("k") == b"db1"
        with pytest.raises(redis.exceptions.AuthenticationError) as info:
            await wrong.execute("PING")
        assert backend_error(info.value).reason == Reason.BACKEND_UNAVAILABLE
    finally:
        await client.aclose()
        await wrong.aclose()


async def test_password_of_the_default_user(redis_proc: RedisProc) -> None:
    admin = redis_proc.client()
    admin.config_set("requirepass", "topsecret")
    client = HotClient.from_url(f"redis://:topsecret@127.0.0.1:{redis_proc.port}/0", RELAXED)
    anonymous = HotClient.from_url(redis_proc.url, RELAXED)
    try:
        assert await client.execute("PING") == b"PONG"
        with pytest.raises(redis.exceptions.AuthenticationError):
            await anonymous.execute("PING")
    finally:
        await client.aclose()
        await anonymous.aclose()
        admin.config_set("requirepass", "")


def _tls_material(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1, written as PEM (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stockhold test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return paths


async def test_tls_url(redis_binary: str, tmp_path: Path) -> None:
    ca, cert, key = _tls_material(tmp_path)
    tls_port = free_port()
    proc = RedisProc(
        redis_binary,
        tmp_path / "redis-tls",
        extra_args=[
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(ca),
            "--tls-auth-clients",
            "no",
        ],
    )
    try:
        proc.start()
    except RuntimeError as exc:
        # A redis-server built without TLS refuses the tls-* directives at start-up.
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server has no TLS: {exc}")
        raise
    settings = Settings(redis_connect_timeout_seconds=5.0)
    client = HotClient.from_url(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}", settings)
    untrusted = HotClient.from_url(f"rediss://127.0.0.1:{tls_port}/0", settings)
    try:
        assert await client.evalsha(ECHO, ["k"], [b"tls"]) == b"tls"
        assert proc.client().get("k") == b"1"
        with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.execute("PING")
    finally:
        await client.aclose()
        await untrusted.aclose()
        proc.stop()


async def test_close_fails_outstanding_calls_and_is_idempotent(redis_proc: RedisProc) -> None:
    client = HotClient.from_url(redis_proc.url, PATIENT)
    await client.execute("PING")
    with paused_writes(redis_proc):
        call = asyncio.ensure_future(client.evalsha(ECHO, ["k"], [b"x"]))
        await wait_until(lambda: client.inflight() == 1, "the call is outstanding")
        await client.aclose()
        with pytest.raises(redis.exceptions.ConnectionError):
            await call
    await client.aclose()
    with pytest.raises(redis.exceptions.ConnectionError, match="closed"):
        await client.execute("PING")
