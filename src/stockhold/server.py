"""The grpc.aio server: servicer, health, reflection, background tasks, graceful shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Final

import grpc
import redis.asyncio
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stockhold import auth, metrics
from stockhold.constants import ACTOR_SWEEPER, SERVICE_NAME
from stockhold.contention_store import ContentionStore
from stockhold.decoding import DecodeInterceptor
from stockhold.delivery.deliverer import Deliverer
from stockhold.delivery.subscriptions import SubscriptionStore
from stockhold.delivery.wake import HintPublisher
from stockhold.embedded import EmbeddedRedis
from stockhold.engine import Engine, PartitionMismatch
from stockhold.errors import DomainError
from stockhold.payments.config import PaymentProviders, load_providers
from stockhold.payments.poller import PaymentPoller
from stockhold.payments.sync import notification_handler
from stockhold.payments.webhook import make_app, start_webhook
from stockhold.servicer import InventoryServicer
from stockhold.settings import ConfigError, Settings, mask_url, split_listen
from stockhold.tls import ContextTLS, GrpcTLS, TlsError
from stockhold.v1 import inventory_pb2, inventory_pb2_grpc

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# `serve --workers N`: the supervisor names the plaintext loopback port its workers' internal
# callers use with gRPC TLS on (one port, SO_REUSEPORT, like the main one).
INTERNAL_LISTEN_ENV: Final = "STOCKHOLD_INTERNAL_LISTEN"


def warn_plaintext(settings: Settings) -> None:
    """A WARNING at start for each listener serving plaintext on a non-loopback address."""
    listeners = [("gRPC", settings.listen, settings.tls_files())]
    if settings.metrics_port:
        address = f"{settings.metrics_host}:{settings.metrics_port}"
        listeners.append(("metrics", address, settings.tls_files("metrics")))
    if settings.payment_webhook_listen:
        files = settings.tls_files("payment_webhook")
        listeners.append(("payment webhook", settings.payment_webhook_listen, files))
    for name, address, files in listeners:
        host = address.rpartition(":")[0]
        if files is None and not auth.is_loopback_host(host):
            log.warning(
                "%s listener on %s serves plaintext (no TLS) on a non-loopback address; "
                "see docs/security.md TLS",
                name,
                address,
            )


def warn_at_start(settings: Settings) -> None:
    """The start-up WARNINGs (plaintext on a non-loopback address, no authentication there),
    once per `stockhold serve`: by the supervisor with --workers N, not again by each worker."""
    warn_plaintext(settings)
    auth.warn_unauthenticated(settings)


class BindError(OSError):
    """An address stockhold cannot listen on; str() is one line naming it and the cause
    (`stockhold serve` prints it and exits 1)."""


def _bind_error(setting: str, address: str, cause: BaseException) -> BindError:
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    return BindError(f"cannot listen on {address} ({setting}): {reason}")


def _check_bindable(setting: str, host: str, port: int, reuse_port: bool) -> None:
    """Bind a socket to (host, port) as the server will, and let it go; BindError if no
    address of `host` can be bound."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as err:  # socket.gaierror: an unknown host
        raise _bind_error(setting, address, err) from None
    failure: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            # The options the real listeners use (grpc and aiohttp: both; metrics: REUSEADDR),
            # so only what would stop them stops us: another owner of the port, a foreign
            # address, a privileged port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind(sockaddr)
            except OSError as err:
                failure = failure or err
                continue
        return  # like grpc, one bound address of a host name is enough
    raise _bind_error(setting, address, failure or OSError("no address"))


def check_listen(settings: Settings) -> None:
    """Check, before anything starts, that every address serve will listen on can be bound:
    the gRPC port, the payment webhook and the metrics endpoint. BindError names the first
    that cannot (in use by another program, not an address of this host, privileged)."""
    host, port = split_listen(settings.listen)
    _check_bindable("--listen", host, port, reuse_port=True)
    if settings.payment_webhook_listen:
        host, port = split_listen(settings.payment_webhook_listen)
        _check_bindable("--payment-webhook-listen", host, port, reuse_port=True)
    if settings.metrics_port:
        _check_bindable(
            "--metrics-port", settings.metrics_host, settings.metrics_port, reuse_port=False
        )


def load_payments(
    settings: Settings, client: redis.asyncio.Redis | redis.asyncio.RedisCluster
) -> PaymentProviders:
    """The configured payment providers; ConfigError for a configuration serve cannot use."""
    try:
        payments = load_providers(settings, client)
    except ConfigError:  # a secret file refused (its path and mode): as it is
        raise
    except (ValueError, OSError) as err:  # an incomplete configuration, a missing key file
        raise ConfigError(
            "wechatpay_mchid", settings.wechatpay_mchid, f"a complete WeChat Pay set-up ({err})"
        ) from err
    if settings.payment_webhook_listen and payments.verifier is None:
        raise ConfigError(
            "payment_webhook_listen",
            settings.payment_webhook_listen,
            "empty (off), as payment_webhook_listen needs WeChat Pay notifications configured "
            "(wechatpay_mchid, platform keys and the APIv3 key)",
        )
    return payments


