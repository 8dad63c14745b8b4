"""Event IDs and hashes against published test vectors from other implementations.

Sources (all public):
- Synapse rust/src/events/utils.rs `test_calculate_event_id` (a real v10
  message, also hashed as v3) and rust/src/events/mod.rs
  `test_room_id_for_create_event_format_v4` (a real v12 create event).
- Synapse tests/crypto/test_event_signing.py (v1 content hashes).
- gomatrixserverlib eventversion_test.go (v1 event, v3 and v4 create event).
- persephone (MTRNord) tests/state_res_test.cpp (a v11 member event).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from persister.matrix.builder import build_pdu
from persister.matrix.canonical_json import CanonicalJsonError
from persister.matrix.event_ids import (
    content_hash,
    create_event_id_for_room_id,
    reference_hash,
    reference_hash_event_id,
    reference_hash_event_id_trusted,
    room_id_for_create_event_id,
)
from persister.matrix.room_versions import KNOWN_ROOM_VERSIONS, RoomVersion


def version(identifier: str) -> RoomVersion:
    return KNOWN_ROOM_VERSIONS[identifier]


SYNAPSE_V10_MESSAGE: dict[str, Any] = {
    "auth_events": [
        "$gbHO7IPUHybc7ULFnT7P0r3iWlZFHGmr6zBfEYCUyKw",
        "$hy1eZFYcgNxMFNNBgCD5fyOzyWRcBkxfNcrUI5ZpZlE",
        "$Nt_z68EwFfPqBeHjzEHGsp461Z4EfNEzR-KH5bOYdOY",
    ],
    "prev_events": ["$4FbpZrgPQTwoLD9H5y7jcikucCypUOn78mXhQX7WliY"],
    "type": "m.room.message",
    "room_id": "!DHmIIVvxFASSFgDGzr:localhost:8008",
    "sender": "@tester_b:localhost:8008",
    "content": {"msgtype": "m.text", "body": "invited people can see history", "m.mentions": {}},
    "depth": 24,
    "origin": "localhost:8008",
    "origin_server_ts": 1731769874137,
    "hashes": {"sha256": "FoYV1w3TW/B2mVT0gX2/BZKpCwrrvGXqXFdUhN9LZYU"},
    "signatures": {
        "localhost:8008": {
            "ed25519:a_phSE": "G8cfk/m97sndxMNrEZ2nMMSXkVeJE05G7if4JiVzAwGfD3TwnF/"
            "jfSHt2acWrpNqv/aEhZug3WLofc2id+rVBw"
        }
    },
    "unsigned": {"age_ts": 1731769874137},
}

SYNAPSE_V12_CREATE = json.loads(
    '{"auth_events":[],"prev_events":[],"type":"m.room.create","sender":"@erikj:jki.re",'
    '"content":{"room_version":"12","predecessor":{"room_id":"!VuNGkDTdbMOOxSmuDa:jki.re"}},'
    '"depth":1,"state_key":"","origin_server_ts":1775568141481,'
    '"hashes":{"sha256":"qBX+glsKvogXFrvsEN0eh13pO2kpuE6o/b4yREPtOqw"},'
    '"signatures":{"jki.re":{"ed25519:auto":"n/4gHQRagk3r1r24L/7a+oaMMf9cysVfQRYdjpDZcf4ppkVym33'
    'rhTW18Vy4zMa1L5nsWLkxsBvbrRRDYUOhBQ"}},"unsigned":{"age_ts":1775568141481}}'
)

GOMATRIXSERVERLIB_CREATE = json.loads(
    '{"auth_events": [], "prev_events": [], "type": "m.room.create", '
    '"room_id": "!uXDCzlYgCTHtiWCkEx:jki.re", "sender": "@erikj:jki.re", '
    '"content": {"room_version": "5", "predecessor": '
    '{"room_id": "!gdRMqOrTFdOCYHNwOo:half-shot.uk",'
    ' "event_id": "$LP7ROBc4b+cMc1UE9haIz8q5AK2AIW4eJ90FfKLvyZI"}, "creator": "@erikj:jki.re"}, '
    '"depth": 1, "prev_state": [], "state_key": "", "origin": "jki.re", '
    '"origin_server_ts": 1560284621137, '
    '"hashes": {"sha256": "IX6zuNiJpJPNf70BLleL3HSCpjKeq9Uhu7uUpyDjBmc"}, '
    '"signatures": {"jki.re": {"ed25519:auto": "O4IyFfF2PPtGp5uaDm8t57dZbdh8vc8Q64LgCwvzYRVItAMI0u'
    'isfiAFaxkVT7MRpzh6N2QNN5NMRXZKmgPYDA"}}, "unsigned": {"age": 1321650}}'
)

GOMATRIXSERVERLIB_V1_NAME = json.loads(
    '{"auth_events":[["$oXL79cT7fFxR7dPH:localhost",{"sha256":"abjkiDSg1RkuZrbj2jZoGMlQaaj1Ue3Jhi7'
    'I7NlKfXY"}],["$IVUsaSkm1LBAZYYh:localhost",{"sha256":"X7RUj46hM/8sUHNBIFkStbOauPvbDzjSdH4Nib'
    'YWnko"}],["$VS2QT0EeArZYi8wf:localhost",{"sha256":"k9eM6utkCH8vhLW9/oRsH74jOBS/6RVK42iGDFbyl'
    'no"}]],"content":{"name":"test3"},"depth":7,"event_id":"$yvN1b43rlmcOs5fY:localhost",'
    '"hashes":{"sha256":"Oh1mwI1jEqZ3tgJ+V1Dmu5nOEGpCE4RFUqyJv2gQXKs"},"origin":"localhost",'
    '"origin_server_ts":1510854416361,"prev_events":[["$FqI6TVvWpcbcnJ97:localhost",{"sha256":'
    '"upCsBqUhNUgT2/+zkzg8TbqdQpWWKQnZpGJc6KcbUC4"}]],"prev_state":[],'
    '"room_id":"!19Mp0U9hjajeIiw1:localhost","sender":"@test:localhost","signatures":{"localhost":'
    '{"ed25519:u9kP":"5IzSuRXkxvbTp0vZhhXYZeOe+619iG3AybJXr7zfNn/4vHz4TH7qSJVQXSaHHvcTcDodAKHnTG1W'
    'DulgO5okAQ"}},"state_key":"","type":"m.room.name"}'
)

PERSEPHONE_V11_MEMBER: dict[str, Any] = {
    "auth_events": [],
    "content": {
        "join_authorised_via_users_server": "@arbitrary:resident.example.com",
        "membership": "join",
    },
    "depth": 12,
    "hashes": {"sha256": "thishashcoversallfieldsincasethisisredacted"},
    "origin": "example.com",
    "origin_server_ts": 1404838188000,
    "prev_events": [],
    "room_id": "!UcYsUzyxTGDxLBEvLy:example.org",
    "sender": "@alice:example.com",
    "state_key": "@alice:example.com",
    "type": "m.room.member",
    "unsigned": {"age": 4612},
}


def test_v10_message_has_synapses_published_event_id() -> None:
    assert (
        reference_hash_event_id(SYNAPSE_V10_MESSAGE, version("10"))
        == "$zRz9jjiT9wZc3Hl9ij_74aCmTjqV3YMlj9sj3Uqxg6o"
    )


def test_v3_uses_standard_base64_for_the_same_hash() -> None:
    assert (
        reference_hash_event_id(SYNAPSE_V10_MESSAGE, version("3"))
        == "$zRz9jjiT9wZc3Hl9ij/74aCmTjqV3YMlj9sj3Uqxg6o"
    )


def test_v3_create_event_has_gomatrixserverlibs_published_event_id() -> None:
    assert (
        reference_hash_event_id(GOMATRIXSERVERLIB_CREATE, version("3"))
        == "$RrGxF28UrHLmoASHndYb9Jb/1SFww2ptmtur9INS438"
    )


def test_v4_create_event_has_gomatrixserverlibs_published_url_safe_event_id() -> None:
    assert (
        reference_hash_event_id(GOMATRIXSERVERLIB_CREATE, version("4"))
        == "$RrGxF28UrHLmoASHndYb9Jb_1SFww2ptmtur9INS438"
    )


def test_v11_member_event_has_persephones_published_event_id() -> None:
    assert (
        reference_hash_event_id(PERSEPHONE_V11_MEMBER, version("11"))
        == "$P_kn3vgLwKkBMkNtD5snHOQhuCoQTv2K6wSiRtnqXVA"
    )


def test_v11_and_v10_ids_differ_because_v11_no_longer_keeps_origin() -> None:
    assert reference_hash_event_id(PERSEPHONE_V11_MEMBER, version("10")) != (
        reference_hash_event_id(PERSEPHONE_V11_MEMBER, version("11"))
    )
    without_origin = {k: v for k, v in PERSEPHONE_V11_MEMBER.items() if k != "origin"}
    assert reference_hash_event_id(without_origin, version("11")) == (
        reference_hash_event_id(PERSEPHONE_V11_MEMBER, version("11"))
    )


def test_v12_create_event_gives_synapses_published_room_id() -> None:
    event_id = reference_hash_event_id(SYNAPSE_V12_CREATE, version("12"))
    assert room_id_for_create_event_id(event_id) == "!BeXKh925K_M46DwsuJFR0EyBpE1P7CFUDGuWW4xw55Y"


def test_v12_create_keeps_its_whole_content_in_the_hash_unlike_v10() -> None:
    # v10 redaction would strip `predecessor`, so the ID would change.
    assert reference_hash_event_id(SYNAPSE_V12_CREATE, version("10")) != (
        reference_hash_event_id(SYNAPSE_V12_CREATE, version("12"))
    )


@pytest.mark.parametrize(
    ("pdu", "expected"),
    [
        (SYNAPSE_V10_MESSAGE, "FoYV1w3TW/B2mVT0gX2/BZKpCwrrvGXqXFdUhN9LZYU"),
        (SYNAPSE_V12_CREATE, "qBX+glsKvogXFrvsEN0eh13pO2kpuE6o/b4yREPtOqw"),
        (GOMATRIXSERVERLIB_CREATE, "IX6zuNiJpJPNf70BLleL3HSCpjKeq9Uhu7uUpyDjBmc"),
        (GOMATRIXSERVERLIB_V1_NAME, "Oh1mwI1jEqZ3tgJ+V1Dmu5nOEGpCE4RFUqyJv2gQXKs"),
    ],
)
def test_content_hash_of_real_events_matches_their_hashes_field(
    pdu: dict[str, Any], expected: str
) -> None:
    assert content_hash(pdu) == expected == pdu["hashes"]["sha256"]


@pytest.mark.parametrize(
    ("pdu", "expected"),
    [
        (
            {
                "event_id": "$0:domain",
                "origin_server_ts": 1000000,
                "signatures": {},
                "type": "X",
                "content": {},
                "unsigned": {"age_ts": 1000000},
            },
            "mq4QfPPpC+QsBd6eqfVsmJIEz8uvMSVK0+AU67PLESk",
        ),
        (
            {
                "content": {"body": "Here is the message content"},
                "event_id": "$0:domain",
                "origin_server_ts": 1000000,
                "type": "m.room.message",
                "room_id": "!r:domain",
                "sender": "@u:domain",
                "signatures": {},
                "unsigned": {"age_ts": 1000000},
            },
            "rDCeYBepPlI891h/RkI2/Lkf9bt7u0TxFku4tMs7WKk",
        ),
    ],
)
def test_v1_content_hashes_match_synapses_signing_test_vectors(
    pdu: dict[str, Any], expected: str
) -> None:
    assert content_hash(pdu) == expected


def test_v1_event_ids_are_carried_not_hashed() -> None:
    with pytest.raises(ValueError, match="chosen by the sender"):
        reference_hash_event_id(GOMATRIXSERVERLIB_V1_NAME, version("1"))
    # The reference hash itself still exists: v1/v2 prev_events pairs cite it.
    assert len(reference_hash(GOMATRIXSERVERLIB_V1_NAME, version("1"))) == 32


@pytest.mark.parametrize("key", ["signatures", "unsigned", "origin_server_ts_extra", "age_ts"])
def test_keys_outside_the_redacted_event_do_not_change_the_event_id(key: str) -> None:
    changed = dict(SYNAPSE_V10_MESSAGE)
    changed[key] = {"anything": "else"}
    assert reference_hash_event_id(changed, version("10")) == (
        reference_hash_event_id(SYNAPSE_V10_MESSAGE, version("10"))
    )


def test_message_content_does_not_change_the_event_id_but_its_hash_does() -> None:
    changed = dict(SYNAPSE_V10_MESSAGE)
    changed["content"] = {"body": "edited"}
    assert reference_hash_event_id(changed, version("10")) == (
        reference_hash_event_id(SYNAPSE_V10_MESSAGE, version("10"))
    )
    changed["hashes"] = {"sha256": content_hash(changed)}
    assert reference_hash_event_id(changed, version("10")) != (
        reference_hash_event_id(SYNAPSE_V10_MESSAGE, version("10"))
    )


def test_strict_versions_refuse_to_hash_out_of_range_integers() -> None:
    big = dict(SYNAPSE_V10_MESSAGE, depth=2**53)
    with pytest.raises(CanonicalJsonError):
        reference_hash_event_id(big, version("10"))


def test_versions_before_6_hash_out_of_range_integers_like_synapse() -> None:
    big = dict(SYNAPSE_V10_MESSAGE, depth=2**63 - 1)
    assert reference_hash_event_id(big, version("5")).startswith("$")


def test_trusted_and_checked_event_ids_agree() -> None:
    for identifier in ("3", "4", "10", "11", "12"):
        assert reference_hash_event_id_trusted(SYNAPSE_V10_MESSAGE, version(identifier)) == (
            reference_hash_event_id(SYNAPSE_V10_MESSAGE, version(identifier))
        )


def test_room_and_create_event_ids_convert_both_ways() -> None:
    room_id = "!BeXKh925K_M46DwsuJFR0EyBpE1P7CFUDGuWW4xw55Y"
    assert room_id_for_create_event_id(create_event_id_for_room_id(room_id)) == room_id
    with pytest.raises(ValueError):
        room_id_for_create_event_id("!not-an-event")
    with pytest.raises(ValueError):
        create_event_id_for_room_id("$not-a-room")


@pytest.mark.parametrize("room_version", [str(v) for v in range(3, 13)])
def test_builder_events_have_the_id_their_hash_gives(room_version: str) -> None:
    room_id = None if room_version == "12" else "!r:x"
    event_id, pdu = build_pdu(
        room_version, room_id, "@u:x", "m.room.create", {"room_version": room_version}, [], [], 1,
        state_key="", origin_server_ts=5,
    )  # fmt: skip
    assert reference_hash_event_id(pdu, version(room_version)) == event_id
    assert pdu["hashes"]["sha256"] == content_hash(pdu)
    if room_version == "3":  # standard alphabet: may hold + and /, never - or _
        assert "-" not in event_id and "_" not in event_id
    else:
        assert "+" not in event_id and "/" not in event_id
    assert len(event_id) == 44


@pytest.mark.parametrize("room_version", ["1", "2"])
def test_builder_gives_v1_and_v2_events_a_server_local_id_and_pair_references(
    room_version: str,
) -> None:
    event_id, pdu = build_pdu(
        room_version, "!r:x", "@u:example.org", "m.room.message", {"body": "hi"},
        ["$p:example.org"], ["$a:example.org"], 2, origin_server_ts=5,
    )  # fmt: skip
    assert pdu["event_id"] == event_id
    assert event_id.startswith("$") and event_id.endswith(":example.org")
    assert pdu["prev_events"][0][0] == "$p:example.org"
    assert set(pdu["prev_events"][0][1]) == {"sha256"}
    assert pdu["hashes"]["sha256"] == content_hash(pdu)


def test_builder_refuses_a_room_id_on_a_v12_create_and_requires_one_elsewhere() -> None:
    with pytest.raises(ValueError, match="no room_id"):
        build_pdu("12", "!r:x", "@u:x", "m.room.create", {}, [], [], 1, state_key="")
    with pytest.raises(ValueError, match="room_id is required"):
        build_pdu("12", None, "@u:x", "m.room.message", {}, [], [], 2)


def test_builder_signatures_are_shaped_like_ed25519() -> None:
    _, pdu = build_pdu("10", "!r:x", "@u:x", "m.room.message", {}, [], [], 2, origin_server_ts=1)
    ((server, keys),) = pdu["signatures"].items()
    assert server == "x" and len(keys["ed25519:fake"]) == 86
