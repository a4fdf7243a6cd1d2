"""The `stockhold` console script as real processes: serve, the client commands, SIGTERM.

Every server runs on a free 127.0.0.1 port, with STOCKHOLD_* variables removed from its
environment; whatever a test leaves running is killed (by pid) when it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_proc import RedisProc, free_port

from stockhold.resolver import KeyResolver

_SCRIPT = Path(sys.executable).with_name("stockhold")
STOCKHOLD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "stockhold.cli"]
CLI_TIMEOUT = 30.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def child_env() -> dict[str, str]:
    """This environment without any STOCKHOLD_* setting (no Redis URL, no address)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("STOCKHOLD_")}


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


class Served:
    """One `stockhold serve` child process."""

    def __init__(self, workdir: Path, args: list[str], host: str = "127.0.0.1") -> None:
        """``host``: the address it listens on (--listen host:port); it is called on
        127.0.0.1 (``address``) whatever the host."""
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        listen = f"{host}:{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        n = len(list(workdir.glob("serve-*.stderr")))
        self.stderr_path = workdir / f"serve-{n}.stderr"
        self.stdout_path = workdir / f"serve-{n}.stdout"
        with self.stderr_path.open("wb") as err, self.stdout_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [*STOCKHOLD, "serve", "--listen", listen, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=child_env(),
            )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a client command against this server."""
        return cli(*args, "--address", self.address)

    def wait_serving(self, within: float = START_TIMEOUT) -> None:
        """Bounded wait until `stockhold health` exits 0."""
        deadline = time.monotonic() + within
        host, port = self.address.rsplit(":", 1)
        # Cheap part first: wait for the port to accept connections.
        for _ in range(int(within / 0.05)):
            self._check_running()
            with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 0.2):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for _ in range(int(within / 0.2)):
            self._check_running()
            if cli("health", "--address", self.address, "--timeout", "1").returncode == 0:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        raise AssertionError(f"stockhold never became healthy; stderr:\n{self.stderr}")

    def _check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"stockhold serve exited with {self.proc.returncode}; stderr:\n{self.stderr}"
            )

    def terminate(self, sig: int = signal.SIGTERM) -> tuple[int, float]:
        """Send `sig`; the exit status and how long the process took to exit."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"stockhold did not exit within {STOP_TIMEOUT} s of {sig!r}; stderr:\n{self.stderr}"
            ) from None
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_records(self) -> list[dict[str, Any]]:
        """Every stderr line, parsed as JSON (fails on a line that is not)."""
        records = []
        for text in self.stderr.splitlines():
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                raise AssertionError(f"stderr line is not JSON: {text!r}") from None
            assert isinstance(record, dict), text
            records.append(record)
        return records


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `stockhold ARGS...` (bounded), capturing its output."""
    return subprocess.run(
        [*STOCKHOLD, *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=child_env(),
        check=False,
    )


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """Start `stockhold serve` processes: `serve(*args)`; all are gone after the test."""
    started: list[Served] = []

    def start(*args: str) -> Served:
        served = Served(tmp_path / "serve", list(args))
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data directory for embedded mode; its redis-server is killed if a test left it."""
    path = tmp_path / "d"  # short: the unix socket path is limited to ~107 bytes
    yield path
    with contextlib.suppress(OSError, ValueError):
        pid = int((path / "redis.pid").read_text().strip())
        if _alive(pid) and "redis" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
            os.kill(pid, signal.SIGKILL)


# -- embedded mode ------------------------------------------------------------------------------
def test_embedded_mode_keeps_a_hold_across_sigterm_and_restart(serve: Any, data_dir: Path) -> None:
    first = serve("--data-dir", str(data_dir))
    first.wait_serving()
    redis_pid = int((data_dir / "redis.pid").read_text().strip())
    assert _alive(redis_pid)
    assert _parent_of(redis_pid) == first.proc.pid  # our own child...
    assert (data_dir / "redis.sock").exists()  # ...on the unix socket in the data dir

    adjusted = ok_json(
        first.cli("adjust", "tee", "--spec", "M", "--warehouse", "w1", "--delta", "10")
    )
    assert adjusted["level"]["available"] == "10"
    ok_json(first.cli("adjust", "tee", "--spec", "M", "--warehouse", "w2", "--delta", "2"))
    reserved = ok_json(
        first.cli(
            "reserve",
            "order-1",
            "--line",
            "sku=tee,spec=M,qty=3",
            "--line",
            "sku=tee,spec=M,warehouse=w2,qty=1",
        )
    )
    assert reserved["reservation"]["state"] == "RESERVATION_STATE_HELD"
    before = ok_json(first.cli("get", "order-1"))
    before_stock = ok_json(first.cli("availability", "tee", "--spec", "M"))
    assert before == reserved["reservation"]
    assert sorted((a["warehouse"], a["quantity"]) for a in before["allocations"]) == [
        ("w1", "3"),
        ("w2", "1"),
    ]

    rc, took = first.terminate()
    assert rc == 0, first.stderr
    assert took < 5.0
    assert not _alive(redis_pid), "the embedded redis-server outlived stockhold"
    assert not (data_dir / "redis.sock").exists()

    second = serve("--data-dir", str(data_dir))
    second.wait_serving()
    after = ok_json(second.cli("get", "order-1"))
    assert after == before
    assert after["state"] == "RESERVATION_STATE_HELD"
    assert ok_json(second.cli("availability", "tee", "--spec", "M")) == before_stock
    new_pid = int((data_dir / "redis.pid").read_text().strip())
    rc, _ = second.terminate()
    assert rc == 0, second.stderr
    assert not _alive(new_pid)


