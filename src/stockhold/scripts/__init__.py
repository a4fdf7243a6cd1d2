"""The Lua scripts, built and registered in one place.

Each operation is one `.lua` file beginning with its KEYS/ARGV header. Its full source is three
parts: the configuration preamble rendered from Settings (`config_lua`), `_prelude.lua` (shared
helpers) and the operation itself. The configuration is part of the source, so a script never
decodes a constant header on each call, and a change of configuration is a new script (a new
SHA). A call says which configuration it was built for (`config_id`, ARGV[1] of reserve.lua and
transition.lua), and a script built from another one refuses it (STOCKHOLD_CONFIG) rather than
run with the wrong maxlen, priorities or windows.

redis-py `Script` objects run EVALSHA and reload on NOSCRIPT, so a flushed script cache or a
restarted Redis never surfaces as an error.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from stockhold.settings import Settings

OPERATIONS = (
    "reserve",
    "transition",
    "adjust",
    "expire",
    "extend",
    "get",
    "health",
    "policy_set",
    "policy_get",
    "payment_mark",
    "payment_poll",
    "finish",
    "abort",
    "claim",
    "count",
    "group",
    # delivery (issue 12, stockhold.delivery): leases, reads, FLOW failures, retention
    "lease",
    "consume",
    "fail",
    "trim",
)


def policy_window(settings: Settings) -> dict[str, int]:
    """The trailing sales window as the scripts take it: {"thr": hot threshold (units),
    "bms": bucket length (ms), "nb": buckets}."""
    nb, bms = settings.sales_buckets
    return {"thr": settings.hot_threshold_units, "bms": bms, "nb": nb}


def poll_schedule(settings: Settings) -> dict[str, Any]:
    """The payment poll schedule as the scripts take it: {"steps": [ms, ...], "margin": ms,
    "ttl": ms (lifetime of an out_trade_no map)}."""
    return {
        "steps": list(settings.payment_poll_steps_ms),
        "margin": round(settings.payment_final_poll_margin_seconds * 1000),
        # The out_trade_no map outlives the longest hold plus the record's retention.
        "ttl": (settings.max_hold_seconds + settings.record_retention_seconds) * 1000,
    }


def _lua_str(text: str) -> str:
    """A Lua string literal of `text`: printable ASCII as is, every other byte (and the quote
    and backslash) as a three-digit decimal escape, which Lua 5.1 reads unambiguously."""
    out = ['"']
    for b in text.encode():
        out.append(chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\{b:03d}")
    out.append('"')
    return "".join(out)


def _lua_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _lua_str(value)
    if isinstance(value, (list, tuple)):
        return "{" + ", ".join(_lua_value(v) for v in value) + "}"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"[{_lua_value(k)}] = {_lua_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"no Lua literal for {value!r}")


@cache
def _config_body(settings: Settings) -> str:
    # Strings where a script passes the value to Redis as is (Redis would format a Lua number
    # with printf), numbers where it computes with them.
    pay = poll_schedule(settings)
    values: list[tuple[str, str, Any]] = [
        ("CFG_MAXLEN", "event stream MAXLEN ~ (text)", str(settings.event_stream_maxlen)),
        (
            "CFG_PRIORITY",
            "warehouse -> rank (1 first); unlisted warehouses come after every listed one",
            {wh: i for i, wh in enumerate(settings.warehouse_priority, 1)},
        ),
        ("CFG_DHOLD", "default hold (s)", settings.default_hold_seconds),
        ("CFG_DHOLD_S", "the same as text", str(settings.default_hold_seconds)),
        ("CFG_POL", "trailing sales window (see policy_window)", policy_window(settings)),
        (
            "CFG_RETENTION_S",
            "finished record lifetime (ms, text)",
            str(settings.record_retention_seconds * 1000),
        ),
        (
            "CFG_RECOVER_MS",
            "Redis Cluster: a half-done cross-slot step is recovered after this long (ms)",
            round(settings.recovery_window_seconds * 1000),
        ),
    ]
    body = "".join(f"local {name} = {_lua_value(v)}  -- {what}\n" for name, what, v in values)
    # A function: the schedule's table is built only on the calls that start polling.
    return body + f"local function CFG_PAY() return {_lua_value(pay)} end  -- see poll_schedule\n"


def config_id(settings: Settings) -> str:
    """The id of the configuration the scripts were built from (see the module docstring)."""
    return hashlib.blake2b(_config_body(settings).encode(), digest_size=8).hexdigest()


def config_lua(settings: Settings) -> str:
    """The configuration preamble of every script: Lua locals rendered from `settings`."""
    return (
        "-- Configuration, rendered from Settings by stockhold.scripts.config_lua (part of the\n"
        "-- script's source: a new configuration is a new script).\n"
        f"local CONFIG_ID = {_lua_str(config_id(settings))}\n" + _config_body(settings)
    )


@cache
def _read(name: str) -> str:
    return (resources.files(__name__) / name).read_text(encoding="utf-8")


# A top-level definition of the prelude or the configuration: `local NAME` or
# `local function NAME`.
_DEFINITION = re.compile(r"^local (?:function )?([A-Za-z_]\w*)", re.M)
_NAME = re.compile(r"[A-Za-z_]\w*")


def _blocks(text: str) -> list[tuple[str, str]]:
    """`text` cut at each top-level definition (with the comment lines right above it):
    (name defined or "", block text); the text before the first one has no name."""
    lines = text.splitlines(keepends=True)
    starts: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        m = _DEFINITION.match(line)
        if m:
            j = i
            while j > 0 and lines[j - 1].startswith("--"):
                j -= 1
            starts.append((j, m.group(1)))
    out = [("", "".join(lines[: starts[0][0]] if starts else lines))]
    for k, (j, name) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(lines)
        out.append((name, "".join(lines[j:end])))
    return out


def _used(library: str, operation: str) -> str:
    """The blocks of `library` that `operation` uses, directly or through other blocks, in
    their order. Every top-level `local` of a chunk is made anew on each call (a closure, a
    table), so a script carries only what it needs. A name merely mentioned (in a comment)
    brings its block along: harmless."""
    blocks = _blocks(library)
    need = set(_NAME.findall(operation))
    grew = True
    while grew:
        grew = False
        for name, text in blocks:
            if name in need:
                more = set(_NAME.findall(text)) - need
                if more:
                    need |= more
                    grew = True
    return "".join(text for name, text in blocks if not name or name in need)


@cache
def source(name: str, settings: Settings | None = None) -> str:
    """The full source of one operation script: the configuration preamble (from `settings`,
    the defaults when None) and the prelude, each cut to what the operation uses, then the
    operation."""
    operation = _read(f"{name}.lua")
    library = config_lua(settings or Settings()) + _read("_prelude.lua")
    return _used(library, operation) + operation


class Scripts:
    """One registered Script object per operation, bound to a client and a configuration."""

    def __init__(self, client: Redis, settings: Settings | None = None) -> None:
        def register(name: str) -> AsyncScript:
            return client.register_script(source(name, settings))

        self.reserve: AsyncScript = register("reserve")
        self.transition: AsyncScript = register("transition")
        self.adjust: AsyncScript = register("adjust")
        self.expire: AsyncScript = register("expire")
        self.extend: AsyncScript = register("extend")
        self.get: AsyncScript = register("get")
        self.health: AsyncScript = register("health")
        self.policy_set: AsyncScript = register("policy_set")
        self.policy_get: AsyncScript = register("policy_get")
        self.payment_mark: AsyncScript = register("payment_mark")
        self.payment_poll: AsyncScript = register("payment_poll")
        self.finish: AsyncScript = register("finish")
        self.abort: AsyncScript = register("abort")
        self.claim: AsyncScript = register("claim")
        self.count: AsyncScript = register("count")
        self.group: AsyncScript = register("group")
        self.lease: AsyncScript = register("lease")
        self.consume: AsyncScript = register("consume")
        self.fail: AsyncScript = register("fail")
        self.trim: AsyncScript = register("trim")
