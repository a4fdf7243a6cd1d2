"""Who is calling (issue 13, docs/security.md): identities, roles, rate limits, the interceptor.

A caller is identified by `authorization: Bearer <token>` (a token listed, as a hash, in the
auth file) or else by its verified TLS client certificate (SAN URI, then DNS SAN, then CN).
Each identity has roles; ROLE_METHODS, the one table, says which Inventory RPCs each role may
call. `AuthInterceptor` wraps every Inventory handler: identity -> allowed? -> rate limit ->
the handler, with the identity in a contextvar (`current_caller`, read by
servicer.actor_of), so a refused call never reaches the engine.

The auth file (TOML) is read at start and again on SIGHUP (`AuthInterceptor.reload`); a bad
new file keeps the old one in force and logs an ERROR.
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import ipaddress
import logging
import math
import secrets
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import grpc
from grpc_status import rpc_status

from stockhold.constants import ACTOR_ANONYMOUS
from stockhold.errors import DomainError, Reason, to_rpc_status
from stockhold.interceptor import WrappingInterceptor
from stockhold.settings import ConfigError, Settings, split_listen
from stockhold.v1 import inventory_pb2

log = logging.getLogger(__name__)

_SERVICE = inventory_pb2.DESCRIPTOR.services_by_name["Inventory"]
INVENTORY_METHODS: Final = frozenset(m.name for m in _SERVICE.methods)
_PREFIX: Final = f"/{_SERVICE.full_name}/"
_REFLECTION_PREFIX: Final = "/grpc.reflection."

ADMIN: Final = "admin"
# The one table: role -> the Inventory RPCs it may call (docs/security.md is checked against it).
# Health is open to everyone; reflection follows the `reflection` setting.
ROLE_METHODS: Final[Mapping[str, frozenset[str]]] = {
    "checkout": frozenset(
        {
            "Reserve",
            "ReserveBatch",
            "ReserveStream",
            "Commit",
            "Release",
            "GetReservation",
            "ExtendReservation",
            "MarkPaymentPending",
            "GetAvailability",
        }
    ),
    "payments": frozenset({"ReportPayment", "GetReservation"}),
    "warehouse": frozenset(
        {
            "AdjustStock",
            "GetAvailability",
            "SetOnHand",
            "WatchEvents",
            "CreateSubscription",
            "GetSubscription",
            "ListSubscriptions",
            "DeleteSubscription",
            "GetSubscriptionLag",
            "ReplayFailed",
            "ReplayFrom",
        }
    ),
    "operator": frozenset(
        {
            "SetSkuPolicy",
            "GetSkuPolicy",
            "ListSkuPolicies",
            "GetContentionStats",
            "GetReservation",
            "GetAvailability",
            "GetSubscription",
            "ListSubscriptions",
            "GetSubscriptionLag",
        }
    ),
    ADMIN: INVENTORY_METHODS,
}

# The identity of this process's own calls (the metrics collectors' GetContentionStats and
# GetSubscriptionLag), authenticated by a random token only this process (or its supervisor)
# knows: see internal_token().
INTERNAL_IDENTITY: Final = "stockhold-internal"
INTERNAL_ROLE: Final = "operator"
INTERNAL_TOKEN_ENV: Final = "STOCKHOLD_INTERNAL_TOKEN"

HASH_PREFIX: Final = "sha256:"
# Distinct (identity, method, reason) refusals remembered so that each is logged once; past
# this many the memory starts afresh (bounded, whatever callers do).
_LOGGED_MAX: Final = 10_000
# Authorization headers remembered after they matched a token (a few per identity at most).
_KNOWN_MAX: Final = 4096

_caller: contextvars.ContextVar[str] = contextvars.ContextVar(
    "stockhold_caller", default=ACTOR_ANONYMOUS
)


def current_caller() -> str:
    """The identity of the call being handled (set by AuthInterceptor); "anonymous" when no
    auth is configured (loopback only, or --allow-unauthenticated)."""
    return _caller.get()


def hash_token(token: str) -> str:
    """`sha256:<hex>` of a token: what the auth file stores (tokens are random and long, so
    a plain SHA-256 is enough; they are never stored in clear)."""
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


# -- the auth file ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket's shape: `per_second` refill, at most `burst` tokens."""

    per_second: float
    burst: float


