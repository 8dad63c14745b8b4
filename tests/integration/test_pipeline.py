"""A lane's round trips over libpq's pipeline mode (`persister.storage.pipeline`)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from persister.storage import pipeline
from persister.storage.arrays import BoolArray, Int8Array, TextArray

Connection = psycopg.AsyncConnection[Any]

ECHO = pipeline.statement(
    "test_echo",
    "SELECT %(word)s::text, %(number)s::bigint, %(words)b::text[], %(numbers)b::bigint[],"
    " %(flags)b::bool[], %(word)s::text || '!', %(nothing)s::text",
)


async def _connect(url: str) -> Connection:
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


def test_named_placeholders_become_positional_ones_numbered_by_first_use() -> None:
    assert ECHO.params == ("word", "number", "words", "numbers", "flags", "nothing")
    assert ECHO.sql.startswith(b"SELECT $1::text, $2::bigint, $3::text[], $4::bigint[],")
    assert b"$1::text || '!', $6::text" in ECHO.sql


async def test_a_prepared_statement_gets_its_parameters_and_gives_typed_rows(
    database_url: str,
) -> None:
    params = {
        "word": "é \" ' \\",
        "number": -(2**63),
        "words": TextArray(["a", None, ""]),
        "numbers": Int8Array([1, 2**63 - 1]),
        "flags": BoolArray([True, False]),
        "nothing": None,
    }
    async with await _connect(database_url) as conn:
        await pipeline.prepare(conn, (ECHO,))
        first, second = await pipeline.round_trip(
            conn, (pipeline.bind(ECHO, params), pipeline.bind(ECHO, params | {"number": 7}))
        )
        expected = ("é \" ' \\", -(2**63), ["a", None, ""], [1, 2**63 - 1], [True, False])
        assert pipeline.rows(conn, first) == [(*expected, "é \" ' \\!", None)]
        assert pipeline.rows(conn, second)[0][1] == 7


async def test_an_error_is_psycopgs_with_its_sqlstate_and_the_connection_rolls_back(
    database_url: str,
) -> None:
    failing = pipeline.plain("SELECT 1 / 0")
    async with await _connect(database_url) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            await pipeline.round_trip(
                conn, (pipeline.plain("BEGIN"), failing, pipeline.plain("COMMIT"))
            )
        # The statements after the error were skipped; the transaction waits
        # for its rollback, and the connection serves on after it.
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        await conn.rollback()
        (result,) = await pipeline.round_trip(conn, (pipeline.plain("SELECT 2"),))
        assert pipeline.rows(conn, result) == [(2,)]


async def test_a_lost_connection_is_an_operational_error_and_leaves_it_closed(
    database_url: str,
) -> None:
    async with await _connect(database_url) as conn, await _connect(database_url) as killer:
        pid = conn.info.backend_pid
        await killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            for _ in range(50):  # the termination reaches the socket soon after
                await pipeline.round_trip(conn, (pipeline.plain("SELECT 1"),))
                await asyncio.sleep(0.02)
        assert conn.closed


async def test_a_round_trip_larger_than_the_socket_buffers_goes_through(
    database_url: str,
) -> None:
    # 16 MB each way: the client must read answers while it is still sending.
    big = TextArray(["x" * 1024] * 16_384)
    echo = pipeline.statement("test_big", "SELECT %(items)b::text[]")
    async with await _connect(database_url) as conn:
        await pipeline.prepare(conn, (echo,))
        results = await pipeline.round_trip(conn, [pipeline.bind(echo, {"items": big})] * 2)
        assert [len(pipeline.rows(conn, r)[0][0]) for r in results] == [16_384, 16_384]


async def test_a_round_trip_cancelled_midway_closes_the_connection(database_url: str) -> None:
    async with await _connect(database_url) as conn:
        trip = asyncio.ensure_future(
            pipeline.round_trip(conn, (pipeline.plain("SELECT pg_sleep(5)"),))
        )
        await asyncio.sleep(0.1)
        trip.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trip
        # Its answer was never read: the connection cannot be trusted with
        # another statement, so it is closed rather than left out of step.
        assert conn.closed
