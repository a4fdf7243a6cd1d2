"""The Lua scripts, loaded and registered in one place.

Each operation is one `.lua` file beginning with its KEYS/ARGV header; `_prelude.lua` (shared
helpers) is prepended to each. redis-py `Script` objects run EVALSHA and reload on NOSCRIPT, so
a flushed script cache or a restarted Redis never surfaces as an error.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

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
)


@cache
def source(name: str) -> str:
    """The full source of one operation script, prelude included."""
    files = resources.files(__name__)
    prelude = (files / "_prelude.lua").read_text(encoding="utf-8")
    return prelude + (files / f"{name}.lua").read_text(encoding="utf-8")


class Scripts:
    """One registered Script object per operation, bound to a client."""

    def __init__(self, client: Redis) -> None:
        self.reserve: AsyncScript = client.register_script(source("reserve"))
        self.transition: AsyncScript = client.register_script(source("transition"))
        self.adjust: AsyncScript = client.register_script(source("adjust"))
        self.expire: AsyncScript = client.register_script(source("expire"))
        self.extend: AsyncScript = client.register_script(source("extend"))
        self.get: AsyncScript = client.register_script(source("get"))
        self.health: AsyncScript = client.register_script(source("health"))
        self.policy_set: AsyncScript = client.register_script(source("policy_set"))
        self.policy_get: AsyncScript = client.register_script(source("policy_get"))
        self.payment_mark: AsyncScript = client.register_script(source("payment_mark"))
        self.payment_poll: AsyncScript = client.register_script(source("payment_poll"))
