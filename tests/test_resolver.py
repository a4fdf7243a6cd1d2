"""KeyResolver: canonical ids, partitions and Redis keys of units, orders and adjustments.

Pure functions, no Redis: every user string must end up inside the key *after* the partition
hash tag, escaped so that it can never change the key syntax or the Redis Cluster slot.
Every test runs against each implementation there is: the pure-Python reference and the
compiled one (when built), and the one `stockhold.resolver` picks.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockhold import constants as c
from stockhold import resolver as chosen
from stockhold.errors import DomainError, FieldViolation, Reason


def _load(name: str) -> object | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


PY_IMPL = _load("stockhold._resolver_py")
C_IMPL = _load("stockhold._resolver_c")
IMPLEMENTATIONS = [pytest.param(chosen, id="chosen")] + [
    pytest.param(module, id=ident) for ident, module in (("py", PY_IMPL), ("c", C_IMPL)) if module
]


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    """One resolver implementation: its KeyResolver class and escape function."""
    return SimpleNamespace(KeyResolver=request.param.KeyResolver, escape=request.param.escape)


# No example database: it would leave a .hypothesis/ folder in the repository root.
props = settings(database=None, max_examples=200, deadline=None)

WEIRD = [
    "plain",
    "a:b",
    "{p0}",
    "}{",
    "{",
    "}",
    "%",
    "%3A",
    "%7B%7D",
    "::",
    "a{b}c",
    "Schrödinger",
    "日本語",
    "🙂👍🏽",
    "sh:{p1}:stock:x",
    "100%{cotton}",
]


# -- Redis Cluster rules, written from the specification ------------------------------------
def crc16_xmodem(data: bytes) -> int:
    """CRC16-CCITT (XMODEM): poly 0x1021, init 0, as in the Redis Cluster specification."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def hash_tag(key: str) -> str | None:
    """The substring between the first `{` and the first `}` after it, if non-empty."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end < 0 or end == start + 1:
        return None
    return key[start + 1 : end]


def cluster_slot(key: str) -> int:
    """The Redis Cluster slot of a key (hash tag rule included)."""
    tag = hash_tag(key)
    data = (tag if tag is not None else key).encode()
    return crc16_xmodem(data) % 16384


def unescape(text: str) -> str:
    return re.sub(
        r"%(25|3A|7B|7D)", lambda m: {"25": "%", "3A": ":", "7B": "{", "7D": "}"}[m[1]], text
    )


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def test_crc16_helper_matches_the_cluster_spec_reference_values() -> None:
    # The specification's test vector and slots given by CLUSTER KEYSLOT.
    assert crc16_xmodem(b"123456789") == 0x31C3
    assert cluster_slot("foo") == 12182
    assert cluster_slot("{user1000}.following") == cluster_slot("user1000")
    assert hash_tag("foo{}{bar}") is None
    assert hash_tag("foo{{bar}}zap") == "{bar"


# -- text strategies ------------------------------------------------------------------------
# Printable per str.isprintable(): letters, marks, numbers, punctuation, symbols, ASCII space;
# key-syntax characters are mixed in on purpose.
_printable_char = st.one_of(
    st.sampled_from("{}:%"),
    st.characters(categories=("L", "M", "N", "P", "S"), exclude_characters="\x00").filter(
        str.isprintable
    ),
    st.just(" "),
)
sku_text = st.text(_printable_char, min_size=1, max_size=20).filter(lambda s: nfc(s).isprintable())
opt_text = st.text(_printable_char, min_size=0, max_size=20).filter(lambda s: nfc(s).isprintable())
triples = st.tuples(sku_text, opt_text, opt_text)


def keys_of_everything(r: chosen.KeyResolver, text: str) -> list[tuple[int, str]]:
    """(partition, key) of every key built from `text` as unit, order and adjustment."""
    u = r.unit(text, text, text)
    o = r.order(text)
    a = r.adjustment(text)
    return [
        (u.partition, u.stock_key),
        (o.partition, o.order_key),
        (o.partition, o.expiry_key),
        (o.partition, o.events_key),
        (a.partition, a.record_key),
        (a.partition, a.events_key),
    ]


# -- determinism and layout -----------------------------------------------------------------
def test_same_unit_always_resolves_to_the_same_partition_and_key(impl: SimpleNamespace) -> None:
    r1, r2 = impl.KeyResolver(), impl.KeyResolver()
    for text in WEIRD:
        a = r1.unit(text, "red", "0123")
        b = r1.unit(text, "red", "0123")
        other_instance = r2.unit(text, "red", "0123")
        assert a == b == other_instance
        assert 0 <= a.partition < c.DEFAULT_PARTITIONS


def test_partition_is_crc32_of_the_canonical_id_mod_the_partition_count(
    impl: SimpleNamespace,
) -> None:
    """Of the SKU's canonical id for a unit (its stock beside the SKU's policy, issue 11)."""
    import zlib

    r = impl.KeyResolver("sh", 16)
    u = r.unit("sku-1", "blue", "")
    assert u.unit_id == "sku-1:blue:"
    assert u.partition == zlib.crc32(b"sku-1") % 16
    assert r.sku_key("sku-1") == f"sh:{{p{u.partition}}}:sku:sku-1"
    assert r.order("o-1").partition == zlib.crc32(b"o-1") % 16
    assert u.stock_key == f"sh:{{p{u.partition}}}:stock:sku-1:blue:"


@pytest.mark.parametrize("prefix", ["sh", "stock-x"])
@pytest.mark.parametrize("text", WEIRD)
def test_every_key_starts_with_prefix_and_partition_tag_whatever_the_user_text(
    impl: SimpleNamespace, prefix: str, text: str
) -> None:
    r = impl.KeyResolver(prefix, 64)
    for partition, key in keys_of_everything(r, text):
        assert key.startswith(f"{prefix}:{{p{partition}}}:"), key
        assert hash_tag(key) == f"p{partition}"
        # User text never adds key syntax: the partition tag holds the only braces.
        assert key.count("{") == 1 and key.count("}") == 1, key


def test_partition_keys_of_the_order_share_the_order_partition(impl: SimpleNamespace) -> None:
    r = impl.KeyResolver("sh", 64)
    o = r.order("order-42")
    assert o.expiry_key == r.expiry_key(o.partition) == f"sh:{{p{o.partition}}}:expiry"
    assert o.events_key == r.events_key(o.partition) == f"sh:{{p{o.partition}}}:events"
    assert o.order_key == f"sh:{{p{o.partition}}}:order:order-42"
    assert r.meta_partitions_key() == "sh:{meta}:partitions"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("a:b", "", ""), ("a", "b", "")),
        (("a", "b:c", ""), ("a:b", "c", "")),
        (("a", "", "b"), ("a", "b", "")),
        (("a%3Ab", "", ""), ("a:b", "", "")),
        (("a%", "", ""), ("a%25", "", "")),
        (("a{b}", "", ""), ("a%7Bb%7D", "", "")),
        (("x", "", ":"), ("x:", "", "")),
    ],
)
def test_distinct_unit_triples_never_collide(
    impl: SimpleNamespace, first: tuple[str, str, str], second: tuple[str, str, str]
) -> None:
    r = impl.KeyResolver()
    a, b = r.unit(*first), r.unit(*second)
    assert a.unit_id != b.unit_id
    assert a.stock_key != b.stock_key


def test_distinct_order_ids_with_key_syntax_never_collide(impl: SimpleNamespace) -> None:
    r = impl.KeyResolver()
    ids = ["a:b", "a%3Ab", "a%253Ab", "{a}", "%7Ba%7D", "a", "a%"]
    assert len({r.order(i).order_key for i in ids}) == len(ids)
    assert len({r.adjustment(i).record_key for i in ids}) == len(ids)


def test_escape_encodes_exactly_the_key_syntax_characters(impl: SimpleNamespace) -> None:
    assert impl.escape("a%b:c{d}e") == "a%25b%3Ac%7Bd%7De"
    assert impl.escape("Schrödinger 🙂") == "Schrödinger 🙂"


# -- Unicode --------------------------------------------------------------------------------
def test_composed_and_decomposed_text_resolve_to_the_same_unit(impl: SimpleNamespace) -> None:
    r = impl.KeyResolver()
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed
    a = r.unit(composed, decomposed, "x")
    b = r.unit(decomposed, composed, "x")
    assert a == b
    assert a.sku == composed and a.spec == composed


def test_length_bounds_count_characters_after_nfc(impl: SimpleNamespace) -> None:
    r = impl.KeyResolver()
    # 128 code points decomposed, 64 once composed: within the 64-character bound.
    u = r.unit("e\u0301" * c.MAX_SKU, "", "")
    assert u.sku == "\u00e9" * c.MAX_SKU


def test_order_ids_are_opaque_not_normalised(impl: SimpleNamespace) -> None:
    r = impl.KeyResolver()
    assert r.order("caf\u00e9").order_key != r.order("cafe\u0301").order_key


def test_nfc_equivalent_reserve_requests_get_the_same_fingerprint(impl: SimpleNamespace) -> None:
    r = impl.KeyResolver()
    a = r.resolve_order("o", [("caf\u00e9", "", "", "w\u00e9", 1)], 0, 100)
    b = r.resolve_order("o", [("cafe\u0301", "", "", "we\u0301", 1)], 0, 100)
    assert a.fingerprint == b.fingerprint
    assert a.units == b.units


# -- validation -----------------------------------------------------------------------------
def violations_of(exc: pytest.ExceptionInfo[DomainError]) -> dict[str, str]:
    err = exc.value
    assert err.reason is Reason.INVALID_ARGUMENT
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    return {v.field: v.description for v in err.violations}


def test_unit_fields_at_their_bounds_are_accepted(impl: SimpleNamespace) -> None:
    r = impl.KeyResolver()
    u = r.unit("s" * c.MAX_SKU, "p" * c.MAX_SPEC, "b" * c.MAX_BARCODE)
    assert len(u.sku) == c.MAX_SKU
    r.unit("s", "", "")  # spec and barcode may be empty


@pytest.mark.parametrize(
    ("triple", "field", "words"),
    [
        (("", "", ""), "unit.sku", "must not be empty"),
        (("s" * (c.MAX_SKU + 1), "", ""), "unit.sku", "at most 64"),
        (("s", "p" * (c.MAX_SPEC + 1), ""), "unit.spec", "at most 64"),
        (("s", "", "b" * (c.MAX_BARCODE + 1)), "unit.barcode", "at most 64"),
        (("a\nb", "", ""), "unit.sku", "printable"),
        (("a\x00b", "", ""), "unit.sku", "printable"),
        (("ok", "\t", ""), "unit.spec", "printable"),
        (("ok", "", "\x7f"), "unit.barcode", "printable"),
        (("ok", "", "zero\u200bwidth"), "unit.barcode", "printable"),
        (("line\u2028sep", "", ""), "unit.sku", "printable"),
    ],
)
def test_unit_bounds_and_control_characters_give_field_violations(
    impl: SimpleNamespace, triple: tuple[str, str, str], field: str, words: str
) -> None:
    with pytest.raises(DomainError) as exc:
        impl.KeyResolver().unit(*triple)
    found = violations_of(exc)
    assert list(found) == [field]
    assert words in found[field]


def test_unit_violations_go_to_the_caller_list_without_raising(impl: SimpleNamespace) -> None:
    out: list[FieldViolation] = []
    impl.KeyResolver().unit("", "\n", "ok", path="x", out=out)
    assert [v.field for v in out] == ["x.sku", "x.spec"]


def test_units_collects_every_violation_with_indexed_paths(impl: SimpleNamespace) -> None:
    with pytest.raises(DomainError) as exc:
        impl.KeyResolver().units([("ok", "", ""), ("", "", ""), ("ok", "\r", "")])
    assert set(violations_of(exc)) == {"units[1].sku", "units[2].spec"}


@pytest.mark.parametrize(
    ("order_id", "words"),
    [("", "must not be empty"), ("o" * (c.MAX_ORDER_ID + 1), "at most 128"), ("a\tb", "printable")],
)
def test_bad_order_and_adjustment_ids_give_field_violations(
    impl: SimpleNamespace, order_id: str, words: str
) -> None:
    r = impl.KeyResolver()
    with pytest.raises(DomainError) as exc:
        r.order(order_id)
    assert words in violations_of(exc)["order_id"]
    with pytest.raises(DomainError) as exc:
        r.adjustment(order_id)
    assert words in violations_of(exc)["adjustment_id"]
    r.order("o" * c.MAX_ORDER_ID)
    r.adjustment("a" * c.MAX_ADJUSTMENT_ID)


def test_resolve_order_collects_every_violation_with_its_path(impl: SimpleNamespace) -> None:
    r = impl.KeyResolver()
    lines = [
        ("ok", "", "", "", 1),
        ("", "", "", "", 1),
        ("ok", "s\n", "", "w" * (c.MAX_WAREHOUSE + 1), 0),
        ("ok", "", "", "", c.MAX_QUANTITY + 1),
        ("ok", "", "", "", -3),
    ]
    with pytest.raises(DomainError) as exc:
        r.resolve_order("", lines, 101, 100)
    found = violations_of(exc)
    assert set(found) == {
        "order_id",
        "hold_seconds",
        "lines[1].unit.sku",
        "lines[2].unit.spec",
        "lines[2].warehouse",
        "lines[2].quantity",
        "lines[3].quantity",
        "lines[4].quantity",
    }
    assert "1..100" in found["hold_seconds"]
    assert "1..1000000" in found["lines[3].quantity"]


@pytest.mark.parametrize("count", [0, c.MAX_LINES + 1])
def test_resolve_order_bounds_the_number_of_lines(impl: SimpleNamespace, count: int) -> None:
    lines = [(f"s{i}", "", "", "", 1) for i in range(count)]
    with pytest.raises(DomainError) as exc:
        impl.KeyResolver().resolve_order("o", lines, 0, 100)
    assert f"(got {count})" in violations_of(exc)["lines"]


@pytest.mark.parametrize("hold", [-1, 101])
def test_resolve_order_bounds_hold_seconds(impl: SimpleNamespace, hold: int) -> None:
    with pytest.raises(DomainError) as exc:
        impl.KeyResolver().resolve_order("o", [("s", "", "", "", 1)], hold, 100)
    assert list(violations_of(exc)) == ["hold_seconds"]


def test_resolve_order_accepts_the_bounds(impl: SimpleNamespace) -> None:
    r = impl.KeyResolver()
    lines = [(f"s{i}", "", "", "", c.MAX_QUANTITY) for i in range(c.MAX_LINES)]
    order = r.resolve_order("o" * c.MAX_ORDER_ID, lines, 100, 100)
    assert len(order.units) == c.MAX_LINES
    assert order.hold_seconds == 100


def test_resolve_order_deduplicates_units_and_indexes_lines(impl: SimpleNamespace) -> None:
    r = impl.KeyResolver()
    order = r.resolve_order(
        "o", [("a", "", "", "w1", 1), ("b", "", "", "", 2), ("a", "", "", "w2", 3)], 0, 100
    )
    assert [u.sku for u in order.units] == ["a", "b"]
    assert order.lines == ((0, "w1", 1), (1, "", 2), (0, "w2", 3))
    assert order.keys == r.order("o")


# -- fingerprint ----------------------------------------------------------------------------
BASE = [("a", "red", "1", "w1", 2), ("b", "", "", "", 5), ("c:d", "", "", "w2", 1)]


def fp(impl: SimpleNamespace, lines: list[tuple[str, str, str, str, int]], hold: int = 60) -> str:
    return impl.KeyResolver().resolve_order("order-1", lines, hold, 3600).fingerprint


def test_fingerprint_ignores_line_order(impl: SimpleNamespace) -> None:
    assert fp(impl, BASE) == fp(impl, list(reversed(BASE))) == fp(impl, [BASE[1], BASE[2], BASE[0]])


def test_fingerprint_changes_with_quantity_warehouse_unit_and_hold(impl: SimpleNamespace) -> None:
    base = fp(impl, BASE)
    qty = [("a", "red", "1", "w1", 3), *BASE[1:]]
    warehouse = [("a", "red", "1", "w9", 2), *BASE[1:]]
    no_warehouse = [("a", "red", "1", "", 2), *BASE[1:]]
    other_unit = [("a", "blue", "1", "w1", 2), *BASE[1:]]
    variants = [
        fp(impl, qty),
        fp(impl, warehouse),
        fp(impl, no_warehouse),
        fp(impl, other_unit),
        fp(impl, BASE, hold=61),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)
    assert fp(impl, BASE, hold=0) != fp(impl, BASE, hold=60)


def test_fingerprint_does_not_depend_on_the_order_id(impl: SimpleNamespace) -> None:
    r = impl.KeyResolver()
    a = r.resolve_order("x", BASE, 0, 100).fingerprint
    b = r.resolve_order("y", BASE, 0, 100).fingerprint
    assert a == b


# -- properties -----------------------------------------------------------------------------
@props
@given(triple=triples, partitions=st.sampled_from([1, 7, 16, 64, 1024, 16384]))
def test_property_hash_tag_of_every_key_is_the_partition(
    impl: SimpleNamespace, triple: tuple[str, str, str], partitions: int
) -> None:
    r = impl.KeyResolver("sh", partitions)
    u = r.unit(*triple)
    assert 0 <= u.partition < partitions
    keys = [(u.partition, u.stock_key)]
    for text in triple:
        if text:
            o, a = r.order(text), r.adjustment(text)
            keys += [(o.partition, o.order_key), (o.partition, o.expiry_key)]
            keys += [(o.partition, o.events_key), (a.partition, a.record_key)]
    for partition, key in keys:
        assert key.startswith(f"sh:{{p{partition}}}:")
        assert hash_tag(key) == f"p{partition}"
        assert cluster_slot(key) == cluster_slot(f"{{p{partition}}}")


@props
@given(first=triples, second=triples)
def test_property_unit_ids_collide_only_for_equal_normalised_triples(
    impl: SimpleNamespace, first: tuple[str, str, str], second: tuple[str, str, str]
) -> None:
    r = impl.KeyResolver()
    a, b = r.unit(*first), r.unit(*second)
    same_text = tuple(map(nfc, first)) == tuple(map(nfc, second))
    assert (a.unit_id == b.unit_id) == same_text
    assert (a.stock_key == b.stock_key) == same_text


@props
@given(triple=triples)
def test_property_unit_id_decodes_back_to_the_normalised_triple(
    impl: SimpleNamespace,
    triple: tuple[str, str, str],
) -> None:
    # A left inverse exists, so escape-and-join is injective on (sku, spec, barcode).
    u = impl.KeyResolver().unit(*triple)
    parts = u.unit_id.split(":")
    assert len(parts) == 3
    assert tuple(unescape(p) for p in parts) == tuple(map(nfc, triple))
    assert u.stock_key.endswith(f":stock:{u.unit_id}")


@props
@given(text=st.text(_printable_char, min_size=1, max_size=40))
def test_property_escape_round_trips_and_removes_key_syntax(
    impl: SimpleNamespace, text: str
) -> None:
    escaped = impl.escape(text)
    assert unescape(escaped) == text
    assert not set("{}:") & set(escaped)


@props
@given(lines=st.lists(st.tuples(sku_text, opt_text, st.integers(1, 10)), min_size=1, max_size=8))
def test_property_fingerprint_is_invariant_under_line_permutation(
    impl: SimpleNamespace,
    lines: list[tuple[str, str, int]],
) -> None:
    full = [(sku, "", "", wh, q) for sku, wh, q in lines]
    assert fp(impl, full) == fp(impl, list(reversed(full)))
    assert fp(impl, full) == fp(impl, full[1:] + full[:1])


any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=70)


def _outcome(call: Any) -> object:
    """What a resolver call gives: its result, or the field violations it raised."""
    try:
        return call()
    except DomainError as err:
        return ("invalid", err.reason, [(v.field, v.description) for v in err.violations])


@pytest.mark.skipif(PY_IMPL is None or C_IMPL is None, reason="needs both implementations")
@props
@given(
    triple=st.tuples(any_text, any_text, any_text),
    order_id=any_text,
    warehouse=any_text,
    qty=st.integers(-2, c.MAX_QUANTITY + 2),
    hold=st.integers(-2, 102),
)
def test_property_compiled_and_reference_resolvers_agree(
    triple: tuple[str, str, str], order_id: str, warehouse: str, qty: int, hold: int
) -> None:
    ref, native = PY_IMPL.KeyResolver("sh", 64), C_IMPL.KeyResolver("sh", 64)  # type: ignore[union-attr]
    lines = [(*triple, warehouse, qty), ("b", "", "", "", 1)]
    for name, args in (
        ("unit", triple),
        ("order", (order_id,)),
        ("adjustment", (order_id,)),
        ("resolve_order", (order_id, lines, hold, 100)),
    ):
        expected = _outcome(lambda: getattr(ref, name)(*args))  # noqa: B023
        assert _outcome(lambda: getattr(native, name)(*args)) == expected, name  # noqa: B023
    assert C_IMPL.escape(order_id) == PY_IMPL.escape(order_id)  # type: ignore[union-attr]
