"""Types of the compiled key resolver (native/_resolver_c.pyx): stockhold._resolver_py's API.

Import `stockhold.resolver`, which picks this module or its pure-Python twin.
"""

from collections.abc import Sequence

from stockhold._resolver_py import AdjustmentKeys as AdjustmentKeys
from stockhold._resolver_py import OrderKeys as OrderKeys
from stockhold._resolver_py import ResolvedOrder as ResolvedOrder
from stockhold._resolver_py import Unit as Unit
from stockhold.errors import FieldViolation

def escape(text: str) -> str: ...
def check_text(
    value: str, path: str, lo: int, hi: int, out: list[FieldViolation], normalise: bool = True
) -> str: ...
def check_int(value: int, path: str, lo: int, hi: int, out: list[FieldViolation]) -> None: ...

class KeyResolver:
    prefix: str
    partitions: int
    def __init__(self, prefix: str = "sh", partitions: int = 64) -> None: ...
    def partition_of(self, ident: str) -> int: ...
    def expiry_key(self, partition: int) -> str: ...
    def events_key(self, partition: int) -> str: ...
    def meta_partitions_key(self) -> str: ...
    def sku_key(self, sku: str) -> str: ...
    def meta_key(self, name: str) -> str: ...
    def unit(
        self,
        sku: str,
        spec: str,
        barcode: str,
        path: str = "unit",
        out: list[FieldViolation] | None = None,
    ) -> Unit: ...
    def units(self, triples: Sequence[tuple[str, str, str]], path: str = "units") -> list[Unit]: ...
    def order(
        self, order_id: str, path: str = "order_id", out: list[FieldViolation] | None = None
    ) -> OrderKeys: ...
    def adjustment(
        self,
        adjustment_id: str,
        path: str = "adjustment_id",
        out: list[FieldViolation] | None = None,
    ) -> AdjustmentKeys: ...
    def resolve_order(
        self,
        order_id: str,
        lines: Sequence[tuple[str, str, str, str, int]],
        hold_seconds: int,
        max_hold_seconds: int,
    ) -> ResolvedOrder: ...

# This module's own CRC-32 and BLAKE2b-128 (hex), exposed for the tests.
def _crc32(data: bytes) -> int: ...
def _blake2b_16(data: bytes) -> str: ...

__all__ = [
    "AdjustmentKeys",
    "KeyResolver",
    "OrderKeys",
    "ResolvedOrder",
    "Unit",
    "check_int",
    "check_text",
    "escape",
]
