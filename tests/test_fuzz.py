"""Fuzzing the gRPC surface (issue 13): every Inventory RPC, from the proto descriptor.

Each method of `stockhold.v1.Inventory` (enumerated from the descriptor, so a new RPC is
covered without editing this file) gets two kinds of input through a generic channel
(identity serializers: the bytes go on the wire as they are):

- raw bytes: random, a valid message with bytes flipped or cut, or one repeated many times;
- structurally valid messages built from the message descriptor with extreme values: int32 and
  int64 extremes, negatives, enum numbers the proto does not know, very long strings, control
  characters and NUL, invalid UTF-8 in string fields (spliced into the wire bytes, which the
  protobuf API refuses to build), repeated fields with thousands of elements, nested messages,
  plus hand-picked values (SKUs with stock, orders held / committed / released, a subscription,
  valid cursors and timestamps) so that calls reach past validation.

The oracle, for every call: no INTERNAL or UNKNOWN status (nor inside a ReserveBatch or
ReserveStream answer), no ERROR log line from the server, an answer within CALL_LIMIT_S, the
server still SERVING afterwards (health check each call, a real read after each test), and a
refused call (or an answer whose every item is refused) leaves the Redis keyspace unchanged.

The keyspace is compared per key (DEBUG DIGEST-VALUE of every key: one round trip for all
keys instead of a full dump per call; the same comparison as stockhold_fixtures.snapshot,
values without TTLs). Background writers are off so that only the call writes: no expiry
sweep, contention snapshot or policy refresh within the run (intervals of an hour) and no
deliverer (delivery_enabled false; a subscription created here is never pushed).

`make test` runs SHORT_EXAMPLES per method and kind on a standalone Redis and a few on a
Redis Cluster; `make fuzz` (marker fuzz_long) runs FUZZ_EXAMPLES (default 3000) per method and
kind on a standalone Redis and a fifth of that on a cluster. The server runs in its own thread
and event loop, so that Hypothesis drives plain synchronous calls. docs/security.md, section
Fuzzing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import uvloop
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis_proc import RedisProc
from stockhold_fixtures import TEST_SETTINGS, ClusterStore, is_cluster, store_settings

from stockhold import constants as c
from stockhold.events import encode_cursor
from stockhold.server import StockholdServer
from stockhold.settings import Settings
from stockhold.v1 import inventory_pb2 as pb

pytestmark = [
    # A failing example of thousands of elements has a long repr: that is no error here.
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
    # The server's thread uses `random` (redis-py's cluster client picks nodes) while
    # Hypothesis draws an example in this one: not a strategy using it.
    pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies"),
]

SERVICE = pb.DESCRIPTOR.services_by_name["Inventory"]
METHODS: list[MethodDescriptor] = list(SERVICE.methods)

SHORT_EXAMPLES = 100  # per method and kind, in make test (standalone)
SHORT_CLUSTER_EXAMPLES = 8  # per method and kind, in make test (cluster)
LONG_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "3000"))  # make fuzz
CALL_LIMIT_S = 10.0  # every call answers within this
STREAM_WINDOW_S = 0.1  # a server stream is read this long (or for STREAM_READ messages)
STREAM_READ = 3
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FORBIDDEN_CODES = {code.value[0] for code in FORBIDDEN}
STATUS = status_pb2.Status.DESCRIPTOR.full_name

# Nothing writes to Redis in the background during the run: only the fuzzed calls do.
FUZZ_SETTINGS: dict[str, Any] = {
    "sweep_interval_seconds": 3600.0,
    "contention_flush_seconds": 3600.0,
    "policy_refresh_seconds": 3600.0,
    "recovery_window_seconds": 3600.0,
    "delivery_enabled": False,
}

# -- the hand-picked values: state seeded before the run ---------------------------------------

SKUS = ["fz-apple", "fz-pear", "fz-plum"]
WAREHOUSES = ["w1", "w2"]
HELD, COMMITTED, RELEASED = "fz-held", "fz-committed", "fz-released"
ORDERS = [HELD, COMMITTED, RELEASED, "fz-new"]
SUBSCRIPTION = "fz-sub"
EVENT_TYPES = ["ORDER_RESERVED", "ORDER_COMMITTED", "STOCK_ADJUSTED", "STOCK_COUNTED"]
TIMES = [
    "2026-12-02T10:00:00+08:00",
    "1970-01-01T00:00:00Z",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999999-23:59",
    "2026-02-30T25:61:61Z",
]


def _cursor(partitions: int, ms: int, seq: int) -> str:
    return encode_cursor([(ms, seq)] * partitions)


CURSORS = [
    "",
    "earliest",
    _cursor(16, 0, 0),
    _cursor(16, 2**63 - 1, 2**64 - 1),
    _cursor(16, 1, 0),
    _cursor(3, 0, 0),
    _cursor(16, -(2**40), 0),
]

# String fields by name -> values that pass validation (or nearly).
GOOD_STRINGS: dict[str, list[str]] = {
    "sku": SKUS,
    "skus": SKUS,
    "warehouse": WAREHOUSES,
    "warehouses": WAREHOUSES,
    "order_id": ORDERS,
    "adjustment_id": ["fz-adj-1", "fz-adj-new"],
    "count_id": ["fz-count-1", "fz-count-new"],
    "correlation_id": ["c1", "c2"],
    "name": [SUBSCRIPTION, "fz-sub-new"],
    "url": ["http://127.0.0.1:9/hook", "https://127.0.0.1:9/x", "ftp://x", "http://"],
    "secret": ["0123456789abcdef0123", "short"],
    "cursor": CURSORS,
    "start_cursor": CURSORS,
    "types": EVENT_TYPES,
    "counted_at": TIMES,
    "paid_at": TIMES,
    "provider": ["wechatpay", "fake"],
    "out_trade_no": ["fz-trade-1"],
    "transaction_id": ["fz-tx-1"],
    "payment_ref": ["pay-1"],
    "reason": ["fuzz"],
    "spec": ["", "red"],
    "barcode": ["", "0123456789012"],
}
GOOD_INTS = [0, 1, 2, 3, 10, 60, 1000]

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

# Bytes that are not UTF-8: a lone continuation byte, a cut sequence, an encoded surrogate,
# beyond U+10FFFF, an overlong NUL, 0xFF.
BAD_UTF8 = [b"\x80", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\x80", b"ok\xff"]

# -- strategies: a message's wire bytes --------------------------------------------------------


def message_class(desc: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(desc)


def _weird_text() -> st.SearchStrategy[str]:
    control = st.text(st.characters(max_codepoint=0x1F), min_size=1, max_size=8)
    return st.one_of(
        st.text(max_size=12),
        control,
        st.sampled_from(
            ["\x00", "a\x00b", " ", "\u200b", "\ufeff", "\U0010ffff", ":", "{p0}", "%"]
        ),
        # very long: a short text repeated (the whole value fits in Hypothesis's buffer)
        st.builds(lambda s, n: (s or "x") * n, st.text(max_size=4), st.sampled_from([100, 10_000])),
    )


def _string(f: FieldDescriptor) -> st.SearchStrategy[str]:
    good = GOOD_STRINGS.get(f.name)
    if good is None:
        return _weird_text()
    return st.one_of(st.sampled_from(good), st.sampled_from(good), _weird_text())


def _integer(f: FieldDescriptor) -> st.SearchStrategy[int]:
    lo, hi = INT_RANGES[f.type]
    edges = [v for v in (lo, hi, lo + 1, hi - 1, -1, 2**31, 2**53) if lo <= v <= hi]
    return st.one_of(
        st.sampled_from([v for v in GOOD_INTS if lo <= v <= hi]),
        st.sampled_from(edges),
        st.integers(lo, hi),
    )


def _scalar(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return message_values(f.message_type, depth + 1)
    if f.type == FieldDescriptor.TYPE_STRING:
        return _string(f)
    if f.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=32)
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if f.type == FieldDescriptor.TYPE_FLOAT else 64)
    return _integer(f)


def _repeated(f: FieldDescriptor, depth: int) -> st.SearchStrategy[list[Any]]:
    element = _scalar(f, depth)
    # thousands of elements: one element repeated (in the request itself, not nested)
    many = [100, 1000] if f.type == FieldDescriptor.TYPE_MESSAGE else [100, 1000, 5000]
    big = st.builds(lambda e, n: [e] * n, element, st.sampled_from(many))
    if depth > 0:
        return st.lists(element, max_size=3)
    return st.one_of(st.lists(element, max_size=4), big)


def message_values(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """A message of type `desc` with any subset of its fields set to fuzzed values."""
    cls = message_class(desc)
    if depth > 4:
        return st.just(cls())
    optional = {
        f.name: (_repeated(f, depth) if f.is_repeated else _scalar(f, depth)) for f in desc.fields
    }
    return st.builds(
        lambda values: _build(cls, values), st.fixed_dictionaries({}, optional=optional)
    )


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    msg = cls()
    for name, value in values.items():
        f = cls.DESCRIPTOR.fields_by_name[name]
        if f.is_repeated:
            getattr(msg, name).extend(value)
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(msg, name).CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def string_paths(desc: Descriptor, depth: int = 0) -> list[tuple[int, ...]]:
    """Field-number paths from `desc` to every string field, nested messages included."""
    out: list[tuple[int, ...]] = []
    for f in desc.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            out.append((f.number,))
        elif f.type == FieldDescriptor.TYPE_MESSAGE and depth < 3:
            out += [(f.number, *rest) for rest in string_paths(f.message_type, depth + 1)]
    return out


def _splice(path: tuple[int, ...], bad: bytes) -> bytes:
    """Wire bytes that set the string field at `path` to `bad` (appended to a message, a
    singular nested message merges with the one before it, a repeated one gets an element)."""
    payload = _length_delimited(path[-1], bad)
    for number in reversed(path[:-1]):
        payload = _length_delimited(number, payload)
    return payload


# A generated message longer than this is cut to it: still over the server's limit (refused
# RESOURCE_EXHAUSTED before any parsing, as the whole would be), without keeping it whole.
# Hypothesis keeps drawn values: uncut, WatchEvents' repeated filters of thousands of very long
# strings made ~15 MB messages, and a `make fuzz` run grew to 24 GB and was OOM-killed.
OVERSIZE = Settings().max_message_bytes + 4096


def structured(desc: Descriptor) -> st.SearchStrategy[bytes]:
    """A fuzzed message's wire bytes, sometimes with invalid UTF-8 in a string field."""
    msgs = message_values(desc).map(lambda m: m.SerializeToString()[:OVERSIZE])
    paths = string_paths(desc)
    if not paths:
        return msgs
    bad = st.one_of(st.sampled_from(BAD_UTF8), st.binary(min_size=1, max_size=16))
    splice = st.builds(_splice, st.sampled_from(paths), bad)
    return st.one_of(msgs, msgs, msgs, msgs, st.builds(lambda m, s: m + s, msgs, splice))


