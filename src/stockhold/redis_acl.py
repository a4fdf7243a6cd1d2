"""The minimal Redis ACL of a stockhold user (docs/security.md "Redis"): the one place it is
written; the docs show `setuser_line()` and tests/test_redis_security.py runs the main flows
as a user made with exactly it (standalone and Redis Cluster) and finds no refusal in ACL LOG.

Every command a stockhold server, `stockhold snapshot` and `stockhold reconcile` send, or
their Lua scripts call (Redis checks those too), and nothing else: keys and pub/sub channels
under the key prefix only. `stockhold migrate-layout` (a one-off of an operator) is not
covered: run it as an administrator (it also RENAMEs and SCANs by type).
"""

from __future__ import annotations

from typing import Final

from stockhold.constants import DEFAULT_KEY_PREFIX

# By what needs them (a command may serve several); subcommands as Redis ACLs write them.
COMMANDS: Final[tuple[str, ...]] = (
    # script calls: the hot path, the sweeper, the deliverer, the layout check (EVAL)
    "evalsha",
    "eval",
    "script|load",
    # what the Lua scripts call
    "del",
    "exists",
    "get",
    "set",
    "persist",
    "pexpire",
    "time",
    "hdel",
    "hget",
    "hgetall",
    "hincrby",
    "hmget",
    "hset",
    "sadd",
    "sismember",
    "zadd",
    "zcard",
    "zrange",
    "zrangebyscore",
    "zrem",
    "zremrangebyscore",
    "zscore",
    "xack",
    "xadd",
    "xautoclaim",
    "xgroup|create",
    "xgroup|delconsumer",
    "xgroup|destroy",
    "xgroup|setid",
    "xinfo|consumers",
    "xinfo|groups",
    "xinfo|stream",
    "xlen",
    "xpending",
    "xrange",
    "xrevrange",
    "xreadgroup",
    "xtrim",
    # plain commands off the hot path (reads, policy pages, contention snapshots,
    # subscriptions, replication acknowledgements, reconcile's SCAN)
    "hsetnx",
    "hvals",
    "smembers",
    "srem",
    "zrangebylex",
    "wait",
    "scan",
    # connections: the hot client's name, the deliverer's wake-up hints
    "client|setname",
    "ping",
    "publish",
    "subscribe",
    "unsubscribe",
    # Redis Cluster: the topology (both clients), redis-py's command table and READONLY on
    # each connection, the hot client's ASK redirections
    "cluster|slots",
    "command",
    "readonly",
    "asking",
)


def acl_rules(prefix: str = DEFAULT_KEY_PREFIX) -> list[str]:
    """The ACL rules of a stockhold user for key prefix `prefix`, in ACL SETUSER order."""
    return ["-@all", *(f"+{c}" for c in COMMANDS), f"~{prefix}:*", f"&{prefix}:*"]


def setuser_line(
    user: str = "stockhold", password: str = "<PASSWORD>", prefix: str = DEFAULT_KEY_PREFIX
) -> str:
    """The `ACL SETUSER` command (as redis-cli takes it) that makes `user`."""
    return " ".join(["ACL SETUSER", user, "reset", "on", f">{password}", *acl_rules(prefix)])


__all__ = ["COMMANDS", "acl_rules", "setuser_line"]
