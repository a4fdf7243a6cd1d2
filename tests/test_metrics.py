"""Prometheus metrics: RPC durations by method and code, shed counts, contention gauges."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis_proc import free_port
from stockhold_fixtures import Factory, add_stock, expect_error, line
from test_workers import LISTEN, _children, _sockets_on, _wait_serving, serve_workers

from stockhold import metrics
from stockhold.settings import Settings
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

Sample = tuple[str, tuple[tuple[str, str], ...]]


def scrape(port: int) -> dict[Sample, float]:
    """Every sample of http://127.0.0.1:<port>/metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def rpc_counts(samples: dict[Sample, float]) -> Counter[tuple[str, str]]:
    """(method, code) -> stockhold_rpc_duration_seconds_count."""
    out: Counter[tuple[str, str]] = Counter()
    for (name, labels), value in samples.items():
        if name == "stockhold_rpc_duration_seconds_count":
            d = dict(labels)
            out[d["method"], d["code"]] = int(value)
    return out


def delta(after: Counter[tuple[str, str]], before: Counter[tuple[str, str]]) -> dict[Any, int]:
    """What changed, leaving out the scrapes' own GetContentionStats / GetSubscriptionLag calls."""
    diff = after.copy()
    diff.subtract(before)
    scrapes = ("GetContentionStats", "GetSubscriptionLag")
    return {k: v for k, v in diff.items() if v and k[0] not in scrapes}


async def test_rpc_durations_count_every_call_by_method_and_code(
    make_stockhold: Factory,
) -> None:
    port = free_port()
    running = await make_stockhold(metrics_port=port)
    before = rpc_counts(await asyncio.to_thread(scrape, port))
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        for _ in range(3):
            await add_stock(stub, "MUG", "wh-1", 5)
        for i in range(2):
            await stub.Reserve(pb.ReserveRequest(order_id=f"o-{i}", lines=[line("MUG", 1)]))
        err = await expect_error(
            stub.Reserve(pb.ReserveRequest(order_id="too-many", lines=[line("MUG", 99)]))
        )
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION
        err = await expect_error(
            stub.Reserve(pb.ReserveRequest(order_id="zero", lines=[line("MUG", 0)]))
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        for i in range(4):
            err = await expect_error(stub.Commit(pb.CommitRequest(order_id=f"unknown-{i}")))
            assert err.code == grpc.StatusCode.NOT_FOUND
        await stub.Commit(pb.CommitRequest(order_id="o-0"))
        await stub.GetReservation(pb.GetReservationRequest(order_id="o-1"))
    samples = await asyncio.to_thread(scrape, port)
    assert delta(rpc_counts(samples), before) == {
        ("AdjustStock", "OK"): 3,
        ("Reserve", "OK"): 2,
        ("Reserve", "FAILED_PRECONDITION"): 1,
        ("Reserve", "INVALID_ARGUMENT"): 1,
        ("Commit", "NOT_FOUND"): 4,
        ("Commit", "OK"): 1,
        ("GetReservation", "OK"): 1,
    }
    # The histogram is consistent: its +Inf bucket is its count, and the times are real.
    labels = (("code", "NOT_FOUND"), ("method", "Commit"))
    inf = ("stockhold_rpc_duration_seconds_bucket", (*labels[:1], ("le", "+Inf"), labels[1]))
    assert samples[inf] == samples["stockhold_rpc_duration_seconds_count", labels]
    assert 0 < samples["stockhold_rpc_duration_seconds_sum", labels] < 10
    # Both shed series exist from the start; the process's own metrics are there too.
    assert ("stockhold_reserve_shed_total", (("hot", "true"),)) in samples
    assert ("stockhold_reserve_shed_total", (("hot", "false"),)) in samples
    assert any(name.startswith("python_gc_") for name, _ in samples)


async def test_a_deadline_and_a_cancel_are_counted_with_the_code_the_client_saw(
    make_stockhold: Factory,
) -> None:
    port = free_port()
    running = await make_stockhold(metrics_port=port, redis_socket_timeout_seconds=5.0)
    before = rpc_counts(await asyncio.to_thread(scrape, port))
    admin = running.redis.client()
    # Redis asleep: the handlers below are still waiting when grpc cancels them.
    sleeper = threading.Thread(target=admin.execute_command, args=("DEBUG", "SLEEP", "1.5"))
    request = pb.GetAvailabilityRequest(units=[pb.SalesUnit(sku="MUG")])
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await stub.GetAvailability(request)  # connected before Redis sleeps
        sleeper.start()
        await asyncio.sleep(0.1)
        err = await expect_error(stub.GetAvailability(request, timeout=0.3))
        assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
        call = stub.GetAvailability(request)
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.to_thread(sleeper.join)
        expected = {
            ("GetAvailability", "OK"): 1,
            ("GetAvailability", "DEADLINE_EXCEEDED"): 1,
            ("GetAvailability", "CANCELLED"): 1,
        }
        seen: dict[Any, int] = {}
        for _ in range(50):  # the server records its side a moment after the client's
            seen = delta(rpc_counts(await asyncio.to_thread(scrape, port)), before)
            if seen == expected:
                break
            await asyncio.sleep(0.1)
        assert seen == expected


async def test_contention_gauges_show_the_top_keys_of_the_server(make_stockhold: Factory) -> None:
    port = free_port()
    running = await make_stockhold(metrics_port=port)
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "HOT", "wh-1", 1000, spec="red")
        await add_stock(stub, "COLD", "wh-1", 1000)
        await asyncio.gather(
            *(
                stub.Reserve(
                    pb.ReserveRequest(order_id=f"h-{i}", lines=[line("HOT", 1, spec="red")])
                )
                for i in range(30)
            )
        )
        await stub.Reserve(pb.ReserveRequest(order_id="c-0", lines=[line("COLD", 1)]))
    samples = await asyncio.to_thread(scrape, port)
    assert samples["stockhold_contention_up", ()] == 1
    assert samples["stockhold_contention_processes", ()] == 1
    requests = {
        dict(labels)["sku"]: value
        for (name, labels), value in samples.items()
        if name == "stockhold_contention_requests"
    }
    assert requests == {"HOT": 30, "COLD": 1}
    flagged = [n for n, _ in samples if n == "stockhold_contention_flagged"]
    assert len(flagged) == 2
    for name in ("wait_p99_seconds", "wait_mean_seconds", "timeouts", "insufficient"):
        assert sum(n == f"stockhold_contention_{name}" for n, _ in samples) == 2, name


