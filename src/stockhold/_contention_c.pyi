"""Types of the compiled live sketch (native/_contention_c.pyx).

Import `stockhold.contention`, which picks this module or the pure `Sketch`.
"""

from collections.abc import Sequence
from typing import Any

from stockhold.contention import Outcome, UnitLike

class LiveSketch:
    capacity: int
    buckets: int
    def __init__(self, capacity: int, buckets: int) -> None: ...
    @property
    def floor(self) -> int: ...
    @property
    def total(self) -> int: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: object) -> bool: ...
    def add(
        self,
        key: str,
        sku: str,
        wait_us: int,
        script_us: int,
        bucket: int,
        contended: bool,
        outcome: Outcome,
    ) -> None: ...
    def add_units(
        self,
        units: Sequence[UnitLike],
        contended: Sequence[bool],
        wait_us: int,
        script_us: int,
        bucket: int,
        outcome: Outcome,
    ) -> None: ...
    def to_json(self, limit: int | None = None) -> dict[str, Any]: ...

def record_pair(
    since: LiveSketch,
    current: LiveSketch,
    units: Sequence[UnitLike],
    contended: Sequence[bool],
    waited_s: float,
    script_s: float,
    outcome: Outcome,
    edges: tuple[float, ...],
) -> None: ...

class ContentionTracker:
    def __init__(self) -> None: ...
    def __len__(self) -> int: ...
    def begin(self, key: str) -> bool: ...
    def end(self, key: str) -> None: ...
    def begin_units(self, units: Sequence[UnitLike]) -> list[bool]: ...
    def end_units(self, units: Sequence[UnitLike]) -> None: ...
