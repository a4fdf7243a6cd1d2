"""Who is calling (issue 13, docs/security.md): roles, tokens, rate limits, over the wire.

What is pinned: every Inventory RPC (from the service descriptor) x every role, no credentials
and a bad token: an allowed call gets past authorization, a refused one is UNAUTHENTICATED /
PERMISSION_DENIED (ErrorInfo: method, roles, identity) and writes nothing (a DUMP of the
keyspace before and after); SIGHUP reloads the token file (new token in, removed token out,
a call in flight goes on); a rate-limited identity is refused RATE_LIMITED with
retry_after_ms and writes nothing while another identity is served; an event's actor is
the caller's token name; no auth on a non-loopback address refuses to start unless
--allow-unauthenticated (a WARNING); the metrics collectors still work with auth on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from redis_proc import free_port
from stockhold_fixtures import Factory, expect_error, line, rich_error, snapshot
from test_actor import actor_of_event

from stockhold import auth, cli
from stockhold.auth import ROLE_METHODS, AuthFileError, hash_token, parse_auth
from stockhold.server import StockholdServer
from stockhold.settings import ConfigError, Settings
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
METHODS = pb.DESCRIPTOR.services_by_name["Inventory"].methods
# No background writes while a test compares DUMPs (sweeps, contention snapshots, delivery).
QUIET = {
    "sweep_interval_seconds": 3600.0,
    "contention_flush_seconds": 3600.0,
    "delivery_enabled": False,
}
WAIT_S = 20.0
DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def token_of(name: str) -> str:
    """A deterministic test token per caller name (real ones come from `auth hash-token`)."""
    return f"test-token-{name}-0123456789abcdef"


def auth_toml(callers: dict[str, list[str]], extra: str = "") -> str:
    lines = []
    for name, roles in callers.items():
        quoted = ", ".join(f'"{r}"' for r in roles)
        lines.append(
            f'[[token]]\nname = "{name}"\nhash = "{hash_token(token_of(name))}"\n'
            f"roles = [{quoted}]\n"
        )
    return "\n".join(lines) + extra


def bearer(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token_of(name)}"),)


ROLE_CALLERS = {f"as-{role}": [role] for role in ROLE_METHODS}


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "auth.toml"
    path.write_text(auth_toml(ROLE_CALLERS))
    return path


# -- the role table, over the wire ---------------------------------------------------------------


def request_for(name: str, n: int) -> Any:
    """A request of RPC `name` that would write (or read) something real if allowed; `n`
    keeps ids apart."""
    held, sku = "held-order", "TBL"
    r: dict[str, Any] = {
        "Reserve": pb.ReserveRequest(order_id=f"o-{n}", lines=[line(sku, 1, "wh-east")]),
        "ReserveBatch": pb.ReserveBatchRequest(
            orders=[pb.ReserveRequest(order_id=f"ob-{n}", lines=[line(sku, 1, "wh-east")])]
        ),
        "ReserveStream": pb.ReserveStreamRequest(
            correlation_id="1",
            request=pb.ReserveRequest(order_id=f"os-{n}", lines=[line(sku, 1, "wh-east")]),
        ),
        "Commit": pb.CommitRequest(order_id=held, payment_ref="p"),
        "Release": pb.ReleaseRequest(order_id=held, reason="r"),
        "GetReservation": pb.GetReservationRequest(order_id=held),
        "GetAvailability": pb.GetAvailabilityRequest(units=[pb.SalesUnit(sku=sku)]),
        "AdjustStock": pb.AdjustStockRequest(
            adjustment_id=f"a-{n}",
            unit=pb.SalesUnit(sku=sku),
            warehouse="wh-east",
            delta=5,
            reason="t",
        ),
        "SetSkuPolicy": pb.SetSkuPolicyRequest(sku=sku, max_line_quantity=10 + n),
        "GetSkuPolicy": pb.GetSkuPolicyRequest(sku=sku),
        "ExtendReservation": pb.ExtendReservationRequest(order_id=held, hold_seconds=9999),
        "ReportPayment": pb.ReportPaymentRequest(
            order_id=held,
            provider="wechatpay",
            transaction_id=f"t-{n}",
            status=pb.PAYMENT_STATUS_PAID,
            amount=1,
        ),
        "MarkPaymentPending": pb.MarkPaymentPendingRequest(
            order_id=held, payment=pb.PaymentPending(provider="wechatpay", out_trade_no=f"x{n}")
        ),
        "CreateSubscription": pb.CreateSubscriptionRequest(
            subscription=pb.Subscription(name=f"sub-{n}", url="http://127.0.0.1:9/hook")
        ),
        "GetSubscription": pb.GetSubscriptionRequest(name="sub-0"),
        "DeleteSubscription": pb.DeleteSubscriptionRequest(name="sub-0"),
        "GetSubscriptionLag": pb.GetSubscriptionLagRequest(name="sub-0"),
        "ReplayFailed": pb.ReplayFailedRequest(name="sub-0"),
        "ReplayFrom": pb.ReplayFromRequest(name="sub-0", cursor="earliest"),
        "SetOnHand": pb.SetOnHandRequest(
            count_id=f"c-{n}",
            unit=pb.SalesUnit(sku=sku),
            warehouse="wh-east",
            on_hand=50 + n,
            counted_at="2026-12-02T10:00:00+08:00",
        ),
    }
    if name in r:
        return r[name]
    method = pb.DESCRIPTOR.services_by_name["Inventory"].methods_by_name[name]
    return getattr(pb, method.input_type.name)()


async def call(
    stub: pb_grpc.InventoryAsyncStub, name: str, n: int, metadata: Any
) -> grpc.StatusCode | None:
    """Make the call; its error code (None: answered OK)."""
    method = pb.DESCRIPTOR.services_by_name["Inventory"].methods_by_name[name]
    request = request_for(name, n)
    rpc = getattr(stub, name)
    try:
        if method.client_streaming:
            async for _ in rpc(iter([request]), metadata=metadata, timeout=5):
                pass
        elif method.server_streaming:
            # An allowed watch runs until its deadline: past authorization all the same.
            async for _ in rpc(request, metadata=metadata, timeout=0.5):
                pass
        else:
            await rpc(request, metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as err:
        if err.code() in DENIED:
            info = rich_error(err)
            assert info.reason == err.code().name, info
            assert info.metadata["method"] == name
        return err.code()
    return None


async def seed(stub: pb_grpc.InventoryAsyncStub) -> None:
    """A held order and a subscription, so that refused calls would have something to write."""
    admin = bearer("as-admin")
    await stub.AdjustStock(
        pb.AdjustStockRequest(
            adjustment_id="seed",
            unit=pb.SalesUnit(sku="TBL"),
            warehouse="wh-east",
            delta=100,
            reason="t",
        ),
        metadata=admin,
    )
    await stub.Reserve(
        pb.ReserveRequest(order_id="held-order", lines=[line("TBL", 1, "wh-east")]),
        metadata=admin,
    )
    await stub.CreateSubscription(
        pb.CreateSubscriptionRequest(
            subscription=pb.Subscription(name="sub-0", url="http://127.0.0.1:9/hook")
        ),
        metadata=admin,
    )


def callers() -> dict[str, Any]:
    """caller label -> its metadata: one token per role, none, a bad token."""
    out: dict[str, Any] = {name: bearer(name) for name in ROLE_CALLERS}
    out["none"] = None
    out["bad-token"] = (("authorization", "Bearer not-a-known-token"),)
    return out


async def test_every_rpc_by_every_caller_follows_the_role_table(
    make_stockhold: Factory, auth_file: Path
) -> None:
    running = await make_stockhold(auth_file=str(auth_file), **QUIET)
    refused: list[tuple[str, str]] = []
    allowed: list[tuple[str, str]] = []
    for label in callers():
        roles = ROLE_CALLERS.get(label, [])
        for m in METHODS:
            ok = any(m.name in ROLE_METHODS[r] for r in roles)
            (allowed if ok else refused).append((label, m.name))
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        await seed(stub)
        before = await snapshot(running.redis)
        for n, (label, name) in enumerate(refused, 1):
            code = await call(stub, name, n, callers()[label])
            want = grpc.StatusCode.PERMISSION_DENIED
            if label in ("none", "bad-token"):
                want = grpc.StatusCode.UNAUTHENTICATED
            assert code == want, (label, name, code)
        assert await snapshot(running.redis) == before, "a refused call wrote something"
        for n, (label, name) in enumerate(allowed, 1000):
            code = await call(stub, name, n, callers()[label])
            assert code not in DENIED, (label, name, code)
    # Every RPC is callable by someone, and admin by all of them.
    assert {name for _, name in allowed} == {m.name for m in METHODS}
    assert ROLE_METHODS["admin"] == {m.name for m in METHODS}


async def test_a_refusal_names_method_roles_and_identity_and_is_logged_once(
    make_stockhold: Factory, auth_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = await make_stockhold(auth_file=str(auth_file), **QUIET)
    caplog.set_level(logging.WARNING, logger="stockhold.auth")
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        for _ in range(3):
            err = await expect_error(
                stub.AdjustStock(request_for("AdjustStock", 1), metadata=bearer("as-checkout"))
            )
    assert err.code is grpc.StatusCode.PERMISSION_DENIED
    assert err.metadata == {
        "method": "AdjustStock",
        "roles": "admin,warehouse",
        "identity": "as-checkout",
    }
    lines = [r for r in caplog.records if "AdjustStock refused" in r.getMessage()]
    assert len(lines) == 1 and lines[0].__dict__["identity"] == "as-checkout"


async def test_health_stays_open_and_reflection_follows_its_setting(
    make_stockhold: Factory, auth_file: Path
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    on = await make_stockhold(auth_file=str(auth_file), **QUIET)
    off = await make_stockhold(auth_file=str(auth_file), reflection="off", **QUIET)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async with on.channel() as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # A loopback caller without credentials may list the services (reflection=loopback).
        listing = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([request]))
        names = [s.name async for r in listing for s in r.list_services_response.service]
        assert "stockhold.v1.Inventory" in names
    async with off.channel() as ch:
        listing = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([request]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in listing:
                pass
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_reflection_is_for_loopback_peers() -> None:
    loop = auth._peer_is_loopback
    assert loop("ipv4:127.0.0.1:5000") and loop("ipv6:[::1]:5000") and loop("unix:/tmp/s")
    assert not loop("ipv4:10.0.0.7:5000") and not loop("ipv6:[2001:db8::1]:5000")


# -- rate limits ------------------------------------------------------------------------------


async def test_an_identity_over_its_rate_is_refused_and_another_is_served(
    make_stockhold: Factory, tmp_path: Path
) -> None:
    path = tmp_path / "auth.toml"
    # A burst of 2 and one token per 1000 s: the third call within the test is over, whatever
    # the machine's speed.
    extra = "\n[rate_limit.checkout]\nper_second = 0.001\nburst = 2\n"
    path.write_text(
        auth_toml({"shop-a": ["checkout"], "shop-b": ["checkout"], "ops": ["admin"]}, extra)
    )
    running = await make_stockhold(auth_file=str(path), **QUIET)
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        await stub.AdjustStock(
            pb.AdjustStockRequest(
                adjustment_id="rl", unit=pb.SalesUnit(sku="RL"), warehouse="wh-east", delta=10
            ),
            metadata=bearer("ops"),
        )

        def reserve(order_id: str) -> pb.ReserveRequest:
            return pb.ReserveRequest(order_id=order_id, lines=[line("RL", 1, "wh-east")])

        for i in range(2):
            await stub.Reserve(reserve(f"a-{i}"), metadata=bearer("shop-a"))
        before = await snapshot(running.redis)
        for i in range(3):
            err = await expect_error(
                stub.Reserve(reserve(f"a-over-{i}"), metadata=bearer("shop-a"))
            )
            assert err.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.reason == "RATE_LIMITED"
            assert err.metadata["identity"] == "shop-a"
            assert 0 < int(err.metadata["retry_after_ms"]) <= 1_000_000
        assert await snapshot(running.redis) == before, "a rate-limited call wrote something"
        # Another identity of the same role has its own bucket; admin has no limit.
        await stub.Reserve(reserve("b-0"), metadata=bearer("shop-b"))
        for _ in range(3):
            await stub.GetReservation(
                pb.GetReservationRequest(order_id="b-0"), metadata=bearer("ops")
            )


def test_token_buckets_refill_at_their_rate() -> None:
    now = [100.0]
    limiter = auth.RateLimiter(clock=lambda: now[0])
    rate = auth.Rate(per_second=2.0, burst=3.0)
    assert [limiter.take("x", rate) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("x", rate) == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.take("x", rate) == 0.0
    now[0] += 100
    assert [limiter.take("x", rate) for _ in range(4)][-1] > 0  # the burst caps the refill


def test_several_roles_get_the_most_generous_limit() -> None:
    text = auth_toml({"both": ["checkout", "payments"], "free": ["checkout", "admin"]})
    text += "\n[rate_limit.checkout]\nper_second = 10\nburst = 20\n"
    text += "\n[rate_limit.payments]\nper_second = 50\nburst = 5\n"
    config = parse_auth(text, "auth.toml")
    both = config.by_token(token_of("both"))
    free = config.by_token(token_of("free"))
    assert both is not None and both.rate == auth.Rate(50.0, 20.0)
    assert free is not None and free.rate is None  # admin has no limit


# -- the event's actor ----------------------------------------------------------------------------


async def test_an_event_records_the_token_name_as_its_actor(
    make_stockhold: Factory, auth_file: Path
) -> None:
    running = await make_stockhold(auth_file=str(auth_file), **QUIET)
    async with running.channel() as ch:
        stub = pb_grpc.InventoryStub(ch)
        await stub.AdjustStock(request_for("AdjustStock", 7), metadata=bearer("as-warehouse"))
        await stub.Reserve(
            pb.ReserveRequest(order_id="actor-1", lines=[line("TBL", 1, "wh-east")]),
            metadata=bearer("as-checkout"),
        )
    assert actor_of_event(running, "ORDER_RESERVED", "actor-1") == "as-checkout"


# -- SIGHUP: the token file reloads ---------------------------------------------------------------


@pytest.fixture
def serve_proc(redis_proc: Any, tmp_path: Path) -> Iterator[Any]:
    """Start `stockhold serve` (one process) with an auth file; yields a starter."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(path: Path, *flags: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        env = dict(os.environ, STOCKHOLD_REDIS_URL=redis_proc.url, STOCKHOLD_PARTITIONS="16")
        cmd = [sys.executable, "-m", "stockhold.cli", "serve", "--workers", "1"]
        cmd += ["--listen", f"127.0.0.1:{port}", "--auth-file", str(path), *flags]
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        procs.append(proc)
        return proc, f"127.0.0.1:{port}"

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


