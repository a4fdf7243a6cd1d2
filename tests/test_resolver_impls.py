"""Both key resolvers, compiled (`c`, stockhold._resolver_c) and pure (`py`), behave the same.

Each behaviour is pinned once per implementation through the `impl` fixture; hypothesis then
feeds both the same arbitrary input and demands identical answers, violations and errors.
`stockhold.resolver` must have picked the compiled one unless STOCKHOLD_NO_EXTENSIONS is set.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import unicodedata
import zlib
from collections import UserList
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockhold import _resolver_py, resolver
from stockhold import constants as c
from stockhold.errors import DomainError, FieldViolation, Reason

NO_EXTENSIONS = bool(os.environ.get("STOCKHOLD_NO_EXTENSIONS"))

IMPORT_ERROR = ""
try:
    from stockhold import _resolver_c
except ImportError as exc:  # reported by test_the_compiled_resolver_is_the_one_in_use
    _resolver_c = None  # type: ignore[assignment]
    IMPORT_ERROR = repr(exc)

# No example database: it would leave a .hypothesis/ folder in the repository root.
props = settings(database=None, max_examples=300, deadline=None)


def compiled() -> ModuleType:
    """The compiled module, or skip: not built, or disabled by STOCKHOLD_NO_EXTENSIONS."""
    if NO_EXTENSIONS:
        pytest.skip("STOCKHOLD_NO_EXTENSIONS is set")
    if _resolver_c is None:
        pytest.skip("stockhold._resolver_c is not built")
    return _resolver_c


@pytest.fixture(params=["c", "py"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """The resolver module under test: compiled (`c`) or pure Python (`py`)."""
    return compiled() if request.param == "c" else _resolver_py


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """What a call did: its result with every type spelled out, or how it failed."""
    try:
        return ("returned", typed(fn(*args, **kwargs)))
    except DomainError as err:
        return ("invalid", err.reason, err.message, err.violations)
    except Exception as err:
        return ("raised", type(err), str(err))


def typed(value: Any) -> Any:
    """value with the exact type of every part: Unit, not any equal tuple; str, not a subclass."""
    if isinstance(value, tuple | list):
        return (type(value), tuple(typed(v) for v in value))
    return (type(value), value)


def both(call: Callable[[ModuleType], Any]) -> tuple[Any, ...]:
    """The outcome of call(module), identical for both implementations."""
    native = outcome(call, compiled())
    pure = outcome(call, _resolver_py)
    assert native == pure
    return pure


# -- which one runs -----------------------------------------------------------------------------
def test_the_compiled_resolver_is_the_one_in_use() -> None:
    if NO_EXTENSIONS:
        assert resolver.NATIVE is False
        assert resolver.KeyResolver is _resolver_py.KeyResolver
    else:
        assert _resolver_c is not None, f"stockhold._resolver_c did not import: {IMPORT_ERROR}"
        assert resolver.NATIVE is True
        assert resolver.KeyResolver is _resolver_c.KeyResolver
        assert resolver.escape is _resolver_c.escape
    assert resolver.PyKeyResolver is _resolver_py.KeyResolver
    assert resolver.Unit is _resolver_py.Unit


def selector_in_a_fresh_process(code: str, env: dict[str, str]) -> str:
    run = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport stockhold.resolver as r\nprint(r.NATIVE)"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return run.stdout.strip()


def test_stockhold_no_extensions_selects_the_pure_resolver() -> None:
    assert selector_in_a_fresh_process("", {"STOCKHOLD_NO_EXTENSIONS": "1"}) == "False"


def test_a_missing_extension_falls_back_to_the_pure_resolver() -> None:
    block = "import sys\nsys.modules['stockhold._resolver_c'] = None"
    assert selector_in_a_fresh_process(block, {"STOCKHOLD_NO_EXTENSIONS": ""}) == "False"


def test_results_are_the_pure_modules_types(impl: ModuleType) -> None:
    r = impl.KeyResolver()
    order = r.resolve_order("o", [("a", "", "", "", 1)], 0, 10)
    assert type(order) is _resolver_py.ResolvedOrder
    assert type(order.keys) is _resolver_py.OrderKeys
    assert type(order.units[0]) is _resolver_py.Unit
    assert type(r.unit("a", "", "")) is _resolver_py.Unit
    assert type(r.adjustment("a")) is _resolver_py.AdjustmentKeys
    assert order.units[0]._asdict()["sku"] == "a"


# -- key behaviours, pinned for each implementation ----------------------------------------------
def test_unit_keys_partition_and_escaping(impl: ModuleType) -> None:
    # A unit lives in its SKU's partition: CRC-32 of the escaped SKU (layout 2, issue 11).
    r = impl.KeyResolver("sh", 16)
    u = r.unit("sku-1", "blue", "")
    p = zlib.crc32(b"sku-1") % 16
    assert r.unit("sku-1", "red", "x").partition == p
    assert u == ("sku-1", "blue", "", "sku-1:blue:", p, f"sh:{{p{p}}}:stock:sku-1:blue:")
    w = r.unit("100%{cotton}", "a:b", "x}")
    assert w.unit_id == "100%25%7Bcotton%7D:a%3Ab:x%7D"
    assert w.partition == zlib.crc32(b"100%25%7Bcotton%7D") % 16
    assert w.stock_key == f"sh:{{p{w.partition}}}:stock:{w.unit_id}"
    assert impl.escape("a%b:c{d}e") == "a%25b%3Ac%7Bd%7De"
    assert impl.escape("Schrödinger: 🙂") == "Schrödinger%3A 🙂"


def test_non_ascii_text_is_nfc_normalised_and_keyed_by_its_utf8(impl: ModuleType) -> None:
    r = impl.KeyResolver()
    u = r.unit("cafe\u0301", "日本:語", "🙂")
    assert u.sku == "caf\u00e9"
    assert u.unit_id == "caf\u00e9:日本%3A語:🙂"
    assert u.partition == zlib.crc32("caf\u00e9".encode()) % 64
    # Order ids are opaque: validated, never normalised.
    assert r.order("cafe\u0301").order_key.endswith(":order:cafe\u0301")


def test_order_and_adjustment_keys(impl: ModuleType) -> None:
    r = impl.KeyResolver("stock-x", 64)
    o = r.order("ord:{7}%")
    p = zlib.crc32(b"ord%3A%7B7%7D%25") % 64
    assert o == ("ord:{7}%", p, f"stock-x:{{p{p}}}:order:ord%3A%7B7%7D%25",
                 f"stock-x:{{p{p}}}:expiry", f"stock-x:{{p{p}}}:events")  # fmt: skip
    assert r.expiry_key(p) == o.expiry_key and r.events_key(p) == o.events_key
    assert r.expiry_key(-1) == "stock-x:{p63}:expiry"
    assert r.meta_partitions_key() == "stock-x:{meta}:partitions"
    a = r.adjustment("adj-1")
    q = zlib.crc32(b"adj-1") % 64
    assert a == ("adj-1", q, f"stock-x:{{p{q}}}:adj:adj-1", f"stock-x:{{p{q}}}:events")
    assert r.partition_of("adj-1") == q


def test_non_ascii_prefix_and_partition_counts(impl: ModuleType) -> None:
    for prefix, partitions in [("stöck", 3), ("sh", 1), ("sh", 16384)]:
        r = impl.KeyResolver(prefix, partitions)
        u = r.unit("a", "", "")
        assert u.partition == zlib.crc32(b"a") % partitions
        assert u.stock_key == f"{prefix}:{{p{u.partition}}}:stock:a::"
        assert r.partitions == partitions and r.prefix == prefix


def test_violation_paths_and_wording(impl: ModuleType) -> None:
    lines = [
        ("ok", "", "", "", 1),
        ("", "s" * 65, "b\n", "w" * 65, 0),
        ("ok", "", "", "w\t", c.MAX_QUANTITY + 1),
    ]
    with pytest.raises(DomainError) as exc:
        impl.KeyResolver().resolve_order("", lines, 101, 100)
    assert exc.value.reason is Reason.INVALID_ARGUMENT
    assert exc.value.violations == (
        FieldViolation("order_id", "must not be empty"),
        FieldViolation("hold_seconds", "must be within 1..100 (got 101)"),
        FieldViolation("lines[1].unit.sku", "must not be empty"),
        FieldViolation("lines[1].unit.spec", "at most 64 characters (got 65)"),
        FieldViolation("lines[1].unit.barcode", "must be printable text (no control characters)"),
        FieldViolation("lines[1].warehouse", "at most 64 characters (got 65)"),
        FieldViolation("lines[1].quantity", "must be within 1..1000000 (got 0)"),
        FieldViolation("lines[2].warehouse", "must be printable text (no control characters)"),
        FieldViolation("lines[2].quantity", "must be within 1..1000000 (got 1000001)"),
    )
    assert exc.value.message.startswith("invalid request: order_id: must not be empty; ")


def test_line_count_and_id_bounds(impl: ModuleType) -> None:
    r = impl.KeyResolver()
    for count in (0, c.MAX_LINES + 1):
        with pytest.raises(DomainError) as exc:
            r.resolve_order("o", [(f"s{i}", "", "", "", 1) for i in range(count)], 0, 100)
        assert exc.value.violations[0] == FieldViolation(
            "lines", f"must hold 1..100 lines (got {count})"
        )
    r.order("o" * c.MAX_ORDER_ID)
    with pytest.raises(DomainError) as exc:
        r.adjustment("a" * (c.MAX_ADJUSTMENT_ID + 1))
    assert exc.value.violations == (
        FieldViolation("adjustment_id", "at most 128 characters (got 129)"),
    )


def test_violations_go_to_the_callers_list(impl: ModuleType) -> None:
    r = impl.KeyResolver()
    out: list[FieldViolation] = []
    u = r.unit("", "a\x00", "ok", path="x", out=out)
    assert u.unit_id == ":a\x00:ok"  # built all the same
    assert [v.field for v in out] == ["x.sku", "x.spec"]
    r.order("", path="y", out=out)
    assert out[-1] == FieldViolation("y", "must not be empty")
    with pytest.raises(DomainError) as exc:
        r.units([("ok", "", ""), ("", "", ""), ("ok", "\r", "")], path="u")
    assert [v.field for v in exc.value.violations] == ["u[1].sku", "u[2].spec"]


def test_lines_refer_to_distinct_units_and_the_fingerprint_is_the_canonical_blake2b(
    impl: ModuleType,
) -> None:
    r = impl.KeyResolver()
    lines = [("a", "", "", "w:1", 1), ("b", "", "", "", 2), ("a", "", "", "w2", 3)]
    order = r.resolve_order("o", lines, 60, 3600)
    assert [u.sku for u in order.units] == ["a", "b"]
    assert order.lines == ((0, "w:1", 1), (1, "", 2), (0, "w2", 3))
    assert order.keys == r.order("o") and order.hold_seconds == 60
    canon = [*sorted(["a::\x00w%3A1\x001", "b::\x00\x002", "a::\x00w2\x003"]), "60"]
    expected = hashlib.blake2b("\x01".join(canon).encode(), digest_size=16).hexdigest()
    assert order.fingerprint == expected
    # Same contents in another order, under another order id: same fingerprint.
    again = r.resolve_order("p", [lines[2], lines[1], lines[0]], 60, 3600)
    assert again.fingerprint == expected
    # NFC-equivalent text: same fingerprint too.
    composed = r.resolve_order("o", [("caf\u00e9", "", "", "", 1)], 0, 1)
    decomposed = r.resolve_order("o", [("cafe\u0301", "", "", "", 1)], 0, 1)
    assert composed == decomposed


def test_big_orders_and_non_list_sequences(impl: ModuleType) -> None:
    r = impl.KeyResolver()
    lines = [(f"s{i % 37}", "x" * 64, "%" * 64, "{" * 64, i + 1) for i in range(c.MAX_LINES)]
    order = r.resolve_order("o", lines, 0, 1)
    assert len(order.units) == 37 and len(order.lines) == c.MAX_LINES
    assert r.resolve_order("o", UserList(lines), 0, 1) == order
    assert r.resolve_order("o", tuple(lines), 0, 1) == order


# -- primitives -----------------------------------------------------------------------------------
@props
@given(data=st.one_of(st.binary(max_size=600), st.integers(0, 3).map(lambda k: b"x" * (128 * k))))
def test_compiled_crc32_and_blake2b_match_zlib_and_hashlib(data: bytes) -> None:
    native = compiled()
    assert native._crc32(data) == zlib.crc32(data)
    for extra in (b"", b"y"):
        blob = data + extra
        assert native._blake2b_16(blob) == hashlib.blake2b(blob, digest_size=16).hexdigest()


# -- both implementations, arbitrary input -------------------------------------------------------
_characters = st.one_of(
    st.characters(max_codepoint=0x7F),  # ASCII, control characters included
    st.sampled_from("%:{}\x00\t\n\x7f \u00e9e\u0301\u2028\u200b\u00a0ﬁ🙂\U0001f3fd日\U00010348"),
    st.sampled_from("\x1f\x20\x7e\x7f\x80\x9f\xa0\xad"),  # either side of printable
    st.characters(categories=["Mn", "Mc"]),  # combining marks
    st.characters(),  # anything but surrogates
)


def _repeat(text: str, n: int) -> str:
    return text * n


texts = st.one_of(
    st.text(_characters, max_size=12),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=70),  # plain ASCII
    # At and around the bounds, counted before and after NFC.
    st.builds(
        _repeat,
        st.sampled_from(["a", ":", "é", "e\u0301", "🙂", "\n"]),
        st.sampled_from([0, 1, 63, 64, 65, 127, 128, 129]),
    ),
)
quantities = st.one_of(
    st.integers(-2, 3),
    st.integers(c.MAX_QUANTITY - 2, c.MAX_QUANTITY + 2),
    st.integers(),
    st.sampled_from([2**63 - 1, 2**63, -(2**63), 2**64 + 1]),
)
hold_values = st.one_of(st.integers(-2, 3), st.sampled_from([3599, 3600, 3601, 2**70]))
lines_st = st.tuples(texts, texts, texts, texts, quantities)
orders = st.one_of(
    st.lists(lines_st, max_size=12),
    # 0, 1, 10, 100 or 101 lines, repeating a few: duplicate units and duplicate lines.
    st.builds(
        lambda few, n: [few[i % len(few)] for i in range(n)],
        st.lists(lines_st, min_size=1, max_size=3),
        st.sampled_from([0, 1, 10, 100, 101]),
    ),
)


@props
@given(
    order_id=texts,
    lines=orders,
    hold=hold_values,
    max_hold=st.sampled_from([0, 1, 3600]),
    partitions=st.sampled_from([1, 7, 64, 16384]),
)
def test_property_resolve_order_is_the_same_in_both(
    order_id: str, lines: list[Any], hold: int, max_hold: int, partitions: int
) -> None:
    both(lambda m: m.KeyResolver("sh", partitions).resolve_order(order_id, lines, hold, max_hold))


# Valid orders, so that keys, de-duplication and fingerprints are compared, not just violations.
_printable = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.sampled_from("%:{}é日🙂\u0301"),
    st.characters(categories=["L", "M", "N", "P", "S"]),
)


def _valid(lo: int, hi: int) -> st.SearchStrategy[str]:
    return st.text(_printable, min_size=lo, max_size=hi).filter(
        lambda t: (
            lo <= len(unicodedata.normalize("NFC", t)) <= hi
            and unicodedata.normalize("NFC", t).isprintable()
        )
    )


valid_lines = st.tuples(
    st.one_of(st.sampled_from(["SKU-1", "a:b", "{x}"]), _valid(1, 64)),
    st.one_of(st.just(""), _valid(0, 64)),
    st.one_of(st.just(""), st.sampled_from(["4006381333931", "%"]), _valid(0, 64)),
    st.one_of(st.just(""), _valid(0, 64)),
    st.one_of(st.integers(1, 3), st.just(c.MAX_QUANTITY)),
)


@props
@given(
    order_id=st.one_of(st.just("o"), _valid(1, 128)),
    lines=st.lists(valid_lines, min_size=1, max_size=30),
    hold=st.integers(0, 3600),
)
def test_property_valid_orders_resolve_the_same_in_both(
    order_id: str, lines: list[Any], hold: int
) -> None:
    result = both(lambda m: m.KeyResolver().resolve_order(order_id, lines, hold, 3600))
    assert result[0] == "returned"


@props
@given(sku=texts, spec=texts, barcode=texts, prefix=st.sampled_from(["sh", "stöck", "a{b}"]))
def test_property_units_orders_and_adjustments_are_the_same_in_both(
    sku: str, spec: str, barcode: str, prefix: str
) -> None:
    both(lambda m: m.KeyResolver(prefix, 64).unit(sku, spec, barcode))
    both(lambda m: m.KeyResolver(prefix, 64).units([(sku, spec, barcode), (barcode, sku, spec)]))
    for text in (sku, spec, barcode):
        both(lambda m, t=text: m.KeyResolver(prefix, 64).order(t))
        both(lambda m, t=text: m.KeyResolver(prefix, 64).adjustment(t))
        both(lambda m, t=text: m.KeyResolver(prefix, 64).partition_of(t))


@props
@given(
    value=texts,
    lo=st.sampled_from([0, 1, 2]),
    hi=st.sampled_from([0, 1, 64, 128]),
    normalise=st.booleans(),
)
def test_property_check_text_check_int_and_escape_are_the_same_in_both(
    value: str, lo: int, hi: int, normalise: bool
) -> None:
    def check(m: ModuleType) -> tuple[str, list[FieldViolation]]:
        out: list[FieldViolation] = []
        return m.check_text(value, "f", lo, hi, out, normalise), out

    both(check)
    both(lambda m: m.escape(value))

    def check_int(m: ModuleType) -> list[FieldViolation]:
        out: list[FieldViolation] = []
        m.check_int(len(value) - 3, "n", lo, hi, out)
        return out

    both(check_int)


# Each side of every bound and class of character, checked without relying on luck.
TRICKY = [
    "",
    " ",
    "~",
    "\x7f",
    "a\x7f",
    "\x1f",
    "\x00",
    "\x80",
    "\xa0",
    "\xad",
    "\u2028",
    "\u200b",
    "🙂",
    "%:{}",
    "e\u0301",
    "\u0301",
    "a" * 64,
    "a" * 65,
    ":" * 64,
    "é" * 64,
    "é" * 65,
    "e\u0301" * 64,
    "e\u0301" * 65,
    "o" * 128,
    "o" * 129,
    "\ud800",
]


@pytest.mark.parametrize("text", TRICKY, ids=ascii)
def test_tricky_text_gives_the_same_answer_or_error_in_both(text: str) -> None:
    both(lambda m: m.KeyResolver().unit(text, "", ""))
    both(lambda m: m.KeyResolver().unit("s", text, text))
    both(lambda m: m.KeyResolver().order(text))
    both(lambda m: m.KeyResolver().adjustment(text))
    both(lambda m: m.KeyResolver().resolve_order(text, [("s", "", "", text, 1)], 0, 1))
    both(lambda m: m.KeyResolver().resolve_order("o", [(text, text, text, text, 1)], 0, 1))
    both(lambda m: m.escape(text))

    def check(m: ModuleType) -> tuple[str, list[FieldViolation]]:
        out: list[FieldViolation] = []
        return m.check_text(text, "f", 1, 64, out), out

    both(check)


class Tag(str):
    """A str subclass: takes the slow path, must keep its type where the twin keeps it."""


class Weird:
    """Neither str nor int: the error must be the twin's."""

    def __format__(self, spec: str) -> str:
        return "weird"


