"""Typed array parameters reach PostgreSQL exactly as lists would."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from persister.storage import arrays

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
@pytest.mark.parametrize("registered", [True, False], ids=["registered", "plain psycopg"])
async def test_a_typed_array_arrives_as_the_list_it_holds(
    database_url: str,
    items: list[Any],
    array_type: type[list[Any]],
    cast: str,
    registered: bool,
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        if registered:
            arrays.register(conn)
        query = f"SELECT %b::{cast}, cardinality(%b::{cast})"
        row = await (await conn.execute(query, (array_type(items),) * 2)).fetchone()
    assert row == (items, len(items))


async def test_unnest_of_typed_arrays_lines_up_nulls_with_their_rows(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        arrays.register(conn)
        cursor = await conn.execute(
            "SELECT * FROM unnest(%b::text[], %b::bigint[], %b::boolean[])",
            (arrays.TextArray(["a", None, "c"]), arrays.Int8Array([1, 2, 3]),
             arrays.BoolArray([False, True, False])),
        )  # fmt: skip
        assert await cursor.fetchall() == [("a", 1, False), (None, 2, True), ("c", 3, False)]
