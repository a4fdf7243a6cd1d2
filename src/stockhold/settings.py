"""Settings: one dataclass, filled from STOCKHOLD_* environment variables and CLI flags.

Every setting is checked here, once, when Settings is built (`_RULES`): a value stockhold
cannot run with is a ConfigError, whose text names the setting, its value and what is
expected (`stockhold serve` prints it as its one line and exits 2).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeAlias
from urllib.parse import parse_qs, urlsplit

from stockhold.constants import DEFAULT_KEY_PREFIX, DEFAULT_PARTITIONS
from stockhold.contention import HIGHEST_EDGE_US, LOWEST_EDGE_US

DAY = 86_400
# The trailing sales window of auto-hot detection is counted in at most this many buckets
# (24 h: 10-minute buckets).
SALES_BUCKETS = 144


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a stockhold process can be told; defaults are production-sensible."""

    listen: str = "127.0.0.1:50051"
    # None: start an embedded redis-server in data_dir.
    redis_url: str | None = None
    data_dir: Path = Path(".stockhold")
    key_prefix: str = DEFAULT_KEY_PREFIX
    # Fixed at deploy time; recorded in Redis and checked at start-up.
    partitions: int = DEFAULT_PARTITIONS
    # Payment grace period: the hold length when a request does not give one.
    default_hold_seconds: int = 2 * DAY
    max_hold_seconds: int = 30 * DAY
    # Auto-allocation order for lines without a warehouse; others follow by most available.
    warehouse_priority: tuple[str, ...] = ()
    # Approximate maximum length of each partition's event stream (XADD MAXLEN ~).
    event_stream_maxlen: int = 1_000_000
    # How long finished reservations and adjustment answers are kept for idempotent replays.
    record_retention_seconds: int = 30 * DAY
    sweep_interval_seconds: float = 0.5
    sweep_batch: int = 500
    health_interval_seconds: float = 0.5
    # Coalescing of concurrent reserves / commits / releases (see batcher.py).
    batch_max_orders: int = 64
    batch_max_inflight: int = 1
    redis_max_connections: int = 64
    # How long a request may wait for a pooled Redis connection before it is refused.
    redis_pool_timeout_seconds: float = 5.0
    redis_connect_timeout_seconds: float = 0.25
    redis_socket_timeout_seconds: float = 0.8
    # Script calls through the hot-path client (store/hotclient.py); off: through redis-py.
    redis_hot_client: bool = True
    # The Redis URL names a node of a Redis Cluster (never the embedded Redis: standalone).
    redis_cluster: bool = False
    # Every writing script call is followed, in the same write, by WAIT for this many replica
    # acknowledgements (0: no WAIT); fewer within the timeout is BACKEND_UNAVAILABLE.
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 200
    # The Redis password (of the URL's user, or of `default`) from a file only its owner can
    # read, instead of the URL (docs/security.md "Redis"); "": the URL's password, if any.
    # The embedded Redis sets it itself (its own random requirepass).
    redis_password_file: str = ""
    # Cross-slot orders left half done by a dead process are finished or undone within this.
    recovery_window_seconds: float = 5.0
    # Explicit admission limit: beyond it calls get RESOURCE_EXHAUSTED, never a bare CANCELLED.
    max_concurrent_rpcs: int = 20_000
    # Who may call (issue 13, docs/security.md): the auth file (TOML: token hashes, client
    # certificate identities, roles, rate limits; "": none, loopback listen addresses only,
    # unless allow_unauthenticated), and reflection: "loopback" (loopback callers and admin),
    # "on" (anyone), "off" (not served).
    auth_file: str = ""
    allow_unauthenticated: bool = False
    reflection: str = "loopback"
    # Limits per connection (docs/security.md "Limits"): the largest message either way, the
    # concurrent streams (HTTP/2 MAX_CONCURRENT_STREAMS), and keepalive enforcement: a client
    # pinging more often than every min_ping_interval without data gets a strike, and after
    # max_ping_strikes its connection is closed (GOAWAY); pings without a call under way count
    # too unless keepalive_permit_without_calls.
    max_message_bytes: int = 1024 * 1024
    # High on purpose: grpc-core refuses (REFUSED_STREAM, UNAVAILABLE) part of a burst beyond
    # the limit instead of queueing it in the client (bench/streams_limit.py).
    max_streams_per_connection: int = 10_000
    keepalive_min_ping_interval_ms: int = 10_000
    keepalive_max_ping_strikes: int = 2
    keepalive_permit_without_calls: bool = False
    # Prometheus /metrics (see metrics.py): port 0 is off; top-N keys of contention gauges.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    metrics_contention_top_n: int = 20
    # TLS (issue 13, docs/security.md "TLS"): the gRPC listener's certificate chain and key,
    # PEM files, both or neither (neither: plaintext); a client CA makes client certificates
    # required (mTLS). The metrics and payment-webhook listeners use the gRPC pair unless
    # given their own; a client CA is never inherited. SIGHUP re-reads every one of them.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    metrics_tls_cert: str = ""
    metrics_tls_key: str = ""
    metrics_tls_client_ca: str = ""
    payment_webhook_tls_cert: str = ""
    payment_webhook_tls_key: str = ""
    payment_webhook_tls_client_ca: str = ""
    shutdown_grace_seconds: float = 10.0
    # Per-SKU reserve timeout thresholds (issue 4): how long a Reserve may wait in this
    # process's queue before it is shed with RESERVE_TIMEOUT, unsent. A SKU's policy may set
    # its own; hot SKUs get the hot threshold.
    reserve_timeout_ms: int = 1000
    hot_reserve_timeout_ms: int = 300
    # ReserveStream flow control (issue 10): messages of one stream being reserved at once;
    # one more is answered RESOURCE_EXHAUSTED / STREAM_BACKPRESSURE, unsent.
    stream_max_outstanding: int = 256
    # WatchEvents (issue 12): how long an idle watch waits before reading the streams again,
    # and the most entries it reads from one partition's stream per read.
    watch_poll_interval_seconds: float = 0.1
    watch_batch_size: int = 200
    # Delivery to subscriptions (issue 12, docs/events.md "Pushing to a WMS"): every server
    # process runs a deliverer (off: none here); a lease per (subscription, partition) lasts
    # delivery_lease_seconds (renewed every third of it); an idle partition is read again
    # when a hint says it got events (delivery/wake.py), else after the poll interval (the
    # fallback); at most delivery_batch entries per read. Retention: events
    # every group has acknowledged are trimmed once older than event_retention_seconds,
    # checked every event_trim_interval_seconds (event_stream_maxlen stays the hard cap).
    delivery_enabled: bool = True
    delivery_lease_seconds: float = 5.0
    delivery_poll_interval_seconds: float = 0.5
    delivery_batch: int = 100
    # the deliverer's POST: "builtin" (wire.Connection, one keep-alive connection per owned
    # partition: about 2x less CPU per POST, bench/webhook_clients.py) or "aiohttp" (one
    # ClientSession per subscription)
    delivery_http_client: str = "builtin"
    event_retention_seconds: int = 7 * DAY
    event_trim_interval_seconds: float = 10.0
    # Subscription lag (issue 12, docs/events.md "Lag and alerts"): a backlog below
    # lag_warn_events is HEALTHY, at lag_alert_events or more ALERT, WARN between; a WMS whose
    # p99 response time is above slow_consumer_ms is flagged SLOW_CONSUMER.
    lag_warn_events: int = 50
    lag_alert_events: int = 150
    slow_consumer_ms: int = 800
    # A SKU is hot (automatically, unless its policy is pinned) while more than this many
    # units were committed over the trailing window, counted by the scripts on Redis's clock.
    hot_threshold_units: int = 500
    hot_window_seconds: int = DAY
    # How often each process re-reads stored policies and hot SKUs into its cache.
    policy_refresh_seconds: float = 5.0
    policy_cache_size: int = 100_000
    # Contention statistics: sliding window, its sub-window, the wait-p99 flag threshold,
    # keys tracked per sketch, how often each process publishes its snapshot to Redis, how
    # many keys per sketch a snapshot carries, and when a silent process's snapshot is dropped.
    contention_window_seconds: float = 60.0
    contention_slot_seconds: float = 5.0
    contention_flag_ms: float = 200.0
    contention_capacity: int = 1024
    contention_flush_seconds: float = 2.0
    contention_snapshot_keys: int = 256
    contention_stale_seconds: float = 600.0
    log_level: str = "INFO"
    # Payment sync (issue 5, docs/payments.md). The active channel polls payment-pending holds
    # on this schedule ("<seconds>x<count>,..."), then flags them for a person; one last poll
    # runs this margin before the hold's deadline. Each process looks for due polls every
    # interval, claims at most `batch` per script call and queries at most `concurrency`
    # providers at once.
    payment_poll_schedule: str = "30x5,120x10"
    payment_final_poll_margin_seconds: float = 10.0
    payment_poll_interval_seconds: float = 1.0
    payment_poll_batch: int = 100
    payment_poll_concurrency: int = 16
    # The WeChat Pay notification endpoint in every server process (HOST:PORT; "": off).
    payment_webhook_listen: str = ""
    payment_webhook_path: str = "/wechatpay/notify"
    # WeChat Pay API v3 (docs/wechatpay.md), used when wechatpay_mchid is set. The APIv3 key
    # comes from a file or from STOCKHOLD_WECHATPAY_API_V3_KEY (never printed).
    wechatpay_mchid: str = ""
    wechatpay_merchant_serial: str = ""
    wechatpay_merchant_key_path: str = ""
    wechatpay_platform_certificate_paths: tuple[str, ...] = ()
    wechatpay_platform_public_key_id: str = ""
    wechatpay_platform_public_key_path: str = ""
    wechatpay_api_v3_key_path: str = ""
    wechatpay_api_v3_key: str = field(default="", repr=False)
    wechatpay_base_url: str = "https://api.mch.weixin.qq.com"
    wechatpay_timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            rule = _RULES.get(f.name)
            value = getattr(self, f.name)
            if rule is not None and not (value is None and f.default is None):
                accepts, expected = rule
                if not accepts(value):
                    raise ConfigError(f.name, value, expected)
        self._check_together()

    def _check_together(self) -> None:
        """Rules that tie two settings together; each error names the one to change."""
        if self.default_hold_seconds > self.max_hold_seconds:
            raise ConfigError(
                "default_hold_seconds",
                self.default_hold_seconds,
                f"at most max_hold_seconds ({self.max_hold_seconds})",
            )
        if self.lag_warn_events >= self.lag_alert_events:
            raise ConfigError(
                "lag_warn_events",
                self.lag_warn_events,
                f"below lag_alert_events ({self.lag_alert_events})",
            )
        slots = round(self.contention_window_seconds / self.contention_slot_seconds)
        if slots < 1 or not math.isclose(
            slots * self.contention_slot_seconds, self.contention_window_seconds
        ):
            raise ConfigError(
                "contention_slot_seconds",
                self.contention_slot_seconds,
                f"a whole fraction of contention_window_seconds "
                f"({self.contention_window_seconds:g})",
            )
        if (
            self.redis_wait_replicas
            and self.redis_wait_timeout_ms >= self.redis_socket_timeout_seconds * 1000
        ):
            # WAIT blocks its connection: a longer one would break it as "Redis stuck".
            raise ConfigError(
                "redis_wait_timeout_ms",
                self.redis_wait_timeout_ms,
                f"below redis_socket_timeout_seconds "
                f"({self.redis_socket_timeout_seconds * 1000:g} ms)",
            )
        for listener in _TLS_LISTENERS:
            self._check_tls(listener)
        if (
            self.redis_cluster
            and self.redis_url is not None
            and not _cluster_url_ok(self.redis_url)
        ):
            raise ConfigError(
                "redis_url",
                self.redis_url,
                "a redis:// or rediss:// URL with db 0 (a cluster node: redis_cluster is on)",
            )

    def _check_tls(self, listener: str) -> None:
        """A listener's certificate and key: both or neither (or both inherited from the gRPC
        listener), the key readable by its owner only; a client CA only with a certificate."""
        prefix = f"{listener}_" if listener else ""
        cert, key = getattr(self, f"{prefix}tls_cert"), getattr(self, f"{prefix}tls_key")
        if bool(cert) != bool(key):
            missing, given = ("tls_key", "tls_cert") if cert else ("tls_cert", "tls_key")
            raise ConfigError(
                f"{prefix}{missing}", "", f"set together with {prefix}{given} (both or neither)"
            )
        if key:
            problem = private_file_problem(key)
            if problem:
                raise ConfigError(f"{prefix}tls_key", key, problem)
        if getattr(self, f"{prefix}tls_client_ca") and self.tls_files(listener) is None:
            raise ConfigError(
                f"{prefix}tls_client_ca",
                getattr(self, f"{prefix}tls_client_ca"),
                f"empty, or set with {prefix}tls_cert and {prefix}tls_key (no TLS, no mTLS)",
            )

    def tls_files(self, listener: str = "") -> TlsFiles | None:
        """The TLS files of a listener ("": gRPC, "metrics", "payment_webhook"); None when it
        serves plaintext. Metrics and the webhook take the gRPC certificate and key unless
        they have their own; their client CA is only their own."""
        prefix = f"{listener}_" if listener else ""
        cert, key = getattr(self, f"{prefix}tls_cert"), getattr(self, f"{prefix}tls_key")
        if not (cert or key) and listener:
            cert, key = self.tls_cert, self.tls_key
        if not (cert and key):
            return None
        return TlsFiles(cert, key, getattr(self, f"{prefix}tls_client_ca"))

    @property
    def sales_buckets(self) -> tuple[int, int]:
        """(bucket count, bucket length in ms) of the trailing sales window."""
        n = min(SALES_BUCKETS, self.hot_window_seconds)
        return n, self.hot_window_seconds * 1000 // n

    @property
    def payment_poll_steps_ms(self) -> tuple[int, ...]:
        """The poll schedule expanded: the wait before each poll, in ms."""
        return parse_poll_schedule(self.payment_poll_schedule)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from STOCKHOLD_<FIELD> variables, then apply non-None overrides.

        A string override is parsed as its environment variable would be (the CLI passes
        its flags' text), anything else is taken as is. ConfigError for the first setting
        refused.
        """
        env = os.environ if env is None else env
        unknown = set(overrides) - set(_FIELDS)
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            # A flag wins over the variable, which then is not even parsed.
            value = overrides.get(f.name)
            if value is None:
                value = env.get(f"STOCKHOLD_{f.name.upper()}") or None
            if value is not None:
                values[f.name] = _parse(f, value) if isinstance(value, str) else value
        return cls(**values)


# At most this many polls per payment: the schedule lives in every poll script call.
MAX_POLLS = 1000


def parse_poll_schedule(text: str) -> tuple[int, ...]:
    """`"30x5,120x10"` -> (30000,) * 5 + (120000,) * 10: the wait before each poll, in ms.

    A step is `<seconds>x<count>` or `<seconds>` (once); seconds may be fractional (at least
    1 ms). ValueError for anything else, or for no step or more than MAX_POLLS in all.
    """
    steps: list[int] = []
    for part in text.split(","):
        seconds, sep, count = part.strip().partition("x")
        try:
            ms, n = round(float(seconds) * 1000), int(count) if sep else 1
        except (ValueError, OverflowError):
            raise ValueError(f"payment_poll_schedule: bad step {part.strip()!r}") from None
        if ms < 1 or n < 1 or len(steps) + n > MAX_POLLS or ms > 30 * DAY * 1000:
            raise ValueError(
                f"payment_poll_schedule: step {part.strip()!r} out of range "
                f"(1 ms..30 days, 1..{MAX_POLLS} polls in all)"
            )
        steps += [ms] * n
    return tuple(steps)


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    """The text of an environment variable or flag as the field's type; ConfigError if not."""
    default = f.default if f.default is not dataclasses.MISSING else None
    kind = _KINDS.get(type(default))
    if kind is None:  # str, and the optional str (redis_url)
        return raw
    parse, expected = kind
    try:
        return parse(raw.strip())
    except ValueError:
        rule = _RULES.get(f.name)
        raise ConfigError(f.name, raw, rule[1] if rule else expected) from None


def _parse_bool(raw: str) -> bool:
    word = raw.lower()
    if word not in _TRUE | _FALSE:
        raise ValueError(raw)
    return word in _TRUE


def _parse_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _parse_tuple(raw: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in raw.split(",") if p.strip())


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
# Parsers by the type of a field's default (bool before int: bool is an int).
_KINDS: Final[Mapping[type, tuple[Callable[[str], Any], str]]] = {
    bool: (_parse_bool, "true or false (1/0, yes/no, on/off)"),
    int: (int, "an integer"),
    float: (_parse_float, "a number"),
    Path: (Path, "a path"),
    tuple: (_parse_tuple, "a comma-separated list"),
}


class TlsFiles(NamedTuple):
    """One listener's TLS files: certificate chain and key (PEM), and the CA its clients'
    certificates must chain to ("": client certificates are not asked for)."""

    cert: str
    key: str
    client_ca: str = ""


# The listeners that can serve TLS, as the prefix of their settings ("": gRPC).
_TLS_LISTENERS: Final = ("", "metrics", "payment_webhook")


def private_file_problem(path: str) -> str | None:
    """Why `path` cannot hold a secret (a private key, a password): it cannot be read, or
    its group or others may access it (the mode is named); None when it is fine."""
    try:
        with open(path, "rb"):
            pass
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as err:
        return f"a readable file ({err.strerror})"
    if mode & 0o077:
        return f"a file only its owner can access (its mode is {mode:04o}; chmod 600 {path})"
    return None


# -- what each setting accepts ------------------------------------------------------------------
class ConfigError(ValueError):
    """A setting stockhold cannot run with. str() is the one line an operator sees: the
    setting's flag (when it has one) and environment variable, its value (secrets masked)
    and what is expected."""

    def __init__(self, field: str, value: object, expected: str, flag: str | None = None) -> None:
        super().__init__(field, shown(field, value), expected)
        self.field = field
        self.value = shown(field, value)  # never the secret itself, not even here
        self.expected = expected
        self.flag = flag

    @property
    def env(self) -> str | None:
        """The setting's environment variable (None for a flag that is not a setting)."""
        return f"STOCKHOLD_{self.field.upper()}" if self.field in _FIELDS else None

    def __str__(self) -> str:
        if self.flag and self.env:
            name = f"{self.flag} (env {self.env})"
        else:
            name = self.flag or self.env or self.field
        return f"invalid {name} {self.value!r}: expected {self.expected}"


def shown(field: str, value: object) -> str:
    """A setting's value as messages may show it: URL passwords and secrets masked."""
    if value is None:
        return ""
    f = _FIELDS.get(field)
    if f is not None and not f.repr:  # repr=False marks a secret (the APIv3 key)
        return "<hidden>"
    text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return mask_url(text) if field == "redis_url" else text


def mask_url(url: str) -> str:
    """`url` with its password (in the authority or a `password=` parameter) as `***`.

    Plain text work, not a URL parser: a malformed URL (the very one an error shows) must
    not leak its password either, so all of the user part after its first colon goes.
    """
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, hostpart = rest.rpartition("@")
        if ":" in userinfo:
            userinfo = userinfo.partition(":")[0] + ":***"
        url = f"{scheme}://{userinfo}@{hostpart}"
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


_REDIS_URL: Final = (
    "a redis://[USER:PASSWORD@]HOST[:PORT][/DB], rediss://...[?ssl_ca_certs=PATH&ssl_certfile="
    "PATH&ssl_keyfile=PATH&ssl_cert_reqs=required|optional|none&ssl_check_hostname=true|false] "
    "or unix:///PATH URL"
)
_REDIS_TLS_PARAMS: Final = frozenset(
    {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
)
_REDIS_CERT_REQS: Final = ("required", "optional", "none")
# The words both clients read alike (redis-py's to_bool takes any other word as true).
_REDIS_BOOL: Final = ("true", "false", "yes", "no", "1", "0")


def _redis_url_ok(url: str) -> bool:
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0  # .port raises for a bad port
    except ValueError:
        return False
    query = parse_qs(parts.query)
    if not all(v.isdigit() for v in query.get("db", [])):
        return False
    # Both clients (redis-py and the hot client) understand exactly these; TLS ones on
    # rediss:// only.
    tls = set(query) & _REDIS_TLS_PARAMS
    if set(query) - _REDIS_TLS_PARAMS - {"db"} or (tls and parts.scheme != "rediss"):
        return False
    if not all(v.lower() in _REDIS_CERT_REQS for v in query.get("ssl_cert_reqs", [])):
        return False
    if not all(v.lower() in _REDIS_BOOL for v in query.get("ssl_check_hostname", [])):
        return False
    if parts.scheme in ("redis", "rediss"):
        db = parts.path.lstrip("/")
        return bool(parts.hostname) and port_ok and (db == "" or db.isdigit())
    return parts.scheme == "unix" and bool(parts.path) and not parts.netloc


_LISTEN: Final = "HOST:PORT with a port within 0..65535 (an IPv6 address in brackets: [::1]:PORT)"
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


def split_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPV6]:PORT` -> (host without brackets, port); ValueError if neither."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(listen)
    if host.startswith("[") and host.endswith("]"):
        ipaddress.IPv6Address(host[1:-1])  # ValueError if not one
        return host[1:-1], int(port)
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(listen)
    return host, int(port)


def _host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return bool(_HOSTNAME.fullmatch(host))
    return True


def _cluster_url_ok(url: str) -> bool:
    """A URL a cluster client can start from: redis:// or rediss://, db 0."""
    parts = urlsplit(url)
    dbs = [parts.path.lstrip("/") or "0", *parse_qs(parts.query).get("db", [])]
    return parts.scheme in ("redis", "rediss") and all(int(db) == 0 for db in dbs)


def _readable_or_empty(path: str) -> bool:
    return path == "" or (os.path.isfile(path) and os.access(path, os.R_OK))


def _listen_ok(listen: str) -> bool:
    try:
        split_listen(listen)
    except ValueError:
        return False
    return True


def _schedule_ok(text: str) -> bool:
    try:
        parse_poll_schedule(text)
    except ValueError:
        return False
    return True


def _http_url_ok(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


Rule: TypeAlias = tuple[Callable[[Any], bool], str]


def _within(lo: int, hi: int) -> Rule:
    return (lambda v: lo <= v <= hi), f"an integer within {lo}..{hi}"


def _at_least(lo: int) -> Rule:
    return (lambda v: v >= lo), f"an integer >= {lo}"


_POSITIVE: Final[Rule] = (lambda v: math.isfinite(v) and v > 0, "a number > 0 (seconds)")
_NOT_NEGATIVE: Final[Rule] = (lambda v: math.isfinite(v) and v >= 0, "a number >= 0 (seconds)")
_PORT: Final = _within(0, 65535)
_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# The one table of what each setting accepts (a type error is caught when parsing).
_RULES: Final[Mapping[str, Rule]] = {
    "listen": (_listen_ok, _LISTEN),
    "redis_url": (_redis_url_ok, _REDIS_URL),
    "key_prefix": (
        lambda v: bool(v) and not any(c in v for c in "{}: "),
        "a non-empty prefix without braces, colons or spaces",
    ),
    "partitions": _within(1, 16384),
    "default_hold_seconds": _at_least(1),
    "max_hold_seconds": _at_least(1),
    "event_stream_maxlen": _at_least(1),
    "record_retention_seconds": _at_least(1),
    "sweep_interval_seconds": _POSITIVE,
    "sweep_batch": _within(1, 500),
    "health_interval_seconds": _POSITIVE,
    "batch_max_orders": _at_least(1),
    "batch_max_inflight": _at_least(1),
    "redis_max_connections": _at_least(1),
    "redis_pool_timeout_seconds": _POSITIVE,
    "redis_connect_timeout_seconds": _POSITIVE,
    "redis_socket_timeout_seconds": _POSITIVE,
    "redis_wait_replicas": _within(0, 16),
    "redis_wait_timeout_ms": _within(1, 60_000),
    "recovery_window_seconds": _POSITIVE,
    "max_concurrent_rpcs": _at_least(1),
    "reflection": (lambda v: v in ("loopback", "on", "off"), "loopback, on or off"),
    "max_message_bytes": _within(1024, 2**31 - 1),
    "max_streams_per_connection": _within(1, 2**31 - 1),
    "keepalive_min_ping_interval_ms": _within(0, 86_400_000),
    "keepalive_max_ping_strikes": _within(0, 1000),
    "metrics_port": _PORT,
    "metrics_host": (_host_ok, "a host name or IP address"),
    "metrics_contention_top_n": _at_least(1),
    **{
        f"{prefix}tls_{part}": (_readable_or_empty, f"a readable PEM file (empty: {empty})")
        for prefix in ("", "metrics_", "payment_webhook_")
        for part, empty in (("cert", "no TLS"), ("key", "no TLS"), ("client_ca", "no mTLS"))
    },
    "shutdown_grace_seconds": _NOT_NEGATIVE,
    "watch_poll_interval_seconds": _POSITIVE,
    "watch_batch_size": _within(1, 10_000),
    "delivery_lease_seconds": (
        lambda v: math.isfinite(v) and 0.3 <= v <= 600,
        "a number of seconds within 0.3..600",
    ),
    "delivery_poll_interval_seconds": _POSITIVE,
    "delivery_batch": _within(1, 10_000),
    "delivery_http_client": (lambda v: v in ("builtin", "aiohttp"), "builtin or aiohttp"),
    "event_retention_seconds": _at_least(1),
    "event_trim_interval_seconds": _POSITIVE,
    "lag_warn_events": _at_least(1),
    "lag_alert_events": _at_least(2),
    "slow_consumer_ms": _within(1, 3_600_000),
    "reserve_timeout_ms": _within(1, 60_000),
    "hot_reserve_timeout_ms": _within(1, 60_000),
    "hot_threshold_units": _at_least(0),
    "hot_window_seconds": _within(1, 30 * DAY),
    "policy_refresh_seconds": _POSITIVE,
    "policy_cache_size": _at_least(1),
    "contention_window_seconds": _POSITIVE,
    "contention_slot_seconds": _POSITIVE,
    "contention_flag_ms": (
        lambda v: LOWEST_EDGE_US <= v * 1000 <= HIGHEST_EDGE_US,
        f"a number of ms within {LOWEST_EDGE_US / 1000:g}..{HIGHEST_EDGE_US // 1000}",
    ),
    "contention_capacity": _at_least(16),
    "contention_flush_seconds": _POSITIVE,
    "contention_snapshot_keys": _at_least(1),
    "contention_stale_seconds": _POSITIVE,
    "log_level": (lambda v: v.upper() in _LOG_LEVELS, "one of " + ", ".join(_LOG_LEVELS)),
    "payment_poll_schedule": (
        _schedule_ok,
        f"<seconds>x<count>,... (each wait 1 ms..30 days, at most {MAX_POLLS} polls in all)",
    ),
    "payment_final_poll_margin_seconds": _NOT_NEGATIVE,
    "payment_poll_interval_seconds": _POSITIVE,
    "payment_poll_batch": _within(1, 500),
    "payment_poll_concurrency": _at_least(1),
    "payment_webhook_listen": (lambda v: v == "" or _listen_ok(v), f"empty (off) or {_LISTEN}"),
    "payment_webhook_path": (lambda v: v.startswith("/"), "a path starting with /"),
    "wechatpay_base_url": (_http_url_ok, "an http(s)://HOST[:PORT] URL"),
    "wechatpay_timeout_seconds": _POSITIVE,
}
_FIELDS: Final[Mapping[str, dataclasses.Field[Any]]] = {
    f.name: f for f in dataclasses.fields(Settings)
}


def check_deployment(settings: Settings) -> None:
    """Rules for a server about to start (Settings built for a test or a tool may leave
    them open): --redis-cluster needs --redis-url, the embedded Redis being standalone only.
    ConfigError otherwise."""
    if settings.redis_cluster and settings.redis_url is None:
        raise ConfigError(
            "redis_cluster",
            True,
            "together with --redis-url redis://HOST:PORT of a cluster node "
            "(the embedded Redis is standalone only)",
            flag="--redis-cluster",
        )
    if settings.redis_password_file and settings.redis_url is None:
        raise ConfigError(
            "redis_password_file",
            settings.redis_password_file,
            "unset without --redis-url (the embedded Redis makes its own password)",
            flag="--redis-password-file",
        )
    if settings.redis_password_file and urlsplit(settings.redis_url or "").password is not None:
        raise ConfigError(
            "redis_password_file",
            settings.redis_password_file,
            "unset when --redis-url holds a password (give it in one place)",
            flag="--redis-password-file",
        )


def worker_count(raw: str | None, settings: Settings) -> int:
    """The `serve --workers` count: an integer >= 1, default the number of cores; with 2 or
    more the listen port must be fixed. ConfigError otherwise."""
    if raw is None:
        workers = os.cpu_count() or 1
    else:
        try:
            workers = int(raw)
        except ValueError:
            workers = 0
        if workers < 1:
            raise ConfigError("workers", raw, "an integer >= 1", flag="--workers")
    if workers > 1 and split_listen(settings.listen)[1] == 0:
        raise ConfigError(
            "listen",
            settings.listen,
            "a fixed port with --workers N (with port 0 each worker would pick its own)",
            flag="--listen",
        )
    return workers


__all__ = [
    "ConfigError",
    "Settings",
    "TlsFiles",
    "check_deployment",
    "mask_url",
    "private_file_problem",
    "split_listen",
    "worker_count",
]