# -- signals and logs -----------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_gracefully_with_exit_0_and_json_log_lines(
    serve: Any, redis_proc: RedisProc, sig: int
) -> None:
    served = serve("--redis-url", redis_proc.url)
    served.wait_serving()
    rc, took = served.terminate(sig)
    assert rc == 0, served.stderr
    assert took < 5.0
    records = served.log_records()
    for record in records:
        assert {"ts", "level", "logger", "msg"} <= set(record), record
    messages = [r["msg"] for r in records]
    assert "stockhold serving" in messages
    assert "stockhold stopping" in messages
    assert "stockhold stopped" in messages
    assert (
        messages.index("stockhold serving")
        < messages.index("stockhold stopping")
        < messages.index("stockhold stopped")
    )
    assert not [r for r in records if r["level"] in {"ERROR", "CRITICAL"}], records
    assert served.stdout_path.read_text() == ""


# -- external Redis and CLI errors ----------------------------------------------------------------
def test_redis_url_makes_the_server_use_that_redis(serve: Any, redis_proc: RedisProc) -> None:
    served = serve("--redis-url", redis_proc.url)
    served.wait_serving()
    ok_json(served.cli("adjust", "cap", "--warehouse", "w1", "--delta", "5", "--id", "adj-1"))
    ok_json(served.cli("reserve", "order-7", "--line", "sku=cap,qty=2"))

    resolver = KeyResolver()  # the defaults `serve` runs with: prefix sh, 64 partitions
    client = redis_proc.client()
    assert client.get("sh:{meta}:partitions") == b"64"
    stock_key = resolver.unit("cap", "", "").stock_key
    assert client.hgetall(stock_key) == {b"a:w1": b"3", b"r:w1": b"2"}
    order_key = resolver.order("order-7").order_key
    assert client.hget(order_key, "st") == b"H"
    assert client.exists(resolver.adjustment("adj-1").record_key)
    keys = {k.decode() for k in client.scan_iter(count=1000)}
    assert {stock_key, order_key, resolver.order("order-7").expiry_key} <= keys
    rc, _ = served.terminate()
    assert rc == 0, served.stderr


def test_cli_prints_rich_errors_on_stderr_and_exits_1(serve: Any, redis_proc: RedisProc) -> None:
    served = serve("--redis-url", redis_proc.url)
    served.wait_serving()
    ok_json(served.cli("adjust", "cap", "--warehouse", "w1", "--delta", "2"))

    short = served.cli("reserve", "order-1", "--line", "sku=cap,qty=5")
    assert short.returncode == 1
    assert short.stdout == ""
    assert "error: FAILED_PRECONDITION" in short.stderr
    assert "reason: INSUFFICIENT_STOCK" in short.stderr
    assert "requested=5" in short.stderr and "available=2" in short.stderr

    bad = served.cli("reserve", "", "--line", "sku=,qty=0", "--hold-seconds", "-5")
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert "error: INVALID_ARGUMENT" in bad.stderr
    assert "reason: INVALID_ARGUMENT" in bad.stderr
    assert "field order_id: must not be empty" in bad.stderr
    assert "field lines[0].unit.sku: must not be empty" in bad.stderr
    assert "field lines[0].quantity: must be within 1..1000000 (got 0)" in bad.stderr
    assert "field hold_seconds:" in bad.stderr

    zero = served.cli("adjust", "cap", "--warehouse", "w1", "--delta", "0")
    assert zero.returncode == 1
    assert "field delta: must not be 0" in zero.stderr

    missing = served.cli("get", "no-such-order")
    assert missing.returncode == 1
    assert "error: NOT_FOUND" in missing.stderr
    assert "reason: RESERVATION_NOT_FOUND order_id=no-such-order" in missing.stderr

    rc, _ = served.terminate()
    assert rc == 0, served.stderr
