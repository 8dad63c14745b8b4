"""Hypothesis strategies for persist requests, valid and hostile.

Three sources, mixed by `persist_requests()`:

- `schema_requests`: JSON drawn from the PersistRequest schema of the
  OpenAPI document (`persister.http.openapi`), the document a client would
  fuzz from; string fields the schema leaves open get values that reach the
  Matrix checks (room versions, user IDs, event IDs) as well as any text.
- `valid_requests`: well-formed requests of 1-3 events built with
  `build_pdu` in any room version, every input drawn by hypothesis (so a
  failure replays exactly).
- mutations of those: changed, removed or retyped fields at every level,
  then byte-level damage to the encoded body (truncation, stray bytes,
  floats, huge numbers, surrogates, NULs, deep nesting, duplicate keys),
  and odd paths and headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import msgspec
from hypothesis import strategies as st

from persister.http.openapi import openapi_document
from persister.matrix.builder import build_pdu
from persister.matrix.canonical_json import CANONICAL_INT_MAX, CANONICAL_INT_MIN
from persister.matrix.room_versions import KNOWN_ROOM_VERSIONS
from tests.fixtures.persister import SECRET

VERSIONS = sorted(KNOWN_ROOM_VERSIONS, key=int)
PDU_KEYS = (
    "type", "sender", "room_id", "state_key", "content", "depth", "origin_server_ts",
    "prev_events", "auth_events", "hashes", "signatures", "unsigned", "event_id", "redacts",
)  # fmt: skip
ENVELOPE_KEYS = ("pdu", "event_id", "outlier", "rejected_reason")
REQUEST_KEYS = ("room_version", "events", "backfilled")
GOOD_HEADERS = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}


@dataclass(frozen=True)
class FuzzRequest:
    source: str  # which strategy made it (for the statistics)
    path: str
    headers: dict[str, str]
    body: bytes
    # A request the persister must accept (200), as built, or None if unknown.
    valid: bool = False

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return (
            f"FuzzRequest({self.source!r}, path={self.path!r}, headers={self.headers!r}, "
            f"body={self.body[:2000]!r}{'...' if len(self.body) > 2000 else ''})"
        )


def room_of(version: str) -> str:
    # One room per version: a room's version cannot change once stored.
    return f"!fuzz-v{version}:example.org"


def events_path(room_id: str) -> str:
    return f"/_persist/v1/rooms/{quote(room_id, safe='')}/events"


# --- JSON values ------------------------------------------------------------


# True about one time in `n`. (Not `integers(0, n - 1) == 0`: hypothesis
# draws the simplest value, 0, far more often than one time in n.)
def rarely(n: int) -> st.SearchStrategy[bool]:
    return st.sampled_from((False,) * (n - 1) + (True,))


canonical_ints = st.integers(CANONICAL_INT_MIN, CANONICAL_INT_MAX)
# msgspec encodes integers in [-2**63, 2**64 - 1]; bigger ones come from the
# byte-level mutations.
wide_ints = st.integers(-(2**63), 2**64 - 1)
short_text = st.text(max_size=12)


def json_values(*, strict: bool = False, max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON; `strict`: only what canonical JSON allows (no floats, no big ints)."""
    leaves: list[st.SearchStrategy[Any]] = [st.none(), st.booleans(), canonical_ints, short_text]
    if not strict:
        leaves += [wide_ints, st.floats(allow_nan=False, allow_infinity=False)]
    return st.recursive(
        st.one_of(leaves),
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(short_text, children, max_size=4)
        ),
        max_leaves=max_leaves,
    )


content_values = st.dictionaries(short_text, json_values(strict=True), max_size=4)


# --- from the OpenAPI schema ----------------------------------------------

# Where the schema says only "string", draw values that reach deeper checks too.
_STRING_HINTS: dict[str, st.SearchStrategy[Any]] = {
    "room_version": st.one_of(st.sampled_from(VERSIONS), short_text),
    "event_id": st.one_of(st.just("$abc:example.org"), short_text),
    "rejected_reason": st.one_of(st.just("auth_error"), short_text),
}
_PDU_HINTS: dict[str, st.SearchStrategy[Any]] = {
    "type": st.one_of(st.just("m.room.message"), short_text),
    "sender": st.one_of(st.just("@fuzz:example.org"), short_text),
    "room_id": st.sampled_from([room_of(v) for v in VERSIONS]),
    "content": content_values,
    "depth": st.one_of(st.integers(0, 100), json_values()),
    "origin_server_ts": st.one_of(canonical_ints, json_values()),
    "prev_events": st.lists(st.one_of(st.just("$p:example.org"), short_text), max_size=3),
    "auth_events": st.lists(st.one_of(st.just("$a:example.org"), json_values()), max_size=3),
}


