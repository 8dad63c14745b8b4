"""prepare_events: what a persist request's PDUs must look like (contract section 3)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persister.errors import BadRequest, InvalidEvent, PersisterError
from persister.matrix.builder import build_pdu
from persister.matrix.pdu import MAX_PDU_BYTES, prepare_events
from persister.wire import EventEnvelope, PersistRequest
from tests.unit.test_event_ids import (
    GOMATRIXSERVERLIB_V1_NAME,
    SYNAPSE_V10_MESSAGE,
    SYNAPSE_V12_CREATE,
)

ROOM = "!room:example.org"
ALICE = "@alice:example.org"
PREV = "$" + "P" * 43
AUTH = "$" + "A" * 43

Pdu = dict[str, Any]


def envelope(pdu: Pdu | bytes, **fields: Any) -> EventEnvelope:
    raw = pdu if isinstance(pdu, bytes) else json.dumps(pdu).encode()
    return EventEnvelope(pdu=msgspec.Raw(raw), **fields)


def prepare(
    pdus: list[Pdu | bytes], room_version: str = "10", room: str = ROOM, **fields: Any
) -> list[Any]:
    request = PersistRequest(room_version, [envelope(p, **fields) for p in pdus])
    return prepare_events(request, room)


def message(room_version: str = "10", **overrides: Any) -> Pdu:
    room = None if overrides.pop("no_room", False) else ROOM
    refs = [PREV.replace("$", "$x") + ":s"] if room_version in ("1", "2") else [PREV]
    _, pdu = build_pdu(
        room_version, room, ALICE, "m.room.message", {"msgtype": "m.text", "body": "hello"},
        refs, refs, 7, origin_server_ts=1_700_000_000_000,
    )  # fmt: skip
    pdu.update(overrides)
    return pdu


def v12_create() -> tuple[str, Pdu]:
    event_id, pdu = build_pdu(
        "12", None, ALICE, "m.room.create", {"room_version": "12"}, [], [], 1,
        state_key="", origin_server_ts=1,
    )  # fmt: skip
    return "!" + event_id[1:], pdu


def rejection(pdus: list[Pdu | bytes], **kwargs: Any) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        prepare(pdus, **kwargs)
    return caught.value


# --- what valid requests give ------------------------------------------------


def test_a_valid_v10_message_becomes_a_prepared_event_with_its_hash_id() -> None:
    event_id, pdu = build_pdu(
        "10", ROOM, ALICE, "m.room.message", {"body": "hi"}, [PREV], [AUTH], 9,
        origin_server_ts=42,
    )  # fmt: skip
    (prepared,) = prepare([pdu], outlier=True, rejected_reason="auth_error")
    assert prepared.event_id == event_id
    assert (prepared.room_id, prepared.type, prepared.state_key) == (ROOM, "m.room.message", None)
    assert (prepared.sender, prepared.depth, prepared.origin_server_ts) == (ALICE, 9, 42)
    assert (prepared.prev_event_ids, prepared.auth_event_ids) == ((PREV,), (AUTH,))
    assert (prepared.outlier, prepared.rejected_reason) == (True, "auth_error")


def test_the_stored_json_is_the_pdu_text_exactly_as_received() -> None:
    raw = json.dumps(message(), indent=3, ensure_ascii=True).encode()
    raw = raw.replace(b'"hello"', b'"h\\u00e9llo \\/ \xc3\xa9"')
    (prepared,) = prepare([raw])
    assert prepared.json == raw.decode("utf-8")


def test_a_state_event_keeps_its_state_key_even_when_empty() -> None:
    (prepared,) = prepare([message(type="m.room.topic", state_key="")])
    assert prepared.state_key == ""


def test_events_come_back_in_request_order() -> None:
    first_id, first = build_pdu("10", ROOM, ALICE, "m.room.message", {}, [PREV], [], 3)
    second_id, second = build_pdu("10", ROOM, ALICE, "m.room.message", {}, [first_id], [], 4)
    assert [p.event_id for p in prepare([first, second])] == [first_id, second_id]


def test_an_empty_request_prepares_nothing() -> None:
    assert prepare([]) == []


def test_synapses_real_v10_message_is_accepted_with_its_published_event_id() -> None:
    room = SYNAPSE_V10_MESSAGE["room_id"]
    expected = "$zRz9jjiT9wZc3Hl9ij_74aCmTjqV3YMlj9sj3Uqxg6o"
    (prepared,) = prepare([SYNAPSE_V10_MESSAGE], room=room, event_id=expected)
    assert prepared.event_id == expected


def test_synapses_real_v12_create_event_is_accepted_on_the_room_it_derives() -> None:
    room = "!BeXKh925K_M46DwsuJFR0EyBpE1P7CFUDGuWW4xw55Y"
    (prepared,) = prepare([SYNAPSE_V12_CREATE], room_version="12", room=room)
    assert prepared.room_id == room
    assert prepared.event_id == "$" + room[1:]


def test_a_real_v1_event_keeps_its_own_event_id_and_pair_references() -> None:
    room = GOMATRIXSERVERLIB_V1_NAME["room_id"]
    (prepared,) = prepare([GOMATRIXSERVERLIB_V1_NAME], room_version="1", room=room)
    assert prepared.event_id == "$yvN1b43rlmcOs5fY:localhost"
    assert prepared.prev_event_ids == ("$FqI6TVvWpcbcnJ97:localhost",)
    assert prepared.auth_event_ids[0] == "$oXL79cT7fFxR7dPH:localhost"


@pytest.mark.parametrize("room_version", [str(v) for v in range(1, 12)])
def test_builder_events_pass_validation_in_every_room_version(room_version: str) -> None:
    (prepared,) = prepare([message(room_version)], room_version=room_version)
    assert prepared.room_id == ROOM


def test_a_v12_room_can_start_with_its_create_event_and_continue_in_one_request() -> None:
    room, create = v12_create()
    member_id, member = build_pdu(
        "12", room, ALICE, "m.room.member", {"membership": "join"}, ["$" + room[1:]], [], 2,
        state_key=ALICE,
    )  # fmt: skip
    prepared = prepare([create, member], room_version="12", room=room)
    assert [p.room_id for p in prepared] == [room, room]
    assert prepared[1].event_id == member_id


def test_duplicate_keys_take_the_last_value_like_python_and_synapse() -> None:
    pdu = message()
    text = json.dumps(pdu)
    raw = text.replace('"depth": 7', '"depth": 1, "depth": 7').encode()
    raw2 = text.replace('"depth": 7', '"depth": 7, "depth": 1').encode()
    (last_wins,) = prepare([raw])
    assert last_wins.depth == 7
    assert last_wins.event_id == prepare([pdu])[0].event_id
    assert prepare([raw2])[0].depth == 1


def test_duplicate_references_are_collapsed_keeping_the_first() -> None:
    (prepared,) = prepare([message(prev_events=[PREV, AUTH, PREV])])
    assert prepared.prev_event_ids == (PREV, AUTH)


def test_integers_at_the_canonical_bounds_are_accepted_in_strict_versions() -> None:
    pdu = message(content={"big": 2**53 - 1, "small": -(2**53) + 1, "digits": "1" * 40})
    assert prepare([pdu])[0].depth == 7


def test_versions_before_6_accept_integers_beyond_the_canonical_range() -> None:
    pdu = message("5", content={"big": 2**64})
    assert prepare([pdu], room_version="5")[0].depth == 7


def test_escaped_nul_inside_content_is_accepted() -> None:
    assert prepare([message(content={"body": "a\x00b"})])[0].depth == 7


def test_an_event_under_the_limit_in_canonical_form_passes_despite_raw_whitespace() -> None:
    pdu = message(content={"body": "x" * 63_000})
    raw = json.dumps(pdu, indent=400).encode()
    assert len(raw) > MAX_PDU_BYTES
    assert prepare([raw])[0].depth == 7


def canonical_size(pdu: Pdu) -> int:
    from persister.matrix.canonical_json import encode_canonical

    return len(encode_canonical(pdu))


def sized_message(size: int) -> Pdu:
    pdu = message(content={"body": ""})
    pdu["content"]["body"] = "x" * (size - canonical_size(pdu))
    assert canonical_size(pdu) == size
    return pdu


def test_an_event_of_exactly_65536_canonical_bytes_is_accepted() -> None:
    assert prepare([sized_message(MAX_PDU_BYTES)])[0].depth == 7


def test_event_over_65536_bytes_is_rejected_naming_its_index() -> None:
    error = rejection([message(), sized_message(MAX_PDU_BYTES + 1)])
    assert error.index == 1 and error.errcode == "M_TOO_LARGE"
    assert str(error).startswith("events[1].pdu: is 65537 bytes")


# --- what is rejected ---------------------------------------------------------


def test_an_unknown_room_version_is_rejected_as_unsupported() -> None:
    with pytest.raises(BadRequest) as caught:
        prepare([message()], room_version="13")
    assert caught.value.errcode == "M_UNSUPPORTED_ROOM_VERSION"
    assert not isinstance(caught.value, InvalidEvent)


@pytest.mark.parametrize("identifier", ["", "1.0", " 10", "org.matrix.msc4291.11", "x" * 10_000])
def test_look_alike_room_versions_are_unsupported(identifier: str) -> None:
    with pytest.raises(BadRequest, match="unsupported room version"):
        prepare([message()], room_version=identifier)


def drop(key: str) -> Callable[[Pdu], Pdu]:
    def mutate(pdu: Pdu) -> Pdu:
        del pdu[key]
        return pdu

    return mutate


def put(key: str, value: Any) -> Callable[[Pdu], Pdu]:
    def mutate(pdu: Pdu) -> Pdu:
        pdu[key] = value
        return pdu

    return mutate


LONG_UTF8 = "é" * 128  # 128 characters but 256 bytes: limits count bytes
MALFORMED_FIELDS: list[tuple[str, Callable[[Pdu], Pdu], str]] = [
    ("missing type", drop("type"), "pdu.type"),
    ("numeric type", put("type", 5), "pdu.type"),
    ("type over 255 bytes", put("type", LONG_UTF8), "pdu.type"),
    ("missing sender", drop("sender"), "pdu.sender"),
    ("sender without sigil", put("sender", "alice:example.org"), "pdu.sender"),
    ("sender without server", put("sender", "@alice"), "pdu.sender"),
    ("sender over 255 bytes", put("sender", "@" + LONG_UTF8 + ":x"), "pdu.sender"),
    ("sender with NUL", put("sender", "@a\x00:x"), "pdu.sender"),
    ("null state_key", put("state_key", None), "pdu.state_key"),
    ("state_key over 255 bytes", put("state_key", LONG_UTF8), "pdu.state_key"),
    ("missing content", drop("content"), "pdu.content"),
    ("array content", put("content", ["body"]), "pdu.content"),
    ("missing depth", drop("depth"), "pdu.depth"),
    ("negative depth", put("depth", -1), "pdu.depth"),
    ("boolean depth", put("depth", True), "pdu.depth"),
    ("string depth", put("depth", "7"), "pdu.depth"),
    ("missing origin_server_ts", drop("origin_server_ts"), "pdu.origin_server_ts"),
    ("null origin_server_ts", put("origin_server_ts", None), "pdu.origin_server_ts"),
    ("missing prev_events", drop("prev_events"), "pdu.prev_events"),
    ("object prev_events", put("prev_events", {PREV: {}}), "pdu.prev_events"),
    ("21 prev_events", put("prev_events", [f"$p{i}" for i in range(21)]), "pdu.prev_events"),
    ("11 auth_events", put("auth_events", [f"$a{i}" for i in range(11)]), "pdu.auth_events"),
    ("missing auth_events", drop("auth_events"), "pdu.auth_events"),
    ("numeric prev event", put("prev_events", [PREV, 5]), "pdu.prev_events[1]"),
    ("prev event without sigil", put("prev_events", ["abc"]), "pdu.prev_events[0]"),
    ("v1 pair in v10", put("prev_events", [[PREV, {}]]), "pdu.prev_events[0]"),
    ("auth event over 255 bytes", put("auth_events", ["$" + LONG_UTF8]), "pdu.auth_events[0]"),
    ("missing room_id", drop("room_id"), "pdu.room_id"),
    ("room_id without sigil", put("room_id", "room:example.org"), "pdu.room_id"),
    ("room_id of another room", put("room_id", "!other:example.org"), "pdu.room_id"),
    ("hashes as string", put("hashes", "sha256"), "pdu.hashes"),
    ("signatures as array", put("signatures", []), "pdu.signatures"),
    ("unsigned as number", put("unsigned", 3), "pdu.unsigned"),
    ("float in content", put("content", {"a": {"b": [1, 2.5]}}), "pdu.content.a.b[1]"),
    ("integral float depth", put("depth", 7.0), "pdu.depth"),
    ("int above 2**53-1 in v10", put("content", {"n": 2**53}), "pdu.content.n"),
    ("int below -(2**53)+1 in v10", put("unsigned", {"age": -(2**53)}), "pdu.unsigned.age"),
]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [pytest.param(m, f, id=name) for name, m, f in MALFORMED_FIELDS],
)
def test_malformed_field_is_rejected_naming_the_event_index_and_field(
    mutate: Callable[[Pdu], Pdu], field: str
) -> None:
    error = rejection([message(), mutate(message())])
    assert (error.index, error.field) == (1, field)
    assert str(error).startswith(f"events[1].{field}: ")


MALFORMED_JSON: list[tuple[str, bytes, str]] = [
    ("truncated JSON", b'{"type":', "not valid JSON"),
    ("trailing garbage", b"{}x", "not valid JSON"),
    ("array instead of object", b"[1, 2]", "must be a JSON object, not an array"),
    ("string instead of object", b'"pdu"', "must be a JSON object, not a string"),
    ("null instead of object", b"null", "must be a JSON object, not null"),
    ("invalid UTF-8", b'{"type": "\xff"}', "not UTF-8"),
    ("UTF-8 encoded surrogate", b'{"type": "\xed\xa0\x80"}', "not UTF-8"),
    ("lone high surrogate escape", b'{"type": "\\ud800"}', "not valid JSON"),
    ("lone low surrogate escape", b'{"type": "\\udc00x"}', "not valid JSON"),
    ("raw control character", b'{"type": "a\x01b"}', "not valid JSON"),
    ("NaN literal", b'{"depth": NaN}', "not valid JSON"),
    ("deep nesting", b'{"content": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    ("5000-digit integer", b'{"depth": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ("float then garbage", b'{"depth": 1.5, garbage', "not valid JSON"),
    ("empty pdu", b"", "not valid JSON"),
]


@pytest.mark.parametrize(
    ("raw", "problem"),
    [pytest.param(r, p, id=name) for name, r, p in MALFORMED_JSON],
)
def test_unparseable_pdu_is_rejected_naming_its_index(raw: bytes, problem: str) -> None:
    error = rejection([message(), raw])
    assert error.index == 1 and error.field == "pdu"
    assert problem in str(error)


def test_floats_are_rejected_even_in_room_version_1() -> None:
    error = rejection([message("1", content={"x": 1e10})], room_version="1")
    assert error.field == "pdu.content.x" and "floats" in str(error)


def test_v1_events_must_carry_an_event_id() -> None:
    pdu = message("1")
    del pdu["event_id"]
    assert rejection([pdu], room_version="1").field == "pdu.event_id"


def test_v1_event_id_must_start_with_a_dollar() -> None:
    error = rejection([message("1", event_id="abc:s")], room_version="1")
    assert error.field == "pdu.event_id"


def test_v1_references_must_be_pairs() -> None:
    error = rejection([message("1", prev_events=[PREV])], room_version="1")
    assert error.field == "pdu.prev_events[0]" and "pair" in str(error)


def test_v1_pair_second_element_must_be_an_object() -> None:
    error = rejection([message("1", auth_events=[["$a:s", "hash"]])], room_version="1")
    assert error.field == "pdu.auth_events[0]"


def test_v1_depth_beyond_bigint_is_rejected() -> None:
    error = rejection([message("1", depth=2**63)], room_version="1")
    assert error.field == "pdu.depth"


def test_v12_create_event_must_not_carry_a_room_id() -> None:
    room, create = v12_create()
    create["room_id"] = room
    error = rejection([create], room_version="12", room=room)
    assert error.field == "pdu.room_id"


def test_v12_create_event_on_another_rooms_path_is_rejected() -> None:
    room, create = v12_create()
    error = rejection([create], room_version="12", room="!elsewhere")
    assert error.field == "pdu" and room in str(error)


def test_v12_events_must_not_list_the_create_event_in_auth_events() -> None:
    room, _ = v12_create()
    create_id = "$" + room[1:]
    _, member = build_pdu(
        "12", room, ALICE, "m.room.member", {"membership": "join"}, [create_id], [create_id], 2,
        state_key=ALICE,
    )  # fmt: skip
    error = rejection([member], room_version="12", room=room)
    assert error.field == "pdu.auth_events" and create_id in str(error)


def test_v12_non_create_events_still_need_a_room_id() -> None:
    room, _ = v12_create()
    pdu = message("12")
    del pdu["room_id"]
    assert rejection([pdu], room_version="12", room=room).field == "pdu.room_id"


def test_an_envelope_event_id_that_does_not_match_the_hash_is_rejected() -> None:
    error = rejection([message()], event_id="$" + "Z" * 43)
    assert (error.field, error.errcode) == ("event_id", "M_INVALID_PARAM")


def test_a_v1_envelope_event_id_must_match_the_pdus_own() -> None:
    error = rejection([message("1")], room_version="1", event_id="$other:s")
    assert error.field == "event_id"


@pytest.mark.parametrize("reason", ["", "bad\x00reason"])
def test_rejected_reason_must_be_non_empty_and_storable(reason: str) -> None:
    assert rejection([message()], rejected_reason=reason).field == "rejected_reason"


def test_a_room_mismatch_uses_m_invalid_param() -> None:
    assert rejection([message()], room="!other:example.org").errcode == "M_INVALID_PARAM"


def test_error_messages_quote_long_values_only_briefly() -> None:
    error = rejection([message(room_id="!" + "r" * 250)])
    assert len(str(error)) < 400


# --- no input escapes as anything but a PersisterError ------------------------


def assert_only_persister_errors(pdus: list[Pdu | bytes], room_version: str = "10") -> None:
    try:
        prepare(pdus, room_version=room_version)
    except PersisterError as error:
        assert "internal" not in str(error), str(error)


_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**52, max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
_json_value = st.recursive(
    _json_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)
_keys = st.sampled_from(
    [
        "type", "sender", "room_id", "state_key", "content", "depth", "origin_server_ts",
        "prev_events", "auth_events", "hashes", "signatures", "unsigned", "event_id", "extra",
    ]
)  # fmt: skip


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([str(v) for v in range(1, 13)]),
    st.dictionaries(_keys, _json_value, max_size=4),
    st.lists(_keys, max_size=3),
)
def test_any_corruption_of_a_valid_pdu_gives_only_persister_errors(
    room_version: str, replacements: dict[str, Any], removals: list[str]
) -> None:
    pdu = message(room_version, no_room=False)
    pdu.update(replacements)
    for key in removals:
        pdu.pop(key, None)
    assert_only_persister_errors([pdu], room_version)


@settings(max_examples=400)
@given(st.binary(max_size=200))
def test_any_bytes_as_a_pdu_give_only_persister_errors(raw: bytes) -> None:
    assert_only_persister_errors([raw])


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from('{}[]":,0123456789.eE-+ \\u"dtnabcf'), max_size=60))
def test_json_like_noise_as_a_pdu_gives_only_persister_errors(text: str) -> None:
    assert_only_persister_errors([text.encode()])
