"""Hostile input to the persist API: a clear 4xx naming the problem, never a
500, never a hang, nothing written (issue 7, item 5).

Each row of `CASES` is one specification: what the request is, the request
itself, and the answer the persister gives. Requests go over a raw socket
byte for byte as written here (no client library tidies them up). One
persister, with the production HTTP limits, serves the whole table; every
case snapshots all the data tables (row counts and a checksum of every row)
before and after, in a room that already holds an event.

Answers come from two places. Everything the app sees is answered with JSON
`{"errcode", "error"}`. A request that aiohttp's HTTP parser refuses before
any handler runs (an over-long header line, too many headers, broken
framing, an unsupported Content-Encoding) gets aiohttp's plain-text 400:
`errcode` is None in those rows.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg
import pytest
import pytest_asyncio

from persister.devservices import Services
from persister.matrix.builder import build_pdu
from persister.matrix.pdu import MAX_PDU_BYTES
from tests.fixtures.db import Maintenance
from tests.fixtures.persister import RoomBuilder, events_path
from tests.integration.hostile import (
    MAX_BODY,
    MAX_EVENTS,
    TEST_BODY_TIMEOUT_S,
    TEST_KEEPALIVE_S,
    Endpoint,
    auth_headers,
    cloned_database,
    exchange,
    read_answer,
    request_bytes,
    row_counts,
    running_writer,
    served,
    snapshot,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOM = "!room:example.org"
PATH = events_path(ROOM)
JSON = auth_headers()


# --- building requests -------------------------------------------------------


class Room:
    """The next valid event of the table's room, to be spoiled by a case."""

    def __init__(self, builder: RoomBuilder) -> None:
        self.builder = builder

    def pdu(self, **fields: Any) -> dict[str, Any]:
        _, pdu = self.builder.event(advance=False)
        return pdu | fields

    def raw(self, **fields: Any) -> bytes:
        return msgspec.json.encode(self.pdu(**fields))

    def with_member(self, member: bytes) -> bytes:
        """The PDU with one more top-level member, written as given.

        Written last, so for a key the PDU already has it is a duplicate
        key whose value wins (the README's decision: the last one wins).
        """
        return self.raw()[:-1] + b"," + member + b"}"

    def with_content(self, member: bytes) -> bytes:
        """The PDU with one more member in `content`, written as given."""
        return self.raw().replace(b'"content":{', b'"content":{' + member + b",", 1)


def request(pdu: bytes, *, room_version: bytes = b'"10"', envelope: bytes = b"") -> bytes:
    """A persist request body holding one event, spliced together as bytes."""
    return b'{"room_version":' + room_version + b',"events":[{"pdu":' + pdu + envelope + b"}]}"


def persist(
    body: bytes,
    headers: dict[str, str] | None = None,
    *,
    path: str | bytes = PATH,
    content_length: int | None = None,
    extra_head: bytes = b"",
) -> bytes:
    return request_bytes(
        path,
        body,
        JSON if headers is None else headers,
        content_length=content_length,
        extra_head=extra_head,
    )


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def other_room_pdu(room_version: str, room_id: str, **fields: Any) -> bytes:
    _, pdu = build_pdu(
        room_version, room_id, "@alice:example.org", "m.room.message",
        {"msgtype": "m.text", "body": "hi"}, [], [], 1,
    )  # fmt: skip
    return msgspec.json.encode(pdu | fields)