def from_schema(
    schema: dict[str, Any], components: dict[str, Any], name: str = ""
) -> st.SearchStrategy[Any]:
    """JSON values valid for the subset of JSON Schema that msgspec emits."""
    if "$ref" in schema:
        target = components[schema["$ref"].rsplit("/", 1)[1]]
        return st.deferred(lambda: from_schema(target, components, name))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, components, name) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "object":
        return _object_from_schema(schema, components)
    if kind == "array":
        return st.lists(from_schema(schema["items"], components), min_size=1, max_size=3)
    if kind == "string":
        return _STRING_HINTS.get(name, short_text)
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return canonical_ints
    if kind == "null":
        return st.none()
    return json_values()  # {}: anything


def _object_from_schema(
    schema: dict[str, Any], components: dict[str, Any]
) -> st.SearchStrategy[dict[str, Any]]:
    properties: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", ()))
    if not properties:  # the PDU: its required keys, with likely values
        keys = {k: _PDU_HINTS.get(k, json_values()) for k in schema.get("required", ())}
        extra = st.dictionaries(st.sampled_from(PDU_KEYS), json_values(), max_size=3)
        return st.builds(lambda fixed, more: {**more, **fixed}, st.fixed_dictionaries(keys), extra)
    return st.fixed_dictionaries(
        {k: from_schema(v, components, k) for k, v in properties.items() if k in required},
        optional={
            k: from_schema(v, components, k) for k, v in properties.items() if k not in required
        },
    )


_COMPONENTS = openapi_document()["components"]["schemas"]
_SCHEMA_BODIES = from_schema(_COMPONENTS["PersistRequest"], _COMPONENTS)


@st.composite
def schema_requests(draw: st.DrawFn) -> FuzzRequest:
    body = draw(_SCHEMA_BODIES)
    version = body["room_version"]
    room_id = room_of(version) if version in KNOWN_ROOM_VERSIONS else room_of("10")
    return FuzzRequest("schema", events_path(room_id), dict(GOOD_HEADERS), _encode(body))


# --- valid requests -----------------------------------------------------------

identifiers = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
                      max_size=12)  # fmt: skip


@st.composite
def valid_bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """(room_id, request) for a request that the persister must accept."""
    version = draw(st.sampled_from(VERSIONS))
    room_id = room_of(version)
    earlier: list[str] = []
    envelopes = []
    for _ in range(draw(st.integers(1, 3))):
        state_key = draw(st.one_of(st.none(), identifiers))
        refs = st.one_of(st.sampled_from(earlier), st.just("$gone:example.org")) if earlier \
            else st.just("$gone:example.org")  # fmt: skip
        event_id, pdu = build_pdu(
            version,
            room_id,
            "@" + draw(identifiers).replace(":", "") + ":example.org",
            draw(st.one_of(st.just("m.room.message"), st.just("m.room.member"), identifiers)),
            draw(content_values),
            draw(st.lists(refs, max_size=3)),
            draw(st.lists(st.just("$auth:example.org"), max_size=2)),
            draw(st.integers(0, 1000)),
            state_key=state_key,
            origin_server_ts=draw(st.integers(0, 2**42)),
            # Chosen IDs (v1, v2) name the version: an ID stored in another room is refused.
            event_id=f"${draw(identifiers)}:v{version}.example.org" if version in "1 2" else None,
        )
        earlier.append(event_id)
        envelope: dict[str, Any] = {"pdu": pdu}
        if draw(st.booleans()):
            envelope["event_id"] = event_id
        if draw(rarely(5)):
            envelope["outlier"] = True
        if draw(rarely(5)):
            envelope["rejected_reason"] = draw(identifiers)
        envelopes.append(envelope)
    request: dict[str, Any] = {"room_version": version, "events": envelopes}
    if draw(rarely(5)):
        request["backfilled"] = True
    return room_id, request


@st.composite
def valid_requests(draw: st.DrawFn) -> FuzzRequest:
    room_id, body = draw(valid_bodies())
    return FuzzRequest("valid", events_path(room_id), dict(GOOD_HEADERS), _encode(body), True)


# --- mutations ----------------------------------------------------------------


@st.composite
def _structural_mutation(draw: st.DrawFn, body: dict[str, Any]) -> None:
    # Earlier mutations may have removed or retyped anything.
    events = body.get("events")
    if not isinstance(events, list):
        events = []
    i = draw(st.integers(0, len(events) - 1)) if events else 0
    envelope = events[i] if events and isinstance(events[i], dict) else None
    pdu = envelope.get("pdu") if envelope is not None else None
    level = draw(st.sampled_from(["pdu", "pdu", "envelope", "request"]))
    if level == "pdu" and isinstance(pdu, dict):
        _mutate_pdu(draw, pdu)
    elif level == "envelope" and envelope is not None:
        _mutate_envelope(draw, envelope)
    else:
        _mutate_request(draw, body, events, i)


