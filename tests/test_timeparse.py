"""Strict RFC 3339: an explicit offset or INVALID_ARGUMENT, and one instant, one number."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest

from stockhold.errors import DomainError, Reason
from stockhold.timeparse import format_rfc3339, parse_rfc3339

# 2026-11-26T14:28:16.527Z
INSTANT_MS = int(datetime(2026, 11, 26, 14, 28, 16, 527000, tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-26T14:28:16.527Z",
        "2026-11-26t14:28:16.527z",
        "2026-11-26T22:28:16.527+08:00",
        "2026-11-26T08:58:16.527-05:30",
        "2026-11-27T00:28:16.527+10:00",
        "2026-11-26 22:28:16.527+08:00",
        "2026-11-26T14:28:16.527-00:00",
        "2026-11-26T14:28:16.527999999Z",
    ],
)
def test_the_same_instant_in_any_zone_is_the_same_number(text: str) -> None:
    assert parse_rfc3339(text) == INSTANT_MS


def test_fractional_seconds_are_optional_and_truncated_to_milliseconds() -> None:
    assert parse_rfc3339("2026-11-26T14:28:16Z") == INSTANT_MS - 527
    assert parse_rfc3339("2026-11-26T14:28:16.5Z") == INSTANT_MS - 27
    assert parse_rfc3339("1970-01-01T00:00:00Z") == 0
    assert parse_rfc3339("1969-12-31T23:59:59.999Z") == -1


def test_a_leap_second_reads_as_the_start_of_the_next_minute() -> None:
    assert parse_rfc3339("2016-12-31T23:59:60Z") == parse_rfc3339("2017-01-01T00:00:00Z")


def _violation(text: str, field: str) -> str:
    with pytest.raises(DomainError) as info:
        parse_rfc3339(text, field)
    err = info.value
    assert err.reason is Reason.INVALID_ARGUMENT
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    [violation] = err.violations
    assert violation.field == field
    return violation.description


@pytest.mark.parametrize(
    "text",
    ["2026-11-26T14:28:16", "2026-11-26T14:28:16.527", "2026-11-26 22:28:16"],
)
def test_a_naive_timestamp_is_refused_with_the_field(text: str) -> None:
    description = _violation(text, "expires_at")
    assert "explicit offset required" in description


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "2026-11-26",
        "2026-13-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "2026-11-26T24:00:00Z",
        "2026-11-26T14:28:16+8:00",
        "2026-11-26T14:28:16+0800",
        "2026-11-26T14:28:16+24:00",
        "2026-11-26T14:28:16.Z",
        "2026-11-26T14:28:16.1234567890Z",
        "2026-11-26T14:28:16Z ",
        " 2026-11-26T14:28:16Z",
        "2026-11-26T14:28:16ZZ",
        "１２３４-11-26T14:28:16Z",  # full-width digits are not ASCII digits
        "2026-11-26T14:28:16Z" + "0" * 100,
        "1776000000",
        # outside datetime's range once the offset is applied (was OverflowError: UNKNOWN on
        # SetOnHand and ReportPayment; found by tests/test_fuzz.py)
        "9999-12-31T23:59:59.999999999-23:59",
        "9999-12-31T23:00:00-01:00",
        "0001-01-01T00:00:00+00:01",
        "9999-12-31T23:59:60Z",
    ],
)
def test_garbage_is_refused_with_the_field(text: str) -> None:
    description = _violation(text, "success_time")
    assert "RFC 3339" in description or "range" in description or "valid" in description
    assert len(description) < 200  # the input is quoted, bounded


def test_a_non_string_is_refused() -> None:
    with pytest.raises(DomainError) as info:
        parse_rfc3339(1776000000, "t")  # type: ignore[arg-type]
    assert info.value.violations[0].field == "t"


@pytest.mark.parametrize("ms", [0, 1, -1, INSTANT_MS, 253402300799999])
def test_format_round_trips_in_utc(ms: int) -> None:
    text = format_rfc3339(ms)
    assert text.endswith("Z")
    assert parse_rfc3339(text) == ms


def test_format_writes_milliseconds() -> None:
    assert format_rfc3339(INSTANT_MS) == "2026-11-26T14:28:16.527Z"
    assert format_rfc3339(-1) == "1969-12-31T23:59:59.999Z"
