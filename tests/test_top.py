"""`stockhold top`: the frame a GetContentionStats response renders to, and the live loop."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys

import pytest
from redis_proc import free_port
from stockhold_fixtures import Factory, add_stock, line

from stockhold import top
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc


def key(
    sku: str,
    spec: str,
    barcode: str,
    requests: int,
    p99: float,
    flagged: bool = False,
    estimated: bool = False,
) -> pb.KeyContention:
    """A KeyContention with made-up figures (ms)."""
    return pb.KeyContention(
        unit=pb.SalesUnit(sku=sku, spec=spec, barcode=barcode),
        key=f"{sku}|{spec}|{barcode}",
        requests=requests,
        contended=requests // 2,
        timeouts=3 if flagged else 0,
        insufficient=1,
        wait_total_ms=p99 * requests / 2,
        wait_mean_ms=p99 / 2,
        wait_p50_ms=p99 / 3,
        wait_p99_ms=p99,
        wait_max_ms=p99 * 1.5,
        script_mean_ms=0.42,
        flagged=flagged,
        estimated=estimated,
    )


def synthetic() -> pb.GetContentionStatsResponse:
    """A flash sale on PHONE (two specs hot), one cold mug."""
    resp = pb.GetContentionStatsResponse(
        keys=[
            key("PHONE", "black-256", "6900000000017", 5120, 312.5, flagged=True),
            key("PHONE", "white-128", "6900000000024", 2048, 150.0),
            key("MUG", "", "", 12, 0.8, estimated=True),
        ],
        sku_hints=[
            pb.SkuContentionHint(
                sku="PHONE",
                keys=["PHONE|black-256|6900000000017", "PHONE|white-128|6900000000024"],
                wait_total_ms=953600.0,
                flagged=1,
            )
        ],
        processes=2,
        flag_ms=200.0,
    )
    resp.window.FromSeconds(60)
    resp.generated_at.FromSeconds(1_796_000_000)
    return resp


def test_render_shows_the_header_the_hot_key_first_with_its_flag_and_the_hints() -> None:
    frame = top.render(synthetic(), 160)
    lines = frame.splitlines()
    assert lines[0] == (
        "stockhold top  2026-11-30 00:53:20 UTC  window 60s  processes 2  flag p99 > 200 ms"
    )
    table = lines[2:6]
    assert table[0].split() == [
        "#",
        *("SKU", "SPEC", "BARCODE", "REQS", "CONT", "TMOUT", "INSUF"),
        *("MEAN", "P50", "P99", "MAX", "SCRIPT", "FLAG"),
    ]
    assert table[1].split() == [
        "1",
        *("PHONE", "black-256", "6900000000017", "5120", "2560", "3", "1"),
        *("156.2", "104.2", "312.5", "468.8", "0.4", "FLAG"),
    ]
    assert table[2].split()[:2] == ["2", "PHONE"] and "FLAG" not in table[2]
    assert table[3].split()[:4] == ["3*", "MUG", "-", "-"]
    assert "* estimated: the figures are lower bounds" in lines
    hints = lines[lines.index("SKU hints (several sales units of one SKU hot at once):") + 1 :]
    assert hints == [
        "  PHONE: 2 hot units, 1 flagged, wait 953600 ms total: "
        "PHONE|black-256|6900000000017, PHONE|white-128|6900000000024"
    ]


@pytest.mark.parametrize("width", [40, 60, 80, 100])
def test_no_line_of_a_frame_is_wider_than_the_terminal(width: int) -> None:
    lines = top.render(synthetic(), width).splitlines()
    assert max(len(x) for x in lines) <= width
    # Narrow: barcode and spec shrink, less telling figures go; SKU, REQS, P99, FLAG stay.
    head, hot = lines[2].split(), lines[3].split()
    assert hot[:2] == ["1", "PHONE"] and hot[-1] == "FLAG"
    assert {"REQS", "P99"} <= set(head)
    assert hot[head.index("REQS")] == "5120" and hot[head.index("P99")] == "312.5"
    assert ("SCRIPT" in head) == (width >= 100)


def test_an_empty_response_and_since_start() -> None:
    resp = pb.GetContentionStatsResponse(processes=1, flag_ms=250.0)
    frame = top.render(resp, 100)
    assert "since start" in frame.splitlines()[0]
    assert "flag p99 > 250 ms" in frame.splitlines()[0]
    assert "  (no requests recorded)" in frame.splitlines()


def test_stats_request_sends_only_what_is_asked() -> None:
    assert not top.stats_request().HasField("window")
    req = top.stats_request(5, 7.5)
    assert (req.top_n, req.window.seconds, req.window.nanos) == (5, 7, 500_000_000)
    assert top.stats_request(since_start=True).since_start


def test_a_server_that_is_down_is_a_one_line_error_in_each_frame() -> None:
    out = io.StringIO()
    code = top.run(f"127.0.0.1:{free_port()}", interval=0.05, iterations=2, timeout=0.5, out=out)
    assert code == 1
    frames = out.getvalue().split("\n\n")
    assert len(frames) == 2
    for i, frame in enumerate(frames):
        head, error = frame.strip("\n").splitlines()
        assert head.startswith("stockhold top  ")
        assert head.endswith("  retrying every 0.05 s") == (i == 0)
        assert error.startswith("error: UNAVAILABLE: ")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_each_frame_redraws_the_screen() -> None:
    out = Terminal()
    top.run(f"127.0.0.1:{free_port()}", interval=0.01, iterations=2, timeout=0.2, out=out)
    frames = out.getvalue().split("\x1b[H\x1b[2J")
    assert frames[0] == "" and len(frames) == 3


def test_ctrl_c_quits_cleanly() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKHOLD_")}
    cmd = [sys.executable, "-m", "stockhold.cli", "top", "--address", f"127.0.0.1:{free_port()}"]
    proc = subprocess.Popen(
        [*cmd, "--interval", "0.1", "--timeout", "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # a frame is out: the loop is running
        assert first.startswith(b"stockhold top"), first
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err


async def test_top_once_against_a_live_server_prints_a_frame_with_its_figures(
    make_stockhold: Factory,
) -> None:
    running = await make_stockhold()
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "PHONE", "wh-1", 1000, spec="black", barcode="690001")
        await add_stock(stub, "CASE", "wh-1", 1000)
        await asyncio.gather(
            *(
                stub.Reserve(
                    pb.ReserveRequest(
                        order_id=f"p-{i}", lines=[line("PHONE", 1, spec="black", barcode="690001")]
                    )
                )
                for i in range(40)
            )
        )
        await stub.Reserve(pb.ReserveRequest(order_id="c-1", lines=[line("CASE", 1)]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKHOLD_")}
    env["COLUMNS"] = "150"
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "stockhold.cli", "top", "--once", "--address", running.address),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].startswith("stockhold top  ")
    assert "window 60s  processes 1  flag p99 > 200 ms" in lines[0]
    assert lines[2].split()[:3] == ["#", "SKU", "SPEC"]
    rows = [x.split() for x in lines[3:5]]
    assert rows[0][:5] == ["1", "PHONE", "black", "690001", "40"]
    assert rows[1][:5] == ["2", "CASE", "-", "-", "1"]