def _mutate_pdu(draw: st.DrawFn, pdu: dict[str, Any]) -> None:
    kind = draw(st.sampled_from(["set-field", "del-field", "set-content"]))
    if kind == "del-field" and pdu:
        pdu.pop(draw(st.sampled_from(sorted(pdu))))
    elif kind == "set-content" and isinstance(pdu.get("content"), dict):
        pdu["content"][draw(short_text)] = draw(json_values())
    else:
        pdu[draw(st.one_of(st.sampled_from(PDU_KEYS), short_text))] = draw(json_values())


def _mutate_envelope(draw: st.DrawFn, envelope: dict[str, Any]) -> None:
    kind = draw(st.sampled_from(["set-field", "del-field", "replace-pdu"]))
    if kind == "del-field" and envelope:
        envelope.pop(draw(st.sampled_from(sorted(envelope))))
    elif kind == "replace-pdu":
        envelope["pdu"] = draw(json_values())
    else:
        key = draw(st.one_of(st.sampled_from(ENVELOPE_KEYS), short_text))
        envelope[key] = draw(json_values())


def _mutate_request(draw: st.DrawFn, body: dict[str, Any], events: list[Any], i: int) -> None:
    kind = draw(st.sampled_from(["set-field", "del-field", "drop-event", "repeat-event"]))
    if kind == "del-field":
        body.pop(draw(st.sampled_from(REQUEST_KEYS)), None)
    elif kind == "drop-event" and events:
        events.pop(i)
    elif kind == "repeat-event" and events:
        events.insert(i, events[i])
    else:
        body[draw(st.one_of(st.sampled_from(REQUEST_KEYS), short_text))] = draw(json_values())


# Fragments spliced into the encoded body at a random offset.
SPLICES = [
    b"1.5", b"-0.0", b"1e400", b"NaN", b"Infinity", b"9" * 40, b"-" + b"9" * 5000,
    b"\\ud800", b"\\udc00", b'"\\ud800"', b"\\u0000", b'"\\u0000"', b"\x00", b"\xff",
    b"\xc0\xaf", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"[" * 3000, b"{" * 50, b"]", b"}", b'"',
    b"\\", b",", b":", b'"depth":1,', b'"depth":"1",', b'"room_version":"10",', b"null",
    b'"events":[],', b'"pdu":{},', b"true", b" \t\r\n",
]  # fmt: skip


@st.composite
def _byte_mutation(draw: st.DrawFn, body: bytes) -> bytes:
    at = draw(st.integers(0, len(body)))
    kind = draw(st.sampled_from(["truncate", "splice", "delete", "flip", "random-bytes"]))
    if kind == "truncate":
        return body[:at]
    if kind == "splice":
        return body[:at] + draw(st.sampled_from(SPLICES)) + body[at:]
    if kind == "delete":
        return body[:at] + body[at + draw(st.integers(1, 8)) :]
    if kind == "flip" and at < len(body):
        return body[:at] + bytes([body[at] ^ (1 << draw(st.integers(0, 7)))]) + body[at + 1 :]
    return body[:at] + draw(st.binary(min_size=1, max_size=8)) + body[at:]


_ODD_PATHS = [
    "!other:example.org", "!fuzz-v10:example.org/x", "\x00", "!fuzz-v10:example.org\x00",
    "%21fuzz-v10%3Aexample.org", "", " ", "!" + "r" * 300 + ":example.org", "\u00e9\u2603",
]  # fmt: skip
_ODD_AUTH = [None, "Bearer", "Bearer wrong", f"Basic {SECRET}", f"bearer {SECRET}",
             f"Bearer  {SECRET} ", f"Bearer {SECRET}x", "Bearer \u00e9"]  # fmt: skip
_ODD_TYPES = [
    None,
    "text/plain",
    "application/json; charset=utf-8",
    "application/json; x=y",
    "application/jsonx",
    "application/json; charset=latin-1",
    "*/*",
    "APPLICATION/JSON",
]


@st.composite
def mutated_requests(draw: st.DrawFn) -> FuzzRequest:
    room_id, body = draw(valid_bodies())
    for _ in range(draw(st.integers(0, 3))):
        draw(_structural_mutation(body))
    raw = _encode(body)
    for _ in range(draw(st.integers(0, 2))):
        raw = draw(_byte_mutation(raw))
    path = events_path(room_id)
    if draw(rarely(10)):
        path = events_path(draw(st.one_of(st.sampled_from(_ODD_PATHS), short_text)))
    headers = dict(GOOD_HEADERS)
    if draw(rarely(10)):
        auth = draw(st.sampled_from(_ODD_AUTH))
        headers.pop("Authorization")
        if auth is not None:
            headers["Authorization"] = auth
    if draw(rarely(10)):
        content_type = draw(st.sampled_from(_ODD_TYPES))
        headers.pop("Content-Type")
        if content_type is not None:
            headers["Content-Type"] = content_type
    return FuzzRequest("mutated", path, headers, raw)


def persist_requests() -> st.SearchStrategy[FuzzRequest]:
    return st.one_of(schema_requests(), valid_requests(), mutated_requests(), mutated_requests())


def _encode(body: Any) -> bytes:
    return msgspec.json.encode(body)
