"""Micro-benchmarks of the Matrix format rules on the persist hot path.

Run: .venv/bin/python -m pytest bench/micro/test_bench_matrix.py --benchmark-only -q
The request benchmarks hold 50 events; divide their mean by 50 for µs/event
(the target is well under 30 µs per 1 KB m.room.message).
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from persister.matrix.builder import build_pdu
from persister.matrix.canonical_json import encode_canonical
from persister.matrix.event_ids import content_hash, reference_hash_event_id
from persister.matrix.pdu import prepare_events
from persister.matrix.redaction import redact
from persister.matrix.room_versions import V10
from persister.wire import PersistRequest, encoder, request_decoder

ROOM = "!benchroomabcdefghij:example.org"
SENDER = "@bench-user:example.org"
EVENTS_PER_REQUEST = 50
TARGET_PDU_BYTES = 1024


def one_kb_message(prev_id: str, depth: int) -> tuple[str, dict[str, Any]]:
    """A v10 m.room.message whose PDU is about 1 KB of JSON, like a long chat line."""
    auth = ["$" + c * 43 for c in "ABC"]

    def build(body: str) -> tuple[str, dict[str, Any]]:
        content = {"msgtype": "m.text", "body": body, "m.mentions": {}}
        return build_pdu(
            V10, ROOM, SENDER, "m.room.message", content, [prev_id], auth, depth,
            origin_server_ts=1_700_000_000_000 + depth,
        )  # fmt: skip

    _, probe = build("")
    filler = TARGET_PDU_BYTES - len(encoder.encode(probe))
    return build(("lorem ipsum dolor sit amet " * 50)[:filler])


def request_body() -> bytes:
    envelopes = []
    prev_id = "$" + "P" * 43
    for depth in range(10, 10 + EVENTS_PER_REQUEST):
        prev_id, pdu = one_kb_message(prev_id, depth)
        envelopes.append({"pdu": pdu, "event_id": prev_id})
    return encoder.encode({"room_version": "10", "events": envelopes})


@pytest.fixture(scope="module")
def body() -> bytes:
    return request_body()


@pytest.fixture(scope="module")
def request_50(body: bytes) -> PersistRequest:
    return request_decoder.decode(body)


@pytest.fixture(scope="module")
def pdu() -> dict[str, Any]:
    _, message = one_kb_message("$" + "P" * 43, 10)
    assert abs(len(encoder.encode(message)) - TARGET_PDU_BYTES) < 8
    return message


def test_bench_prepare_events_50_one_kb_messages_v10(benchmark: Any, request_50: Any) -> None:
    prepared = benchmark(prepare_events, request_50, ROOM)
    assert len(prepared) == EVENTS_PER_REQUEST


def test_bench_decode_and_prepare_50_one_kb_messages_v10(benchmark: Any, body: bytes) -> None:
    # What the HTTP handler pays from body bytes to PreparedEvents.
    def run() -> int:
        return len(prepare_events(request_decoder.decode(body), ROOM))

    assert benchmark(run) == EVENTS_PER_REQUEST


def test_bench_canonical_json_of_one_kb_event(benchmark: Any, pdu: dict[str, Any]) -> None:
    assert benchmark(encode_canonical, pdu).startswith(b"{")


def test_bench_redaction_of_one_kb_event(benchmark: Any, pdu: dict[str, Any]) -> None:
    assert benchmark(redact, pdu, V10)["content"] == {}


def test_bench_reference_hash_event_id_of_one_kb_event(benchmark: Any, pdu: dict[str, Any]) -> None:
    assert benchmark(reference_hash_event_id, pdu, V10).startswith("$")


def test_bench_content_hash_of_one_kb_event(benchmark: Any, pdu: dict[str, Any]) -> None:
    assert benchmark(content_hash, pdu) == pdu["hashes"]["sha256"]


def test_bench_pdu_decode_of_one_kb_event(benchmark: Any, pdu: dict[str, Any]) -> None:
    raw = encoder.encode(pdu)
    decoder = msgspec.json.Decoder()
    assert benchmark(decoder.decode, raw)["type"] == "m.room.message"
