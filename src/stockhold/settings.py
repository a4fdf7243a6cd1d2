"""Settings: one dataclass, filled from STOCKHOLD_* environment variables and CLI flags."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stockhold.constants import DEFAULT_KEY_PREFIX, DEFAULT_PARTITIONS

DAY = 86_400


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
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not 1 <= self.partitions <= 16384:
            raise ValueError("partitions must be within 1..16384")
        if not 1 <= self.default_hold_seconds <= self.max_hold_seconds:
            raise ValueError("default_hold_seconds must be within 1..max_hold_seconds")
        if not 1 <= self.sweep_batch <= 500:
            raise ValueError("sweep_batch must be within 1..500")
        if not self.key_prefix or any(c in self.key_prefix for c in "{}: "):
            raise ValueError("key_prefix must be non-empty without braces, colons or spaces")

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
