"""Prometheus metrics: RPC latency by method and code, shed reserves, contention figures.

What is exported (see docs/operations.md, "Metrics"):

* `stockhold_rpc_duration_seconds{method,code}`: a histogram of every unary
  `stockhold.v1.Inventory` call, timed by `MetricsInterceptor` from the handler's start to its
  answer (health and reflection calls are not recorded);
* `stockhold_reserve_shed_total{hot}`: Reserves refused with RESERVE_TIMEOUT before any script
  was sent (`record_shed`, called by the engine);
* `stockhold_oversold_counts_total`: cycle counts (SetOnHand, not replays) that found fewer
  units than are reserved (`record_oversold_count`, called by stockhold.counts);
* `stockhold_event_stream_fill_ratio{partition}`, `stockhold_subscription_events_lost_total
  {subscription}`, `stockhold_deliveries_total{subscription,outcome}`: the event streams'
  fill against the hard cap and webhook deliveries (issue 12, stockhold.delivery);
* `stockhold_contention_*{key,sku}`: gauges of the top keys of the server's own
  `GetContentionStats`, asked over gRPC at scrape time (`ContentionCollector`).
* `stockhold_subscription_*{subscription}`: each subscription's backlog, oldest age, failed
  count, delivery rate, WMS response times, status, slow-consumer flag and lost events, from
  the server's own `GetSubscriptionLag` at scrape time (`SubscriptionLagCollector`).

Importing this module is cheap and safe in any process: it imports neither prometheus_client
nor anything that opens a file or a socket. Metric objects exist only once `enable()` has run
(the server calls it when metrics are on), and `record_shed` is a no-op until then.

Several processes (`stockhold serve --workers N`) use prometheus_client's multiprocess mode:
the supervisor gives each worker a `PROMETHEUS_MULTIPROC_DIR` of its own making, a worker
that finds it set records into it (prometheus_client reads the variable when it is first
imported, which in a worker happens in `enable()`), and the supervisor alone serves the
aggregate (`supervisor_registry`). Workers never bind the metrics port.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, cast

import grpc

from stockhold.constants import SERVICE_NAME
from stockhold.interceptor import WrappingInterceptor

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

    from stockhold.settings import Settings
    from stockhold.tls import ContextTLS

log = logging.getLogger(__name__)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_CONTENTION_TOP_N: Final = 20
# The scrape asks the server for contention figures with this deadline; Prometheus's own
# scrape timeout is 10 s by default.
CONTENTION_TIMEOUT_SECONDS: Final = 2.0
# Bucket bounds (s): fine below 10 ms where healthy calls are, edges on the contention flag
# threshold (200 ms) and on the hot-SKU reserve timeout (300 ms). Few buckets: each observe
# walks them.
RPC_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_METHOD_PREFIX: Final = f"/{SERVICE_NAME}/"


class _Metrics:
    """This process's metric objects (created once, by `enable()`)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.rpc_duration: Histogram = Histogram(
            "stockhold_rpc_duration_seconds",
            "Time from the start of a stockhold.v1.Inventory handler to its answer",
            ("method", "code"),
            buckets=RPC_BUCKETS,
        )
        self.shed: Counter = Counter(
            "stockhold_reserve_shed_total",
            "Reserves refused with RESERVE_TIMEOUT before their script was sent",
            ("hot",),
        )
        # Both series exist from the start (a rate over a missing series is no rate at all).
        self.shed_by_hot = {
            True: self.shed.labels(hot="true"),
            False: self.shed.labels(hot="false"),
        }
        self.oversold_counts: Counter = Counter(
            "stockhold_oversold_counts_total",
            "Cycle counts (SetOnHand) applied with on_hand below reserved: available negative",
        )


_state: _Metrics | None = None
_enable_lock = threading.Lock()


def enable() -> None:
    """Create this process's metric objects (idempotent); record_shed counts from then on."""
    global _state
    with _enable_lock:
        if _state is None:
            _state = _Metrics()


def _metrics() -> _Metrics:
    enable()
    assert _state is not None
    return _state


def recording(settings: Settings) -> bool:
    """Whether this process records metrics: it serves them, or a supervisor collects them."""
    return settings.metrics_port != 0 or bool(os.environ.get(MULTIPROC_ENV))


def record_shed(sku_is_hot: bool) -> None:
    """Count one Reserve shed (RESERVE_TIMEOUT, nothing written); never raises."""
    state = _state
    if state is None:
        return
    try:
        state.shed_by_hot[bool(sku_is_hot)].inc()
    except Exception:  # a metric must never fail a request
        log.warning("shed counter failed", exc_info=True)


