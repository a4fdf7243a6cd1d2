"""The grpc.aio server: servicer, health, reflection, background tasks, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stockhold import metrics
from stockhold.constants import SERVICE_NAME
from stockhold.contention_store import ContentionStore
from stockhold.embedded import EmbeddedRedis
from stockhold.engine import Engine, PartitionMismatch
from stockhold.errors import DomainError
from stockhold.payments.config import PaymentProviders, load_providers
from stockhold.payments.poller import PaymentPoller
from stockhold.payments.sync import notification_handler
from stockhold.payments.webhook import make_app, start_webhook
from stockhold.servicer import InventoryServicer
from stockhold.settings import Settings
from stockhold.v1 import inventory_pb2, inventory_pb2_grpc

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StockholdServer:
    """One server process: the gRPC server, its engine and its background tasks."""

    def __init__(
        self, settings: Settings, redis_url: str, payments: PaymentProviders | None = None
    ) -> None:
        self.settings = settings
        self.engine = Engine.connect(redis_url, settings)
        # Payment providers (issue 5): from settings unless given (tests give fakes).
        self.payments = payments or load_providers(settings, self.engine.client)
        self.poller: PaymentPoller | None = None
        if self.payments.clients:
            self.poller = PaymentPoller(
                self.engine, self.payments.clients, settings.payment_poll_concurrency
            )
        if settings.payment_webhook_listen and self.payments.verifier is None:
            raise ValueError(
                "payment_webhook_listen needs WeChat Pay notifications configured "
                "(wechatpay_mchid, platform keys and the APIv3 key)"
            )
        self.webhook_port = 0
        self._webhook: web.AppRunner | None = None  # while the notification endpoint runs
        self.health = health.aio.HealthServicer()
        # grpc core cancels calls beyond its pending-request limit with a bare CANCELLED; keep
        # that limit above our own admission limit, so overload is an explicit
        # RESOURCE_EXHAUSTED from maximum_concurrent_rpcs instead.
        pending = settings.max_concurrent_rpcs * 2
        self.server = grpc.aio.server(
            options=[
                ("grpc.server.max_pending_requests", pending),
                ("grpc.server.max_pending_requests_hard_limit", pending * 2),
                ("grpc.max_concurrent_streams", 10_000),
                # Several worker processes share one port (serve --workers N).
                ("grpc.so_reuseport", 1),
            ],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
            interceptors=metrics.server_interceptors(settings),
        )
        self.contention = ContentionStore(self.engine)
        inventory_pb2_grpc.add_InventoryServicer_to_server(
            InventoryServicer(self.engine, settings, self.contention), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
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
        self._partitions_checked = False
        self._stopping = False
        # Set by a signal or by a fatal condition (see `failure`): serve() then stops.
        self.stop_requested = asyncio.Event()
        self.failure: BaseException | None = None

    async def start(self) -> int:
        """Bind, start serving (NOT_SERVING until Redis answers) and start background tasks."""
        self.port = self.server.add_insecure_port(self.settings.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.listen}")
        self.metrics = metrics.start_process_metrics(self.settings, self.port)
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
        if self.settings.payment_webhook_listen:
            await self._start_webhook()
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
        await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
        # The last calls' figures still count for the deployment (until they go stale).
        await self._publish_contention()
        await self.engine.close()
        await self.payments.aclose()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)

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
            await self._set_serving(False)
            return
        except PartitionMismatch as err:
            log.critical("%s", err)
            await self._set_serving(False)
            self.failure = err
            self.stop_requested.set()
            return
        await self._set_serving(True)

    async def _sweep(self) -> None:
        try:
            n = await self.engine.expire_due()
        except DomainError as err:
            log.debug("sweep skipped: %s", err)
            return
        if n:
            log.info("expired holds", extra={"count": n})

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
        self._webhook, self.webhook_port = await start_webhook(
            self.settings.payment_webhook_listen, app, reuse_port=True
        )
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


async def serve(settings: Settings) -> int:
    """Run one server until SIGTERM/SIGINT; starts an embedded Redis when no URL is given."""
    embedded: EmbeddedRedis | None = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(settings.data_dir)
        url = embedded.start()
        log.info("embedded redis started", extra={"url": url, "data_dir": str(settings.data_dir)})
    try:
        server = StockholdServer(settings, url)
        port = await server.start()
        log.info("stockhold serving", extra={"listen": settings.listen, "port": port})
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop_requested.set)
        await server.stop_requested.wait()
        log.info("stockhold stopping")
        await server.stop()
        log.info("stockhold stopped")
        return 1 if server.failure is not None else 0
    finally:
        if embedded is not None:
            embedded.stop()
