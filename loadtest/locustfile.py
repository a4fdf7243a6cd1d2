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

Call shapes (issue 10): LOADTEST_SHAPES, a comma-separated choice of `unary` (the buyer
above, the default), `batch` and `stream`. Batch buyers reserve LOADTEST_BATCH_ORDERS (16)
orders per ReserveBatch call; stream buyers keep one ReserveStream open each and send
LOADTEST_STREAM_WINDOW (16) orders at a time. Both only reserve (holds of 2 minutes, left to
expire); each order is reported on its own ("ReserveBatch order", "ReserveStream"), so the
rows count orders per second and a refused order counts as a failure.

    LOADTEST_SHAPES=stream,batch locust -f loadtest/locustfile.py --headless -u 20 -r 20 \
        -t 30s --host 127.0.0.1:50051
"""

from __future__ import annotations

import itertools
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from gevent.event import Event
from gevent.queue import Queue
from google.rpc import status_pb2
from locust import User, between, events, task
from locust.env import Environment
from locust.exception import StopUser
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
SHAPES = {s.strip() for s in os.environ.get("LOADTEST_SHAPES", "unary").split(",")}
BATCH_ORDERS = int(os.environ.get("LOADTEST_BATCH_ORDERS", "16"))
STREAM_WINDOW = int(os.environ.get("LOADTEST_STREAM_WINDOW", "16"))


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


def random_order(hold_seconds: int) -> pb.ReserveRequest:
    """A new order of 1-5 lines of 1-3 units over the catalogue."""
    units = random.sample(range(UNITS), random.randint(1, 5))
    lines = [pb.ReserveLine(unit=sales_unit(u), quantity=random.randint(1, 3)) for u in units]
    return pb.ReserveRequest(order_id=f"lt-{uuid.uuid4()}", lines=lines, hold_seconds=hold_seconds)


CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def report_order(
    environment: Environment, name: str, seconds: float, error: status_pb2.Status | Exception | None
) -> None:
    """One order's answer as a Locust request: its own row, a refusal as a failure."""
    if isinstance(error, status_pb2.Status):
        error = RuntimeError(f"{CODE_NAMES.get(error.code, error.code)}: {error.message}")
    environment.events.request.fire(
        request_type="grpc",
        name=name,
        response_time=seconds * 1000,
        response_length=0,
        response=None,
        context=None,
        exception=error,
    )


def reporting_stub(environment: Environment, host: str | None) -> tuple[Any, Any]:
    """(channel, Inventory stub) of a user: its own connection, every unary call reported."""
    # A local subchannel pool gives this user its own TCP connection.
    channel = grpc.insecure_channel(
        host or "127.0.0.1:50051", options=[("grpc.use_local_subchannel_pool", 1)]
    )
    channel = grpc.intercept_channel(channel, RequestEvents(environment))
    return channel, pb_grpc.InventoryStub(channel)


class InventoryUser(User):
    """A client of stockhold on its own gRPC connection (unary calls reported)."""

    abstract = True
    wait_time = between(0.0, 0.01)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.channel, self.stub = reporting_stub(environment, self.host)

    def on_stop(self) -> None:
        self.channel.close()


class Buyer(InventoryUser):
    """A checkout client: one gRPC connection per user."""

    abstract = "unary" not in SHAPES

    @task(10)
    def order(self) -> None:
        """Reserve 1-5 lines, then pay (70 %), cancel (20 %) or abandon (10 %)."""
        request = random_order(600)
        order_id = request.order_id
        try:
            self.stub.Reserve(request, timeout=5)
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


class BatchBuyer(InventoryUser):
    """An order-ingest client: BATCH_ORDERS orders per ReserveBatch call, reserve only."""

    abstract = "batch" not in SHAPES

    @task
    def batch(self) -> None:
        """One call; the call is reported by the interceptor, each order on its own row."""
        request = pb.ReserveBatchRequest(orders=[random_order(120) for _ in range(BATCH_ORDERS)])
        start = time.perf_counter()
        try:
            reply = self.stub.ReserveBatch(request, timeout=5)
        except grpc.RpcError:
            return  # already reported as a failure
        seconds = time.perf_counter() - start
        for result in reply.results:
            error = result.error if result.WhichOneof("result") == "error" else None
            report_order(self.environment, "ReserveBatch order", seconds, error)


class StreamBuyer(InventoryUser):
    """A checkout gateway: one ReserveStream per user, STREAM_WINDOW orders sent at a time,
    each answer reported with the time from its send (answers come in any order; the
    connection's interceptor reports unary calls only, so the stream is reported here)."""

    abstract = "stream" not in SHAPES

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.outbox: Queue[pb.ReserveStreamRequest | None] = Queue()
        self.sent_at: dict[str, float] = {}
        self.window_done = Event()
        self.ids = itertools.count()
        self.reader: gevent.Greenlet[Any, Any] | None = None

    def on_start(self) -> None:
        self.reader = gevent.spawn(self._read)

    def on_stop(self) -> None:
        self.outbox.put(None)  # half-close: the server answers what is left, then ends
        if self.reader is not None:
            self.reader.join(timeout=10)
        super().on_stop()

    def _messages(self) -> Iterator[pb.ReserveStreamRequest]:
        while (msg := self.outbox.get()) is not None:
            yield msg

    def _read(self) -> None:
        try:
            for answer in self.stub.ReserveStream(self._messages()):
                sent = self.sent_at.pop(answer.correlation_id, None)
                if sent is None:
                    continue
                error = answer.error if answer.WhichOneof("result") == "error" else None
                report_order(self.environment, "ReserveStream", time.perf_counter() - sent, error)
                if not self.sent_at:
                    self.window_done.set()
        except grpc.RpcError as err:
            report_order(self.environment, "ReserveStream (call)", 0.0, err)
        finally:
            self.window_done.set()

    @task
    def window(self) -> None:
        """Send STREAM_WINDOW orders, wait (at most 10 s) until each is answered."""
        if self.reader is None or self.reader.dead:
            raise StopUser()  # the stream failed (reported by the reader)
        self.window_done.clear()
        for _ in range(STREAM_WINDOW):
            cid = str(next(self.ids))
            self.sent_at[cid] = time.perf_counter()
            self.outbox.put(pb.ReserveStreamRequest(correlation_id=cid, request=random_order(120)))
        if not self.window_done.wait(timeout=10):
            for cid in list(self.sent_at):  # never answered: a failure each
                del self.sent_at[cid]
                report_order(self.environment, "ReserveStream", 10.0, TimeoutError(cid))
            self.outbox.put(None)  # and this stream is done: the user stops
            raise StopUser()


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