@dataclass(frozen=True, slots=True)
class Principal:
    """An identity with what it may call and its rate (None: unlimited)."""

    name: str
    roles: tuple[str, ...]
    methods: frozenset[str]
    rate: Rate | None

    @property
    def admin(self) -> bool:
        """Whether the identity has the admin role."""
        return ADMIN in self.roles


class AuthFileError(ConfigError):
    """An auth file stockhold cannot use; str() is one line naming the file, the entry and
    what is wrong (`stockhold serve` prints it and exits 2)."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__("auth_file", str(path), problem, flag="--auth-file")
        self.path = str(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"auth file {self.path}: {self.problem}"


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """A loaded auth file: token hashes and client-certificate identities -> principals."""

    path: str
    tokens: Mapping[str, Principal]  # sha256 hex digest -> principal
    clients: Mapping[str, Principal]  # certificate identity -> principal

    def by_token(self, token: str) -> Principal | None:
        """The principal of a bearer token, or None."""
        return self.tokens.get(hashlib.sha256(token.encode()).hexdigest())


def _positive(value: object, what: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthFileError(path, f"{what} must be a number > 0 (got {value!r})")
    if not math.isfinite(value) or value <= 0:
        raise AuthFileError(path, f"{what} must be a number > 0 (got {value!r})")
    return float(value)


def _rates(doc: Mapping[str, Any], path: Path) -> dict[str, Rate]:
    section = doc.get("rate_limit", {})
    if not isinstance(section, dict):
        raise AuthFileError(path, "[rate_limit] must be a table of [rate_limit.<role>] tables")
    rates: dict[str, Rate] = {}
    for role, spec in section.items():
        where = f"[rate_limit.{role}]"
        if role not in ROLE_METHODS:
            raise AuthFileError(path, f"{where}: unknown role (roles: {', '.join(ROLE_METHODS)})")
        if not isinstance(spec, dict) or set(spec) - {"per_second", "burst"}:
            raise AuthFileError(path, f"{where}: expected per_second = N and burst = N only")
        per_second = _positive(spec.get("per_second"), f"{where}: per_second", path)
        burst = _positive(spec.get("burst", per_second), f"{where}: burst", path)
        rates[role] = Rate(per_second, burst)
    return rates


def _principal(
    name: str, roles: object, where: str, path: Path, rates: Mapping[str, Rate]
) -> Principal:
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
        raise AuthFileError(path, f"{where}: roles must be a non-empty list of role names")
    unknown = [r for r in roles if r not in ROLE_METHODS]
    if unknown:
        raise AuthFileError(
            path, f"{where}: unknown role {unknown[0]!r} (roles: {', '.join(ROLE_METHODS)})"
        )
    methods = frozenset().union(*(ROLE_METHODS[r] for r in roles))
    # Several roles: the most generous limit; a role without one means no limit.
    limits = [rates.get(r) for r in roles]
    rate = None
    if all(limits):
        given = cast(list[Rate], limits)
        rate = Rate(max(r.per_second for r in given), max(r.burst for r in given))
    return Principal(name, tuple(roles), methods, rate)


def _entries(doc: Mapping[str, Any], kind: str, path: Path) -> list[dict[str, Any]]:
    entries = doc.get(kind, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise AuthFileError(path, f"{kind} entries must be [[{kind}]] tables")
    return entries


def parse_auth(text: str, path: Path | str) -> AuthConfig:
    """An auth file's text -> AuthConfig; AuthFileError naming the entry for anything wrong."""
    path = Path(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise AuthFileError(path, f"not valid TOML ({err})") from None
    unknown = set(doc) - {"token", "client", "rate_limit"}
    if unknown:
        raise AuthFileError(
            path, f"unknown section {sorted(unknown)[0]!r} (expected token, client, rate_limit)"
        )
    rates = _rates(doc, path)
    tokens: dict[str, Principal] = {}
    names: set[str] = set()
    for i, entry in enumerate(_entries(doc, "token", path), 1):
        name = entry.get("name")
        where = f"[[token]] #{i}" + (f" (name {name!r})" if isinstance(name, str) else "")
        if set(entry) - {"name", "hash", "roles"}:
            extra = sorted(set(entry) - {"name", "hash", "roles"})[0]
            raise AuthFileError(path, f"{where}: unknown key {extra!r} (name, hash, roles)")
        if not isinstance(name, str) or not name.strip() or not name.isprintable():
            raise AuthFileError(path, f"{where}: name must be a non-empty printable string")
        if name in names:
            raise AuthFileError(path, f"{where}: name {name!r} is given twice")
        digest = entry.get("hash")
        hexpart = digest[len(HASH_PREFIX) :] if isinstance(digest, str) else ""
        if (
            not isinstance(digest, str)
            or not digest.startswith(HASH_PREFIX)
            or len(hexpart) != 64
            or any(c not in "0123456789abcdef" for c in hexpart)
        ):
            raise AuthFileError(
                path,
                f"{where}: hash must be sha256:<64 lowercase hex digits> "
                "(`stockhold auth hash-token` prints one)",
            )
        if hexpart in tokens:
            raise AuthFileError(path, f"{where}: the same hash as {tokens[hexpart].name!r}")
        tokens[hexpart] = _principal(name, entry.get("roles"), where, path, rates)
        names.add(name)
    clients: dict[str, Principal] = {}
    for i, entry in enumerate(_entries(doc, "client", path), 1):
        ident = entry.get("identity")
        where = f"[[client]] #{i}" + (f" (identity {ident!r})" if isinstance(ident, str) else "")
        if set(entry) - {"identity", "roles"}:
            extra = sorted(set(entry) - {"identity", "roles"})[0]
            raise AuthFileError(path, f"{where}: unknown key {extra!r} (identity, roles)")
        if not isinstance(ident, str) or not ident.strip() or not ident.isprintable():
            raise AuthFileError(path, f"{where}: identity must be a non-empty printable string")
        if ident in clients:
            raise AuthFileError(path, f"{where}: identity {ident!r} is given twice")
        clients[ident] = _principal(ident, entry.get("roles"), where, path, rates)
    return AuthConfig(str(path), tokens, clients)


def load_auth(path: Path | str) -> AuthConfig:
    """Read and check an auth file; AuthFileError (one line: file, entry, problem) if bad."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise AuthFileError(path, f"cannot read it ({reason})") from None
    return parse_auth(text, path)


# -- identity ------------------------------------------------------------------------------------


def cert_identity(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The identity of a verified TLS client certificate, from grpc's auth_context(): its
    first SAN URI (`peer_uri`, e.g. spiffe://shop/checkout), else its first DNS SAN
    (`peer_dns`), else its subject CN (`x509_common_name`); None without a certificate."""
    for key in ("peer_uri", "peer_dns", "x509_common_name"):
        for value in auth_context.get(key, ()):
            return value.decode("utf-8", "replace")
    return None


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` header ("" for another scheme or an
    empty token), None without the header."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value if isinstance(value, str) else value.decode("latin-1")
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def is_loopback_host(host: str) -> bool:
    """Whether a listen host is a loopback address (or `localhost`)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _peer_is_loopback(peer: str) -> bool:
    """grpc's context.peer() (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`, `unix:...`)."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    host = rest.rpartition(":")[0] if kind in ("ipv4", "ipv6") else ""
    return is_loopback_host(host.replace("%5B", "[").replace("%5D", "]"))