async def serving(address: str, metadata: Any) -> pb_grpc.InventoryAsyncStub:
    give_up = time.monotonic() + WAIT_S
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.InventoryStub(ch)
        while True:
            try:
                await stub.ListSkuPolicies(
                    pb.ListSkuPoliciesRequest(), metadata=metadata, timeout=1
                )
                return stub
            except grpc.aio.AioRpcError:
                assert time.monotonic() < give_up, "the server did not answer"
                await asyncio.sleep(0.1)


async def eventually_code(
    stub: pb_grpc.InventoryAsyncStub, metadata: Any, want: grpc.StatusCode | None
) -> None:
    """Poll (bounded) until a ListSkuPolicies call with `metadata` ends with `want`."""
    give_up = time.monotonic() + WAIT_S
    while True:
        try:
            await stub.ListSkuPolicies(pb.ListSkuPoliciesRequest(), metadata=metadata, timeout=2)
            code = None
        except grpc.aio.AioRpcError as err:
            code = err.code()
        if code == want:
            return
        assert time.monotonic() < give_up, f"still {code}, not {want}"
        await asyncio.sleep(0.05)


async def test_sighup_reloads_the_token_file_and_calls_in_flight_go_on(
    serve_proc: Any, tmp_path: Path
) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(auth_toml({"old-ops": ["admin"]}))
    proc, address = serve_proc(path)
    await serving(address, bearer("old-ops"))
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.InventoryStub(ch)
        watch = stub.WatchEvents(
            pb.WatchEventsRequest(cursor="earliest"), metadata=bearer("old-ops")
        )
        await stub.AdjustStock(request_for("AdjustStock", 1), metadata=bearer("old-ops"))
        first = await asyncio.wait_for(watch.read(), WAIT_S)
        assert isinstance(first, pb.Event) and first.type == "STOCK_ADJUSTED"
        # Rotate: old-ops goes, new-ops comes.
        path.write_text(auth_toml({"new-ops": ["admin"]}))
        proc.send_signal(signal.SIGHUP)
        await eventually_code(stub, bearer("new-ops"), None)
        await eventually_code(stub, bearer("old-ops"), grpc.StatusCode.UNAUTHENTICATED)
        # The watch authorized before the reload goes on.
        await stub.AdjustStock(request_for("AdjustStock", 2), metadata=bearer("new-ops"))
        second = await asyncio.wait_for(watch.read(), WAIT_S)
        assert isinstance(second, pb.Event)
        assert second.type == "STOCK_ADJUSTED" and second.actor == "new-ops"
        watch.cancel()
        # A bad file keeps the one in force.
        path.write_text("[[token]]\nname = 1\n")
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        await eventually_code(stub, bearer("new-ops"), None)
    assert proc.poll() is None