def record_oversold_count() -> None:
    """Count one applied cycle count that left available negative; never raises."""
    state = _state
    if state is None:
        return
    try:
        state.oversold_counts.inc()
    except Exception:  # a metric must never fail a request
        log.warning("oversold counter failed", exc_info=True)


# -- delivery to subscriptions (issue 12, stockhold.delivery) ------------------------------------

# Outcomes of stockhold_deliveries_total: a POST the WMS took, one it did not (each failed
# attempt), an event given up on (FLOW: to the failed set), an event the filter passed over.
DELIVERY_OUTCOMES: Final = ("delivered", "error", "failed", "skipped")


class _DeliveryMetrics:
    """The deliverer's and the trimmer's metric objects (created on first use once enabled)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        self.fill: Gauge = Gauge(
            "stockhold_event_stream_fill_ratio",
            "Entries in a partition's event stream over the hard cap (event_stream_maxlen)",
            ("partition",),
            multiprocess_mode="max",
        )
        self.lost: Counter = Counter(
            "stockhold_subscription_events_lost_total",
            "Events the hard cap trimmed before a subscription received them",
            ("subscription",),
        )
        self.deliveries: Counter = Counter(
            "stockhold_deliveries_total",
            "Webhook deliveries by outcome: delivered, error (one failed attempt), failed "
            "(given up: the failed set), skipped (not matching the filter)",
            ("subscription", "outcome"),
        )
        self.by_outcome: dict[tuple[str, str], Any] = {}


_delivery: _DeliveryMetrics | None = None


def _delivery_metrics() -> _DeliveryMetrics | None:
    global _delivery
    if _state is None:
        return None
    if _delivery is None:
        with _enable_lock:
            if _delivery is None:
                _delivery = _DeliveryMetrics()
    return _delivery


def record_delivery(subscription: str, outcome: str, n: int = 1) -> None:
    """Count `n` deliveries of one outcome (DELIVERY_OUTCOMES); never raises."""
    state = _delivery_metrics()
    if state is None or n <= 0:
        return
    try:
        child = state.by_outcome.get((subscription, outcome))
        if child is None:
            child = state.by_outcome[(subscription, outcome)] = state.deliveries.labels(
                subscription=subscription, outcome=outcome
            )
        child.inc(n)
    except Exception:  # a metric must never fail a delivery
        log.warning("delivery counter failed", exc_info=True)


def record_events_lost(subscription: str, n: int) -> None:
    """Count events the hard cap dropped before a subscription got them; never raises."""
    state = _delivery_metrics()
    if state is None or n <= 0:
        return
    try:
        state.lost.labels(subscription=subscription).inc(n)
    except Exception:
        log.warning("lost-events counter failed", exc_info=True)


def set_stream_fill(partition: int, ratio: float) -> None:
    """Set a partition's event stream fill ratio (length / hard cap); never raises."""
    state = _delivery_metrics()
    if state is None:
        return
    try:
        state.fill.labels(partition=str(partition)).set(ratio)
    except Exception:
        log.warning("stream fill gauge failed", exc_info=True)


# -- RPC latency --------------------------------------------------------------------------------

_OK: Final = grpc.StatusCode.OK
_UNKNOWN: Final = grpc.StatusCode.UNKNOWN
_CANCELLED: Final = grpc.StatusCode.CANCELLED
_DEADLINE_EXCEEDED: Final = grpc.StatusCode.DEADLINE_EXCEEDED
_CODE_BY_VALUE: Final = {code.value[0]: code for code in grpc.StatusCode}


def _code_name(code: object) -> str:
    """grpc.StatusCode (or its integer value) -> its name, e.g. FAILED_PRECONDITION."""
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int) and code in _CODE_BY_VALUE:
        return _CODE_BY_VALUE[code].name
    return "UNKNOWN"


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]