ODD_LINES: list[Any] = [
    [("a", "", "", "", True)],  # bool quantity: "True" in the canonical form
    [("a", "", "", "", 1.0)],
    [("a", "", "", "", 2**80)],
    [("a", "", "", "", Weird())],
    [(Tag("a"), Tag(""), "", Tag("w"), 1)],
    [(Tag("é"), "", "", "", 1), ("é", "", "", "", 2)],
    [("a", "", "", "", 1), ("a", "", "", "", 1)],  # identical lines
    [["a", "", "", "", 1]],  # a list, not a tuple
    [(1, "", "", "", 1)],
    [("a", None, "", "", 1)],
    [("a", "", "", b"w", 1)],
    [("\ud800", "", "", "", 1)],  # a lone surrogate cannot be encoded: UnicodeEncodeError
    [("a", "", "", "\udfff", 1)],
    [("a", "", "", "", 1)] * 3 + [("\ud800", "", "", "", 1)],
]


@pytest.mark.parametrize("lines", ODD_LINES, ids=range(len(ODD_LINES)))
def test_odd_lines_give_the_same_answer_or_error_in_both(lines: list[Any]) -> None:
    both(lambda m: m.KeyResolver().resolve_order("o", lines, 0, 10))
    both(lambda m: m.KeyResolver().resolve_order("o", UserList(lines), 0, 10))


