"""A local Redis Cluster for tests: redis-server --cluster-enabled yes on free 127.0.0.1 ports.

`RedisCluster(binary, workdir, masters=3, replicas=0).start()` starts the nodes (each a
RedisProc of tests/redis_proc.py, so the atexit reaper covers them), gives each master an
even share of the 16384 slots (CLUSTER ADDSLOTS), joins them (CLUSTER MEET), attaches
`replicas` replicas to each master (CLUSTER REPLICATE), and waits (bounded) until every node
agrees on the slot map and each replica's link is up. `stop()` tears it all down.

Fixtures (registered through conftest.py's pytest_plugins):

    redis_cluster        3 masters, no replicas, stopped after the test
    make_redis_cluster   factory: make_redis_cluster(masters=3, replicas=1) (failover tests)

Helpers for resharding tests: `owner_of(slot)`, `node_id(proc)`, `begin_migration(slot,
target)` (IMPORTING/MIGRATING), `finish_migration(slot, target)` (MIGRATE the keys, then
SETSLOT NODE everywhere), `key_in(proc)` (a key whose slot a master serves).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis_proc import RESERVED_PORTS, RedisProc

NODE_TIMEOUT_MS = 1000
FORM_TIMEOUT_S = 30.0
# Cluster nodes also listen on port + 10000 (the cluster bus); both must be free.
_BUS_OFFSET = 10000


def free_cluster_port() -> int:
    """A free port P on 127.0.0.1 whose bus port P + 10000 is free too (never 6379)."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port in RESERVED_PORTS or port + _BUS_OFFSET > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + _BUS_OFFSET))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _wait(check: Callable[[], bool], what: str, limit_s: float = FORM_TIMEOUT_S) -> None:
    """Poll `check` until true, bounded in time and count."""
    give_up = time.monotonic() + limit_s
    for _ in range(10_000):
        with contextlib.suppress(redis.exceptions.RedisError):
            if check():
                return
        if time.monotonic() > give_up:
            break
        time.sleep(0.05)
    raise RuntimeError(f"cluster: timed out waiting until {what}")


