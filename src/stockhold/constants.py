"""Every Redis key template, stream field and wire-level name lives here; nobody else invents them.

Layout (see docs/architecture.md): every key carries its partition's hash tag, so all keys of a
partition sit in one Redis Cluster slot.

    <prefix>:{p<N>}:stock:<unit-id>      hash  a:<warehouse> -> available, r:<warehouse> -> reserved
    <prefix>:{p<N>}:order:<order-id>     hash  the reservation record (home partition of the order)
    <prefix>:{p<N>}:expiry               zset  order id -> deadline (ms, Redis clock)
    <prefix>:{p<N>}:events               stream  one entry per state change
    <prefix>:{p<N>}:adj:<adjustment-id>  hash  the stored answer of an AdjustStock
    <prefix>:{meta}:partitions           string  the partition count of this deployment
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
META_PARTITIONS: Final = "{meta}:partitions"

# Stock hash field prefixes (the warehouse name follows, as data).
FIELD_AVAILABLE: Final = "a:"
FIELD_RESERVED: Final = "r:"

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
EVENT_ADJUSTED: Final = "STOCK_ADJUSTED"

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
MAX_DELTA: Final = 1_000_000_000
MAX_REASON: Final = 256
MAX_PAYMENT_REF: Final = 128
MAX_AVAILABILITY_UNITS: Final = 500

# WeChat Pay v3 notifications (issue 5, stockhold.payments.wechatpay): one key per nonce seen
# in a verified notification, so a replay inside the timestamp window is refused.
#     <prefix>:{meta}:wxnonce:<nonce>      string  "1", EX a little over twice the window
WECHATPAY_NONCE: Final = "{meta}:wxnonce"
MAX_WECHATPAY_NONCE: Final = 64
