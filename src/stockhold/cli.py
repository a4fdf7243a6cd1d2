"""`stockhold`: run the server, or talk to a running one (JSON out, rich errors on stderr)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from stockhold import top
from stockhold.client import add_client_args, client_channel, connector
from stockhold.constants import SERVICE_NAME
from stockhold.settings import ConfigError, Settings, check_deployment, worker_count
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _serve(args: argparse.Namespace) -> int:
    """Check every setting and address first (one line and exit 2, or 1 for an address that
    cannot be bound), then serve: one process, or a supervisor and its workers."""
    import uvloop

    from stockhold import logs, tls
    from stockhold.auth import check_auth_settings
    from stockhold.secretfile import check_secret_files
    from stockhold.server import BindError, check_listen, check_payments, serve
    from stockhold.supervisor import WORKER_CANNOT_START, Supervisor

    flags = {field: flag for flag, field, _ in _SERVE_FLAGS}
    try:
        settings = Settings.from_env(
            **{field: getattr(args, _dest(flag)) for flag, field, _ in _SERVE_FLAGS}
        )
        check_deployment(settings)
        workers = worker_count(args.workers, settings)
        check_payments(settings)
        check_secret_files(settings)
        check_auth_settings(settings)
        tls.check(settings)
        check_listen(settings)
        logs.configure(settings.log_level)
        if workers > 1:
            # Workers get the same flags (minus --workers); the Redis URL comes from the
            # parent. Each checks them again, so a worker starts only as the parent did.
            argv: list[str] = []
            for flag, _, _ in _WORKER_FLAGS:
                value = getattr(args, _dest(flag))
                if value is not None:
                    argv += [flag] if flag in _SWITCHES else [flag, value]
            return Supervisor(settings, workers, argv).run()
        code = uvloop.run(serve(settings, supervised=args.supervised))
    except ConfigError as err:
        err.flag = err.flag or flags.get(err.field)
        print(f"stockhold: {err}", file=sys.stderr)
        code = 2
    except BindError as err:
        print(f"stockhold: {err}", file=sys.stderr)
        code = 1
    # A supervised worker that cannot start says so with its own status: a fresh worker
    # would fail the same way, so the supervisor stops instead of restarting it.
    return WORKER_CANNOT_START if args.supervised and code in (1, 2) else code


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


# The serve flags a supervisor passes on to its workers (the Redis URL goes by environment),
# as (flag, setting, help). Their text is parsed and checked by Settings, like the variables.
_WORKER_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--listen", "listen", "HOST:PORT (env STOCKHOLD_LISTEN, default 127.0.0.1:50051)"),
    ("--data-dir", "data_dir", "embedded Redis data (default ./.stockhold)"),
    ("--partitions", "partitions", "partition count, fixed per deployment"),
    ("--default-hold-seconds", "default_hold_seconds", "hold length when none is asked"),
    ("--warehouse-priority", "warehouse_priority", "comma-separated allocation order"),
    ("--log-level", "log_level", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    # Every worker binds it (SO_REUSEPORT); see docs/payments.md.
    (
        "--payment-webhook-listen",
        "payment_webhook_listen",
        "HOST:PORT of the WeChat Pay notification endpoint",
    ),
    (
        "--redis-cluster",
        "redis_cluster",
        "--redis-url names a node of a Redis Cluster (env STOCKHOLD_REDIS_CLUSTER=1)",
    ),
    (
        "--redis-wait-replicas",
        "redis_wait_replicas",
        "replicas that must acknowledge each write (WAIT) before it is answered; default 0",
    ),
    (
        "--redis-wait-timeout-ms",
        "redis_wait_timeout_ms",
        "longest WAIT for those acknowledgements (default 200)",
    ),
    (
        "--recovery-window-seconds",
        "recovery_window_seconds",
        "half-done cross-slot orders are finished or undone within this (default 5)",
    ),
    # Who may call (docs/security.md).
    (
        "--auth-file",
        "auth_file",
        "TOML file of callers (token hashes, client certificates) and their roles; reloaded "
        "on SIGHUP (env STOCKHOLD_AUTH_FILE)",
    ),
    (
        "--allow-unauthenticated",
        "allow_unauthenticated",
        "serve a non-loopback address without an auth file (logged as a WARNING)",
    ),
    ("--reflection", "reflection", "loopback (default: loopback callers and admin), on, off"),
    ("--max-message-bytes", "max_message_bytes", "largest message either way (default 1 MiB)"),
    # TLS (docs/security.md "TLS"); SIGHUP reloads the files.
    ("--tls-cert", "tls_cert", "gRPC certificate chain, PEM (with --tls-key: TLS)"),
    ("--tls-key", "tls_key", "its private key, PEM, mode 0600"),
    ("--tls-client-ca", "tls_client_ca", "CA of client certificates: required (mTLS)"),
    (
        "--payment-webhook-tls-cert",
        "payment_webhook_tls_cert",
        "webhook certificate (default: --tls-cert)",
    ),
    ("--payment-webhook-tls-key", "payment_webhook_tls_key", "its key (default: --tls-key)"),
    (
        "--payment-webhook-tls-client-ca",
        "payment_webhook_tls_client_ca",
        "CA of the webhook's client certificates (mTLS; never inherited)",
    ),
)
# Serve flags without a value (the setting is then "1").
_SWITCHES: Final = frozenset({"--redis-cluster", "--allow-unauthenticated"})

# Serve flags a supervisor keeps to itself: with --workers N it alone serves /metrics (the
# workers record into its multiprocess directory), so none of these go to the workers.
_METRICS_FLAGS: tuple[tuple[str, str, str], ...] = (
    (
        "--metrics-port",
        "metrics_port",
        "serve Prometheus /metrics on this port (env STOCKHOLD_METRICS_PORT; 0: off)",
    ),
    ("--metrics-host", "metrics_host", "address the metrics endpoint binds (default 127.0.0.1)"),
    ("--metrics-top-n", "metrics_contention_top_n", "top contended keys exported as gauges"),
    ("--metrics-tls-cert", "metrics_tls_cert", "metrics certificate (default: --tls-cert)"),
    ("--metrics-tls-key", "metrics_tls_key", "its key (default: --tls-key)"),
    (
        "--metrics-tls-client-ca",
        "metrics_tls_client_ca",
        "CA of scrapers' client certificates (mTLS; never inherited)",
    ),
)
_SERVE_FLAGS: tuple[tuple[str, str, str], ...] = (
    (
        "--redis-url",
        "redis_url",
        "redis://, rediss:// or unix:// URL (env STOCKHOLD_REDIS_URL); none: embedded redis-server",
    ),
    (
        "--redis-password-file",
        "redis_password_file",
        "file (mode 0600) holding the Redis password, instead of the URL "
        "(env STOCKHOLD_REDIS_PASSWORD_FILE)",
    ),
    *_WORKER_FLAGS,
    *_METRICS_FLAGS,
)


_KEY_PREFIX_FLAG = (
    "--key-prefix",
    "key_prefix",
    "first segment of every key (env STOCKHOLD_KEY_PREFIX)",
)

# `migrate-layout` takes the serve flags that find the data, plus the key prefix.
_MIGRATE_FLAGS: tuple[tuple[str, str, str], ...] = (
    *(
        f
        for f in _SERVE_FLAGS
        if f[0] in ("--redis-url", "--redis-password-file", "--data-dir", "--partitions")
    ),
    _KEY_PREFIX_FLAG,
    ("--redis-cluster", "redis_cluster", "refused: a Redis Cluster never held layout-1 data"),
)


def _settings_of(args: argparse.Namespace, table: tuple[tuple[str, str, str], ...]) -> Settings:
    """Settings as `serve` reads them, from the environment and the flags of `table`; a
    ConfigError names the flag of the setting it is about."""
    try:
        return Settings.from_env(**{field: getattr(args, _dest(flag)) for flag, field, _ in table})
    except ConfigError as err:
        err.flag = err.flag or {field: flag for flag, field, _ in table}.get(err.field)
        raise


def _migrate_layout(args: argparse.Namespace) -> int:
    """Settings as `serve` reads them (one line and exit 2 for a mistake), then migrate."""
    from stockhold import logs, migrate

    try:
        settings = _settings_of(args, _MIGRATE_FLAGS)
    except ConfigError as err:
        print(f"stockhold: {err}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    return migrate.run(settings, dry_run=args.dry_run)


# -- client commands ---------------------------------------------------------------------------
def _unit(args: argparse.Namespace) -> pb.SalesUnit:
    return pb.SalesUnit(sku=args.sku, spec=args.spec, barcode=args.barcode)


def _line(text: str) -> pb.ReserveLine:
    """Parse `sku=A,spec=B,barcode=C,warehouse=W,qty=N` (spec/barcode/warehouse optional)."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected key=value, got {part!r}")
        fields[key.strip()] = value
    unknown = set(fields) - {"sku", "spec", "barcode", "warehouse", "qty", "quantity"}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown line field(s): {', '.join(sorted(unknown))}")
    try:
        qty = int(fields.get("qty", fields.get("quantity", "1")))
    except ValueError as exc:
        raise argparse.ArgumentTypeError("qty must be an integer") from exc
    unit = pb.SalesUnit(
        sku=fields.get("sku", ""), spec=fields.get("spec", ""), barcode=fields.get("barcode", "")
    )
    return pb.ReserveLine(unit=unit, warehouse=fields.get("warehouse", ""), quantity=qty)


