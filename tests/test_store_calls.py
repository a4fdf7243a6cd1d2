"""The script-call layer's error mapping, fed the replies Redis really sends."""

from __future__ import annotations

from typing import Any

import pytest
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stockhold.errors import Reason
from stockhold.store.calls import backend_error

# Error replies as Redis sends them, and what a client must see.
REPLIES = [
    ("READONLY You can't write against a read only replica.", Reason.BACKEND_UNAVAILABLE),
    ("TRYAGAIN Multiple keys request during rehashing of slot", Reason.BACKEND_UNAVAILABLE),
    ("CLUSTERDOWN The cluster is down", Reason.BACKEND_UNAVAILABLE),
    ("MASTERDOWN Link with MASTER is down", Reason.BACKEND_UNAVAILABLE),
    ("LOADING Redis is loading the dataset in memory", Reason.BACKEND_UNAVAILABLE),
    ("BUSY Redis is busy running a script.", Reason.BACKEND_UNAVAILABLE),
    ("NOREPLICAS Not enough good replicas to write.", Reason.BACKEND_UNAVAILABLE),
    ("OOM command not allowed when used memory > 'maxmemory'.", Reason.BACKEND_UNAVAILABLE),
    ("ERR Error running script (call to f_x): user_script:1: oops", Reason.INTERNAL),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", Reason.INTERNAL),
]


@pytest.mark.parametrize(("reply", "reason"), REPLIES, ids=[r.split()[0] for r, _ in REPLIES])
def test_an_error_reply_maps_to_what_a_client_must_see(reply: str, reason: Reason) -> None:
    exc = BaseParser.parse_error(reply)  # the class redis-py (and the hot client) raise
    assert backend_error(exc).reason is reason


@pytest.mark.parametrize("exc", [RedisConnectionError("gone"), RedisTimeoutError("stuck")])
def test_a_broken_or_stuck_connection_is_unavailable(exc: Any) -> None:
    err = backend_error(exc)
    assert err.reason is Reason.BACKEND_UNAVAILABLE
    assert err.metadata["cause"] == type(exc).__name__
