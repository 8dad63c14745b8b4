"""The Matrix redaction algorithm, for every room version this persister knows.

Redaction decides what an event's reference hash (and so its v3+ event ID)
covers, which is why it lives in the persister at all.

Two deliberate points, both following the spec text rather than Synapse's
internals:
- `unsigned` is dropped (it is not in any version's list of kept keys;
  Synapse re-adds a few of its own unsigned keys for local bookkeeping, which
  never reach a reference hash).
- A v12 `m.room.create` keeps `room_id` if it has one (the v11 list applies);
  such an event is invalid anyway and `pdu.prepare_events` rejects it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from persister.matrix.room_versions import RedactionRules, RoomVersion

JsonDict = dict[str, Any]


def redact(pdu: Mapping[str, Any], version: RoomVersion) -> JsonDict:
    """Return a new dict holding what survives redaction of `pdu` in `version`.

    Values are shared with `pdu`, not copied: callers must not mutate them.
    Raises ValueError if `type` is not a string or `content` not an object,
    since no redaction algorithm is defined for such events.
    """
    event_type = pdu.get("type")
    content = pdu.get("content")
    if type(event_type) is not str:
        raise ValueError("cannot redact an event whose `type` is not a string")
    if not isinstance(content, Mapping):
        raise ValueError("cannot redact an event whose `content` is not an object")
    rules = version.redaction
    kept = {key: value for key, value in pdu.items() if key in rules.top_level_keys}
    kept["content"] = redact_content(event_type, content, rules)
    return kept


def redact_content(event_type: str, content: Mapping[str, Any], rules: RedactionRules) -> JsonDict:
    """The part of `content` an event of `event_type` keeps under `rules`."""
    if event_type == "m.room.create" and rules.create_keeps_all_content:
        return dict(content)
    allowed = rules.content_keys.get(event_type)
    kept = {} if allowed is None else {k: v for k, v in content.items() if k in allowed}
    if event_type == "m.room.member" and rules.member_keeps_third_party_invite_signed:
        _keep_third_party_invite_signed(content, kept)
    return kept


def _keep_third_party_invite_signed(content: Mapping[str, Any], kept: JsonDict) -> None:
    # Matches Synapse: an object-valued `third_party_invite` survives as an
    # object holding only `signed` (empty if there was no `signed`); any other
    # value is dropped.
    invite = content.get("third_party_invite")
    if isinstance(invite, Mapping):
        kept["third_party_invite"] = {"signed": invite["signed"]} if "signed" in invite else {}
