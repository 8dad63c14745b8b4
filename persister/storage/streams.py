"""SQL for stream positions: the shared sequence, `stream_positions`, writer ids
and reading the events stream back.

Functions without a `_txn` suffix take an autocommit connection and run their
own statements; `_txn` functions run inside the caller's transaction.

A row `stream_positions(stream_name, instance_name, stream_id)` is a promise
like a POSITION message: everything that instance will ever commit with an
ordering <= stream_id is committed. Rows only move forward, and a running
writer has a row before it draws its first ordering (`recover_position`
writes it). Readers rely on both to pick a safe starting point
(`complete_position`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from psycopg import AsyncConnection, AsyncCursor

from persister.positions import WriterPositions
from persister.replication.messages import EVENTS_STREAM, EventRow

# `last_value` of a sequence nobody has called yet is its START value, which
# it has not handed out (`is_called` is false): Synapse #18712 let readers skip
# that ordering by counting it as seen. The value before it is the true answer.
READ_SEQUENCE_POSITION: Final = """
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END
    FROM events_stream_seq
"""

# Never backwards: a late or concurrent upsert with an older promise is a no-op.
UPSERT_FORWARD: Final = """
    INSERT INTO stream_positions (stream_name, instance_name, stream_id)
    VALUES (%s, %s, %s)
    ON CONFLICT (stream_name, instance_name) DO UPDATE SET stream_id = EXCLUDED.stream_id
    WHERE stream_positions.stream_id < EXCLUDED.stream_id
"""

# Backfill positions count downwards (-1, -2, ...), so "forward" is smaller.
UPSERT_DESCENDING: Final = """
    INSERT INTO stream_positions (stream_name, instance_name, stream_id)
    VALUES (%s, %s, %s)
    ON CONFLICT (stream_name, instance_name) DO UPDATE SET stream_id = EXCLUDED.stream_id
    WHERE stream_positions.stream_id > EXCLUDED.stream_id
"""

SELECT_STREAM_POSITIONS: Final = """
    SELECT instance_name, stream_id FROM stream_positions WHERE stream_name = %s
"""

SELECT_STREAM_POSITION: Final = """
    SELECT stream_id FROM stream_positions WHERE stream_name = %s AND instance_name = %s
"""

# The unique index on stream_ordering serves the range; LIMIT n+1 tells
# "exactly n rows" from "cut".
SELECT_ROWS: Final = """
    SELECT stream_ordering, event_id, room_id, type, state_key, sender
    FROM events
    WHERE stream_ordering > %s AND stream_ordering <= %s
    ORDER BY stream_ordering
    LIMIT %s
"""

SELECT_ROWS_AT: Final = """
    SELECT stream_ordering, event_id, room_id, type, state_key, sender
    FROM events WHERE stream_ordering = ANY(%s) ORDER BY stream_ordering
"""

SELECT_ROWS_OF_EVENTS: Final = """
    SELECT stream_ordering, event_id, room_id, type, state_key, sender
    FROM events WHERE event_id = ANY(%s) AND instance_name = %s AND stream_ordering > %s
    ORDER BY stream_ordering
"""

SELECT_ROWS_OF_INSTANCE: Final = """
    SELECT stream_ordering, event_id, room_id, type, state_key, sender
    FROM events
    WHERE stream_ordering > %s AND stream_ordering <= %s AND instance_name = %s
    ORDER BY stream_ordering
    LIMIT %s
"""

# Sorted so that concurrent first sightings insert in one order (no deadlock).
INSERT_INSTANCE_IDS: Final = """
    INSERT INTO stream_writer_ids (instance_name)
    SELECT name FROM unnest(%s::text[]) AS name ORDER BY name
    ON CONFLICT (instance_name) DO NOTHING
"""

SELECT_INSTANCE_IDS: Final = """
    SELECT instance_name, instance_id FROM stream_writer_ids WHERE instance_name = ANY(%s)