def raw(desc: Descriptor) -> st.SearchStrategy[bytes]:
    """Raw bytes: random, a valid message mutated (bytes flipped, cut), or repeated."""
    valid = message_values(desc).map(lambda m: m.SerializeToString())
    flipped = st.builds(_flip, valid, st.lists(st.tuples(st.integers(0), st.integers(0, 255))))
    cut = st.builds(lambda b, n: b[: n % (len(b) + 1)], valid, st.integers(0))
    repeated = st.builds(
        lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(1, 5000)
    )
    return st.one_of(st.binary(max_size=256), flipped, cut, repeated)


def _flip(data: bytes, changes: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for at, value in changes:
        if out:
            out[at % len(out)] = value
    return bytes(out)


def payloads(method: MethodDescriptor, kind: str) -> st.SearchStrategy[list[bytes]]:
    """What one call sends: one message, or 1..5 on a client stream."""
    one = (raw if kind == "raw" else structured)(method.input_type)
    if method.client_streaming:
        return st.lists(one, min_size=1, max_size=5)
    return one.map(lambda b: [b])


# -- the server under test, in its own thread and event loop -----------------------------------


class ServerThread:
    """A StockholdServer running on an event loop of its own thread."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="fuzz-server", daemon=True
        )
        self.thread.start()
        self.server: StockholdServer | None = None
        self.address = ""

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        async def start() -> int:
            values = {**TEST_SETTINGS, **store_settings(self.store), **FUZZ_SETTINGS}
            self.server = StockholdServer(Settings(**values), self.store.url)
            if is_cluster(self.store):
                self.store.servers.append(self.server)
            return await self.server.start()

        self.address = f"127.0.0.1:{self.run(start())}"

    def drain(self) -> None:
        """Let the server finish the bookkeeping that follows its answers (cluster only:
        cross-slot index moves, as stockhold_fixtures.snapshot does)."""
        assert self.server is not None
        if self.server.engine.cross is not None:
            self.run(self.server.engine.cross.drain())

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.stop(grace=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _digests(proc: Any) -> dict[bytes, bytes]:
    """key -> DEBUG DIGEST-VALUE of one Redis node's keys, b"ttl:" before the digest of a key
    with a lifetime (abort tombstones with a lifetime left out, as ClusterStore.dump does)."""
    client = redis.Redis(host="127.0.0.1", port=proc.port, socket_timeout=10)
    try:
        keys = sorted(client.keys("*"))
        if not keys:
            return {}
        values = client.execute_command("DEBUG", "DIGEST-VALUE", *keys)
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.pttl(key)
        out: dict[bytes, bytes] = {}
        for key, value, ttl in zip(keys, values, pipe.execute(), strict=True):
            if ttl >= 0 and f":{c.ABORT}:".encode() in key:
                continue
            out[key] = b"ttl:" + value if ttl >= 0 else value
        return out
    finally:
        client.close()


def keyspace(store: Any) -> dict[bytes, bytes]:
    """Every key of the store with its value's digest."""
    if isinstance(store, ClusterStore):
        out: dict[bytes, bytes] = {}
        for proc in store.masters:
            out.update(_digests(proc))
        return out
    return _digests(store)


def unchanged(before: dict[bytes, bytes], after: dict[bytes, bytes]) -> bool:
    """The same keys and values, but for keys with a lifetime that expired in between (an
    out_trade_no map of a short hold, say: Redis removes it, not the call)."""
    expired = {k for k, v in before.items() if v.startswith(b"ttl:") and k not in after}
    return after == {k: v for k, v in before.items() if k not in expired}


def keyspace_diff(before: dict[bytes, bytes], after: dict[bytes, bytes]) -> str:
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return ", ".join(k.decode(errors="replace") for k in changed[:10])


class ErrorLog(logging.Handler):
    """ERROR and above, from any logger and thread (the server logs its own failures)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")

    def take(self) -> list[str]:
        out, self.records = self.records, []
        return out


@dataclass
class Outcome:
    """What one call got back."""

    code: grpc.StatusCode
    details: str
    answers: list[bytes] = field(default_factory=list)
    ours: bool = False  # the status is our own cancel or window, not the server's answer


def _status_codes(msg: Message) -> Iterator[tuple[int, bool]]:
    """(code, in a oneof) of every google.rpc.Status inside a message."""
    for f, value in msg.ListFields():
        values = value if f.is_repeated else [value]
        if f.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        for v in values:
            if f.message_type.full_name == STATUS:
                yield v.code, f.containing_oneof is not None
            else:
                yield from _status_codes(v)


def _items(msg: Message) -> Iterator[bool]:
    """For each oneof item with a google.rpc.Status branch (ReserveBatchResult,
    ReserveStreamResponse): whether it is refused (its Status branch is set)."""
    for f, value in msg.ListFields():
        if f.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        for v in value if f.is_repeated else [value]:
            yield from _items(v)
    for oneof in msg.DESCRIPTOR.oneofs:
        branches = {f.name: f for f in oneof.fields}
        if any(_is_status(f) for f in branches.values()):
            chosen = msg.WhichOneof(oneof.name)
            if chosen is not None:
                yield _is_status(branches[chosen])


def _is_status(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.full_name == STATUS


class Fuzzer:
    """Sends one fuzzed call and checks the oracle."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(
            server.address, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.before = keyspace(server.store)
        self.errors = ErrorLog()
        logging.getLogger().addHandler(self.errors)
        self.calls: dict[str, int] = {}

    def close(self) -> None:
        logging.getLogger().removeHandler(self.errors)
        self.channel.close()

    def serving(self) -> bool:
        """The server answers its health check SERVING, now or within CALL_LIMIT_S (on a
        loaded box a health probe of Redis may time out once: NOT_SERVING for a moment)."""
        give_up = time.monotonic() + CALL_LIMIT_S
        for _ in range(1000):
            check = self.health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_LIMIT_S)
            if check.status == health_pb2.HealthCheckResponse.SERVING:
                return True
            if time.monotonic() > give_up:
                return False
            time.sleep(0.05)
        return False

    def call(self, method: MethodDescriptor, sent: list[bytes]) -> Outcome:
        path = f"/{SERVICE.full_name}/{method.name}"
        if method.client_streaming:
            stream = self.channel.stream_stream(path)(iter(sent), timeout=CALL_LIMIT_S)
            return self._read(stream, len(sent) + STREAM_READ, ours=False)
        if method.server_streaming:
            stream = self.channel.unary_stream(path)(sent[0], timeout=STREAM_WINDOW_S)
            return self._read(stream, STREAM_READ, ours=True)
        try:
            answer, call = self.channel.unary_unary(path).with_call(sent[0], timeout=CALL_LIMIT_S)
        except grpc.RpcError as err:
            return Outcome(err.code(), err.details() or "")
        return Outcome(call.code(), "", [answer])

    def _read(self, stream: Any, limit: int, ours: bool) -> Outcome:
        answers: list[bytes] = []
        try:
            for answer in stream:
                answers.append(answer)
                if len(answers) >= limit:
                    stream.cancel()
                    return Outcome(grpc.StatusCode.CANCELLED, "", answers, ours=True)
        except grpc.RpcError as err:
            own = ours and err.code() in (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED,
            )
            return Outcome(err.code(), err.details() or "", answers, ours=own)
        return Outcome(stream.code(), stream.details() or "", answers)

    def check(self, method: MethodDescriptor, sent: list[bytes]) -> None:
        """One call and the whole oracle."""
        self.errors.take()  # what a failed example before left
        started = time.monotonic()
        outcome = self.call(method, sent)
        took = time.monotonic() - started
        what = f"{method.name} {[s[:200] for s in sent]!r}"
        self.calls[method.name] = self.calls.get(method.name, 0) + 1
        assert outcome.code not in FORBIDDEN, f"{what}: {outcome.code} {outcome.details}"
        assert outcome.code is not grpc.StatusCode.DEADLINE_EXCEEDED or outcome.ours, (
            f"{what}: no answer within {CALL_LIMIT_S} s"
        )
        assert took < CALL_LIMIT_S + 1, f"{what}: took {took:.1f} s"
        out_cls = message_class(method.output_type)
        refused_items: list[bool] = []
        for answer in outcome.answers:
            msg = out_cls.FromString(answer)
            for code, _ in _status_codes(msg):
                assert code not in FORBIDDEN_CODES, f"{what}: an item answered {code}: {msg}"
            refused_items += list(_items(msg))
        assert self.serving(), f"not SERVING again within {CALL_LIMIT_S} s after {what}"
        # After the health check: the server's ERROR lines of this call are all in.
        errors = self.errors.take()
        assert not errors, f"{what}: the server logged {errors[:3]}"
        self.server.drain()
        after = keyspace(self.server.store)
        refused = (
            outcome.code is not grpc.StatusCode.OK and not outcome.ours and not outcome.answers
        ) or (bool(refused_items) and all(refused_items) and not outcome.ours)
        before, self.before = self.before, after  # the next call starts from here, pass or fail
        if refused:
            assert unchanged(before, after), (
                f"{what}: refused ({outcome.code} {outcome.details[:200]}) but wrote "
                f"{keyspace_diff(before, after)}"
            )


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standalone_redis(
    redis_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisProc]:
    proc = RedisProc(redis_binary, tmp_path_factory.mktemp("fuzz-redis"), aof=False)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def _seed(address: str) -> None:
    """Stock for SKUS in both warehouses, orders held / committed / released, a
    subscription, a count: so that fuzzed calls naming them reach past validation."""
    from stockhold.v1 import inventory_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InventoryStub(channel)
        for sku in SKUS:
            for wh in WAREHOUSES:
                stub.AdjustStock(
                    pb.AdjustStockRequest(
                        adjustment_id=f"seed-{sku}-{wh}",
                        unit=pb.SalesUnit(sku=sku),
                        warehouse=wh,
                        delta=1_000_000,
                    )
                )
        for order in (HELD, COMMITTED, RELEASED):
            line = pb.ReserveLine(unit=pb.SalesUnit(sku=SKUS[0]), warehouse="w1", quantity=1)
            stub.Reserve(pb.ReserveRequest(order_id=order, lines=[line], amount=100))
        stub.Commit(pb.CommitRequest(order_id=COMMITTED))
        stub.Release(pb.ReleaseRequest(order_id=RELEASED))
        sub = pb.Subscription(name=SUBSCRIPTION, url="http://127.0.0.1:9/hook")
        stub.CreateSubscription(pb.CreateSubscriptionRequest(subscription=sub, secret="s" * 20))


