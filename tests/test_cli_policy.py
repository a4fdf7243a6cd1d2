"""`stockhold policy ...` and `stockhold contention`: flags -> requests, and against a server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import pytest
from stockhold_fixtures import Factory, Running, add_stock, line

from stockhold import cli
from stockhold.v1 import inventory_pb2 as pb
from stockhold.v1 import inventory_pb2_grpc as pb_grpc

OPTIONAL = ("reserve_timeout_ms", "hold_seconds", "max_line_quantity", "hot", "pinned")


def set_request(*argv: str) -> pb.SetSkuPolicyRequest:
    """The request `stockhold policy set ...` sends."""
    return cli.policy_set_request(cli.parser().parse_args(["policy", "set", *argv]))


def present(request: pb.SetSkuPolicyRequest) -> dict[str, Any]:
    """The optional fields present in a request, with their values."""
    return {name: getattr(request, name) for name in OPTIONAL if request.HasField(name)}


@pytest.mark.parametrize(
    ("argv", "fields"),
    [
        ([], {}),
        (["--reserve-timeout-ms", "300"], {"reserve_timeout_ms": 300}),
        # 0 is sent (it means "back to the default"), which is not the same as absent.
        (["--reserve-timeout-ms", "0"], {"reserve_timeout_ms": 0}),
        (["--hold-seconds", "600", "--max-line-quantity", "2"],
         {"hold_seconds": 600, "max_line_quantity": 2}),
        (["--hot"], {"hot": True}),
        (["--no-hot"], {"hot": False}),
        (["--pinned"], {"pinned": True}),
        (["--unpinned"], {"pinned": False}),
        (["--hot", "--pinned", "--reserve-timeout-ms", "250"],
         {"hot": True, "pinned": True, "reserve_timeout_ms": 250}),
    ],
)  # fmt: skip
def test_policy_set_sends_exactly_the_fields_given(argv: list[str], fields: dict[str, Any]) -> None:
    request = set_request("PHONE", *argv)
    assert request.sku == "PHONE"
    assert present(request) == fields
    assert not request.reset


def test_policy_set_reset_sends_only_the_reset() -> None:
    request = set_request("PHONE", "--reset")
    assert request.reset and present(request) == {}


def test_pinned_and_unpinned_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.parser().parse_args(["policy", "set", "PHONE", "--pinned", "--unpinned"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_window_and_since_start_are_exclusive_and_the_window_positive() -> None:
    for argv in (["--window", "5", "--since-start"], ["--window", "0"], ["--window", "-1"]):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(["contention", *argv])


# -- against a live server -------------------------------------------------------------------------


async def stockhold_cli(running: Running, *argv: str) -> tuple[int, str, str]:
    """Run the `stockhold` CLI against `running`: (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKHOLD_")}
    env["STOCKHOLD_ADDRESS"] = running.address
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "stockhold.cli", *argv),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_policy_set_get_and_reset_through_the_cli(stockhold: Running) -> None:
    code, out, err = await stockhold_cli(
        stockhold, "policy", "set", "PHONE", "--reserve-timeout-ms", "250", "--hot", "--pinned"
    )
    assert code == 0, err
    policy = json.loads(out)
    assert policy["sku"] == "PHONE" and policy["stored"] is True
    assert (policy["reserve_timeout_ms"], policy["hot"], policy["pinned"]) == (250, True, True)
    assert policy["effective_hot"] is True
    # Only --hold-seconds is sent: the other stored fields stay as they are.
    code, out, err = await stockhold_cli(
        stockhold, "policy", "set", "PHONE", "--hold-seconds", "600"
    )
    assert code == 0, err
    code, out, err = await stockhold_cli(stockhold, "policy", "get", "PHONE")
    assert code == 0, err
    policy = json.loads(out)
    assert (policy["reserve_timeout_ms"], policy["hold_seconds"], policy["pinned"]) == (
        250,
        "600",
        True,
    )
    code, out, err = await stockhold_cli(stockhold, "policy", "set", "PHONE", "--reset")
    assert code == 0, err
    assert json.loads(out)["stored"] is False


async def test_policy_errors_are_rich_on_stderr(stockhold: Running) -> None:
    code, out, err = await stockhold_cli(stockhold, "policy", "set", "PHONE", "--reset", "--hot")
    assert (code, out) == (1, "")
    assert err.startswith("error: INVALID_ARGUMENT: ")
    assert "  field reset: " in err


async def test_policy_list_one_page_or_all(stockhold: Running) -> None:
    skus = [f"SKU-{i}" for i in range(5)]
    async with stockhold.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        for sku in skus:
            await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku=sku, max_line_quantity=3))
        await stub.SetSkuPolicy(pb.SetSkuPolicyRequest(sku="SKU-1", hot=True, pinned=True))
    code, out, err = await stockhold_cli(stockhold, "policy", "list", "--page-size", "2")
    assert code == 0, err
    page = json.loads(out)
    assert [p["sku"] for p in page["policies"]] == skus[:2]
    assert page["next_page_token"]
    code, out, err = await stockhold_cli(stockhold, "policy", "list", "--page-size", "2", "--all")
    assert code == 0, err
    everything = json.loads(out)
    assert [p["sku"] for p in everything["policies"]] == skus
    assert everything["next_page_token"] == ""
    code, out, err = await stockhold_cli(
        stockhold, "policy", "list", "--page-token", page["next_page_token"], "--page-size", "2"
    )
    assert code == 0, err
    assert [p["sku"] for p in json.loads(out)["policies"]] == skus[2:4]
    code, out, err = await stockhold_cli(stockhold, "policy", "list", "--hot-only", "--all")
    assert code == 0, err
    assert [p["sku"] for p in json.loads(out)["policies"]] == ["SKU-1"]


async def test_contention_prints_the_stats_as_json(make_stockhold: Factory) -> None:
    running = await make_stockhold()
    async with running.channel() as channel:
        stub = pb_grpc.InventoryStub(channel)
        await add_stock(stub, "PHONE", "wh-1", 100, spec="black")
        for i in range(3):
            await stub.Reserve(
                pb.ReserveRequest(order_id=f"o-{i}", lines=[line("PHONE", 1, spec="black")])
            )
    code, out, err = await stockhold_cli(running, "contention", "--top", "5", "--window", "30")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["window"] == "30s"
    assert stats["processes"] == 1
    (key,) = stats["keys"]
    assert key["unit"] == {"sku": "PHONE", "spec": "black", "barcode": ""}
    assert key["requests"] == "3"
    code, out, err = await stockhold_cli(running, "contention", "--since-start")
    assert code == 0, err
    assert "window" not in json.loads(out)
