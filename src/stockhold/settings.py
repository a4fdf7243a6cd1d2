"""Settings: one dataclass, filled from STOCKHOLD_* environment variables and CLI flags."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stockhold.constants import DEFAULT_KEY_PREFIX, DEFAULT_PARTITIONS

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
    # Explicit admission limit: beyond it calls get RESOURCE_EXHAUSTED, never a bare CANCELLED.
    max_concurrent_rpcs: int = 20_000
    # Prometheus /metrics (see metrics.py): port 0 is off; top-N keys of contention gauges.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    metrics_contention_top_n: int = 20
    shutdown_grace_seconds: float = 10.0
    # Per-SKU reserve timeout thresholds (issue 4): how long a Reserve may wait in this
    # process's queue before it is shed with RESERVE_TIMEOUT, unsent. A SKU's policy may set
    # its own; hot SKUs get the hot threshold.
    # Script calls through the hot-path client (store/hotclient.py); off: through redis-py.
    redis_hot_client: bool = True
    reserve_timeout_ms: int = 1000
    hot_reserve_timeout_ms: int = 300
    # ReserveStream flow control (issue 10): messages of one stream being reserved at once;
    # one more is answered RESOURCE_EXHAUSTED / STREAM_BACKPRESSURE, unsent.
    stream_max_outstanding: int = 256
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
        if not 1 <= self.partitions <= 16384:
            raise ValueError("partitions must be within 1..16384")
        if not 1 <= self.default_hold_seconds <= self.max_hold_seconds:
            raise ValueError("default_hold_seconds must be within 1..max_hold_seconds")
        if not 1 <= self.sweep_batch <= 500:
            raise ValueError("sweep_batch must be within 1..500")
        for name in ("reserve_timeout_ms", "hot_reserve_timeout_ms"):
            if not 1 <= getattr(self, name) <= 60_000:
                raise ValueError(f"{name} must be within 1..60000")
        if self.hot_threshold_units < 0:
            raise ValueError("hot_threshold_units must not be negative")
        if not 1 <= self.hot_window_seconds <= 30 * DAY:
            raise ValueError(f"hot_window_seconds must be within 1..{30 * DAY}")
        if self.contention_capacity < 16 or self.contention_snapshot_keys < 1:
            raise ValueError("contention_capacity must be >= 16, contention_snapshot_keys >= 1")
        if not self.key_prefix or any(c in self.key_prefix for c in "{}: "):
            raise ValueError("key_prefix must be non-empty without braces, colons or spaces")
        parse_poll_schedule(self.payment_poll_schedule)
        if self.payment_final_poll_margin_seconds < 0 or self.payment_poll_interval_seconds <= 0:
            raise ValueError("payment poll margin must be >= 0 and its interval > 0")
        if not 1 <= self.payment_poll_batch <= 500 or self.payment_poll_concurrency < 1:
            raise ValueError("payment_poll_batch must be within 1..500, concurrency >= 1")

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
        """Build settings from STOCKHOLD_<FIELD> variables, then apply non-None overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"STOCKHOLD_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
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
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.name == "redis_url":
        return raw
    if isinstance(default, bool):
        return raw.lower() in {"1", "true", "yes", "on"}
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, Path):
        return Path(raw)
    if isinstance(default, tuple):
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    return raw


__all__ = ["Settings"]
