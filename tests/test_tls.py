"""TLS on every listener (issue 13): gRPC, metrics and the payment webhook, over real TLS with
certificates from tests/certs.py; reload on SIGHUP; the CLI's TLS flags.

Servers are StockholdServer instances (make_stockhold) or real `stockhold serve` processes;
every address is 127.0.0.1 on a free port.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from certs import CertAuthority, CertFiles, Issued
from fake_wechatpay import FakeWeChatPay
from grpc_health.v1 import health_pb2, health_pb2_grpc
from payment_helpers import fake_config, start_server
from redis_proc import RedisProc, free_port
from stockhold_fixtures import Factory, Running
from test_process import STOCKHOLD, Served, child_env, cli

from stockhold.server import StockholdServer, warn_plaintext
from stockhold.settings import ConfigError, Settings
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def server_cert(ca: CertAuthority) -> Issued:
    return ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], server=True)


class Pki:
    """A CA with a server certificate and client certificates, and a second, foreign CA."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = CertAuthority("stockhold test CA")
        self.other = CertAuthority("another CA")
        self.server = server_cert(self.ca).write(root / "server")
        self.client = self.ca.issue("checkout", uris=["spiffe://shop/checkout"])
        self.expired = self.ca.issue("old", not_after=-1)
        self.foreign = self.other.issue("intruder")
        self.client_files = self.client.write(root / "client")

    def rotate(self) -> None:
        """The server's files replaced by a certificate of the other CA, which also becomes
        the client CA (written in place, as an operator's renewal would)."""
        new = server_cert(self.other)
        self.server.cert.write_bytes(new.cert_pem)
        self.server.key.write_bytes(new.key_pem)
        self.server.ca.write_bytes(new.ca_pem)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def tls_settings(pki: Pki, mtls: bool = False) -> dict[str, Any]:
    out = {"tls_cert": str(pki.server.cert), "tls_key": str(pki.server.key)}
    if mtls:
        out["tls_client_ca"] = str(pki.server.ca)
    return out


async def check(
    address: str, root: bytes | None, client: Issued | None = None, plaintext: bool = False
) -> grpc.StatusCode:
    """The status of one Health.Check over a new channel: OK, or why not."""
    if plaintext:
        channel = grpc.aio.insecure_channel(address)
    else:
        creds = grpc.ssl_channel_credentials(
            root, client.key_pem if client else None, client.cert_pem if client else None
        )
        channel = grpc.aio.secure_channel(address, creds)
    async with channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


# -- settings --------------------------------------------------------------------------------------
def test_settings_refuse_a_readable_key_a_lone_certificate_and_a_lone_client_ca(pki: Pki) -> None:
    pki.server.key.chmod(0o644)
    with pytest.raises(ConfigError) as err:
        Settings.from_env({}, **tls_settings(pki))
    assert str(pki.server.key) in str(err.value) and "0644" in str(err.value)
    assert "STOCKHOLD_TLS_KEY" in str(err.value)
    pki.server.key.chmod(0o600)
    with pytest.raises(ConfigError, match="both or neither"):
        Settings.from_env({}, tls_cert=str(pki.server.cert))
    with pytest.raises(ConfigError, match="TLS_CERT"):
        Settings.from_env({}, tls_cert=str(pki.root / "missing.crt"), tls_key=str(pki.server.key))
    with pytest.raises(ConfigError, match="METRICS_TLS_CLIENT_CA"):
        Settings.from_env({}, metrics_tls_client_ca=str(pki.server.ca))


def test_metrics_and_webhook_take_the_grpc_pair_but_never_its_client_ca(pki: Pki) -> None:
    settings = Settings.from_env({}, **tls_settings(pki, mtls=True))
    grpc_files = settings.tls_files()
    assert grpc_files is not None and grpc_files.client_ca == str(pki.server.ca)
    for listener in ("metrics", "payment_webhook"):
        files = settings.tls_files(listener)
        assert files is not None
        assert (files.cert, files.key, files.client_ca) == (grpc_files.cert, grpc_files.key, "")
    assert Settings().tls_files("metrics") is None