def test_contention_collector_never_breaks_a_scrape_when_the_server_is_away() -> None:
    collector = metrics.ContentionCollector(f"127.0.0.1:{free_port()}", timeout=0.5)
    try:
        families = list(collector.collect())
    finally:
        collector.close()
    assert [(f.name, [s.value for s in f.samples]) for f in families] == [
        ("stockhold_contention_up", [0])
    ]


def test_contention_collector_exports_at_most_top_n_keys() -> None:
    reply = pb.GetContentionStatsResponse(
        keys=[
            pb.KeyContention(key=f"K{i}", unit=pb.SalesUnit(sku=f"K{i}"), requests=i)
            for i in range(5)
        ],
        processes=1,
    )

    class Answering(metrics.ContentionCollector):
        def _stub(self) -> Any:
            class Stub:
                def GetContentionStats(
                    self, request: Any, timeout: float, metadata: Any = None
                ) -> Any:
                    assert request.top_n == 3
                    return reply

            return Stub()

    families = {f.name: f for f in Answering("unused", top_n=3).collect()}
    assert [s.labels["key"] for s in families["stockhold_contention_requests"].samples] == [
        "K0",
        "K1",
        "K2",
    ]


def test_record_shed_counts_by_hot_flag() -> None:
    from prometheus_client import REGISTRY

    metrics.enable()

    def value(hot: str) -> float:
        return REGISTRY.get_sample_value("stockhold_reserve_shed_total", {"hot": hot}) or 0.0

    hot, cold = value("true"), value("false")
    metrics.record_shed(True)
    metrics.record_shed(True)
    metrics.record_shed(False)
    assert (value("true") - hot, value("false") - cold) == (2, 1)


def test_importing_metrics_loads_no_prometheus_client_and_shed_is_a_no_op_until_enabled() -> None:
    code = (
        "import sys; from stockhold import metrics; metrics.record_shed(True); "
        "assert 'prometheus_client' not in sys.modules, 'imported'"
    )
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()