@contextlib.contextmanager
def fuzz_server(store: Any) -> Iterator[Fuzzer]:
    server = ServerThread(store)
    fuzzer: Fuzzer | None = None
    try:
        server.start()
        _seed(server.address)
        fuzzer = Fuzzer(server)
        yield fuzzer
    finally:
        if fuzzer is not None:
            fuzzer.close()
        server.stop()


@pytest.fixture(scope="module")
def standalone(standalone_redis: RedisProc) -> Iterator[Fuzzer]:
    with fuzz_server(standalone_redis) as fuzzer:
        yield fuzzer


@pytest.fixture(scope="module")
def cluster(_shared_cluster: Any) -> Iterator[Fuzzer]:
    store: ClusterStore = _shared_cluster.get()
    store.flush()
    try:
        with fuzz_server(store) as fuzzer:
            yield fuzzer
    finally:
        store.close()


# -- the tests ---------------------------------------------------------------------------------

# Inputs that found a defect once: each replayed first, before the generated ones.
REGRESSIONS: dict[tuple[str, str], list[list[bytes]]] = {
    # not the wire format / invalid UTF-8 in a string: were UNKNOWN (decoding.py)
    ("Reserve", "raw"): [[b"\xff"], [b"\n\x02\xff\xfe"]],
    ("WatchEvents", "raw"): [[b"\n\x01\x80"]],
    # a malformed message after others on a stream: was UNKNOWN, or no answer (decoding.py)
    ("ReserveStream", "structured"): [
        [b"", b"\x12\x05*\x03\x12\x01\x80", b"\x12\x03\n\x01\x80", b""],
        [b"", b"\n\x02\xc3("],
    ],
    # a Duration beyond timedelta: was UNKNOWN (OverflowError, servicer.GetContentionStats)
    ("GetContentionStats", "raw"): [
        [
            b"\x08\x81\x80\x80\x80\xf8\xff\xff\xff\xff\x01\x12\t\x08\x80\x80\x80\x80\x80\x80\x80\x10\x18\x01"
        ]
    ],
    # an instant past 9999 in UTC: was UNKNOWN (OverflowError, timeparse)
    ("ReportPayment", "structured"): [[b"2#9999-12-31T23:59:59.999999999-23:59"]],
    ("SetOnHand", "structured"): [[b"\n\nfz-count-1*#9999-12-31T23:59:59.999999999-23:59"]],
}


