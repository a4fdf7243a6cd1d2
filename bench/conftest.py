"""Benchmark fixtures: every benchmark runs once per key resolver, compiled (`c`) and pure (`py`).

Run: .venv/bin/python -m pytest bench/test_bench_resolver.py --benchmark-only
"""

from __future__ import annotations

import os

import pytest

from stockhold import _resolver_py
from stockhold import resolver as _selector

try:
    from stockhold import _resolver_c
except ImportError:
    _resolver_c = None  # type: ignore[assignment]


@pytest.fixture(params=["c", "py"])
def resolver_class(request: pytest.FixtureRequest) -> type[_selector.KeyResolver]:
    """KeyResolver of the compiled (`c`) or the pure-Python (`py`) implementation."""
    if request.param == "py":
        return _resolver_py.KeyResolver
    if os.environ.get("STOCKHOLD_NO_EXTENSIONS"):
        pytest.skip("STOCKHOLD_NO_EXTENSIONS is set")
    if _resolver_c is None:
        pytest.skip("stockhold._resolver_c is not built (make native)")
    return _resolver_c.KeyResolver