async def test_a_key_that_does_not_match_its_certificate_is_refused_at_start(
    make_stockhold: Factory, pki: Pki
) -> None:
    other = server_cert(pki.ca).write(pki.root / "other")
    settings = Settings(tls_cert=str(pki.server.cert), tls_key=str(other.key))
    with pytest.raises(ValueError, match="grpc TLS files"):
        StockholdServer(settings, "redis://127.0.0.1:1")


# -- gRPC ------------------------------------------------------------------------------------------
async def test_plaintext_client_and_untrusted_server_refused_good_client_served(
    make_stockhold: Factory, pki: Pki
) -> None:
    running = await make_stockhold(**tls_settings(pki))
    ca = pki.ca.pem
    assert await check(running.address, None, plaintext=True) == grpc.StatusCode.UNAVAILABLE
    assert await check(running.address, pki.other.pem) == grpc.StatusCode.UNAVAILABLE
    assert await check(running.address, ca) == grpc.StatusCode.OK
    # Without a client CA, no client certificate is asked for.
    creds = grpc.ssl_channel_credentials(ca)
    async with grpc.aio.secure_channel(running.address, creds) as channel:
        reply = await pb_grpc.InventoryStub(channel).GetAvailability(
            pb.GetAvailabilityRequest(units=[pb.SalesUnit(sku="TEE")]), timeout=10
        )
    assert all(level.unit.sku == "TEE" for level in reply.levels)


async def test_mtls_refuses_no_expired_and_foreign_client_certificates(
    make_stockhold: Factory, pki: Pki
) -> None:
    running = await make_stockhold(**tls_settings(pki, mtls=True))
    ca, address = pki.ca.pem, running.address
    assert await check(address, ca) == grpc.StatusCode.UNAVAILABLE  # no certificate
    assert await check(address, ca, pki.expired) == grpc.StatusCode.UNAVAILABLE
    assert await check(address, ca, pki.foreign) == grpc.StatusCode.UNAVAILABLE
    assert await check(address, ca, pki.client) == grpc.StatusCode.OK


async def test_reload_rotates_certificate_and_client_ca_while_calls_in_flight_finish(
    make_stockhold: Factory, pki: Pki
) -> None:
    running = await make_stockhold(**tls_settings(pki, mtls=True))
    server, address = running.server, running.address
    new_client = pki.other.issue("checkout-2")
    old = grpc.ssl_channel_credentials(pki.ca.pem, pki.client.key_pem, pki.client.cert_pem)
    async with grpc.aio.secure_channel(address, old) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        # A call in flight across the reload: a Watch stream, answered before and after.
        watch = health.Watch(health_pb2.HealthCheckRequest(service="tls-test"), timeout=30)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        pki.rotate()
        server.reload()
        assert server.tls is not None and server.tls.reloads == 1
        # New connections: the new certificate (trusted through the new CA only) and the
        # new client CA; the old ones are refused.
        assert await check(address, pki.other.pem, new_client) == grpc.StatusCode.OK
        assert await check(address, pki.ca.pem, pki.client) == grpc.StatusCode.UNAVAILABLE
        assert await check(address, pki.other.pem, pki.client) == grpc.StatusCode.UNAVAILABLE
        # The open connection goes on: the stream gets its next message, a new call works.
        await server.health.set("tls-test", SERVING)
        second = await watch.read()
        assert second.status == SERVING
        watch.cancel()
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == SERVING