"""


async def read_sequence_position(conn: AsyncConnection[Any]) -> int:
    """The last ordering the shared sequence handed out (0 if it never did).

    Sequences ignore transactions: this sees values drawn by transactions that
    have not committed (and never will), which is what "reached" means here.
    """
    cur = await conn.execute(READ_SEQUENCE_POSITION)
    row = await cur.fetchone()
    assert row is not None  # a sequence always has its one row
    return int(row[0])


async def upsert_stream_position_txn(
    cur: AsyncCursor[Any],
    stream_name: str,
    instance: str,
    stream_id: int,
    *,
    descending: bool = False,
) -> None:
    sql = UPSERT_DESCENDING if descending else UPSERT_FORWARD
    await cur.execute(sql, (stream_name, instance, stream_id))


async def read_stream_positions(
    conn: AsyncConnection[Any], stream_name: str = EVENTS_STREAM
) -> dict[str, int]:
    cur = await conn.execute(SELECT_STREAM_POSITIONS, (stream_name,))
    return {str(name): int(stream_id) for name, stream_id in await cur.fetchall()}


async def read_stream_position(
    conn: AsyncConnection[Any], instance: str, stream_name: str = EVENTS_STREAM
) -> int | None:
    cur = await conn.execute(SELECT_STREAM_POSITION, (stream_name, instance))
    row = await cur.fetchone()
    return None if row is None else int(row[0])


async def recover_position(conn: AsyncConnection[Any], instance: str) -> int:
    """The position a (re)starting writer begins at, also stored as its row.

    Call it only after `persister.liveness.hold_liveness`: that waits out (or
    ends) every transaction a previous incarnation of this instance left
    behind. With none left, nothing of ours can commit an ordering the
    sequence has already handed out, and every later fetch returns more, so
    the sequence's last value is a safe promise. Two things go wrong
    otherwise:

    - starting from the stored row: safe but arbitrarily far behind, holding
      every reader's minimum down until the first heartbeat;
    - starting a writer with no row "at the others' minimum" (Synapse #16473)
      only patches the case where nothing stored the new writer's position;
      here the row is written now, before the first fetch, so a reader that
      finds no row for a writer knows it has not fetched anything yet.
    """
    position = await read_sequence_position(conn)
    async with conn.transaction(), conn.cursor() as cur:
        await upsert_stream_position_txn(cur, EVENTS_STREAM, instance, position)
    stored = await read_stream_position(conn, instance)
    # The stored row can only be higher if a peer announced for us while we
    # were down and the sequence then went back: never, but stay monotonic.
    return max(position, stored if stored is not None else position)


async def heartbeat_position(
    conn: AsyncConnection[Any], positions: WriterPositions, instance: str
) -> int:
    """An idle writer's current position: follow the sequence, store the row.

    Meant as the Publisher heartbeat's `get_position`. Storing the row keeps
    `stream_positions` within a heartbeat of the truth, so a reader that
    starts up does not begin from a stale idle writer's last write.
    """
    positions.observe(await read_sequence_position(conn))
    position = positions.position()
    async with conn.transaction(), conn.cursor() as cur:
        await upsert_stream_position_txn(cur, EVENTS_STREAM, instance, position)
    return position


async def complete_position(conn: AsyncConnection[Any], writers: Sequence[str]) -> int:
    """A position up to which the stream is complete, from the database alone.

    The minimum of the writers' rows; a writer without a row counts at the
    sequence's value. That is safe only because the sequence is read *before*
    the rows: a writer whose row is not there yet writes it before drawing
    its first ordering, and draws it later than our read of the sequence.
    """
    sequence = await read_sequence_position(conn)
    stored = await read_stream_positions(conn)
    return min((stored.get(writer, sequence) for writer in writers), default=sequence)


async def rows_between(
    conn: AsyncConnection[Any],
    from_exclusive: int,
    to_inclusive: int,
    limit: int,
    *,
    instance: str | None = None,
) -> tuple[list[EventRow], bool]:
    """Events with `from_exclusive < stream_ordering <= to_inclusive`, in order.

    `limited` is true when more rows remain: continue from the last row's
    ordering. `instance` restricts to one writer's events.
    """
    if instance is None:
        cur = await conn.execute(SELECT_ROWS, (from_exclusive, to_inclusive, limit + 1))
    else:
        cur = await conn.execute(
            SELECT_ROWS_OF_INSTANCE, (from_exclusive, to_inclusive, instance, limit + 1)
        )
    rows = [EventRow(*row) for row in await cur.fetchall()]
    limited = len(rows) > limit
    return rows[:limit], limited


async def rows_at(conn: AsyncConnection[Any], orderings: Sequence[int]) -> list[EventRow]:
    """The committed events among `orderings` (after a COMMIT whose answer was lost)."""
    cur = await conn.execute(SELECT_ROWS_AT, (list(orderings),))
    return [EventRow(*row) for row in await cur.fetchall()]


async def rows_of_events(
    conn: AsyncConnection[Any], event_ids: Sequence[str], instance: str, above: int
) -> list[EventRow]:
    """The committed events among `event_ids` that `instance` wrote with an
    ordering above `above` (after a COMMIT whose orderings were never heard)."""
    cur = await conn.execute(SELECT_ROWS_OF_EVENTS, (list(event_ids), instance, above))
    return [EventRow(*row) for row in await cur.fetchall()]


async def ensure_instance_ids(
    conn: AsyncConnection[Any], instances: Sequence[str]
) -> dict[str, int]:
    """Small stable integers for instance names, assigned on first sight."""
    names = sorted(set(instances))
    ids = await _read_instance_ids(conn, names)
    missing = [name for name in names if name not in ids]
    if missing:
        # Only when missing: ON CONFLICT still draws an identity value per
        # row, and ids are meant to stay small.
        await conn.execute(INSERT_INSTANCE_IDS, (missing,))
        ids = await _read_instance_ids(conn, names)
    return ids


async def _read_instance_ids(conn: AsyncConnection[Any], names: list[str]) -> dict[str, int]:
    cur = await conn.execute(SELECT_INSTANCE_IDS, (names,))
    return {str(name): int(instance_id) for name, instance_id in await cur.fetchall()}
