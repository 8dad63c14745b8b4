"""Fuzzing the persist API against a real persister (issue 7, item 5).

Requests come from `tests.integration.fuzz_requests`: drawn from the OpenAPI
schema, built valid with `build_pdu`, and mutated at every level down to the
bytes. For every one of them:

- the answer is never >= 500 and never hangs;
- the answer is JSON: a `PersistResponse` for 200, else `{errcode, error}`;
- a refused request (anything but 200) leaves every data table exactly as it
  was (row counts and a checksum of all rows);
- a request built valid and left alone is accepted.

CI runs a fixed (derandomized) short form. The long form draws fresh cases:

    PERSISTER_FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest -s -m slow \\
        tests/integration/test_fuzz_persist_api.py

and prints how many requests got which answer.
"""

from __future__ import annotations

import os
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings

from persister.server import build_writer
from persister.wire import ErrorBody, response_decoder
from tests.fixtures.persister import make_config
from tests.integration.fuzz_requests import FuzzRequest, persist_requests
from tests.integration.hostile import Endpoint, exchange, request_bytes, served, snapshot

CI_EXAMPLES = 400
EXAMPLES_ENV = "PERSISTER_FUZZ_EXAMPLES"

T = TypeVar("T", bound=Callable[..., Any])


@dataclass
class FuzzTarget:
    server: Endpoint
    conn: psycopg.AsyncConnection[Any]
    state: dict[str, tuple[int, str]]
    tally: Counter[tuple[str, int]] = field(default_factory=Counter)
    errcodes: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        total = sum(self.tally.values())
        by_status = Counter[int]()
        for (_, status), count in self.tally.items():
            by_status[status] += count
        sources = Counter[str]()
        for (source, _), count in self.tally.items():
            sources[source] += count
        return (
            f"fuzz: {total} requests, {sum(c for s, c in by_status.items() if s >= 500)} "
            f"answers >= 500; by status {dict(sorted(by_status.items()))}; "
            f"by source {dict(sorted(sources.items()))}; "
            f"errcodes {dict(self.errcodes.most_common())}"
        )


@pytest.fixture
async def target(database_url: str, redis_url: str) -> AsyncIterator[FuzzTarget]:
    channel = f"persister.test.{secrets.token_hex(6)}"
    writer = build_writer(make_config(database_url, redis_url, channel), "persister1")
    await writer.start()
    try:
        async with (
            served(writer) as server,
            await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn,
        ):
            fuzz = FuzzTarget(server, conn, await snapshot(conn))
            yield fuzz
            print("\n" + fuzz.summary())
    finally:
        await writer.drain(5)
        await writer.stop()


async def check(target: FuzzTarget, request: FuzzRequest) -> None:
    raw = request_bytes(request.path, request.body, request.headers)
    answer = await exchange(target.server, raw, timeout_s=15.0)
    target.tally[request.source, answer.status] += 1
    assert 0 < answer.status < 500, f"{answer.status}: {answer.text[:500]}"
    assert answer.json is not None, f"not JSON: {answer.headers} {answer.text[:300]}"
    if answer.status == 200:
        decoded = response_decoder.decode(answer.body)
        assert decoded.results and decoded.position.instance == "persister1"
        target.state = await snapshot(target.conn)
        return
    error = msgspec.convert(answer.json, ErrorBody)
    target.errcodes[error.errcode] += 1
    assert error.errcode.startswith("M_") and error.error
    assert not request.valid, f"a valid request was refused: {answer.status} {error}"
    assert await snapshot(target.conn) == target.state, f"refused ({error}) but wrote rows"


def fuzz_settings(examples: int, *, derandomize: bool) -> Callable[[T], T]:
    return settings(
        max_examples=examples,
        derandomize=derandomize,
        deadline=None,
        database=None,
        suppress_health_check=[
            # One persister serves every example: that is the point.
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


@fuzz_settings(CI_EXAMPLES, derandomize=True)
@given(request=persist_requests())
async def test_generated_requests_get_no_5xx_and_refused_ones_write_nothing(
    target: FuzzTarget, request: FuzzRequest
) -> None:
    await check(target, request)


LONG_EXAMPLES = int(os.environ.get(EXAMPLES_ENV, "10000"))


@pytest.mark.slow
@pytest.mark.skipif(
    EXAMPLES_ENV not in os.environ, reason=f"long form: set {EXAMPLES_ENV} (e.g. 10000)"
)
@pytest.mark.timeout(max(180, LONG_EXAMPLES // 5))  # about 40 ms a request; room for a slow disk
@fuzz_settings(LONG_EXAMPLES, derandomize=False)
@given(request=persist_requests())
async def test_long_form_fuzz(target: FuzzTarget, request: FuzzRequest) -> None:
    await check(target, request)
