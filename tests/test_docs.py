"""Documentation stays in step with the code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from stockhold.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_documented_with_its_environment_variable() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    missing = [
        f"STOCKHOLD_{f.name.upper()}"
        for f in dataclasses.fields(Settings)
        if f"`STOCKHOLD_{f.name.upper()}`" not in doc
    ]
    assert not missing, f"not in docs/operations.md: {missing}"


def test_every_error_reason_is_in_the_api_doc() -> None:
    from stockhold.errors import Reason

    doc = (ROOT / "docs" / "api.md").read_text()
    missing = [r.value for r in Reason if r.value not in doc and r is not Reason.INTERNAL]
    assert not missing, f"not in docs/api.md: {missing}"
