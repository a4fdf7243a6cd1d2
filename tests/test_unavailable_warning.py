"""Calls answered UNAVAILABLE leave the operator a signal (stockhold.errors._UnavailableSummary):
one WARNING at once, then at most one per period summing up the rest by method and cause."""

from __future__ import annotations

import asyncio
import logging

import pytest

from stockhold import errors
from stockhold.errors import DomainError, Reason, log_refusal


def unavailable(cause: str) -> DomainError:
    return DomainError(Reason.BACKEND_UNAVAILABLE, metadata={"cause": cause})


async def test_unavailable_answers_are_summed_up_in_rate_limited_warnings(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(errors, "UNAVAILABLE_WARN_EVERY", 0.2)
    monkeypatch.setattr(errors, "_unavailable", errors._UnavailableSummary())
    caplog.set_level(logging.WARNING, logger="stockhold.servicer")
    log_refusal("Reserve", unavailable("TimeoutError"))  # the first: at once
    for _ in range(5):
        log_refusal("Reserve", unavailable("TimeoutError"))
    log_refusal("Release", unavailable("queued"))
    lines = [r for r in caplog.records if "UNAVAILABLE" in r.getMessage()]
    assert len(lines) == 1 and "Reserve TimeoutError x1" in lines[0].getMessage()
    for _ in range(100):  # the rest of the burst: when the period ends (bounded wait)
        await asyncio.sleep(0.05)
        lines = [r for r in caplog.records if "UNAVAILABLE" in r.getMessage()]
        if len(lines) == 2:
            break
    assert len(lines) == 2, [r.getMessage() for r in lines]
    text = lines[1].getMessage()
    assert text.startswith("6 call(s) answered UNAVAILABLE")
    assert "Release queued x1" in text and "Reserve TimeoutError x5" in text
    assert all(r.levelno == logging.WARNING for r in lines)


def test_other_refusals_still_log_one_warning_each(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="stockhold.servicer")
    log_refusal("Reserve", DomainError(Reason.INTERNAL, "boom"))
    log_refusal("Reserve", DomainError(Reason.INSUFFICIENT_STOCK))  # normal business: quiet
    assert [r.getMessage() for r in caplog.records] == ["Reserve refused: INTERNAL: boom"]