def check_payments(settings: Settings) -> None:
    """Load the payment configuration once, without serving and without touching Redis:
    ConfigError if serve could not start with it (run before any worker starts)."""
    if not (settings.wechatpay_mchid or settings.payment_webhook_listen):
        return

    async def load() -> None:
        client = redis.asyncio.Redis()  # never connects: only the nonce guard holds it
        try:
            await load_payments(settings, client).aclose()
        finally:
            await client.aclose()

    asyncio.run(load())


def limit_options(settings: Settings) -> list[tuple[str, int]]:
    """grpc server options of the per-connection limits (docs/security.md "Limits")."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        ("grpc.http2.min_ping_interval_without_data_ms", settings.keepalive_min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", settings.keepalive_max_ping_strikes),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
    ]


class StockholdServer:
    """One server process: the gRPC server, its engine and its background tasks."""

    def __init__(
        self, settings: Settings, redis_url: str, payments: PaymentProviders | None = None
    ) -> None:
        self.settings = settings
        # For log lines: the URL without its password.
        self.redis_url = mask_url(redis_url)
        self.engine = Engine.connect(redis_url, settings)
        # Payment providers (issue 5): from settings unless given (tests give fakes).
        self.payments = payments or load_payments(settings, self.engine.client)
        self.poller: PaymentPoller | None = None
        if self.payments.clients:
            self.poller = PaymentPoller(
                self.engine, self.payments.clients, settings.payment_poll_concurrency
            )
        self.webhook_port = 0
        self._webhook: web.AppRunner | None = None  # while the notification endpoint runs
        # TLS (docs/security.md "TLS"): each listener's files, read and checked here;
        # reload() reads them again (SIGHUP).
        files = settings.tls_files()
        self.tls = GrpcTLS(files) if files else None
        files = settings.tls_files("payment_webhook")
        self.webhook_tls: ContextTLS | None = None
        if files and settings.payment_webhook_listen:
            self.webhook_tls = ContextTLS("payment_webhook", files)
        # With gRPC TLS, this process's own callers (the metrics collectors) call a
        # plaintext port on 127.0.0.1 (INTERNAL_LISTEN_ENV, default any free port); else
        # the gRPC port.
        self.internal_port = 0
        self.health = health.aio.HealthServicer()
        # grpc core cancels calls beyond its pending-request limit with a bare CANCELLED; keep
        # that limit above our own admission limit, so overload is an explicit
        # RESOURCE_EXHAUSTED from maximum_concurrent_rpcs instead.
        pending = settings.max_concurrent_rpcs * 2
        # Who may call (docs/security.md): the auth file (checked here: AuthFileError, or
        # ConfigError for a non-loopback address without one), and this process's own token
        # for its metrics collectors' calls.
        self.internal_token = auth.internal_token()
        self.auth = auth.AuthInterceptor(
            auth.check_auth_settings(settings), settings.reflection, self.internal_token
        )
        interceptors = metrics.server_interceptors(settings)
        if settings.auth_file or settings.reflection == "loopback":
            interceptors.append(self.auth)  # inside the timer: refusals are timed too
        # Innermost: a request that does not parse is INVALID_ARGUMENT, not UNKNOWN.
        interceptors.append(DecodeInterceptor())
        self.server = grpc.aio.server(
            options=[
                ("grpc.server.max_pending_requests", pending),
                ("grpc.server.max_pending_requests_hard_limit", pending * 2),
                *limit_options(settings),
                # Several worker processes share one port (serve --workers N).
                ("grpc.so_reuseport", 1),
            ],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
            interceptors=interceptors,
        )
        self.contention = ContentionStore(self.engine)
        self.servicer = InventoryServicer(self.engine, settings, self.contention)
        # Pushes events to the subscriptions' webhooks (issue 12): started with the server.
        self.deliverer: Deliverer | None = None
        calls = self.engine.calls
        if settings.delivery_enabled:
            self.deliverer = Deliverer(calls, SubscriptionStore(calls), settings)
        # While a subscription exists, this process's event writes wake the deliverers
        # (delivery/wake.py), whether or not it delivers itself.
        self.hints = HintPublisher(
            calls, SubscriptionStore(calls), settings.delivery_lease_seconds / 3
        )
        inventory_pb2_grpc.add_InventoryServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.reflection != "off":
            services = (
                inventory_pb2.DESCRIPTOR.services_by_name["Inventory"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(services, self.server)
        self.port = 0
        self.metrics: metrics.ProcessMetrics | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._serving: bool | None = None
        # monotonic time of the first failed probe of an outage (None: Redis answers), so
        # an outage is logged once when it starts and once when it ends.
        self._redis_down_since: float | None = None
        self._partitions_checked = False
        self._stopping = False
        # Set by a signal or by a fatal condition (see `failure`): serve() then stops.
        self.stop_requested = asyncio.Event()
        self.failure: BaseException | None = None

    async def start(self) -> int:
        """Bind, start serving (NOT_SERVING until Redis answers) and start background tasks."""
        self.port = self._add_port("--listen", self.settings.listen, self.tls)
        target = None
        if self.tls is not None:
            internal = os.environ.get(INTERNAL_LISTEN_ENV) or "127.0.0.1:0"
            self.internal_port = self._add_port(INTERNAL_LISTEN_ENV, internal, None)
            target = f"127.0.0.1:{self.internal_port}"
        try:
            self.metrics = metrics.start_process_metrics(
                self.settings, self.port, self.internal_token, target
            )
        except OSError as err:
            raise BindError(str(err)) from None
        await self._set_serving(False)
        await self.server.start()
        await self._probe()
        self._tasks = [
            asyncio.create_task(self._every(self.settings.health_interval_seconds, self._probe)),
            asyncio.create_task(self._every(self.settings.sweep_interval_seconds, self._sweep)),
            asyncio.create_task(
                self._every(self.settings.contention_flush_seconds, self._publish_contention)
            ),
            asyncio.create_task(
                self._every(self.settings.policy_refresh_seconds, self._refresh_policies)
            ),
        ]
        if self.poller is not None:
            self._tasks.append(
                asyncio.create_task(
                    self._every(self.settings.payment_poll_interval_seconds, self._poll_payments)
                )
            )
        if self.engine.cross is not None:
            # Redis Cluster: orders left half-done across slots, twice per recovery window
            self._tasks.append(
                asyncio.create_task(
                    self._every(self.settings.recovery_window_seconds / 2, self._recover)
                )
            )
        if self.settings.payment_webhook_listen:
            await self._start_webhook()
        self.hints.start()
        if self.deliverer is not None:
            self.deliverer.start()
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, stop background work, drain calls, close Redis."""
        await self.health.enter_graceful_shutdown()
        self._stopping = True
        # On Python 3.11 a cancel can be lost inside asyncio.wait_for (which redis-py uses for
        # every command), so ask again, a bounded number of times.
        for _ in range(10):
            pending = [t for t in self._tasks if not t.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.5)
        if self._webhook is not None:
            await self._webhook.cleanup()
            self._webhook = None
        if self.poller is not None:
            await self.poller.close()
        if self.deliverer is not None:  # acknowledges what it delivered, releases its leases
            await self.deliverer.stop()
        await self.hints.stop()
        self.servicer.close_watches()  # endless streams: they end now, not at the grace's end
        await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
        # The last calls' figures still count for the deployment (until they go stale).
        await self._publish_contention()
        await self.engine.close()
        await self.payments.aclose()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)

    def _add_port(self, setting: str, listen: str, tls: GrpcTLS | None) -> int:
        """Bind a gRPC address (TLS with `tls`); the port bound, or BindError."""
        try:
            if tls is None:
                port = self.server.add_insecure_port(listen)
            else:
                port = self.server.add_secure_port(listen, tls.credentials())
        except RuntimeError as err:  # grpc: "Failed to bind to address ...; set GRPC_..."
            cause = RuntimeError(str(err).split(";")[0])
            raise _bind_error(setting, listen, cause) from None
        if port == 0:
            raise _bind_error(setting, listen, OSError("grpc bound no port"))
        return port

    def reload(self) -> None:
        """SIGHUP: read again what may change without a restart; what cannot be read is
        logged (ERROR) and the previous one stays in force. The auth file; every listener's
        TLS files (new connections get them, open ones go on)."""
        self.auth.reload()
        endpoint = self.metrics.endpoint if self.metrics is not None else None
        for part in (self.tls, self.webhook_tls, endpoint.tls if endpoint else None):
            if part is None:
                continue
            try:
                part.reload()
            except TlsError as err:
                log.error("tls reload failed; the previous files stay in force: %s", err)

    async def _set_serving(self, ok: bool) -> None:
        if ok == self._serving:
            return
        status = SERVING if ok else NOT_SERVING
        status_name = "SERVING" if ok else "NOT_SERVING"
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        if self._serving is not None:
            log.log(logging.INFO if ok else logging.WARNING, "health: %s", status_name)
        self._serving = ok

    async def _probe(self) -> None:
        """SERVING only while a real script call succeeds."""
        try:
            await self.engine.ping()
            if not self._partitions_checked:
                await self.engine.check_partitions()
                self._partitions_checked = True
        except DomainError as err:
            log.debug("health probe failed: %s", err)
            self._redis_down(err)
            await self._set_serving(False)
            return
        except PartitionMismatch as err:
            log.critical("%s", err)
            await self._set_serving(False)
            self.failure = err
            self.stop_requested.set()
            return
        self._redis_up()
        await self._set_serving(True)

    def _redis_down(self, err: DomainError) -> None:
        """Log the start of an outage (once), with the masked URL and what the client saw."""
        if self._redis_down_since is not None:
            return
        self._redis_down_since = time.monotonic()
        cause = err.__cause__ or err
        log.warning(
            "redis unreachable",
            extra={"redis_url": self.redis_url, "cause": f"{type(cause).__name__}: {cause}"},
        )

    def _redis_up(self) -> None:
        """Log the end of an outage (once)."""
        if self._redis_down_since is None:
            return
        down_s = time.monotonic() - self._redis_down_since
        self._redis_down_since = None
        log.info(
            "redis reachable again", extra={"redis_url": self.redis_url, "down_s": round(down_s, 1)}
        )

    async def _sweep(self) -> None:
        try:
            n = await self.engine.expire_due(actor=ACTOR_SWEEPER)
        except DomainError as err:
            log.debug("sweep skipped: %s", err)
            return
        if n:
            log.info("expired holds", extra={"count": n})

    async def _recover(self) -> None:
        assert self.engine.cross is not None
        try:
            counts = await self.engine.cross.recover()
        except DomainError as err:
            log.debug("recovery pass skipped: %s", err)
            return
        if any(counts.values()):
            log.info("recovered cross-slot orders", extra=counts)

    async def _publish_contention(self) -> None:
        try:
            await self.contention.publish()
        except DomainError as err:
            log.debug("contention snapshot not published: %s", err)

    async def _refresh_policies(self) -> None:
        try:
            await self.engine.policies.refresh()
        except DomainError as err:
            log.debug("policy refresh skipped: %s", err)

    async def _poll_payments(self) -> None:
        assert self.poller is not None
        try:
            await self.poller.tick()
        except DomainError as err:
            log.debug("payment polls skipped: %s", err)

    async def _start_webhook(self) -> None:
        """The WeChat Pay notification endpoint, feeding the ReportPayment path. SO_REUSEPORT:
        every worker of `serve --workers N` binds the same port."""
        verifier = self.payments.verifier
        assert verifier is not None  # checked in __init__
        app = make_app(
            verifier, notification_handler(self.engine), path=self.settings.payment_webhook_path
        )
        listen = self.settings.payment_webhook_listen
        ssl_context = self.webhook_tls.live if self.webhook_tls is not None else None
        try:
            self._webhook, self.webhook_port = await start_webhook(
                listen, app, reuse_port=True, ssl_context=ssl_context
            )
        except OSError as err:
            raise _bind_error("--payment-webhook-listen", listen, err) from None
        log.info(
            "payment webhook listening",
            extra={"listen": self.settings.payment_webhook_listen, "port": self.webhook_port},
        )

    async def _every(self, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                await step()
            except Exception:  # a background task must outlive any single failure
                log.exception("background step failed")


async def serve(settings: Settings, *, supervised: bool = False) -> int:
    """Run one server until SIGTERM/SIGINT; starts an embedded Redis when no URL is given.
    ``supervised``: a worker of `serve --workers N`, whose supervisor gave the start-up
    warnings."""
    embedded: EmbeddedRedis | None = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(settings.data_dir)
        url = embedded.start()
        # Every client of this process logs in with the embedded Redis's own password.
        settings = dataclasses.replace(settings, redis_password_file=str(embedded.password_path))
        log.info("embedded redis started", extra={"url": url, "data_dir": str(settings.data_dir)})
    try:
        server = StockholdServer(settings, url)
        # Before the start: health may say SERVING before start() returns, and a signal sent
        # then must stop the server gracefully, not interrupt it (KeyboardInterrupt) or kill it.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, server.reload)
        if not supervised:
            warn_at_start(settings)
        try:
            port = await server.start()
        except BaseException:
            await server.stop(grace=0)  # a failed start leaves nothing bound or running
            raise
        log.info("stockhold serving", extra={"listen": settings.listen, "port": port})
        await server.stop_requested.wait()
        log.info("stockhold stopping")
        await server.stop()
        log.info("stockhold stopped")
        return 1 if server.failure is not None else 0
    finally:
        if embedded is not None:
            embedded.stop()