# -- rate limits ---------------------------------------------------------------------------------


class RateLimiter:
    """Token buckets per identity, in this process: `take` spends one token or says how long
    until one is there. The map holds one entry per identity of the auth file at most."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # identity -> [tokens, last refill time]

    def take(self, who: str, rate: Rate) -> float:
        """0.0 when a token was spent, else the seconds until the next one."""
        now = self._clock()
        bucket = self._buckets.get(who)
        if bucket is None:
            bucket = self._buckets[who] = [rate.burst, now]
        else:
            tokens = bucket[0] + (now - bucket[1]) * rate.per_second
            bucket[0] = tokens if tokens < rate.burst else rate.burst
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / rate.per_second


# -- start-up rules ----------------------------------------------------------------------------


def check_auth_settings(settings: Settings) -> AuthConfig | None:
    """Before serving: load the auth file (AuthFileError if bad) or, with none, refuse a
    non-loopback listen address unless allow_unauthenticated (ConfigError, one line)."""
    if settings.auth_file:
        return load_auth(settings.auth_file)
    host = split_listen(settings.listen)[0]
    if not is_loopback_host(host) and not settings.allow_unauthenticated:
        raise ConfigError(
            "auth_file",
            "",
            f"an auth file: {settings.listen} is not a loopback address, so callers must "
            "authenticate (or pass --allow-unauthenticated to serve anyone, which is logged)",
            flag="--auth-file",
        )
    return None


def warn_unauthenticated(settings: Settings) -> None:
    """The start-up WARNING of a non-loopback server without authentication."""
    host = split_listen(settings.listen)[0]
    if not settings.auth_file and not is_loopback_host(host):
        log.warning(
            "serving without authentication on a non-loopback address "
            "(--allow-unauthenticated): anyone who reaches the port may call every RPC",
            extra={"listen": settings.listen},
        )


# -- the interceptor ---------------------------------------------------------------------------

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]

_Context = grpc.aio.ServicerContext[Any, Any]


def _status(reason: Reason, message: str, **meta: object) -> grpc.Status:
    return cast(
        grpc.Status, rpc_status.to_status(to_rpc_status(DomainError(reason, message, meta)))
    )


class AuthInterceptor(WrappingInterceptor):
    """Authenticates, authorizes and rate-limits every Inventory call before its handler runs
    (and gates reflection per the `reflection` setting); health passes untouched.

    Per allowed call: one metadata scan, a dict lookup of the authorization header (a
    SHA-256 of the token the first time; for a certificate, one auth_context read), a set
    lookup of the method, one bucket update when the role is limited, one contextvar set.
    Handlers are wrapped once per method. Each grpc.aio call runs in its own task, so the
    contextvar set for a call is never seen by another and needs no reset.
    """

    def __init__(
        self, config: AuthConfig | None, reflection: str, internal_token: str | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.reflection = reflection
        self.limiter = RateLimiter()
        self._internal: Principal | None = None
        self._internal_digest = ""
        if internal_token:
            self._internal = Principal(
                INTERNAL_IDENTITY, (INTERNAL_ROLE,), ROLE_METHODS[INTERNAL_ROLE], None
            )
            self._internal_digest = hashlib.sha256(internal_token.encode()).hexdigest()
        self._logged: set[tuple[str, str, Reason]] = set()
        # authorization header -> principal, for headers that matched (see _by_header)
        self._known: dict[str | bytes, Principal] = {}

    def reload(self) -> bool:
        """Read the auth file again; a bad one keeps the old in force (ERROR logged). True
        when the new file is in force."""
        if self.config is None:
            return False
        try:
            config = load_auth(self.config.path)
        except AuthFileError as err:
            log.error("auth file not reloaded, the previous one stays in force: %s", err)
            return False
        self.config = config
        self.limiter = RateLimiter()  # limits may have changed: buckets start full
        self._logged.clear()
        self._known.clear()  # removed tokens must stop working
        log.info(
            "auth file reloaded",
            extra={"auth_file": config.path, "tokens": len(config.tokens)},
        )
        return True

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler with the checks: every Inventory method (when an auth file is
        configured), reflection per the setting; health as it is."""
        if method.startswith(_PREFIX):
            if self.config is not None:
                return _wrap(handler, self._guard(method[len(_PREFIX) :]))
        elif method.startswith(_REFLECTION_PREFIX) and self.reflection == "loopback":
            return _wrap(handler, self._reflection_guard(method))
        return handler

    def _principal(self, context: _Context) -> Principal | str | None:
        """The caller's principal; None without credentials; "" for credentials that match
        nothing (a bad token, an unknown certificate)."""
        config = self.config
        assert config is not None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                known = self._known.get(value)
                return known if known is not None else self._by_header(value)
        if config.clients:
            ident = cert_identity(context.auth_context())
            if ident is not None:
                return config.clients.get(ident) or ""
        return None

    def _by_header(self, header: str | bytes) -> Principal | str:
        """The principal of an authorization header seen for the first time ("" if none).
        A header that matched is remembered (bounded, forgotten on reload), so a caller's
        later calls cost one dict lookup instead of a parse and a SHA-256."""
        assert self.config is not None
        token = bearer((("authorization", header),))
        if not token:
            return ""
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = self.config.tokens.get(digest)
        if found is None and digest == self._internal_digest:
            found = self._internal
        if found is None:
            return ""  # never remembered: unknown headers must not fill memory
        if len(self._known) >= _KNOWN_MAX:
            self._known.clear()
        self._known[header] = found
        return found

    def _guard(self, name: str) -> Callable[[_Context], Awaitable[None]]:
        async def guard(context: _Context) -> None:
            principal = self._principal(context)
            if not principal:
                await self._unauthenticated(context, name, principal)
                return
            assert isinstance(principal, Principal)
            if name not in principal.methods:
                roles = sorted(r for r, ms in ROLE_METHODS.items() if name in ms)
                await self._refuse(
                    context,
                    principal.name,
                    name,
                    Reason.PERMISSION_DENIED,
                    f"{principal.name} may not call {name}",
                    roles=",".join(roles),
                    identity=principal.name,
                )
                return
            rate = principal.rate
            if rate is not None:
                wait = self.limiter.take(principal.name, rate)
                if wait:
                    await self._refuse(
                        context,
                        principal.name,
                        name,
                        Reason.RATE_LIMITED,
                        f"{principal.name} is over its rate limit; nothing was done, retry later",
                        identity=principal.name,
                        retry_after_ms=max(1, math.ceil(wait * 1000)),
                    )
                    return
            _caller.set(principal.name)

        return guard

    def _reflection_guard(self, name: str) -> Callable[[_Context], Awaitable[None]]:
        async def guard(context: _Context) -> None:
            if _peer_is_loopback(context.peer()):
                return
            if self.config is None:
                principal: Principal | str | None = None
            else:
                principal = self._principal(context)
            if isinstance(principal, Principal) and principal.admin:
                return
            who = principal.name if isinstance(principal, Principal) else _peer_host(context)
            await self._refuse(
                context,
                who,
                name,
                Reason.PERMISSION_DENIED,
                "reflection is open to loopback callers and admin only (setting reflection)",
                roles=ADMIN,
                identity=who,
            )

        return guard

    async def _unauthenticated(
        self, context: _Context, method: str, principal: Principal | str | None
    ) -> None:
        who = _peer_host(context)
        missing = principal is None
        await self._refuse(
            context,
            who,
            method,
            Reason.UNAUTHENTICATED,
            "no credentials: send authorization: Bearer <token> or a client certificate"
            if missing
            else "the credentials match no caller of the auth file",
            peer=who,
        )

    async def _refuse(
        self, context: _Context, who: str, method: str, reason: Reason, message: str, **meta: object
    ) -> None:
        key = (who, method, reason)
        if key not in self._logged:
            if len(self._logged) >= _LOGGED_MAX:
                self._logged.clear()
            self._logged.add(key)
            log.warning(
                "%s refused: %s: %s", method, reason.value, message, extra={"identity": who}
            )
        await context.abort_with_status(_status(reason, message, method=method, **meta))


