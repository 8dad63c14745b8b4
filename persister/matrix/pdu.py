"""Format checks for the PDUs of a persist request (contract section 3).

`prepare_events` turns a decoded `PersistRequest` into `PreparedEvent`s or
raises a `BadRequest`/`InvalidEvent` naming the event index and field. For
any input at all, no other exception escapes: a last-resort guard maps an
unexpected one to `InvalidEvent` with "internal" in its message (tests
assert that the guard never fires).

Decisions worth knowing:
- Duplicate object keys: the last value wins, as in Python's `json`
  (Synapse), msgspec and PostgreSQL `jsonb`. The event ID is computed from
  that view; `PreparedEvent.json` keeps the bytes exactly as received.
- Floats are rejected in every room version (Synapse only does so from v6);
  integers outside [-(2**53)+1, 2**53-1] are rejected from v6, where the spec
  makes canonical JSON strict. Integers too long for Python to parse are
  rejected everywhere.
- Lone UTF-16 surrogates (`"\\ud800"`) and invalid UTF-8 make the PDU
  invalid: they cannot be canonicalised, so no event ID exists for them.
- Identifiers (event/room IDs, sender, type, state key) may not contain
  U+0000, which PostgreSQL text columns cannot hold. `\\u0000` elsewhere in
  content is left alone (it is legal JSON and stored as text).
- Duplicate entries in prev_events/auth_events are kept in the PDU but
  collapsed (first occurrence wins) in `PreparedEvent`'s ID tuples, so the
  storage layer never sees the same edge twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import msgspec

from persister.errors import BadRequest, InvalidEvent, PersisterError
from persister.matrix.canonical_json import (
    CANONICAL_INT_MAX,
    CANONICAL_INT_MIN,
    CanonicalJsonError,
    encode_canonical_trusted,
)
from persister.matrix.event_ids import reference_hash_event_id_trusted
from persister.matrix.prepared import PreparedEvent
from persister.matrix.room_versions import RoomVersion, get_room_version
from persister.wire import EventEnvelope, PersistRequest

MAX_PDU_BYTES = 65_536
MAX_ID_BYTES = 255
MAX_PREV_EVENTS = 20
MAX_AUTH_EVENTS = 10
# Columns holding depth and timestamps are BIGINT.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_CREATE = "m.room.create"
_MISSING: Any = object()
# Any integer outside the canonical range has at least 16 digits, so a PDU
# whose bytes hold no run of 16 digits needs no integer walk at all. Mapping
# digits to "0" and everything else to " " and then searching for sixteen
# "0"s is ten times faster than a regex (which steps byte by byte in Python's
# engine): about 1 us for a 1.4 KB event.
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_SIXTEEN_DIGITS = b"0" * 16

JsonDict = dict[str, Any]


class _FloatFound(Exception):
    pass


class _FloatLiteral(str):
    """Stands in for a float while locating it for the error message."""


def _reject_float(literal: str) -> NoReturn:
    raise _FloatFound(literal)


# float_hook runs inside the C decoder, so rejecting floats costs nothing on
# valid input and needs no Python walk over the event.
_pdu_decoder = msgspec.json.Decoder(float_hook=_reject_float)
_locating_decoder = msgspec.json.Decoder(float_hook=_FloatLiteral)


def prepare_events(request: PersistRequest, path_room_id: str) -> list[PreparedEvent]:
    """Validate every event of `request` for the room `path_room_id`, in order.

    Raises BadRequest (M_UNSUPPORTED_ROOM_VERSION) for an unknown room
    version and InvalidEvent for the first event that breaks a rule.
    """
    version = get_room_version(request.room_version)
    if version is None:
        raise BadRequest(
            f"room_version: unsupported room version {_show(request.room_version)}",
            errcode="M_UNSUPPORTED_ROOM_VERSION",
        )
    return [
        _prepare_guarded(index, envelope, version, path_room_id)
        for index, envelope in enumerate(request.events)
    ]


def _prepare_guarded(
    index: int, envelope: EventEnvelope, version: RoomVersion, path_room_id: str
) -> PreparedEvent:
    try:
        return _prepare(index, envelope, version, path_room_id)
    except PersisterError:
        raise
    except Exception as exc:  # the "never a 500 for bad input" backstop
        problem = f"could not be processed (internal {type(exc).__name__})"
        raise InvalidEvent(index, "pdu", problem) from exc


def _prepare(
    index: int, envelope: EventEnvelope, version: RoomVersion, path_room_id: str
) -> PreparedEvent:
    raw = bytes(envelope.pdu)
    text, pdu = _decode(index, raw)
    if len(raw) > MAX_PDU_BYTES:
        _check_canonical_size(index, pdu)
    if version.strict_canonical_json and _has_long_digit_run(raw):
        _check_int_ranges(index, pdu)
    event_type, state_key, sender = _read_identity(index, pdu)
    depth, origin_server_ts = _read_ordering(index, pdu, version)
    _check_objects(index, pdu)
    prev_ids = _read_refs(index, pdu, "prev_events", MAX_PREV_EVENTS, version)
    auth_ids = _read_refs(index, pdu, "auth_events", MAX_AUTH_EVENTS, version)
    event_id = _event_id(index, pdu, version)
    room_id = _room_id(index, pdu, event_type, event_id, version, path_room_id)
    if version.room_id_from_create_event and event_type != _CREATE:
        _check_create_not_in_auth_events(index, room_id, auth_ids)
    _check_envelope(index, envelope, event_id)
    return PreparedEvent(
        event_id=event_id,
        room_id=room_id,
        type=event_type,
        state_key=state_key,
        sender=sender,
        origin_server_ts=origin_server_ts,
        depth=depth,
        prev_event_ids=prev_ids,
        auth_event_ids=auth_ids,
        outlier=envelope.outlier,
        rejected_reason=envelope.rejected_reason,
        json=text,
    )


# --- decoding and whole-event checks ---------------------------------------


def _decode(index: int, raw: bytes) -> tuple[str, JsonDict]:
    text = _utf8_text(index, raw)
    try:
        pdu = _parse(index, raw, _pdu_decoder)
    except _FloatFound as found:
        _raise_float(index, raw, str(found))
    if type(pdu) is not dict:
        raise InvalidEvent(index, "pdu", f"must be a JSON object, not {_json_type(pdu)}")
    return text, pdu


def _utf8_text(index: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(index, "pdu", f"is not UTF-8: {exc}", errcode="M_NOT_JSON") from None


def _parse(index: int, raw: bytes, decoder: msgspec.json.Decoder[Any]) -> Any:
    try:
        return decoder.decode(raw)
    except RecursionError:
        raise InvalidEvent(index, "pdu", "is nested too deeply") from None
    except (msgspec.DecodeError, ValueError) as exc:
        # Includes lone surrogates and integers too long for Python to parse.
        problem = f"is not valid JSON: {exc}"
        raise InvalidEvent(index, "pdu", problem, errcode="M_NOT_JSON") from None


def _raise_float(index: int, raw: bytes, literal: str) -> NoReturn:
    # Slow path only: decode again keeping floats as markers to name the
    # field. That decode also reports any syntax error after the float.
    located = _parse(index, raw, _locating_decoder)
    path = _first_path(located, lambda node: type(node) is _FloatLiteral)
    raise InvalidEvent(
        index, _pdu_field(path), f"floats are not allowed in Matrix events (found {literal[:40]})"
    )


def _check_canonical_size(index: int, pdu: JsonDict) -> None:
    # Canonical JSON is never longer than the valid JSON it came from, so only
    # events whose raw bytes exceed the limit are worth canonicalising.
    try:
        size = len(encode_canonical_trusted(pdu))
    except CanonicalJsonError as exc:
        raise InvalidEvent(index, "pdu", str(exc)) from None
    if size > MAX_PDU_BYTES:
        raise InvalidEvent(
            index,
            "pdu",
            f"is {size} bytes as canonical JSON; the limit is {MAX_PDU_BYTES}",
            errcode="M_TOO_LARGE",
        )


def _has_long_digit_run(raw: bytes) -> bool:
    return _SIXTEEN_DIGITS in raw.translate(_DIGITS_AS_ZEROS)


def _check_int_ranges(index: int, pdu: JsonDict) -> None:
    def out_of_range(node: object) -> bool:
        return type(node) is int and not CANONICAL_INT_MIN <= node <= CANONICAL_INT_MAX

    path = _first_path(pdu, out_of_range)
    if path is not None:
        raise InvalidEvent(
            index,
            _pdu_field(path),
            f"integers must lie in [{CANONICAL_INT_MIN}, {CANONICAL_INT_MAX}] in this room version",
        )


def _first_path(root: object, wanted: Callable[[object], bool]) -> str | None:
    """Path ("a.b[2]") of some node satisfying `wanted`; iterative so depth is no risk."""
    stack: list[tuple[object, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if wanted(node):
            return path
        if type(node) is dict:
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in node.items())
        elif type(node) is list:
            stack.extend((v, f"{path}[{j}]") for j, v in enumerate(node))
    return None


# --- fields ----------------------------------------------------------------


def _read_identity(index: int, pdu: JsonDict) -> tuple[str, str | None, str]:
    event_type = _required_str(index, pdu, "type")
    _check_id(index, "pdu.type", event_type)
    sender = _required_str(index, pdu, "sender")
    _check_id(index, "pdu.sender", sender, sigil="@")
    if ":" not in sender:
        raise InvalidEvent(index, "pdu.sender", "must be a user ID of the form @localpart:server")
    state_key = pdu.get("state_key", _MISSING)
    if state_key is _MISSING:
        return event_type, None, sender
    if type(state_key) is not str:
        raise InvalidEvent(index, "pdu.state_key", f"must be a string, not {_json_type(state_key)}")
    _check_id(index, "pdu.state_key", state_key)
    return event_type, state_key, sender


def _read_ordering(index: int, pdu: JsonDict, version: RoomVersion) -> tuple[int, int]:
    top = CANONICAL_INT_MAX if version.strict_canonical_json else INT64_MAX
    depth = _required_int(index, pdu, "depth", 0, top)
    bottom = CANONICAL_INT_MIN if version.strict_canonical_json else INT64_MIN
    origin_server_ts = _required_int(index, pdu, "origin_server_ts", bottom, top)
    return depth, origin_server_ts


def _check_objects(index: int, pdu: JsonDict) -> None:
    content = pdu.get("content", _MISSING)
    if content is _MISSING:
        raise InvalidEvent(index, "pdu.content", "is required")
    if type(content) is not dict:
        raise InvalidEvent(index, "pdu.content", f"must be an object, not {_json_type(content)}")
    for key in ("hashes", "signatures", "unsigned"):
        value = pdu.get(key, _MISSING)
        if value is not _MISSING and type(value) is not dict:
            raise InvalidEvent(index, f"pdu.{key}", f"must be an object, not {_json_type(value)}")


def _read_refs(
    index: int, pdu: JsonDict, key: str, cap: int, version: RoomVersion
) -> tuple[str, ...]:
    field = f"pdu.{key}"
    refs = pdu.get(key, _MISSING)
    if refs is _MISSING:
        raise InvalidEvent(index, field, "is required")
    if type(refs) is not list:
        raise InvalidEvent(index, field, f"must be an array, not {_json_type(refs)}")
    if len(refs) > cap:
        raise InvalidEvent(index, field, f"lists {len(refs)} events; at most {cap} are allowed")
    if not version.event_refs_are_pairs and all(map(_plainly_valid_ref, refs)):
        # The common case, without a field name formatted per reference.
        return tuple(dict.fromkeys(refs))
    read = _pair_ref if version.event_refs_are_pairs else _string_ref
    ids = [read(index, f"{field}[{j}]", ref) for j, ref in enumerate(refs)]
    return tuple(dict.fromkeys(ids))


def _plainly_valid_ref(ref: object) -> bool:
    """An event ID that `_string_ref` accepts, by a shorter road: short
    enough that its UTF-8 cannot pass the byte limit, so nothing is encoded."""
    return (
        type(ref) is str
        and len(ref) <= MAX_ID_BYTES // 4
        and ref.startswith("$")
        and "\x00" not in ref
    )


def _string_ref(index: int, field: str, ref: object) -> str:
    if type(ref) is not str:
        raise InvalidEvent(index, field, f"must be an event ID string, not {_json_type(ref)}")
    _check_id(index, field, ref, sigil="$")
    return ref


def _pair_ref(index: int, field: str, ref: object) -> str:
    # Room versions 1-2: [event_id, {"sha256": reference hash}].
    if type(ref) is not list or len(ref) != 2 or type(ref[1]) is not dict:
        problem = "must be an [event_id, {hashes}] pair in this room version"
        raise InvalidEvent(index, field, problem)
    return _string_ref(index, f"{field}[0]", ref[0])


def _event_id(index: int, pdu: JsonDict, version: RoomVersion) -> str:
    if version.pdu_carries_event_id:
        event_id = _required_str(index, pdu, "event_id")
        _check_id(index, "pdu.event_id", event_id, sigil="$")
        return event_id
    try:
        return reference_hash_event_id_trusted(pdu, version)
    except ValueError as exc:  # CanonicalJsonError, or an unredactable event
        raise InvalidEvent(index, "pdu", f"has no reference hash: {exc}") from None


def _room_id(
    index: int,
    pdu: JsonDict,
    event_type: str,
    event_id: str,
    version: RoomVersion,
    path_room_id: str,
) -> str:
    if version.room_id_from_create_event and event_type == _CREATE:
        return _derived_room_id(index, pdu, event_id, path_room_id)
    room_id = _required_str(index, pdu, "room_id")
    _check_id(index, "pdu.room_id", room_id, sigil="!")
    if room_id != path_room_id:
        raise InvalidEvent(
            index,
            "pdu.room_id",
            f"is {_show(room_id)} but the request is for room {_show(path_room_id)}",
            errcode="M_INVALID_PARAM",
        )
    return room_id


def _derived_room_id(index: int, pdu: JsonDict, event_id: str, path_room_id: str) -> str:
    # Room version 12 (MSC4291): the create event names its room by its hash.
    if "room_id" in pdu:
        raise InvalidEvent(
            index, "pdu.room_id", "must be absent from a room version 12 m.room.create event"
        )
    room_id = "!" + event_id[1:]
    if room_id != path_room_id:
        raise InvalidEvent(
            index,
            "pdu",
            f"is the create event of room {room_id}, not of {_show(path_room_id)}",
            errcode="M_INVALID_PARAM",
        )
    return room_id


def _check_create_not_in_auth_events(index: int, room_id: str, auth_ids: tuple[str, ...]) -> None:
    create_event_id = "$" + room_id[1:]
    if create_event_id in auth_ids:
        raise InvalidEvent(
            index,
            "pdu.auth_events",
            f"must not list the create event {create_event_id} in room version 12",
        )


def _check_envelope(index: int, envelope: EventEnvelope, event_id: str) -> None:
    expected = envelope.event_id
    if expected is not None and expected != event_id:
        raise InvalidEvent(
            index,
            "event_id",
            f"is {_show(expected)} but the PDU's event ID is {event_id}",
            errcode="M_INVALID_PARAM",
        )
    reason = envelope.rejected_reason
    if reason is not None and (not reason or "\x00" in reason):
        raise InvalidEvent(index, "rejected_reason", "must be a non-empty string without U+0000")


# --- small helpers ---------------------------------------------------------


def _required_str(index: int, pdu: JsonDict, key: str) -> str:
    value = pdu.get(key, _MISSING)
    if value is _MISSING:
        raise InvalidEvent(index, f"pdu.{key}", "is required")
    if type(value) is not str:
        raise InvalidEvent(index, f"pdu.{key}", f"must be a string, not {_json_type(value)}")
    return value


def _required_int(index: int, pdu: JsonDict, key: str, low: int, high: int) -> int:
    value = pdu.get(key, _MISSING)
    if value is _MISSING:
        raise InvalidEvent(index, f"pdu.{key}", "is required")
    if type(value) is not int:  # `type`, not isinstance: JSON true is not 1
        raise InvalidEvent(index, f"pdu.{key}", f"must be an integer, not {_json_type(value)}")
    if not low <= value <= high:
        raise InvalidEvent(index, f"pdu.{key}", f"must lie in [{low}, {high}]")
    return value


def _check_id(index: int, field: str, value: str, sigil: str | None = None) -> None:
    # 63 characters encode to at most 252 UTF-8 bytes: skip the encode then.
    if len(value) > MAX_ID_BYTES // 4 and len(value.encode("utf-8")) > MAX_ID_BYTES:
        raise InvalidEvent(index, field, f"must be at most {MAX_ID_BYTES} bytes of UTF-8")
    if sigil is not None and not value.startswith(sigil):
        raise InvalidEvent(index, field, f"must start with {sigil!r}")
    if "\x00" in value:
        raise InvalidEvent(index, field, "must not contain U+0000")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", str: "a string", list: "an array"}
    return names.get(type(value), "an object")


def _pdu_field(path: str | None) -> str:
    return "pdu" if not path else f"pdu.{path[:200]}"


def _show(value: str) -> str:
    return repr(value if len(value) <= 100 else value[:100] + "...")
