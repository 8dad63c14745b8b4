"""Matrix canonical JSON: byte-identical to the `canonicaljson` library Synapse uses."""

from __future__ import annotations

import json
import math
from typing import Any

import canonicaljson
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from persister.matrix.canonical_json import (
    CANONICAL_INT_MAX,
    CANONICAL_INT_MIN,
    CanonicalJsonError,
    check_canonical,
    encode_canonical,
    encode_canonical_trusted,
)

# Characters where JSON encoders are known to disagree: every ASCII control
# character, the characters JSON must escape, "/" (optionally escaped), DEL,
# C1 controls, the JavaScript line separators, BOM, non-characters and
# astral-plane characters (UTF-16 surrogate pairs in other languages).
_TRICKY = (
    [chr(c) for c in range(0x20)]
    + ['"', "\\", "/", "\x7f", "\x80", "\x85", "\x9f", "\u00e9", "\u2028", "\u2029"]
    + ["\ufeff", "\ufffe", "\uffff", "\ue000", "\U00010000", "\U0001f600", "\U0010ffff"]
)
_tricky_text = st.text(alphabet=st.sampled_from(_TRICKY), max_size=12)
# hypothesis' default alphabet already excludes lone surrogates (category Cs).
_any_text = st.one_of(st.text(max_size=20), _tricky_text)
_canonical_ints = st.one_of(
    st.integers(CANONICAL_INT_MIN, CANONICAL_INT_MAX),
    st.sampled_from([CANONICAL_INT_MIN, CANONICAL_INT_MAX, 0, -1, 1]),
)
_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), _canonical_ints, _any_text),
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(_any_text, children, max_size=6),
    ),
    max_leaves=40,
)


@settings(max_examples=600)
@given(_json_values)
def test_encoding_matches_the_canonicaljson_library_for_any_json_value(value: Any) -> None:
    assert encode_canonical(value) == canonicaljson.encode_canonical_json(value)


@settings(max_examples=300)
@given(_tricky_text)
def test_every_escape_matches_the_canonicaljson_library(text: str) -> None:
    assert encode_canonical({text: text}) == canonicaljson.encode_canonical_json({text: text})


def test_each_ascii_control_character_uses_the_shortest_escape() -> None:
    encoded = encode_canonical("".join(chr(c) for c in range(0x20)))
    assert encoded == canonicaljson.encode_canonical_json("".join(chr(c) for c in range(0x20)))
    assert b"\\b\\t\\n\\u000b\\f\\r" in encoded
    assert b"\\u001f" in encoded  # lowercase hex, as the spec grammar requires


def test_del_slash_and_line_separators_are_left_unescaped() -> None:
    assert encode_canonical("\x7f/\u2028\u2029") == '"\x7f/\u2028\u2029"'.encode()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({}, "{}"),
        ({"one": 1, "two": "Two"}, '{"one":1,"two":"Two"}'),
        ({"b": "2", "a": "1"}, '{"a":"1","b":"2"}'),
        (
            {
                "auth": {
                    "success": True,
                    "mxid": "@john.doe:example.com",
                    "profile": {
                        "display_name": "John Doe",
                        "three_pids": [
                            {"medium": "email", "address": "john.doe@example.org"},
                            {"medium": "msisdn", "address": "123456789"},
                        ],
                    },
                }
            },
            '{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe",'
            '"three_pids":[{"address":"john.doe@example.org","medium":"email"},'
            '{"address":"123456789","medium":"msisdn"}]},"success":true}}',
        ),
        ({"a": "日本語"}, '{"a":"日本語"}'),
        ({"本": 2, "日": 1}, '{"日":1,"本":2}'),
        (json.loads('{"a": "\\u65E5"}'), '{"a":"日"}'),
        ({"a": None}, '{"a":null}'),
        (json.loads('{"a": -0}'), '{"a":0}'),
    ],
)
def test_spec_appendix_examples_encode_as_the_spec_says(value: Any, expected: str) -> None:
    # The spec's last example also turns `1e10` into 10000000000; floats are
    # rejected here instead (as Synapse does from room version 6).
    assert encode_canonical(value) == expected.encode("utf-8")