async def test_a_bad_file_on_reload_keeps_the_previous_one(
    make_stockhold: Factory, auth_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = await make_stockhold(auth_file=str(auth_file), **QUIET)
    bad = '[[token]]\nname = "x"\nhash = "md5:00"\nroles = ["admin"]\n'
    await asyncio.to_thread(auth_file.write_text, bad)
    with caplog.at_level(logging.ERROR, logger="stockhold.auth"):
        running.server.reload()
    assert any(
        "not reloaded" in r.getMessage() and "[[token]] #1" in r.getMessage()
        for r in caplog.records
    )
    async with running.channel() as ch:
        await pb_grpc.InventoryStub(ch).ListSkuPolicies(
            pb.ListSkuPoliciesRequest(), metadata=bearer("as-admin")
        )


# -- start-up rules -----------------------------------------------------------------------------


def test_no_auth_on_a_non_loopback_address_refuses_to_start(redis_proc: Any) -> None:
    env = dict(os.environ, STOCKHOLD_REDIS_URL=redis_proc.url)
    env.pop("STOCKHOLD_AUTH_FILE", None)
    cmd = [sys.executable, "-m", "stockhold.cli", "serve", "--workers", "1"]
    done = subprocess.run(
        [*cmd, "--listen", "0.0.0.0:0"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--auth-file" in lines[0] and "--allow-unauthenticated" in lines[0]
    # The same rule for a server built in-process (before anything binds).
    with pytest.raises(ConfigError):
        StockholdServer(Settings(listen="0.0.0.0:0"), redis_proc.url)


def test_allow_unauthenticated_warns_naming_the_flag(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(listen="0.0.0.0:50051", allow_unauthenticated=True)
    assert auth.check_auth_settings(settings) is None
    with caplog.at_level(logging.WARNING, logger="stockhold.auth"):
        auth.warn_unauthenticated(settings)
    (record,) = caplog.records
    assert "--allow-unauthenticated" in record.getMessage()
    # Loopback without auth: today's behaviour, no warning.
    assert auth.check_auth_settings(Settings(listen="127.0.0.1:50051")) is None


def test_a_bad_auth_file_names_the_file_and_the_entry(tmp_path: Path) -> None:
    good = hash_token("t")

    def token(name: str, digest: str, roles: str) -> str:
        return f'[[token]]\nname = "{name}"\nhash = "{digest}"\nroles = {roles}\n'

    twice = token("a", good, '["admin"]') + token("a", hash_token("u"), '["admin"]')
    cases = {
        "x = 1\n": "unknown section 'x'",
        token("a", good, '["chef"]'): "[[token]] #1 (name 'a'): unknown role 'chef'",
        twice: "[[token]] #2 (name 'a'): name 'a' is given twice",
        token("a", "plain", '["admin"]'): "hash must be sha256:",
        '[[client]]\nidentity = "spiffe://x"\nroles = []\n': (
            "[[client]] #1 (identity 'spiffe://x'): roles must be"
        ),
        "[rate_limit.checkout]\nper_second = -1\n": (
            "[rate_limit.checkout]: per_second must be a number > 0"
        ),
        "[[token\n": "not valid TOML",
    }
    for text, expected in cases.items():
        path = tmp_path / "auth.toml"
        path.write_text(text)
        with pytest.raises(AuthFileError) as caught:
            auth.load_auth(path)
        message = str(caught.value)
        assert message.startswith(f"auth file {path}: ") and expected in message, message
        assert "\n" not in message
    with pytest.raises(AuthFileError, match="cannot read it"):
        auth.load_auth(tmp_path / "missing.toml")


# -- identities ---------------------------------------------------------------------------------


def test_a_certificate_identity_is_its_san_uri_then_dns_then_cn() -> None:
    # Shaped like grpc 1.85's context.auth_context() for a verified client certificate.
    full = {
        "transport_security_type": [b"ssl"],
        "x509_common_name": [b"checkout"],
        "x509_subject_alternative_name": [b"co.shop", b"spiffe://shop/checkout"],
        "peer_dns": [b"co.shop"],
        "peer_uri": [b"spiffe://shop/checkout"],
    }
    assert auth.cert_identity(full) == "spiffe://shop/checkout"
    assert auth.cert_identity({k: v for k, v in full.items() if k != "peer_uri"}) == "co.shop"
    just_cn = {"transport_security_type": [b"ssl"], "x509_common_name": [b"justcn"]}
    assert auth.cert_identity(just_cn) == "justcn"
    plain = {"transport_security_type": [b"insecure"], "security_level": [b"TSI_SECURITY_NONE"]}
    assert auth.cert_identity(plain) is None


def test_the_bearer_header() -> None:
    assert auth.bearer((("authorization", "Bearer abc"),)) == "abc"
    assert auth.bearer((("authorization", "bearer  abc "),)) == "abc"
    assert auth.bearer((("authorization", "Basic abc"),)) == ""
    assert auth.bearer((("x-other", "1"),)) is None and auth.bearer(None) is None


# -- internal callers and the CLI -----------------------------------------------------------------


async def test_the_metrics_collectors_still_answer_with_auth_on(
    make_stockhold: Factory, auth_file: Path
) -> None:
    port = free_port()
    await make_stockhold(auth_file=str(auth_file), metrics_port=port, **QUIET)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return str(r.read().decode())

    text = await asyncio.to_thread(scrape)
    assert "stockhold_contention_up 1.0" in text
    assert "stockhold_subscription_lag_up 1.0" in text


async def test_the_cli_sends_its_token(
    make_stockhold: Factory, auth_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running = await make_stockhold(auth_file=str(auth_file), **QUIET)
    token_file = tmp_path / "token"
    token_file.write_text(token_of("as-operator") + "\n")
    args = ["policy", "list", "--address", running.address]
    code = await asyncio.to_thread(cli.main, [*args, "--token-file", str(token_file)])
    assert code == 0
    code = await asyncio.to_thread(cli.main, args)
    assert code == 1 and "UNAUTHENTICATED" in capsys.readouterr().err


def test_hash_token_prints_the_entry(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret-token\n"))
    assert cli.main(["auth", "hash-token", "--name", "eu", "--roles", "checkout,payments"]) == 0
    config = parse_auth(capsys.readouterr().out, "printed")
    principal = config.by_token("s3cret-token")
    assert principal is not None and principal.roles == ("checkout", "payments")


# -- docs -------------------------------------------------------------------------------------


def test_the_security_doc_table_is_role_methods() -> None:
    doc = (ROOT / "docs" / "security.md").read_text()
    table: dict[str, set[str]] = {}
    for row in doc.splitlines():
        cells = [c.strip().strip("`") for c in row.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] in ROLE_METHODS:
            table[cells[0]] = {m.strip().strip("`") for m in cells[1].split(",")}
    expected = {r: set(ms) for r, ms in ROLE_METHODS.items() if r != "admin"}
    assert {r: ms for r, ms in table.items() if r != "admin"} == expected
    assert "admin" in table


# -- the certificate identity over the wire (mTLS) ----------------------------------------------


async def test_a_client_certificate_is_an_identity_with_roles(
    make_stockhold: Factory, tmp_path: Path
) -> None:
    from test_tls import Pki, tls_settings

    pki = Pki(tmp_path / "pki")
    path = tmp_path / "auth.toml"
    text = auth_toml({"ops": ["admin"]})
    text += '\n[[client]]\nidentity = "spiffe://shop/checkout"\nroles = ["checkout"]\n'
    await asyncio.to_thread(path.write_text, text)
    running = await make_stockhold(auth_file=str(path), **tls_settings(pki, mtls=True), **QUIET)

    def channel(client: Any) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(pki.ca.pem, client.key_pem, client.cert_pem)
        return grpc.aio.secure_channel(running.address, creds)

    async with channel(pki.client) as ch:
        stub = pb_grpc.InventoryStub(ch)
        # A token wins over the certificate.
        await stub.AdjustStock(request_for("AdjustStock", 1), metadata=bearer("ops"))
        await stub.Reserve(
            pb.ReserveRequest(order_id="cert-1", lines=[line("TBL", 1, "wh-east")]), timeout=10
        )
        err = await expect_error(stub.AdjustStock(request_for("AdjustStock", 2)))
        assert err.code is grpc.StatusCode.PERMISSION_DENIED
        assert err.metadata["identity"] == "spiffe://shop/checkout"
    assert actor_of_event(running, "ORDER_RESERVED", "cert-1") == "spiffe://shop/checkout"
    # A certificate the CA signed for an identity the auth file does not know.
    async with channel(pki.ca.issue("stranger")) as ch:
        err = await expect_error(
            pb_grpc.InventoryStub(ch).GetAvailability(request_for("GetAvailability", 1))
        )
        assert err.code is grpc.StatusCode.UNAUTHENTICATED