def _pending(text: str) -> pb.PaymentPending:
    """Parse `provider:out_trade_no`."""
    provider, sep, out_trade_no = text.partition(":")
    if not sep or not provider or not out_trade_no:
        raise argparse.ArgumentTypeError(f"expected PROVIDER:OUT_TRADE_NO, got {text!r}")
    return pb.PaymentPending(provider=provider, out_trade_no=out_trade_no)


def _client_call(args: argparse.Namespace, call: Callable[[pb_grpc.InventoryStub], Message]) -> int:
    with client_channel(args) as channel:
        try:
            reply = call(pb_grpc.InventoryStub(channel))
        except grpc.RpcError as err:
            _print_error(err)
            return 1
    text = json_format.MessageToJson(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, indent=2
    )
    print(text)
    return 0


def _print_error(err: grpc.RpcError) -> None:
    """CODE: message, then ErrorInfo reason/metadata and BadRequest violations, on stderr."""
    code = err.code()
    print(f"error: {code.name}: {err.details()}", file=sys.stderr)
    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(info):
            meta = " ".join(f"{k}={v}" for k, v in sorted(info.metadata.items()))
            print(f"  reason: {info.reason} {meta}".rstrip(), file=sys.stderr)
        elif detail.Unpack(bad):
            for v in bad.field_violations:
                print(f"  field {v.field}: {v.description}", file=sys.stderr)