def chunked(body: bytes, chunk: int = 64 * 1024) -> bytes:
    parts = [
        b"%x\r\n" % len(body[i : i + chunk]) + body[i : i + chunk] + b"\r\n"
        for i in range(0, len(body), chunk)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


def gzip_bomb(size: int) -> bytes:
    """A few KB of gzip that inflate to `size` bytes of a JSON string."""
    return gzip.compress(b'{"room_version":"' + b"a" * size + b'"}', 9)


def many_headers(count: int) -> bytes:
    return b"".join(b"X-Filler-%d: x\r\n" % i for i in range(count))


# --- the table ---------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    spec: str
    request: Callable[[Room], bytes]
    status: int
    # None: aiohttp's HTTP parser answers, in plain text, before any handler.
    errcode: str | None
    # The answer's error names the problem with these words.
    says: str
    # The client stalls after sending `request`: answered within this many seconds.
    stalls: float | None = None


CASES = [
    # -- not JSON at all
    Case("empty-body", "An empty body is not JSON.",
         lambda r: persist(b""), 400, "M_NOT_JSON", "not valid JSON"),
    Case("body-array", "The body is a JSON object; an array is refused.",
         lambda r: persist(b"[]"), 400, "M_BAD_JSON", "Expected `object`, got `array`"),
    Case("body-string", "The body is a JSON object; a string is refused.",
         lambda r: persist(b'"events"'), 400, "M_BAD_JSON", "Expected `object`, got `str`"),
    Case("body-number", "The body is a JSON object; a number is refused.",
         lambda r: persist(b"10"), 400, "M_BAD_JSON", "Expected `object`, got `int`"),
    Case("body-null", "The body is a JSON object; null is refused.",
         lambda r: persist(b"null"), 400, "M_BAD_JSON", "Expected `object`, got `null`"),
    Case("truncated-json", "A body cut off mid-object is not JSON.",
         lambda r: persist(request(r.raw())[:-7]), 400, "M_NOT_JSON", "truncated"),
    Case("trailing-garbage", "Bytes after the JSON object make the body invalid.",
         lambda r: persist(request(r.raw()) + b"{}"), 400, "M_NOT_JSON", "trailing characters"),
    Case("utf8-bom", "A UTF-8 byte order mark is not JSON (RFC 8259 forbids sending one).",
         lambda r: persist(b"\xef\xbb\xbf" + request(r.raw())), 400, "M_NOT_JSON",
         "invalid character"),
    Case("utf16-body", "JSON is UTF-8; a UTF-16 body is refused.",
         lambda r: persist(request(r.raw()).decode().encode("utf-16")), 400, "M_NOT_JSON",
         "request body is not UTF-8"),
    # -- invalid UTF-8
    Case("invalid-utf8-in-pdu", "Invalid UTF-8 inside a PDU string names the event.",
         lambda r: persist(request(r.with_content(b'"x":"a\xff\xfeb"'))), 400, "M_NOT_JSON",
         "events[0].pdu: is not UTF-8"),
    Case("invalid-utf8-in-envelope", "Invalid UTF-8 in a request field outside the PDUs.",
         lambda r: persist(request(r.raw(), room_version=b'"1\xff0"')), 400, "M_NOT_JSON",
         "request body is not UTF-8"),
    Case("invalid-utf8-in-key", "Invalid UTF-8 in an object key of the request.",
         lambda r: persist(b'{"\xc3":1}'), 400, "M_NOT_JSON", "not UTF-8"),
    Case("overlong-utf8", "An overlong UTF-8 encoding ('/' as C0 AF) is invalid UTF-8.",
         lambda r: persist(request(r.with_content(b'"x":"\xc0\xaf"'))), 400, "M_NOT_JSON",
         "is not UTF-8"),
    # -- lone surrogates: no canonical JSON, so no event ID, exists for them
    Case("lone-high-surrogate-in-content", "A lone \\ud800 escape in content is refused.",
         lambda r: persist(request(r.with_content(b'"x":"\\ud800"'))), 400, "M_NOT_JSON",
         "not valid JSON: JSON is malformed"),
    Case("lone-low-surrogate-in-sender", "A lone \\udc00 escape in the sender is refused.",
         lambda r: persist(request(r.with_member(b'"sender":"@\\udc00:example.org"'))), 400,
         "M_NOT_JSON", "surrogate"),
    Case("lone-surrogate-in-envelope", "A lone surrogate in rejected_reason is refused.",
         lambda r: persist(request(r.raw(), envelope=b',"rejected_reason":"\\ud800"')), 400,
         "M_NOT_JSON", "not valid JSON"),
    # -- NUL: PostgreSQL text cannot hold U+0000
    Case("raw-nul-byte-in-string", "A raw 0x00 byte inside a JSON string is invalid JSON.",
         lambda r: persist(request(r.with_content(b'"x":"a\x00b"'))), 400, "M_NOT_JSON",
         "invalid character"),
    Case("nul-in-sender", "U+0000 in the sender is refused, naming the field.",
         lambda r: persist(request(r.with_member(b'"sender":"@a\\u0000b:example.org"'))), 400,
         "M_BAD_JSON", "events[0].pdu.sender: must not contain U+0000"),
    Case("nul-in-type", "U+0000 in the event type is refused, naming the field.",
         lambda r: persist(request(r.with_member(b'"type":"m.room\\u0000.message"'))), 400,
         "M_BAD_JSON", "events[0].pdu.type: must not contain U+0000"),
    Case("nul-in-state-key", "U+0000 in the state key is refused, naming the field.",
         lambda r: persist(request(r.with_member(b'"state_key":"\\u0000"'))), 400,
         "M_BAD_JSON", "events[0].pdu.state_key: must not contain U+0000"),
    Case("nul-in-room-id", "U+0000 in the PDU's room_id is refused, naming the field.",
         lambda r: persist(request(r.with_member(b'"room_id":"!room\\u0000:example.org"'))),
         400, "M_BAD_JSON", "events[0].pdu.room_id: must not contain U+0000"),
    Case("nul-in-prev-event-id", "U+0000 in a prev_events ID is refused, naming the entry.",
         lambda r: persist(request(r.with_member(b'"prev_events":["$a\\u0000b"]'))), 400,
         "M_BAD_JSON", "events[0].pdu.prev_events[0]: must not contain U+0000"),
    Case("nul-in-rejected-reason", "U+0000 in rejected_reason is refused.",
         lambda r: persist(request(r.raw(), envelope=b',"rejected_reason":"a\\u0000"')), 400,
         "M_BAD_JSON", "events[0].rejected_reason"),
    Case("nul-in-room-version", "A room version holding U+0000 is an unknown room version.",
         lambda r: persist(request(r.raw(), room_version=b'"1\\u00000"')), 400,
         "M_UNSUPPORTED_ROOM_VERSION", "unsupported room version"),
    Case("nul-in-path-room-id", "A %00 in the path's room ID does not match the PDU's room.",
         lambda r: persist(request(r.raw()), path="/_persist/v1/rooms/%21room%00/events"),
         400, "M_INVALID_PARAM", "but the request is for room"),
    # -- nesting
    Case("deep-nesting-in-content", "10,000 nested arrays in content: nested too deeply.",
         lambda r: persist(request(r.with_content(b'"x":' + nested(10_000)))), 400,
         "M_BAD_JSON", "nested too deeply"),
    Case("deep-nesting-as-pdu", "A PDU that is 10,000 nested arrays: nested too deeply.",
         lambda r: persist(request(nested(10_000))), 400, "M_BAD_JSON", "nested too deeply"),
    Case("deep-nesting-in-envelope", "Deep arrays where the envelope wants an event ID.",
         lambda r: persist(request(r.raw(), envelope=b',"event_id":' + nested(10_000))), 400,
         "M_BAD_JSON", "at `$.events[0].event_id`"),
    Case("deep-nesting-as-events", "Deep arrays where the request wants its events.",
         lambda r: persist(b'{"room_version":"10","events":' + nested(10_000) + b"}"), 400,
         "M_BAD_JSON", "at `$.events[0]`"),
    # -- numbers
    Case("huge-integer-depth", "A 5,000-digit depth is out of range.",
         lambda r: persist(request(r.with_member(b'"depth":' + b"9" * 5000))), 400,
         "M_NOT_JSON", "out of range"),
    Case("huge-integer-in-content", "A 5,000-digit integer in content is out of range.",
         lambda r: persist(request(r.with_content(b'"n":-' + b"9" * 5000))), 400,
         "M_NOT_JSON", "out of range"),
    Case("integer-over-2-53-in-content", "From room version 6 integers stay within 2**53.",
         lambda r: persist(request(r.with_content(b'"n":9007199254740992'))), 400,
         "M_BAD_JSON", "events[0].pdu.content.n: integers must lie in"),
    Case("depth-over-bigint", "Room version 5 allows big integers, but depth is a BIGINT.",
         lambda r: persist(
             request(other_room_pdu("5", "!v5:example.org", depth=2**63), room_version=b'"5"'),
             path=events_path("!v5:example.org")),
         400, "M_BAD_JSON", "events[0].pdu.depth: must lie in [0, 9223372036854775807]"),
    Case("negative-depth", "A negative depth is refused.",
         lambda r: persist(request(r.with_member(b'"depth":-1'))), 400, "M_BAD_JSON",
         "events[0].pdu.depth: must lie in"),
    Case("huge-integer-in-envelope", "A 5,000-digit number where the envelope wants a boolean.",
         lambda r: persist(b'{"room_version":"10","backfilled":' + b"9" * 5000 + b',"events":[]}'),
         400, "M_BAD_JSON", "out of range"),
    # -- floats: canonical JSON has none, in any room version
    Case("float-in-content", "A float in content is refused, naming where it is.",
         lambda r: persist(request(r.with_content(b'"f":1.5'))), 400, "M_BAD_JSON",
         "events[0].pdu.content.f: floats are not allowed"),
    Case("float-depth", "A float depth is refused, naming the field.",
         lambda r: persist(request(r.with_member(b'"depth":2.0'))), 400, "M_BAD_JSON",
         "events[0].pdu.depth: floats are not allowed"),
    Case("float-overflowing", "1e400 (no finite double) is still a float, and refused.",
         lambda r: persist(request(r.with_content(b'"f":1e400'))), 400, "M_BAD_JSON",
         "floats are not allowed in Matrix events (found 1e400)"),
    Case("float-in-room-version-1", "Floats are refused in room version 1 too.",
         lambda r: persist(
             request(other_room_pdu("1", "!v1:example.org", content={"f": 0.5}),
                     room_version=b'"1"'),
             path=events_path("!v1:example.org")),
         400, "M_BAD_JSON", "events[0].pdu.content.f: floats are not allowed"),
    Case("nan-literal", "NaN is not JSON.",
         lambda r: persist(request(r.with_content(b'"f":NaN'))), 400, "M_NOT_JSON",
         "not valid JSON"),
    Case("float-in-envelope", "1.0 where the envelope wants a boolean.",
         lambda r: persist(request(r.raw(), envelope=b',"outlier":1.0')), 400, "M_BAD_JSON",
         "Expected `bool`, got `float`"),
    # -- duplicate keys: the last one wins, and is checked
    Case("duplicate-key-last-invalid", "Of two depths, the last counts: a string, refused.",
         lambda r: persist(request(r.with_member(b'"depth":"deep"'))), 400, "M_BAD_JSON",
         "events[0].pdu.depth: must be an integer, not a string"),
    Case("duplicate-room-version", "Of two room versions, the last counts: '99', unknown.",
         lambda r: persist(request(r.raw(), room_version=b'"10","room_version":"99"')), 400,
         "M_UNSUPPORTED_ROOM_VERSION", "'99'"),
    # -- the request's shape
    Case("no-events", "A request carries at least one event.",
         lambda r: persist(b'{"room_version":"10","events":[]}'), 400, "M_INVALID_PARAM",
         "events: at least one event is required"),
    Case("unknown-envelope-field", "Unknown envelope fields are refused, by name.",
         lambda r: persist(request(r.raw(), envelope=b',"extra":1')), 400, "M_BAD_JSON",
         "unknown field `extra`"),
    Case("pdu-not-an-object", "A PDU is a JSON object.",
         lambda r: persist(request(b'"$event"')), 400, "M_BAD_JSON",
         "events[0].pdu: must be a JSON object, not a string"),
    Case("room-version-as-integer", "The room version is a string.",
         lambda r: persist(request(r.raw(), room_version=b"10")), 400, "M_BAD_JSON",
         "Expected `str`, got `int` - at `$.room_version`"),
    Case("unknown-room-version", "An unknown room version is refused.",
         lambda r: persist(request(r.raw(), room_version=b'"13"')), 400,
         "M_UNSUPPORTED_ROOM_VERSION", "unsupported room version '13'"),
    Case("event-id-not-its-hash", "The envelope's event_id must be the PDU's reference hash.",
         lambda r: persist(request(r.raw(), envelope=b',"event_id":"$forged"')), 400,
         "M_INVALID_PARAM", "events[0].event_id: is '$forged' but the PDU's event ID is"),
    Case("identifier-over-255-bytes", "Identifiers are at most 255 bytes.",
         lambda r: persist(request(r.raw(sender="@" + "a" * 300 + ":example.org"))), 400,
         "M_BAD_JSON", "events[0].pdu.sender: must be at most 255 bytes"),
    Case("too-many-prev-events", "At most 20 prev_events.",
         lambda r: persist(request(r.raw(prev_events=[f"$e{i}" for i in range(21)]))), 400,
         "M_BAD_JSON", "events[0].pdu.prev_events: lists 21 events; at most 20"),
    Case("good-event-then-bad", "One bad event refuses the whole request, naming it.",
         lambda r: persist(
             b'{"room_version":"10","events":[{"pdu":' + r.raw() + b'},{"pdu":'
             + r.with_member(b'"depth":"x"') + b"}]}"),
         400, "M_BAD_JSON", "events[1].pdu.depth"),
    Case("event-over-65536-bytes", "An event over 65,536 bytes of canonical JSON.",
         lambda r: persist(request(r.raw(content={"body": "x" * MAX_PDU_BYTES}))), 400,
         "M_TOO_LARGE", "bytes as canonical JSON; the limit is 65536"),
    Case("ten-thousand-tiny-events", "10,000 events in one request: over the per-request cap.",
         lambda r: persist(
             b'{"room_version":"10","events":[' + b",".join([b'{"pdu":{}}'] * 10_000) + b"]}"),
         400, "M_TOO_LARGE", f"10000 events is over the limit of {MAX_EVENTS}"),
    # -- the path's room ID
    Case("room-mismatch", "The PDU's room_id must be the path's room.",
         lambda r: persist(request(r.raw()), path=events_path("!other:example.org")), 400,
         "M_INVALID_PARAM", "is '!room:example.org' but the request is for room '!other"),
    Case("encoded-slash-in-room-id", "%2F in the path is part of the room ID, not a separator.",
         lambda r: persist(request(r.raw()), path=events_path(ROOM + "/../x")), 400,
         "M_INVALID_PARAM", "the request is for room '!room:example.org/../x'"),
    Case("bare-slash-in-room-id", "An unencoded / leaves the path matching no route.",
         lambda r: persist(request(r.raw()), path="/_persist/v1/rooms/!room/x:example.org/events"),
         404, "M_UNRECOGNIZED", "Not Found"),
    Case("invalid-percent-encoding", "%FF decodes to no UTF-8: it cannot be the PDU's room.",
         lambda r: persist(request(r.raw()), path="/_persist/v1/rooms/%21room%FF/events"), 400,
         "M_INVALID_PARAM", "the request is for room"),
    Case("double-percent-encoding", "%2521 is '%21', not '!': a different room.",
         lambda r: persist(request(r.raw()), path=PATH.replace("%21", "%2521")), 400,
         "M_INVALID_PARAM", "the request is for room '%21room"),
    Case("wrong-method", "The persist path takes POST only.",
         lambda r: request_bytes(PATH, b"", JSON, method="PUT"), 405, "M_UNRECOGNIZED",
         "Method Not Allowed"),
    # -- encoding
    Case("gzip-garbage", "Content-Encoding: gzip on a body that is not gzip.",
         lambda r: persist(request(r.raw()), JSON | {"Content-Encoding": "gzip"}), 400,
         "M_BAD_JSON", "request body cannot be read"),
    Case("gzip-bomb", "3 KB of gzip that inflate past the body limit: refused at the limit.",
         lambda r: persist(gzip_bomb(8 * MAX_BODY), JSON | {"Content-Encoding": "gzip"}), 413,
         "M_TOO_LARGE", f"over the limit of {MAX_BODY} bytes"),
    Case("unsupported-content-encoding", "An encoding the server cannot decode (brotli).",
         lambda r: persist(request(r.raw()), JSON | {"Content-Encoding": "br"}), 400, None,
         "Can not decode content-encoding"),
    # -- size and framing
    Case("content-length-over-limit", "A declared length over the limit is refused unread.",
         lambda r: persist(b"", content_length=MAX_BODY + 1), 413, "M_TOO_LARGE",
         f"request body of {MAX_BODY + 1} bytes is over the limit"),
    Case("chunked-body-over-limit", "A chunked body is cut off at the limit.",
         lambda r: persist(chunked(b" " * (MAX_BODY + 10)), content_length=-1,
                           extra_head=b"Transfer-Encoding: chunked\r\n"),
         413, "M_TOO_LARGE", f"over the limit of {MAX_BODY} bytes"),
    Case("slow-loris-body", "A body that stops short of its Content-Length times out.",
         lambda r: persist(request(r.raw()), content_length=len(request(r.raw())) + 100), 408,
         "M_REQUEST_TIMEOUT", f"not received within {TEST_BODY_TIMEOUT_S:g} s",
         stalls=TEST_BODY_TIMEOUT_S),
    Case("broken-chunk-size", "A chunk size that is not hex breaks the framing.",
         lambda r: persist(b"zz\r\n{}\r\n0\r\n\r\n", content_length=-1,
                           extra_head=b"Transfer-Encoding: chunked\r\n"),
         400, None, "chunk"),
    Case("content-length-and-chunked", "Content-Length with chunked framing (smuggling).",
         lambda r: persist(chunked(request(r.raw())), content_length=5,
                           extra_head=b"Transfer-Encoding: chunked\r\n"),
         400, None, "Transfer-Encoding can't be present with Content-Length"),
    Case("two-content-lengths", "Two different Content-Lengths (smuggling).",
         lambda r: persist(request(r.raw()), extra_head=b"Content-Length: 3\r\n"), 400, None,
         "Content-Length"),
    Case("header-over-8190-bytes", "One header line over 8190 bytes.",
         lambda r: persist(request(r.raw()), JSON | {"X-Big": "a" * 9000}), 400, None,
         "Got more than 8190 bytes"),
    Case("request-line-over-8190-bytes", "A request line (path) over 8190 bytes.",
         lambda r: persist(request(r.raw()), path=events_path("!" + "r" * 9000)), 400, None,
         "Got more than 8190 bytes"),
    Case("too-many-headers", "More than 128 header lines.",
         lambda r: persist(request(r.raw()), extra_head=many_headers(200)), 400, None,
         "Too many headers"),
    # -- the secret
    Case("no-secret", "No Authorization header: 401 before the body is read.",
         lambda r: persist(request(r.raw()), {"Content-Type": "application/json"}), 401,
         "M_MISSING_TOKEN", "missing Authorization"),
    Case("wrong-secret", "A wrong secret: 401.",
         lambda r: persist(request(r.raw()), {"Authorization": "Bearer nope",
                                              "Content-Type": "application/json"}),
         401, "M_UNKNOWN_TOKEN", "wrong replication secret"),
    Case("secret-with-raw-bytes", "A secret of raw non-ASCII bytes is simply wrong.",
         lambda r: persist(request(r.raw()), {"Authorization": "Bearer \xff\xfe",
                                              "Content-Type": "application/json"}),
         401, "M_UNKNOWN_TOKEN", "wrong replication secret"),
]  # fmt: skip


# --- one persister for the whole table ----------------------------------------


@pytest.fixture(scope="module")
def table_database(
    services: Services, maintenance: Maintenance, template_database: str
) -> Iterator[str]:
    with cloned_database(services, maintenance, template_database) as url:
        yield url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def table_persister(
    table_database: str, redis_url: str
) -> AsyncIterator[tuple[Endpoint, Room, psycopg.AsyncConnection[Any]]]:
    async with (
        running_writer(table_database, redis_url) as writer,
        served(writer) as server,
        await psycopg.AsyncConnection.connect(table_database, autocommit=True) as conn,
    ):
        builder = RoomBuilder(room_id=ROOM)
        _, first = builder.event()
        seeded = await exchange(server, persist(request(msgspec.json.encode(first))))
        assert seeded.status == 200, seeded.text
        yield server, Room(builder), conn


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_hostile_request_is_refused_clearly_and_writes_nothing(
    table_persister: tuple[Endpoint, Room, psycopg.AsyncConnection[Any]], case: Case
) -> None:
    server, room, conn = table_persister
    before = await snapshot(conn)
    answer = await exchange(server, case.request(room), timeout_s=10.0, check_closed=True)
    assert answer.status == case.status, f"{case.spec}: {answer.status} {answer.text[:300]}"
    if case.errcode is None:
        assert answer.headers["content-type"].startswith("text/plain")
        assert case.says in answer.text, answer.text
    else:
        assert answer.json is not None, f"not JSON: {answer.text[:300]}"
        assert answer.json["errcode"] == case.errcode, answer.json
        assert case.says in answer.json["error"], answer.json["error"]
    if case.stalls is not None:
        # Answered once the read timed out, not when the client gave up;
        # and the half-sent connection is dropped.
        assert case.stalls <= answer.seconds < case.stalls + 2.0
        assert answer.closed
    assert await snapshot(conn) == before, row_counts(await snapshot(conn))
    assert row_counts(before)["events"] >= 1  # the room is not empty


async def test_headers_that_never_end_are_cut_off_after_the_keepalive_timeout(
    table_persister: tuple[Endpoint, Room, psycopg.AsyncConnection[Any]],
) -> None:
    """A header slow loris: the request line and headers never finish arriving."""
    server, _, _ = table_persister
    head_only = b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Slow: "
    answer = await exchange(server, head_only, timeout_s=TEST_KEEPALIVE_S + 3)
    assert answer.status == 0 and answer.closed  # hung up without a word
    assert answer.seconds < TEST_KEEPALIVE_S + 2


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON",
     "application/json; charset=UTF-8", 'application/json;charset="utf8"', None, "text/plain",
     "application/x-www-form-urlencoded", "application/json; charset=latin-1"],
)  # fmt: skip
async def test_the_body_is_read_as_json_whatever_its_declared_content_type(
    table_persister: tuple[Endpoint, Room, psycopg.AsyncConnection[Any]],
    content_type: str | None,
) -> None:
    """As Synapse's replication endpoints: the contract's errors have no 415,
    and `curl -d` declares a form."""
    server, room, _ = table_persister
    answer = await exchange(server, persist(request(room.raw()), auth_headers(content_type)))
    assert answer.status == 200, answer.text


