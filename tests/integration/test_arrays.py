"""Typed array parameters reach PostgreSQL exactly as lists would."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from persister.storage import arrays, pipeline

CASES: list[tuple[list[Any], type[list[Any]], str]] = [
    (["$a", "!room:hs", 'é " \\ {json}', ""], arrays.TextArray, "text[]"),
    ([None, "m.room.member", None], arrays.TextArray, "text[]"),
    ([None], arrays.TextArray, "text[]"),
    ([], arrays.TextArray, "text[]"),
    ([0, -1, 2**63 - 1, -(2**63)], arrays.Int8Array, "bigint[]"),
    ([], arrays.Int8Array, "bigint[]"),
    ([True, False, True], arrays.BoolArray, "boolean[]"),
    ([], arrays.BoolArray, "boolean[]"),
]


@pytest.mark.parametrize(("items", "array_type", "cast"), CASES)
@pytest.mark.parametrize("binding", ["lane", "psycopg"], ids=["as the lanes bind", "plain psycopg"])
async def test_a_typed_array_arrives_as_the_list_it_holds(
    database_url: str,
    items: list[Any],
    array_type: type[list[Any]],
    cast: str,
    binding: str,
) -> None:
    query = f"SELECT %(a)b::{cast}, cardinality(%(a)b::{cast})"
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        if binding == "lane":
            row = await _lane_row(conn, query, {"a": array_type(items)})
        else:
            row = await (await conn.execute(query, {"a": array_type(items)})).fetchone()
    assert row == (items, len(items))


async def _lane_row(
    conn: psycopg.AsyncConnection[Any], query: str, params: dict[str, Any]
) -> tuple[Any, ...]:
    statement = pipeline.statement("typed_arrays", query)
    await pipeline.prepare(conn, (statement,))
    (result,) = await pipeline.round_trip(conn, (pipeline.bind(statement, params),))
    (row,) = pipeline.rows(conn, result)
    return row


async def test_unnest_of_typed_arrays_lines_up_nulls_with_their_rows(database_url: str) -> None:
    params = {
        "t": arrays.TextArray(["a", None, "c"]),
        "i": arrays.Int8Array([1, 2, 3]),
        "b": arrays.BoolArray([False, True, False]),
    }
    statement = pipeline.statement(
        "typed_unnest", "SELECT * FROM unnest(%(t)b::text[], %(i)b::bigint[], %(b)b::boolean[])"
    )
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await pipeline.prepare(conn, (statement,))
        (result,) = await pipeline.round_trip(conn, (pipeline.bind(statement, params),))
        assert pipeline.rows(conn, result) == [("a", 1, False), (None, 2, True), ("c", 3, False)]