class RedisCluster:
    """`masters` masters with `replicas` replicas each, on free ports, in `workdir`."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
    ) -> None:
        if masters < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one master")
        self.binary = binary
        self.workdir = Path(workdir)
        self.n_masters = masters
        self.n_replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.masters: list[RedisProc] = []
        self.replicas: list[RedisProc] = []  # replicas[i * replicas + j]: of masters[i]
        self._ids: dict[int, str] = {}

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def nodes(self) -> list[RedisProc]:
        return self.masters + self.replicas

    def _node(self, index: int) -> RedisProc:
        workdir = self.workdir / f"node-{index}"
        return RedisProc(
            self.binary,
            workdir,
            port=free_cluster_port(),
            extra_args=[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(workdir / "nodes.conf"),
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--cluster-announce-ip",
                "127.0.0.1",
            ],
        )

    def _start_node(self, index: int) -> RedisProc:
        # The port pair was free a moment ago; someone may take it before Redis binds it.
        for attempt in range(3):
            proc = self._node(index)
            try:
                return proc.start()
            except RuntimeError as exc:
                if attempt == 2 or "in use" not in str(exc):
                    raise
        raise AssertionError("unreachable")

    def start(self) -> RedisCluster:
        """Start every node and form the cluster (bounded); stops what started on failure."""
        try:
            total = self.n_masters * (1 + self.n_replicas)
            procs = [self._start_node(i) for i in range(total)]
            self.masters = procs[: self.n_masters]
            self.replicas = procs[self.n_masters :]
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node (idempotent)."""
        for proc in self.nodes:
            with contextlib.suppress(Exception):
                proc.stop()

    def _form(self) -> None:
        for i, proc in enumerate(self.nodes):
            # Distinct config epochs, as redis-cli --cluster create sets them: no epoch
            # collision to resolve before the cluster agrees.
            proc.client().execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            self._ids[proc.port] = _text(proc.client().execute_command("CLUSTER", "MYID"))
        share = REDIS_CLUSTER_HASH_SLOTS // self.n_masters
        for i, proc in enumerate(self.masters):
            first = i * share
            last = REDIS_CLUSTER_HASH_SLOTS if i == self.n_masters - 1 else first + share
            proc.client().execute_command("CLUSTER", "ADDSLOTS", *range(first, last))
        seed = self.masters[0].client()
        for proc in self.nodes[1:]:
            seed.execute_command("CLUSTER", "MEET", "127.0.0.1", proc.port)
        total = len(self.nodes)
        _wait(
            lambda: all(self.info(p)["cluster_known_nodes"] == str(total) for p in self.nodes),
            "every node knows every other",
        )
        for i, master in enumerate(self.masters):
            for j in range(self.n_replicas):
                replica = self.replicas[i * self.n_replicas + j]
                replica.client().execute_command("CLUSTER", "REPLICATE", self.node_id(master))
        self.wait_stable()

    def wait_stable(self, limit_s: float = FORM_TIMEOUT_S) -> None:
        """Wait until every node says cluster_state:ok with the same slot map, and every
        replica's link to its master is up."""

        def agreed() -> bool:
            maps = {self._slot_map(p) for p in self.nodes}
            return all(self.info(p)["cluster_state"] == "ok" for p in self.nodes) and len(maps) == 1

        _wait(agreed, "every node agrees on the slot map", limit_s)
        for replica in self.replicas:
            _wait(
                lambda r=replica: r.info("replication").get("master_link_status") == "up",
                f"replica {replica.port} is in sync",
                limit_s,
            )

    # -- inspection ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """redis://127.0.0.1:PORT/0 of the first master (a seed for cluster clients)."""
        return self.masters[0].url

    def node_id(self, proc: RedisProc) -> str:
        """The node's cluster id."""
        if proc.port not in self._ids:
            self._ids[proc.port] = _text(proc.client().execute_command("CLUSTER", "MYID"))
        return self._ids[proc.port]

    @staticmethod
    def info(proc: RedisProc) -> dict[str, str]:
        """CLUSTER INFO of one node."""
        raw = _text(proc.client().execute_command("CLUSTER", "INFO"))
        return dict(line.split(":", 1) for line in raw.split() if ":" in line)

    @staticmethod
    def _slot_map(proc: RedisProc) -> tuple[tuple[int, int, int], ...]:
        reply = proc.client().execute_command("CLUSTER", "SLOTS")
        return tuple(sorted((int(e[0]), int(e[1]), int(e[2][1])) for e in reply))

    def replicas_of(self, master: RedisProc) -> list[RedisProc]:
        """The replicas started for `master` (as formed; a failover changes roles)."""
        i = self.masters.index(master)
        return self.replicas[i * self.n_replicas : (i + 1) * self.n_replicas]

    def owner_of(self, slot: int) -> RedisProc:
        """The master that serves `slot` (as the first master sees it)."""
        for start, end, port in self._slot_map(self.masters[0]):
            if start <= slot <= end:
                return next(p for p in self.nodes if p.port == port)
        raise LookupError(f"slot {slot} is not served")

    def key_in(self, proc: RedisProc, prefix: str = "key") -> str:
        """A key whose slot `proc` serves."""
        for i in range(100_000):
            key = f"{prefix}-{i}"
            if self.owner_of(key_slot(key.encode())) is proc:
                return key
        raise LookupError(f"no key found for node {proc.port}")

    # -- resharding ------------------------------------------------------------------------------
    def begin_migration(self, slot: int, target: RedisProc) -> RedisProc:
        """Mark `slot` IMPORTING on `target` and MIGRATING on its owner; returns the owner."""
        source = self.owner_of(slot)
        target.client().execute_command(
            "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source)
        )
        source.client().execute_command(
            "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target)
        )
        return source

    def finish_migration(self, slot: int, source: RedisProc, target: RedisProc) -> None:
        """MIGRATE every key of `slot` from `source` to `target`, then give `target` the slot
        (SETSLOT NODE on the target, the source, then every other master)."""
        src = source.client()
        for _ in range(10_000):
            keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                break
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        else:
            raise RuntimeError(f"slot {slot} still has keys on {source.port}")
        tid = self.node_id(target)
        others = [p for p in self.masters if p is not target and p is not source]
        for proc in [target, source, *others]:
            proc.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", tid)
        self.wait_stable()

    def migrate_slot(self, slot: int, target: RedisProc) -> None:
        """Move `slot` and its keys to `target` (the whole resharding of one slot)."""
        source = self.begin_migration(slot, target)
        self.finish_migration(slot, source, target)


@pytest.fixture
def make_redis_cluster(redis_binary: str, tmp_path: Path) -> Iterator[Callable[..., RedisCluster]]:
    """Factory of started clusters: make_redis_cluster(masters=3, replicas=0); all are
    stopped after the test."""
    started: list[RedisCluster] = []

    def make(masters: int = 3, replicas: int = 0, **kwargs: Any) -> RedisCluster:
        cluster = RedisCluster(
            redis_binary, tmp_path / f"cluster-{len(started)}", masters, replicas, **kwargs
        )
        started.append(cluster)
        return cluster.start()

    try:
        yield make
    finally:
        for cluster in started:
            cluster.stop()


@pytest.fixture
def redis_cluster(make_redis_cluster: Callable[..., RedisCluster]) -> RedisCluster:
    """A started 3-master cluster, stopped after the test."""
    return make_redis_cluster()
