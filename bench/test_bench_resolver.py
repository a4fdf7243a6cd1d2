"""Micro-benchmarks of the key resolver, compiled (`c`) against pure Python (`py`).

The inputs are what a busy shop sends: ASCII SKUs, specs and barcodes, no warehouse.
Compare the two with `--benchmark-group-by=func` (the default groups by function already).
"""

from __future__ import annotations

from typing import Any

import pytest

ORDER_ID = "ord-2024-11-26-000123"
LINES = [
    (f"SKU-{1000 + i:05d}-BLK", "size=M;color=black", f"40123456789{i:02d}", "", 1 + i)
    for i in range(10)
]


def test_unit(benchmark: Any, resolver_class: type[Any]) -> None:
    resolve = resolver_class().unit
    unit = benchmark(resolve, "SKU-01000-BLK", "size=M;color=black", "4012345678901")
    assert unit.unit_id == "SKU-01000-BLK:size=M;color=black:4012345678901"


@pytest.mark.parametrize("count", [1, 10], ids=["1-line", "10-line"])
def test_resolve_order(benchmark: Any, resolver_class: type[Any], count: int) -> None:
    resolve = resolver_class().resolve_order
    lines = LINES[:count]
    order = benchmark(resolve, ORDER_ID, lines, 0, 3600)
    assert len(order.units) == count
