"""Key resolver: sales unit / order / adjustment -> canonical id, partition and Redis keys.

It normalises (Unicode NFC) and validates user text, escapes it so that it can never change
key syntax or cluster slot, picks the partition by a stable hash (CRC-32 of the canonical id,
mod the partition count) and builds every key.

Two implementations give the same answers: the compiled `stockhold._resolver_c`
(native/_resolver_c.pyx) and its pure-Python twin `stockhold._resolver_py`, the reference.
This module picks one at import time: the twin when the environment variable
`STOCKHOLD_NO_EXTENSIONS` is set (non-empty) or the extension is not built, else the compiled
one. `NATIVE` says which; `PyKeyResolver` is always the pure class (tests and benchmarks).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from stockhold import constants as c
from stockhold._resolver_py import AdjustmentKeys, OrderKeys, ResolvedOrder, Unit
from stockhold._resolver_py import KeyResolver as PyKeyResolver

NO_EXTENSIONS = bool(os.environ.get("STOCKHOLD_NO_EXTENSIONS"))

NATIVE: bool
if TYPE_CHECKING or NO_EXTENSIONS:
    from stockhold._resolver_py import KeyResolver, check_int, check_text, escape

    NATIVE = False
else:
    try:
        from stockhold._resolver_c import KeyResolver, check_int, check_text, escape

        NATIVE = True
    except ImportError:  # not built (no compiler or no Cython at install time)
        from stockhold._resolver_py import KeyResolver, check_int, check_text, escape

        NATIVE = False


def partition_tag(resolver: KeyResolver, partition: int) -> str:
    """A partition's key tag, `<prefix>:{p<N>}:`, which every key of the partition starts with
    (taken from the resolver's expiry key, whose name follows it)."""
    return resolver.expiry_key(partition)[: -len(c.EXPIRY)]


__all__ = [
    "NATIVE",
    "AdjustmentKeys",
    "KeyResolver",
    "OrderKeys",
    "PyKeyResolver",
    "ResolvedOrder",
    "Unit",
    "check_int",
    "check_text",
    "escape",
    "partition_tag",
]
