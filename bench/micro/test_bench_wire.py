"""Micro-benchmarks of the persist API's request decoding and answer encoding.

Run: .venv/bin/python -m pytest bench/micro/test_bench_wire.py --benchmark-only -q
Bodies come from the load harness's workload generator (mixed 200 B - 2 KB
messages, forks and merges), so sizes match what `persister bench` sends.
Format rules (validation, hashing) are measured in test_bench_matrix.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from persister import client, wire
from persister.bench.workload import BenchRequest, WorkloadSpec, generate


def _first_request_of(batch: int, message_bytes: int | None) -> BenchRequest:
    spec = WorkloadSpec(rooms=5, events=400, batch=batch, message_bytes=message_bytes, seed=7)
    # The first request of a room is its setup; take a steady-state one.
    return next(r for r in generate(spec).requests if len(r.events) == batch and r.seq > 5)


def _body(request: BenchRequest) -> bytes:
    return client.encode_request(request.room_version, request.envelopes, request.backfilled)


@pytest.fixture(scope="module")
def body_50() -> bytes:
    return _body(_first_request_of(50, 1024))


@pytest.fixture(scope="module")
def body_1() -> bytes:
    return _body(_first_request_of(1, 1024))


def test_bench_decode_request_of_50_one_kb_events(benchmark: Any, body_50: bytes) -> None:
    decoded = benchmark(wire.request_decoder.decode, body_50)
    assert len(decoded.events) == 50


def test_bench_decode_request_of_one_event(benchmark: Any, body_1: bytes) -> None:
    decoded = benchmark(wire.request_decoder.decode, body_1)
    assert len(decoded.events) == 1


def test_bench_encode_request_of_50_events_client_side(benchmark: Any) -> None:
    # What the harness (and any event creator using PersisterClient) pays
    # per request; the PDUs are pre-encoded msgspec.Raw values.
    request = _first_request_of(50, 1024)
    body = benchmark(client.encode_request, request.room_version, request.envelopes, False)
    assert body.startswith(b"{")


def test_bench_encode_answer_of_50_events(benchmark: Any) -> None:
    results = [wire.EventResult(f"$event{i}", 1000 + i, 10 + i, False) for i in range(50)]
    answer = wire.PersistResponse(results, wire.Position("persister1", 1049))
    assert benchmark(wire.encoder.encode, answer).startswith(b'{"results"')


def test_bench_decode_answer_of_50_events(benchmark: Any) -> None:
    results = [wire.EventResult(f"$event{i}", 1000 + i, 10 + i, False) for i in range(50)]
    raw = wire.encoder.encode(wire.PersistResponse(results, wire.Position("persister1", 1049)))
    assert len(benchmark(wire.response_decoder.decode, raw).results) == 50
