"""The redaction algorithm of every room version, written out from the spec's lists.

Expectations here are spelled out independently of room_versions.py's
tables, so a slip in the table shows up as a failing version.
"""

from __future__ import annotations

from typing import Any

import pytest

from persister.matrix.redaction import redact
from persister.matrix.room_versions import KNOWN_ROOM_VERSIONS, RoomVersion

ALL = [str(v) for v in range(1, 13)]
BEFORE_V11 = [str(v) for v in range(1, 11)]
V11_ON = ["11", "12"]


def version(identifier: str) -> RoomVersion:
    return KNOWN_ROOM_VERSIONS[identifier]


def every_top_level_key() -> dict[str, Any]:
    return {
        "event_id": "$e:x",
        "type": "m.room.message",
        "room_id": "!r:x",
        "sender": "@u:x",
        "state_key": "",
        "content": {"body": "secret"},
        "hashes": {"sha256": "h"},
        "signatures": {"x": {"ed25519:k": "s"}},
        "depth": 3,
        "prev_events": ["$p"],
        "prev_state": [],
        "auth_events": ["$a"],
        "origin": "x",
        "origin_server_ts": 1,
        "membership": "join",
        "unsigned": {"age_ts": 1, "replaces_state": "$old"},
        "redacts": "$target",
        "custom": {"anything": 1},
    }


CLASSIC_KEPT = {
    "event_id",
    "type",
    "room_id",
    "sender",
    "state_key",
    "content",
    "hashes",
    "signatures",
    "depth",
    "prev_events",
    "prev_state",
    "auth_events",
    "origin",
    "origin_server_ts",
    "membership",
}
V11_KEPT = CLASSIC_KEPT - {"origin", "membership", "prev_state"}


@pytest.mark.parametrize("room_version", BEFORE_V11)
def test_versions_1_to_10_keep_the_fifteen_classic_top_level_keys(room_version: str) -> None:
    redacted = redact(every_top_level_key(), version(room_version))
    assert set(redacted) == CLASSIC_KEPT
    assert redacted["content"] == {}


@pytest.mark.parametrize("room_version", V11_ON)
def test_versions_11_and_12_no_longer_keep_origin_membership_or_prev_state(
    room_version: str,
) -> None:
    redacted = redact(every_top_level_key(), version(room_version))
    assert set(redacted) == V11_KEPT


@pytest.mark.parametrize("room_version", ALL)
def test_unsigned_redacts_and_unknown_top_level_keys_are_always_dropped(room_version: str) -> None:
    redacted = redact(every_top_level_key(), version(room_version))
    assert not {"unsigned", "redacts", "custom"} & set(redacted)


@pytest.mark.parametrize("room_version", ALL)
def test_absent_keys_stay_absent(room_version: str) -> None:
    redacted = redact({"type": "m.room.message", "content": {"a": 1}}, version(room_version))
    assert redacted == {"type": "m.room.message", "content": {}}


def content_after(event_type: str, content: dict[str, Any], room_version: str) -> dict[str, Any]:
    redacted = redact({"type": event_type, "content": content}, version(room_version))
    kept: dict[str, Any] = redacted["content"]
    return kept


MEMBER = {
    "membership": "join",
    "join_authorised_via_users_server": "@u:x",
    "third_party_invite": {"signed": {"mxid": "@u:x"}, "display_name": "U"},
    "displayname": "U",
    "avatar_url": "mxc://x/y",
}


@pytest.mark.parametrize("room_version", [str(v) for v in range(1, 9)])
def test_member_events_keep_only_membership_before_version_9(room_version: str) -> None:
    assert content_after("m.room.member", MEMBER, room_version) == {"membership": "join"}


@pytest.mark.parametrize("room_version", ["9", "10"])
def test_member_events_keep_the_authorising_server_from_version_9(room_version: str) -> None:
    assert content_after("m.room.member", MEMBER, room_version) == {
        "membership": "join",
        "join_authorised_via_users_server": "@u:x",
    }


@pytest.mark.parametrize("room_version", V11_ON)
def test_member_events_keep_only_the_signed_part_of_a_third_party_invite_from_v11(
    room_version: str,
) -> None:
    assert content_after("m.room.member", MEMBER, room_version) == {
        "membership": "join",
        "join_authorised_via_users_server": "@u:x",
        "third_party_invite": {"signed": {"mxid": "@u:x"}},
    }


@pytest.mark.parametrize("room_version", V11_ON)
def test_a_third_party_invite_without_signed_survives_as_an_empty_object_like_synapse(
    room_version: str,
) -> None:
    content = {"membership": "invite", "third_party_invite": {"display_name": "U"}}
    assert content_after("m.room.member", content, room_version) == {
        "membership": "invite",
        "third_party_invite": {},
    }


@pytest.mark.parametrize("room_version", V11_ON)
def test_a_non_object_third_party_invite_is_dropped(room_version: str) -> None:
    content = {"membership": "invite", "third_party_invite": "nonsense"}
    assert content_after("m.room.member", content, room_version) == {"membership": "invite"}


CREATE = {"creator": "@u:x", "room_version": "9", "m.federate": False, "predecessor": {}}


@pytest.mark.parametrize("room_version", BEFORE_V11)
def test_create_events_keep_only_creator_before_version_11(room_version: str) -> None:
    assert content_after("m.room.create", CREATE, room_version) == {"creator": "@u:x"}


