"""An operator's mistake gets one clear line, not a traceback (issue 9, item 7).

Every case runs the real `stockhold serve` as a child process, with STOCKHOLD_* variables
removed from its environment: a refused setting is one line on stderr and exit status 2, an
address that cannot be bound one line and exit 1, and an unreachable Redis one log line when
it goes and one when it is back. Ports are free 127.0.0.1 ports, never 6379.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_proc import RedisProc, free_port
from stockhold_fixtures import is_cluster

_SCRIPT = Path(sys.executable).with_name("stockhold")
STOCKHOLD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "stockhold.cli"]
# Generous bounds: a refused start takes well under a second, but the box may be loaded.
EXIT_TIMEOUT = 60.0
LOG_TIMEOUT = 30.0
PASSWORD = "pw-9f3b-never-printed"

pytestmark = pytest.mark.stores("standalone", "cluster")


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKHOLD_")}
    return {**env, **(extra or {})}


def _serve(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`stockhold serve ARGS` to its end (bounded)."""
    return subprocess.run(
        [*STOCKHOLD, "serve", *args],
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
        env=_env(env),
        check=False,
    )


def _one_line(done: subprocess.CompletedProcess[str], status: int) -> str:
    """The single stderr line of a refused start with exit `status` (nothing on stdout)."""
    lines = done.stderr.splitlines()
    assert done.returncode == status, f"rc={done.returncode}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert done.stdout == ""
    assert lines[0].startswith("stockhold: "), lines[0]
    return lines[0]


