"""The hot-path Redis client: pipelined RESP2 on asyncio Protocols and `hiredis.Reader`.

Chosen by measurement (bench/redis_clients.py, issue 10): redis-py, coredis and valkey-glide
each spend 4-12x the client CPU per script call of a minimal pipelined Protocol, so the hot
path has its own small client, and redis-py stays for everything else.

What it guarantees (each pinned by tests/test_hotclient.py):

- A bounded pool per Redis node: at most `max_connections` connections. Concurrent calls are
  pipelined over them (another connection opens only when every open one already has
  `pipeline_depth` replies outstanding), and at most `max_pending` calls wait for replies on
  one connection; past that a call waits up to `pool_timeout` for room, then fails with
  ConnectionError("No connection available."), as redis-py's BlockingConnectionPool does.
- The "Redis stuck" bound: a call not answered within `socket_timeout` fails with
  redis.exceptions.TimeoutError. Replies come back in order, so one timer per connection,
  armed for the oldest outstanding call, checks every deadline; a connection whose oldest call
  is late is closed and every call on it fails with TimeoutError (the rest were queued behind
  it on a Redis that does not answer).
- Reconnects: a broken connection leaves the pool; the next call opens a new one. A call in
  flight when a connection broke fails with ConnectionError (scripts are idempotent, so the
  caller may retry). A call never written (its connection could not be opened) is tried once
  more after a short pause, as redis-py retries connection errors.
- NOSCRIPT: `evalsha` loads the script (SCRIPT LOAD) and calls it again.
- WAIT (issue 11): a ScriptDef with `replicas` > 0 is sent as EVALSHA then `WAIT replicas
  timeout` in one write on one connection (after the reload too, on NOSCRIPT); fewer
  acknowledgements raise ReplicationError. Without it nothing more is sent.
- Errors are redis-py's classes, built by redis-py's own reply parser (ResponseError,
  NoScriptError, BusyLoadingError, ...), plus ConnectionError / TimeoutError /
  AuthenticationError / InvalidResponse, so `store.calls.redis_errors()` maps them unchanged.
- URLs: redis://, rediss:// (TLS, with a client certificate if given) and unix://, with
  username/password (AUTH; the password may come from `redis_password_file` instead) and db
  (SELECT).
  Connecting never blocks the event loop (the loop's own connect, TLS handshake and, for host
  names, getaddrinfo in its executor), and is bounded by `connect_timeout`.

Replies are raw: bytes, int, None, lists of them. Cluster routing (`cluster=True`) lives in
store/cluster.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import random
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast
from urllib.parse import parse_qs, unquote, urlparse

import hiredis
from redis._parsers.base import BaseParser
from redis.exceptions import AuthenticationError, InvalidResponse, NoScriptError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stockhold import scripts
from stockhold.secretfile import redis_password
from stockhold.settings import Settings

Arg = str | bytes | int | float
"""One argument of a command, as RESP sends it (str is sent UTF-8, numbers as text)."""

# hiredis's C encoder of one command (RESP array of bulk strings); its stub types the tuple
# too narrowly.
pack_command: Callable[[tuple[Arg, ...]], bytes] = cast(Any, hiredis.pack_command)

# Open another connection only when every open one has this many replies outstanding: one
# connection carries a pipeline best (fewer syscalls, one read for many replies), and Redis
# runs commands one at a time whatever the number of connections.
DEFAULT_PIPELINE_DEPTH: Final = 64
# At most this many calls outstanding on one connection; past it, calls wait for room.
DEFAULT_MAX_PENDING: Final = 1024
# A call that could not be written (its connection failed to open) is tried once more after
# this pause, with jitter (seconds).
_RETRY_PAUSE: Final = (0.01, 0.05)
# uvloop fires timers with millisecond resolution: a deadline this close counts as passed.
_TIMER_SLACK: Final = 0.001
DEFAULT_CLIENT_NAME: Final = "stockhold-hot"


@dataclass(frozen=True, slots=True)
class ScriptDef:
    """A Lua script as the hot client runs it: EVALSHA by `sha`, SCRIPT LOAD of `source`.

    With `replicas` > 0 every call is followed, in the same write on the same connection, by
    `WAIT replicas wait_timeout_ms` (`wait`, packed once); fewer acknowledgements raise
    ReplicationError. 0 (the default): no WAIT, not a byte more on the wire.
    """

    name: str
    source: str
    replicas: int = 0
    wait_timeout_ms: int = 0
    sha: str = field(init=False)
    wait: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())
        wait = pack_command(("WAIT", self.replicas, self.wait_timeout_ms)) if self.replicas else b""
        object.__setattr__(self, "wait", wait)

    @classmethod
    def of(cls, name: str, settings: Settings | None = None) -> ScriptDef:
        """The operation script `name` as built for `settings` (the defaults when None): the
        configuration is part of the source, so a script built for other settings is refused
        by Redis-side checks (STOCKHOLD_CONFIG)."""
        return _script(name, settings or Settings())


@functools.cache
def _script(name: str, settings: Settings) -> ScriptDef:
    return ScriptDef(name, scripts.source(name, settings))


# -- addresses and options ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Address:
    """Where one Redis node listens: host and port, or a unix socket path."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""

    def __str__(self) -> str:
        return f"unix://{self.path}" if self.path else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Options:
    """Everything a node pool needs besides its address (one set per client)."""

    max_connections: int = 64
    connect_timeout: float = 0.25
    socket_timeout: float = 0.8
    pool_timeout: float = 5.0
    pipeline_depth: int = DEFAULT_PIPELINE_DEPTH
    max_pending: int = DEFAULT_MAX_PENDING
    username: str | None = None
    password: str | None = None
    db: int = 0
    ssl: ssl.SSLContext | None = None
    client_name: str | None = DEFAULT_CLIENT_NAME

    def handshake(self) -> list[bytes]:
        """The commands a new connection sends before any call (AUTH, SELECT, SETNAME)."""
        cmds: list[bytes] = []
        if self.password is not None:
            if self.username:
                cmds.append(pack_command(("AUTH", self.username, self.password)))
            else:
                cmds.append(pack_command(("AUTH", self.password)))
        if self.db:
            cmds.append(pack_command(("SELECT", self.db)))
        if self.client_name:
            cmds.append(pack_command(("CLIENT", "SETNAME", self.client_name)))
        return cmds


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
# The TLS query parameters of a rediss:// URL, read as redis-py reads them (same names, same
# defaults: certificates required, host name checked), so one URL means the same to both.
_TLS_PARAMS: Final = frozenset(
    {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
)
_BOOL = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def tls_context(query: dict[str, str]) -> ssl.SSLContext:
    """The client TLS context of a rediss:// URL's query: `ssl_ca_certs` (CA file; default:
    the system's), `ssl_certfile`/`ssl_keyfile` (a client certificate, for Redis's
    tls-auth-clients), `ssl_cert_reqs` (required, optional, none) and `ssl_check_hostname`
    (true unless ssl_cert_reqs=none)."""
    ctx = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
    reqs = query.get("ssl_cert_reqs", "required").lower()
    check = _BOOL.get(query.get("ssl_check_hostname", "true").lower())
    if reqs not in _CERT_REQS or check is None:
        raise ValueError(
            "ssl_cert_reqs must be none, optional or required; ssl_check_hostname true or false"
        )
    ctx.check_hostname = check and reqs != "none"
    ctx.verify_mode = _CERT_REQS[reqs]
    if query.get("ssl_certfile"):
        ctx.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile") or None)
    return ctx


def parse_url(url: str) -> tuple[Address, dict[str, Any]]:
    """The address and the connection options (username, password, db, ssl) of a Redis URL.

    redis://[[user]:password@]host[:port][/db], rediss://... (TLS; query parameters
    `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs`, `ssl_check_hostname`:
    see `tls_context`), unix://[[user]:password@]/path/to.sock[?db=N]. `db` may also be given
    as a query parameter. Anything else in the query is refused. No message names the
    password.
    """
    parsed = urlparse(url)
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    unknown = set(query) - {"db"} - (_TLS_PARAMS if parsed.scheme == "rediss" else set())
    if unknown:
        raise ValueError(f"unsupported Redis URL parameters: {', '.join(sorted(unknown))}")
    opts: dict[str, Any] = {}
    if parsed.username:
        opts["username"] = unquote(parsed.username)
    if parsed.password is not None:
        opts["password"] = unquote(parsed.password)
    db_text = query.get("db")
    if parsed.scheme == "unix":
        if not parsed.path:
            raise ValueError("a unix:// Redis URL needs a socket path")
        address = Address(path=unquote(parsed.path))
    elif parsed.scheme in ("redis", "rediss"):
        address = Address(unquote(parsed.hostname or "127.0.0.1"), parsed.port or 6379)
        path = unquote(parsed.path).strip("/")
        if path and db_text is None:
            db_text = path
        if parsed.scheme == "rediss":
            opts["ssl"] = tls_context(query)
    else:
        raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
    if db_text is not None:
        try:
            opts["db"] = int(db_text)
        except ValueError:
            raise ValueError(f"invalid Redis db {db_text!r}") from None
    return address, opts


# -- one connection ------------------------------------------------------------------------------
class ReplicationError(RedisError):
    """A write ran, but fewer replicas than asked acknowledged it within the WAIT timeout.

    Not acknowledged: a failover may lose it. Safe to retry with the same ids (every script
    is idempotent by its order or adjustment id)."""

    def __init__(self, acked: int, wanted: int) -> None:
        super().__init__(f"WAIT: {acked} of {wanted} replicas acknowledged the write")
        self.acked = acked
        self.wanted = wanted


def acked_reply(script: ScriptDef, reply: Any, acked: Any) -> Any:
    """The script's `reply` once its WAIT answered `acked` >= script.replicas; else raise
    (an error reply of the script itself first: it wrote nothing to wait for)."""
    if isinstance(reply, RedisError):
        raise reply
    if not isinstance(acked, int) or acked < script.replicas:
        # An error reply to WAIT (the node became a replica) acknowledges nothing either.
        raise ReplicationError(acked if isinstance(acked, int) else 0, script.replicas)
    return reply


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # A reply nobody awaits any more (its call failed first): mark its exception retrieved.
    if not fut.cancelled():
        fut.exception()


def _forget(futs: Sequence[asyncio.Future[Any]]) -> None:
    for fut in futs:
        if fut.done():
            _retrieve(fut)
        else:
            fut.add_done_callback(_retrieve)


async def replies_of(futs: Sequence[asyncio.Future[Any]]) -> list[Any]:
    """The replies of commands sent together, in order; if one raises (the connection
    broke), the others are left retrieved, never logged as lost exceptions."""
    try:
        return [await f for f in futs]
    except BaseException:
        _forget(futs)
        raise


def _again(exc: BaseException) -> BaseException:
    """A fresh exception like `exc`: each failed call raises its own instance."""
    try:
        return type(exc)(*exc.args)
    except Exception:
        return RedisConnectionError(str(exc))


class Connection(asyncio.Protocol):
    """One pipelined connection: a FIFO of futures, answered in order by hiredis.Reader.

    Replies are delivered as they are parsed: values, or (for error replies) the redis-py
    exception instance, which the caller raises.
    """

    def __init__(self, pool: NodePool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.timeout = pool.options.socket_timeout
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error
        )
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.deadlines: collections.deque[float] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        # Set once, when the connection stops taking calls (lost, timed out, closed).
        self.broken: BaseException | None = None
        self.closed: asyncio.Future[None] = loop.create_future()

    # -- sending -----------------------------------------------------------------------------
    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Write one packed command; the future gets its reply (an error reply as a value)."""
        loop = self.loop
        fut = loop.create_future()
        deadline = loop.time() + self.timeout
        self.pending.append(fut)
        self.deadlines.append(deadline)
        if self.timer is None:
            self.timer = loop.call_at(deadline, self._check_deadline)
        self.transport.write(packed)  # type: ignore[union-attr]
        return fut

    def send_many(self, packed: Sequence[bytes]) -> list[asyncio.Future[Any]]:
        """Write several packed commands at once (one write); one future per command."""
        loop = self.loop
        deadline = loop.time() + self.timeout
        futs: list[asyncio.Future[Any]] = []
        for _ in packed:
            fut = loop.create_future()
            self.pending.append(fut)
            self.deadlines.append(deadline)
            futs.append(fut)
        if self.timer is None and futs:
            self.timer = loop.call_at(deadline, self._check_deadline)
        self.transport.write(b"".join(packed))  # type: ignore[union-attr]
        return futs

    # -- protocol callbacks --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        if self.broken is not None:  # given up on (connect timed out) before it was made
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        pending = self.pending
        deadlines = self.deadlines
        try:
            while (reply := reader.gets()) is not False:
                deadlines.popleft()
                fut = pending.popleft()
                if not fut.done():  # a caller that gave up (cancelled) leaves its reply here
                    fut.set_result(reply)
        except InvalidResponse as exc:
            self.fail(exc)
            return
        except IndexError:
            self.fail(InvalidResponse("Redis sent a reply nobody asked for"))
            return
        if self.pool.waiters:
            self.pool.wake()

    def eof_received(self) -> bool | None:
        return False  # close the transport: Redis closed its side

    def connection_lost(self, exc: Exception | None) -> None:
        reason = "Connection closed by server." if exc is None else str(exc)
        self.fail(RedisConnectionError(f"Error while reading from {self.pool.address}: {reason}"))
        if not self.closed.done():
            self.closed.set_result(None)

    # -- failure -------------------------------------------------------------------------------
    def _check_deadline(self) -> None:
        self.timer = None
        if not self.deadlines or self.broken is not None:
            return
        head = self.deadlines[0]
        if head - self.loop.time() > _TIMER_SLACK:
            self.timer = self.loop.call_at(head, self._check_deadline)
            return
        self.fail(RedisTimeoutError(f"Timeout reading from {self.pool.address}"))

    def fail(self, exc: BaseException) -> None:
        """Stop taking calls, fail every call outstanding with `exc`, drop the connection."""
        if self.broken is None:
            self.broken = exc
            self.pool.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pending = self.pending
        self.deadlines.clear()
        while pending:
            fut = pending.popleft()
            if not fut.done():
                fut.set_exception(_again(exc))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        elif self.transport is None and not self.closed.done():
            self.closed.set_result(None)


# -- a pool per node ----------------------------------------------------------------------------
class NodePool:
    """The bounded set of pipelined connections to one Redis node."""

    def __init__(self, address: Address, options: Options) -> None:
        self.address = address
        self.options = options
        self.conns: list[Connection] = []
        # While one connection opens, the calls that need a new one wait for it (one at a
        # time: a burst of calls must not open a burst of connections).
        self.connecting: asyncio.Future[BaseException | None] | None = None
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.is_closed = False
        self._handshake = options.handshake()
        self._tasks: set[asyncio.Task[BaseException | None]] = set()

    def pick(self) -> Connection | None:
        """The open connection with the fewest calls outstanding, if it has room (else None).

        When even that one has `pipeline_depth` calls outstanding, another connection opens
        in the background (within the bound); the call still goes out on this one.
        """
        best: Connection | None = None
        low = self.options.max_pending
        for conn in self.conns:
            n = len(conn.pending)
            if n < low:
                best, low = conn, n
        if best is not None and low >= self.options.pipeline_depth:
            self._grow(best.loop)
        return best

    def _grow(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.connecting is None and len(self.conns) < self.options.max_connections:
            # `connecting` is set before the task first runs: no second open starts meanwhile.
            done: asyncio.Future[BaseException | None] = loop.create_future()
            self.connecting = done
            task = loop.create_task(self._open(loop, done))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def acquire(self) -> Connection:
        """A connection to send on: an open one, the first one, or one with room once it has.

        Only the first connection is waited for; the calls that find every connection full
        wait (at most `pool_timeout`) for a reply to drain one or a new one to open.
        """
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        retried = False
        while True:
            if self.is_closed:
                raise RedisConnectionError("the Redis client is closed")
            conn = self.pick()
            if conn is not None:
                return conn
            if self.conns:  # every connection is full
                self._grow(loop)
                if deadline is None:
                    deadline = loop.time() + self.options.pool_timeout
                await self._wait_for_room(loop, deadline)
                continue
            if self.connecting is not None:
                error = await asyncio.shield(self.connecting)
            else:
                done: asyncio.Future[BaseException | None] = loop.create_future()
                self.connecting = done
                error = await self._open(loop, done)
            if error is None:
                continue
            # Never written: one more try after a short pause when the connection could not
            # be made (a restart, a dropped link); not after a timeout or a refused login.
            if retried or isinstance(error, RedisTimeoutError | AuthenticationError):
                raise _again(error)
            retried = True
            await asyncio.sleep(random.uniform(*_RETRY_PAUSE))

    async def _open(
        self, loop: asyncio.AbstractEventLoop, done: asyncio.Future[BaseException | None]
    ) -> BaseException | None:
        """Open, log in and add one connection (`done`, already `self.connecting`, gets the
        outcome); returns the error instead of raising it."""
        error: BaseException | None = None
        try:
            conn = await self._connect(loop)
            if self.is_closed:
                conn.fail(RedisConnectionError("the Redis client is closed"))
            else:
                self.conns.append(conn)
        except RedisError as exc:
            error = exc
        finally:
            self.connecting = None
            done.set_result(error)
            self.wake()
        return error

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Connection:
        opts, addr = self.options, self.address
        conn = Connection(self, loop)
        try:
            async with asyncio.timeout(opts.connect_timeout):
                if addr.path:
                    await loop.create_unix_connection(lambda: conn, addr.path)
                else:
                    await loop.create_connection(
                        lambda: conn,
                        addr.host,
                        addr.port,
                        ssl=opts.ssl,
                        server_hostname=addr.host if opts.ssl is not None else None,
                    )
                if self._handshake:
                    # AUTH, SELECT, SETNAME in one write; a refused login is redis-py's
                    # AuthenticationError (its parser maps WRONGPASS, NOAUTH, ...).
                    replies = await replies_of(conn.send_many(self._handshake))
                    raise_first_error(replies)
        except TimeoutError:  # asyncio.timeout's (an OSError: caught before OSError)
            conn.fail(RedisTimeoutError(f"Timeout connecting to {addr}"))
            raise RedisTimeoutError(f"Timeout connecting to {addr}") from None
        except RedisError as exc:
            conn.fail(_again(exc))
            raise
        except OSError as exc:
            conn.fail(RedisConnectionError(str(exc)))
            raise RedisConnectionError(f"Error connecting to {addr}: {exc}") from None
        except BaseException:  # cancelled: leave no half-open transport behind
            conn.fail(RedisConnectionError("connect cancelled"))
            raise
        return conn

    async def _wait_for_room(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise RedisConnectionError("No connection available.")
        waiter: asyncio.Future[None] = loop.create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(remaining):
                await waiter
        except TimeoutError:
            raise RedisConnectionError("No connection available.") from None
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)

    def wake(self) -> None:
        """Let the calls waiting for room look again."""
        waiters = self.waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(None)

    def discard(self, conn: Connection) -> None:
        """Forget a connection that stopped taking calls."""
        with contextlib.suppress(ValueError):
            self.conns.remove(conn)
        self.wake()

    def inflight(self) -> int:
        """Calls written and not yet answered, over every connection."""
        return sum(len(c.pending) for c in self.conns)

    async def aclose(self) -> None:
        """Close every connection; calls outstanding fail with ConnectionError."""
        self.is_closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        conns = list(self.conns)
        for conn in conns:
            conn.fail(RedisConnectionError("the Redis client is closed"))
        self.wake()
        if conns:
            await asyncio.wait([c.closed for c in conns], timeout=1.0)


# -- the client ------------------------------------------------------------------------------------
class HotClient:
    """The hot-path Redis client of one Redis node (see the module docstring).

    Build it with `HotClient.from_url`; `cluster=True` gives a `ClusterHotClient` with the
    same interface that routes each call by the slot of its first key.
    """

    def __init__(self, address: Address, options: Options) -> None:
        self.options = options
        self.pool = NodePool(address, options)

    @classmethod
    def from_url(
        cls,
        url: str,
        settings: Settings | None = None,
        *,
        cluster: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        client_name: str | None = DEFAULT_CLIENT_NAME,
        pipeline_depth: int = DEFAULT_PIPELINE_DEPTH,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> HotClient:
        """A client for `url` with the pool and timeouts of `settings` (connects lazily).

        `settings` gives redis_max_connections, redis_connect_timeout_seconds,
        redis_socket_timeout_seconds and redis_pool_timeout_seconds (defaults: Settings()),
        and the password of redis_password_file when set.
        `ssl_context` replaces the one a rediss:// URL would build. With `cluster=True` the URL
        names any node of a Redis Cluster (the seed of its topology); db must be 0.
        """
        settings = settings or Settings()
        address, url_opts = parse_url(url)
        password = redis_password(settings)
        if password is not None:
            url_opts["password"] = password
        if ssl_context is not None:
            url_opts["ssl"] = ssl_context
        if settings.redis_max_connections < 1 or pipeline_depth < 1 or max_pending < 1:
            raise ValueError("max connections, pipeline depth and max pending must be >= 1")
        options = Options(
            max_connections=settings.redis_max_connections,
            connect_timeout=settings.redis_connect_timeout_seconds,
            socket_timeout=settings.redis_socket_timeout_seconds,
            pool_timeout=settings.redis_pool_timeout_seconds,
            pipeline_depth=pipeline_depth,
            max_pending=max_pending,
            client_name=client_name,
            **url_opts,
        )
        if cluster:
            from stockhold.store.cluster import ClusterHotClient

            if options.db:
                raise ValueError("Redis Cluster has only db 0")
            return ClusterHotClient([address], options)
        return cls(address, options)

    async def evalsha(
        self, script: ScriptDef, keys: Sequence[str | bytes], args: Sequence[Arg]
    ) -> Any:
        """EVALSHA `script` with KEYS and ARGV; loads it and retries once on NOSCRIPT.

        With `script.wait`, WAIT follows in the same write (see ScriptDef)."""
        packed = pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))
        if script.wait:
            return await self._evalsha_wait(script, packed)
        pool = self.pool
        conn = pool.pick() or await pool.acquire()
        reply = await conn.send(packed)
        if isinstance(reply, RedisError):  # an error reply (hiredis built it, not raised)
            if isinstance(reply, NoScriptError):
                return await self._reload(pool, script, packed)
            raise reply
        return reply

    async def _evalsha_wait(self, script: ScriptDef, packed: bytes) -> Any:
        # EVALSHA then WAIT in one write: WAIT counts the replicas that acknowledged this
        # connection's latest write, the script's. On NOSCRIPT: SCRIPT LOAD, EVALSHA, WAIT.
        pool = self.pool
        conn = pool.pick() or await pool.acquire()
        reply, acked = await replies_of(conn.send_many([packed, script.wait]))
        if isinstance(reply, NoScriptError):
            conn = pool.pick() or await pool.acquire()
            load = pack_command(("SCRIPT", "LOAD", script.source))
            loaded, reply, acked = await replies_of(conn.send_many([load, packed, script.wait]))
            if isinstance(loaded, RedisError):
                raise loaded
        return acked_reply(script, reply, acked)

    async def _reload(self, pool: NodePool, script: ScriptDef, packed: bytes) -> Any:
        # SCRIPT LOAD, then the call again on whichever connection: the cache is per server.
        conn = pool.pick() or await pool.acquire()
        load = pack_command(("SCRIPT", "LOAD", script.source))
        loaded, reply = await replies_of(conn.send_many([load, packed]))
        if isinstance(loaded, RedisError):
            raise loaded
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def execute(self, *cmd: Arg) -> Any:
        """Run one command, e.g. `await client.execute("GET", key)`; error replies raise."""
        pool = self.pool
        conn = pool.pick() or await pool.acquire()
        reply = await conn.send(pack_command(cmd))
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def pipeline(
        self, cmds: Sequence[Sequence[Arg]], raise_on_error: bool = True
    ) -> list[Any]:
        """Send several commands in one write on one connection; their replies, in order.

        With `raise_on_error` the first error reply is raised (after every reply arrived);
        without it error replies come back as exception instances in the list.
        """
        if not cmds:
            return []
        pool = self.pool
        conn = pool.pick() or await pool.acquire()
        replies = await replies_of(conn.send_many([pack_command(tuple(c)) for c in cmds]))
        if raise_on_error:
            raise_first_error(replies)
        return replies

    def connection_count(self) -> int:
        """Connections open now (for tests and metrics)."""
        return len(self.pool.conns)

    def inflight(self) -> int:
        """Calls written and not yet answered."""
        return self.pool.inflight()

    async def aclose(self) -> None:
        """Close the pool; calls outstanding fail with ConnectionError. Idempotent."""
        await self.pool.aclose()


def raise_first_error(replies: Sequence[Any]) -> None:
    """Raise the first error reply among `replies` (hiredis hands them over as values)."""
    for r in replies:
        if isinstance(r, RedisError):
            raise r
