"""CLI commands of issue 5: reserve with an amount and a payment, extend, pay, mark-pending."""

from __future__ import annotations

import json
from datetime import datetime

from stockhold_fixtures import Running, add_stock
from test_cli_policy import stockhold_cli

from stockhold.v1 import inventory_pb2_grpc as pb_grpc


async def test_reserve_extend_mark_pending_and_pay_through_the_cli(
    stockhold: Running, stub: pb_grpc.InventoryStub
) -> None:
    await add_stock(stub, "TEE", "w1", 10)
    code, out, err = await stockhold_cli(
        stockhold,
        *("reserve", "o-1", "--line", "sku=TEE,qty=2", "--amount", "4200", "--hold-seconds", "60"),
    )
    assert code == 0, err
    held = json.loads(out)["reservation"]
    assert (held["state"], held["amount"]) == ("RESERVATION_STATE_HELD", "4200")

    code, out, err = await stockhold_cli(stockhold, "extend", "o-1", "--hold-seconds", "600")
    assert code == 0, err
    extended = json.loads(out)
    assert extended["extended"] is True
    moved, was = (datetime.fromisoformat(r["expires_at"]) for r in (extended["reservation"], held))
    assert moved > was
    # Extend never shortens: a shorter hold moves nothing and says so.
    code, out, err = await stockhold_cli(stockhold, "extend", "o-1", "--hold-seconds", "60")
    assert code == 0, err
    assert json.loads(out) == {**extended, "extended": False}

    code, out, err = await stockhold_cli(stockhold, "mark-pending", "o-1", "wechatpay:NO-1")
    assert code == 0, err
    payment = json.loads(out)["reservation"]["payment"]
    assert (payment["provider"], payment["out_trade_no"]) == ("wechatpay", "NO-1")

    # A wrong amount is refused (and flagged); the right one commits; a duplicate replays.
    args = ["pay", "o-1", "--provider", "wechatpay", "--status", "PAID"]
    code, out, err = await stockhold_cli(
        stockhold, *args, "--transaction-id", "tx-bad", "--amount", "1"
    )
    assert code == 1 and "PAYMENT_AMOUNT_MISMATCH" in err
    ok = [*args, "--transaction-id", "tx-1", "--amount", "4200"]
    code, out, err = await stockhold_cli(stockhold, *ok, "--paid-at", "2026-12-01T10:00:00+08:00")
    assert code == 0, err
    assert json.loads(out)["reservation"]["state"] == "RESERVATION_STATE_COMMITTED"
    code, out, err = await stockhold_cli(stockhold, *ok, "--paid-at", "2026-12-01T02:00:00Z")
    assert code == 0, err
    assert json.loads(out)["replayed"] is True

    code, out, err = await stockhold_cli(stockhold, *ok, "--paid-at", "2026-12-01T10:00:00")
    assert code == 1 and "paid_at" in err