def fuzz(fuzzer: Fuzzer, method: MethodDescriptor, kind: str, examples: int) -> None:
    """`examples` generated calls of `method` (plus its regressions) through the oracle."""

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,  # no .hypothesis/ folder in the repository root
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(sent=payloads(method, kind))
    def run(sent: list[bytes]) -> None:
        fuzzer.check(method, sent)

    for sent in REGRESSIONS.get((method.name, kind), []):
        run = example(sent=sent)(run)
    run()
    # Still serving, and a real call still answers.
    fuzzer.check(SERVICE.methods_by_name["GetAvailability"], [_availability()])


def _availability() -> bytes:
    req = pb.GetAvailabilityRequest(units=[pb.SalesUnit(sku=s) for s in SKUS])
    return req.SerializeToString()


def _ids(m: MethodDescriptor) -> str:
    return m.name


KINDS = ["raw", "structured"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS, ids=_ids)
def test_fuzz(standalone: Fuzzer, method: MethodDescriptor, kind: str) -> None:
    fuzz(standalone, method, kind, SHORT_EXAMPLES)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS, ids=_ids)
def test_fuzz_cluster(cluster: Fuzzer, method: MethodDescriptor, kind: str) -> None:
    fuzz(cluster, method, kind, SHORT_CLUSTER_EXAMPLES)