async def test_a_client_hanging_up_mid_body_is_no_server_error(
    table_persister: tuple[Endpoint, Room, psycopg.AsyncConnection[Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing is written and nothing is logged as an error (aiohttp logs an
    unhandled handler exception at ERROR, with a traceback, for each one)."""
    server, room, conn = table_persister
    before = await snapshot(conn)
    body = request(room.raw())
    caplog.set_level(logging.WARNING)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(persist(body, content_length=len(body) + 100))
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await asyncio.sleep(0.3)  # the server notices the hang-up
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert await snapshot(conn) == before


async def test_a_body_arriving_in_pieces_is_read_to_its_end(
    table_persister: tuple[Endpoint, Room, psycopg.AsyncConnection[Any]],
) -> None:
    """Regression: the body used to be read with one `read(n)`, which answers
    with whatever had arrived, so a body in several segments was cut short."""
    server, room, conn = table_persister
    raw = persist(request(room.raw()))
    half = len(raw) - 200  # well inside the body
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(raw[:half])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(raw[half:])
        await writer.drain()
        answer = await asyncio.wait_for(read_answer(reader), 10)
    finally:
        writer.close()
    assert answer.status == 200, answer.text
    room.builder.extremities = [answer.json["results"][0]["event_id"]]
    room.builder.depth += 1


# --- hostile-looking but legal: stored exactly as received --------------------


async def _stored_json(conn: psycopg.AsyncConnection[Any], event_id: str) -> tuple[str, str]:
    cur = await conn.execute(
        "SELECT room_id, json FROM event_json WHERE event_id = %s", (event_id,)
    )
    row = await cur.fetchone()
    assert row is not None, f"{event_id} not stored"
    return row[0], row[1]


async def test_duplicate_keys_are_accepted_and_the_last_one_wins(
    table_persister: tuple[Endpoint, Room, psycopg.AsyncConnection[Any]],
) -> None:
    """README decision: as in Python's json, msgspec and jsonb. The event ID
    is computed from that view; the stored JSON is the bytes as received."""
    server, room, conn = table_persister
    event_id, pdu = room.builder.event(advance=False)
    raw = b'{"depth":"not a number",' + msgspec.json.encode(pdu)[1:]
    answer = await exchange(server, persist(request(raw)))
    assert answer.status == 200, answer.text
    assert answer.json["results"][0]["event_id"] == event_id
    assert (await _stored_json(conn, event_id))[1] == raw.decode()


async def test_an_escaped_nul_in_content_is_stored_as_its_escape(
    table_persister: tuple[Endpoint, Room, psycopg.AsyncConnection[Any]],
) -> None:
    """`\\u0000` is legal JSON; PostgreSQL text holds the six-character escape."""
    server, room, conn = table_persister
    raw = room.with_content(b'"x":"a\\u0000b"')
    answer = await exchange(server, persist(request(raw)))
    assert answer.status == 200, answer.text
    stored = (await _stored_json(conn, answer.json["results"][0]["event_id"]))[1]
    assert stored == raw.decode() and "\\u0000" in stored


async def test_a_room_id_holding_a_slash_is_persisted_when_percent_encoded(
    table_persister: tuple[Endpoint, Room, psycopg.AsyncConnection[Any]],
) -> None:
    server, _, conn = table_persister
    room_id = "!a/b%c:example.org"
    answer = await exchange(
        server,
        persist(request(other_room_pdu("10", room_id)), path=events_path(room_id)),
    )
    assert answer.status == 200, answer.text
    event_id = answer.json["results"][0]["event_id"]
    assert (await _stored_json(conn, event_id))[0] == room_id
