"""Redis security (issue 13, docs/security.md "Redis"): TLS with client certificates, an ACL
user with the minimal ACL of stockhold.redis_acl, passwords from files, the embedded Redis's
requirepass, secret file modes, and no password in any log line or message.

The Debian redis-server links libssl: these tests start it with tls-port (port 0: no plain
listener) and require client certificates (tls-auth-clients yes).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import redis.exceptions
from certs import CertAuthority, CertFiles
from fake_wms import FakeWMS
from google.protobuf import duration_pb2
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_proc import RedisProc, free_port
from stockhold_fixtures import (
    TEST_SETTINGS,
    Factory,
    Running,
    add_stock,
    expect_error,
    line,
    unit,
)

from stockhold import reconcile
from stockhold.embedded import AUTH_CONF_NAME, EmbeddedRedis
from stockhold.redis_acl import acl_rules, setuser_line
from stockhold.secretfile import read_secret
from stockhold.server import StockholdServer, check_payments
from stockhold.settings import ConfigError, Settings, check_deployment
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
USER = "stockhold"
DEADLINE = 30.0


# -- Redis servers ---------------------------------------------------------------------------
def acl_user(client: redis.Redis, password: str, prefix: str = "sh") -> None:
    """Make the stockhold user with exactly the documented ACL (stockhold.redis_acl)."""
    client.execute_command(
        "ACL", "SETUSER", USER, "reset", "on", f">{password}", *acl_rules(prefix)
    )
    client.execute_command("ACL", "LOG", "RESET")


def acl_refusals(client: Any) -> list[Any]:
    """ACL LOG: every command Redis refused a user since the reset (NOPERM and failed AUTH)."""
    return list(client.execute_command("ACL", "LOG"))


class TlsRedis(RedisProc):
    """A RedisProc that listens with TLS only (port 0, tls-port) and wants client certs."""

    def __init__(self, binary: str, workdir: Path, server: CertFiles, client: CertFiles) -> None:
        self.server_files, self.client_files = server, client
        super().__init__(binary, workdir)

    def _command(self) -> list[str]:
        cmd = super()._command()
        at = cmd.index("--port")
        cmd[at + 1] = "0"  # no plaintext listener
        return [
            *cmd,
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            str(self.server_files.cert),
            "--tls-key-file",
            str(self.server_files.key),
            "--tls-ca-cert-file",
            str(self.server_files.ca),
            "--tls-auth-clients",
            "yes",
        ]

    def _tls(self) -> dict[str, Any]:
        c = self.client_files
        return {
            "ssl": True,
            "ssl_ca_certs": str(c.ca),
            "ssl_certfile": str(c.cert),
            "ssl_keyfile": str(c.key),
        }

    def _probe_client(self, timeout: float) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # as RedisProc's: no backoff after SHUTDOWN's disconnect
            **self._tls(),
        )

    def client(self, **kwargs: Any) -> redis.Redis:
        c = redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=10.0, **self._tls(), **kwargs
        )
        self._clients.append(c)
        return c

    def tls_url(self, user: str = USER) -> str:
        c = self.client_files
        return (
            f"rediss://{user}@127.0.0.1:{self.port}/0?ssl_ca_certs={c.ca}"
            f"&ssl_certfile={c.cert}&ssl_keyfile={c.key}&ssl_cert_reqs=required"
        )


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[CertFiles, CertFiles]:
    ca = CertAuthority("redis test CA")
    server = ca.issue("redis", dns=["localhost"], ips=["127.0.0.1"], server=True)
    client = ca.issue("stockhold")
    return server.write(tmp_path / "certs" / "server"), client.write(tmp_path / "certs" / "client")


@pytest.fixture
def tls_redis(
    redis_binary: str, tmp_path: Path, tls_files: tuple[CertFiles, CertFiles]
) -> Iterator[TlsRedis]:
    proc = TlsRedis(redis_binary, tmp_path / "redis-tls", *tls_files)
    try:
        proc.start()
    except RuntimeError as exc:  # a build without TLS refuses the tls-* directives
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server has no TLS: {exc}")
        raise
    try:
        yield proc
    finally:
        proc.stop()


def password_file(directory: Path, password: str, mode: int = 0o600) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"redis-{uuid.uuid4().hex[:6]}.pass"
    path.write_text(password + "\n")
    path.chmod(mode)
    return path


class Target:
    """What make_stockhold needs of a Redis: a URL and a (privileged) client."""

    def __init__(self, url: str, proc: RedisProc) -> None:
        self.url = url
        self.proc = proc

    def client(self, **kwargs: Any) -> redis.Redis:
        return self.proc.client(**kwargs)


# -- the flows -------------------------------------------------------------------------------
async def _until(what: str, check: Any, within: float = DEADLINE) -> None:
    give_up = time.monotonic() + within
    for _ in range(int(within / 0.05) + 1):
        if await check():
            return
        if time.monotonic() > give_up:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {within} s: {what}")


async def main_flows(running: Running, wms: FakeWMS | None = None) -> None:
    """Reserve, commit, release, extend, adjust, policies, expiry, events, subscriptions."""
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        if wms is not None:
            await stub.CreateSubscription(
                pb.CreateSubscriptionRequest(
                    subscription=pb.Subscription(name="wms", url=wms.url()), secret="s" * 16
                )
            )
            await stub.GetSubscription(pb.GetSubscriptionRequest(name="wms"))
            await stub.ListSubscriptions(pb.ListSubscriptionsRequest())
        await add_stock(stub, "A", "wh-1", 20)
        await add_stock(stub, "B", "wh-1", 20)
        for n, end in enumerate(("commit", "release", "expire", "extend")):
            order = f"o-{n}-{uuid.uuid4().hex[:6]}"
            hold = 1 if end == "expire" else 600
            await stub.Reserve(
                pb.ReserveRequest(
                    order_id=order, lines=[line("A", 1, "wh-1"), line("B", 2)], hold_seconds=hold
                )
            )
            if end == "commit":
                await stub.Commit(pb.CommitRequest(order_id=order, payment_ref="pay-1"))
            elif end == "release":
                await stub.Release(pb.ReleaseRequest(order_id=order, reason="test"))
            elif end == "extend":
                await stub.ExtendReservation(
                    pb.ExtendReservationRequest(order_id=order, hold_seconds=900)
                )
                await stub.MarkPaymentPending(
                    pb.MarkPaymentPendingRequest(
                        order_id=order,
                        payment=pb.PaymentPending(provider="wechatpay", out_trade_no=f"t-{order}"),
                    )
                )
            else:
                expired = order

        async def swept() -> bool:
            r = await stub.GetReservation(pb.GetReservationRequest(order_id=expired))
            return bool(r.state == pb.RESERVATION_STATE_EXPIRED)

        await _until("the sweeper expired the 1 s hold", swept)
        await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="A", hold_seconds=120, hot=True))
        await stub.GetSkuPolicy(pb.GetSkuPolicyRequest(sku="A"))
        await stub.ListSkuPolicies(pb.ListSkuPoliciesRequest())
        await stub.GetAvailability(pb.GetAvailabilityRequest(units=[unit("A"), unit("B")]))
        await stub.GetContentionStats(
            pb.GetContentionStatsRequest(window=duration_pb2.Duration(seconds=10))
        )
        watch = stub.WatchEvents(pb.WatchEventsRequest(cursor="earliest"))
        seen = 0
        async with asyncio.timeout(DEADLINE):
            async for _ in watch:
                seen += 1
                if seen >= 5:
                    break
        watch.cancel()
        if wms is not None:

            async def delivered() -> bool:
                return len(wms.ok()) >= 5

            await _until("the WMS got the events", delivered)
            await stub.GetSubscriptionLag(pb.GetSubscriptionLagRequest(name="wms"))
            await stub.ReplayFailed(pb.ReplayFailedRequest(name="wms"))
            await stub.DeleteSubscription(pb.DeleteSubscriptionRequest(name="wms"))


@pytest.fixture
async def wms() -> AsyncIterator[FakeWMS]:
    w = await FakeWMS("s" * 16).start()
    try:
        yield w
    finally:
        await w.stop()


def test_the_docs_give_exactly_the_acl_the_tests_use() -> None:
    doc = (ROOT / "docs" / "security.md").read_text()
    assert setuser_line() in doc, "docs/security.md must show stockhold.redis_acl.setuser_line()"


@pytest.mark.parametrize("hot", [True, False], ids=["hot-client", "redis-py"])
async def test_main_flows_as_the_minimal_acl_user(
    redis_proc: RedisProc, make_stockhold: Factory, wms: FakeWMS, tmp_path: Path, hot: bool
) -> None:
    admin = redis_proc.client()
    acl_user(admin, "pw-acl-1")
    pw = password_file(tmp_path, "pw-acl-1")
    target = Target(f"redis://{USER}@127.0.0.1:{redis_proc.port}/0", redis_proc)
    running = await make_stockhold(
        redis=target,
        redis_password_file=str(pw),
        redis_hot_client=hot,
        delivery_poll_interval_seconds=0.05,
    )
    await main_flows(running, wms)
    # snapshot and reconcile, as the same user
    settings = running.settings
    out = io.StringIO()
    snap = tmp_path / "snap.jsonl"
    assert await asyncio.to_thread(reconcile.snapshot, settings, snap, out) == 0
    assert await asyncio.to_thread(reconcile.reconcile, settings, snap, False, out) in (0, 1)
    assert acl_refusals(admin) == []
    keys: list[bytes] = list(admin.keys("*"))  # type: ignore[arg-type]
    assert keys and all(k.startswith(b"sh:") for k in keys)


async def test_main_flows_as_the_acl_user_on_a_cluster(
    cluster_store: Any, make_stockhold: Factory, wms: FakeWMS, tmp_path: Path
) -> None:
    nodes = [proc.client() for proc in cluster_store.cluster.nodes]
    try:
        for node in nodes:
            acl_user(node, "pw-acl-2")
        pw = password_file(tmp_path, "pw-acl-2")
        seed = cluster_store.url.replace("redis://", f"redis://{USER}@")
        target = Target(seed, cluster_store)
        running = await make_stockhold(
            redis=target, redis_password_file=str(pw), redis_cluster=True
        )
        await main_flows(running, wms)
        for node in nodes:
            assert acl_refusals(node) == [], node
    finally:
        for node in nodes:
            with contextlib.suppress(redis.RedisError):
                node.execute_command("ACL", "DELUSER", USER)


# -- TLS --------------------------------------------------------------------------------------
@pytest.mark.parametrize("hot", [True, False], ids=["hot-client", "redis-py"])
async def test_serving_through_redis_over_tls_as_an_acl_user(
    tls_redis: TlsRedis, make_stockhold: Factory, tmp_path: Path, hot: bool
) -> None:
    admin = tls_redis.client()
    acl_user(admin, "pw-tls-1")
    pw = password_file(tmp_path, "pw-tls-1")
    running = await make_stockhold(
        redis=Target(tls_redis.tls_url(), tls_redis),
        redis_password_file=str(pw),
        redis_hot_client=hot,
        redis_connect_timeout_seconds=5.0,
    )
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "A", "wh-1", 5)
        await stub.Reserve(pb.ReserveRequest(order_id="tls-1", lines=[line("A", 2, "wh-1")]))
        got = await stub.GetAvailability(pb.GetAvailabilityRequest(units=[unit("A")]))
        assert [lv.available for lv in got.levels] == [3]
    assert acl_refusals(admin) == []
    # Every connection of the server is TLS: a plaintext client cannot even connect.
    plain = redis.Redis(
        host="127.0.0.1",
        port=tls_redis.port,
        socket_timeout=2,
        socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 0),  # the refusal is expected: no seconds of backoff
    )
    with pytest.raises(redis.exceptions.ConnectionError):
        plain.ping()
    plain.close()


async def test_a_client_without_a_certificate_is_refused(tls_redis: TlsRedis) -> None:
    c = tls_redis.client_files
    no_cert = redis.Redis(
        host="127.0.0.1",
        port=tls_redis.port,
        ssl=True,
        ssl_ca_certs=str(c.ca),
        socket_timeout=3,
        retry=Retry(NoBackoff(), 0),  # the refusal is expected: no seconds of backoff
    )
    with pytest.raises((redis.exceptions.ConnectionError, ssl.SSLError)):
        no_cert.ping()
    no_cert.close()


# -- wrong passwords, and no password anywhere in what is logged --------------------------------
@pytest.mark.parametrize("where", ["file", "url"])
@pytest.mark.parametrize("hot", [True, False], ids=["hot-client", "redis-py"])
async def test_a_wrong_password_is_unavailable_and_never_logged(
    tls_redis: TlsRedis, tmp_path: Path, where: str, hot: bool
) -> None:
    """`stockhold serve` (its real logging, DEBUG) with a wrong password: calls are
    UNAVAILABLE / BACKEND_UNAVAILABLE, and the password is in no line it wrote."""
    acl_user(tls_redis.client(), "right-password-1")
    wrong = f"WrongSecret{uuid.uuid4().hex}"
    url = tls_redis.tls_url()
    env = {
        **os.environ,
        "STOCKHOLD_REDIS_HOT_CLIENT": "1" if hot else "0",
        "STOCKHOLD_REDIS_CONNECT_TIMEOUT_SECONDS": "5",
        "STOCKHOLD_HEALTH_INTERVAL_SECONDS": "0.1",
        "STOCKHOLD_LOG_LEVEL": "DEBUG",
    }
    if where == "file":
        env["STOCKHOLD_REDIS_PASSWORD_FILE"] = str(password_file(tmp_path, wrong))
    else:
        url = url.replace(f"{USER}@", f"{USER}:{wrong}@")
    port = free_port()
    log_path = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "stockhold.cli", "serve", "--workers", "1"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 (started once, not awaited on)
            [*cmd, "--listen", f"127.0.0.1:{port}", "--redis-url", url],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InventoryStub(channel)
            await asyncio.wait_for(channel.channel_ready(), DEADLINE)
            reserve = pb.ReserveRequest(order_id="w-1", lines=[line("A", 1, "wh-1")])
            err = await expect_error(stub.Reserve(reserve, timeout=DEADLINE))
            assert err.code == grpc.StatusCode.UNAVAILABLE, err
            assert err.reason == "BACKEND_UNAVAILABLE", err
            assert wrong not in repr(err)
            availability = pb.GetAvailabilityRequest(units=[unit("A")])
            err = await expect_error(stub.GetAvailability(availability, timeout=DEADLINE))
            assert err.code == grpc.StatusCode.UNAVAILABLE, err

        async def unreachable_logged() -> bool:
            return "redis unreachable" in log_path.read_text(errors="replace")

        await _until("the failure is logged", unreachable_logged)
    finally:
        proc.terminate()
        try:
            proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log_path.read_text(errors="replace")
    assert "health probe failed" in text
    assert wrong not in text, [ln for ln in text.splitlines() if wrong in ln]


def test_serve_refuses_an_open_password_file_and_help_shows_no_secret(tmp_path: Path) -> None:
    secret = f"EnvSecret{uuid.uuid4().hex}"
    pw = password_file(tmp_path, "whatever", mode=0o644)
    env = {
        **os.environ,
        "STOCKHOLD_REDIS_URL": f"redis://{USER}:{secret}@127.0.0.1:{free_port()}/0",
    }
    cli = [sys.executable, "-m", "stockhold.cli"]
    for args in (["--help"], ["serve", "--help"], ["snapshot", "--help"]):
        done = subprocess.run(cli + args, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and secret not in done.stdout + done.stderr
    env.pop("STOCKHOLD_REDIS_URL")
    url = f"redis://{USER}@127.0.0.1:{free_port()}/0"
    done = subprocess.run(
        [
            *cli,
            "serve",
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            url,
            "--redis-password-file",
            str(pw),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(pw) in lines[0] and "0644" in lines[0], lines
    # A password in both places is refused too, naming neither password.
    both = Settings(redis_url=f"redis://u:{secret}@h:1", redis_password_file=str(pw))
    with pytest.raises(ConfigError) as caught:
        check_deployment(both)
    assert secret not in str(caught.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_secret_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = password_file(tmp_path, "s3cret", mode=mode)
    with pytest.raises(ConfigError, match=re.escape(f"{mode:04o}")) as caught:
        read_secret(path, "redis_password_file")
    assert str(path) in str(caught.value) and "s3cret" not in str(caught.value)
    path.chmod(0o400)
    assert read_secret(path, "redis_password_file") == b"s3cret\n"


def test_wechatpay_secret_files_open_to_others_are_refused(tmp_path: Path) -> None:
    from fake_wechatpay import FakeWeChatPay
    from payment_helpers import fake_config

    config: dict[str, Any] = fake_config(FakeWeChatPay(), tmp_path / "wx")
    check_payments(Settings(**config))  # 0600 as written: loads
    for field in ("wechatpay_merchant_key_path", "wechatpay_api_v3_key_path"):
        path = Path(config[field])
        path.chmod(0o644)
        with pytest.raises(ConfigError) as caught:
            check_payments(Settings(**config))
        message = str(caught.value)
        assert str(path) in message and "0644" in message and field.upper() in message, message
        path.chmod(0o600)


# -- the embedded Redis ---------------------------------------------------------------------------
def _on_socket(er: EmbeddedRedis, **kwargs: Any) -> redis.Redis:
    """A client of the embedded Redis's socket. No retries: redis-py >= 6 retries a refused
    AUTH with backoff, seconds per expected refusal."""
    return redis.Redis(unix_socket_path=str(er.socket_path), retry=Retry(NoBackoff(), 0), **kwargs)


def test_embedded_redis_has_its_own_password_in_a_private_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    er = EmbeddedRedis(data_dir)
    er.start()
    try:
        first = er.password
        assert first and len(first) >= 32
        for name in (er.password_path, data_dir / AUTH_CONF_NAME):
            assert (os.stat(name).st_mode & 0o777) == 0o600, name
        assert er.password_path.read_text().strip() == first
        cmdline = Path(f"/proc/{er.pid}/cmdline").read_bytes()
        assert first.encode() not in cmdline  # never in ps
        anonymous = _on_socket(er, protocol=2)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        wrong = _on_socket(er, password="nope")
        with pytest.raises(redis.exceptions.AuthenticationError):
            wrong.ping()
        wrong.close()
        good = _on_socket(er, password=first)
        assert good.ping()
        good.set("sh:k", "v")
        good.close()
    finally:
        er.stop()
    # A restart rotates it: the old password no longer logs in; the data is kept.
    er.start()
    try:
        assert er.password and er.password != first
        old = _on_socket(er, password=first)
        with pytest.raises(redis.exceptions.AuthenticationError):
            old.ping()
        old.close()
        new = _on_socket(er, password=er.password)
        assert new.get("sh:k") == b"v"
        new.close()
    finally:
        er.stop()


async def test_a_server_on_the_embedded_redis_uses_its_password(tmp_path: Path) -> None:
    er = EmbeddedRedis(tmp_path / "data")
    er.start()
    try:
        settings = Settings(**TEST_SETTINGS, redis_password_file=str(er.password_path))
        server = StockholdServer(settings, er.url)
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.InventoryStub(channel)
                await add_stock(stub, "A", "wh-1", 3)
                await stub.Reserve(pb.ReserveRequest(order_id="e-1", lines=[line("A", 1, "wh-1")]))
        finally:
            await server.stop(grace=0)
    finally:
        er.stop()