ODD_CALLS: list[Callable[[ModuleType], Any]] = [
    lambda m: m.KeyResolver().order("\ud800"),
    lambda m: m.KeyResolver().order(Tag("a:b")),
    lambda m: m.KeyResolver().order(7),
    lambda m: m.KeyResolver().adjustment(None),
    lambda m: m.KeyResolver().unit(Tag("x"), "", ""),
    lambda m: m.KeyResolver().unit("x", "", "", path=Tag("p"), out=[]),
    lambda m: m.KeyResolver().resolve_order("o", 5, 0, 10),
    lambda m: m.KeyResolver().resolve_order("o", [("a", "", "", "", 1)], "0", 10),
    lambda m: m.KeyResolver().resolve_order("o", [("a", "", "", "", 1)], True, 10),
    lambda m: m.KeyResolver("sh", 0).unit("a", "", ""),
    lambda m: m.KeyResolver("sh", 0).partition_of("a"),
    lambda m: m.KeyResolver("sh", -3).partition_of("a"),
    lambda m: m.KeyResolver("sh", 4.0),
    lambda m: m.KeyResolver(7, 2).unit("a", "", ""),
    lambda m: m.check_text("a", "p", 0.5, 3.5, []),
    lambda m: m.check_int(5, "p", 1.5, 2**90, []),
    lambda m: m.escape(5),
]


