"""Issue 11 plumbing: the cluster and WAIT settings, `store.calls.connect` on a local Redis
Cluster, the cluster clients' failures as a client sees them, and `--redis-wait-replicas`
(WAIT pipelined after every writing script call) on one node and on a cluster, through the
hot-path client and through redis-py.

Whether WAIT was sent, and where, is read from the nodes (INFO commandstats `cmdstat_wait`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions as rex
from redis.asyncio import Redis
from redis.asyncio import RedisCluster as PyCluster
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis_cluster import RedisCluster
from redis_proc import RedisProc, free_port

from stockhold import cli
from stockhold.errors import DomainError, Reason
from stockhold.settings import ConfigError, Settings, check_deployment
from stockhold.store.calls import ScriptCalls, backend_error, connect
from stockhold.store.cluster import ClusterHotClient
from stockhold.store.hotclient import HotClient, ReplicationError

# A writing script (idempotent: SET) and what it answers.
WRITE = "redis.call('SET', KEYS[1], ARGV[1]) return ARGV[1]"
# Generous: the box is shared and slow; a WAIT that cannot be satisfied blocks this long.
WAIT_MS = 300
TIMEOUTS: dict[str, Any] = {
    "redis_connect_timeout_seconds": 5.0,
    "redis_socket_timeout_seconds": 5.0,
    "redis_wait_timeout_ms": WAIT_MS,
}


def waits(proc: RedisProc) -> int:
    """WAIT commands a node has run (INFO commandstats)."""
    entry = proc.info("commandstats").get("cmdstat_wait")
    return int(entry["calls"]) if isinstance(entry, dict) else 0


def replica_get(replica: RedisProc, key: str) -> Any:
    """GET on a cluster replica (READONLY first: else it answers MOVED)."""
    c = replica.client(single_connection_client=True)
    c.execute_command("READONLY")
    return c.get(key)


def wait_online(master: RedisProc, key: str = "probe") -> None:
    """Until a write to `key` on `master` is acknowledged by its replica (bounded): a replica
    just synced may not acknowledge anything for about a second."""
    probe = master.client(single_connection_client=True)
    for _ in range(60):
        probe.set(key, 1)
        if int(probe.execute_command("WAIT", 1, 500)) >= 1:
            return
    raise RuntimeError(f"the replica of {master} acknowledges nothing")


def calls_for(url: str, **settings: Any) -> ScriptCalls:
    """ScriptCalls on new clients for `url`, built the way the engine builds them."""
    s = Settings(**{**TIMEOUTS, **settings})
    client, hot = connect(url, s)
    return ScriptCalls(client, s, hot)


def script(calls: ScriptCalls, source: str = WRITE) -> AsyncScript:
    return calls.client.register_script(source)


# -- settings and the command line ---------------------------------------------------------------
def test_cluster_and_wait_settings_come_from_the_environment() -> None:
    s = Settings.from_env(
        {
            "STOCKHOLD_REDIS_CLUSTER": "1",
            "STOCKHOLD_REDIS_WAIT_REPLICAS": "2",
            "STOCKHOLD_REDIS_WAIT_TIMEOUT_MS": "150",
            "STOCKHOLD_RECOVERY_WINDOW_SECONDS": "2.5",
        }
    )
    assert (s.redis_cluster, s.redis_wait_replicas) == (True, 2)
    assert (s.redis_wait_timeout_ms, s.recovery_window_seconds) == (150, 2.5)
    d = Settings()
    assert (d.redis_cluster, d.redis_wait_replicas, d.recovery_window_seconds) == (False, 0, 5.0)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"redis_wait_replicas": -1}, "redis_wait_replicas"),
        ({"redis_wait_replicas": 17}, "redis_wait_replicas"),
        ({"redis_wait_timeout_ms": 0}, "redis_wait_timeout_ms"),
        ({"recovery_window_seconds": 0.0}, "recovery_window_seconds"),
        ({"recovery_window_seconds": float("nan")}, "recovery_window_seconds"),
        # WAIT holds its pipelined connection: it must give up before the socket timeout.
        ({"redis_wait_replicas": 1, "redis_wait_timeout_ms": 800}, "redis_wait_timeout_ms"),
        ({"redis_cluster": True, "redis_url": "unix:///tmp/r.sock"}, "redis_url"),
        ({"redis_cluster": True, "redis_url": "redis://127.0.0.1:7000/3"}, "redis_url"),
        ({"redis_cluster": True, "redis_url": "redis://127.0.0.1:7000?db=1"}, "redis_url"),
    ],
)
def test_a_cluster_or_wait_setting_stockhold_cannot_run_with_is_refused(
    values: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as err:
        Settings(**values)
    assert err.value.field == field


def test_settings_for_a_cluster_and_for_wait_that_work() -> None:
    Settings(redis_cluster=True, redis_url="redis://127.0.0.1:7000")
    Settings(redis_cluster=True, redis_url="rediss://u:p@node.example:7000/0")
    # The socket timeout bounds WAIT only when WAIT is on.
    Settings(redis_socket_timeout_seconds=0.1)
    Settings(redis_wait_replicas=1, redis_wait_timeout_ms=100, redis_socket_timeout_seconds=0.2)


def test_redis_cluster_without_a_url_is_refused_before_serving() -> None:
    check_deployment(Settings(redis_cluster=True, redis_url="redis://127.0.0.1:7000"))
    check_deployment(Settings())
    with pytest.raises(ConfigError) as err:
        check_deployment(Settings(redis_cluster=True))
    assert "--redis-url" in str(err.value)


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["--redis-cluster"], {}, "--redis-cluster (env STOCKHOLD_REDIS_CLUSTER)"),
        ([], {"STOCKHOLD_REDIS_CLUSTER": "1"}, "--redis-url"),
        (["--redis-wait-replicas", "x"], {}, "--redis-wait-replicas"),
        (["--recovery-window-seconds", "-1"], {}, "--recovery-window-seconds"),
    ],
)
def test_serve_names_the_fix_in_one_line_and_exits_2(
    argv: list[str],
    env: dict[str, str],
    says: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.delenv("STOCKHOLD_REDIS_URL", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = cli.main(["serve", "--data-dir", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("stockhold: ")
    assert says in err


def test_redis_cluster_is_a_switch_passed_on_to_workers() -> None:
    args = cli.parser().parse_args(["serve", "--redis-cluster", "--redis-url", "redis://h:1"])
    assert args.redis_cluster == "1"
    assert cli.parser().parse_args(["serve"]).redis_cluster is None
    assert "--redis-cluster" in {flag for flag, _, _ in cli._WORKER_FLAGS}


# -- error mapping -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "exc",
    [
        rex.ClusterDownError("The cluster is down"),
        rex.MasterDownError(
            "Link with MASTER is down and replica-serve-stale-data is set to 'no'."
        ),
        rex.SlotNotCoveredError('Slot "12" is not covered by the cluster.'),
        rex.ClusterError("TTL exhausted."),
        rex.MaxConnectionsError(),
        rex.ConnectionError("Error 111 connecting to 127.0.0.1:7000. Connection refused."),
        rex.TimeoutError("Timeout reading from 127.0.0.1:7000"),
        rex.RedisClusterException(
            "Redis Cluster cannot be connected. Please provide at least one reachable node: x"
        ),
        rex.RedisClusterException("All slots are not covered after query all startup_nodes."),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_cluster_that_cannot_serve_now_is_unavailable(exc: Exception) -> None:
    err = backend_error(exc)
    assert err.reason is Reason.BACKEND_UNAVAILABLE


@pytest.mark.parametrize(
    "exc",
    [
        rex.ClusterCrossSlotError("Keys in request don't hash to the same slot"),
        rex.RedisClusterException("EVALSHA - all keys must map to the same key slot"),
        rex.CrossSlotTransactionError("All keys involved in a cluster transaction must map"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_cross_slot_call_is_a_bug_internal_and_logged(
    exc: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="stockhold.store.calls"):
        err = backend_error(exc)
    assert err.reason is Reason.INTERNAL
    assert caplog.records


def test_a_write_without_its_replica_acks_is_unavailable_with_its_cause() -> None:
    err = backend_error(ReplicationError(0, 2))
    assert err.reason is Reason.BACKEND_UNAVAILABLE
    assert err.metadata == {"cause": "replication", "acked": "0", "wanted": "2"}


# -- connect on a cluster ------------------------------------------------------------------------
@pytest.fixture
def cluster3(make_redis_cluster: Callable[..., RedisCluster]) -> RedisCluster:
    return make_redis_cluster(masters=3)


async def test_connect_gives_cluster_clients_that_run_scripts_and_cross_slot_pipelines(
    cluster3: RedisCluster,
) -> None:
    keys = [cluster3.key_in(m, "plumb") for m in cluster3.masters]
    assert len({key_slot(k.encode()) for k in keys}) == 3
    for hot in (True, False):
        calls = calls_for(cluster3.url, redis_cluster=True, redis_hot_client=hot)
        try:
            assert isinstance(calls.client, PyCluster)
            assert isinstance(calls.hot, ClusterHotClient) if hot else calls.hot is None
            write = script(calls)
            for k in keys:
                assert await calls.call_script(write, [k], [f"v-{hot}"]) == f"v-{hot}".encode()
            assert await calls.call_script(calls.scripts.health, (), ()) > 0
            # Keys of three slots (and TIME) in one non-transactional redis-py pipeline.
            async with calls.client.pipeline(transaction=False) as pipe:
                pipe.execute_command("TIME")
                for k in keys:
                    pipe.get(k)
                    pipe.hgetall(k + "-h")
                    pipe.zrange(k + "-z", 0, 0, withscores=True)
                    pipe.set(k + "-s", 1)
                replies = await calls.run(pipe.execute())
            assert replies[1::4] == [f"v-{hot}".encode()] * 3
            assert replies[2::4] == [{}] * 3 and replies[3::4] == [[]] * 3
            got = await calls.hmget_many([k + "-h" for k in keys] + ["none"], ("f",))
            assert got == [[None]] * 4
            now_ms = await calls.redis_time_ms()
            seconds, micros = await calls.run(calls.client.time())
            assert abs(int(seconds) * 1000 + int(micros) // 1000 - now_ms) < 60_000
            # Keys of two slots in one call: a bug of ours, never retried as UNAVAILABLE.
            with pytest.raises(DomainError) as err:
                await calls.call_script(write, [keys[0], keys[1]], ["x"])
            assert err.value.reason is Reason.INTERNAL
        finally:
            await calls.aclose()
    for master, k in zip(cluster3.masters, keys, strict=True):
        assert master.client().get(k) == b"v-False"


async def test_hmget_many_on_a_cluster_reads_each_slot_in_order(cluster3: RedisCluster) -> None:
    keys = [cluster3.key_in(m, f"h{i}") for i in range(2) for m in cluster3.masters]
    for i, k in enumerate(keys):
        cluster3.owner_of(key_slot(k.encode())).client().hset(k, mapping={"a": i, "b": -i})
    for hot in (True, False):
        calls = calls_for(cluster3.url, redis_cluster=True, redis_hot_client=hot)
        try:
            got = await calls.hmget_many(keys, ("b", "a"))
        finally:
            await calls.aclose()
        assert got == [[str(-i).encode(), str(i).encode()] for i in range(len(keys))]


@pytest.mark.parametrize("hot", [True, False], ids=["hot", "redis-py"])
async def test_a_cluster_that_cannot_be_reached_is_unavailable(hot: bool) -> None:
    url = f"redis://127.0.0.1:{free_port()}"
    calls = calls_for(
        url, redis_cluster=True, redis_hot_client=hot, redis_connect_timeout_seconds=0.5
    )
    try:
        with pytest.raises(DomainError) as err:
            await calls.call_script(script(calls), ["k"], ["v"])
        assert err.value.reason is Reason.BACKEND_UNAVAILABLE
        with pytest.raises(DomainError) as err:
            await calls.run(calls.client.get("k"))
        assert err.value.reason is Reason.BACKEND_UNAVAILABLE
    finally:
        await calls.aclose()


# -- WAIT on one node ----------------------------------------------------------------------------
class Replicated:
    """A master and one replica (standalone), the replica stoppable."""

    def __init__(self, binary: str, workdir: Path) -> None:
        # No 5 s wait for more replicas before the first full sync.
        self.master = RedisProc(
            binary, workdir / "master", extra_args=["--repl-diskless-sync-delay", "0"]
        ).start()
        self.replica = RedisProc(
            binary,
            workdir / "replica",
            extra_args=["--replicaof", "127.0.0.1", str(self.master.port)],
        ).start()
        wait_online(self.master)

    def stop(self) -> None:
        self.replica.stop()
        self.master.stop()


@pytest.fixture
def replicated(redis_binary: str, tmp_path: Path) -> Iterator[Replicated]:
    pair = Replicated(redis_binary, tmp_path)
    try:
        yield pair
    finally:
        pair.stop()


@pytest.mark.parametrize("hot", [True, False], ids=["hot", "redis-py"])
async def test_a_write_waits_for_its_replica_and_fails_retryably_without_it(
    replicated: Replicated, hot: bool
) -> None:
    master, replica = replicated.master, replicated.replica
    calls = calls_for(master.url, redis_hot_client=hot, redis_wait_replicas=1)
    try:
        write = script(calls)
        # The first call meets NOSCRIPT: loaded, called again, acknowledged.
        assert await calls.call_script(write, ["order-1"], ["held"]) == b"held"
        assert replica.client().get("order-1") == b"held"
        # Acknowledged: the replica has it, and one WAIT went with the one write.
        before = waits(master)
        assert await calls.call_script(write, ["order-2"], ["held"]) == b"held"
        assert replica.client().get("order-2") == b"held"
        assert waits(master) == before + 1
        # A script that only reads sends no WAIT.
        await calls.call_script(calls.scripts.health, (), ())
        assert waits(master) == before + 1
        # The script cache flushed: loaded again, and still acknowledged.
        master.client().script_flush()
        assert await calls.call_script(write, ["order-2b"], ["held"]) == b"held"
        assert replica.client().get("order-2b") == b"held"

        replica.stop()
        started = time.monotonic()
        with pytest.raises(DomainError) as err:
            await calls.call_script(write, ["order-3"], ["held"])
        assert time.monotonic() - started < 5.0  # about the WAIT timeout, not more
        assert err.value.reason is Reason.BACKEND_UNAVAILABLE
        assert err.value.metadata == {"cause": "replication", "acked": "0", "wanted": "1"}
        # Written but not acknowledged: a retry with the same ids changes nothing more.
        assert master.client().get("order-3") == b"held"
        # Reads need no replica.
        await calls.call_script(calls.scripts.health, (), ())
    finally:
        await calls.aclose()


@pytest.mark.parametrize("hot", [True, False], ids=["hot", "redis-py"])
async def test_no_wait_is_sent_when_no_replica_is_asked_for(
    redis_proc: RedisProc, hot: bool
) -> None:
    calls = calls_for(redis_proc.url, redis_hot_client=hot)
    try:
        write = script(calls)
        for i in range(5):
            await calls.call_script(write, [f"k{i}"], ["v"])
        assert calls._def(write).wait == b""
    finally:
        await calls.aclose()
    assert waits(redis_proc) == 0
    assert int(redis_proc.info("commandstats")["cmdstat_evalsha"]["calls"]) >= 5


# -- WAIT on a cluster ---------------------------------------------------------------------------
@pytest.fixture
def replicated_cluster(make_redis_cluster: Callable[..., RedisCluster]) -> RedisCluster:
    """Two masters, one replica each, online for WAIT."""
    cluster = make_redis_cluster(masters=2, replicas=1)
    for master in cluster.masters:
        wait_online(master, cluster.key_in(master, "probe"))
    return cluster


async def test_on_a_cluster_wait_goes_to_the_node_that_ran_the_script(
    replicated_cluster: RedisCluster,
) -> None:
    cluster = replicated_cluster
    first, second = cluster.masters
    key = cluster.key_in(first, "order")
    slot = key_slot(key.encode())
    for hot in (True, False):
        one = calls_for(
            cluster.url, redis_cluster=True, redis_hot_client=hot, redis_wait_replicas=1
        )
        two = calls_for(
            cluster.url, redis_cluster=True, redis_hot_client=hot, redis_wait_replicas=2
        )
        try:
            owner = cluster.owner_of(slot)
            (replica,) = cluster.replicas_of(owner)
            write = script(one)
            # The first call may meet NOSCRIPT (loaded, called again); then one WAIT a write.
            assert await one.call_script(write, [key], [f"a-{hot}"]) == f"a-{hot}".encode()
            before = waits(owner)
            assert await one.call_script(write, [key], [f"b-{hot}"]) == f"b-{hot}".encode()
            assert waits(owner) == before + 1
            assert replica_get(replica, key) == f"b-{hot}".encode()
            # Two replicas asked of a master that has one.
            with pytest.raises(DomainError) as err:
                await two.call_script(script(two), [key], [f"x-{hot}"])
            assert err.value.reason is Reason.BACKEND_UNAVAILABLE
            assert err.value.metadata == {"cause": "replication", "acked": "1", "wanted": "2"}

            # The slot moves: MOVED is followed (and NOSCRIPT on the new owner), and WAIT
            # runs where the script finally ran.
            target = second if owner is first else first
            (target_replica,) = cluster.replicas_of(target)
            cluster.migrate_slot(slot, target)
            before = waits(target)
            assert await one.call_script(write, [key], [f"c-{hot}"]) == f"c-{hot}".encode()
            assert waits(target) > before
            assert replica_get(target_replica, key) == f"c-{hot}".encode()
            before, before_owner = waits(target), waits(owner)
            assert await one.call_script(write, [key], [f"d-{hot}"]) == f"d-{hot}".encode()
            assert (waits(target), waits(owner)) == (before + 1, before_owner)
            # Back where it was, for the next round.
            cluster.migrate_slot(slot, owner)
        finally:
            await one.aclose()
            await two.aclose()


async def test_standalone_clients_stay_what_they_were(redis_proc: RedisProc) -> None:
    calls = calls_for(redis_proc.url)
    try:
        assert type(calls.client) is Redis
        assert type(calls.hot) is HotClient
        assert await calls.redis_time_ms() > 0
    finally:
        await calls.aclose()
    s = Settings(redis_hot_client=False)
    client, hot = connect(redis_proc.url, s)
    assert hot is None
    await client.aclose()


def test_read_only_scripts_are_registered_scripts() -> None:
    from stockhold.scripts import OPERATIONS
    from stockhold.store.calls import READ_ONLY

    assert set(OPERATIONS) >= READ_ONLY


async def test_every_registered_script_waits_unless_it_only_reads(redis_proc: RedisProc) -> None:
    calls = calls_for(redis_proc.url, redis_wait_replicas=1)
    try:
        from stockhold.scripts import OPERATIONS
        from stockhold.store.calls import READ_ONLY

        for name in OPERATIONS:
            d = calls._def(getattr(calls.scripts, name))
            assert d.name == name
            assert (d.replicas, bool(d.wait)) == ((0, False) if name in READ_ONLY else (1, True))
    finally:
        await calls.aclose()
