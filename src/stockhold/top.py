"""`stockhold top`: a live, refreshing terminal view of GetContentionStats, like `top`; and
its sibling `stockhold events lag` (GetSubscriptionLag, `render_lag`, `run_lag`).

`render` turns one response into a frame (pure, for tests); `run` polls the server and
redraws: in place (ANSI home + clear) on a terminal, frames separated by a blank line
otherwise. A failed call becomes a one-line error in the frame, and polling goes on.
"""

from __future__ import annotations

import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final, TextIO

import grpc
from google.protobuf.duration_pb2 import Duration

from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

# Makes the channel to an address (the CLI passes client.connector: credentials, TLS).
Connect = Callable[[str], grpc.Channel]

_CLEAR: Final = "\x1b[H\x1b[2J"  # cursor home, clear the screen
_ELLIPSIS: Final = "…"
# Text columns (sku, spec, barcode) never grow past this nor shrink below MIN_TEXT; when the
# terminal is narrow, barcode and spec give way first, the SKU last.
_MAX_TEXT: Final = 32
_MIN_TEXT: Final = 4
_SHRINK_ORDER: Final = ((2, 1), (0,))
# Before the SKU column would be cut below this, figure columns are left out, in this order
# (REQS, P99 and FLAG always stay).
_SKU_WANTED: Final = 12
_DROP_ORDER: Final = ("SCRIPT", "P50", "MAX", "CONT", "INSUF", "MEAN", "TMOUT")
# (header, least width) of the figure columns, right-aligned after the text columns; each is
# as wide as its widest value.
_FIGURES: Final = (
    ("REQS", 5),
    ("CONT", 5),
    ("TMOUT", 5),
    ("INSUF", 5),
    ("MEAN", 6),
    ("P50", 6),
    ("P99", 6),
    ("MAX", 6),
    ("SCRIPT", 6),
)


def stats_request(
    top_n: int = 0, window_s: float | None = None, since_start: bool = False
) -> pb.GetContentionStatsRequest:
    """A GetContentionStats request; `window_s` None leaves the server's configured window."""
    req = pb.GetContentionStatsRequest(top_n=top_n, since_start=since_start)
    if window_s is not None:
        req.window.FromNanoseconds(round(window_s * 1e9))
    return req


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 10_000 else f"{value:.0f}"


def _seconds(d: Duration) -> str:
    s = d.seconds + d.nanos / 1e9
    return f"{s:g}s"