@pytest.mark.parametrize("call", ODD_CALLS, ids=range(len(ODD_CALLS)))
def test_odd_calls_give_the_same_answer_or_error_in_both(
    call: Callable[[ModuleType], Any],
) -> None:
    both(call)


@pytest.mark.parametrize("line", [("a", "", "", ""), ("a", "", "", "", 1, 2), 5])
def test_lines_of_the_wrong_shape_fail_with_the_same_exception_type(line: Any) -> None:
    # The wording may differ (Cython words unpacking errors its own way); the type may not.
    native = outcome(lambda: compiled().KeyResolver().resolve_order("o", [line], 0, 10))
    pure = outcome(lambda: _resolver_py.KeyResolver().resolve_order("o", [line], 0, 10))
    assert native[:2] == pure[:2] and native[0] == "raised"


def test_partitions_can_be_reassigned_as_in_the_twin(impl: ModuleType) -> None:
    r = impl.KeyResolver("sh", 8)
    r.partitions = 4
    assert r.partition_of("x") == zlib.crc32(b"x") % 4


def test_nfc_normalisation_matches_unicodedata() -> None:
    text = "A\u030a\u0045\u0301ﬁ"
    out: list[FieldViolation] = []
    assert compiled().check_text(text, "f", 0, 64, out) == unicodedata.normalize("NFC", text)
    assert out == []