@pytest.mark.fuzz_long
@pytest.mark.timeout(0)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS, ids=_ids)
def test_fuzz_long(standalone: Fuzzer, method: MethodDescriptor, kind: str) -> None:
    started = time.monotonic()
    fuzz(standalone, method, kind, LONG_EXAMPLES)
    calls = standalone.calls.pop(method.name, 0)
    _report("standalone", method, kind, calls, time.monotonic() - started)


@pytest.mark.fuzz_long
@pytest.mark.timeout(0)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS, ids=_ids)
def test_fuzz_long_cluster(cluster: Fuzzer, method: MethodDescriptor, kind: str) -> None:
    started = time.monotonic()
    fuzz(cluster, method, kind, max(LONG_EXAMPLES // 5, 1))
    calls = cluster.calls.pop(method.name, 0)
    _report("cluster", method, kind, calls, time.monotonic() - started)


def _report(store: str, method: MethodDescriptor, kind: str, calls: int, took: float) -> None:
    """One line per method and kind, appended to $FUZZ_REPORT when set (make fuzz)."""
    out = os.environ.get("FUZZ_REPORT")
    if out:
        with Path(out).open("a") as f:
            f.write(f"{store} {method.name} {kind}: {calls} calls, {took:.1f} s\n")


def test_every_method_is_fuzzed() -> None:
    """The methods come from the descriptor: the server serves each of them."""
    names = {m.name for m in METHODS}
    assert {"Reserve", "ReserveStream", "WatchEvents", "SetOnHand", "ReplayFrom"} <= names
    servicer = pb.DESCRIPTOR.services_by_name["Inventory"]
    assert len(servicer.methods) == len(METHODS)


def _rich(err: grpc.RpcError) -> tuple[str, dict[str, str]]:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason, dict(info.metadata)


def test_a_request_that_does_not_parse_is_invalid_argument(standalone: Fuzzer) -> None:
    """Unary and server-streaming: INVALID_ARGUMENT / ErrorInfo naming the type expected."""
    channel = standalone.channel
    bad = b"\n\x02\xff\xfe"  # field 1 (a string in both) with invalid UTF-8
    for method in ("Reserve", "WatchEvents"):
        path = f"/{SERVICE.full_name}/{method}"
        with pytest.raises(grpc.RpcError) as info:
            if method == "WatchEvents":
                list(channel.unary_stream(path)(bad, timeout=CALL_LIMIT_S))
            else:
                channel.unary_unary(path)(bad, timeout=CALL_LIMIT_S)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, method
        assert "does not parse" in (info.value.details() or "")
        reason, metadata = _rich(info.value)
        assert reason == "INVALID_ARGUMENT"
        assert metadata["type"] == f"stockhold.v1.{SERVICE.methods_by_name[method].input_type.name}"


def test_a_stream_message_that_does_not_parse_ends_the_call_after_the_answers(
    standalone: Fuzzer,
) -> None:
    """ReserveStream: the messages before the malformed one are answered, then the call ends
    INVALID_ARGUMENT; the one after it is not read."""
    order = pb.ReserveRequest(
        order_id="fz-stream-1",
        lines=[pb.ReserveLine(unit=pb.SalesUnit(sku=SKUS[1]), warehouse="w1", quantity=1)],
    )
    good = pb.ReserveStreamRequest(correlation_id="1", request=order).SerializeToString()
    after = pb.ReserveStreamRequest(correlation_id="3", request=order).SerializeToString()
    call = standalone.channel.stream_stream(f"/{SERVICE.full_name}/ReserveStream")
    stream = call(iter([good, b"\n\x01\x80", after]), timeout=CALL_LIMIT_S)
    answers = []
    with pytest.raises(grpc.RpcError) as info:
        for answer in stream:
            answers.append(pb.ReserveStreamResponse.FromString(answer))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [(a.correlation_id, a.WhichOneof("result")) for a in answers] == [("1", "reserved")]