class MetricsInterceptor(WrappingInterceptor):
    """Times every unary stockhold.v1.Inventory call into `stockhold_rpc_duration_seconds`.

    The code is the one the client gets: the context's code after the handler returned or
    raised (an `abort_with_status` sets it before raising AbortError); UNKNOWN for another
    exception without a code; DEADLINE_EXCEEDED or CANCELLED when grpc cancelled the handler
    (deadline passed, or the client went away). Calls refused before any handler runs
    (`maximum_concurrent_rpcs`, unknown methods) are not seen here.

    Per call: one dict lookup to find the method's wrapped handler (built once per method),
    two `perf_counter` reads, one dict lookup for the (method, code) child, one observe.
    """

    def __init__(self) -> None:
        super().__init__()
        self._histogram = _metrics().rpc_duration

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler, timed when it is a unary Inventory method."""
        if method.startswith(_METHOD_PREFIX) and inspect.iscoroutinefunction(handler.unary_unary):
            return self._timed(method[len(_METHOD_PREFIX) :], handler)
        return handler

    def _timed(self, method: str, handler: Handler) -> Handler:
        # intercept_service checked: an async unary-unary handler.
        inner = cast(Callable[[Any, Any], Awaitable[Any]], handler.unary_unary)
        labels = self._histogram.labels
        observers: dict[str, Callable[[float], None]] = {}
        perf_counter = time.perf_counter

        def observe(code: object, seconds: float) -> None:
            name = code.name if isinstance(code, grpc.StatusCode) else _code_name(code)
            obs = observers.get(name)
            if obs is None:
                obs = observers[name] = labels(method, name).observe
            obs(seconds)

        async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            start = perf_counter()
            try:
                response = await inner(request, context)
            except asyncio.CancelledError:
                left: float | None = context.time_remaining()
                expired = left is not None and left <= 0
                observe(_DEADLINE_EXCEEDED if expired else _CANCELLED, perf_counter() - start)
                raise
            except BaseException:
                code: object = context.code()
                observe(_UNKNOWN if code is None or code is _OK else code, perf_counter() - start)
                raise
            code = context.code()
            observe(_OK if code is None else code, perf_counter() - start)
            return response

        return grpc.unary_unary_rpc_method_handler(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def server_interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a server process installs: the timer when it records metrics."""
    return [MetricsInterceptor()] if recording(settings) else []


# -- contention figures ---------------------------------------------------------------------------


def local_target(listen: str, port: int | None = None) -> str:
    """The address this host reaches a server on that listens on `listen` (HOST:PORT)."""
    host, _, listen_port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::", "localhost"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{listen_port if port is None else port}"


