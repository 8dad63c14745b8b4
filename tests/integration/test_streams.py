"""SQL helpers for stream positions, against a real PostgreSQL."""

from __future__ import annotations

from persister.positions import WriterPositions
from persister.storage.streams import (
    complete_position,
    ensure_instance_ids,
    heartbeat_position,
    read_sequence_position,
    read_stream_position,
    read_stream_positions,
    recover_position,
    rows_between,
    upsert_stream_position_txn,
)
from tests.integration.stream_writers import connect, draw, event_row, insert_events


async def test_the_sequence_position_is_zero_before_the_first_nextval(database_url: str) -> None:
    # Synapse #18712: last_value of an unused sequence is a value never handed out.
    async with await connect(database_url) as conn:
        assert await read_sequence_position(conn) == 0


async def test_the_sequence_position_counts_values_drawn_by_rolled_back_transactions(
    database_url: str,
) -> None:
    async with await connect(database_url) as conn:
        async with conn.transaction(force_rollback=True):
            await draw(conn, 3)
        assert await read_sequence_position(conn) == 3


async def test_a_stored_position_never_goes_backwards(database_url: str) -> None:
    async with await connect(database_url) as conn:
        for stream_id in (5, 9, 7):
            async with conn.transaction(), conn.cursor() as cur:
                await upsert_stream_position_txn(cur, "events", "w1", stream_id)
        assert await read_stream_position(conn, "w1") == 9


async def test_a_descending_stream_position_moves_towards_more_negative(database_url: str) -> None:
    async with await connect(database_url) as conn:
        for stream_id in (-5, -9, -7):
            async with conn.transaction(), conn.cursor() as cur:
                await upsert_stream_position_txn(cur, "backfill", "w1", stream_id, descending=True)
        assert (await read_stream_positions(conn, "backfill")) == {"w1": -9}


async def test_a_restarting_writer_starts_at_the_sequence_and_stores_its_row(
    database_url: str,
) -> None:
    async with await connect(database_url) as conn:
        await draw(conn, 7)
        assert await recover_position(conn, "w1") == 7
        assert await read_stream_position(conn, "w1") == 7


async def test_a_writer_without_a_row_counts_at_the_sequence_for_a_starting_reader(
    database_url: str,
) -> None:
    async with await connect(database_url) as conn:
        await draw(conn, 12)
        async with conn.transaction(), conn.cursor() as cur:
            await upsert_stream_position_txn(cur, "events", "w1", 4)
        assert await complete_position(conn, ["w1", "w2"]) == 4
        assert await complete_position(conn, ["w2"]) == 12


async def test_rows_between_returns_forward_events_in_order_and_says_when_cut(
    database_url: str,
) -> None:
    async with await connect(database_url) as conn:
        await insert_events(conn, "w1", [3, 1, 2])
        await insert_events(conn, "w2", [5, -4])  # -4: a backfilled event
        rows, limited = await rows_between(conn, 0, 5, 3)
        assert ([r.stream_ordering for r in rows], limited) == ([1, 2, 3], True)
        rows, limited = await rows_between(conn, 3, 5, 3)
        assert (rows, limited) == ([event_row(5, "w2")], False)


async def test_rows_between_can_be_restricted_to_one_writer(database_url: str) -> None:
    async with await connect(database_url) as conn:
        await insert_events(conn, "w1", [1, 3])
        await insert_events(conn, "w2", [2])
        rows, _ = await rows_between(conn, 0, 10, 10, instance="w2")
        assert rows == [event_row(2, "w2")]


async def test_instance_ids_are_assigned_once_and_stay_small(database_url: str) -> None:
    async with await connect(database_url) as conn:
        first = await ensure_instance_ids(conn, ["w2", "w1"])
        for _ in range(5):
            assert await ensure_instance_ids(conn, ["w1", "w2", "w1"]) == first
        more = await ensure_instance_ids(conn, ["w3"])
        assert sorted([*first.values(), *more.values()]) == [1, 2, 3]


async def test_an_idle_heartbeat_follows_the_sequence_and_stores_the_position(
    database_url: str,
) -> None:
    async with await connect(database_url) as conn:
        positions = WriterPositions("w1", await recover_position(conn, "w1"))
        await draw(conn, 5)  # other writers drew these
        assert await heartbeat_position(conn, positions, "w1") == 5
        assert await read_stream_position(conn, "w1") == 5