async def test_a_reload_with_broken_files_keeps_the_previous_ones(
    make_stockhold: Factory, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    running = await make_stockhold(**tls_settings(pki))
    pki.server.key.write_bytes(server_cert(pki.ca).key_pem)  # a key of another certificate
    running.server.reload()
    assert running.server.tls is not None and running.server.tls.reloads == 0
    assert any("tls reload failed" in r.getMessage() for r in caplog.records)
    assert await check(running.address, pki.ca.pem) == grpc.StatusCode.OK


# -- metrics and the payment webhook --------------------------------------------------------------
def fetch(url: str, context: ssl.SSLContext | None, data: bytes | None = None) -> tuple[int, str]:
    """(status, body) of one HTTP(S) request; an HTTP error status is an answer too."""
    try:
        with urllib.request.urlopen(url, data=data, timeout=10, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def client_context(ca: bytes, client: CertFiles | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.decode())
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    return context


def refused(call: Callable[[], Any]) -> bool:
    try:
        call()
    except (OSError, ssl.SSLError):  # URLError is an OSError
        return True
    return False


async def test_metrics_over_tls_with_mtls_reload_and_the_internal_collector(
    make_stockhold: Factory, pki: Pki
) -> None:
    port = free_port()
    running = await make_stockhold(
        **tls_settings(pki, mtls=True),
        metrics_port=port,
        metrics_tls_client_ca=str(pki.server.ca),
    )
    url = f"https://127.0.0.1:{port}/metrics"
    good = client_context(pki.ca.pem, pki.client_files)
    status, body = await asyncio.to_thread(fetch, url, good)
    assert status == 200
    # The collectors call the server's own gRPC (TLS + mTLS on): through the internal port.
    assert "stockhold_contention_up 1.0" in body
    assert await asyncio.to_thread(refused, lambda: fetch(url, client_context(pki.ca.pem)))
    assert await asyncio.to_thread(refused, lambda: fetch(f"http://127.0.0.1:{port}/metrics", None))
    pki.rotate()
    running.server.reload()
    new_client = pki.other.issue("scraper").write(pki.root / "scraper")
    status, _ = await asyncio.to_thread(fetch, url, client_context(pki.other.pem, new_client))
    assert status == 200
    assert await asyncio.to_thread(refused, lambda: fetch(url, good))


@pytest.fixture
async def fake() -> Any:
    async with FakeWeChatPay() as f:
        yield f


async def test_payment_webhook_over_tls_and_its_reload(
    redis_proc: RedisProc, fake: FakeWeChatPay, pki: Pki, tmp_path: Path
) -> None:
    started: list[StockholdServer] = []
    try:
        running = await start_server(
            redis_proc,
            started,
            None,
            **fake_config(fake, tmp_path / "wx"),
            **tls_settings(pki),
            payment_webhook_listen="127.0.0.1:0",
        )
        url = f"https://127.0.0.1:{running.server.webhook_port}/wechatpay/notify"
        # A notification without signature: refused by the handler, so served over TLS.
        status, _ = await asyncio.to_thread(fetch, url, client_context(pki.ca.pem), b"{}")
        assert 400 <= status < 500
        plain = url.replace("https", "http")
        assert await asyncio.to_thread(refused, lambda: fetch(plain, None, b"{}"))
        pki.rotate()
        running.server.reload()
        status, _ = await asyncio.to_thread(fetch, url, client_context(pki.other.pem), b"{}")
        assert 400 <= status < 500
        old = client_context(pki.ca.pem)
        assert await asyncio.to_thread(refused, lambda: fetch(url, old, b"{}"))
    finally:
        for server in started:
            await server.stop(grace=0)


# -- the CLI and real processes -------------------------------------------------------------------
async def test_cli_tls_flags_against_an_mtls_server(make_stockhold: Factory, pki: Pki) -> None:
    running = await make_stockhold(**tls_settings(pki, mtls=True))
    flags = ["--address", running.address, "--tls-ca", str(pki.server.ca)]
    mine = ["--tls-cert", str(pki.client_files.cert), "--tls-key", str(pki.client_files.key)]
    ok = await asyncio.to_thread(cli, "availability", "TEE", *flags, *mine)
    assert ok.returncode == 0, ok.stderr
    assert "levels" in json.loads(ok.stdout)
    # No client certificate; no TLS at all: refused (UNAVAILABLE, exit 1).
    for args in (flags, ["--address", running.address]):
        result = await asyncio.to_thread(cli, "health", *args, "--timeout", "5")
        assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
    # The client's variables; a key others may read is refused with its path and mode.
    env = {
        **child_env(),
        "STOCKHOLD_TLS_CA": str(pki.server.ca),
        "STOCKHOLD_TLS_CLIENT_CERT": str(pki.client_files.cert),
        "STOCKHOLD_TLS_CLIENT_KEY": str(pki.client_files.key),
    }
    health = [*STOCKHOLD, "health", "--address", running.address]
    result = await asyncio.to_thread(
        subprocess.run, health, capture_output=True, text=True, timeout=30, env=env
    )
    assert result.returncode == 0, result.stderr
    pki.client_files.key.chmod(0o640)
    result = await asyncio.to_thread(
        subprocess.run, health, capture_output=True, text=True, timeout=30, env=env
    )
    assert result.returncode != 0 and "0640" in result.stderr
    assert str(pki.client_files.key) in result.stderr


@pytest.fixture
def served(tmp_path: Path) -> Any:
    """Start `stockhold serve` processes: `served(*args)`; all are gone after the test."""
    started: list[Served] = []

    def start(*args: str, host: str = "127.0.0.1") -> Served:
        process = Served(tmp_path / "serve", list(args), host)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def wait_tls_healthy(served: Served, ca: Path, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            raise AssertionError(f"serve exited; stderr:\n{served.stderr}")
        result = cli("health", "--address", served.address, "--tls-ca", str(ca), "--timeout", "1")
        if result.returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"never healthy over TLS; stderr:\n{served.stderr}")


def health_with(address: str, ca: Path) -> int:
    return cli("health", "--address", address, "--tls-ca", str(ca), "--timeout", "5").returncode


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_to_stockhold_serve_rotates_the_certificate(
    served: Any, redis_proc: RedisProc, pki: Pki, workers: str
) -> None:
    """A real `stockhold serve` (one process, or a supervisor forwarding SIGHUP to two
    workers): after SIGHUP every new connection gets the new certificate."""
    process = served(
        "--redis-url",
        redis_proc.url,
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.server.key),
        "--workers",
        workers,
    )
    wait_tls_healthy(process, pki.server.ca)
    old_ca = pki.root / "old-ca.crt"
    old_ca.write_bytes(pki.ca.pem)
    pki.rotate()
    os.kill(process.proc.pid, signal.SIGHUP)
    # Several new connections (spread over the workers by SO_REUSEPORT): all the new one, once
    # every worker got the forwarded signal (each in its own time: wait, bounded).
    deadline = time.monotonic() + 20
    seen: list[int] = []
    while time.monotonic() < deadline:
        seen = [health_with(process.address, pki.server.ca) for _ in range(4)]
        if seen == [0] * 4:
            break
        time.sleep(0.2)
    assert seen == [0] * 4
    assert health_with(process.address, old_ca) == 1
    assert process.proc.poll() is None

    def reloaded() -> int:
        return sum(r.get("msg") == "tls certificate reloaded" for r in process.log_records())

    while reloaded() < int(workers) and time.monotonic() < deadline:  # every worker's line
        time.sleep(0.2)
    rc, _ = process.terminate()
    assert rc == 0
    assert reloaded() == int(workers)


def test_plaintext_on_a_non_loopback_address_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The WARNING names the address (the start-up helper, without starting a server)."""
    warn_plaintext(Settings(listen="0.0.0.0:50051"))
    warn_plaintext(Settings(listen="127.0.0.1:50051"))
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "0.0.0.0:50051" in caplog.records[0].getMessage()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_start_up_warnings_are_logged_once_whatever_the_workers(
    served: Any, redis_proc: RedisProc, workers: str
) -> None:
    """`serve --listen 0.0.0.0:P --allow-unauthenticated` (called on 127.0.0.1 only): the
    plaintext and the no-authentication WARNINGs once each, by the one process or by the
    supervisor, not again by each of its workers."""
    process = served(
        *("--redis-url", redis_proc.url, "--workers", workers, "--allow-unauthenticated"),
        host="0.0.0.0",
    )
    process.wait_serving()

    def records(msg: str) -> list[dict[str, Any]]:
        return [r for r in process.log_records() if msg in str(r.get("msg"))]

    deadline = time.monotonic() + 30
    while len(records("stockhold serving")) < int(workers) and time.monotonic() < deadline:
        time.sleep(0.1)  # every worker has started (and would have warned by now)
    assert len(records("stockhold serving")) == int(workers)
    rc, _ = process.terminate()
    assert rc == 0
    plaintext = records("serves plaintext (no TLS)")
    assert [r["level"] for r in plaintext] == ["WARNING"], plaintext
    assert "0.0.0.0:" in str(plaintext[0]["msg"])
    unauthenticated = records("serving without authentication")
    assert [r["level"] for r in unauthenticated] == ["WARNING"], unauthenticated


__all__ = ["Running"]
