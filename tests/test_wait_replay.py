"""With --redis-wait-replicas, a retried call answered from what is stored is acknowledged only
once the original write is on the replica (issue 11, docs/cluster.md "Failover").

WAIT counts the offset of the calling connection's last write. A retry that finds its order
already held writes nothing; if WAIT then used an older offset, a retry on another connection
would be acknowledged at once while the original write is still only on the master: an OK
that a failover could lose. Redis (6.2 and 7.0, tried by hand with redis-cli) sets that offset
on every script call, writing or not, so stockhold needs nothing more than its WAIT after
each script call; this test pins that down: the replica is paused (connected, acknowledging
nothing) while the first Reserve is written, and retries from a new client are refused until
the replica has it.
"""

from __future__ import annotations

import os
import signal

import pytest
from test_cluster_plumbing import Replicated, replicated  # noqa: F401 (fixture)

from stockhold.engine import Engine
from stockhold.errors import DomainError, Reason
from stockhold.settings import Settings

pytestmark = pytest.mark.asyncio


def engine_on(url: str) -> Engine:
    settings = Settings(
        redis_url=url, partitions=8, redis_wait_replicas=1, redis_wait_timeout_ms=300
    )
    return Engine.connect(url, settings)


async def test_a_retry_answered_from_storage_waits_for_the_original_write(
    replicated: Replicated,  # noqa: F811 (the fixture imported above)
) -> None:
    master, replica = replicated.master, replicated.replica
    first, retry = engine_on(master.url), engine_on(master.url)
    try:
        unit = first.resolver.unit("wait-sku", "", "")
        await first.adjust("stock-1", unit, "east", 10, "", actor="test")
        order = first.resolver.resolve_order("o-wait", [("wait-sku", "", "", "east", 2)], 0, 3600)
        assert replica.pid is not None
        os.kill(replica.pid, signal.SIGSTOP)  # connected, acknowledging nothing
        with pytest.raises(DomainError) as err:
            await first.reserve(order, actor="test")
        assert err.value.reason is Reason.BACKEND_UNAVAILABLE
        assert err.value.metadata["cause"] == "replication"
        # Written on the master only. A retry on other connections finds it held ...
        with pytest.raises(DomainError) as err:
            await retry.reserve(order, actor="test")
        # ... and is not acknowledged either: its WAIT covers the original write.
        assert err.value.metadata["cause"] == "replication"
        os.kill(replica.pid, signal.SIGCONT)
        reservation, replayed = await retry.reserve(order, actor="test")
        assert replayed and reservation.state.name == "HELD"
        assert replica.client().hget(order.keys.order_key, "st") == b"H"
        # The same for a Commit retried after its first answer was not acknowledged.
        os.kill(replica.pid, signal.SIGSTOP)
        with pytest.raises(DomainError) as err:
            await first.commit("o-wait", "tx-1", actor="test")
        assert err.value.metadata["cause"] == "replication"
        with pytest.raises(DomainError) as err:
            # committed already: answered from storage
            await retry.commit("o-wait", "tx-1", actor="test")
        assert err.value.metadata["cause"] == "replication"
        os.kill(replica.pid, signal.SIGCONT)
        committed = await retry.commit("o-wait", "tx-1", actor="test")
        assert committed.state.name == "COMMITTED"
        assert replica.client().hget(order.keys.order_key, "st") == b"C"
    finally:
        if replica.pid is not None:
            os.kill(replica.pid, signal.SIGCONT)
        await first.close()
        await retry.close()
