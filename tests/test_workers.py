"""`stockhold serve --workers N`: several processes share one port and are supervised."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis_proc import free_port

from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


ESTABLISHED, LISTEN = "01", "0A"  # TCP states as /proc/net/tcp writes them


def _sockets_on(pid: int, port: int, state: str = ESTABLISHED) -> int:
    """How many TCP sockets in `state` the process holds with local port `port`."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            local_port = int(cols[1].rsplit(":", 1)[1], 16)
            if local_port == port and cols[3] == state and cols[9] in inodes:
                count += 1
    return count


def _wait_serving(address: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with grpc.insecure_channel(address) as ch:
            try:
                pb_grpc.InventoryStub(ch).GetAvailability(
                    pb.GetAvailabilityRequest(units=[pb.SalesUnit(sku="x")]), timeout=1
                )
                return
            except grpc.RpcError:
                time.sleep(0.2)
    raise AssertionError(f"{address} never answered")


def _wait_all_listening(parent: int, port: int, workers: int, timeout: float = 20.0) -> None:
    """Wait until every worker has its own listening socket on the port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = _children(parent)
        if len(children) == workers and all(_sockets_on(p, port, LISTEN) for p in children):
            return
        time.sleep(0.1)
    raise AssertionError(f"not all {workers} workers listen on {port}")


@contextlib.contextmanager
def serve_workers(
    redis_url: str,
    log_path: Path,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    workers: int = 2,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`stockhold serve --workers N` on a free port until the block ends: (process, port).

    STOCKHOLD_* variables of the test environment are dropped (the defaults apply), then
    `env` is added. The block starts once every worker listens and one answered; at its end
    the supervisor gets SIGTERM (SIGKILL after 20 s).
    """
    port = free_port()
    penv = {k: v for k, v in os.environ.items() if not k.startswith("STOCKHOLD_")}
    penv.update(env or {})
    cmd = [sys.executable, "-m", "stockhold.cli", "serve", "--workers", str(workers)]
    cmd += ["--listen", f"127.0.0.1:{port}", "--redis-url", redis_url, "--partitions", "16"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*cmd, *extra], env=penv, stderr=log)
        try:
            _wait_serving(f"127.0.0.1:{port}")
            _wait_all_listening(proc.pid, port, workers=workers)
            yield proc, port
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def workers(redis_proc: Any, tmp_path: Path) -> Any:
    with serve_workers(redis_proc.url, tmp_path / "serve.log") as running:
        yield running


def test_two_workers_share_one_port_and_both_take_connections(workers: Any) -> None:
    proc, port = workers
    children = _children(proc.pid)
    assert len(children) == 2
    # A local subchannel pool per channel: otherwise all channels share one TCP connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(24)]
    try:
        for i, ch in enumerate(channels):
            stub = pb_grpc.InventoryStub(ch)
            stub.GetAvailability(
                pb.GetAvailabilityRequest(units=[pb.SalesUnit(sku=f"s{i}")]), timeout=5
            )
        per_worker = {pid: _sockets_on(pid, port) for pid in children}
        assert sum(per_worker.values()) == 24, per_worker
        assert all(n > 0 for n in per_worker.values()), per_worker
    finally:
        for ch in channels:
            ch.close()


def test_a_killed_worker_is_replaced_and_sigterm_stops_everything(workers: Any) -> None:
    proc, port = workers
    before = _children(proc.pid)
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    after: list[int] = []
    while time.monotonic() < deadline:
        after = _children(proc.pid)
        if len(after) == 2 and before[0] not in after:
            break
        time.sleep(0.1)
    assert len(after) == 2 and before[0] not in after
    _wait_serving(f"127.0.0.1:{port}")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    for pid in after:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )


def test_workers_stop_when_the_supervisor_is_killed(workers: Any) -> None:
    proc, port = workers
    children = _children(proc.pid)
    assert len(children) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    # Each worker got SIGTERM from the kernel (parent death) and drains, bounded by its grace.
    deadline = time.monotonic() + 30
    alive = children
    while alive and time.monotonic() < deadline:
        alive = [
            p
            for p in children
            if Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text()
        ]
        time.sleep(0.1)
    assert not alive, f"workers {alive} outlived their supervisor"
    with socket.socket() as sock:  # and nobody listens on the port any more
        sock.bind(("127.0.0.1", port))


def test_workers_refuse_port_zero(redis_proc: Any) -> None:
    cmd = [sys.executable, "-m", "stockhold.cli", "serve", "--workers", "2"]
    cmd += ["--listen", "127.0.0.1:0", "--redis-url", redis_proc.url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "fixed port" in done.stderr