def _health(args: argparse.Namespace) -> int:
    with client_channel(args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            _print_error(err)
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(name)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


# Optional SetSkuPolicyRequest fields: only those given on the command line are sent.
_POLICY_FIELDS: Final = ("reserve_timeout_ms", "hold_seconds", "max_line_quantity", "hot", "pinned")
# `policy list --all` follows next_page_token at most this many pages.
_MAX_POLICY_PAGES: Final = 1000


def policy_set_request(args: argparse.Namespace) -> pb.SetSkuPolicyRequest:
    """The SetSkuPolicy request of `policy set`: an optional field is present iff its flag is."""
    request = pb.SetSkuPolicyRequest(sku=args.sku, reset=args.reset)
    for name in _POLICY_FIELDS:
        value = getattr(args, name)
        if value is not None:
            setattr(request, name, value)
    return request


def _policy_list(args: argparse.Namespace, stub: pb_grpc.InventoryStub) -> Message:
    request = pb.ListSkuPoliciesRequest(
        page_size=args.page_size, page_token=args.page_token, hot_only=args.hot_only
    )
    reply = stub.ListSkuPolicies(request, timeout=args.timeout)
    if not args.all:
        return reply
    merged = pb.ListSkuPoliciesResponse(policies=reply.policies)
    seen = {request.page_token}
    pages = 1
    while reply.next_page_token and pages < _MAX_POLICY_PAGES:
        if reply.next_page_token in seen:  # a token seen before would loop forever
            raise SystemExit(f"error: the server repeated page token {reply.next_page_token!r}")
        seen.add(reply.next_page_token)
        request.page_token = reply.next_page_token
        reply = stub.ListSkuPolicies(request, timeout=args.timeout)
        merged.policies.extend(reply.policies)
        pages += 1
    merged.next_page_token = reply.next_page_token
    if merged.next_page_token:
        print(
            f"warning: stopped after {pages} pages; continue with --page-token",
            file=sys.stderr,
        )
    return merged


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
        return value

    return parse


def _top(args: argparse.Namespace) -> int:
    return top.run(
        args.address,
        interval=args.interval,
        top_n=args.top,
        window_s=args.window,
        since_start=args.since_start,
        iterations=1 if args.once else args.iterations,
        timeout=args.timeout,
        connect=connector(args),
    )


def _commands(sub: Any) -> None:
    def client(name: str, help_: str, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_)
        p.add_argument(
            "--address",
            default=os.environ.get("STOCKHOLD_ADDRESS", DEFAULT_ADDRESS),
            help="server address (env STOCKHOLD_ADDRESS, default %(default)s)",
        )
        p.add_argument("--timeout", type=float, default=5.0, help="call deadline in seconds")
        add_client_args(p)
        return p

    def unit_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("sku")
        p.add_argument("--spec", default="")
        p.add_argument("--barcode", default="")

    p = client("adjust", "receipt (+) or shrinkage (-) of stock in one warehouse")
    unit_args(p)
    p.add_argument("--warehouse", required=True)
    p.add_argument("--delta", type=int, required=True)
    p.add_argument("--reason", default="")
    p.add_argument("--id", dest="adjustment_id", help="idempotency key (default: a new UUID)")
    p.set_defaults(
        run=lambda a: _client_call(
            a,
            lambda s: s.AdjustStock(
                pb.AdjustStockRequest(
                    adjustment_id=a.adjustment_id or str(uuid.uuid4()),
                    unit=_unit(a),
                    warehouse=a.warehouse,
                    delta=a.delta,
                    reason=a.reason,
                ),
                timeout=a.timeout,
            ),
        )
    )

    p = client("availability", "stock levels of a sales unit, per warehouse")
    unit_args(p)
    p.set_defaults(
        run=lambda a: _client_call(
            a,
            lambda s: s.GetAvailability(
                pb.GetAvailabilityRequest(units=[_unit(a)]), timeout=a.timeout
            ),
        )
    )

    p = client("reserve", "hold stock for an order (all lines or nothing)")
    p.add_argument("order_id")
    p.add_argument(
        "--line",
        dest="lines",
        type=_line,
        action="append",
        required=True,
        help="sku=A,spec=B,barcode=C,warehouse=W,qty=N (warehouse empty: stockhold allocates)",
    )
    p.add_argument(
        "--hold-seconds", type=int, default=0, help="0: the SKU policy's hold, else 48 h"
    )
    p.add_argument("--amount", type=int, default=0, help="order total in minor units (0: none)")
    p.add_argument(
        "--poll", metavar="PROVIDER:OUT_TRADE_NO", type=_pending, help="poll this payment"
    )
    p.set_defaults(
        run=lambda a: _client_call(
            a,
            lambda s: s.Reserve(
                pb.ReserveRequest(
                    order_id=a.order_id,
                    lines=a.lines,
                    hold_seconds=a.hold_seconds,
                    amount=a.amount,
                    payment=a.poll,
                ),
                timeout=a.timeout,
            ),
        )
    )

    p = client(
        "extend",
        "push a HELD reservation's deadline out to Redis now + hold, never in "
        '("extended": false when it already ends later)',
    )
    p.add_argument("order_id")
    p.add_argument("--hold-seconds", type=int, required=True)
    p.set_defaults(
        run=lambda a: _client_call(
            a,
            lambda s: s.ExtendReservation(
                pb.ExtendReservationRequest(order_id=a.order_id, hold_seconds=a.hold_seconds),
                timeout=a.timeout,
            ),
        )
    )

    p = client("pay", "report a payment result (PAID commits, FAILED/CLOSED release)")
    p.add_argument("order_id")
    p.add_argument("--provider", required=True)
    p.add_argument("--transaction-id", required=True, help="the idempotency key")
    p.add_argument("--status", required=True, choices=("PAID", "FAILED", "CLOSED"))
    p.add_argument("--amount", type=int, default=0, help="paid amount in minor units")
    p.add_argument("--paid-at", default="", help="RFC 3339 with an offset, e.g. ...+08:00")
    p.set_defaults(
        run=lambda a: _client_call(
            a,
            lambda s: s.ReportPayment(
                pb.ReportPaymentRequest(
                    order_id=a.order_id,
                    provider=a.provider,
                    transaction_id=a.transaction_id,
                    status=pb.PaymentStatus.Value(f"PAYMENT_STATUS_{a.status}"),
                    amount=a.amount,
                    paid_at=a.paid_at,
                ),
                timeout=a.timeout,
            ),
        )
    )

    p = client("mark-pending", "poll the provider for this order's payment (active channel)")
    p.add_argument("order_id")
    p.add_argument("payment", metavar="PROVIDER:OUT_TRADE_NO", type=_pending)
    p.set_defaults(
        run=lambda a: _client_call(
            a,
            lambda s: s.MarkPaymentPending(
                pb.MarkPaymentPendingRequest(order_id=a.order_id, payment=a.payment),
                timeout=a.timeout,
            ),
        )
    )

    p = client("commit", "payment succeeded: turn the hold into a deduction")
    p.add_argument("order_id")
    p.add_argument("--payment-ref", default="")
    p.set_defaults(
        run=lambda a: _client_call(
            a,
            lambda s: s.Commit(
                pb.CommitRequest(order_id=a.order_id, payment_ref=a.payment_ref), timeout=a.timeout
            ),
        )
    )

    p = client("release", "order cancelled: give the held stock back")
    p.add_argument("order_id")
    p.add_argument("--reason", default="")
    p.set_defaults(
        run=lambda a: _client_call(
            a,
            lambda s: s.Release(
                pb.ReleaseRequest(order_id=a.order_id, reason=a.reason), timeout=a.timeout
            ),
        )
    )

    p = client("get", "show a reservation")
    p.add_argument("order_id")
    p.set_defaults(
        run=lambda a: _client_call(
            a,
            lambda s: s.GetReservation(
                pb.GetReservationRequest(order_id=a.order_id), timeout=a.timeout
            ),
        )
    )

    p = client("health", "exit 0 when the server reports SERVING")
    p.add_argument("--service", default=SERVICE_NAME)
    p.set_defaults(run=_health)

    policy = sub.add_parser("policy", help="per-SKU policies: reserve timeout, hold, hot flag")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    p = client("set", "change a SKU's stored policy (only the fields given)", psub)
    p.add_argument("sku")
    p.add_argument(
        "--reserve-timeout-ms", type=int, help="longest queue wait of its Reserves; 0: default"
    )
    p.add_argument("--hold-seconds", type=int, help="hold length of its Reserves; 0: default")
    p.add_argument("--max-line-quantity", type=int, help="largest quantity per line; 0: default")
    p.add_argument(
        "--hot",
        action=argparse.BooleanOptionalAction,
        help="the operator's hot flag (applies while pinned)",
    )
    pin = p.add_mutually_exclusive_group()
    pin.add_argument(
        "--pinned",
        dest="pinned",
        action="store_const",
        const=True,
        help="automatic hot detection leaves the SKU alone",
    )
    pin.add_argument(
        "--unpinned",
        dest="pinned",
        action="store_const",
        const=False,
        help="automatic hot detection decides again",
    )
    p.add_argument("--reset", action="store_true", help="delete the stored policy (alone)")
    p.set_defaults(
        run=lambda a: _client_call(
            a, lambda s: s.SetSkuPolicy(policy_set_request(a), timeout=a.timeout)
        )
    )

    p = client("get", "a SKU's policy, with what applies now (effective_*)", psub)
    p.add_argument("sku")
    p.set_defaults(
        run=lambda a: _client_call(
            a, lambda s: s.GetSkuPolicy(pb.GetSkuPolicyRequest(sku=a.sku), timeout=a.timeout)
        )
    )

    p = client("list", "stored policies (and hot SKUs), one page or --all", psub)
    p.add_argument("--hot-only", action="store_true", help="only SKUs hot now")
    p.add_argument("--page-size", type=int, default=0, help="0: the server's default (100)")
    p.add_argument("--page-token", default="", help="from a previous page's next_page_token")
    p.add_argument("--all", action="store_true", help="follow next_page_token to the end")
    p.set_defaults(run=lambda a: _client_call(a, lambda s: _policy_list(a, s)))

    def stats_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--top", type=int, default=0, help="keys to show (0: the server's 20)")
        window = p.add_mutually_exclusive_group()
        window.add_argument(
            "--window", type=_positive(float), help="seconds (default: the server's, 60)"
        )
        window.add_argument("--since-start", action="store_true", help="since each process started")

    p = client("contention", "top contended sales units (GetContentionStats) as JSON")
    stats_args(p)
    p.set_defaults(
        run=lambda a: _client_call(
            a,
            lambda s: s.GetContentionStats(
                top.stats_request(a.top, a.window, a.since_start), timeout=a.timeout
            ),
        )
    )

    p = client("top", "live view of the top contended sales units, like top(1)")
    stats_args(p)
    p.add_argument(
        "--interval", type=_positive(float), default=2.0, help="seconds per frame (default 2)"
    )
    frames = p.add_mutually_exclusive_group()
    frames.add_argument("--once", action="store_true", help="draw one frame and exit")
    frames.add_argument("--iterations", type=_positive(int), help="draw N frames and exit")
    p.set_defaults(run=_top)

    _reserve_many_commands(client)
    _events_commands(sub, client)
    _subscription_commands(sub, client)
    _stock_commands(sub, client)


# -- many orders per call: reserve-batch, reserve-stream (issue 10) ----------------------------
def _read_orders(path: str) -> list[tuple[int, pb.ReserveRequest]]:
    """(line number, order) of a JSON-lines file (`-`: stdin): one ReserveRequest per line,
    in its proto JSON form, e.g. {"order_id": "o-1", "lines": [{"unit": {"sku": "TEE"},
    "quantity": 2}]}. Blank lines are skipped."""
    lines: list[tuple[int, str]]
    if path == "-":
        lines = list(enumerate(sys.stdin, 1))
    else:
        with open(path, encoding="utf-8") as f:
            lines = list(enumerate(f, 1))
    orders: list[tuple[int, pb.ReserveRequest]] = []
    for n, text in lines:
        if not text.strip():
            continue
        try:
            orders.append((n, json_format.Parse(text, pb.ReserveRequest())))
        except json_format.ParseError as exc:
            raise SystemExit(f"error: {path}:{n}: not a ReserveRequest: {exc}") from None
    if not orders:
        raise SystemExit(f"error: {path}: no orders")
    return orders


def _answer_line(
    n: int, order_id: str, result: pb.ReserveBatchResult | pb.ReserveStreamResponse, **extra: str
) -> bool:
    """Print one answer as a JSON line; True when the order is reserved (or replayed)."""
    out: dict[str, Any] = {"line": n, "order_id": order_id, **extra}
    reserved = result.WhichOneof("result") == "reserved"
    if reserved:
        out["reserved"] = json_format.MessageToDict(
            result.reserved,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        )
    else:
        out["error"] = _status_dict(result.error)
    print(json.dumps(out, ensure_ascii=False), flush=True)
    return reserved


_CODE_NAMES: Final = {code.value[0]: code.name for code in grpc.StatusCode}


def _status_dict(status: status_pb2.Status) -> dict[str, Any]:
    """A google.rpc.Status as the CLI shows it: code name, message, ErrorInfo, BadRequest."""
    out: dict[str, Any] = {
        "code": _CODE_NAMES.get(status.code, str(status.code)),
        "message": status.message,
    }
    for detail in status.details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            out["reason"], out["metadata"] = info.reason, dict(info.metadata)
        elif detail.Unpack(bad):
            out["field_violations"] = {v.field: v.description for v in bad.field_violations}
    return out


def _reserve_batch(args: argparse.Namespace) -> int:
    orders = _read_orders(args.file)
    ok = True
    with client_channel(args) as channel:
        stub = pb_grpc.InventoryStub(channel)
        for start in range(0, len(orders), args.batch_size):
            chunk = orders[start : start + args.batch_size]
            request = pb.ReserveBatchRequest(orders=[order for _, order in chunk])
            try:
                reply = stub.ReserveBatch(request, timeout=args.timeout)
            except grpc.RpcError as err:
                _print_error(err)
                return 1
            for (n, order), result in zip(chunk, reply.results, strict=True):
                ok = _answer_line(n, order.order_id, result) and ok
    return 0 if ok else 1


def _reserve_stream(args: argparse.Namespace) -> int:
    orders = _read_orders(args.file)
    by_id = {str(n): (n, order.order_id) for n, order in orders}
    # At most --window messages unanswered: the server's bound is never reached from here.
    window = threading.Semaphore(args.window)
    stop = threading.Event()

    def messages() -> Iterator[pb.ReserveStreamRequest]:
        for n, order in orders:
            while not window.acquire(timeout=0.1):
                if stop.is_set():
                    return
            yield pb.ReserveStreamRequest(correlation_id=str(n), request=order)

    ok = True
    answered = 0
    with client_channel(args) as channel:
        stub = pb_grpc.InventoryStub(channel)
        try:
            for answer in stub.ReserveStream(messages(), timeout=args.timeout):
                window.release()
                answered += 1
                n, order_id = by_id.get(answer.correlation_id, (0, ""))
                ok = _answer_line(n, order_id, answer, correlation_id=answer.correlation_id) and ok
        except grpc.RpcError as err:
            _print_error(err)
            return 1
        finally:
            stop.set()
    if answered != len(orders):
        print(f"error: {len(orders)} orders sent, {answered} answered", file=sys.stderr)
        return 1
    return 0 if ok else 1


def _reserve_many_commands(client: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """reserve-batch and reserve-stream: many orders from a JSON-lines file, one JSON line
    per answer ({"line", "order_id", "reserved" | "error"}); exit 1 if any was refused."""
    file_help = 'JSON lines, one ReserveRequest each ({"order_id": ..., "lines": [...]}); -: stdin'
    p = client("reserve-batch", "reserve orders from a file, up to 100 per ReserveBatch call")
    p.add_argument("--file", required=True, help=file_help)
    p.add_argument(
        "--batch-size",
        type=_positive(int),
        default=100,
        help="orders per call (default 100, the most a call takes)",
    )
    p.set_defaults(run=_reserve_batch)

    p = client("reserve-stream", "reserve orders from a file over one ReserveStream call")
    p.add_argument("--file", required=True, help=file_help)
    p.add_argument(
        "--window",
        type=_positive(int),
        default=64,
        help="messages sent ahead of their answers (default 64; the server takes 256)",
    )
    # One deadline for the whole stream.
    p.set_defaults(run=_reserve_stream, timeout=60.0)


# -- events (issue 12) ---------------------------------------------------------------------------
def _event_line(event: pb.Event) -> str:
    """One event as a JSON line: the Event's fields, with `data` (its data_json, parsed)."""
    out = json_format.MessageToDict(
        event, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    raw = out.pop("data_json", "")
    try:
        out["data"] = json.loads(raw) if raw else {}
    except ValueError:
        out["data_json"] = raw
    return json.dumps(out, ensure_ascii=False)


def _events_tail(args: argparse.Namespace) -> int:
    request = pb.WatchEventsRequest(
        cursor=args.cursor, types=args.types, warehouses=args.warehouses, skus=args.skus
    )
    seen = 0
    last = args.cursor
    with client_channel(args) as channel:
        call = pb_grpc.InventoryStub(channel).WatchEvents(request, timeout=args.timeout)
        try:
            for event in call:
                print(_event_line(event), flush=True)
                last = event.cursor
                seen += 1
                if args.count and seen >= args.count:
                    call.cancel()
                    break
        except KeyboardInterrupt:
            call.cancel()
        except grpc.RpcError as err:
            if err.code() is grpc.StatusCode.DEADLINE_EXCEEDED:  # --timeout: followed long enough
                return 0
            _print_error(err)
            if last and last != "earliest":
                print(f"resume with: --from {last}", file=sys.stderr)
            return 1
    return 0


def _events_commands(sub: Any, client: Callable[..., argparse.ArgumentParser]) -> None:
    """`events tail`: WatchEvents as JSON lines (docs/api.md, "Watching events")."""
    events = sub.add_parser("events", help="the event feed of every partition")
    esub = events.add_subparsers(dest="events_command", required=True)
    p = client("tail", "follow the events as JSON lines, each with its cursor", esub)
    p.add_argument(
        "--from",
        dest="cursor",
        default="",
        metavar="CURSOR",
        help='where to start: a cursor printed earlier, "earliest" (the oldest kept); '
        "default: from now",
    )
    for flag, dest, what in (
        ("--type", "types", "of this type, e.g. ORDER_RESERVED"),
        ("--warehouse", "warehouses", "touching this warehouse"),
        ("--sku", "skus", "touching this SKU"),
    ):
        p.add_argument(
            flag,
            dest=dest,
            action="append",
            default=[],
            metavar=flag[2].upper(),
            help=f"only events {what} (repeatable: any of them)",
        )
    p.add_argument("--count", type=_positive(int), help="stop after N events")
    # No deadline unless asked: a tail runs until interrupted (a --timeout ends it, status 0).
    p.set_defaults(run=_events_tail, timeout=None)

    p = client("lag", "how far each subscription is behind (GetSubscriptionLag)", esub)
    p.add_argument("name", nargs="?", default="", help="one subscription (default: every one)")
    p.add_argument(
        "--watch",
        type=_positive(float),
        metavar="SECONDS",
        help="redraw every SECONDS until Ctrl-C, like `stockhold top`",
    )
    p.add_argument("--json", action="store_true", help="the response as JSON, once")
    p.set_defaults(run=_events_lag)


def _events_lag(args: argparse.Namespace) -> int:
    if args.json:
        request = pb.GetSubscriptionLagRequest(name=args.name)
        return _client_call(args, lambda s: s.GetSubscriptionLag(request, timeout=args.timeout))
    return top.run_lag(args.address, args.name, args.watch, args.timeout, connect=connector(args))


# -- WMS subscriptions (issue 12, docs/events.md "Subscriptions") ------------------------------
def subscription_create_request(args: argparse.Namespace) -> pb.CreateSubscriptionRequest:
    """The CreateSubscription request of `subscriptions create` (the secret read from
    --secret-file, its trailing newline dropped; none: the server makes one)."""
    secret = ""
    if args.secret_file:
        with open(args.secret_file, encoding="utf-8") as f:
            secret = f.read().rstrip("\r\n")
    return pb.CreateSubscriptionRequest(
        subscription=pb.Subscription(
            name=args.name,
            url=args.url,
            warehouses=args.warehouses,
            types=args.types,
            skus=args.skus,
            timeout_ms=args.timeout_ms,
            retry=pb.RetryPolicy(
                max_attempts=args.max_attempts,
                initial_backoff_ms=args.initial_backoff_ms,
                max_backoff_ms=args.max_backoff_ms,
            ),
            on_failure=pb.OnFailure.Value((args.on_failure or "ON_FAILURE_UNSPECIFIED").upper()),
        ),
        secret=secret,
        start_cursor=args.start,
    )


def _filter_args(p: argparse.ArgumentParser, what: str) -> None:
    for flag, dest, which in (
        ("--type", "types", "of this type, e.g. ORDER_RESERVED"),
        ("--warehouse", "warehouses", "touching this warehouse"),
        ("--sku", "skus", "touching this SKU"),
    ):
        p.add_argument(
            flag,
            dest=dest,
            action="append",
            default=[],
            metavar=flag[2].upper(),
            help=f"only {what} {which} (repeatable: any of them)",
        )


def _subscription_commands(sub: Any, client: Callable[..., argparse.ArgumentParser]) -> None:
    """`subscriptions create|list|get|delete|replay-failed|replay-from` (docs/events.md)."""
    subs = sub.add_parser("subscriptions", help="push events to a WMS webhook")
    ssub = subs.add_subparsers(dest="subscriptions_command", required=True)
    p = client("create", "create a subscription (the same definition again: no change)", ssub)
    p.add_argument("name", help="[A-Za-z0-9._-]{1,64}")
    p.add_argument("--url", required=True, help="the http(s) webhook")
    _filter_args(p, "events")
    p.add_argument("--timeout-ms", type=int, default=0, help="per POST (0: default 5000)")
    p.add_argument("--max-attempts", type=int, default=0, help="POSTs per event (0: default 8)")
    p.add_argument("--initial-backoff-ms", type=int, default=0, help="0: default 200")
    p.add_argument("--max-backoff-ms", type=int, default=0, help="0: default 30000")
    p.add_argument(
        "--on-failure",
        choices=("flow", "wait", "FLOW", "WAIT"),
        help="after the last attempt: flow (failed set, the next events go on; the default) "
        "or wait (retry the event until the WMS takes it)",
    )
    p.add_argument(
        "--secret-file",
        help="file holding the HMAC secret (>= 16 bytes); none: the server makes one and "
        "prints it once",
    )
    p.add_argument(
        "--from",
        dest="start",
        default="",
        metavar="CURSOR",
        help='where delivery starts: an event\'s cursor, "earliest"; default: from now',
    )
    p.set_defaults(
        run=lambda a: _client_call(
            a, lambda s: s.CreateSubscription(subscription_create_request(a), timeout=a.timeout)
        )
    )

    p = client("list", "every subscription", ssub)
    p.set_defaults(
        run=lambda a: _client_call(
            a, lambda s: s.ListSubscriptions(pb.ListSubscriptionsRequest(), timeout=a.timeout)
        )
    )
    for name, what, call in (
        ("get", "show a subscription", "GetSubscription"),
        ("delete", "delete a subscription, its groups and its failed set", "DeleteSubscription"),
    ):
        p = client(name, what, ssub)
        p.add_argument("name")
        request = getattr(pb, f"{call}Request")
        p.set_defaults(
            run=lambda a, c=call, r=request: _client_call(
                a, lambda s: getattr(s, c)(r(name=a.name), timeout=a.timeout)
            )
        )

    p = client("replay-failed", "deliver the failed events again, oldest first", ssub)
    p.add_argument("name")
    _filter_args(p, "failed events")
    p.add_argument("--max", type=int, default=0, help="at most N events (0: every one)")
    p.set_defaults(
        run=lambda a: _client_call(
            a,
            lambda s: s.ReplayFailed(
                pb.ReplayFailedRequest(
                    name=a.name,
                    types=a.types,
                    warehouses=a.warehouses,
                    skus=a.skus,
                    max_events=a.max,
                ),
                timeout=a.timeout,
            ),
        ),
        timeout=60.0,
    )

    p = client("replay-from", "deliver every event after a cursor again", ssub)
    p.add_argument("name")
    p.add_argument("cursor", help='an event\'s cursor, or "earliest"')
    p.set_defaults(
        run=lambda a: _client_call(
            a,
            lambda s: s.ReplayFrom(
                pb.ReplayFromRequest(name=a.name, cursor=a.cursor), timeout=a.timeout
            ),
        )
    )


def _stock_commands(sub: Any, client: Callable[..., argparse.ArgumentParser]) -> None:
    """`stock count`: SetOnHand, a cycle count from the WMS (docs/api.md, "Cycle counts")."""
    stock = sub.add_parser("stock", help="absolute stock figures from the warehouse")
    ssub = stock.add_subparsers(dest="stock_command", required=True)
    p = client("count", "record a cycle count: available := on_hand - reserved", ssub)
    p.add_argument("--count-id", required=True, help="the idempotency key of this count")
    p.add_argument("--sku", required=True)
    p.add_argument("--spec", default="")
    p.add_argument("--barcode", default="")
    p.add_argument("--warehouse", required=True)
    p.add_argument("--on-hand", type=int, required=True, help="units counted (>= 0)")
    p.add_argument(
        "--counted-at", required=True, help="when counted: RFC 3339 with an offset, e.g. ...+08:00"
    )
    p.set_defaults(
        run=lambda a: _client_call(
            a,
            lambda s: s.SetOnHand(
                pb.SetOnHandRequest(
                    count_id=a.count_id,
                    unit=_unit(a),
                    warehouse=a.warehouse,
                    on_hand=a.on_hand,
                    counted_at=a.counted_at,
                ),
                timeout=a.timeout,
            ),
        )
    )


# `snapshot` / `reconcile` find the data as `migrate-layout` does, plus the cluster switch.
_RECONCILE_FLAGS: tuple[tuple[str, str, str], ...] = (
    *(f for f in _SERVE_FLAGS if f[0] in ("--redis-url", "--redis-password-file", "--partitions")),
    _KEY_PREFIX_FLAG,
    ("--redis-cluster", "redis_cluster", "the URL is a node of a Redis Cluster"),
)


def _reconcile(args: argparse.Namespace) -> int:
    """Settings as `serve` reads them (one line and exit 2 for a mistake), then run."""
    from pathlib import Path

    from stockhold import reconcile

    try:
        settings = _settings_of(args, _RECONCILE_FLAGS)
    except ConfigError as err:
        print(f"stockhold: {err}", file=sys.stderr)
        return 2
    path = args.out if args.command == "snapshot" else args.snapshot
    return reconcile.run(
        settings, args.command, Path(path) if path else None, getattr(args, "repair", False)
    )


def _reconcile_commands(sub: Any) -> None:
    p = sub.add_parser(
        "snapshot",
        help="write every unit's counters with the stream positions they match (JSON lines)",
        description="Write a consistent snapshot of every (unit, warehouse) counter and the "
        "per-partition event positions it corresponds to (docs/operations.md, snapshot and "
        "reconcile). Exit status: 0 written, 2 a setting, 1 Redis failing.",
    )
    p.add_argument("--out", required=True, help="the file to write (replaced atomically)")
    p2 = sub.add_parser(
        "reconcile",
        help="compare live counters with the snapshot + events and the HELD holds",
        description="Rebuild the counters from a snapshot and the events after it (and "
        "reserved from the HELD holds), compare with the live counters, print every drift. "
        "Exit status: 0 no drift (or every drift repaired), 1 drift, 2 a setting or an "
        "unusable snapshot.",
    )
    p2.add_argument("--snapshot", help="a file written by `stockhold snapshot`")
    p2.add_argument(
        "--repair",
        action="store_true",
        help="set each drifting counter to the expected figure (one STOCK_REPAIRED event each)",
    )
    for q in (p, p2):
        for flag, _, help_ in _RECONCILE_FLAGS:
            if flag in _SWITCHES:
                q.add_argument(flag, action="store_const", const="1", help=help_)
            else:
                q.add_argument(flag, help=help_)
        q.set_defaults(run=_reconcile)


# -- `stockhold auth` (issue 13, docs/security.md "Tokens") --------------------------------------
def _hash_token(args: argparse.Namespace) -> int:
    """Print the auth-file entry of a token read from stdin (or of a new one, with --new:
    the token itself goes to stderr, once)."""
    from stockhold.auth import ROLE_METHODS, hash_token, new_token

    unknown = [r for r in args.roles.split(",") if r not in ROLE_METHODS]
    if unknown:
        print(
            f"error: unknown role {unknown[0]!r} (roles: {', '.join(ROLE_METHODS)})",
            file=sys.stderr,
        )
        return 2
    if args.new:
        token = new_token()
        print(f"token (give it to the caller; it is not stored): {token}", file=sys.stderr)
    else:
        token = sys.stdin.readline().strip()
        if not token:
            print("error: no token on stdin (or pass --new)", file=sys.stderr)
            return 2
    name = json.dumps(args.name)
    roles = json.dumps(args.roles.split(","))
    print(f'[[token]]\nname = {name}\nhash = "{hash_token(token)}"\nroles = {roles}')
    return 0


def _auth_commands(sub: Any) -> None:
    p = sub.add_parser("auth", help="callers and tokens (docs/security.md)")
    verbs = p.add_subparsers(dest="verb", required=True)
    q = verbs.add_parser(
        "hash-token",
        help="print the auth-file entry of a token (read from stdin, or a new one)",
        description="Read a token from stdin (or make one with --new, printed on stderr) and "
        "print its [[token]] entry for the auth file: only the hash is stored.",
    )
    q.add_argument("--new", action="store_true", help="make a new random token")
    q.add_argument("--name", default="caller", help="the caller's name (the events' actor)")
    q.add_argument("--roles", default="checkout", help="comma-separated roles")
    q.set_defaults(run=_hash_token)


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    top = argparse.ArgumentParser(prog="stockhold", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the gRPC server. Exit status: 0 after SIGTERM/SIGINT, 2 for a "
        "setting it cannot run with, 1 for an address it cannot listen on (and other "
        "failures); each error is one line on stderr.",
    )
    # Values stay text here: Settings parses and checks them, as it does the variables.
    for flag, _, help_ in _SERVE_FLAGS:
        if flag in _SWITCHES:
            p.add_argument(flag, action="store_const", const="1", help=help_)
        else:
            p.add_argument(flag, help=help_)
    p.add_argument(
        "--workers",
        help="server processes sharing the port (SO_REUSEPORT); default: the number of cores",
    )
    # Set by the supervisor on its workers (see supervisor.WORKER_CANNOT_START).
    p.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(run=_serve)
    p = sub.add_parser(
        "migrate-layout",
        help="move data of an earlier stockhold to the current key layout (offline)",
        description="Move the data of an earlier stockhold (key layout 1) to key layout 2, "
        "while no stockhold process runs (docs/operations.md, upgrading the key layout). "
        "Exit status: 0 done (or already layout 2), 2 nothing to migrate or a setting, "
        "1 data it cannot place or Redis failing.",
    )
    for flag, _, help_ in _MIGRATE_FLAGS:
        if flag in _SWITCHES:
            p.add_argument(flag, action="store_const", const="1", help=help_)
        else:
            p.add_argument(flag, help=help_)
    p.add_argument("--dry-run", action="store_true", help="report what it would move; no write")
    p.set_defaults(run=_migrate_layout)
    _reconcile_commands(sub)
    _auth_commands(sub)
    _commands(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `stockhold` console script."""
    args = parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