@pytest.mark.parametrize("room_version", V11_ON)
def test_create_events_keep_their_whole_content_from_version_11(room_version: str) -> None:
    assert content_after("m.room.create", CREATE, room_version) == CREATE


def test_create_content_is_copied_not_shared() -> None:
    content = dict(CREATE)
    kept = content_after("m.room.create", content, "11")
    kept["extra"] = 1
    assert "extra" not in content


JOIN_RULES = {"join_rule": "restricted", "allow": [{"type": "m.room_membership"}], "x": 1}


@pytest.mark.parametrize("room_version", [str(v) for v in range(1, 8)])
def test_join_rules_keep_only_join_rule_before_version_8(room_version: str) -> None:
    assert content_after("m.room.join_rules", JOIN_RULES, room_version) == {
        "join_rule": "restricted"
    }


@pytest.mark.parametrize("room_version", [str(v) for v in range(8, 13)])
def test_join_rules_keep_allow_from_version_8(room_version: str) -> None:
    assert content_after("m.room.join_rules", JOIN_RULES, room_version) == {
        "join_rule": "restricted",
        "allow": [{"type": "m.room_membership"}],
    }


POWER_LEVELS = {
    "ban": 50,
    "events": {"m.room.name": 50},
    "events_default": 0,
    "invite": 0,
    "kick": 50,
    "redact": 50,
    "state_default": 50,
    "users": {"@u:x": 100},
    "users_default": 0,
    "notifications": {"room": 50},
}
CLASSIC_POWER_KEYS = {
    "ban",
    "events",
    "events_default",
    "kick",
    "redact",
    "state_default",
    "users",
    "users_default",
}


@pytest.mark.parametrize("room_version", BEFORE_V11)
def test_power_levels_lose_invite_and_notifications_before_version_11(room_version: str) -> None:
    assert set(content_after("m.room.power_levels", POWER_LEVELS, room_version)) == (
        CLASSIC_POWER_KEYS
    )


@pytest.mark.parametrize("room_version", V11_ON)
def test_power_levels_keep_invite_from_version_11(room_version: str) -> None:
    assert set(content_after("m.room.power_levels", POWER_LEVELS, room_version)) == (
        CLASSIC_POWER_KEYS | {"invite"}
    )


@pytest.mark.parametrize("room_version", ["1", "2", "3", "4", "5"])
def test_aliases_keep_aliases_in_versions_1_to_5(room_version: str) -> None:
    content = {"aliases": ["#a:x"], "x": 1}
    assert content_after("m.room.aliases", content, room_version) == {"aliases": ["#a:x"]}


@pytest.mark.parametrize("room_version", [str(v) for v in range(6, 13)])
def test_aliases_lose_everything_from_version_6(room_version: str) -> None:
    assert content_after("m.room.aliases", {"aliases": ["#a:x"]}, room_version) == {}


@pytest.mark.parametrize("room_version", ALL)
def test_history_visibility_keeps_history_visibility_in_every_version(room_version: str) -> None:
    content = {"history_visibility": "shared", "x": 1}
    assert content_after("m.room.history_visibility", content, room_version) == {
        "history_visibility": "shared"
    }


@pytest.mark.parametrize("room_version", BEFORE_V11)
def test_redaction_events_lose_content_redacts_before_version_11(room_version: str) -> None:
    assert content_after("m.room.redaction", {"redacts": "$t", "reason": "r"}, room_version) == {}


@pytest.mark.parametrize("room_version", V11_ON)
def test_redaction_events_keep_content_redacts_from_version_11(room_version: str) -> None:
    content = {"redacts": "$t", "reason": "r"}
    assert content_after("m.room.redaction", content, room_version) == {"redacts": "$t"}


@pytest.mark.parametrize("room_version", ALL)
def test_messages_and_unknown_types_lose_all_content(room_version: str) -> None:
    content = {"body": "b", "m.relates_to": {"rel_type": "m.thread", "event_id": "$t"}}
    assert content_after("m.room.message", content, room_version) == {}
    assert content_after("org.example.custom", {"membership": "join"}, room_version) == {}


def test_redaction_does_not_modify_its_input() -> None:
    pdu = every_top_level_key()
    before = repr(pdu)
    redact(pdu, version("11"))
    assert repr(pdu) == before


@pytest.mark.parametrize(
    "pdu",
    [
        {"content": {}},
        {"type": 5, "content": {}},
        {"type": "m.room.message"},
        {"type": "t", "content": []},
    ],
)
def test_events_without_a_string_type_or_object_content_cannot_be_redacted(
    pdu: dict[str, Any],
) -> None:
    with pytest.raises(ValueError, match="cannot redact"):
        redact(pdu, version("10"))


def test_synapse_v10_message_vector_redacts_to_its_published_shape() -> None:
    # From Synapse rust/src/events/utils.rs test_redact_m_room_message.
    original = {
        "unknown_key": "unknown_value",
        "type": "m.room.message",
        "room_id": "!DHmIIVvxFASSFgDGzr:localhost:8008",
        "content": {"msgtype": "m.text", "body": "invited people can see history"},
        "depth": 24,
        "origin": "localhost:8008",
        "unsigned": {"age_ts": 1731769874137},
    }
    assert redact(original, version("10")) == {
        "type": "m.room.message",
        "room_id": "!DHmIIVvxFASSFgDGzr:localhost:8008",
        "content": {},
        "depth": 24,
        "origin": "localhost:8008",
    }
    assert "origin" not in redact(original, version("11"))