def test_no_interceptor_when_metrics_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    assert metrics.server_interceptors(Settings()) == []
    assert len(metrics.server_interceptors(Settings(metrics_port=9))) == 1
    monkeypatch.setenv(metrics.MULTIPROC_ENV, "/somewhere")
    assert len(metrics.server_interceptors(Settings())) == 1  # a worker of a supervisor


@pytest.mark.parametrize(
    ("listen", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("0.0.0.0:50051", "127.0.0.1:50051"),
        ("[::]:7000", "127.0.0.1:7000"),
        ("localhost:1", "127.0.0.1:1"),
        ("10.1.2.3:5", "10.1.2.3:5"),
        ("[::1]:5", "[::1]:5"),
    ],
)
def test_the_collector_reaches_the_server_on_this_host(listen: str, target: str) -> None:
    assert metrics.local_target(listen) == target


# -- several worker processes -------------------------------------------------------------------


@pytest.fixture
def metrics_workers(redis_proc: Any, tmp_path: Path) -> Any:
    metrics_port = free_port()
    log_path = tmp_path / "serve.log"
    saved = os.environ.pop(metrics.MULTIPROC_ENV, None)
    try:
        extra = ["--metrics-port", str(metrics_port)]
        with serve_workers(redis_proc.url, log_path, extra=extra) as (proc, port):
            yield proc, port, metrics_port, log_path
    finally:
        if saved is not None:
            os.environ[metrics.MULTIPROC_ENV] = saved


def test_the_supervisor_serves_the_sum_of_both_workers(metrics_workers: Any) -> None:
    proc, port, metrics_port, log_path = metrics_workers
    workers = _children(proc.pid)
    assert len(workers) == 2
    # Only the supervisor listens on the metrics port.
    assert _sockets_on(proc.pid, metrics_port, LISTEN) == 1
    assert all(_sockets_on(pid, metrics_port, LISTEN) == 0 for pid in workers)
    before = rpc_counts(scrape(metrics_port))
    # A local subchannel pool per channel: each its own connection, spread over the workers.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(24)]
    try:
        for i, ch in enumerate(channels):
            stub = pb_grpc.InventoryStub(ch)
            stub.GetAvailability(
                pb.GetAvailabilityRequest(units=[pb.SalesUnit(sku=f"s{i}")]), timeout=5
            )
            with pytest.raises(grpc.RpcError) as info:
                stub.Commit(pb.CommitRequest(order_id=f"unknown-{i}"), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        per_worker = {pid: _sockets_on(pid, port) for pid in workers}
        assert all(n > 0 for n in per_worker.values()), per_worker
    finally:
        for ch in channels:
            ch.close()
    assert delta(rpc_counts(scrape(metrics_port)), before) == {
        ("GetAvailability", "OK"): 24,
        ("Commit", "NOT_FOUND"): 24,
    }
    # The contention gauges are the deployment's: both workers' snapshots merged.
    processes = 0.0
    for _ in range(100):
        samples = scrape(metrics_port)
        assert samples["stockhold_contention_up", ()] == 1
        processes = samples["stockhold_contention_processes", ()]
        if processes == 2:
            break
        time.sleep(0.1)
    assert processes == 2
    # Each worker recorded into the supervisor's directory, which is gone after the stop.
    found = re.search(rb'"metrics_dir":"([^"]+)"', log_path.read_bytes())
    assert found, log_path.read_text()
    metrics_dir = Path(found.group(1).decode())
    assert {f"histogram_{pid}.db" for pid in workers} <= {p.name for p in metrics_dir.iterdir()}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not metrics_dir.exists()


def test_a_dead_workers_counts_stay_in_the_sum(metrics_workers: Any) -> None:
    proc, port, metrics_port, _ = metrics_workers
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        for i in range(5):
            pb_grpc.InventoryStub(ch).GetAvailability(
                pb.GetAvailabilityRequest(units=[pb.SalesUnit(sku=f"s{i}")]), timeout=5
            )
    total = rpc_counts(scrape(metrics_port))["GetAvailability", "OK"]
    assert total >= 5  # plus the readiness probes of the fixture
    before = _children(proc.pid)
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = _children(proc.pid)
        if len(after) == 2 and not set(after) & set(before):
            break
        time.sleep(0.1)
    _wait_serving(f"127.0.0.1:{port}")
    # Counters never go back: the dead workers' files stay in the sum.
    assert rpc_counts(scrape(metrics_port))["GetAvailability", "OK"] >= total + 1