def test_keys_sort_by_code_point_not_by_utf16_unit() -> None:
    # U+E000 < U+10000 by code point, though UTF-16 (D800 DC00) would invert them.
    value = {"\U00010000": 1, "\ue000": 2, "é": 3, "Z": 4, "a": 5, "": 6}
    assert encode_canonical(value) == '{"":6,"Z":4,"a":5,"é":3,"\ue000":2,"\U00010000":1}'.encode()


@pytest.mark.parametrize("number", [CANONICAL_INT_MAX, CANONICAL_INT_MIN, 2**53 - 1, -(2**53) + 1])
def test_integers_at_the_canonical_bounds_are_accepted(number: int) -> None:
    assert encode_canonical([number]) == f"[{number}]".encode()


@pytest.mark.parametrize("number", [2**53, -(2**53), 2**64, -(2**100)])
def test_integers_beyond_the_canonical_bounds_are_rejected(number: int) -> None:
    with pytest.raises(CanonicalJsonError, match="outside the canonical JSON range"):
        encode_canonical({"n": number})


def test_relaxed_integers_are_allowed_for_old_room_versions_and_still_match() -> None:
    value = {"depth": 2**63 - 1, "big": -(2**70)}
    assert encode_canonical(value, strict_ints=False) == canonicaljson.encode_canonical_json(value)


@pytest.mark.parametrize("number", [1.0, -0.0, 1e10, 0.5, math.inf, -math.inf, math.nan])
def test_floats_are_rejected_even_when_integral(number: float) -> None:
    with pytest.raises(CanonicalJsonError, match="floats"):
        encode_canonical({"a": [number]})


@pytest.mark.parametrize(
    "value",
    [{1: "int key"}, {None: 1}, {("t",): 1}, {b"bytes": 1}],
)
def test_non_string_object_keys_are_rejected(value: Any) -> None:
    with pytest.raises(CanonicalJsonError, match="keys must be strings"):
        encode_canonical(value)


@pytest.mark.parametrize("value", [b"bytes", {1, 2}, object(), msgspec.Raw(b"1")])
def test_values_outside_the_json_data_model_are_rejected(value: Any) -> None:
    with pytest.raises(CanonicalJsonError, match="not allowed"):
        encode_canonical([value])


def test_tuples_encode_as_arrays() -> None:
    assert encode_canonical({"a": (1, "x")}) == b'{"a":[1,"x"]}'


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\udc00\ud800"])
def test_lone_surrogates_are_rejected_as_canonical_json_errors(text: str) -> None:
    with pytest.raises(CanonicalJsonError, match="surrogate"):
        encode_canonical({"k": text})
    with pytest.raises(CanonicalJsonError, match="surrogate"):
        encode_canonical({text: 1})


def test_a_self_referencing_container_is_rejected_not_looped_on() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(CanonicalJsonError, match="nested too deeply"):
        encode_canonical(loop)


def test_deep_nesting_becomes_a_canonical_json_error_not_a_recursion_error() -> None:
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(CanonicalJsonError, match="nested too deeply"):
        encode_canonical(deep)


def test_check_canonical_does_not_recurse_on_deep_but_valid_values() -> None:
    deep: Any = 1
    for _ in range(5000):
        deep = {"a": deep}
    check_canonical(deep)  # iterative: no RecursionError


def test_trusted_encoding_equals_checked_encoding_for_valid_values() -> None:
    value = {"b": [1, "\u2028", None, True], "a": {"y": "日", "x": -5}}
    assert encode_canonical_trusted(value) == encode_canonical(value)


def test_bool_subtypes_of_int_encode_as_json_booleans() -> None:
    assert encode_canonical([True, False, 1, 0]) == b"[true,false,1,0]"
