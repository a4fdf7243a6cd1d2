"""Strict RFC 3339 timestamps: every instant that enters stockhold carries an explicit offset.

Orders were cancelled after 5 minutes instead of 48 hours because a browser or an ERP sent a
local time without its zone and the reader guessed one. Here nothing is guessed: a string
without `Z` or `±HH:MM` is refused with INVALID_ARGUMENT naming the field, and the same instant
written in any zone gives the same number of milliseconds.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Final

from stockhold.errors import DomainError, FieldViolation, invalid

# RFC 3339 section 5.6. The date/time separator is `T` (or `t`); section 5.6's note lets
# applications use a space for readability, and ERP exports do, so a space is accepted too.
_RFC3339: Final = re.compile(
    r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})[Tt ]"
    r"(?P<h>\d{2}):(?P<mi>\d{2}):(?P<s>\d{2})(?:\.(?P<frac>\d{1,9}))?"
    r"(?P<tz>[Zz]|[+-]\d{2}:\d{2})?",
    re.ASCII,
)
# Longest valid form: 2026-11-26T14:28:16.123456789+08:00 is 35 characters.
_MAX_LEN: Final = 40
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)
_MAX_MS: Final = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - _EPOCH) // _MS
_EXAMPLE: Final = "2026-11-26T14:28:16.527+08:00"


def _shown(text: str) -> str:
    # Quote what was received, bounded, so an error message never carries a whole payload.
    return repr(text if len(text) <= _MAX_LEN else text[:_MAX_LEN] + "...")


def _refuse(field: str, description: str) -> DomainError:
    return invalid([FieldViolation(field, description)])


def parse_rfc3339(text: str, field: str = "timestamp") -> int:
    """An RFC 3339 timestamp with an explicit offset -> milliseconds since the Unix epoch.

    Fractional seconds are accepted (up to 9 digits) and truncated to the millisecond; a leap
    second (`:60`) reads as the start of the next minute (Unix time has no leap seconds). A string
    without an offset, or anything malformed, raises DomainError(INVALID_ARGUMENT) with a
    FieldViolation on `field`.
    """
    received: object = text  # callers pass decoded JSON, which is not always a str
    if not isinstance(received, str) or len(received) > _MAX_LEN:
        shown = _shown(received) if isinstance(received, str) else type(received).__name__
        raise _refuse(field, f"not an RFC 3339 timestamp (e.g. {_EXAMPLE}), got {shown}")
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise _refuse(field, f"not an RFC 3339 timestamp (e.g. {_EXAMPLE}), got {_shown(text)}")
    tz = m["tz"]
    if tz is None:
        raise _refuse(
            field,
            f"explicit offset required (Z or ±HH:MM, e.g. {_EXAMPLE}); "
            f"got a local time without one: {_shown(text)}",
        )
    if tz in ("Z", "z"):
        offset = timedelta(0)
    else:
        oh, om = int(tz[1:3]), int(tz[4:6])
        if oh > 23 or om > 59:
            raise _refuse(field, f"offset out of range in {_shown(text)}")
        # `-00:00` means "UTC, local offset unknown" (RFC 3339 4.3): the instant is still UTC.
        offset = timedelta(hours=oh, minutes=om) * (-1 if tz[0] == "-" else 1)
    second = int(m["s"])
    leap = second == 60
    try:
        local = datetime(
            int(m["y"]),
            int(m["mo"]),
            int(m["d"]),
            int(m["h"]),
            int(m["mi"]),
            59 if leap else second,
            tzinfo=UTC,
        )
    except ValueError as exc:
        raise _refuse(field, f"not a valid date/time in {_shown(text)}: {exc}") from None
    # Integer arithmetic throughout: floats would round some millisecond values.
    try:
        utc = local - offset
    except OverflowError:  # e.g. 9999-12-31T23:00:00-05:00 is in the year 10000 in UTC
        raise _refuse(field, f"out of range (years 0001..9999 in UTC): {_shown(text)}") from None
    ms = (utc - _EPOCH) // _MS + (1000 if leap else 0)
    frac = m["frac"]
    if frac and not leap:
        ms += int(frac[:3].ljust(3, "0"))
    if ms > _MAX_MS:  # a leap second at the very end: format_rfc3339 could not write it
        raise _refuse(field, f"out of range (years 0001..9999 in UTC): {_shown(text)}")
    return ms


def format_rfc3339(ms: int) -> str:
    """Milliseconds since the Unix epoch -> `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC)."""
    dt = _EPOCH + timedelta(milliseconds=ms)
    # Not strftime: %Y does not zero-pad years below 1000 on every libc.
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T"
        f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}.{ms % 1000:03d}Z"
    )
