"""Build valid PDUs for tests and the load harness (never for production use).

The content hash in `hashes.sha256` is computed the spec way; `signatures`
is well-formed (86 characters of unpadded base64 under `ed25519:fake`) but
signs nothing, since the persister does not verify signatures.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

from persister.matrix.canonical_json import encode_canonical
from persister.matrix.event_ids import (
    content_hash,
    reference_hash_event_id,
    unpadded_base64,
)
from persister.matrix.redaction import redact
from persister.matrix.room_versions import RoomVersion, get_room_version

FAKE_KEY_ID = "ed25519:fake"


def build_pdu(
    room_version: str | RoomVersion,
    room_id: str | None,
    sender: str,
    type: str,  # shadows the builtin on purpose: it is the PDU field's name
    content: Mapping[str, Any],
    prev_event_ids: Sequence[str],
    auth_event_ids: Sequence[str],
    depth: int,
    state_key: str | None = None,
    origin_server_ts: int | None = None,
    *,
    event_id: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Return `(event_id, pdu)` for a valid event of `room_version`.

    - `room_id` must be None exactly for a version-12 `m.room.create`, whose
      room ID is derived from its event ID (`"!" + event_id[1:]`).
    - v1/v2: the PDU carries `event_id` (given, or `$<random>:<sender's
      server>`), and prev/auth references become `[id, {"sha256": ...}]`
      pairs whose hashes are well-formed stand-ins.
    - `origin_server_ts` defaults to now, in milliseconds.
    """
    version = _version(room_version)
    _check_room_id(version, room_id, type)
    pdu: dict[str, Any] = {
        "type": type,
        "sender": sender,
        "content": dict(content),
        "depth": depth,
        "origin_server_ts": _now_ms() if origin_server_ts is None else origin_server_ts,
        "prev_events": _refs(version, prev_event_ids),
        "auth_events": _refs(version, auth_event_ids),
    }
    if room_id is not None:
        pdu["room_id"] = room_id
    if state_key is not None:
        pdu["state_key"] = state_key
    if version.pdu_carries_event_id:
        pdu["event_id"] = event_id or f"${secrets.token_urlsafe(12)}:{_server_of(sender)}"
    elif event_id is not None:
        raise ValueError(f"room version {version.identifier} event IDs are hashes, not chosen")
    pdu["hashes"] = {"sha256": content_hash(pdu)}
    pdu["signatures"] = {_server_of(sender): {FAKE_KEY_ID: _fake_signature(pdu, version)}}
    if version.pdu_carries_event_id:
        return pdu["event_id"], pdu
    return reference_hash_event_id(pdu, version), pdu


def _version(room_version: str | RoomVersion) -> RoomVersion:
    if isinstance(room_version, RoomVersion):
        return room_version
    version = get_room_version(room_version)
    if version is None:
        raise ValueError(f"unknown room version {room_version!r}")
    return version


def _check_room_id(version: RoomVersion, room_id: str | None, event_type: str) -> None:
    derived = version.room_id_from_create_event and event_type == "m.room.create"
    if derived and room_id is not None:
        raise ValueError("a room version 12 create event has no room_id; pass None")
    if not derived and room_id is None:
        raise ValueError("room_id is required (only v12 create events go without)")


def _refs(version: RoomVersion, event_ids: Sequence[str]) -> list[Any]:
    if not version.event_refs_are_pairs:
        return list(event_ids)
    # Real pairs carry the referenced event's reference hash; the builder does
    # not have those events, so a digest of the ID stands in.
    return [
        [eid, {"sha256": unpadded_base64(hashlib.sha256(eid.encode()).digest())}]
        for eid in event_ids
    ]


def _fake_signature(pdu: dict[str, Any], version: RoomVersion) -> str:
    # Shaped like ed25519 (64 bytes) and deterministic in what a real
    # signature covers (the redacted event without signatures/unsigned).
    signed = redact(pdu, version)
    signed.pop("signatures", None)
    digest = hashlib.sha512(encode_canonical(signed, strict_ints=False)).digest()
    return unpadded_base64(digest)


def _server_of(user_id: str) -> str:
    _, sep, server = user_id.partition(":")
    if not sep or not server:
        raise ValueError(f"sender {user_id!r} is not a user ID of the form @localpart:server")
    return server


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