def _dead_redis_url() -> str:
    # Nothing listens there: should a case get past its check, it would not start an
    # embedded Redis or touch any Redis of ours.
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.fixture
def held_port() -> Iterator[int]:
    """A 127.0.0.1 port another program is listening on (without SO_REUSEPORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# -- settings: one line, exit 2 ------------------------------------------------------------------
# (flags, environment, what the line must name)
BAD_SETTINGS: dict[str, tuple[list[str], dict[str, str], list[str]]] = {
    "env-not-a-number": (
        [],
        {"STOCKHOLD_REDIS_SOCKET_TIMEOUT_SECONDS": "abc"},
        ["STOCKHOLD_REDIS_SOCKET_TIMEOUT_SECONDS", "'abc'", "expected a number > 0"],
    ),
    "redis-url-scheme": (
        ["--redis-url", "http://x", "--workers", "2"],
        {},
        ["--redis-url", "STOCKHOLD_REDIS_URL", "'http://x'", "redis://", "rediss://", "unix://"],
    ),
    "redis-url-env-scheme": (
        [],
        {"STOCKHOLD_REDIS_URL": "localhost:6380"},
        ["STOCKHOLD_REDIS_URL", "'localhost:6380'", "redis://"],
    ),
    "redis-url-bad-port-with-password": (
        ["--redis-url", f"redis://admin:{PASSWORD}@127.0.0.1:notaport/0"],
        {},
        ["--redis-url", "STOCKHOLD_REDIS_URL", "'redis://admin:***@127.0.0.1:notaport/0'"],
    ),
    "partitions-range": (
        ["--partitions", "0"],
        {},
        ["--partitions", "STOCKHOLD_PARTITIONS", "'0'", "1..16384"],
    ),
    "partitions-env-not-an-integer": (
        [],
        {"STOCKHOLD_PARTITIONS": "sixteen"},
        ["STOCKHOLD_PARTITIONS", "'sixteen'", "an integer"],
    ),
    "listen-no-port": (
        ["--listen", "127.0.0.1"],
        {},
        ["--listen", "STOCKHOLD_LISTEN", "'127.0.0.1'", "HOST:PORT"],
    ),
    "listen-port-range": (
        ["--listen", "127.0.0.1:70000"],
        {},
        ["--listen", "'127.0.0.1:70000'", "0..65535"],
    ),
    "workers-zero": (["--workers", "0"], {}, ["--workers", "'0'", ">= 1"]),
    "workers-port-zero": (
        ["--workers", "2", "--listen", "127.0.0.1:0"],
        {},
        ["--listen", "'127.0.0.1:0'", "fixed port"],
    ),
    "log-level": (["--log-level", "loud"], {}, ["--log-level", "STOCKHOLD_LOG_LEVEL", "'loud'"]),
    "metrics-port-range": (
        ["--metrics-port", "-1"],
        {},
        ["--metrics-port", "STOCKHOLD_METRICS_PORT", "'-1'", "0..65535"],
    ),
    "env-only-range": (
        [],
        {"STOCKHOLD_SWEEP_BATCH": "501"},
        ["STOCKHOLD_SWEEP_BATCH", "'501'", "1..500"],
    ),
    "env-infinite-seconds": (
        [],
        {"STOCKHOLD_HEALTH_INTERVAL_SECONDS": "inf"},
        ["STOCKHOLD_HEALTH_INTERVAL_SECONDS", "'inf'"],
    ),
    "poll-schedule": (
        [],
        {"STOCKHOLD_PAYMENT_POLL_SCHEDULE": "soon"},
        ["STOCKHOLD_PAYMENT_POLL_SCHEDULE", "'soon'", "<seconds>x<count>"],
    ),
    "default-hold-above-max": (
        ["--default-hold-seconds", "100"],
        {"STOCKHOLD_MAX_HOLD_SECONDS": "50"},
        ["--default-hold-seconds", "STOCKHOLD_DEFAULT_HOLD_SECONDS", "'100'", "50"],
    ),
    "webhook-without-wechatpay": (
        ["--payment-webhook-listen", "127.0.0.1:0"],
        {},
        ["--payment-webhook-listen", "STOCKHOLD_PAYMENT_WEBHOOK_LISTEN", "WeChat Pay"],
    ),
    "wechatpay-incomplete": (
        [],
        {"STOCKHOLD_WECHATPAY_MCHID": "1900000001"},
        ["STOCKHOLD_WECHATPAY_MCHID", "'1900000001'", "platform certificate"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_a_refused_setting_is_one_line_naming_it_and_exit_2(case: str, tmp_path: Path) -> None:
    flags, env, named = BAD_SETTINGS[case]
    data_dir = tmp_path / "d"
    args = ["--data-dir", str(data_dir), *flags]
    if "--listen" not in flags:
        args += ["--listen", f"127.0.0.1:{free_port()}"]
    line = _one_line(_serve(*args, env=env), 2)
    for text in named:
        assert text in line, (text, line)
    assert "expected" in line
    assert PASSWORD not in line
    # Refused before anything started: no embedded Redis, no data directory.
    assert not data_dir.exists()


def test_a_malformed_redis_url_does_not_leak_its_password() -> None:
    """An unescaped '/' in the password breaks URL parsing; the line still masks it all."""
    head, tail = PASSWORD[:8], PASSWORD[8:]
    done = _serve("--redis-url", f"redis://admin:{head}/{tail}@127.0.0.1:6380/0")
    line = _one_line(done, 2)
    assert "'redis://admin:***@127.0.0.1:6380/0'" in line, line
    assert head not in line and tail not in line


def test_a_flag_wins_over_a_bad_variable_it_replaces(tmp_path: Path, held_port: int) -> None:
    """The variable a flag overrides is not even parsed: the run gets past the settings
    (here to the bind check, which refuses the held port: exit 1, not 2)."""
    done = _serve(
        "--partitions",
        "16",
        "--listen",
        f"127.0.0.1:{held_port}",
        "--redis-url",
        _dead_redis_url(),
        env={"STOCKHOLD_PARTITIONS": "sixteen"},
    )
    assert "STOCKHOLD_PARTITIONS" not in _one_line(done, 1)


# -- addresses: one line, exit 1 -----------------------------------------------------------------
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_one_line_naming_it_and_exit_1(workers: str, held_port: int) -> None:
    address = f"127.0.0.1:{held_port}"
    done = _serve("--listen", address, "--redis-url", _dead_redis_url(), "--workers", workers)
    line = _one_line(done, 1)  # with --workers 2: no worker started, none restarted
    assert address in line and "--listen" in line and "in use" in line, line


def test_an_address_not_of_this_host_is_one_line_and_exit_1() -> None:
    address = f"192.0.2.1:{free_port()}"  # TEST-NET-1 (RFC 5737): never a local address
    # not loopback: refused at once without authentication (issue 13)
    done = _serve("--listen", address, "--redis-url", _dead_redis_url(), "--workers", "2")
    assert "--allow-unauthenticated" in _one_line(done, 2)
    done = _serve(
        *("--listen", address, "--redis-url", _dead_redis_url(), "--workers", "2"),
        "--allow-unauthenticated",
    )
    assert address in done.stderr.splitlines()[-1]
    assert done.returncode == 1, done.stderr


def test_a_metrics_port_in_use_is_one_line_and_exit_1(held_port: int) -> None:
    for workers in ("1", "2"):
        done = _serve(
            *("--listen", f"127.0.0.1:{free_port()}", "--redis-url", _dead_redis_url()),
            *("--metrics-port", str(held_port), "--workers", workers),
        )
        line = _one_line(done, 1)
        assert f"127.0.0.1:{held_port}" in line and "--metrics-port" in line, line


# -- workers that cannot start are not restarted ---------------------------------------------------
def _log_records(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of a stderr text (serve logs one object per line)."""
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            assert isinstance(record, dict)
            records.append(record)
    return records