def _peer_host(context: _Context) -> str:
    """The caller's address without its port (for refusals of unknown callers)."""
    peer = context.peer() or ""
    return peer.rpartition(":")[0] or peer


def _wrap(handler: Handler, guard: Callable[[_Context], Awaitable[None]]) -> Handler:
    """The handler with `guard(context)` awaited first (it aborts the call to refuse it)."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_call(handler.unary_unary, guard),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_call(handler.unary_stream, guard),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_call(handler.stream_unary, guard),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        _wrap_call(handler.stream_stream, guard),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _wrap_call(inner: Any, guard: Callable[[_Context], Awaitable[None]]) -> Any:
    """A coroutine or async-generator handler, like `inner`, that awaits `guard` first."""
    if inspect.isasyncgenfunction(inner):

        async def guarded_stream(request: Any, context: _Context) -> AsyncIterator[Any]:
            await guard(context)
            async for item in inner(request, context):
                yield item

        return guarded_stream

    if inspect.iscoroutinefunction(inner):

        async def guarded_coroutine(request: Any, context: _Context) -> Any:
            await guard(context)
            return await inner(request, context)

        return guarded_coroutine

    async def guarded(request: Any, context: _Context) -> Any:
        await guard(context)
        result = inner(request, context)
        if inspect.isawaitable(result):
            return await result
        return result

    return guarded


def internal_token() -> str:
    """The token of this process's own calls: given by a supervisor (environment, taken out
    so that nothing started later inherits it), else a fresh random one."""
    import os

    return os.environ.pop(INTERNAL_TOKEN_ENV, "") or new_token()


__all__ = [
    "INVENTORY_METHODS",
    "ROLE_METHODS",
    "AuthConfig",
    "AuthFileError",
    "AuthInterceptor",
    "Principal",
    "Rate",
    "RateLimiter",
    "bearer",
    "cert_identity",
    "check_auth_settings",
    "current_caller",
    "hash_token",
    "internal_token",
    "load_auth",
    "new_token",
    "parse_auth",
    "warn_unauthenticated",
]
