"""Every Redis key template, stream field and wire-level name lives here; nobody else invents them.

Layout (see docs/architecture.md): every key carries its partition's hash tag, so all keys of a
partition sit in one Redis Cluster slot.

    <prefix>:{p<N>}:stock:<unit-id>      hash  a:<warehouse> -> available, r:<warehouse> -> reserved
    <prefix>:{p<N>}:order:<order-id>     hash  the reservation record (home partition of the order)
    <prefix>:{p<N>}:expiry               zset  order id -> deadline (ms, Redis clock)
    <prefix>:{p<N>}:events               stream  one entry per state change
    <prefix>:{p<N>}:adj:<adjustment-id>  hash  the stored answer of an AdjustStock
    <prefix>:{p<N>}:count:<count-id>     hash  the stored answer of a SetOnHand (cycle count),
                                               in the counted unit's SKU partition
    <prefix>:{meta}:partitions           string  the partition count of this deployment
    <prefix>:{meta}:layout               string  the key layout of its data (LAYOUT)
    <prefix>:{p<N>}:sku:<sku>            hash  a SKU's policy fields and its sales buckets
    <prefix>:{meta}:contention           hash  process id -> contention snapshot head (JSON)
    <prefix>:{meta}:contention:seen      zset  process id -> last snapshot time (ms)
    <prefix>:{meta}:contention:slots:<process id>  hash  closed sub-window -> its piece (JSON)
    <prefix>:{p<N>}:polls                zset  order id -> next payment poll (ms, Redis clock)
    <prefix>:{p<N>}:otn:<provider>:<no>  string  the order id paid under a provider's out_trade_no
    <prefix>:{p<N>}:skus                 zset  SKUs of the partition with a stored policy or
                                               recent sales (lex)

A sales unit's stock hash is in its SKU's partition, beside the SKU's policy hash (issue 11).
Redis Cluster only (docs/cluster.md), an order whose keys span partitions:

    <prefix>:{p<N>}:part:<order-id>      hash  the order's lines whose stock is in partition N
    <prefix>:{p<N>}:parts                zset  order id -> when recovery looks at its part (ms)
    <prefix>:{p<N>}:settle               zset  order id -> when recovery settles its parts (ms)
    <prefix>:{p<N>}:abort:<order-id>     set   nonces of attempts whose parts were given back
    <prefix>:{p<N>}:adj:<adjustment-id>  also in the unit's partition, claimed in its own

Subscriptions (issue 12, stockhold.delivery.subscriptions builds these keys):

    <prefix>:{meta}:subs                 set   subscription names
    <prefix>:{meta}:sub:<name>           hash  definition (JSON), secret, created (ms)
    <prefix>:{p<N>}:lease:<name>         string  the process delivering partition N (PX)
    <prefix>:{p<N>}:failed:<name>        zset  stream id -> entry ms: events that used up their
                                               attempts
    <prefix>:{p<N>}:failedev:<name>      hash  stream id -> the failed event's body and error
    <prefix>:{p<N>}:dstat:<name>         hash  delivery statistics of partition N
    consumer group "sub:<name>" on every <prefix>:{p<N>}:events
"""

from __future__ import annotations

from typing import Final

DEFAULT_KEY_PREFIX: Final = "sh"
DEFAULT_PARTITIONS: Final = 64

STOCK: Final = "stock"
ORDER: Final = "order"
EXPIRY: Final = "expiry"
EVENTS: Final = "events"
ADJUSTMENT: Final = "adj"
COUNT: Final = "count"
META_PARTITIONS: Final = "{meta}:partitions"
# The key layout a deployment's data is in (absent: 1, stock by sales unit id); layout 2
# (issue 11) keeps stock in its SKU's partition and one SKU index per partition.
META_LAYOUT: Final = "{meta}:layout"
LAYOUT: Final = "2"
# Layout 1's one SKU index (zset); only `stockhold migrate-layout` (migrate.py) reads it.
META_SKUS_LAYOUT1: Final = "{meta}:skus"
SKU: Final = "sku"
SKU_INDEX: Final = "skus"
PART: Final = "part"
PARTS: Final = "parts"
SETTLE: Final = "settle"
ABORT: Final = "abort"
META_CONTENTION: Final = "{meta}:contention"
META_CONTENTION_SEEN: Final = "{meta}:contention:seen"
META_CONTENTION_SLOTS: Final = "{meta}:contention:slots"
META_SUBSCRIPTIONS: Final = "{meta}:subs"
META_SUBSCRIPTION: Final = "{meta}:sub"
SUB_LEASE: Final = "lease"
SUB_FAILED: Final = "failed"
SUB_FAILED_EVENTS: Final = "failedev"
SUB_STATS: Final = "dstat"
# zset: deliverer owner id -> expiry ms (stockhold.delivery.deliverer: the fair share)
META_DELIVERERS: Final = "{meta}:deliverers"
# pub/sub channel: partitions that just got events (stockhold.delivery.wake)
META_EVENTS_HINT: Final = "{meta}:events-hint"

# SKU policy hash fields (sales buckets are "b:<bucket index>").
POLICY_TIMEOUT: Final = "to"
POLICY_HOLD: Final = "hold"
POLICY_MAX_QTY: Final = "maxq"
POLICY_HOT: Final = "hot"
POLICY_PINNED: Final = "pin"
POLICY_STORED: Final = "set"
POLICY_UPDATED: Final = "up"
POLICY_SOLD: Final = "sold"

