"""The room versions this persister accepts and the format rules each one implies.

Only rules about an event's *format* live here (event IDs, redaction, JSON
strictness, reference shapes); authorisation and state resolution are the
event creator's business. Sources: the Matrix spec's room version pages
(v1-v12) and Synapse's room version table.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class EventIdFormat(enum.Enum):
    # v1-v2: "$opaque:server", chosen by the sender and carried in the PDU.
    SERVER_LOCAL = "server_local"
    # v3: "$" + reference hash in standard unpadded base64 (may contain "/").
    HASH_BASE64 = "hash_base64"
    # v4+: "$" + reference hash in URL-safe unpadded base64.
    HASH_URLSAFE_BASE64 = "hash_urlsafe_base64"


@dataclass(frozen=True, slots=True)
class RedactionRules:
    """One redaction algorithm of the spec, as data.

    `content_keys` maps an event type to the content keys that survive
    redaction; types not listed lose their whole content.
    """

    name: str
    top_level_keys: frozenset[str]
    content_keys: Mapping[str, frozenset[str]]
    # v11+: m.room.create keeps its entire content (MSC2176).
    create_keeps_all_content: bool = False
    # v11+: m.room.member keeps `third_party_invite.signed` (MSC3821).
    member_keeps_third_party_invite_signed: bool = False


@dataclass(frozen=True, slots=True)
class RoomVersion:
    identifier: str
    event_id_format: EventIdFormat
    redaction: RedactionRules
    # v6+: integers outside [-(2**53)+1, 2**53-1] make the event invalid.
    strict_canonical_json: bool
    # v12 (MSC4291): the room ID is "!" + the create event's reference hash,
    # the create event has no room_id and is never listed in auth_events.
    room_id_from_create_event: bool
    # v1-v2: prev_events/auth_events are [event_id, {alg: hash}] pairs;
    # v3+: plain lists of event ID strings.
    event_refs_are_pairs: bool = field(init=False)

    def __post_init__(self) -> None:
        # Derived rather than passed so the table cannot contradict itself.
        pairs = self.event_id_format is EventIdFormat.SERVER_LOCAL
        object.__setattr__(self, "event_refs_are_pairs", pairs)

    @property
    def pdu_carries_event_id(self) -> bool:
        return self.event_id_format is EventIdFormat.SERVER_LOCAL


_CLASSIC_TOP_LEVEL = frozenset(
    {
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
)
# v11 (MSC2176) stopped protecting `origin`, `membership` and `prev_state`.
_V11_TOP_LEVEL = _CLASSIC_TOP_LEVEL - {"origin", "membership", "prev_state"}

_POWER_LEVELS = frozenset(
    {"ban", "events", "events_default", "kick", "redact", "state_default", "users", "users_default"}
)


def _freeze(table: dict[str, frozenset[str]]) -> Mapping[str, frozenset[str]]:
    return MappingProxyType(table)


_V1_CONTENT = {
    "m.room.member": frozenset({"membership"}),
    "m.room.create": frozenset({"creator"}),
    "m.room.join_rules": frozenset({"join_rule"}),
    "m.room.power_levels": _POWER_LEVELS,
    "m.room.aliases": frozenset({"aliases"}),
    "m.room.history_visibility": frozenset({"history_visibility"}),
}
# v6 (MSC2432): m.room.aliases lost its special meaning, so its content goes.
_V6_CONTENT = {k: v for k, v in _V1_CONTENT.items() if k != "m.room.aliases"}
# v8 (MSC3083): restricted join rules keep `allow`.
_V8_CONTENT = {**_V6_CONTENT, "m.room.join_rules": frozenset({"join_rule", "allow"})}
# v9 (MSC3375): member events keep the authorising server of a restricted join.
_V9_CONTENT = {
    **_V8_CONTENT,
    "m.room.member": frozenset({"membership", "join_authorised_via_users_server"}),
}
# v11 (MSC2176, MSC3821, MSC3989): create keeps everything (handled by flag),
# `creator` is no longer special, power levels keep `invite`, redactions keep
# `redacts`.
_V11_CONTENT = {
    **{k: v for k, v in _V9_CONTENT.items() if k != "m.room.create"},
    "m.room.power_levels": _POWER_LEVELS | {"invite"},
    "m.room.redaction": frozenset({"redacts"}),
}

REDACTION_V1 = RedactionRules("v1", _CLASSIC_TOP_LEVEL, _freeze(_V1_CONTENT))
REDACTION_V6 = RedactionRules("v6", _CLASSIC_TOP_LEVEL, _freeze(_V6_CONTENT))
REDACTION_V8 = RedactionRules("v8", _CLASSIC_TOP_LEVEL, _freeze(_V8_CONTENT))
REDACTION_V9 = RedactionRules("v9", _CLASSIC_TOP_LEVEL, _freeze(_V9_CONTENT))
REDACTION_V11 = RedactionRules(
    "v11",
    _V11_TOP_LEVEL,
    _freeze(_V11_CONTENT),
    create_keeps_all_content=True,
    member_keeps_third_party_invite_signed=True,
)


def _version(
    identifier: str,
    ids: EventIdFormat,
    redaction: RedactionRules,
    *,
    strict: bool,
    hashed_room_id: bool = False,
) -> RoomVersion:
    return RoomVersion(identifier, ids, redaction, strict, hashed_room_id)


_LOCAL = EventIdFormat.SERVER_LOCAL
_B64 = EventIdFormat.HASH_BASE64
_URL = EventIdFormat.HASH_URLSAFE_BASE64

V1 = _version("1", _LOCAL, REDACTION_V1, strict=False)
V2 = _version("2", _LOCAL, REDACTION_V1, strict=False)
V3 = _version("3", _B64, REDACTION_V1, strict=False)
V4 = _version("4", _URL, REDACTION_V1, strict=False)
V5 = _version("5", _URL, REDACTION_V1, strict=False)
V6 = _version("6", _URL, REDACTION_V6, strict=True)
V7 = _version("7", _URL, REDACTION_V6, strict=True)
V8 = _version("8", _URL, REDACTION_V8, strict=True)
V9 = _version("9", _URL, REDACTION_V9, strict=True)
V10 = _version("10", _URL, REDACTION_V9, strict=True)
V11 = _version("11", _URL, REDACTION_V11, strict=True)
V12 = _version("12", _URL, REDACTION_V11, strict=True, hashed_room_id=True)

KNOWN_ROOM_VERSIONS: Mapping[str, RoomVersion] = MappingProxyType(
    {v.identifier: v for v in (V1, V2, V3, V4, V5, V6, V7, V8, V9, V10, V11, V12)}
)


def get_room_version(identifier: str) -> RoomVersion | None:
    """The room version called `identifier`, or None if this persister does not know it."""
    return KNOWN_ROOM_VERSIONS.get(identifier)
