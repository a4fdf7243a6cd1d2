"""Locust load test for stockhold: checkout traffic over gRPC.

Each simulated buyer places an order (1-5 lines over a pool of sales units), then pays
(commit, ~70 %), cancels (release, ~20 %) or abandons it (~10 %, left to expire); buyers
also read availability. Every Locust user opens its own connection, so several server
processes (`stockhold serve --workers N`) share the load.

    locust -f loadtest/locustfile.py --headless -u 50 -r 50 -t 30s --host 127.0.0.1:50051

Settings (environment): LOADTEST_UNITS (10000), LOADTEST_STOCK (per unit and warehouse,
1000000), LOADTEST_LOAD_STOCK (1: stock the units at test start), LOADTEST_MAX_FAIL_RATIO
(0.0002 = 0.02 %), LOADTEST_MAX_P99_MS (100). At exit the run fails (exit code 1) when the
failure ratio or the p99 response time is above its bound.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, between, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

# grpc must cooperate with gevent (Locust's concurrency), not block it.
grpc_gevent.init_gevent()

UNITS = int(os.environ.get("LOADTEST_UNITS", "10000"))
STOCK = int(os.environ.get("LOADTEST_STOCK", "1000000"))
WAREHOUSES = ("wh-1", "wh-2")
MAX_FAIL_RATIO = float(os.environ.get("LOADTEST_MAX_FAIL_RATIO", "0.0002"))
MAX_P99_MS = float(os.environ.get("LOADTEST_MAX_P99_MS", "100"))


def sales_unit(i: int) -> pb.SalesUnit:
    """The i-th sales unit of the test catalogue."""
    return pb.SalesUnit(sku=f"LT-{i // 4:05d}", spec=f"size-{i % 4}", barcode=f"69{i:011d}")


class RequestEvents(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Report every unary call to Locust: name, time, size, and the gRPC error if any."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        start = time.perf_counter()
        exception: BaseException | None = None
        length = 0
        call = continuation(details, request)
        try:
            length = call.result().ByteSize()
        except grpc.RpcError as err:
            exception = err
        self.environment.events.request.fire(
            request_type="grpc",
            name=details.method.rsplit("/", 1)[-1],
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            response=None,
            context=None,
            exception=exception,
        )
        return call


class Buyer(User):
    """A checkout client: one gRPC connection per user."""

    wait_time = between(0.0, 0.01)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        # A local subchannel pool gives this user its own TCP connection.
        channel = grpc.insecure_channel(
            self.host or "127.0.0.1:50051", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.channel = grpc.intercept_channel(channel, RequestEvents(environment))
        self.stub = pb_grpc.InventoryStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    @task(10)
    def order(self) -> None:
        """Reserve 1-5 lines, then pay (70 %), cancel (20 %) or abandon (10 %)."""
        order_id = f"lt-{uuid.uuid4()}"
        units = random.sample(range(UNITS), random.randint(1, 5))
        lines = [pb.ReserveLine(unit=sales_unit(u), quantity=random.randint(1, 3)) for u in units]
        try:
            self.stub.Reserve(
                pb.ReserveRequest(order_id=order_id, lines=lines, hold_seconds=600), timeout=5
            )
        except grpc.RpcError:
            return  # already reported as a failure
        fate = random.random()
        try:
            if fate < 0.7:
                self.stub.Commit(pb.CommitRequest(order_id=order_id, payment_ref="lt"), timeout=5)
            elif fate < 0.9:
                self.stub.Release(pb.ReleaseRequest(order_id=order_id, reason="lt"), timeout=5)
        except grpc.RpcError:
            return

    @task(2)
    def availability(self) -> None:
        """Read the stock of a few units, as a product page does."""
        units = [sales_unit(u) for u in random.sample(range(UNITS), 3)]
        try:
            self.stub.GetAvailability(pb.GetAvailabilityRequest(units=units), timeout=5)
        except grpc.RpcError:
            return


@events.test_start.add_listener
def load_stock(environment: Environment, **_: Any) -> None:
    """Stock every unit in every warehouse once (idempotent ids), from the master only."""
    if isinstance(environment.runner, WorkerRunner) or os.environ.get("LOADTEST_LOAD_STOCK") == "0":
        return
    with grpc.insecure_channel(environment.host or "127.0.0.1:50051") as channel:
        stub = pb_grpc.InventoryStub(channel)
        futures = []
        for i in range(UNITS):
            for wh in WAREHOUSES:
                request = pb.AdjustStockRequest(
                    adjustment_id=f"lt-stock-{i}-{wh}-{STOCK}",
                    unit=sales_unit(i),
                    warehouse=wh,
                    delta=STOCK,
                    reason="loadtest",
                )
                futures.append(stub.AdjustStock.future(request, timeout=30))
            if len(futures) >= 500:
                for f in futures:
                    f.result()
                futures.clear()
        for f in futures:
            f.result()


@events.quitting.add_listener
def enforce_bounds(environment: Environment, **_: Any) -> None:
    """Fail the run when failures or the p99 response time pass their bounds."""
    total = environment.stats.total
    p99 = total.get_response_time_percentile(0.99) or 0.0
    ratio = total.fail_ratio
    print(
        f"loadtest: {total.num_requests} requests, {total.num_failures} failures "
        f"({ratio:.4%}), {total.total_rps:.0f} req/s, p50 {total.median_response_time:.0f} ms, "
        f"p99 {p99:.0f} ms (bounds: failures <= {MAX_FAIL_RATIO:.2%}, p99 <= {MAX_P99_MS:.0f} ms)"
    )
    if total.num_requests == 0 or ratio > MAX_FAIL_RATIO or p99 > MAX_P99_MS:
        environment.process_exit_code = 1