# Stock hash field prefixes (the warehouse name follows, as data).
FIELD_AVAILABLE: Final = "a:"
FIELD_RESERVED: Final = "r:"
# When the last cycle count applied to the warehouse was taken (counted_at, ms): an older count
# is refused (SetOnHand, STALE_COUNT).
FIELD_COUNTED: Final = "c:"

# Reservation record states as stored by the scripts.
STATE_HELD: Final = "H"
STATE_COMMITTED: Final = "C"
STATE_RELEASED: Final = "R"
STATE_EXPIRED: Final = "E"

# Event types appended to the partition streams.
EVENT_RESERVED: Final = "ORDER_RESERVED"
EVENT_COMMITTED: Final = "ORDER_COMMITTED"
EVENT_RELEASED: Final = "ORDER_RELEASED"
EVENT_EXPIRED: Final = "ORDER_EXPIRED"
EVENT_EXTENDED: Final = "ORDER_EXTENDED"
EVENT_ADJUSTED: Final = "STOCK_ADJUSTED"
EVENT_PAYMENT_PENDING: Final = "PAYMENT_PENDING"
EVENT_PAYMENT_FLAGGED: Final = "PAYMENT_FLAGGED"
EVENT_PAYMENT_AFTER_EXPIRY: Final = "PAYMENT_AFTER_EXPIRY"
EVENT_POLICY_CHANGED: Final = "SKU_POLICY_CHANGED"
# A counter set back to what the events say by `stockhold reconcile --repair` (reconcile.py).
EVENT_REPAIRED: Final = "STOCK_REPAIRED"
# A cycle count (SetOnHand): available set to on_hand - reserved (counts.py).
EVENT_COUNTED: Final = "STOCK_COUNTED"
# Who caused an event (its stream field "actor", Event.actor): the caller's identity for an
# RPC (servicer.actor_of), or the background job that wrote it.
ACTOR_ANONYMOUS: Final = "anonymous"  # a caller of a server without an auth file
ACTOR_SWEEPER: Final = "sweeper"  # expiry sweeps (server.py)
ACTOR_POLLER: Final = "poller"  # payment polling (payments/poller.py)
ACTOR_WEBHOOK: Final = "webhook"  # payment notifications (payments/webhook.py)
ACTOR_RECOVERY: Final = "recovery"  # cross-slot recovery (crossslot.py, Redis Cluster)
ACTOR_RECONCILE: Final = "reconcile"  # stockhold reconcile --repair (reconcile.py)
# Every type a stream may hold (WatchEvents refuses a filter naming another).
EVENT_TYPES: Final = (
    EVENT_RESERVED,
    EVENT_COMMITTED,
    EVENT_RELEASED,
    EVENT_EXPIRED,
    EVENT_EXTENDED,
    EVENT_ADJUSTED,
    EVENT_PAYMENT_PENDING,
    EVENT_PAYMENT_FLAGGED,
    EVENT_PAYMENT_AFTER_EXPIRY,
    EVENT_POLICY_CHANGED,
    EVENT_REPAIRED,
    EVENT_COUNTED,
)

ERROR_DOMAIN: Final = "stockhold"
SERVICE_NAME: Final = "stockhold.v1.Inventory"

# Field bounds of the public API (issue 2, section 3).
MAX_ORDER_ID: Final = 128
MAX_SKU: Final = 64
MAX_SPEC: Final = 64
MAX_BARCODE: Final = 64
MAX_WAREHOUSE: Final = 64
MAX_QUANTITY: Final = 1_000_000
MAX_LINES: Final = 100
MAX_ADJUSTMENT_ID: Final = 128
MAX_COUNT_ID: Final = 128
MAX_DELTA: Final = 1_000_000_000
MAX_REASON: Final = 256
MAX_PAYMENT_REF: Final = 128
MAX_AVAILABILITY_UNITS: Final = 500
# ReserveBatch orders per call and ReserveStream correlation ids (issue 10).
MAX_BATCH_ORDERS: Final = 100
MAX_CORRELATION_ID: Final = 128

# WeChat Pay v3 notifications (issue 5, stockhold.payments.wechatpay): one key per nonce seen
# in a verified notification, so a replay inside the timestamp window is refused.
#     <prefix>:{meta}:wxnonce:<nonce>      string  "1", EX a little over twice the window
WECHATPAY_NONCE: Final = "{meta}:wxnonce"
MAX_WECHATPAY_NONCE: Final = 64

# Payment sync (issue 5, docs/payments.md). Per partition: the poll index of payment-pending
# holds (the order's partition) and the out_trade_no -> order id map (the partition of
# "<escaped provider>:<escaped out_trade_no>"). Reservation record fields of a payment:
# amt (amount, minor units), pprov, potn, pst (PENDING | PAID | FAILED | CLOSED), ptx, ppaid,
# polls, pnext, pex (polls exhausted), pflag, plate (re-committed after expiry, ms), and one
# stored answer per reported transaction, "t:<provider>:<transaction id>".
POLLS: Final = "polls"
OUT_TRADE_NO: Final = "otn"
PAYMENT_ANSWER_FIELD: Final = "t:"
# Flags (Reservation.payment.flag) and why a payment was flagged (PAYMENT_FLAGGED events).
FLAG_AMOUNT_MISMATCH: Final = "AMOUNT_MISMATCH"
FLAG_POLLS_EXHAUSTED: Final = "POLLS_EXHAUSTED"
FLAG_REFUND: Final = "REFUND"
MAX_PROVIDER: Final = 32
MAX_OUT_TRADE_NO: Final = 64
MAX_TRANSACTION_ID: Final = 128
MAX_AMOUNT: Final = 1_000_000_000_000