class ContentionCollector:
    """At scrape time, asks the server's GetContentionStats and exports its top keys as gauges.

    The figures are those of the configured sliding window (60 s by default), merged over
    every process. At most `top_n` keys are exported, so the label cardinality is bounded.
    When the call fails (server down, UNIMPLEMENTED, timeout) the per-key gauges are left out
    and `stockhold_contention_up` is 0: the scrape itself never fails.
    """

    def __init__(
        self,
        target: str,
        top_n: int = DEFAULT_CONTENTION_TOP_N,
        timeout: float = CONTENTION_TIMEOUT_SECONDS,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.top_n = max(1, top_n)
        self.timeout = timeout
        # The server's own internal token (auth.internal_token): its calls pass the auth
        # interceptor as stockhold-internal (role operator).
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()

    def _stub(self) -> Any:
        from stockhold.v1 import inventory_pb2_grpc as pb_grpc

        with self._lock:
            if self._channel is None:
                self._channel = grpc.insecure_channel(self.target)
            return pb_grpc.InventoryStub(self._channel)

    def close(self) -> None:
        """Close the channel to the server."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def describe(self) -> list[Metric]:
        """Nothing: registering the collector must not call the server."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The gauges, from one GetContentionStats call."""
        from prometheus_client.core import GaugeMetricFamily

        from stockhold.v1 import inventory_pb2 as pb

        up = GaugeMetricFamily(
            "stockhold_contention_up",
            "1 when the scrape's GetContentionStats call answered, else 0",
        )
        try:
            reply = self._stub().GetContentionStats(
                pb.GetContentionStatsRequest(top_n=self.top_n),
                timeout=self.timeout,
                metadata=self.metadata,
            )
        except grpc.RpcError as err:
            log.debug("contention scrape failed: %s", err.code())
            up.add_metric([], 0)
            yield up
            return
        except Exception:  # never break the scrape
            log.warning("contention scrape failed", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        processes = GaugeMetricFamily(
            "stockhold_contention_processes", "Process snapshots merged into the figures"
        )
        processes.add_metric([], reply.processes)
        yield processes
        labels = ("key", "sku")

        def family(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"stockhold_contention_{name}", doc, labels=labels)

        p99 = family("wait_p99_seconds", "Queue wait p99 of a top key over the window")
        mean = family("wait_mean_seconds", "Mean queue wait of a top key over the window")
        requests = family("requests", "Requests for a top key over the window")
        contended = family("contended", "Requests that found another one for the key under way")
        timeouts = family("timeouts", "Requests shed with RESERVE_TIMEOUT (nothing written)")
        insufficient = family("insufficient", "Requests refused with INSUFFICIENT_STOCK")
        flagged = family("flagged", "1 when the key's wait p99 is above the flag threshold")
        for k in reply.keys[: self.top_n]:
            values = (k.key, k.unit.sku)
            p99.add_metric(values, k.wait_p99_ms / 1000)
            mean.add_metric(values, k.wait_mean_ms / 1000)
            requests.add_metric(values, k.requests)
            contended.add_metric(values, k.contended)
            timeouts.add_metric(values, k.timeouts)
            insufficient.add_metric(values, k.insufficient)
            flagged.add_metric(values, 1 if k.flagged else 0)
        yield from (p99, mean, requests, contended, timeouts, insufficient, flagged)


# -- subscription lag (issue 12, docs/events.md "Lag and alerts") -------------------------------

LAG_CACHE_SECONDS: Final = 1.0
_LAG_STATUS_VALUE: Final = {1: 0, 2: 1, 3: 2}  # LagStatus HEALTHY, WARN, ALERT -> 0, 1, 2


class SubscriptionLagCollector:
    """At scrape time, asks the server's GetSubscriptionLag (over the contention collector's
    channel) and exports each subscription's figures as gauges labelled `subscription`. The
    answer is kept LAG_CACHE_SECONDS, so scrapes close together cost one call. When the call
    fails the gauges are left out and `stockhold_subscription_lag_up` is 0."""

    def __init__(self, server: ContentionCollector) -> None:
        self.server = server
        self._cached: tuple[float, Any] | None = None
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        """Nothing: registering the collector must not call the server."""
        return []

    def _reply(self) -> Any:
        from stockhold.v1 import inventory_pb2 as pb

        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < LAG_CACHE_SECONDS:
                return self._cached[1]
            reply = self.server._stub().GetSubscriptionLag(
                pb.GetSubscriptionLagRequest(),
                timeout=self.server.timeout,
                metadata=self.server.metadata,
            )
            self._cached = (now, reply)
            return reply

    def collect(self) -> Iterator[Metric]:
        """The gauges, from one (cached) GetSubscriptionLag call."""
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            "stockhold_subscription_lag_up",
            "1 when the scrape's GetSubscriptionLag call answered, else 0",
        )
        try:
            reply = self._reply()
        except Exception as err:  # never break the scrape
            log.debug("subscription lag scrape failed: %s", err)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        def family(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(
                f"stockhold_subscription_{name}", doc, labels=("subscription", *labels)
            )

        backlog = family("backlog", "Events not yet acknowledged, over every partition")
        oldest = family("oldest_age_seconds", "Age of the oldest unacknowledged event")
        failed = family("failed", "Events in the failed set (ReplayFailed delivers them)")
        rate = family("delivery_rate", "Events acknowledged per second, recent")
        wms = family("wms_response_ms", "The WMS's response time, recent", "quantile")
        status = family("status", "0 healthy, 1 warn, 2 alert (by backlog)")
        slow = family("slow_consumer", "1 when the WMS's p99 is above slow_consumer_ms")
        lost = family("lost", "Events the stream's hard cap dropped before delivery")
        for s in reply.subscriptions:
            name = (s.name,)
            backlog.add_metric(name, s.backlog)
            oldest.add_metric(name, s.oldest_age_ms / 1000)
            failed.add_metric(name, s.failed)
            rate.add_metric(name, s.rate_per_second)
            wms.add_metric((s.name, "0.5"), s.wms_p50_ms)
            wms.add_metric((s.name, "0.99"), s.wms_p99_ms)
            status.add_metric(name, _LAG_STATUS_VALUE.get(s.status, 0))
            slow.add_metric(name, 1 if s.slow_consumer else 0)
            lost.add_metric(name, s.lost)
        yield from (backlog, oldest, failed, rate, wms, status, slow, lost)


# -- the /metrics endpoint ------------------------------------------------------------------------


def _multiprocess() -> Any:
    """prometheus_client.multiprocess (its functions carry no type hints)."""
    from prometheus_client import multiprocess

    return multiprocess


class _Union:
    """Several collectors exported as one."""

    def __init__(self, *collectors: Collector) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        """Every collector's metrics, in order."""
        for c in self.collectors:
            yield from c.collect()


def process_registry(contention: ContentionCollector) -> CollectorRegistry:
    """What one server process exports: its own metrics (and the Python process's) plus the
    contention gauges. When a PROMETHEUS_MULTIPROC_DIR is set, every process's files in it."""
    from prometheus_client import REGISTRY, CollectorRegistry

    registry = CollectorRegistry()
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        _multiprocess().MultiProcessCollector(registry, path=path)
    else:
        registry.register(_Union(REGISTRY))
    registry.register(contention)
    registry.register(SubscriptionLagCollector(contention))
    return registry


def supervisor_registry(path: str, contention: ContentionCollector) -> CollectorRegistry:
    """What a supervisor exports: its workers' metrics, summed from `path`, plus contention."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    _multiprocess().MultiProcessCollector(registry, path=path)
    registry.register(contention)
    registry.register(SubscriptionLagCollector(contention))
    return registry


def mark_process_dead(pid: int, path: str) -> None:
    """Bookkeeping for a worker that exited (prometheus_client multiprocess mode)."""
    _multiprocess().mark_process_dead(pid, path)


class MetricsEndpoint:
    """`GET /metrics` over HTTP, served by prometheus_client in a daemon thread; over TLS
    (HTTPS, client certificates required with a client CA) when given `tls`."""

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, tls: ContextTLS | None = None
    ) -> None:
        from prometheus_client import start_http_server

        self.tls = tls
        try:
            if tls is None:
                server, thread = start_http_server(port, host, registry)
            else:
                server, thread = _start_https(host, port, registry, tls)
        except OSError as err:
            raise OSError(f"cannot serve metrics on {host}:{port}: {err}") from err
        self._server: WSGIServer = server
        self._thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# A TLS client that connects and never finishes its handshake frees its thread after this.
HANDSHAKE_TIMEOUT_SECONDS: Final = 10.0


def _start_https(
    host: str, port: int, registry: CollectorRegistry, tls: ContextTLS
) -> tuple[WSGIServer, threading.Thread]:
    """prometheus_client's WSGI server over TLS. Unlike its own certfile option, each
    accepted connection is wrapped with the context of the last reload (`tls.context`), and
    the handshake runs in the connection's thread, not in the accept loop (where one silent
    client would stall every scrape)."""
    import socket
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """No access log."""

    class Server(ThreadingWSGIServer):
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

        def get_request(self) -> tuple[socket.socket, Any]:
            sock, addr = self.socket.accept()
            sock.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
            wrapped = tls.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            return wrapped, addr

        def handle_error(self, request: Any, client_address: Any) -> None:
            # A refused handshake (no or a wrong client certificate, plaintext): no traceback.
            log.debug("metrics connection from %s failed", client_address, exc_info=True)

    server = make_server(host, port, make_wsgi_app(registry), Server, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


class ProcessMetrics:
    """One server process's endpoint and contention collector (single-process serve). The
    collectors call `target` (default: the gRPC port on this host; with gRPC TLS the
    server's plaintext loopback port for its own callers)."""

    def __init__(
        self,
        settings: Settings,
        grpc_port: int,
        token: str | None = None,
        target: str | None = None,
    ) -> None:
        from stockhold.tls import ContextTLS

        self.contention = ContentionCollector(
            target or local_target(settings.listen, grpc_port),
            settings.metrics_contention_top_n,
            token=token,
        )
        files = settings.tls_files("metrics")
        self.endpoint = MetricsEndpoint(
            settings.metrics_host,
            settings.metrics_port,
            process_registry(self.contention),
            ContextTLS("metrics", files) if files else None,
        )
        log.info(
            "metrics serving",
            extra={"metrics_host": settings.metrics_host, "metrics_port": self.endpoint.port},
        )

    def close(self) -> None:
        """Stop the endpoint, then close the collector's channel."""
        self.endpoint.close()
        self.contention.close()


def start_process_metrics(
    settings: Settings, grpc_port: int, token: str | None = None, target: str | None = None
) -> ProcessMetrics | None:
    """Serve this process's metrics when `metrics_port` is set (its collectors calling
    `target` with `token`, the server's internal one); None otherwise."""
    if settings.metrics_port == 0:
        return None
    return ProcessMetrics(settings, grpc_port, token, target)


__all__ = [
    "DEFAULT_CONTENTION_TOP_N",
    "MULTIPROC_ENV",
    "RPC_BUCKETS",
    "ContentionCollector",
    "MetricsEndpoint",
    "MetricsInterceptor",
    "ProcessMetrics",
    "SubscriptionLagCollector",
    "enable",
    "local_target",
    "mark_process_dead",
    "process_registry",
    "record_shed",
    "recording",
    "server_interceptors",
    "start_process_metrics",
    "supervisor_registry",
]