def test_a_partition_mismatch_stops_the_supervisor_without_restarts(redis_proc: RedisProc) -> None:
    redis_proc.client().set("sh:{meta}:partitions", "64")  # serve's default prefix
    done = _serve(
        *("--listen", f"127.0.0.1:{free_port()}", "--redis-url", redis_proc.url),
        *("--partitions", "16", "--workers", "2"),
        *(["--redis-cluster"] if is_cluster(redis_proc) else []),
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    msgs = [r["msg"] for r in _log_records(done.stderr)]
    assert msgs.count("worker started") == 2, msgs  # the first two, no replacement
    assert msgs.count("worker cannot start; stopping") == 1, msgs
    assert "worker keeps failing at start; stopping" not in msgs


# -- Redis unreachable: logged once when it goes, once when it is back ---------------------------
def _wait_for(path: Path, proc: subprocess.Popen[bytes], msg: str) -> list[dict[str, Any]]:
    """Bounded wait until the log at `path` has a record with `msg`; all records so far."""
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        records = _log_records(path.read_text(errors="replace"))
        if any(r["msg"] == msg for r in records):
            return records
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {msg!r} log line (rc={proc.poll()}):\n{path.read_text()}")
        time.sleep(0.1)


# Standalone only: it starts its own Redis (with ACL) late; a cluster node going and coming
# back is the failover tests' subject.
def test_an_unreachable_redis_is_logged_once_then_once_when_back(
    redis_binary: str, tmp_path: Path
) -> None:
    port = free_port()
    # An ACL user with a password: the URL carries it, no log line may.
    url = f"redis://stockhold:{PASSWORD}@127.0.0.1:{port}/0"
    masked = f"redis://stockhold:***@127.0.0.1:{port}/0"
    acl = ["--user", "stockhold", "on", f">{PASSWORD}", "~*", "+@all"]
    log_path = tmp_path / "serve.stderr"
    with log_path.open("wb") as err:
        proc = subprocess.Popen(
            [
                *(*STOCKHOLD, "serve", "--redis-url", url, "--workers", "1"),
                *("--listen", f"127.0.0.1:{free_port()}", "--partitions", "16"),
                # DEBUG: each failed health probe writes a line, so the test can see that
                # many probes failed while "unreachable" was logged once.
                *("--log-level", "DEBUG"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=_env({"STOCKHOLD_HEALTH_INTERVAL_SECONDS": "0.1"}),
        )
    redis_server = RedisProc(redis_binary, tmp_path / "redis", port=port, extra_args=acl)
    try:
        records = _wait_for(log_path, proc, "redis unreachable")
        down = [r for r in records if r["msg"] == "redis unreachable"]
        assert len(down) == 1, down
        assert down[0]["level"] == "WARNING"
        assert down[0]["redis_url"] == masked
        assert "Connection refused" in down[0]["cause"], down[0]
        # Several more failed probes, and still one line.
        for _ in range(int(LOG_TIMEOUT / 0.1)):
            records = _log_records(log_path.read_text(errors="replace"))
            if sum(r["msg"].startswith("health probe failed") for r in records) >= 5:
                break
            time.sleep(0.1)
        assert sum(r["msg"].startswith("health probe failed") for r in records) >= 5, records
        assert sum(r["msg"] == "redis unreachable" for r in records) == 1

        redis_server.start()
        records = _wait_for(log_path, proc, "redis reachable again")
        back = [r for r in records if r["msg"] == "redis reachable again"]
        assert back[0]["level"] == "INFO" and back[0]["redis_url"] == masked, back
        client = redis.Redis(host="127.0.0.1", port=port, username="stockhold", password=PASSWORD)
        try:
            # The server went on using Redis: it recorded its partition count.
            assert client.get("sh:{meta}:partitions") == b"16"
        finally:
            client.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            redis_server.stop()
    text = log_path.read_text(errors="replace")
    assert rc == 0, text
    assert "Traceback" not in text
    assert PASSWORD not in text
    records = _log_records(text)
    assert sum(r["msg"] == "redis unreachable" for r in records) == 1
    assert sum(r["msg"] == "redis reachable again" for r in records) == 1
