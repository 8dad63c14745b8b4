"""Reference hashes, content hashes and hash-derived event/room IDs.

Reference hash (spec server-server API, "Calculating the reference hash"):
redact the event with its room version's algorithm, drop `signatures` and
`unsigned`, encode as canonical JSON, sha256. From room version 3 the event
ID is that hash in unpadded base64 (standard alphabet in v3, URL-safe from
v4) prefixed with `$`; from v12 a room's ID is its create event's ID with
`!` instead of `$`.

Content hash ("Calculating the content hash"): the unredacted event minus
`unsigned`, `signatures` and `hashes`, canonical JSON, sha256, standard
unpadded base64; it is what `hashes.sha256` carries.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any

from persister.matrix.canonical_json import encode_canonical, encode_canonical_trusted
from persister.matrix.redaction import redact
from persister.matrix.room_versions import EventIdFormat, RoomVersion

# Also dropped by Synapse before hashing: legacy top-level copies of
# internal fields that old servers leaked into PDUs. Redaction already
# removes them from reference hashes; the content hash must skip them too.
_NOT_CONTENT_HASHED = frozenset(
    {"unsigned", "signatures", "hashes", "age_ts", "outlier", "destinations"}
)


def reference_hash(pdu: Mapping[str, Any], version: RoomVersion) -> bytes:
    """The sha256 reference hash of `pdu` (raw digest), for any room version.

    Raises CanonicalJsonError (a ValueError) if the redacted event is not
    canonical JSON for `version`, and ValueError if it cannot be redacted.
    """
    return hashlib.sha256(_redacted_canonical(pdu, version, trusted=False)).digest()


def reference_hash_event_id(pdu: Mapping[str, Any], version: RoomVersion) -> str:
    """The event ID of `pdu` in a room of `version` (v3 and later).

    Raises ValueError for v1/v2, whose event IDs are not hashes but are
    carried in the PDU itself.
    """
    return _event_id(reference_hash(pdu, version), version)


def reference_hash_event_id_trusted(pdu: Mapping[str, Any], version: RoomVersion) -> str:
    """Like `reference_hash_event_id`, for a PDU already checked to be canonical JSON.

    `pdu.prepare_events` validates floats and integer ranges while decoding,
    so re-walking the redacted event on the hot path would only cost time.
    """
    digest = hashlib.sha256(_redacted_canonical(pdu, version, trusted=True)).digest()
    return _event_id(digest, version)


def room_id_for_create_event_id(create_event_id: str) -> str:
    """A v12 room's ID: its create event's ID with the `$` sigil swapped for `!`."""
    if not create_event_id.startswith("$"):
        raise ValueError(f"not an event ID: {create_event_id[:80]!r}")
    return "!" + create_event_id[1:]


def create_event_id_for_room_id(room_id: str) -> str:
    """The inverse of `room_id_for_create_event_id` (meaningful for v12 rooms only)."""
    if not room_id.startswith("!"):
        raise ValueError(f"not a room ID: {room_id[:80]!r}")
    return "$" + room_id[1:]


def content_hash(pdu: Mapping[str, Any]) -> str:
    """The spec content hash of `pdu`: what belongs in `hashes.sha256`.

    Integers are not range-checked here: this is only ever a value to compare
    or to put into a PDU, and room versions 1-5 allow larger integers.
    """
    hashed = {k: v for k, v in pdu.items() if k not in _NOT_CONTENT_HASHED}
    digest = hashlib.sha256(encode_canonical(hashed, strict_ints=False)).digest()
    return unpadded_base64(digest)


def unpadded_base64(data: bytes) -> str:
    return base64.b64encode(data).rstrip(b"=").decode("ascii")


def unpadded_urlsafe_base64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _redacted_canonical(pdu: Mapping[str, Any], version: RoomVersion, *, trusted: bool) -> bytes:
    redacted = redact(pdu, version)
    redacted.pop("signatures", None)
    redacted.pop("unsigned", None)  # never kept by redaction; popped for clarity
    if trusted:
        return encode_canonical_trusted(redacted)
    # Versions 1-5 predate the integer range rule; Synapse likewise hashes
    # such events with relaxed canonicalisation.
    return encode_canonical(redacted, strict_ints=version.strict_canonical_json)


def _event_id(digest: bytes, version: RoomVersion) -> str:
    fmt = version.event_id_format
    if fmt is EventIdFormat.HASH_URLSAFE_BASE64:
        return "$" + unpadded_urlsafe_base64(digest)
    if fmt is EventIdFormat.HASH_BASE64:
        return "$" + unpadded_base64(digest)
    raise ValueError(
        f"room version {version.identifier} event IDs are chosen by the sender, not hashed"
    )