def _cut(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return text[: max(width - 1, 0)] + _ELLIPSIS if width > 0 else ""


def _stamp(resp: pb.GetContentionStatsResponse | None) -> str:
    if resp is not None and resp.HasField("generated_at"):
        when = resp.generated_at.ToDatetime(tzinfo=UTC)
    else:
        when = datetime.now(UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def header(resp: pb.GetContentionStatsResponse) -> str:
    """The frame's first line: time, window, processes merged, flag threshold."""
    window = f"window {_seconds(resp.window)}" if resp.HasField("window") else "since start"
    parts = [
        "stockhold top",
        _stamp(resp),
        window,
        f"processes {resp.processes}",
        f"flag p99 > {resp.flag_ms:g} ms",
    ]
    if resp.skipped:
        parts.append(f"skipped {resp.skipped}")
    return "  ".join(parts)


def _text_widths(rows: Sequence[Sequence[str]], fixed: int, width: int) -> list[int]:
    """Widths of the text columns: natural (capped), shrunk to fit `width` (see _SHRINK_ORDER)."""
    widths = [min(max(len(r[i]) for r in rows), _MAX_TEXT) for i in range(3)]
    gaps = 3  # one space before each text column
    for group in _SHRINK_ORDER:
        while sum(widths) + gaps + fixed > width:
            widest = max(group, key=lambda i: widths[i])
            if widths[widest] <= _MIN_TEXT:
                break
            widths[widest] -= 1
    return widths


def render(resp: pb.GetContentionStatsResponse, width: int) -> str:
    """One frame: header, the table of top keys (heaviest total wait first), the SKU hints.

    Times are in milliseconds. FLAG marks a key whose wait p99 is above the flag threshold;
    a `*` after the rank marks figures that are lower bounds (the key took an evicted key's
    place in the top-K sketch). No line is longer than `width`: on a narrow terminal the
    barcode and spec columns shrink first, then the less telling figure columns are left
    out (_DROP_ORDER), then the SKU shrinks.
    """
    width = max(width, 20)
    lines = [_cut(header(resp), width), ""]
    head = ("SKU", "SPEC", "BARCODE")
    text_rows = [head] + [
        (k.unit.sku or k.key, k.unit.spec or "-", k.unit.barcode or "-") for k in resp.keys
    ]
    figure_rows = [
        (
            str(k.requests),
            str(k.contended),
            str(k.timeouts),
            str(k.insufficient),
            _ms(k.wait_mean_ms),
            _ms(k.wait_p50_ms),
            _ms(k.wait_p99_ms),
            _ms(k.wait_max_ms),
            _ms(k.script_mean_ms),
        )
        for k in resp.keys
    ]
    fw = {
        i: max(len(name), least, *(len(r[i]) for r in figure_rows))
        for i, (name, least) in enumerate(_FIGURES)
    }
    names = [name for name, _ in _FIGURES]
    sku_wanted = min(max(len(r[0]) for r in text_rows), _SKU_WANTED)
    wanted = sku_wanted + 2 * _MIN_TEXT + 3
    for name in _DROP_ORDER:
        if 4 + sum(w + 1 for w in fw.values()) + 5 + wanted <= width:
            break
        del fw[names.index(name)]
    fixed = 4 + sum(w + 1 for w in fw.values()) + 5  # rank, figures, " FLAG"
    tw = _text_widths(text_rows, fixed, width)

    def row(rank: str, texts: Sequence[str], figures: Sequence[str], flag: str) -> str:
        cells = [rank.rjust(4)]
        cells += [_cut(t, w).ljust(w) for t, w in zip(texts, tw, strict=True)]
        cells += [figures[i].rjust(w) for i, w in fw.items()]
        cells.append(flag)
        return _cut(" ".join(cells).rstrip(), width)

    lines.append(row("#", head, [h for h, _ in _FIGURES], "FLAG"))
    estimated = False
    for i, (k, texts, figures) in enumerate(
        zip(resp.keys, text_rows[1:], figure_rows, strict=True), start=1
    ):
        estimated = estimated or k.estimated
        lines.append(row(f"{i}{'*' if k.estimated else ''}", texts, figures, "FLAG" * k.flagged))
    if not resp.keys:
        lines.append("  (no requests recorded)")
    lines.append("")
    lines.append(_cut("wait and script times in ms; TMOUT: shed with RESERVE_TIMEOUT", width))
    if estimated:
        lines.append(_cut("* estimated: the figures are lower bounds", width))
    if resp.sku_hints:
        lines.append("")
        lines.append(_cut("SKU hints (several sales units of one SKU hot at once):", width))
        for h in resp.sku_hints:
            flagged = f", {h.flagged} flagged" if h.flagged else ""
            text = (
                f"  {h.sku}: {len(h.keys)} hot units{flagged}, wait {_ms(h.wait_total_ms)} ms"
                f" total: {', '.join(h.keys)}"
            )
            lines.append(_cut(text, width))
    return "\n".join(lines)


def render_error(
    err: grpc.RpcError | str,
    width: int,
    retry_s: float | None = None,
    title: str = "stockhold top",
) -> str:
    """A frame for a failed call: a header line (with the retry interval, if any), the error."""
    if isinstance(err, str):
        message = err
    else:
        details = (err.details() or "").strip().splitlines()
        message = f"{err.code().name}: {details[0] if details else ''}".rstrip(": ")
    head = f"{title}  {_stamp(None)}"
    if retry_s is not None:
        head += f"  retrying every {retry_s:g} s"
    return "\n".join((_cut(head, width), _cut(f"error: {message}", width)))


def run(
    address: str,
    interval: float = 2.0,
    top_n: int = 0,
    window_s: float | None = None,
    since_start: bool = False,
    iterations: int | None = None,
    timeout: float = 5.0,
    out: TextIO | None = None,
    connect: Connect = grpc.insecure_channel,
) -> int:
    """Poll and draw until `iterations` frames are drawn (None: until Ctrl-C).

    Returns 0 when the last frame had data or on Ctrl-C, 1 when the last call failed.
    """
    request = stats_request(top_n, window_s, since_start)
    return refresh(
        address,
        lambda stub, width: render(stub.GetContentionStats(request, timeout=timeout), width),
        interval,
        iterations,
        out,
        connect=connect,
    )


def refresh(
    address: str,
    frame_of: Callable[[pb_grpc.InventoryStub, int], str],
    interval: float = 2.0,
    iterations: int | None = None,
    out: TextIO | None = None,
    title: str = "stockhold top",
    connect: Connect = grpc.insecure_channel,
) -> int:
    """The refreshing loop of `top` and its sibling views: `frame_of(stub, width)` makes one
    frame (a failed call becomes an error frame, and polling goes on), drawn in place on a
    terminal, separated by a blank line otherwise, until `iterations` frames (None: Ctrl-C).
    `connect(address)` makes the channel (the CLI's client.connector: credentials, TLS).

    Returns 0 when the last frame had data or on Ctrl-C, 1 when the last call failed.
    """
    stream = sys.stdout if out is None else out
    tty = stream.isatty()
    ok = True
    drawn = 0
    # Ctrl-C sets a flag the loop checks between calls and during the pause, instead of a
    # KeyboardInterrupt unwinding through grpc's C core (which could leave the channel's
    # close waiting on a busy machine). Only the main thread may install a handler.
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        with connect(address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            while (iterations is None or drawn < iterations) and not stop.is_set():
                if drawn and stop.wait(interval):
                    break
                size = shutil.get_terminal_size((120, 40))
                more = iterations is None or drawn + 1 < iterations
                try:
                    frame, ok = frame_of(stub, size.columns), True
                except grpc.RpcError as err:
                    retry = interval if more else None
                    frame, ok = render_error(err, size.columns, retry, title), False
                if stop.is_set():
                    break
                if tty:
                    frame = _CLEAR + "\n".join(frame.splitlines()[: max(size.lines - 1, 1)])
                elif drawn:
                    frame = "\n" + frame
                stream.write(frame + "\n")
                stream.flush()
                drawn += 1
    except KeyboardInterrupt:
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0 if ok or stop.is_set() else 1


# -- `stockhold events lag`: the subscriptions' lag (issue 12, docs/events.md) -------------------

_LAG_STATUS: Final = {1: "HEALTHY", 2: "WARN", 3: "ALERT"}
_LAG_COLUMNS: Final = ("PART", "BACKLOG", "OLDEST", "FAILED", "RATE/S", "P50", "P99", "STATUS")


def _age(ms: int) -> str:
    if ms < 1000:
        return f"{ms}ms"
    s = ms / 1000
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}m" if s < 7200 else f"{s / 3600:.1f}h"


def render_lag(resp: pb.GetSubscriptionLagResponse, width: int) -> str:
    """One frame of `stockhold events lag`: per subscription a summary line and a table of
    its partitions that are behind (backlog, failed or lost events); times in ms."""
    width = max(width, 20)
    head = (
        f"stockhold events lag  {_stamp(None)}  healthy < {resp.warn_events}"
        f"  alert >= {resp.alert_events}  slow p99 > {resp.slow_consumer_ms} ms"
    )
    lines = [_cut(head, width)]
    if not resp.subscriptions:
        lines += ["", "  (no subscriptions)"]
    for s in resp.subscriptions:
        flags = _LAG_STATUS.get(s.status, "?") + (" SLOW_CONSUMER" if s.slow_consumer else "")
        lost = f"  LOST {s.lost}" if s.lost else ""
        summary = (
            f"{s.name}  {flags}  backlog {s.backlog}  oldest {_age(s.oldest_age_ms)}"
            f"  failed {s.failed}  rate {s.rate_per_second:.1f}/s"
            f"  p50 {_ms(s.wms_p50_ms)}  p99 {_ms(s.wms_p99_ms)}{lost}"
        )
        lines += ["", _cut(summary, width)]
        behind = [p for p in s.partitions if p.backlog or p.failed or p.lost]
        if not behind:
            lines.append("  (no partition behind)")
            continue
        rows = [(*_LAG_COLUMNS, "OWNER")]
        rows += [
            (
                str(p.partition),
                str(p.backlog),
                _age(p.oldest_age_ms),
                str(p.failed),
                f"{p.rate_per_second:.1f}",
                _ms(p.wms_p50_ms),
                _ms(p.wms_p99_ms),
                _LAG_STATUS.get(p.status, "?"),
                p.owner or "-",
            )
            for p in behind
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(_LAG_COLUMNS))]
        for r in rows:
            cells = [v.rjust(w) for v, w in zip(r, widths, strict=False)]
            lines.append(_cut("  " + " ".join(cells) + " " + r[-1], width))
    return "\n".join(lines)


def run_lag(
    address: str,
    name: str = "",
    interval: float | None = None,
    timeout: float = 5.0,
    out: TextIO | None = None,
    connect: Connect = grpc.insecure_channel,
) -> int:
    """`stockhold events lag`: one frame, or a frame every `interval` seconds until Ctrl-C."""
    request = pb.GetSubscriptionLagRequest(name=name)
    return refresh(
        address,
        lambda stub, width: render_lag(stub.GetSubscriptionLag(request, timeout=timeout), width),
        interval or 2.0,
        None if interval else 1,
        out,
        "stockhold events lag",
        connect=connect,
    )


__all__ = [
    "header",
    "refresh",
    "render",
    "render_error",
    "render_lag",
    "run",
    "run_lag",
    "stats_request",
]
